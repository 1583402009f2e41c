//! `weft doctor` on a host namespace of a real cluster (etcd, two vxlan daemons, a pods'
//! bridge with a pod veth): healthy → every check ok, exit 0; then each condition is broken
//! in the host and doctor must name it (its check's status, and exit 1 or 2), and is
//! repaired before the next. doctor runs inside the host with the daemon's own flags.

mod common;

use std::time::Duration;

use common::cluster::{Daemon, cluster};
use common::{wait_for, weft_bin};
use weft::lab::netns::Netns;

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// Runs doctor in `h` with `flags`: (exit code, status per check name, the JSON).
fn doctor(h: &Netns, flags: &[String]) -> (i32, Vec<(String, String)>, String) {
    let o = h.command(weft_bin()).arg("doctor").arg("--json").args(flags).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {text}\n{}", String::from_utf8_lossy(&o.stderr)));
    let checks = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c["status"].as_str().unwrap().to_string()))
        .collect();
    (o.status.code().unwrap_or(-1), checks, text)
}

fn status<'a>(checks: &'a [(String, String)], name: &str) -> &'a str {
    &checks.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no check {name}")).1
}

/// Breaks something, checks that doctor names it, repairs it.
fn expect(h: &Netns, flags: &[String], check: &str, want: &str, says: &str) {
    let (code, checks, text) = doctor(h, flags);
    assert_eq!(status(&checks, check), want, "{check} should be {want}:\n{text}");
    assert!(text.contains(says), "{check} should say {says:?}:\n{text}");
    assert_eq!(code, if want == "problem" { 2 } else { 1 }, "{text}");
}

fn sh(h: &Netns, script: &str) {
    h.exec("sh", &["-ec", script]).unwrap_or_else(|e| panic!("{script}: {e}"));
}

