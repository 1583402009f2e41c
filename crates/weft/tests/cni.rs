//! The CNI plugin with the real `bridge` and `host-local` plugins, in namespaces the test
//! creates (the plugin runs inside a "host" namespace, so `cni0` appears there).

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use serde_json::{Value, json};
use weft::lab::netns::Netns;

const CNI_BIN: &str = "/usr/lib/cni";

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    host: Netns,
    pod: Netns,
    plugin: PathBuf,
}

fn setup(tag: &str) -> Setup {
    let prefix = common::prefix(tag);
    // Installed the way runtimes find it: a file called `flannel` in a CNI bin directory.
    let (tmp, dir) = common::cni_scratch();
    let plugin = dir.join("bin").join("flannel");
    Setup {
        _tmp: tmp,
        host: Netns::add(&format!("{prefix}host")).unwrap(),
        pod: Netns::add(&format!("{prefix}pod")).unwrap(),
        dir,
        plugin,
    }
}

impl Setup {
    fn netconf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "testnet",
            "type": "flannel",
            "subnetFile": self.dir.join("subnet.env"),
            "dataDir": self.dir.join("state"),
            "ipam": {"dataDir": self.dir.join("ipam")},
        })
    }

    fn run(&self, command: &str, id: &str, conf: &[u8], env: &[(&str, &str)]) -> Output {
        let netns = format!("/run/netns/{}", self.pod.name);
        let mut c = self.host.command(self.plugin.to_str().unwrap());
        c.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", &netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", format!("{}:{CNI_BIN}", self.plugin.parent().unwrap().display()));
        for (k, v) in env {
            if v.is_empty() {
                c.env_remove(k);
            } else {
                c.env(k, v);
            }
        }
        let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(conf).unwrap();
        child.wait_with_output().unwrap()
    }

    fn saved(&self, id: &str) -> PathBuf {
        self.dir.join("state").join(id)
    }
}

fn json_out(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

fn ip_json(ns: &Netns, args: &[&str]) -> Value {
    serde_json::from_str(&ns.exec("ip", args).unwrap()).unwrap()
}

#[test]
fn add_check_del_with_the_real_bridge_and_host_local_plugins() {
    let s = setup("cni");
    let conf = serde_json::to_vec(&s.netconf()).unwrap();
    let add = s.run("ADD", "c1", &conf, &[]);
    assert!(add.status.success(), "{}{}", String::from_utf8_lossy(&add.stdout), String::from_utf8_lossy(&add.stderr));
    let result = json_out(&add);
    let ip = result["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.1.17.") && ip.ends_with("/24"), "{result}");

    // The pod has the address, the MTU and the route to the cluster network via the bridge.
    let addrs = ip_json(&s.pod, &["-j", "addr", "show", "eth0"]);
    assert_eq!(addrs[0]["mtu"], 1450);
    let local = addrs[0]["addr_info"].as_array().unwrap().iter().find(|a| a["family"] == "inet").unwrap();
    assert_eq!(format!("{}/{}", local["local"].as_str().unwrap(), local["prefixlen"]), ip);
    let routes = ip_json(&s.pod, &["-j", "route"]);
    let r = routes.as_array().unwrap().iter().find(|r| r["dst"] == "10.1.0.0/16").unwrap_or_else(|| panic!("{routes}"));
    assert_eq!(r["gateway"], "10.1.17.1");
    let bridge = ip_json(&s.host, &["-j", "addr", "show", "cni0"]);
    assert!(
        bridge[0]["addr_info"].as_array().unwrap().iter().any(|a| a["local"] == "10.1.17.1"),
        "the bridge is the gateway: {bridge}"
    );

    // The saved delegate is exactly what flannel's plugin would render, mode 0600.
    let saved: Value = serde_json::from_slice(&std::fs::read(s.saved("c1")).unwrap()).unwrap();
    assert_eq!(
        saved,
        json!({
            "cniVersion": "1.0.0",
            "ipMasq": false,
            "ipam": {"dataDir": s.dir.join("ipam"), "ranges": [[{"subnet": "10.1.17.0/24"}]], "routes": [{"dst": "10.1.0.0/16"}], "type": "host-local"},
            "isGateway": true,
            "mtu": 1450,
            "name": "testnet",
            "type": "bridge",
        })
    );
    assert_eq!(std::fs::metadata(s.saved("c1")).unwrap().permissions().mode() & 0o777, 0o600);

    // CHECK with the ADD result as prevResult.
    let mut check_conf = s.netconf();
    check_conf["prevResult"] = result.clone();
    let check = s.run("CHECK", "c1", &serde_json::to_vec(&check_conf).unwrap(), &[]);
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // CHECK fails when the address is gone from the pod.
    s.pod.ip(&["addr", "del", &ip, "dev", "eth0"]).unwrap();
    let broken = s.run("CHECK", "c1", &serde_json::to_vec(&check_conf).unwrap(), &[]);
    assert!(!broken.status.success());
    assert!(
        json_out(&broken)["msg"].as_str().unwrap().contains("is missing on eth0"),
        "{}",
        String::from_utf8_lossy(&broken.stdout)
    );

    // DEL, DEL again, DEL of something never added: all succeed.
    for id in ["c1", "c1", "never-added"] {
        let del = s.run("DEL", id, &conf, &[]);
        assert!(del.status.success(), "DEL {id}: {}", String::from_utf8_lossy(&del.stdout));
    }
    assert!(!s.saved("c1").exists());
    assert!(!common::links(&s.pod).contains(&"eth0".to_string()), "the pod's interface is gone");
    // DEL needs no subnet file (the daemon may be gone already).
    std::fs::remove_file(s.dir.join("subnet.env")).unwrap();
    assert!(s.run("DEL", "c1", &conf, &[]).status.success());
}

