//! The kernel data plane, end to end: three hosts on a LAN bridge, a real etcd, one daemon
//! per host; kernel state read back with `ip -j`, `bridge -j`, `iptables -S` and `nft list`;
//! traffic with `ping` between addresses of different hosts' subnets.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Cluster, Daemon, PREFIX, cluster};
use common::mesh::{Host, assert_full_mesh, host_info, json, ping, routes, start_all};
use common::wait_for;
use serde_json::Value;

const VXLAN: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const VXLAN_DR: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
const HOST_GW: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#;
/// How long each pair of hosts may take to reach each other after a change.
const MESH: Duration = Duration::from_secs(5);
const VXLAN_NFT: &str = r#"{"Network":"10.5.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;

fn route_to<'a>(routes: &'a [Value], dst: &str) -> Option<&'a Value> {
    routes.iter().find(|r| r["dst"] == dst)
}

fn vtep_mac(c: &Cluster, i: usize) -> String {
    let link = json(&c.hosts[i], "ip", &["-j", "-d", "link", "show", "flannel.1"]);
    link[0]["address"].as_str().unwrap().to_string()
}

/// Checks the vxlan state of host `i` for its peers exactly as flannel programs it.
fn assert_vxlan_state(c: &Cluster, i: usize, me: &Host, peers: &[(&Host, String)]) {
    let ns = &c.hosts[i];
    let link = json(ns, "ip", &["-j", "-d", "link", "show", "flannel.1"]);
    let info = &link[0]["linkinfo"];
    assert_eq!(info["info_kind"], "vxlan");
    assert_eq!(info["info_data"]["id"], 1);
    assert_eq!(info["info_data"]["local"], me.public_ip.as_str(), "local is the interface address");
    assert_eq!(info["info_data"]["port"], 8472);
    assert_eq!(info["info_data"]["learning"], false);
    assert_eq!(link[0]["mtu"], 1450);
    let addrs = json(ns, "ip", &["-j", "addr", "show", "flannel.1"]);
    let inet: Vec<String> = addrs[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert_eq!(inet, [format!("{}/32", me.base)]);
    let neigh = json(ns, "ip", &["-j", "neigh", "show", "dev", "flannel.1"]);
    let fdb = json(ns, "bridge", &["-j", "fdb", "show", "dev", "flannel.1"]);
    let rts = routes(c, i);
    assert_eq!(neigh.as_array().unwrap().len(), peers.len(), "{neigh}");
    for (p, mac) in peers {
        let n = neigh
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["dst"] == p.base.as_str())
            .unwrap_or_else(|| panic!("no neighbour for {}: {neigh}", p.base));
        assert_eq!(n["lladdr"], mac.as_str());
        assert_eq!(n["state"], serde_json::json!(["PERMANENT"]));
        let f = fdb
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["mac"] == mac.as_str())
            .unwrap_or_else(|| panic!("no fdb for {mac}: {fdb}"));
        assert_eq!(f["dst"], p.public_ip.as_str());
        assert_eq!(f["state"], "permanent");
        assert!(f["flags"].as_array().unwrap().contains(&Value::from("self")), "{f}");
        let r = route_to(&rts, &p.subnet).unwrap_or_else(|| panic!("no route to {}", p.subnet));
        assert_eq!(r["gateway"], p.base.as_str());
        assert_eq!(r["dev"], "flannel.1");
        assert!(r["flags"].as_array().unwrap().contains(&Value::from("onlink")), "{r}");
    }
}

/// Whether host `i` has `peers` neighbours, FDB entries and routes on flannel.1.
fn converged(c: &Cluster, i: usize, peers: usize) -> bool {
    let count = |v: Value| v.as_array().map_or(0, Vec::len);
    count(json(&c.hosts[i], "ip", &["-j", "neigh", "show", "dev", "flannel.1"])) == peers
        && count(json(&c.hosts[i], "bridge", &["-j", "fdb", "show", "dev", "flannel.1"])) == peers
        && count(json(&c.hosts[i], "ip", &["-j", "route", "show", "dev", "flannel.1"])) == peers
}

/// Wall-clock seconds since the epoch, as `ping -D` prints them.
fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

fn lease_key(h: &Host) -> String {
    format!("{PREFIX}/subnets/{}", h.subnet.replace('/', "-"))
}

