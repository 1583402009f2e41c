//! `weft daemon` against a real 3-member etcd cluster in namespaces (members on the hosts'
//! LAN, raft traffic on a peer network of its own), with members killed, cut off from their
//! peers, and the leader killed, while daemons keep following their peers.
//!
//! Prints the figures per fault kind (run with `--nocapture` to see them): the time from the
//! fault to the next peer event applied on both running hosts, and how long a host that
//! starts into the fault takes to get its lease.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{Daemon, PREFIX};
use common::wait_for;
use weft::lab::etcd::EtcdCluster;
use weft::lab::netns::{Lan, Netns, http_get};

const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#;
const HEALTH_PORT: u16 = 8081;

fn subnet_of(env: &str) -> String {
    env.lines().find(|l| l.starts_with("FLANNEL_SUBNET=")).unwrap().to_string()
}

fn metric(host: &Netns, name: &str) -> Option<i64> {
    let (_, body) = http_get(&host.name, HEALTH_PORT, "/metrics")?;
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

fn readyz(host: &Netns) -> Option<u16> {
    http_get(&host.name, HEALTH_PORT, "/readyz").map(|(code, _)| code)
}

/// A running host: its namespace, daemon and subnet file.
struct Host<'a> {
    ns: &'a Netns,
    daemon: Daemon,
    env: std::path::PathBuf,
}

