//! The CNI plugin driven through libcni (the library podman, containerd and cri-o link),
//! Debian's golang-github-appc-cni-dev 1.1.2, by the Go harness in `tests/libcni/`, built
//! offline with Debian's golang-go. The harness runs inside a "host" namespace; weft is
//! installed there as `flannel` in a CNI bin dir beside the real bridge, host-local and
//! portmap plugins. Kernel state is checked with `ip -j`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{Value, json};
use weft::lab::netns::Netns;

const CNI_BIN: &str = "/usr/lib/cni";

/// Builds the harness once per test process (GOPATH mode against /usr/share/gocode, no
/// network: GOPROXY=off, GOFLAGS=-mod=mod is not used).
fn harness() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("libcni-harness");
        std::fs::create_dir_all(&out).unwrap();
        let bin = out.join("harness");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/libcni");
        let build = Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(".")
            .current_dir(&src)
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOCACHE", out.join("gocache"))
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .output()
            .unwrap_or_else(|e| panic!("cannot run `go` ({e}); run scripts/install-deps.sh (golang-go, golang-github-appc-cni-dev)"));
        assert!(
            build.status.success(),
            "building the libcni harness failed (scripts/install-deps.sh installs golang-go and golang-github-appc-cni-dev): {}",
            String::from_utf8_lossy(&build.stderr)
        );
        bin
    })
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    host: Netns,
    prefix: String,
    pods: Vec<Netns>,
}

fn setup(tag: &str) -> Setup {
    let prefix = common::prefix(tag);
    // The CNI bin dir a runtime would use: weft as `flannel`, the standard plugins beside it.
    let (tmp, dir) = common::cni_scratch();
    let bin = dir.join("bin");
    for p in ["bridge", "host-local", "portmap"] {
        std::os::unix::fs::symlink(Path::new(CNI_BIN).join(p), bin.join(p)).unwrap();
    }
    let host = Netns::add(&format!("{prefix}host")).unwrap();
    Setup { _tmp: tmp, dir, host, prefix, pods: Vec::new() }
}

/// The file names in `dir`; none while it does not exist (any other error fails the test).
fn names_in(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(d) => d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("cannot list {}: {e}", dir.display()),
    }
}

impl Setup {
    fn conflist(&self, version: &str) -> PathBuf {
        self.conflist_with(version, true)
    }