#[test]
fn doctor_names_each_broken_condition_and_passes_a_healthy_host() {
    let mut c = cluster("doc", 2, CONFIG);
    for h in &c.hosts {
        sh(h, "echo 1 > /proc/sys/net/ipv4/ip_forward; echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter");
    }
    let flags: Vec<String> = vec![
        format!("--etcd-endpoints={}", c.etcd.url()),
        format!("--subnet-file={}", c.env_file(0).display()),
        "--healthz-port=8081".into(),
        "--ip-masq".into(),
    ];
    let d1: Daemon = c.daemon(0, &["--ip-masq"]);
    let _d2: Daemon = c.daemon(1, &["--ip-masq"]);
    let env1 = c.wait_env(0);
    let env2 = c.wait_env(1);
    let h1 = &c.hosts[0];
    let subnet = |env: &str| {
        let s = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).unwrap().to_string();
        let (ip, len) = s.split_once('/').unwrap();
        (format!("{}.0/{len}", ip.rsplit_once('.').unwrap().0), s)
    };
    let (peer_net, _) = subnet(&env2);
    let (_, own_addr) = subnet(&env1);
    wait_for(Duration::from_secs(20), "the route to h2", || {
        h1.ip(&["route", "show", &peer_net]).is_ok_and(|r| r.contains("flannel.1")).then_some(())
    });
    // The pods' bridge with the first address of our subnet, and one pod's veth on it.
    common::cni_bridge(h1, &own_addr);
    sh(
        h1,
        "ip link set cni0 mtu 1450; ip link add vpod0 mtu 1450 type veth peer name vpod1 mtu 1450; ip link set vpod0 master cni0 up",
    );

    let (code, checks, text) = doctor(h1, &flags);
    assert!(checks.iter().all(|(_, s)| s == "ok"), "a healthy host is all ok:\n{text}");
    assert_eq!(code, 0, "{text}");
    let plain = h1.command(weft_bin()).arg("doctor").args(&flags).output().unwrap();
    assert!(plain.status.success() && String::from_utf8_lossy(&plain.stdout).contains("ok      mtu"), "{plain:?}");

    // Forwarding.
    sh(h1, "echo 0 > /proc/sys/net/ipv4/ip_forward");
    expect(h1, &flags, "forwarding", "problem", "ip_forward=1");
    sh(h1, "echo 1 > /proc/sys/net/ipv4/ip_forward");

    // rp_filter strict on the overlay device (the effective value is the max of all and the device).
    sh(h1, "echo 1 > /proc/sys/net/ipv4/conf/flannel.1/rp_filter");
    expect(h1, &flags, "rp_filter", "warning", "net.ipv4.conf.flannel.1.rp_filter=2");
    sh(h1, "echo 0 > /proc/sys/net/ipv4/conf/flannel.1/rp_filter");

    // bridge-nf-call-iptables (per namespace); where br_netfilter is not loaded at all the
    // same check warns that it is missing.
    if std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        sh(h1, "echo 0 > /proc/sys/net/bridge/bridge-nf-call-iptables");
        expect(h1, &flags, "br_netfilter", "warning", "bridge-nf-call-iptables=1");
        sh(h1, "echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables");
    }

    // A pod veth with a larger MTU than the overlay.
    sh(h1, "ip link set vpod0 mtu 1500");
    expect(h1, &flags, "mtu", "problem", "vpod0 has MTU 1500 > 1450");
    sh(h1, "ip link set vpod0 mtu 1450");

    // flannel's chains in iptables-legacy beside the iptables-nft ones the daemon installed.
    sh(h1, "iptables-legacy -w -t nat -N FLANNEL-POSTRTG");
    expect(h1, &flags, "iptables_backends", "problem", "iptables-legacy (FLANNEL-POSTRTG)");
    sh(h1, "iptables-legacy -w -t nat -X FLANNEL-POSTRTG");

    // A policy table while the daemon does not enforce NetworkPolicy (its metrics say
    // weft_netpol_enabled 0): a leftover that still filters pod traffic.
    sh(h1, "nft add table inet weft-netpol");
    expect(h1, &flags, "network_policy", "warning", "a leftover");
    sh(h1, "nft delete table inet weft-netpol");

    // A /24 that is neither host's lease (the leases are random: a fixed one would sometimes
    // be h1's own, and h1's own subnet cannot stand in for another or carry a stale route).
    let spare = (2..=254u8)
        .rev()
        .map(|x| format!("10.244.{x}"))
        .find(|p| peer_net != format!("{p}.0/24") && own_addr != format!("{p}.1/24"))
        .unwrap();

    // subnet.env naming another subnet than our lease.
    let env_path = c.env_file(0);
    std::fs::write(&env_path, env1.replace(&own_addr, &format!("{spare}.1/24"))).unwrap();
    expect(h1, &flags, "subnet_env", "problem", &format!("FLANNEL_SUBNET is {spare}.0/24 but our lease is"));
    std::fs::write(&env_path, &env1).unwrap();

    // The data plane: with the daemon frozen (so it repairs nothing), a missing route, a
    // neighbour with another MAC, a stale route of weft's.
    d1.signal(libc::SIGSTOP);
    let peer_vtep = peer_net.split('/').next().unwrap().to_string();
    sh(h1, &format!("ip route del {peer_net}"));
    expect(h1, &flags, "dataplane", "problem", &format!("missing: route {peer_net}"));
    sh(h1, &format!("ip neigh replace {peer_vtep} lladdr 02:00:00:00:00:01 dev flannel.1 nud permanent"));
    expect(h1, &flags, "dataplane", "problem", "has 02:00:00:00:00:01 instead of");
    sh(h1, &format!("ip route add {spare}.0/24 via {spare}.0 dev flannel.1 onlink proto 87"));
    expect(h1, &flags, "dataplane", "problem", &format!("stale: route {spare}.0/24"));
    // The frozen daemon itself does not answer its health port.
    expect(h1, &flags, "daemon", "problem", "does not answer on its health port");
    d1.signal(libc::SIGCONT);
    wait_for(Duration::from_secs(30), "the daemon's repair", || {
        let (code, _, _) = doctor(h1, &flags);
        (code == 0).then_some(())
    });

    // The store down.
    c.etcd.kill();
    expect(h1, &flags, "store", "problem", "the store does not answer");

    // The daemon gone.
    drop(d1);
    expect(h1, &flags, "daemon", "problem", "does not answer on its health port");

    // Bad flags: exit 2 with usage naming doctor's flags.
    let o = h1.command(weft_bin()).args(["doctor", "--bogus"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--json"), "{o:?}");
}
