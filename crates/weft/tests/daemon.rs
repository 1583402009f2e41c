//! `weft daemon` as a process, one per host namespace, against a real etcd in the LAN
//! namespace or a shared local store file.

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::{Daemon, PREFIX};
use common::{wait_for, weft_bin};
use weft::lab::netns::{Lan, Netns};
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#;

fn subnet_line(env: &str) -> String {
    env.lines().find(|l| l.starts_with("FLANNEL_SUBNET=")).unwrap().to_string()
}

#[test]
fn two_daemons_get_distinct_subnets_written_as_flannel_writes_them() {
    let c = common::cluster::cluster("dtw", 2, CONFIG);
    let _d1 = c.daemon(0, &[]);
    let _d2 = c.daemon(1, &["-iface", "eth0", "-ip-masq"]);
    let (e1, e2) = (c.wait_env(0), c.wait_env(1));
    assert_ne!(subnet_line(&e1), subnet_line(&e2));
    for (env, masq) in [(&e1, "false"), (&e2, "true")] {
        let lines: Vec<&str> = env.lines().collect();
        assert_eq!(lines.len(), 4, "{env}");
        assert_eq!(lines[0], "FLANNEL_NETWORK=10.5.0.0/16");
        let subnet = lines[1].strip_prefix("FLANNEL_SUBNET=10.5.").unwrap();
        assert!(subnet.ends_with(".1/24"), "first address of the lease: {subnet}");
        assert_eq!(lines[2], "FLANNEL_MTU=1500", "alloc reports the interface MTU");
        assert_eq!(lines[3], format!("FLANNEL_IPMASQ={masq}"));
        assert!(env.ends_with('\n'));
    }
    // The store holds exactly flannel's key and value text, each on a 24 h etcd lease.
    let listing = c.etcd.etcdctl(&["get", "--prefix", &format!("{PREFIX}/subnets/")]).unwrap();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 4, "{listing}");
    let mut values: Vec<&str> = vec![lines[1], lines[3]];
    values.sort();
    assert_eq!(
        values,
        [r#"{"PublicIP":"192.0.2.11","PublicIPv6":null}"#, r#"{"PublicIP":"192.0.2.12","PublicIPv6":null}"#]
    );
    let mut from_keys: Vec<String> = [lines[0], lines[2]]
        .iter()
        .map(|k| {
            let third = k.strip_prefix(&format!("{PREFIX}/subnets/10.5.")).unwrap().strip_suffix(".0-24").unwrap();
            format!("FLANNEL_SUBNET=10.5.{third}.1/24")
        })
        .collect();
    let mut from_files = vec![subnet_line(&e1), subnet_line(&e2)];
    from_keys.sort();
    from_files.sort();
    assert_eq!(from_keys, from_files, "the keys are the subnets the files announce");
    for key in [lines[0], lines[2]] {
        let id = c.etcd.lease_of(key).unwrap();
        let ttl = c.etcd.etcdctl(&["lease", "timetolive", &format!("{id:x}")]).unwrap();
        assert!(ttl.contains("granted with TTL(86400s)"), "{ttl}");
    }
    // Health, readiness and metrics, and each daemon sees the other as a peer.
    assert_eq!(c.http(0, "/healthz"), ("200".into(), "flanneld is running".into()));
    assert_eq!(c.http(0, "/readyz"), ("200".into(), "flanneld is ready".into()));
    assert_eq!(c.http(0, "/nope").0, "404");
    for i in 0..2 {
        wait_for(Duration::from_secs(10), "each daemon to see one peer", || {
            (c.metric(i, "weft_peers ") == Some(1)).then_some(())
        });
        assert_eq!(c.metric(i, "weft_ready "), Some(1));
        assert!(c.metric(i, "weft_lease_expiry_timestamp_seconds ").unwrap() > 0);
    }
    // weft leases shows both, as JSON and as a table.
    let json = c.lan.ns.exec(weft_bin(), &["leases", &format!("--etcd-endpoints={}", c.etcd.url()), "--json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(v[0]["expires_at"].as_u64().is_some());
    let table = c.lan.ns.exec(weft_bin(), &["leases", &format!("-etcd-endpoints={}", c.etcd.url())]).unwrap();
    assert!(table.starts_with("SUBNET") && table.contains("192.0.2.11") && table.contains("in 23h59m"), "{table}");
}

#[test]
fn a_restarted_daemon_keeps_its_subnet() {
    let c = common::cluster::cluster("drs", 1, CONFIG);
    let mut d = c.daemon(0, &[]);
    let first = subnet_line(&c.wait_env(0));
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success(), "SIGTERM is a clean shutdown");
    let mut d = c.daemon(0, &[]);
    wait_for(Duration::from_secs(10), "readiness after restart", || (c.http(0, "/readyz").0 == "200").then_some(()));
    // The subnet file is still the first daemon's (it is the hint the restart reads): the
    // store says which subnet the ready new daemon holds.
    assert_eq!(subnet_line(&c.wait_env(0)), first);
    let third = first.trim_start_matches("FLANNEL_SUBNET=10.5.").trim_end_matches(".1/24");
    let listing = c.etcd.etcdctl(&["get", "--prefix", "--keys-only", &format!("{PREFIX}/subnets/")]).unwrap();
    let keys: Vec<&str> = listing.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(keys, [format!("{PREFIX}/subnets/10.5.{third}.0-24")], "the restarted daemon holds the first subnet");
    // Even without the old subnet file, the lease of our public IP is found and kept.
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(5));
    std::fs::remove_file(c.env_file(0)).unwrap();
    let _d2 = c.daemon(0, &[]);
    assert_eq!(subnet_line(&c.wait_env(0)), first);
    let listing = c.etcd.etcdctl(&["get", "--prefix", "--keys-only", &format!("{PREFIX}/subnets/")]).unwrap();
    assert_eq!(listing.lines().filter(|l| !l.is_empty()).count(), 1, "no second lease was taken: {listing}");
}