#[test]
fn vxlan_programs_the_kernel_as_flannel_and_keeps_it_right() {
    let c = cluster("vxl", 3, VXLAN);
    let (mut daemons, hosts) = start_all(&c, &["--ip-masq", "--iptables-resync=1"]);
    let macs: Vec<String> = (0..3).map(|i| vtep_mac(&c, i)).collect();
    // The lease advertises the device's MAC, byte for byte as flannel writes it.
    let value = c.etcd.etcdctl(&["get", "--print-value-only", &lease_key(&hosts[0])]).unwrap();
    assert_eq!(
        value.trim(),
        format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            hosts[0].public_ip, macs[0]
        )
    );
    assert!(c.wait_env(0).contains("FLANNEL_MTU=1450\n"));
    assert_full_mesh(&c, &hosts, MESH);
    for i in 0..3 {
        let peers: Vec<(&Host, String)> = (0..3).filter(|j| *j != i).map(|j| (&hosts[j], macs[j].clone())).collect();
        wait_for(Duration::from_secs(5), "a converged kernel", || {
            (json(&c.hosts[i], "ip", &["-j", "neigh", "show", "dev", "flannel.1"]).as_array().unwrap().len() == 2)
                .then_some(())
        });
        assert_vxlan_state(&c, i, &hosts[i], &peers);
    }

    // Masquerade and forward rules: flannel's golden text.
    let nat = c.hosts[0].exec("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]).unwrap();
    let (net, pod) = ("10.5.0.0/16", hosts[0].subnet.as_str());
    let golden_nat = format!(
        "-N FLANNEL-POSTRTG\n\
         -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {pod} -d {net} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {net} -d {pod} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {net} -d {pod} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {net} ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
         -A FLANNEL-POSTRTG ! -s {net} -d {net} -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n"
    );
    assert_eq!(nat, golden_nat);
    let post = c.hosts[0].exec("iptables", &["-t", "nat", "-S", "POSTROUTING"]).unwrap();
    assert_eq!(
        post,
        "-P POSTROUTING ACCEPT\n-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n"
    );
    let fwd = c.hosts[0].exec("iptables", &["-S", "FLANNEL-FWD"]).unwrap();
    assert_eq!(
        fwd,
        format!(
            "-N FLANNEL-FWD\n-A FLANNEL-FWD -s {net} -m comment --comment \"flanneld forward\" -j ACCEPT\n-A FLANNEL-FWD -d {net} -m comment --comment \"flanneld forward\" -j ACCEPT\n"
        )
    );
    assert!(
        c.hosts[0]
            .exec("iptables", &["-S", "FORWARD"])
            .unwrap()
            .contains("-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD")
    );
    // A flushed chain and a deleted jump rule come back on the next resync.
    c.hosts[0].exec("iptables", &["-t", "nat", "-F", "FLANNEL-POSTRTG"]).unwrap();
    c.hosts[0]
        .exec("iptables", &["-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"])
        .unwrap();
    wait_for(Duration::from_secs(5), "restored masquerade rules", || {
        (c.hosts[0].exec("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]).unwrap() == golden_nat).then_some(())
    });
    wait_for(Duration::from_secs(5), "restored forward jump", || {
        c.hosts[0].exec("iptables", &["-S", "FORWARD"]).unwrap().contains("-j FLANNEL-FWD").then_some(())
    });

    // Entries deleted by hand are restored.
    let h1 = &c.hosts[0];
    h1.ip(&["route", "del", &hosts[1].subnet]).unwrap();
    h1.ip(&["neigh", "del", &hosts[2].base, "dev", "flannel.1"]).unwrap();
    h1.exec("bridge", &["fdb", "del", &macs[1], "dev", "flannel.1", "dst", &hosts[1].public_ip, "self"]).unwrap();
    wait_for(Duration::from_secs(2), "restored entries", || {
        let n = json(h1, "ip", &["-j", "neigh", "show", "dev", "flannel.1"]).as_array().unwrap().len();
        let f = json(h1, "bridge", &["-j", "fdb", "show", "dev", "flannel.1"]).as_array().unwrap().len();
        (route_to(&routes(&c, 0), &hosts[1].subnet).is_some() && n == 2 && f == 2).then_some(())
    });
    // The device deleted: re-created with the same MAC, everything re-programmed.
    h1.ip(&["link", "del", "flannel.1"]).unwrap();
    wait_for(Duration::from_secs(3), "a re-created device", || {
        (h1.ip(&["link", "show", "flannel.1"]).is_ok() && route_to(&routes(&c, 0), &hosts[2].subnet).is_some())
            .then_some(())
    });
    assert_eq!(vtep_mac(&c, 0), macs[0], "same MAC after re-creation");
    let peers: Vec<(&Host, String)> = vec![(&hosts[1], macs[1].clone()), (&hosts[2], macs[2].clone())];
    wait_for(Duration::from_secs(3), "re-programmed device", || converged(&c, 0, 2).then_some(()));
    assert_vxlan_state(&c, 0, &hosts[0], &peers);
    assert!(ping(&c, 0, &hosts[0].pod_ip, &hosts[2].pod_ip));

    // A peer whose lease goes away: its entries are gone from the others within a second.
    let removed_at = Instant::now();
    c.etcd.etcdctl(&["del", &lease_key(&hosts[2])]).unwrap();
    wait_for(Duration::from_secs(1), "the removed peer's entries to go", || {
        let gone_route = route_to(&routes(&c, 0), &hosts[2].subnet).is_none();
        let neigh = json(h1, "ip", &["-j", "neigh", "show", "dev", "flannel.1"]);
        let fdb = json(h1, "bridge", &["-j", "fdb", "show", "dev", "flannel.1"]);
        let gone_neigh = !neigh.as_array().unwrap().iter().any(|n| n["dst"] == hosts[2].base.as_str());
        let gone_fdb = !fdb.as_array().unwrap().iter().any(|f| f["mac"] == macs[2].as_str());
        (gone_route && gone_neigh && gone_fdb).then_some(())
    });
    assert!(removed_at.elapsed() < Duration::from_secs(1));
    assert!(daemons[2].wait_exit(Duration::from_secs(5)).success(), "the host whose lease was deleted stops cleanly");
    // It comes back (a new lease): reachable from the others within a second of its lease.
    std::fs::remove_file(c.env_file(2)).unwrap();
    daemons[2] = c.daemon(2, &[]);
    let back = host_info(&c, 2);
    // Its subnet file is written right after its lease: from then on, a second at most
    // until the others have programmed it.
    let seen_at = Instant::now();
    wait_for(Duration::from_secs(1), "the returning peer to be programmed", || {
        let neigh = json(h1, "ip", &["-j", "neigh", "show", "dev", "flannel.1"]);
        (route_to(&routes(&c, 0), &back.subnet).is_some()
            && neigh.as_array().unwrap().iter().any(|n| n["dst"] == back.base.as_str()))
        .then_some(())
    });
    assert!(seen_at.elapsed() < Duration::from_secs(1));
    wait_for(Duration::from_secs(5), "the returning peer to answer", || {
        ping(&c, 0, &hosts[0].pod_ip, &back.pod_ip).then_some(())
    });
}

#[test]
fn vxlan_direct_routing_routes_lan_peers_directly() {
    let c = cluster("vdr", 2, VXLAN_DR);
    let (_daemons, hosts) = start_all(&c, &[]);
    assert_full_mesh(&c, &hosts, MESH);
    let r =
        wait_for(Duration::from_secs(5), "the direct route", || route_to(&routes(&c, 0), &hosts[1].subnet).cloned());
    assert_eq!(r["gateway"], hosts[1].public_ip.as_str());
    assert_eq!(r["dev"], "eth0");
    assert!(
        json(&c.hosts[0], "ip", &["-j", "neigh", "show", "dev", "flannel.1"]).as_array().unwrap().is_empty(),
        "no vxlan entries for a LAN peer"
    );
}

#[test]
fn host_gw_routes_via_peer_public_ips() {
    let c = cluster("hgw", 3, HOST_GW);
    let (_daemons, hosts) = start_all(&c, &[]);
    assert!(c.wait_env(0).contains("FLANNEL_MTU=1500\n"));
    let value = c.etcd.etcdctl(&["get", "--print-value-only", &lease_key(&hosts[1])]).unwrap();
    assert_eq!(
        value.trim(),
        format!(r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#, hosts[1].public_ip)
    );
    assert_full_mesh(&c, &hosts, MESH);
    for i in 0..3 {
        let rts = routes(&c, i);
        for (j, p) in hosts.iter().enumerate().filter(|(j, _)| *j != i) {
            let r = route_to(&rts, &p.subnet).unwrap_or_else(|| panic!("host {i} has no route to host {j}"));
            assert_eq!((r["gateway"].as_str(), r["dev"].as_str()), (Some(p.public_ip.as_str()), Some("eth0")));
        }
    }
    c.hosts[0].ip(&["route", "del", &hosts[2].subnet]).unwrap();
    wait_for(Duration::from_secs(2), "the restored route", || route_to(&routes(&c, 0), &hosts[2].subnet).map(|_| ()));
    // Behind a NAT (public IP not on the interface) host-gw refuses to start, and says why.
    let endpoints = format!("--etcd-endpoints={}", c.etcd.url());
    let mut nat = Daemon::start(
        &c.hosts[0],
        &c.dir,
        &[&endpoints, "--iface=eth0", "--public-ip=203.0.113.9", "--subnet-file=/dev/null/x"],
    );
    assert_eq!(nat.wait_exit(Duration::from_secs(10)).code(), Some(1));
    assert!(nat.log().contains("NAT"), "{}", nat.log());
}

#[test]
fn a_daemon_restart_keeps_traffic_flowing_and_cleans_up_vanished_peers() {
    let c = cluster("rst", 3, VXLAN);
    let (mut daemons, hosts) = start_all(&c, &[]);
    assert_full_mesh(&c, &hosts, MESH);
    let mac = vtep_mac(&c, 1);
    let subnet = c.wait_env(1);
    // A ping stream from host 1 to host 2's pod address while host 2's daemon is killed
    // and started again. The test ends the stream itself, after the new daemon is ready, so
    // the stream provably spans the restart (a fixed count could run out before it).
    let mut pinger = c.hosts[0]
        .command("ping")
        .args(["-D", "-i", "0.05", "-w", "120", "-I", &hosts[0].pod_ip, &hosts[1].pod_ip])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stream_start = unix_now();
    std::thread::sleep(Duration::from_millis(800));
    let old_pid = daemons[1].child.id();
    assert!(pinger.try_wait().unwrap().is_none(), "the ping stream runs when the daemon is killed");
    let killed_at = unix_now();
    daemons[1].signal(libc::SIGKILL);
    daemons[1].wait_exit(Duration::from_secs(5));
    std::fs::remove_file(c.env_file(1)).unwrap();
    daemons[1] = c.daemon(1, &[]);
    assert_ne!(daemons[1].child.id(), old_pid, "a new daemon process");
    assert_eq!(c.wait_env(1), subnet, "same subnet after the restart");
    wait_for(Duration::from_secs(20), "the restarted daemon to be ready", || {
        (c.http(1, "/readyz").0 == "200").then_some(())
    });
    let ready_at = unix_now();
    assert!(pinger.try_wait().unwrap().is_none(), "the ping stream still runs after the restart");
    // A second of traffic through the restarted daemon's data plane, then the end of the stream.
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pinger.id() as i32, libc::SIGINT) }, 0);
    let out = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // `-D` lines: "[1764641234.123456] 64 bytes from 10.5.X.1: icmp_seq=N ttl=64 time=0.1 ms".
    let replies: Vec<(f64, u64)> = text
        .lines()
        .filter(|l| l.contains(" bytes from "))
        .map(|l| {
            let at = l[1..l.find(']').unwrap()].parse::<f64>().unwrap();
            let seq = l.split("icmp_seq=").nth(1).unwrap().split_whitespace().next().unwrap().parse::<u64>().unwrap();
            (at, seq)
        })
        .collect();
    let sent: u64 = text
        .lines()
        .find_map(|l| l.split_once(" packets transmitted").map(|(n, _)| n.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no ping summary:\n{text}"));
    assert!(replies.iter().any(|(at, _)| *at < killed_at), "replies before the kill:\n{text}");
    assert!(replies.iter().any(|(at, _)| *at > ready_at), "replies after the restarted daemon was ready:\n{text}");
    // At half the nominal rate at least: the stream really ran all along.
    let expected = ((ready_at - stream_start) / 0.05 / 2.0) as u64;
    assert!(sent >= expected, "{sent} packets sent over {:.1} s:\n{text}", ready_at - stream_start);
    // No ping lost across the restart: every packet answered, but the last one, which may
    // still be in flight when the stream is interrupted.
    let answered: std::collections::BTreeSet<u64> = replies.iter().map(|(_, seq)| *seq).collect();
    let lost: Vec<u64> = (1..sent).filter(|seq| !answered.contains(seq)).collect();
    assert!(lost.is_empty(), "pings lost across the restart: {lost:?}\n{text}");
    assert_eq!(vtep_mac(&c, 1), mac, "same VTEP MAC after the restart");

    // Host 1's daemon is down while host 3 leaves the cluster: at restart, host 3's entries
    // are removed and host 2's stay.
    daemons[0].signal(libc::SIGKILL);
    daemons[0].wait_exit(Duration::from_secs(5));
    c.etcd.etcdctl(&["del", &lease_key(&hosts[2])]).unwrap();
    assert!(route_to(&routes(&c, 0), &hosts[2].subnet).is_some(), "nobody cleaned up while the daemon was down");
    daemons[0] = c.daemon(0, &[]);
    wait_for(Duration::from_secs(5), "the vanished peer's entries to go", || {
        let neigh = json(&c.hosts[0], "ip", &["-j", "neigh", "show", "dev", "flannel.1"]);
        (route_to(&routes(&c, 0), &hosts[2].subnet).is_none() && neigh.as_array().unwrap().len() == 1).then_some(())
    });
    assert!(route_to(&routes(&c, 0), &hosts[1].subnet).is_some());
    assert!(ping(&c, 0, &hosts[0].pod_ip, &hosts[1].pod_ip));
}

#[test]
fn nftables_mode_installs_flannels_tables_and_keeps_them() {
    let c = cluster("nft", 2, VXLAN_NFT);
    let (mut daemons, hosts) = start_all(&c, &["--ip-masq", "--iptables-resync=1"]);
    assert_full_mesh(&c, &hosts, MESH);
    let (net, pod) = ("10.5.0.0/16", hosts[0].subnet.as_str());
    let golden = format!(
        "table ip flannel-ipv4 {{\n\tchain postrtg {{\n\t\tcomment \"chain to manage traffic masquerading by flannel\"\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tmeta mark 0x00004000 return\n\t\tip saddr {pod} ip daddr {net} return\n\t\tip saddr {net} ip daddr {pod} return\n\t\tip saddr != {pod} ip daddr {net} return\n\t\tip saddr {net} ip daddr != 224.0.0.0/4 masquerade fully-random\n\t\tip saddr != {net} ip daddr {net} masquerade fully-random\n\t}}\n}}\n"
    );
    let chain = || c.hosts[0].exec("nft", &["list", "chain", "ip", "flannel-ipv4", "postrtg"]).unwrap();
    assert_eq!(chain(), golden);
    let fwd = c.hosts[0].exec("nft", &["list", "chain", "ip", "flannel-ipv4", "forward"]).unwrap();
    assert!(fwd.contains(&format!("\t\tip saddr {net} accept\n\t\tip daddr {net} accept\n")), "{fwd}");
    assert!(
        c.hosts[0].exec("nft", &["list", "table", "ip6", "flannel-ipv6"]).is_ok(),
        "both tables exist, as in flannel"
    );
    // Absence is read from a full listing that must succeed: a failed command is not "no chain".
    let nat = c.hosts[0].exec("iptables", &["-t", "nat", "-S"]).unwrap();
    assert!(!nat.contains("FLANNEL-POSTRTG"), "no iptables chain in nftables mode: {nat}");
    c.hosts[0].exec("nft", &["flush", "chain", "ip", "flannel-ipv4", "postrtg"]).unwrap();
    wait_for(Duration::from_secs(5), "the flushed chain to be refilled", || (chain() == golden).then_some(()));
    // Back to iptables mode: the nftables tables are removed, the iptables rules appear.
    c.etcd.etcdctl(&["put", &format!("{PREFIX}/config"), VXLAN]).unwrap();
    daemons[0].signal(libc::SIGTERM);
    daemons[0].wait_exit(Duration::from_secs(5));
    daemons[0] = c.daemon(0, &["--ip-masq"]);
    wait_for(Duration::from_secs(10), "iptables rules", || {
        c.hosts[0].exec("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]).ok()
    });
    let tables = c.hosts[0].exec("nft", &["list", "tables"]).unwrap();
    assert!(!tables.contains("flannel-ipv4"), "nftables leftovers removed: {tables}");
}

/// Firewall rules are desired state on the reconciler's triggers: a lease event repairs a
/// flushed chain at once, long before the next `--iptables-resync` tick.
#[test]
fn a_reconcile_pass_also_repairs_the_firewall_rules() {
    let c = cluster("fwk", 1, VXLAN);
    let _d = c.daemon(0, &["--ip-masq", "--iptables-resync=600"]);
    c.wait_env(0);
    let chain = || c.hosts[0].exec("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]).unwrap();
    let full = wait_for(Duration::from_secs(10), "the masquerade rules", || {
        let rules = chain();
        rules.contains("-j MASQUERADE").then_some(rules)
    });
    c.hosts[0].exec("iptables", &["-t", "nat", "-F", "FLANNEL-POSTRTG"]).unwrap();
    assert!(!chain().contains("-j MASQUERADE"), "flushed");
    // A valid peer lease appears: the data plane makes a pass, and so does the firewall.
    let peer = r#"{"PublicIP":"192.0.2.77","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:77"}}"#;
    c.etcd.etcdctl(&["put", &format!("{PREFIX}/subnets/10.5.200.0-24"), peer]).unwrap();
    wait_for(Duration::from_secs(8), "the chain to be refilled by the pass", || (chain() == full).then_some(()));
}

#[test]
fn masquerade_options_and_the_blackhole_route() {
    let c = cluster("opt", 1, VXLAN);
    let _d = c.daemon(
        0,
        &["--ip-masq", "--ip-masq-fully-random-disable", "--ip-blackhole-route", "--iptables-forward-rules=false"],
    );
    let env = c.wait_env(0);
    assert!(env.contains("FLANNEL_IPMASQ=true\n"));
    let sub = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).unwrap().replace(".1/24", ".0/24");
    let nat = c.hosts[0].exec("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]).unwrap();
    assert!(nat.contains("-j MASQUERADE\n") && !nat.contains("--random-fully"), "{nat}");
    let filter = c.hosts[0].exec("iptables", &["-S"]).unwrap();
    assert!(!filter.contains("FLANNEL-FWD"), "no forward rules when disabled: {filter}");
    let blackholes = json(&c.hosts[0], "ip", &["-j", "route", "show", "type", "blackhole"]);
    assert_eq!(blackholes[0]["dst"], sub.as_str(), "{blackholes}");
    // Deleted by hand, it is back after the next resync (every --iptables-resync seconds).
    c.hosts[0].ip(&["route", "del", "blackhole", &sub]).unwrap();
    wait_for(Duration::from_secs(8), "the blackhole route to return", || {
        json(&c.hosts[0], "ip", &["-j", "route", "show", "type", "blackhole"])
            .as_array()
            .is_some_and(|a| !a.is_empty())
            .then_some(())
    });
}

#[test]
fn dual_stack_vxlan_programs_both_families() {
    let cfg = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56","Backend":{"Type":"vxlan"}}"#;
    let c = cluster("dst", 2, cfg);
    c.lan.ns.ip(&["addr", "add", "fd00:192::1/64", "dev", "br0", "nodad"]).unwrap();
    for (i, h) in c.hosts.iter().enumerate() {
        h.ip(&["addr", "add", &format!("fd00:192::1{}/64", i + 1), "dev", "eth0", "nodad"]).unwrap();
        h.ip(&["-6", "route", "add", "default", "via", "fd00:192::1"]).unwrap();
    }
    let _d: Vec<Daemon> = (0..2).map(|i| c.daemon(i, &["--ip-masq"])).collect();
    let envs: Vec<String> = (0..2).map(|i| c.wait_env(i)).collect();
    let v6_subnet = |env: &str| env.lines().find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET=")).unwrap().to_string();
    for env in &envs {
        assert!(env.contains("FLANNEL_IPV6_NETWORK=fd00:5::/56\n"), "{env}");
        assert!(v6_subnet(env).ends_with("::1/64"), "{env}");
    }
    // The lease key carries both subnets; the value both public addresses and MACs.
    let keys = c.etcd.etcdctl(&["get", "--prefix", "--keys-only", &format!("{PREFIX}/subnets/")]).unwrap();
    assert!(keys.lines().filter(|l| !l.is_empty()).all(|k| k.contains("&fd00:5:0:") && k.ends_with("-64")), "{keys}");
    let value = c.etcd.etcdctl(&["get", "--prefix", "--print-value-only", &format!("{PREFIX}/subnets/")]).unwrap();
    assert!(value.contains(r#""PublicIPv6":"fd00:192::11""#) && value.contains("BackendV6Data"), "{value}");
    // Both devices, and v6 entries on the v6 device.
    let link = json(&c.hosts[0], "ip", &["-j", "-d", "link", "show", "flannel-v6.1"]);
    assert_eq!(link[0]["linkinfo"]["info_data"]["local6"], "fd00:192::11");
    for (host, env) in c.hosts.iter().zip(&envs) {
        host.ip(&["link", "add", "cni0", "type", "bridge"]).unwrap();
        host.ip(&["link", "set", "cni0", "up"]).unwrap();
        host.ip(&["addr", "add", &v6_subnet(env), "dev", "cni0", "nodad"]).unwrap();
    }
    let peer = v6_subnet(&envs[1]).replace("::1/64", "::/64");
    wait_for(Duration::from_secs(5), "the v6 route", || {
        let r = json(&c.hosts[0], "ip", &["-j", "-6", "route", "show", "dev", "flannel-v6.1"]);
        r.as_array().unwrap().iter().any(|r| r["dst"] == peer.as_str()).then_some(())
    });
    let neigh = json(&c.hosts[0], "ip", &["-j", "-6", "neigh", "show", "dev", "flannel-v6.1"]);
    assert_eq!(neigh.as_array().unwrap().len(), 1, "{neigh}");
    let fdb = json(&c.hosts[0], "bridge", &["-j", "fdb", "show", "dev", "flannel-v6.1"]);
    assert_eq!(fdb[0]["dst"], "fd00:192::12", "{fdb}");
    let (src, dst) = (v6_subnet(&envs[0]).replace("/64", ""), v6_subnet(&envs[1]).replace("/64", ""));
    wait_for(Duration::from_secs(5), "ping over IPv6", || {
        c.hosts[0].exec("ping", &["-6", "-c", "1", "-W", "1", "-I", &src, &dst]).ok().map(|_| ())
    });
    // ip6tables got flannel's v6 rules.
    let nat6 = c.hosts[0].exec("ip6tables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]).unwrap();
    assert!(nat6.contains("! -d ff00::/8"), "{nat6}");
}

/// Neighbour and route churn on the host that is not weft's (ARP entries and routes on the
/// external interface, outside the Network) wakes no reconcile pass: each would otherwise
/// cost three dumps. Spread over two seconds, the old monitor ran a pass per burst.
#[test]
fn kernel_events_about_things_weft_does_not_own_cause_no_pass() {
    let c = cluster("dqu", 2, VXLAN);
    let (_daemons, hosts) = start_all(&c, &[]);
    assert_full_mesh(&c, &hosts, MESH);
    let h = &c.hosts[0];
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("churn");
    let mut lines = String::new();
    for i in 1..=20 {
        lines += &format!("neigh replace 203.0.113.{i} lladdr 02:00:00:00:00:{i:02x} dev eth0 nud permanent\n");
        lines += &format!("route add 198.51.100.{}/32 dev eth0\n", i);
        lines += &format!("neigh del 203.0.113.{i} dev eth0\n");
        lines += &format!("route del 198.51.100.{}/32 dev eth0\n", i);
    }
    std::fs::write(&batch, lines).unwrap();
    // Settle: the passes of the start are over once the count stands still for a second (a
    // fixed half second was a sub-second margin on a busy machine).
    let mut last = c.metric(0, "weft_reconciles_total ").unwrap();
    let before = wait_for(Duration::from_secs(15), "the passes of the start to end", || {
        std::thread::sleep(Duration::from_secs(1));
        let now = c.metric(0, "weft_reconciles_total ").unwrap();
        let settled = now == last;
        last = now;
        settled.then_some(now)
    });
    for _ in 0..10 {
        h.ip(&["-batch", batch.to_str().unwrap()]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = c.metric(0, "weft_reconciles_total ").unwrap();
    // The periodic resync (every 10 s) may fall into the window: one pass at most.
    assert!(after - before <= 1, "{} reconcile passes for churn weft does not own", after - before);
    // A deletion of an entry weft wants still wakes it at once.
    let peer_route = hosts[1].subnet.clone();
    // By destination: a route through a nexthop object does not match `dev` (the kernel's rule).
    h.ip(&["route", "del", &peer_route]).unwrap();
    wait_for(Duration::from_secs(3), "the deleted route to come back", || {
        json(h, "ip", &["-j", "route", "show", &peer_route]).as_array().is_some_and(|a| a.len() == 1).then_some(())
    });
    // The counter the bound above reads does count passes: the repair was one.
    let repaired = c.metric(0, "weft_reconciles_total ").unwrap();
    assert!(repaired > after, "the repair pass was not counted ({after} -> {repaired})");
}
