//! Issue 9's reproduced failures, in namespaces with a real etcd: hostile leases, routes that
//! are not ours, and devices broken behind the daemon's back. Kernel state is read back with
//! `ip -j`; traffic is checked with `ping`.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Cluster, PREFIX, cluster};
use common::mesh::{Host, assert_full_mesh, host_info, ping, routes, start_all};
use common::wait_for;
use serde_json::Value;

const HOST_GW: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#;
const VXLAN: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const UDP: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#;

fn route_to(c: &Cluster, i: usize, dst: &str) -> Option<Value> {
    routes(c, i).into_iter().find(|r| r["dst"] == dst)
}

/// The kernel's connected route of the LAN, exactly as the kernel made it.
fn assert_lan_route_untouched(c: &Cluster, i: usize) {
    let r = route_to(c, i, "192.0.2.0/24").unwrap_or_else(|| panic!("host {i} lost its LAN route: {:?}", routes(c, i)));
    assert_eq!(r["protocol"], "kernel", "host {i}: {r}");
    assert_eq!(r["dev"], "eth0", "host {i}: {r}");
    assert!(r.get("gateway").is_none(), "host {i}: the LAN route got a gateway: {r}");
}

fn put(c: &Cluster, key: &str, value: &str) {
    c.etcd.etcdctl(&["put", &format!("{PREFIX}/subnets/{key}"), value]).unwrap();
}

fn del(c: &Cluster, key: &str) {
    c.etcd.etcdctl(&["del", &format!("{PREFIX}/subnets/{key}")]).unwrap();
}