#[test]
fn deleting_our_lease_makes_the_daemon_exit_zero() {
    let c = common::cluster::cluster("ddl", 1, CONFIG);
    let mut d = c.daemon(0, &[]);
    let env = c.wait_env(0);
    let third = subnet_line(&env).trim_start_matches("FLANNEL_SUBNET=10.5.").trim_end_matches(".1/24").to_string();
    c.etcd.etcdctl(&["del", &format!("{PREFIX}/subnets/10.5.{third}.0-24")]).unwrap();
    let status = d.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(d.log().contains("Lease has been revoked"), "{}", d.log());
}

#[test]
fn a_bad_config_is_explained_and_picked_up_once_fixed() {
    let c = common::cluster::cluster("dbc", 1, CONFIG);
    c.etcd.etcdctl(&["put", &format!("{PREFIX}/config"), r#"{"Network":"10.5.0.0/30"}"#]).unwrap();
    let d = c.daemon(0, &[]);
    wait_for(Duration::from_secs(10), "the config error in the log", || {
        d.log().contains("Minimum useful network prefix is /28").then_some(())
    });
    assert_eq!(c.http(0, "/readyz"), ("503".into(), "flanneld is not ready yet".into()));
    assert!(!c.env_file(0).exists());
    c.etcd.etcdctl(&["put", &format!("{PREFIX}/config"), CONFIG]).unwrap();
    c.wait_env(0);
    assert_eq!(c.http(0, "/readyz").0, "200");
}

#[test]
fn an_unreachable_store_is_retried_until_it_answers() {
    let mut c = common::cluster::cluster("dur", 1, CONFIG);
    c.etcd.kill();
    let d = c.daemon(0, &[]);
    wait_for(Duration::from_secs(20), "the store error in the log", || {
        let log = d.log();
        (log.contains("Couldn't fetch network config") && log.contains("check that the store is running")).then_some(())
    });
    assert_eq!(c.http(0, "/healthz").0, "200", "alive while waiting");
    assert_eq!(c.http(0, "/readyz").0, "503");
    c.etcd.restart_on(2379).unwrap();
    c.wait_env(0);
}

#[test]
fn an_unwritable_subnet_file_is_a_clear_error() {
    let c = common::cluster::cluster("duw", 1, CONFIG);
    // The parent of the subnet file is a regular file: no directory can be made there.
    std::fs::write(c.dir.join("blocker"), "").unwrap();
    let endpoints = format!("--etcd-endpoints={}", c.etcd.url());
    let subnet_file = format!("--subnet-file={}", c.dir.join("blocker/subnet.env").display());
    let mut d = Daemon::start(&c.hosts[0], &c.dir, &[&endpoints, &subnet_file]);
    let status = d.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1));
    assert!(d.log().contains("cannot write the subnet file") && d.log().contains("--subnet-file"), "{}", d.log());
}