fn start_daemon(ns: &Netns, cluster: &EtcdCluster, dir: &Path) -> (Daemon, std::path::PathBuf) {
    let env = dir.join(format!("{}.env", ns.name));
    let subnet_file = format!("--subnet-file={}", env.display());
    let mut args: Vec<String> = cluster.daemon_args();
    args.extend([subnet_file, "-healthz-port".into(), HEALTH_PORT.to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Short leases (test-only), so renewals happen during the faults too.
    (Daemon::start_with_env(ns, dir, &args, &[(weft::registry::TEST_LEASE_TTL_ENV, TTL_SECS)]), env)
}

/// The lease lifetime of the daemons of these tests: renewed every 15 s, and long enough to
/// outlast the 10 s without any member.
const TTL_SECS: &str = "30";

/// Prints every daemon's and etcd member's log when the test fails (the scratch directory
/// with them goes when the test ends), so a failure says what the daemons saw.
struct LogsOnFailure<'a>(&'a Path);

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for dir in [self.0.to_path_buf(), self.0.join("etcd")] {
            let mut logs: Vec<_> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .collect();
            logs.sort();
            for log in logs {
                eprintln!("===== {} =====\n{}", log.display(), std::fs::read_to_string(&log).unwrap_or_default());
            }
        }
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Members that answer now (for writing peer leases the way another host would).
fn healthy(c: &EtcdCluster, skip: Option<usize>) -> Vec<usize> {
    (0..c.len()).filter(|i| Some(*i) != skip).collect()
}

/// Runs `etcdctl txn` (plain cluster) through `via` with `ops` on stdin (etcdctl's format:
/// compares, a blank line, the operations on success, a blank line, those on failure).
fn etcdctl_txn(c: &EtcdCluster, via: &[usize], ops: &str) -> Option<String> {
    use std::io::Write;
    let eps: Vec<String> = via.iter().map(|i| c.url(*i)).collect();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", c.lan_ns(), "etcdctl", "--command-timeout=1s"])
        .arg(format!("--endpoints={}", eps.join(",")))
        .arg("txn")
        .env("ETCDCTL_API", "3")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(ops.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until both hosts count every other lease in the store as a peer; returns that count.
fn settled(c: &EtcdCluster, hosts: &[Host<'_>], via: &[usize]) -> i64 {
    wait_for(Duration::from_secs(60), "both hosts to agree with the store before the next peer", || {
        let keys = c
            .etcdctl_on(via, &["get", "--command-timeout=1s", "--prefix", "--keys-only", &format!("{PREFIX}/subnets/")])
            .ok()?;
        let peers = keys.lines().filter(|l| !l.is_empty()).count() as i64 - 1;
        hosts.iter().all(|h| metric(h.ns, "weft_peers ") == Some(peers)).then_some(peers)
    })
}

/// A peer joins (a lease written through the healthy members, retried every second until the
/// cluster takes writes again) and then leaves (deleted); returns the time from the fault and
/// from the write until both hosts applied the join, and asserts they apply the leave.
///
/// An attempt that timed out is not an attempt that failed: a proposal that a follower
/// forwarded to a leader cut off from it is delivered when the link comes back, after the
/// test deleted the key. So the join only writes while the peer's tombstone (written with the
/// delete) is absent, and a late copy of it cannot bring the peer back.
fn peer_joins_and_leaves(
    c: &EtcdCluster,
    hosts: &[Host<'_>],
    n: u8,
    via: &[usize],
    fault_at: Instant,
) -> (Duration, Duration) {
    let key = format!("{PREFIX}/subnets/10.5.{}.0-24", 200 + n);
    let value = format!(r#"{{"PublicIP":"192.0.2.{}","PublicIPv6":null}}"#, 100 + n);
    let tombstone = format!("/weft-test/left/{n}");
    let base = settled(c, hosts, via);
    let join = format!("version(\"{tombstone}\") = \"0\"\n\nput {key} {value:?}\n\n\n");
    wait_for(Duration::from_secs(30), "the peer lease to be written", || {
        let out = etcdctl_txn(c, via, &join)?;
        assert!(out.starts_with("SUCCESS"), "peer {n} joins before it leaves: {out}");
        Some(())
    });
    let written = fault_at.elapsed();
    wait_for(Duration::from_secs(60), "both hosts to apply the joined peer", || {
        hosts.iter().all(|h| metric(h.ns, "weft_peers ") == Some(base + 1)).then_some(())
    });
    let joined = fault_at.elapsed();
    eprintln!(
        "  peer {n}: written {:.2}s, applied {:.2}s after the fault",
        written.as_secs_f64(),
        joined.as_secs_f64()
    );
    let leave = format!("\nput {tombstone} left\ndel {key}\n\n\n");
    wait_for(Duration::from_secs(30), "the peer lease to be deleted", || etcdctl_txn(c, via, &leave));
    wait_for(Duration::from_secs(60), "both hosts to apply the peer that left", || {
        hosts.iter().all(|h| metric(h.ns, "weft_peers ") == Some(base)).then_some(())
    });
    (joined, joined - written)
}

/// Starts a daemon on `ns` and returns how long it took to write its subnet file.
fn start_into_fault(ns: &Netns, c: &EtcdCluster, dir: &Path) -> (Daemon, Duration) {
    // The file of a previous start goes first: wait for a fresh one.
    common::remove_if_present(&dir.join(format!("{}.env", ns.name)));
    let start = Instant::now();
    let (mut d, env) = start_daemon(ns, c, dir);
    wait_for(Duration::from_secs(60), "the host started into the fault to get its lease", || {
        assert!(d.alive(), "the daemon exited: {}", d.log());
        std::fs::read_to_string(&env).ok()
    });
    (d, start.elapsed())
}

/// Stops the third host (if running) and starts it again into the current fault; returns how
/// long it took to get its lease. It keeps running afterwards: a stopped host's lease would
/// expire during a later fault and change the peer count under that fault's check, while a
/// running host renews it and its next start reuses it.
fn restart_third(third: &mut Option<Daemon>, ns: &Netns, c: &EtcdCluster, dir: &Path) -> Duration {
    if let Some(mut d) = third.take() {
        d.signal(libc::SIGTERM);
        d.wait_exit(Duration::from_secs(10));
    }
    let (d, t) = start_into_fault(ns, c, dir);
    *third = Some(d);
    t
}

fn assert_steady(hosts: &mut [Host<'_>], subnets: &[String], what: &str) {
    for (h, s) in hosts.iter_mut().zip(subnets) {
        assert!(h.daemon.alive(), "{what}: the daemon on {} exited: {}", h.ns.name, h.daemon.log());
        assert_eq!(&subnet_of(&std::fs::read_to_string(&h.env).unwrap()), s, "{what}: no host changes subnet");
        assert_eq!(readyz(h.ns), Some(200), "{what}: ready through a degraded cluster");
    }
}

#[test]
fn daemons_follow_peers_through_members_killed_partitioned_and_a_lost_quorum() {
    let prefix = common::prefix("ecl");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _logs = LogsOnFailure(dir);
    let lan = Lan::new(&prefix, "192.0.2").unwrap();
    let nss: Vec<Netns> = (1..=4).map(|i| lan.add_host(i).unwrap()).collect();
    let c = EtcdCluster::create(&prefix, &lan.ns, "192.0.2", 3, &dir.join("etcd"), false).unwrap();
    c.etcdctl(&["put", &format!("{PREFIX}/config"), CONFIG]).unwrap();

    let mut hosts: Vec<Host<'_>> = nss[..2]
        .iter()
        .map(|ns| {
            let (daemon, env) = start_daemon(ns, &c, dir);
            Host { ns, daemon, env }
        })
        .collect();
    let subnets: Vec<String> = hosts
        .iter()
        .map(|h| {
            subnet_of(&wait_for(Duration::from_secs(30), "a subnet file", || std::fs::read_to_string(&h.env).ok()))
        })
        .collect();
    assert_ne!(subnets[0], subnets[1]);
    wait_for(Duration::from_secs(30), "each host to see the other", || {
        hosts.iter().all(|h| metric(h.ns, "weft_peers ") == Some(1)).then_some(())
    });

    let (mut killed, mut partitioned, mut leader_killed) = (Vec::new(), Vec::new(), Vec::new());
    let mut starts: Vec<(&str, Duration)> = Vec::new();
    let mut n = 0u8;
    let mut third = None;
    // Each member killed in turn (the daemons' watches start on the first endpoint).
    for i in 0..3 {
        c.kill(i).unwrap();
        let at = Instant::now();
        n += 1;
        killed.push(peer_joins_and_leaves(&c, &hosts, n, &healthy(&c, Some(i)), at));
        if i == 0 {
            // `weft leases` reads through the members that answer, every time.
            let endpoints = format!("--etcd-endpoints={}", c.endpoints());
            let ok =
                (0..20).filter(|_| nss[0].exec(common::weft_bin(), &["leases", &endpoints, "--json"]).is_ok()).count();
            assert_eq!(ok, 20, "weft leases with the first member down");
            starts.push(("member killed", restart_third(&mut third, &nss[2], &c, dir)));
        }
        assert_steady(&mut hosts, &subnets, &format!("member m{} killed", i + 1));
        c.restart(i).unwrap();
        c.wait_member(i, Duration::from_secs(30)).unwrap();
    }
    // Each member cut off from its peers in turn: it stays reachable but has no leader.
    for i in 0..3 {
        c.partition(i).unwrap();
        let at = Instant::now();
        n += 1;
        partitioned.push(peer_joins_and_leaves(&c, &hosts, n, &healthy(&c, Some(i)), at));
        if i == 0 {
            starts.push(("member partitioned", restart_third(&mut third, &nss[2], &c, dir)));
        }
        assert_steady(&mut hosts, &subnets, &format!("member m{} partitioned", i + 1));
        c.heal(i).unwrap();
        c.wait_member(i, Duration::from_secs(30)).unwrap();
    }
    // The leader killed, three times.
    for round in 0..3 {
        let leader = wait_for(Duration::from_secs(30), "a leader", || c.leader());
        c.kill(leader).unwrap();
        let at = Instant::now();
        n += 1;
        leader_killed.push(peer_joins_and_leaves(&c, &hosts, n, &healthy(&c, Some(leader)), at));
        if round == 0 {
            starts.push(("leader killed", restart_third(&mut third, &nss[2], &c, dir)));
        }
        assert_steady(&mut hosts, &subnets, "leader killed");
        c.restart(leader).unwrap();
        c.wait_member(leader, Duration::from_secs(30)).unwrap();
    }

    // Every member down: a starting host waits (alive, not ready) and gets its lease once a
    // quorum is back; the running hosts survive and follow again.
    for i in 0..3 {
        c.kill(i).unwrap();
    }
    let (mut waiting, env4) = start_daemon(&nss[3], &c, dir);
    std::thread::sleep(Duration::from_secs(8));
    assert!(waiting.alive(), "a host starting with every member down waits: {}", waiting.log());
    assert_eq!(readyz(&nss[3]), Some(503), "not ready while no member answers");
    assert!(!env4.exists());
    let log = waiting.log();
    assert!(log.contains(&c.client_ip(0)) && log.contains(&c.client_ip(2)), "the log names the endpoints tried: {log}");
    for h in hosts.iter_mut() {
        assert!(h.daemon.alive(), "a running host survives losing every member: {}", h.daemon.log());
    }
    let back = Instant::now();
    c.restart(0).unwrap();
    c.restart(1).unwrap();
    wait_for(Duration::from_secs(90), "the waiting host to get its lease once a quorum is back", || {
        assert!(waiting.alive(), "{}", waiting.log());
        std::fs::read_to_string(&env4).ok()
    });
    let quorum_start = back.elapsed();
    c.restart(2).unwrap();
    c.wait_member(2, Duration::from_secs(30)).unwrap();
    n += 1;
    let all = healthy(&c, None);
    // The running hosts now also see the hosts that started meanwhile.
    let keys = || c.etcdctl(&["get", "--prefix", "--keys-only", &format!("{PREFIX}/subnets/")]).unwrap();
    let expected = keys().lines().filter(|l| !l.is_empty()).count() as i64 - 1;
    wait_for(Duration::from_secs(60), "the running hosts to catch up after the outage", || {
        hosts.iter().all(|h| metric(h.ns, "weft_peers ") == Some(expected)).then_some(())
    });
    peer_joins_and_leaves(&c, &hosts, n, &all, Instant::now());
    assert_steady(&mut hosts, &subnets, "after the outage");
    // Each host's key still holds its own address.
    for (h, (s, ip)) in hosts.iter().zip(subnets.iter().zip(["192.0.2.11", "192.0.2.12"])) {
        let third = s.trim_start_matches("FLANNEL_SUBNET=10.5.").trim_end_matches(".1/24");
        let v = c.etcdctl(&["get", "--print-value-only", &format!("{PREFIX}/subnets/10.5.{third}.0-24")]).unwrap();
        assert!(v.contains(ip), "{}: {v}", h.ns.name);
    }
    // One etcd lease per subnet, through every fault: every etcd lease is attached to a key
    // (orphans of an attempt that could not be revoked would expire within a TTL).
    wait_for(Duration::from_secs(45), "no etcd lease without its subnet key", || {
        let leases = c.etcdctl(&["lease", "list"]).ok()?;
        let mut ids: Vec<i64> = leases.lines().skip(1).filter_map(|l| i64::from_str_radix(l.trim(), 16).ok()).collect();
        let fields = c.etcdctl(&["get", "--prefix", &format!("{PREFIX}/subnets/"), "-w", "fields"]).ok()?;
        let mut attached: Vec<i64> = fields
            .lines()
            .filter(|l| l.starts_with("\"Lease\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .filter(|id| *id != 0)
            .collect();
        ids.sort();
        attached.sort();
        (ids == attached).then_some(())
    });
    // The retries and the endpoint that was down are visible.
    let (_, body) = http_get(&nss[0].name, HEALTH_PORT, "/metrics").unwrap();
    assert!(body.contains("weft_store_retries_total{op=\""), "{body}");
    assert!(body.contains(&format!("weft_store_endpoint_up{{endpoint=\"{}\"}} 1", c.url(0))), "{body}");

    let fmt = |v: &mut Vec<(Duration, Duration)>| {
        let mut from_fault: Vec<Duration> = v.iter().map(|p| p.0).collect();
        let mut from_write: Vec<Duration> = v.iter().map(|p| p.1).collect();
        format!(
            "from the fault median {:.2}s max {:.2}s; from the write median {:.2}s max {:.2}s (n={})",
            median(&mut from_fault).as_secs_f64(),
            from_fault.iter().max().unwrap().as_secs_f64(),
            median(&mut from_write).as_secs_f64(),
            from_write.iter().max().unwrap().as_secs_f64(),
            v.len()
        )
    };
    println!(
        "fault → next peer event applied on both running hosts (the write is retried until the cluster takes it):"
    );
    println!("  member killed:      {}", fmt(&mut killed));
    println!("  member partitioned: {}", fmt(&mut partitioned));
    println!("  leader killed:      {}", fmt(&mut leader_killed));
    println!("host starting into the fault → lease:");
    for (k, t) in &starts {
        println!("  {k}: {:.2}s", t.as_secs_f64());
    }
    println!("  every member down, then 2 of 3 restarted: {:.2}s after the restart", quorum_start.as_secs_f64());
}

#[test]
fn with_credentials_and_the_store_down_at_start_the_daemon_waits() {
    let c = common::cluster::cluster("ecs", 1, CONFIG);
    // The daemon starts with a soft open-files limit below the hard one (inherited).
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max.min(1024);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    c.etcd.etcdctl(&["user", "add", "root:s3cret"]).unwrap();
    c.etcd.etcdctl(&["auth", "enable"]).unwrap();
    // The store refuses connections from the host (as a stopped store does).
    let block = ["OUTPUT", "-p", "tcp", "--dport", "2379", "-j", "REJECT", "--reject-with", "tcp-reset"];
    c.hosts[0].exec("iptables", &[&["-I"][..], &block[..]].concat()).unwrap();
    let mut d = c.daemon(0, &["--etcd-username=root", "--etcd-password=s3cret"]);
    wait_for(Duration::from_secs(30), "a few attempts in the log", || {
        (d.log().matches("Couldn't fetch network config").count() >= 3).then_some(())
    });
    assert!(d.alive(), "retries instead of exiting: {}", d.log());
    assert_eq!(c.http(0, "/readyz").0, "503");
    assert!(d.log().contains(&c.etcd.url()), "each attempt names the endpoint tried: {}", d.log());
    assert!(!d.log().contains("s3cret"), "the password never reaches the log");
    // The daemon raised its soft open-files limit to the hard one, as flanneld does.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.child.id())).unwrap();
    let nofile: Vec<&str> =
        limits.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().collect();
    assert_eq!(nofile[3], nofile[4], "soft = hard: {limits}");
    assert_ne!(nofile[3], "1024", "{limits}");
    c.hosts[0].exec("iptables", &[&["-D"][..], &block[..]].concat()).unwrap();
    c.wait_env(0);
    assert_eq!(c.http(0, "/readyz").0, "200");
}

/// Which store the partition test runs against.
#[derive(Clone, Copy, Debug)]
enum Store {
    Etcd,
    Local,
}

/// Host A holds the only subnet; it is frozen (no renewal, no watch: a partition as long as
/// it lasts) for longer than the (test-only, short) lease TTL; the lease expires and host B
/// takes the subnet. When A runs again it must give the subnet up (exit), never take it back.
fn partition_longer_than_the_ttl(tag: &str, store: Store, v6_only: bool) {
    let prefix = common::prefix(tag);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let lan = Lan::new(&prefix, "192.0.2").unwrap();
    let hosts: Vec<Netns> = (1..=2).map(|i| lan.add_host(i).unwrap()).collect();
    let config = if v6_only {
        for (i, h) in hosts.iter().enumerate() {
            h.ip(&["addr", "add", &format!("fd00:2::{}/64", 11 + i), "dev", "eth0", "nodad"]).unwrap();
        }
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd05::/48","IPv6SubnetLen":64,"IPv6SubnetMin":"fd05:0:0:7::","IPv6SubnetMax":"fd05:0:0:7::","Backend":{"Type":"alloc"}}"#
    } else {
        r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.7.0","SubnetMax":"10.5.7.0","Backend":{"Type":"alloc"}}"#
    };
    let etcd = match store {
        Store::Etcd => {
            let e = weft::lab::etcd::Etcd::start(Some(&lan.ns), &lan.gateway(), 2379, 2380, &dir.join("etcd"), None)
                .unwrap();
            e.etcdctl(&["put", &format!("{PREFIX}/config"), config]).unwrap();
            Some(e)
        }
        Store::Local => {
            std::fs::write(dir.join("net-conf.json"), config).unwrap();
            None
        }
    };
    let store_args: Vec<String> = match &etcd {
        Some(e) => vec![format!("--etcd-endpoints={}", e.url())],
        None => vec![
            "--store=local".into(),
            format!("--local-store={}", dir.join("leases.db").display()),
            format!("--net-config-path={}", dir.join("net-conf.json").display()),
        ],
    };
    let start = |i: usize| -> Daemon {
        let mut args = store_args.clone();
        args.push(format!("--subnet-file={}", dir.join(format!("h{i}.env")).display()));
        args.push("--iface=eth0".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_with_env(&hosts[i], dir, &args, &[(weft::registry::TEST_LEASE_TTL_ENV, "4")])
    };
    let env_of = |i: usize, d: &mut Daemon| {
        wait_for(Duration::from_secs(30), "a subnet file", || {
            assert!(d.alive(), "the daemon exited: {}", d.log());
            std::fs::read_to_string(dir.join(format!("h{i}.env"))).ok()
        })
    };
    let subnet_line = |env: &str| {
        let key = if v6_only { "FLANNEL_IPV6_SUBNET=" } else { "FLANNEL_SUBNET=" };
        env.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in {env}")).to_string()
    };
    let key = if v6_only { "0.0.0.0-0&fd05:0:0:7::-64" } else { "10.5.7.0-24" };
    let stored = || -> Option<String> {
        match &etcd {
            Some(e) => {
                let v = e.etcdctl(&["get", "--print-value-only", &format!("{PREFIX}/subnets/{key}")]).unwrap();
                (!v.trim().is_empty()).then(|| v.trim().to_string())
            }
            None => {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    use weft::registry::Registry;
                    let reg = weft::registry::local::LocalRegistry::open(
                        &dir.join("leases.db"),
                        PREFIX,
                        &dir.join("net-conf.json"),
                    )
                    .unwrap();
                    let leases = reg.list().await.unwrap().leases;
                    leases.into_iter().find(|l| l.key.to_string() == key).map(|l| l.attrs.to_json())
                })
            }
        }
    };
    let (a_id, b_id) = if v6_only { ("fd00:2::11", "fd00:2::12") } else { ("192.0.2.11", "192.0.2.12") };

    let mut a = start(0);
    let a_subnet = subnet_line(&env_of(0, &mut a));
    assert!(stored().unwrap().contains(a_id));
    // The partition: A cannot renew or watch.
    a.signal(libc::SIGSTOP);
    wait_for(Duration::from_secs(30), "A's lease to expire in the store", || stored().is_none().then_some(()));
    let mut b = start(1);
    let b_subnet = subnet_line(&env_of(1, &mut b));
    assert_eq!(a_subnet, b_subnet, "the only subnet went to B once A's lease expired");
    assert!(stored().unwrap().contains(b_id));
    // The partition heals: A must stop using the subnet, and must not take it back.
    a.signal(libc::SIGCONT);
    let status = a.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}: {}", a.log());
    let log = a.log();
    assert!(
        log.contains("expired while the store could not be reached")
            || log.contains("held by another host")
            || log.contains("overwritten by another host")
            || log.contains("Lease has been revoked"),
        "A says why it stopped: {log}"
    );
    std::thread::sleep(Duration::from_secs(6));
    let v = stored().expect("B's lease is still there");
    assert!(v.contains(b_id) && !v.contains(a_id), "the subnet stays B's: {v}");
    assert!(b.alive(), "B keeps its subnet: {}", b.log());
    assert_eq!(subnet_line(&env_of(1, &mut b)), b_subnet);
}

#[test]
fn a_partition_longer_than_the_ttl_never_leaves_two_hosts_on_one_subnet() {
    // One tag, so the variants run one after the other.
    for (store, v6_only) in [(Store::Etcd, false), (Store::Etcd, true), (Store::Local, false), (Store::Local, true)] {
        eprintln!("variant: {store:?}, IPv6-only: {v6_only}");
        partition_longer_than_the_ttl("ecp", store, v6_only);
    }
}

#[test]
fn a_tls_cluster_with_a_certificate_per_member_survives_dead_and_frozen_members() {
    let prefix = common::prefix("ect");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let lan = Lan::new(&prefix, "192.0.2").unwrap();
    let nss: Vec<Netns> = (1..=2).map(|i| lan.add_host(i).unwrap()).collect();
    let c = EtcdCluster::create(&prefix, &lan.ns, "192.0.2", 3, &dir.join("etcd"), true).unwrap();
    c.etcdctl(&["put", &format!("{PREFIX}/config"), CONFIG]).unwrap();
    // Each member presents its own certificate, for its own address.
    for i in 0..3 {
        let pem = dir.join(format!("etcd/m{}.pem", i + 1));
        let san = weft::lab::netns::run(
            std::process::Command::new("openssl").args(["x509", "-noout", "-ext", "subjectAltName", "-in"]).arg(&pem),
        )
        .unwrap();
        assert!(san.contains(&format!("IP Address:{}", c.client_ip(i))), "m{}: {san}", i + 1);
        // etcdctl checks the member's certificate against its address.
        c.etcdctl_on(&[i], &["get", "/weft-check"]).unwrap();
    }
    assert!(c.url(0).starts_with("https://"));
    let (mut d1, env1) = start_daemon(&nss[0], &c, dir);
    let s1 = subnet_of(&wait_for(Duration::from_secs(30), "h1's lease", || std::fs::read_to_string(&env1).ok()));
    // The first member dies; a host starting now still gets its lease, and both follow.
    c.kill(0).unwrap();
    let (mut d2, _) = start_into_fault(&nss[1], &c, dir);
    let hosts = [&nss[0], &nss[1]];
    wait_for(Duration::from_secs(30), "each host to see the other", || {
        hosts.iter().all(|h| metric(h, "weft_peers ") == Some(1)).then_some(())
    });
    let leader = wait_for(Duration::from_secs(30), "a leader", || c.leader());
    c.kill(leader).unwrap();
    c.restart(0).unwrap();
    c.wait_member(0, Duration::from_secs(30)).unwrap();
    let key = format!("{PREFIX}/subnets/10.5.250.0-24");
    c.etcdctl_on(&[0], &["put", &key, r#"{"PublicIP":"192.0.2.99","PublicIPv6":null}"#]).unwrap();
    wait_for(Duration::from_secs(30), "both hosts to see the new peer", || {
        hosts.iter().all(|h| metric(h, "weft_peers ") == Some(2)).then_some(())
    });
    // A frozen member (connections open, no answers): only deadlines get past it.
    c.restart(leader).unwrap();
    c.wait_member(leader, Duration::from_secs(30)).unwrap();
    let now_leader = wait_for(Duration::from_secs(30), "a leader", || c.leader());
    let frozen = (0..3).find(|i| *i != now_leader).unwrap();
    c.freeze(frozen).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != frozen).collect();
    let key = format!("{PREFIX}/subnets/10.5.251.0-24");
    wait_for(Duration::from_secs(30), "the write", || {
        c.etcdctl_on(&others, &["put", "--command-timeout=1s", &key, r#"{"PublicIP":"192.0.2.98","PublicIPv6":null}"#])
            .ok()
    });
    wait_for(Duration::from_secs(30), "both hosts to see the peer past a frozen member", || {
        hosts.iter().all(|h| metric(h, "weft_peers ") == Some(3)).then_some(())
    });
    d2.signal(libc::SIGTERM);
    d2.wait_exit(Duration::from_secs(10));
    let (mut d2, t) = start_into_fault(&nss[1], &c, dir);
    eprintln!("a host starting with a frozen member got its lease in {:.2}s", t.as_secs_f64());
    c.thaw(frozen).unwrap();
    assert!(d1.alive() && d2.alive(), "{}{}", d1.log(), d2.log());
    // The subnet file is the one h1 wrote at its start: the store says whether h1 still
    // holds that subnet.
    assert_eq!(subnet_of(&std::fs::read_to_string(&env1).unwrap()), s1);
    let third = s1.trim_start_matches("FLANNEL_SUBNET=10.5.").trim_end_matches(".1/24");
    let v = c.etcdctl(&["get", "--print-value-only", &format!("{PREFIX}/subnets/10.5.{third}.0-24")]).unwrap();
    assert!(v.contains("\"192.0.2.11\""), "h1 still holds {s1}: {v:?}");
}
