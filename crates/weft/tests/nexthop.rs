//! Routes through nexthop objects, end to end: three hosts on a LAN bridge, a real etcd, one
//! daemon per host; kernel state read back with `ip -j route` and `ip -j nexthop`; traffic
//! with `ping` between pod addresses of different hosts.

mod common;

use std::time::Duration;

use common::cluster::{Cluster, Daemon, PREFIX, cluster};
use common::mesh::{Host, assert_full_mesh, host_info, json, ping, routes};
use common::wait_for;
use serde_json::Value;

const VXLAN: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#;
/// Our nexthops' id range and protocol.
const FIRST_ID: u64 = 87_000_000;

fn daemon(c: &Cluster, i: usize, env: &[(&str, &str)]) -> Daemon {
    let endpoints = format!("--etcd-endpoints={}", c.etcd.url());
    let subnet_file = format!("--subnet-file={}", c.env_file(i).display());
    Daemon::start_with_env(&c.hosts[i], &c.dir, &[&endpoints, &subnet_file, "-healthz-port", "8081"], env)
}

fn route_to(c: &Cluster, i: usize, dst: &str) -> Option<Value> {
    routes(c, i).into_iter().find(|r| r["dst"] == dst)
}

/// Every nexthop object in host `i`'s kernel, as `ip -j nexthop` reports it.
fn nexthops(c: &Cluster, i: usize) -> Vec<Value> {
    json(&c.hosts[i], "ip", &["-j", "nexthop", "show"]).as_array().cloned().unwrap_or_default()
}

fn ours(c: &Cluster, i: usize) -> Vec<Value> {
    nexthops(c, i).into_iter().filter(|n| n["protocol"] == "87").collect()
}

/// Host `i`'s route to `peer` goes through one of our nexthops, which goes via `via` on
/// `dev` (onlink for vxlan): returns the nexthop id.
fn through_nexthop(c: &Cluster, i: usize, peer: &Host, via: &str, dev: &str, onlink: bool) -> Option<u64> {
    let r = route_to(c, i, &peer.subnet)?;
    let id = r["nhid"].as_u64()?;
    let nh = ours(c, i).into_iter().find(|n| n["id"].as_u64() == Some(id))?;
    let flags = nh["flags"].as_array().cloned().unwrap_or_default();
    let ok = r["protocol"] == "87"
        && (FIRST_ID..FIRST_ID + 1_000_000).contains(&id)
        && nh["gateway"] == via
        && nh["dev"] == dev
        && flags.contains(&Value::from("onlink")) == onlink;
    ok.then_some(id)
}

/// Whether host `i`'s route to `peer` is flannel's plain route (no nexthop object).
fn plain_route(c: &Cluster, i: usize, peer: &Host, via: &str) -> bool {
    route_to(c, i, &peer.subnet).is_some_and(|r| r.get("nhid").is_none() && r["gateway"] == via)
}

/// [`wait_for`], with host 1's daemon log in the failure message.
fn wait_logged<T>(d: &Daemon, limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}; host 1's log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lease_key(h: &Host) -> String {
    format!("{PREFIX}/subnets/{}", h.subnet.replace('/', "-"))
}