#[test]
fn a_hostile_lease_never_touches_routes_weft_does_not_own() {
    let c = cluster("hlv", 3, HOST_GW);
    let (_daemons, hosts) = start_all(&c, &[]);
    assert_full_mesh(&c, &hosts, Duration::from_secs(10));
    let h1 = &c.hosts[0];
    // Subnets no host holds, for the hand-written routes and leases.
    let free: Vec<u8> = (240..=254).filter(|n| !hosts.iter().any(|h| h.subnet == format!("10.5.{n}.0/24"))).collect();
    let (admin_in, conflict, host_bits) = (free[0], free[1], free[2]);
    let admin_in = format!("10.5.{admin_in}.0/24");
    // An administrator's routes, inside and outside the Network.
    let gw = c.lan.gateway();
    h1.ip(&["route", "add", &admin_in, "via", &gw, "dev", "eth0"]).unwrap();
    h1.ip(&["route", "add", "198.51.100.0/24", "via", &gw, "dev", "eth0"]).unwrap();
    let admin = |dst: &str| {
        let r = route_to(&c, 0, dst).unwrap_or_else(|| panic!("the administrator's route {dst} is gone"));
        // `ip` prints no protocol for `boot`, the default of `ip route add`.
        assert_eq!((r["gateway"].as_str(), r.get("protocol")), (Some(gw.as_str()), None), "{r}");
    };

    // Issue 9: the LAN as a lease. Before the fix every daemon replaced the connected route
    // with `192.0.2.0/24 via 192.0.2.99` and the cluster fell apart.
    put(&c, "192.0.2.0-24", r#"{"PublicIP":"192.0.2.99","PublicIPv6":null,"BackendType":"host-gw"}"#);
    // A lease inside the Network claiming host 2's address (a newer claim loses), and one with
    // host bits in its key.
    put(
        &c,
        &format!("10.5.{conflict}.0-24"),
        &format!(r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#, c.lan.host_ip(2)),
    );
    put(
        &c,
        &format!("10.5.{host_bits}.7-24"),
        r#"{"PublicIP":"192.0.2.77","PublicIPv6":null,"BackendType":"host-gw"}"#,
    );
    // Several reconcile passes (every netlink change and every 10 s) later, nothing moved.
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..3 {
        assert_lan_route_untouched(&c, i);
    }
    for i in 0..3 {
        wait_for(Duration::from_secs(5), "the rejection to be counted", || {
            (c.metric(i, "weft_leases_rejected_total{reason=\"outside_network\"} ") == Some(1)).then_some(())
        });
    }
    for i in 0..3 {
        assert_lan_route_untouched(&c, i);
        let rts = routes(&c, i);
        assert!(!rts.iter().any(|r| r["gateway"] == "192.0.2.99"), "host {i}: {rts:?}");
        assert!(route_to(&c, i, &format!("10.5.{conflict}.0/24")).is_none(), "host {i} routes the conflicting lease");
        assert!(route_to(&c, i, &format!("10.5.{host_bits}.0/24")).is_none(), "host {i} routes the key with host bits");
    }
    assert!(c.metric(0, "weft_leases_rejected_total{reason=\"conflict\"} ") == Some(1));
    // Our routes are recognisable as ours.
    let peer = route_to(&c, 0, &hosts[1].subnet).unwrap();
    assert_eq!(peer["protocol"], "87", "{peer}");
    assert!(c.metric(1, "weft_leases_rejected_total{reason=\"bad_public_ip\"} ") == Some(1), "host 2's own address");
    admin(&admin_in);
    admin("198.51.100.0/24");
    assert_full_mesh(&c, &hosts, Duration::from_secs(2));
    // `weft leases` shows the rejected leases and why.
    let endpoints = format!("--etcd-endpoints={}", c.etcd.url());
    let table = h1.exec(common::weft_bin(), &["leases", &endpoints]).unwrap();
    let lan_row = table.lines().find(|l| l.starts_with("192.0.2.0/24")).unwrap_or_else(|| panic!("{table}"));
    assert!(lan_row.contains("rejected (outside_network)"), "{table}");
    let conflict_row = table.lines().find(|l| l.starts_with(&format!("10.5.{conflict}.0/24"))).unwrap();
    assert!(conflict_row.contains("rejected (conflict)") && conflict_row.contains(&c.lan.host_ip(2)), "{table}");

    // Deleting the keys changes nothing either, as a pass after the deletion shows (a sleep
    // alone could end before any pass).
    let passes: Vec<i64> = (0..3).map(|i| c.metric(i, "weft_reconciles_total ").unwrap()).collect();
    del(&c, "192.0.2.0-24");
    del(&c, &format!("10.5.{conflict}.0-24"));
    for (i, before) in passes.iter().enumerate() {
        wait_for(Duration::from_secs(12), "a reconcile pass after the deletions", || {
            (c.metric(i, "weft_reconciles_total ").unwrap() > *before).then_some(())
        });
    }
    for i in 0..3 {
        assert_lan_route_untouched(&c, i);
    }
    admin(&admin_in);
    admin("198.51.100.0/24");
    assert_full_mesh(&c, &hosts, Duration::from_secs(2));

    // A route someone else put where a peer's route belongs is left alone; once it is gone,
    // ours takes its place.
    let passes = c.metric(0, "weft_reconciles_total ").unwrap();
    h1.ip(&["route", "replace", &hosts[2].subnet, "via", &gw, "dev", "eth0", "proto", "static"]).unwrap();
    // "Left alone" means something only once a pass has seen the foreign route (the netlink
    // event wakes one; the resync runs every 10 s); a sleep alone could end before any pass.
    wait_for(Duration::from_secs(12), "a reconcile pass after the foreign route appeared", || {
        (c.metric(0, "weft_reconciles_total ").unwrap() > passes).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let r = route_to(&c, 0, &hosts[2].subnet).unwrap();
    assert_eq!((r["gateway"].as_str(), r["protocol"].as_str()), (Some(gw.as_str()), Some("static")), "{r}");
    h1.ip(&["route", "del", &hosts[2].subnet, "proto", "static"]).unwrap();
    wait_for(Duration::from_secs(12), "our route to return", || {
        route_to(&c, 0, &hosts[2].subnet).filter(|r| r["protocol"] == "87").map(|_| ())
    });

    // A stale route of ours outside the Network (what the old bug left behind) is removed
    // by the resync; the administrator's routes stay.
    h1.ip(&["route", "add", "203.0.113.0/24", "via", &c.lan.host_ip(3), "dev", "eth0", "proto", "87"]).unwrap();
    wait_for(Duration::from_secs(12), "the stale route of ours to go", || {
        route_to(&c, 0, "203.0.113.0/24").is_none().then_some(())
    });
    admin(&admin_in);
    admin("198.51.100.0/24");
    assert_lan_route_untouched(&c, 0);

    // What the LAN lease did to a host's own subnet before the fix: its bridge route
    // replaced by a route via the LAN. The resync puts the bridge route back.
    h1.ip(&["route", "replace", &hosts[0].subnet, "via", &c.lan.host_ip(2), "dev", "eth0"]).unwrap();
    wait_for(Duration::from_secs(12), "our own subnet's route back on cni0", || {
        route_to(&c, 0, &hosts[0].subnet)
            .filter(|r| r["dev"] == "cni0" && r["protocol"] == "kernel" && r.get("gateway").is_none())
            .map(|_| ())
    });
    assert_full_mesh(&c, &hosts, Duration::from_secs(2));
}

/// Checks that an `ip` error says the device does not exist: any other failure (a namespace
/// gone, a bad argument) is the test's failure, not an absent device.
fn assert_no_such_device(e: &std::io::Error, dev: &str) {
    let text = e.to_string();
    assert!(text.contains(&format!("\"{dev}\" does not exist")), "`ip` failed, not for a missing {dev}: {text}");
}

/// The device as `ip -j -d link` shows it (null while it does not exist).
fn link(c: &Cluster, i: usize, dev: &str) -> Value {
    match c.hosts[i].exec("ip", &["-j", "-d", "link", "show", dev]) {
        Ok(out) => serde_json::from_str::<Value>(&out).unwrap()[0].clone(),
        Err(e) => {
            assert_no_such_device(&e, dev);
            Value::Null
        }
    }
}

fn is_up(l: &Value) -> bool {
    l["flags"].as_array().is_some_and(|f| f.contains(&Value::from("UP")))
}

fn inet(c: &Cluster, i: usize, dev: &str) -> Vec<String> {
    let out = match c.hosts[i].exec("ip", &["-j", "addr", "show", dev]) {
        Ok(out) => out,
        Err(e) => {
            assert_no_such_device(&e, dev);
            return Vec::new();
        }
    };
    let addrs: Value = serde_json::from_str(&out).unwrap();
    addrs[0]["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|a| a["family"] == "inet")
                .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
                .collect()
        })
        .unwrap_or_default()
}

/// Breaks flannel.1 in each way of issue 9 and checks it comes back, as `ip -j` shows it,
/// and that traffic flows again.
#[test]
fn a_broken_vxlan_device_is_repaired() {
    let c = cluster("hdv", 2, VXLAN);
    let (daemons, hosts) = start_all(&c, &[]);
    assert_full_mesh(&c, &hosts, Duration::from_secs(10));
    let h1 = &c.hosts[0];
    let good = link(&c, 0, "flannel.1");
    let mac = good["address"].as_str().unwrap().to_string();
    let base = format!("{}/32", hosts[0].subnet.trim_end_matches("/24"));
    assert_eq!(inet(&c, 0, "flannel.1"), vec![base.clone()]);
    let restored = |what: &str| {
        let started = Instant::now();
        wait_for(Duration::from_secs(3), &format!("flannel.1 repaired after {what}"), || {
            let l = link(&c, 0, "flannel.1");
            (is_up(&l)
                && l["mtu"] == 1450
                && l["address"] == mac.as_str()
                && l["linkinfo"]["info_data"]["local"] == c.lan.host_ip(1).as_str()
                && inet(&c, 0, "flannel.1") == [base.clone()])
            .then_some(())
        });
        eprintln!("{what}: repaired in {:?}", started.elapsed());
        wait_for(Duration::from_secs(5), &format!("traffic after {what}"), || {
            ping(&c, 0, &hosts[0].pod_ip, &hosts[1].pod_ip).then_some(())
        });
    };
    // Issue 9: set down, it stayed down forever. The daemon may put it up again before
    // `ip` can show it down (it wakes on the netlink event), so the proof that it acted is
    // its count of kernel changes, not a look at the device in between.
    let changes = c.metric(0, "weft_kernel_changes_total ").unwrap();
    h1.ip(&["link", "set", "flannel.1", "down"]).unwrap();
    restored("set down");
    let after = c.metric(0, "weft_kernel_changes_total ").unwrap();
    assert!(after > changes, "the daemon changed nothing after flannel.1 was set down ({changes} -> {after})");
    h1.ip(&["link", "set", "flannel.1", "mtu", "1300"]).unwrap();
    restored("an MTU change");
    h1.ip(&["addr", "flush", "dev", "flannel.1"]).unwrap();
    restored("its address flushed");
    h1.ip(&["addr", "add", "10.5.99.99/32", "dev", "flannel.1"]).unwrap();
    restored("a stray address in the network");
    h1.ip(&["link", "set", "flannel.1", "address", "0e:00:00:00:00:99"]).unwrap();
    restored("a MAC change");
    h1.ip(&["link", "set", "flannel.1", "type", "vxlan", "local", "192.0.2.99"]).unwrap();
    assert_eq!(link(&c, 0, "flannel.1")["linkinfo"]["info_data"]["local"], "192.0.2.99");
    restored("a `local` change");
    h1.ip(&["link", "del", "flannel.1"]).unwrap();
    restored("deletion");
    // Peers' entries still name our MAC: the peer reaches us without re-learning anything.
    assert!(ping(&c, 1, &hosts[1].pod_ip, &hosts[0].pod_ip), "{}", daemons[0].log());
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Issue 9: `ip link del flannel0` left the udp daemon spinning at ~96 % CPU with no
/// traffic, forever. Now the device is re-created, the engine re-attached, and the daemon
/// stays idle while it waits.
#[test]
fn udp_survives_flannel0_deleted_or_down_without_spinning() {
    let c = cluster("hud", 2, UDP);
    let (daemons, hosts) = start_all(&c, &[]);
    assert_full_mesh(&c, &hosts, Duration::from_secs(10));
    let h1 = &c.hosts[0];
    let pid = daemons[0].child.id();
    let ticks_per_s = 100; // USER_HZ
    for round in 0..2 {
        let before = cpu_ticks(pid);
        let started = Instant::now();
        h1.ip(&["link", "del", "flannel0"]).unwrap();
        wait_for(Duration::from_secs(3), "flannel0 to be re-created", || {
            h1.ip(&["link", "show", "flannel0"]).ok().filter(|_| is_up(&link(&c, 0, "flannel0"))).map(|_| ())
        });
        eprintln!("round {round}: flannel0 back in {:?}", started.elapsed());
        let l = link(&c, 0, "flannel0");
        assert_eq!((l["mtu"].as_u64(), l["linkinfo"]["info_kind"].as_str()), (Some(1472), Some("tun")), "{l}");
        assert_eq!(inet(&c, 0, "flannel0"), [format!("{}/32", hosts[0].subnet.trim_end_matches("/24"))]);
        wait_for(Duration::from_secs(5), "traffic over the re-created flannel0", || {
            (ping(&c, 0, &hosts[0].pod_ip, &hosts[1].pod_ip) && ping(&c, 1, &hosts[1].pod_ip, &hosts[0].pod_ip))
                .then_some(())
        });
        // Over the next seconds the daemon is idle: no thread retries in a busy loop.
        std::thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
        let used = cpu_ticks(pid) - before;
        let wall = started.elapsed().as_secs_f64();
        eprintln!("round {round}: {used} ticks of CPU in {wall:.1} s");
        assert!(
            (used as f64) < 0.25 * wall * ticks_per_s as f64,
            "the daemon used {used} ticks of CPU in {wall:.1} s after flannel0 was deleted"
        );
    }
    h1.ip(&["link", "set", "flannel0", "down"]).unwrap();
    wait_for(Duration::from_secs(3), "flannel0 up again", || is_up(&link(&c, 0, "flannel0")).then_some(()));
    wait_for(Duration::from_secs(5), "traffic after flannel0 was set down", || {
        ping(&c, 0, &hosts[0].pod_ip, &hosts[1].pod_ip).then_some(())
    });
}

/// Deletes host 1's external interface and plugs a new one (a new index) into the LAN with
/// the same address; the daemon must find it again and re-program everything on it.
fn replug_external(c: &Cluster) {
    let h1 = &c.hosts[0];
    let index = |c: &Cluster| link(c, 0, "eth0")["ifindex"].as_u64();
    let old = index(c).unwrap();
    h1.ip(&["link", "del", "eth0"]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    weft::lab::netns::plug(&c.lan.ns, h1, "h1", &c.lan.host_ip(1), Some(&c.lan.gateway())).unwrap();
    // The new interface has a new MAC. A replaced NIC announces itself; here its first ARP
    // exchange with each peer does (a gratuitous ARP sent as the link comes up races the
    // bridge port coming up). Otherwise the peers keep sending to the old MAC while their
    // neighbour entry stays REACHABLE (15 to 45 s), whatever weft does.
    for n in 2..=c.hosts.len() as u8 {
        wait_for(Duration::from_secs(5), "the new eth0 to reach a peer on the LAN", || {
            h1.exec("ping", &["-c", "1", "-W", "1", &c.lan.host_ip(n)]).ok().map(|_| ())
        });
    }
    let new = index(c).expect("the re-plugged eth0 exists");
    assert_ne!(new, old, "a new interface");
}

#[test]
fn vxlan_follows_a_recreated_external_interface() {
    let c = cluster("how", 2, VXLAN);
    let (_daemons, hosts) = start_all(&c, &[]);
    assert_full_mesh(&c, &hosts, Duration::from_secs(10));
    let mac = link(&c, 0, "flannel.1")["address"].clone();
    replug_external(&c);
    wait_for(Duration::from_secs(12), "flannel.1 on the new eth0", || {
        let l = link(&c, 0, "flannel.1");
        (l["linkinfo"]["info_data"]["link"] == "eth0" && is_up(&l)).then_some(())
    });
    assert_eq!(link(&c, 0, "flannel.1")["address"], mac, "same VTEP MAC");
    assert_full_mesh(&c, &hosts, Duration::from_secs(12));
}

/// A daemon started with its own `PATH` (for the hung-iptables wrapper), killed on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon_with_path(c: &Cluster, i: usize, path: &str, extra: &[&str]) -> Proc {
    let log = std::fs::File::create(c.dir.join(format!("h{}-path.log", i + 1))).unwrap();
    let child = c.hosts[i]
        .command(common::weft_bin())
        .env("PATH", path)
        .arg("daemon")
        .arg(format!("--etcd-endpoints={}", c.etcd.url()))
        .arg(format!("--subnet-file={}", c.env_file(i).display()))
        .args(["-healthz-port", "8081"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

/// The children of `pid` running `sleep 600` (the hung iptables of the wrapper).
fn hung_children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let ppid = stat.rsplit_once(") ").and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            ppid == Some(pid) && cmd == b"sleep\x00600\x00"
        })
        .collect()
}

/// The external interface deleted and re-created is found again; and an iptables that hangs
/// (a held xtables lock) blocks neither lease events nor the reconciler, and is killed at
/// its deadline.
#[test]
fn host_gw_follows_a_recreated_external_interface_and_a_hung_iptables_blocks_nothing() {
    let c = cluster("hfw", 2, HOST_GW);
    // iptables and iptables-restore hang once the marker exists.
    let bin = c.dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let marker = c.dir.join("hang");
    for (name, real) in [("iptables", "/usr/sbin/iptables"), ("iptables-restore", "/usr/sbin/iptables-restore")] {
        let script =
            format!("#!/bin/sh\nif [ -e {} ]; then exec sleep 600; fi\nexec {real} \"$@\"\n", marker.display());
        std::fs::write(bin.join(name), script).unwrap();
        let mut perm = std::fs::metadata(bin.join(name)).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(bin.join(name), perm).unwrap();
    }
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    let daemons: Vec<Proc> =
        (0..2).map(|i| daemon_with_path(&c, i, &path, &["--ip-masq", "--iptables-resync=1"])).collect();
    let hosts: Vec<Host> = (0..2).map(|i| host_info(&c, i)).collect();
    assert_full_mesh(&c, &hosts, Duration::from_secs(10));
    assert!(c.hosts[0].exec("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]).unwrap().contains("MASQUERADE"));

    replug_external(&c);
    wait_for(Duration::from_secs(12), "the peer route on the new eth0", || {
        route_to(&c, 0, &hosts[1].subnet).filter(|r| r["dev"] == "eth0").map(|_| ())
    });
    assert_full_mesh(&c, &hosts, Duration::from_secs(12));
    assert_lan_route_untouched(&c, 0);

    // From now on every iptables call hangs.
    std::fs::write(&marker, "").unwrap();
    let pids: Vec<u32> = daemons.iter().map(|d| d.0.id()).collect();
    let hung = wait_for(Duration::from_secs(5), "a hung iptables under each daemon", || {
        let h: Vec<Vec<u32>> = pids.iter().map(|p| hung_children(*p)).collect();
        h.iter().all(|v| !v.is_empty()).then_some(h)
    });
    // Lease events and the reconciler go on: a new peer is routed, a removed one unrouted.
    let free = (240..=254).find(|n| !hosts.iter().any(|h| h.subnet == format!("10.5.{n}.0/24"))).unwrap();
    let subnet = format!("10.5.{free}.0/24");
    put(&c, &format!("10.5.{free}.0-24"), r#"{"PublicIP":"192.0.2.13","PublicIPv6":null,"BackendType":"host-gw"}"#);
    for i in 0..2 {
        wait_for(Duration::from_secs(2), "the new peer's route while iptables hangs", || {
            route_to(&c, i, &subnet).filter(|r| r["gateway"] == "192.0.2.13").map(|_| ())
        });
    }
    del(&c, &format!("10.5.{free}.0-24"));
    for i in 0..2 {
        wait_for(Duration::from_secs(2), "the removed peer's route to go while iptables hangs", || {
            route_to(&c, i, &subnet).is_none().then_some(())
        });
    }
    assert_full_mesh(&c, &hosts, Duration::from_secs(2));
    // The hung children are killed at their deadline (10 s), not left behind.
    wait_for(Duration::from_secs(15), "the hung iptables to be killed", || {
        hung.iter().flatten().all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()).then_some(())
    });
    for p in &pids {
        assert!(hung_children(*p).len() <= 1, "one iptables at a time, not one per resync");
    }
    std::fs::remove_file(&marker).unwrap();
}