    /// A conflist: weft (as `flannel`), then `portmap` when asked (portmap 1.1.1 itself
    /// knows no 1.1.0).
    fn conflist_with(&self, version: &str, portmap: bool) -> PathBuf {
        let mut list = json!({
            "cniVersion": version,
            "name": "testnet",
            "plugins": [
                {
                    "type": "flannel",
                    "subnetFile": self.dir.join("subnet.env"),
                    "dataDir": self.dir.join("state"),
                    "ipam": {"dataDir": self.dir.join("ipam")},
                    "delegate": {"hairpinMode": true},
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        if !portmap {
            list["plugins"].as_array_mut().unwrap().pop();
        }
        let p = self.dir.join(format!("net-{version}.conflist"));
        std::fs::write(&p, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
        p
    }

    fn pod(&mut self, n: usize) -> String {
        let ns = Netns::add(&format!("{}p{n}", self.prefix)).unwrap();
        let path = format!("/run/netns/{}", ns.name);
        self.pods.push(ns);
        path
    }

    /// Runs the harness in the host namespace; returns its JSON answer.
    fn harness(&self, args: &[&str]) -> Value {
        let out = self
            .host
            .command(harness().to_str().unwrap())
            .args(args)
            .env("HARNESS_CNI_PATH", self.dir.join("bin"))
            .env("HARNESS_CACHE", self.dir.join("cache"))
            .env("HARNESS_CAPTURE", self.dir.join("capture.jsonl"))
            .output()
            .unwrap();
        assert!(out.status.success(), "harness {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("harness {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    fn saved(&self) -> Vec<String> {
        let mut v: Vec<String> = names_in(&self.dir.join("state"));
        v.retain(|n| !n.starts_with('.'));
        v.sort();
        v
    }

    /// Addresses host-local has handed out.
    fn allocated(&self) -> Vec<String> {
        let mut v: Vec<String> = names_in(&self.dir.join("ipam/testnet"));
        v.retain(|n| n.parse::<std::net::IpAddr>().is_ok());
        v.sort();
        v
    }

    /// Host-side veths (on any bridge or none).
    fn host_veths(&self) -> Vec<String> {
        let links: Value =
            serde_json::from_str(&self.host.ip(&["-j", "-d", "link", "show", "type", "veth"]).unwrap()).unwrap();
        links.as_array().unwrap().iter().map(|l| l["ifname"].as_str().unwrap().to_string()).collect()
    }

    /// A summary of what libcni sent and what each plugin answered.
    fn print_capture(&self, title: &str) {
        let text = std::fs::read_to_string(self.dir.join("capture.jsonl")).unwrap_or_default();
        println!("=== {title}: what libcni sent, what the plugins answered ===");
        for line in text.lines() {
            let c: Value = serde_json::from_str(line).unwrap();
            let stdin = &c["stdin"];
            let mut keys: Vec<&str> =
                stdin.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
            keys.sort();
            let out = c["stdout"].as_str().unwrap_or("");
            // Compact: one line per call.
            let out =
                serde_json::from_str::<Value>(out).map(|v| v.to_string()).unwrap_or_else(|_| out.trim().to_string());
            let out: String = out.chars().take(400).collect();
            println!(
                "{} {} id={} netns={} ifname={} stdin.cniVersion={} stdin keys={:?} -> {}{}",
                c["plugin"].as_str().unwrap_or(""),
                c["env"]["CNI_COMMAND"].as_str().unwrap_or(""),
                c["env"]["CNI_CONTAINERID"].as_str().unwrap_or(""),
                c["env"]["CNI_NETNS"].as_str().map(|n| if n.is_empty() { "-" } else { "set" }).unwrap_or("unset"),
                c["env"]["CNI_IFNAME"].as_str().unwrap_or(""),
                stdin["cniVersion"],
                keys,
                if out.is_empty() { "(empty)".to_string() } else { out },
                c["error"].as_str().map(|e| format!(" ERROR {e}")).unwrap_or_default(),
            );
        }
    }
}

impl Setup {
    /// Runs weft as `flannel` directly (no libcni), in the host namespace.
    fn plugin(&self, command: &str, id: &str, netns: &str, conf: &Value, path: Option<&str>) -> (bool, Value) {
        use std::io::Write;
        let bin = self.dir.join("bin");
        let mut c = self.host.command(bin.join("flannel").to_str().unwrap());
        c.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", path.map(String::from).unwrap_or_else(|| bin.display().to_string()));
        let mut child = c
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.success(), v)
    }

    fn netconf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "testnet",
            "type": "flannel",
            "subnetFile": self.dir.join("subnet.env"),
            "dataDir": self.dir.join("state"),
            "ipam": {"dataDir": self.dir.join("ipam")},
        })
    }
}

fn no_error(v: &Value, what: &str) {
    assert_eq!(v["error"], "", "{what}: {v}");
}

#[test]
fn libcni_add_check_del_for_0_4_0_and_1_0_0_with_parallel_adds_and_a_failed_add() {
    let mut s = setup("cnl");
    let pods: Vec<String> = (0..4).map(|n| s.pod(n)).collect();
    for version in ["0.4.0", "1.0.0"] {
        let list = s.conflist(version);
        let list = list.to_str().unwrap();
        no_error(&s.harness(&["validate", list]), "validate");

        // Four parallel ADDs, as a runtime starting four containers at once.
        let args: Vec<String> = pods.iter().enumerate().map(|(i, p)| format!("c{i}={p}")).collect();
        let mut argv = vec!["add", list];
        argv.extend(args.iter().map(String::as_str));
        let adds = s.harness(&argv);
        let mut ips = Vec::new();
        for a in adds["adds"].as_array().unwrap() {
            assert_eq!(a["error"], "", "{version}: {a}");
            assert_eq!(a["result"]["cniVersion"], version, "{a}");
            ips.push(a["result"]["ips"][0]["address"].as_str().unwrap().to_string());
        }
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 4, "four distinct addresses: {ips:?}");
        assert_eq!(s.saved(), vec!["c0", "c1", "c2", "c3"]);
        assert_eq!(s.allocated().len(), 4);
        for (i, p) in pods.iter().enumerate() {
            let pod = &s.pods[i];
            let a: Value = serde_json::from_str(&pod.ip(&["-j", "addr", "show", "eth0"]).unwrap()).unwrap();
            assert_eq!(a[0]["mtu"], 1450);
            no_error(&s.harness(&["check", list, &format!("c{i}"), p]), "check");
        }

        // The host side of c1 detached from the bridge: the container's gateway is
        // unreachable, and CHECK (with libcni's cached result) must say so.
        let cached: Value =
            serde_json::from_slice(&std::fs::read(s.dir.join("cache/results/testnet-c1-eth0")).unwrap()).unwrap();
        let veth = cached["result"]["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i.get("sandbox").is_none() && i["name"] != "cni0")
            .unwrap()["name"]
            .as_str()
            .unwrap()
            .to_string();
        s.host.ip(&["link", "set", &veth, "nomaster"]).unwrap();
        let broken = s.harness(&["check", list, "c1", &pods[1]]);
        let msg = broken["error"].as_str().unwrap();
        assert!(msg.contains(&format!("host-side veth {veth} is not attached to the bridge cni0")), "{broken}");
        s.host.ip(&["link", "set", &veth, "master", "cni0"]).unwrap();
        no_error(&s.harness(&["check", list, "c1", &pods[1]]), "check after repair");
        s.host.ip(&["link", "set", &veth, "down"]).unwrap();
        assert!(s.harness(&["check", list, "c1", &pods[1]])["error"].as_str().unwrap().contains("is down"));
        s.host.ip(&["link", "set", &veth, "up"]).unwrap();

        // DEL, twice: nothing left, nothing leaked.
        for (i, p) in pods.iter().enumerate() {
            for _ in 0..2 {
                no_error(&s.harness(&["del", list, &format!("c{i}"), p]), "del");
            }
        }
        assert_eq!(s.saved(), Vec::<String>::new(), "{version}: saved state left");
        assert_eq!(s.allocated(), Vec::<String>::new(), "{version}: addresses leaked");
        assert_eq!(s.host_veths(), Vec::<String>::new(), "{version}: host veths left");

        // A failed ADD (the pod already has an eth0) and the runtime's rollback DEL leave
        // nothing behind.
        s.pods[0].ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "other0"]).unwrap();
        let failed = s.harness(&["add-del", list, "bad", &pods[0]]);
        assert!(failed["add_error"].as_str().unwrap().contains("eth0"), "{failed}");
        assert_eq!(failed["del_error"], "", "{failed}");
        assert_eq!(s.saved(), Vec::<String>::new(), "{version}: failed ADD left state");
        assert_eq!(s.allocated(), Vec::<String>::new(), "{version}: failed ADD leaked an address");
        assert_eq!(s.host_veths(), Vec::<String>::new());
        if common::links(&s.pods[0]).contains(&"eth0".to_string()) {
            s.pods[0].ip(&["link", "del", "eth0"]).unwrap();
        }
    }
    s.print_capture("cniVersion 0.4.0 and 1.0.0");
}

#[test]
fn libcni_cni_version_1_1_0_never_leaks() {
    let mut s = setup("cnv");
    let pod = s.pod(0);
    let list = s.conflist_with("1.1.0", false);
    let list = list.to_str().unwrap();
    // libcni asks the plugin for VERSION: weft's chain honours 1.1.0 (the bridge plugin
    // is run at 1.0.0, whose result format 1.1.0 shares).
    no_error(&s.harness(&["validate", list]), "validate");

    // A runtime's ADD and, when it fails, its rollback DEL. libcni 1.1.2 itself cannot
    // parse a 1.1.0 result, so the ADD fails after the chain succeeded; whatever fails, the
    // DEL must succeed and leave nothing behind (the old plugin kept its state forever).
    let r = s.harness(&["add-del", list, "c110", &pod]);
    assert_eq!(r["del_error"], "", "{r}");
    assert_eq!(s.saved(), Vec::<String>::new(), "state left after DEL: {r}");
    assert_eq!(s.allocated(), Vec::<String>::new(), "address leaked: {r}");
    assert_eq!(s.host_veths(), Vec::<String>::new(), "host veth left: {r}");
    assert!(!common::links(&s.pods[0]).contains(&"eth0".to_string()), "the pod's interface is gone");
    // What weft itself answered to the 1.1.0 ADD: a 1.1.0 result, from bridge run at 1.0.0.
    let capture = std::fs::read_to_string(s.dir.join("capture.jsonl")).unwrap();
    let add = capture
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|c| c["plugin"] == "flannel" && c["env"]["CNI_COMMAND"] == "ADD")
        .expect("weft's ADD was run");
    let result: Value = serde_json::from_str(add["stdout"].as_str().unwrap()).unwrap_or_else(|_| json!({}));
    assert_eq!(result["cniVersion"], "1.1.0", "{add}");
    assert!(result["ips"][0]["address"].as_str().unwrap_or("").starts_with("10.1.17."), "{add}");
    s.print_capture("cniVersion 1.1.0");

    // The same chain driven directly at 1.1.0, as a 1.1-aware runtime (libcni 1.2) does.
    let conf = s.netconf("1.1.0");
    let (ok, result) = s.plugin("ADD", "d1", &pod, &conf, None);
    assert!(ok, "{result}");
    assert_eq!(result["cniVersion"], "1.1.0");
    let saved: Value = serde_json::from_slice(&std::fs::read(s.dir.join("state/d1")).unwrap()).unwrap();
    assert_eq!(saved["cniVersion"], "1.0.0", "the delegate is handed the version it supports");
    let mut check = conf.clone();
    check["prevResult"] = result.clone();
    let (ok, out) = s.plugin("CHECK", "d1", &pod, &check, None);
    assert!(ok, "{out}");
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let (ok, out) = s.plugin("GC", "", "", &gc, None);
    assert!(ok, "{out}");
    assert_eq!(s.saved(), Vec::<String>::new(), "GC removed d1");
    assert_eq!(s.allocated(), Vec::<String>::new(), "GC released d1's address");
    assert!(s.plugin("DEL", "d1", &pod, &conf, None).0, "DEL after GC succeeds");
    // GC runs without a namespace (the container is gone); here it still exists: clear it.
    s.pods[0].ip(&["link", "del", "eth0"]).unwrap();

    // State saved by the old plugin (delegate config at 1.1.0, which bridge refuses): DEL
    // hands the delegate a version it supports, releases the address, forgets the state.
    let (ok, out) = s.plugin("ADD", "old", &pod, &conf, None);
    assert!(ok, "{out}");
    let mut saved: Value = serde_json::from_slice(&std::fs::read(s.dir.join("state/old")).unwrap()).unwrap();
    saved["cniVersion"] = json!("1.1.0");
    std::fs::write(s.dir.join("state/old"), saved.to_string()).unwrap();
    let (ok, out) = s.plugin("DEL", "old", &pod, &conf, None);
    assert!(ok, "{out}");
    assert_eq!((s.saved(), s.allocated()), (vec![], vec![]), "old 1.1.0 state released");

    // A config the chain cannot honour: code 1, nothing saved, nothing delegated.
    let (ok, out) = s.plugin("ADD", "new", &pod, &s.netconf("1.2.0"), None);
    assert!(!ok && out["code"] == 1, "{out}");
    assert!(s.saved().is_empty() && s.allocated().is_empty());

    // Permanent DEL failures: the delegate binary is gone; the namespace is gone. Both
    // succeed and forget the state; with the namespace gone the address is still released.
    assert!(s.plugin("ADD", "p1", &pod, &conf, None).0);
    let (ok, out) = s.plugin("DEL", "p1", &pod, &conf, Some("/nonexistent"));
    assert!(ok, "delegate missing is permanent: {out}");
    assert!(s.saved().is_empty());
    let leaked = s.allocated();
    assert_eq!(leaked.len(), 1, "without the delegate, p1's address could not be released");
    std::fs::remove_file(s.dir.join("ipam/testnet").join(&leaked[0])).unwrap();
    // The delegate never ran, so the pod's eth0 is still there.
    s.pods[0].ip(&["link", "del", "eth0"]).unwrap();
    assert!(s.plugin("ADD", "p2", &pod, &conf, None).0);
    s.pods.clear();
    let (ok, out) = s.plugin("DEL", "p2", &pod, &conf, None);
    assert!(ok, "netns gone is permanent: {out}");
    assert_eq!((s.saved(), s.allocated()), (vec![], vec![]), "address released without the namespace");

    // IPAM state already gone (host-local's store wiped): DEL succeeds and forgets.
    let pod = s.pod(2);
    assert!(s.plugin("ADD", "i1", &pod, &conf, None).0);
    std::fs::remove_dir_all(s.dir.join("ipam/testnet")).unwrap();
    let (ok, out) = s.plugin("DEL", "i1", &pod, &conf, None);
    assert!(ok, "{out}");
    assert_eq!(s.saved(), Vec::<String>::new());

    // A transient failure (host-local cannot reach its store) keeps the state for the retry.
    let pod = s.pod(1);
    assert!(s.plugin("ADD", "t1", &pod, &conf, None).0);
    let store = s.dir.join("ipam/testnet");
    std::fs::rename(&store, s.dir.join("ipam-aside")).unwrap();
    std::fs::write(&store, "not a directory").unwrap();
    let (ok, out) = s.plugin("DEL", "t1", &pod, &conf, None);
    assert!(!ok, "{out}");
    assert_eq!(s.saved(), vec!["t1"], "transient: state kept for the retry");
    std::fs::remove_file(&store).unwrap();
    std::fs::rename(s.dir.join("ipam-aside"), &store).unwrap();
    let (ok, out) = s.plugin("DEL", "t1", &pod, &conf, None);
    assert!(ok, "{out}");
    assert_eq!((s.saved(), s.allocated()), (vec![], vec![]));
}

#[test]
fn libcni_gc_releases_containers_the_runtime_no_longer_has() {
    let mut s = setup("cng");
    let pods: Vec<String> = (0..3).map(|n| s.pod(n)).collect();
    let list = s.conflist("1.0.0");
    let list = list.to_str().unwrap();
    let args: Vec<String> = pods.iter().enumerate().map(|(i, p)| format!("g{i}={p}")).collect();
    let mut argv = vec!["add", list];
    argv.extend(args.iter().map(String::as_str));
    for a in s.harness(&argv)["adds"].as_array().unwrap() {
        assert_eq!(a["error"], "", "{a}");
    }
    assert_eq!(s.allocated().len(), 3);

    // g1's container vanished behind the runtime's back: its namespace is gone, no DEL came.
    let gone = s.pods.remove(1);
    drop(gone);
    let g1_ip = s.allocated();
    no_error(&s.harness(&["gc", list, "g0", "g2"]), "gc");
    assert_eq!(s.saved(), vec!["g0", "g2"], "GC removed g1's state only");
    assert_eq!(s.allocated().len(), 2, "GC released g1's address: before {g1_ip:?}, after {:?}", s.allocated());
    // The valid attachments are untouched and still pass CHECK.
    no_error(&s.harness(&["check", list, "g0", &pods[0]]), "check g0");
    no_error(&s.harness(&["check", list, "g2", &pods[2]]), "check g2");
    // GC again: nothing to do.
    no_error(&s.harness(&["gc", list, "g0", "g2"]), "second gc");
    assert_eq!(s.saved(), vec!["g0", "g2"]);
    for (i, p) in [(0, &pods[0]), (2, &pods[2])] {
        no_error(&s.harness(&["del", list, &format!("g{i}"), p]), "del");
    }
    assert_eq!(s.allocated(), Vec::<String>::new());
    s.print_capture("GC (by hand, libcni 1.1.2 has none)");
}