#[test]
fn vxlan_routes_go_through_nexthops_survive_a_restart_and_are_repaired() {
    let c = cluster("scl", 3, VXLAN);
    let mut daemons: Vec<Daemon> = (0..3).map(|i| daemon(&c, i, &[])).collect();
    let hosts: Vec<Host> = (0..3).map(|i| host_info(&c, i)).collect();
    // Someone else's nexthop and a route through it, inside the Network: never touched.
    c.hosts[0].ip(&["nexthop", "add", "id", "5", "via", "192.0.2.99", "dev", "eth0", "proto", "static"]).unwrap();
    c.hosts[0].ip(&["route", "add", "10.5.250.0/24", "nhid", "5", "proto", "static"]).unwrap();
    let ids: Vec<u64> = [1, 2]
        .iter()
        .map(|&p| {
            wait_logged(&daemons[0], Duration::from_secs(10), "routes through nexthops on host 1", || {
                through_nexthop(&c, 0, &hosts[p], &hosts[p].base, "flannel.1", true)
            })
        })
        .collect();
    assert_eq!(ours(&c, 0).len(), 2, "one nexthop per peer: {:?}", ours(&c, 0));
    assert_full_mesh(&c, &hosts, Duration::from_secs(10));
    let foreign = |c: &Cluster| {
        let nh = nexthops(c, 0).into_iter().find(|n| n["id"] == 5);
        let r = route_to(c, 0, "10.5.250.0/24");
        nh.is_some_and(|n| n["gateway"] == "192.0.2.99" && n["protocol"] == "static")
            && r.is_some_and(|r| r["nhid"] == 5 && r["protocol"] == "static")
    };
    assert!(foreign(&c), "someone else's nexthop and route are there");

    // A nexthop of ours deleted by hand (the kernel drops the route through it silently):
    // both come back, and traffic flows again.
    c.hosts[0].ip(&["nexthop", "del", "id", &ids[0].to_string()]).unwrap();
    wait_for(Duration::from_secs(10), "the deleted nexthop and its route to come back", || {
        through_nexthop(&c, 0, &hosts[1], &hosts[1].base, "flannel.1", true)
    });
    assert!(ping(&c, 0, &hosts[0].pod_ip, &hosts[1].pod_ip));
    // A route through our nexthop deleted by hand comes back too.
    c.hosts[0].ip(&["route", "del", &hosts[2].subnet]).unwrap();
    wait_for(Duration::from_secs(10), "the deleted route to come back", || {
        through_nexthop(&c, 0, &hosts[2], &hosts[2].base, "flannel.1", true)
    });

    // A restart adopts what is there: same ids, no ping lost.
    let before: Vec<u64> =
        [1, 2].iter().map(|&p| through_nexthop(&c, 0, &hosts[p], &hosts[p].base, "flannel.1", true).unwrap()).collect();
    let pinger = c.hosts[0]
        .command("ping")
        .args(["-i", "0.05", "-w", "60", "-I", &hosts[0].pod_ip, &hosts[1].pod_ip])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    daemons[0].signal(libc::SIGKILL);
    daemons[0].wait_exit(Duration::from_secs(5));
    daemons[0] = daemon(&c, 0, &[]);
    wait_for(Duration::from_secs(20), "the restarted daemon to be ready", || {
        (c.http(0, "/readyz").0 == "200").then_some(())
    });
    // Past the restarted daemon's first pass (and one more, from a lease write).
    wait_for(Duration::from_secs(20), "a pass of the restarted daemon", || {
        (c.metric(0, "weft_reconciles_total ").unwrap_or(0) >= 1).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pinger.id() as i32, libc::SIGINT) }, 0);
    let out = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let sent: u64 = text
        .lines()
        .find_map(|l| l.split_once(" packets transmitted").map(|(n, _)| n.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no ping summary:\n{text}"));
    let seqs: std::collections::BTreeSet<u64> =
        text.lines().filter_map(|l| l.split("icmp_seq=").nth(1)?.split_whitespace().next()?.parse().ok()).collect();
    let lost: Vec<u64> = (1..sent).filter(|s| !seqs.contains(s)).collect();
    assert!(sent > 20 && lost.is_empty(), "pings lost across the restart: {lost:?}\n{text}");
    let after: Vec<u64> =
        [1, 2].iter().map(|&p| through_nexthop(&c, 0, &hosts[p], &hosts[p].base, "flannel.1", true).unwrap()).collect();
    assert_eq!(after, before, "the restarted daemon adopted the nexthops");
    assert_eq!(ours(&c, 0).len(), 2);

    // A peer that leaves: its route and its nexthop go; the foreign ones stay.
    c.etcd.etcdctl(&["del", &lease_key(&hosts[2])]).unwrap();
    wait_for(Duration::from_secs(10), "the departed peer's route and nexthop to go", || {
        (route_to(&c, 0, &hosts[2].subnet).is_none() && ours(&c, 0).len() == 1).then_some(())
    });
    // A stale nexthop of ours (left by a crash) is removed. Its gateway is in no host's
    // subnet: h1's own 10.5.X.0 is a local address, which the kernel refuses as a gateway.
    let stale_gw =
        (2..=254u8).rev().map(|x| format!("10.5.{x}.0")).find(|g| hosts.iter().all(|h| h.base != *g)).unwrap();
    c.hosts[0]
        .ip(&["nexthop", "add", "id", "87000900", "via", &stale_gw, "dev", "flannel.1", "onlink", "proto", "87"])
        .unwrap();
    wait_for(Duration::from_secs(15), "the stale nexthop to go", || {
        (!ours(&c, 0).iter().any(|n| n["id"] == 87_000_900)).then_some(())
    });
    assert!(foreign(&c), "someone else's nexthop and route are untouched");
    assert!(ping(&c, 0, &hosts[0].pod_ip, &hosts[1].pod_ip));
    drop(daemons);
}

#[test]
fn plain_routes_when_nexthops_are_off_and_the_two_forms_replace_each_other_in_place() {
    let c = cluster("scm", 3, HOST_GW);
    let off = [("WEFT_NEXTHOPS", "off")];
    let mut daemons: Vec<Daemon> = (0..3).map(|i| daemon(&c, i, &off)).collect();
    let hosts: Vec<Host> = (0..3).map(|i| host_info(&c, i)).collect();
    for p in [1, 2] {
        wait_for(Duration::from_secs(10), "flannel's plain host-gw routes", || {
            plain_route(&c, 0, &hosts[p], &hosts[p].public_ip).then_some(())
        });
    }
    assert!(ours(&c, 0).is_empty(), "no nexthop objects with WEFT_NEXTHOPS=off: {:?}", ours(&c, 0));
    assert_full_mesh(&c, &hosts, Duration::from_secs(10));
    let dev = route_to(&c, 0, &hosts[1].subnet).unwrap()["dev"].as_str().unwrap().to_string();

    // Restarted with nexthops on: the plain routes are replaced by routes through nexthops.
    daemons[0].signal(libc::SIGTERM);
    daemons[0].wait_exit(Duration::from_secs(10));
    daemons[0] = daemon(&c, 0, &[]);
    for p in [1, 2] {
        wait_for(Duration::from_secs(15), "host-gw routes through nexthops", || {
            through_nexthop(&c, 0, &hosts[p], &hosts[p].public_ip, &dev, false)
        });
    }
    assert_eq!(ours(&c, 0).len(), 2);
    assert_full_mesh(&c, &hosts, Duration::from_secs(10));

    // And back: plain routes again, our nexthops deleted.
    daemons[0].signal(libc::SIGTERM);
    daemons[0].wait_exit(Duration::from_secs(10));
    daemons[0] = daemon(&c, 0, &off);
    wait_for(Duration::from_secs(15), "plain routes again and our nexthops gone", || {
        ([1, 2].iter().all(|&p| plain_route(&c, 0, &hosts[p], &hosts[p].public_ip)) && ours(&c, 0).is_empty())
            .then_some(())
    });
    assert_full_mesh(&c, &hosts, Duration::from_secs(10));
    drop(daemons);
}