#[test]
fn bad_flags_exit_2_with_usage() {
    for (args, needle) in [
        (vec!["daemon", "-bogus"], "flag provided but not defined: -bogus"),
        (vec!["daemon", "--iface"], "flag needs an argument: -iface"),
        (vec!["daemon", "-ip-masq=perhaps"], "invalid boolean value"),
        (vec!["daemon", "-subnet-lease-renew-margin=2000"], "between 1 and 1439"),
        (vec!["leases", "--store=mongo"], "use etcd or local"),
        (vec!["frobnicate"], "unknown command"),
    ] {
        let out = Command::new(weft_bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle) && err.contains("Usage"), "{args:?}: {err}");
    }
    let out = Command::new(weft_bin()).args(["daemon", "--help"]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--etcd-endpoints"));
}

#[test]
fn daemons_share_the_local_store() {
    let prefix = common::prefix("dls");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("net-conf.json"), CONFIG).unwrap();
    let lan = Lan::new(&prefix, "192.0.2").unwrap();
    let hosts: Vec<Netns> = (1..=4).map(|i| lan.add_host(i).unwrap()).collect();
    let store = format!("--local-store={}", dir.join("leases.db").display());
    let conf = format!("--net-config-path={}", dir.join("net-conf.json").display());
    let daemons: Vec<Daemon> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let sf = format!("--subnet-file={}", dir.join(format!("h{i}.env")).display());
            Daemon::start(h, dir, &["--store=local", &store, &conf, &sf, "--healthz-port=8081"])
        })
        .collect();
    let mut subnets: Vec<String> = (0..4)
        .map(|i| {
            subnet_line(&wait_for(Duration::from_secs(20), "subnet file", || {
                std::fs::read_to_string(dir.join(format!("h{i}.env"))).ok()
            }))
        })
        .collect();
    subnets.sort();
    subnets.dedup();
    assert_eq!(subnets.len(), 4, "four processes, four distinct subnets");
    let peers = |h: &Netns| -> Option<i64> {
        let body = h.exec("curl", &["-s", "-m", "2", "http://127.0.0.1:8081/metrics"]).ok()?;
        body.lines().find_map(|l| l.strip_prefix("weft_peers ").and_then(|v| v.parse().ok()))
    };
    for h in &hosts {
        wait_for(Duration::from_secs(10), "three peers", || (peers(h) == Some(3)).then_some(()));
    }
    // Removing host 1's lease from the store: host 1 stops, the others forget it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use weft::registry::Registry;
        let reg =
            weft::registry::local::LocalRegistry::open(&dir.join("leases.db"), PREFIX, &dir.join("net-conf.json"))
                .unwrap();
        let own = reg.list().await.unwrap().leases.into_iter().find(|l| l.attrs.public_ip.octets()[3] == 11).unwrap();
        reg.delete(&own.key).await.unwrap();
    });
    let mut d0 = daemons.into_iter();
    let mut first = d0.next().unwrap();
    assert!(first.wait_exit(Duration::from_secs(10)).success());
    for h in &hosts[1..] {
        wait_for(Duration::from_secs(10), "two peers", || (peers(h) == Some(2)).then_some(()));
    }
    let table = Command::new(weft_bin()).args(["leases", "--store=local", &store]).output().unwrap();
    assert!(table.status.success(), "weft leases: {}", String::from_utf8_lossy(&table.stderr));
    assert_eq!(String::from_utf8_lossy(&table.stdout).lines().count(), 4, "header + three leases");
}

