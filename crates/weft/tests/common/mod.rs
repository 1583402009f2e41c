//! Shared helpers of the integration tests: root check, unique namespace prefixes, waiting.
#![allow(dead_code)]

pub mod capture;
pub mod cluster;
pub mod lab;
pub mod mesh;
pub mod scenarios;

use std::time::{Duration, Instant};

/// Integration tests build network namespaces and run etcd: they need root, as in CI.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "these tests create network namespaces and must run as root (CI does)");
}

/// A namespace prefix unique to this test and run; leftovers of earlier runs of the same
/// test (any pid) are removed first.
pub fn prefix(tag: &str) -> String {
    require_root();
    assert_eq!(tag.len(), 3, "tags are three letters so no tag is a prefix of another");
    weft::lab::netns::remove_prefixed(&format!("wt{tag}"));
    format!("wt{tag}{}-", std::process::id() % 100_000)
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `limit` with `what`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The weft binary under test.
pub fn weft_bin() -> &'static str {
    env!("CARGO_BIN_EXE_weft")
}

/// The names of the links in `ns`, from `ip -j link show` (which must succeed: a failed `ip`
/// is not an absent device).
pub fn links(ns: &weft::lab::netns::Netns) -> Vec<String> {
    let out = ns.ip(&["-j", "link", "show"]).unwrap_or_else(|e| panic!("cannot list the links of {}: {e}", ns.name));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("`ip -j link` printed {out:?}: {e}"));
    v.as_array()
        .unwrap_or_else(|| panic!("`ip -j link` printed no list: {v}"))
        .iter()
        .map(|l| l["ifname"].as_str().unwrap_or_else(|| panic!("a link without a name: {l}")).to_string())
        .collect()
}

/// The named network namespaces, from `ip netns list` (which must succeed).
pub fn namespaces() -> Vec<String> {
    let out = weft::lab::netns::ip(&["netns", "list"]).unwrap_or_else(|e| panic!("cannot list namespaces: {e}"));
    out.lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect()
}

/// Removes `path` if it exists; any other failure is the test's failure, not "gone".
pub fn remove_if_present(path: &std::path::Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove {}: {e}", path.display()),
    }
}

/// Gives host namespace `ns` the pods' bridge `cni0` (created once, up) carrying exactly
/// `addr`, as the CNI bridge plugin would; a host that came back with a new lease is
/// re-addressed.
pub fn cni_bridge(ns: &weft::lab::netns::Netns, addr: &str) {
    if ns.ip(&["link", "show", "cni0"]).is_err() {
        ns.ip(&["link", "add", "cni0", "type", "bridge"]).unwrap();
        ns.ip(&["link", "set", "cni0", "up"]).unwrap();
    }
    ns.ip(&["addr", "flush", "dev", "cni0"]).unwrap();
    ns.ip(&["addr", "add", addr, "dev", "cni0"]).unwrap();
}

/// A scratch CNI world in a temp dir: a `subnet.env` for host subnet 10.1.17.0/24 of
/// 10.1.0.0/16, and `bin/` with weft installed as `flannel`, the way runtimes find it.
/// `WEFT_TEST_BIN` names another weft binary (a private copy no other build can replace
/// while the tests run).
pub fn cni_scratch() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(
        dir.join("subnet.env"),
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let weft = std::env::var_os("WEFT_TEST_BIN").map(std::path::PathBuf::from).unwrap_or_else(|| weft_bin().into());
    std::os::unix::fs::symlink(weft, bin.join("flannel")).unwrap();
    (tmp, dir)
}