#[test]
fn bad_input_gets_cni_error_json_and_leaves_no_state() {
    let s = setup("cnb");
    let conf = serde_json::to_vec(&s.netconf()).unwrap();
    let code = |o: &Output| {
        assert!(!o.status.success());
        json_out(o)["code"].as_u64().unwrap()
    };
    assert_eq!(code(&s.run("ADD", "c1", b"{nope", &[])), 6);
    assert_eq!(code(&s.run("FROB", "c1", &conf, &[])), 4);
    let no_netns = s.run("ADD", "c2", &conf, &[("CNI_NETNS", "")]);
    assert_eq!(code(&no_netns), 4);
    assert!(json_out(&no_netns)["msg"].as_str().unwrap().contains("CNI_NETNS"));
    assert!(!s.saved("c2").exists(), "nothing saved when the request is invalid");
    let old = json!({"cniVersion": "0.3.1", "name": "testnet", "type": "flannel", "subnetFile": s.dir.join("subnet.env"), "dataDir": s.dir.join("state")});
    assert_eq!(
        code(&s.run("CHECK", "c1", &serde_json::to_vec(&old).unwrap(), &[])),
        1,
        "CHECK does not exist before 0.4.0"
    );

    // A missing delegate: a clear error; the saved config lets DEL clean up afterwards.
    let missing = s.run("ADD", "c3", &conf, &[("CNI_PATH", "/nonexistent")]);
    assert_eq!(code(&missing), 7);
    assert!(json_out(&missing)["msg"].as_str().unwrap().contains("failed to find plugin \"bridge\""));
    assert!(s.run("DEL", "c3", &conf, &[]).status.success());
    assert!(!s.saved("c3").exists());

    // No subnet file: the daemon is not running here, and the message says so.
    std::fs::remove_file(s.dir.join("subnet.env")).unwrap();
    let no_env = s.run("ADD", "c4", &conf, &[]);
    assert_eq!(code(&no_env), 11);
    assert!(
        json_out(&no_env)["msg"].as_str().unwrap().contains("Check the flannel pod log"),
        "{}",
        String::from_utf8_lossy(&no_env.stdout)
    );
    assert_eq!(code(&s.run("STATUS", "", &conf, &[])), 50);

    // A container ID that is a path: refused for every command, nothing written anywhere.
    let escape = s.dir.join("escaped");
    let hostile = format!("/../../../..{}", escape.display());
    let mut check_conf = s.netconf();
    check_conf["prevResult"] = json!({"cniVersion": "1.0.0", "ips": []});
    let check_conf = serde_json::to_vec(&check_conf).unwrap();
    for (cmd, c) in [("ADD", &conf), ("DEL", &conf), ("CHECK", &check_conf)] {
        std::fs::write(
            s.dir.join("subnet.env"),
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        for id in [hostile.as_str(), "../x", ".hidden", "-x", "a b"] {
            let out = s.run(cmd, id, c, &[]);
            assert_eq!(code(&out), 4, "{cmd} {id:?}: {}", String::from_utf8_lossy(&out.stdout));
            assert!(json_out(&out)["msg"].as_str().unwrap().contains("invalid characters in CNI_CONTAINERID"));
        }
        assert!(!escape.exists(), "{cmd}: nothing written outside dataDir");
    }
    assert!(!s.saved("x").exists() && !s.dir.join("x").exists());
    std::fs::remove_file(s.dir.join("subnet.env")).unwrap();

    let version = s.run("VERSION", "", b"{\"cniVersion\":\"0.4.0\"}", &[]);
    assert!(version.status.success());
    assert_eq!(
        json_out(&version)["supportedVersions"],
        json!(["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    assert!(Path::new(CNI_BIN).join("bridge").exists());
}