#[test]
fn cli_output_into_a_closed_pipe_ends_quietly_and_every_lab_command_has_help() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("--local-store={}", tmp.path().join("leases.db").display());
    let conf = format!("--net-config-path={}", tmp.path().join("net-conf.json").display());
    std::fs::write(tmp.path().join("net-conf.json"), CONFIG).unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["leases", "--store=local", &store, &conf],
        vec!["leases", "--store=local", &store, &conf, "--json"],
        vec!["leases", "--help"],
        vec!["daemon", "--help"],
        vec!["lab", "--help"],
        vec!["lab", "up", "--help"],
        vec!["lab", "status", "--help"],
        vec!["version"],
        vec!["help"],
    ];
    for args in &cases {
        // The reader is gone before weft writes a byte: as `weft … | head -c0` at worst.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(weft_bin()).args(args).stdout(writer).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked") && out.status.code() != Some(101), "{args:?}: {:?} {err}", out.status);
    }
    for cmd in ["up", "status", "check", "bench", "restart", "chaos", "add-host", "remove-host", "down"] {
        for help in ["--help", "-h"] {
            let out = Command::new(weft_bin()).args(["lab", cmd, help]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "weft lab {cmd} {help}: {:?}", out.status);
            assert!(text.starts_with(&format!("Usage: weft lab {cmd}")) && text.contains("--name"), "{cmd}: {text:?}");
            assert!(!text.contains("FLANNELD_"), "weft lab reads no FLANNELD_ variables: {text}");
        }
    }
}

#[test]
fn weft_peers_counts_accepted_peers_not_rejected_leases() {
    let c = common::cluster::cluster("fxp", 1, CONFIG);
    let _d = c.daemon(0, &[]);
    c.wait_env(0);
    let rejected = r#"weft_leases_rejected_total{reason="outside_network"} "#;
    let added = r#"weft_lease_events_total{type="added"} "#;
    // A lease for the LAN itself (outside the Network), then a valid peer.
    let put = |k: &str, ip: &str| {
        let v = format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null}}"#);
        c.etcd.etcdctl(&["put", &format!("{PREFIX}/subnets/{k}"), &v]).unwrap();
    };
    put("192.0.2.0-24", "192.0.2.99");
    wait_for(Duration::from_secs(10), "the rejection", || (c.metric(0, rejected) == Some(1)).then_some(()));
    put("10.5.200.0-24", "192.0.2.12");
    wait_for(Duration::from_secs(10), "the valid peer", || (c.metric(0, added) == Some(1)).then_some(()));
    assert_eq!(c.metric(0, "weft_peers "), Some(1), "one peer in use; the rejected lease is not one");
    // A renewal of the valid lease (same attributes) changes nothing in use.
    put("10.5.200.0-24", "192.0.2.12");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.metric(0, added), Some(1), "a renewal is not a new peer");
    assert_eq!(c.metric(0, rejected), Some(1), "counted once");
    // The valid one gone: no peer, though the invalid lease is still in the store.
    c.etcd.etcdctl(&["del", &format!("{PREFIX}/subnets/10.5.200.0-24")]).unwrap();
    wait_for(Duration::from_secs(10), "no peer", || (c.metric(0, "weft_peers ") == Some(0)).then_some(()));
    assert_eq!(c.metric(0, rejected), Some(1));
}
