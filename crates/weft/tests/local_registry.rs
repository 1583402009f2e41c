//! The embedded local store: the same scenarios as etcd, through separate connections to one
//! file (as separate daemons on one machine use it).

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::scenarios;
use weft::registry::local::LocalRegistry;
use weft::registry::{LEASE_TTL, Registry, WatchItem};
use weft_core::lease::{Expiry, LeaseAttrs, SubnetKey};

fn open(dir: &Path) -> LocalRegistry {
    LocalRegistry::open(&dir.join("leases.db"), "/coreos.com/network", &dir.join("net-conf.json")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_acquisitions_get_fifty_distinct_subnets() {
    let dir = tempfile::tempdir().unwrap();
    scenarios::concurrent_acquisitions((0..50).map(|_| open(dir.path())).collect(), &open(dir.path())).await;
}

#[tokio::test]
async fn a_reservation_is_honoured_and_never_re_leased() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let admin = open(dir.path());
    scenarios::reservation_is_honoured(&reg, async |key: &SubnetKey, attrs: &LeaseAttrs| {
        admin.reserve(key, attrs).await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_follows_changes_and_skips_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let other = open(dir.path());
    scenarios::watch_follows_changes(Arc::new(open(dir.path())), async || {
        other.put_raw("not-a-subnet", "{}").await.unwrap();
        other.put_raw("10.5.77.0-24", "garbage").await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn leases_expire_and_a_compacted_history_asks_for_a_relist() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let key: SubnetKey = "10.5.3.0-24".parse().unwrap();
    // A TTL of seconds: the checks made while the lease must still be there have seconds of
    // margin on a busy machine, and the expiry is checked by order (not before the listed
    // time), not by how soon it came.
    let ttl = Duration::from_secs(3);
    let created = Instant::now();
    let before = SystemTime::now();
    assert!(reg.create(&key, &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 3)), ttl).await.unwrap());
    let after = SystemTime::now();
    assert!(
        !reg.create(&key, &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 4)), LEASE_TTL).await.unwrap(),
        "create-if-absent"
    );
    let first = reg.list().await.unwrap();
    assert!(created.elapsed() < ttl, "the checks above ran within the TTL: {:?}", created.elapsed());
    let expires = match first.leases[..] {
        [ref l] if l.key == key => match l.expiry {
            Expiry::At(t) => t,
            ref other => panic!("{other:?}"),
        },
        ref other => panic!("{other:?}"),
    };
    // Millisecond precision in the store.
    let ms = Duration::from_millis(1);
    assert!(expires + ms >= before + ttl && expires <= after + ttl + ms, "{expires:?} is not {ttl:?} after the create");
    let mut rx = reg.watch(first.revision + 1).await.unwrap();
    // The expiry shows up as a deletion in the watch, as etcd reports an expired lease.
    let changes = loop {
        match tokio::time::timeout(ttl + Duration::from_secs(15), rx.recv()).await.unwrap().unwrap() {
            WatchItem::Changes { changes, .. } => break changes,
            WatchItem::Progress => {}
            other => panic!("{other:?}"),
        }
    };
    assert!(SystemTime::now() >= expires, "deleted before its expiry time");
    assert!(matches!(changes.as_slice(), [weft::registry::Change::Delete(k)] if *k == key), "{changes:?}");
    assert!(reg.list().await.unwrap().leases.is_empty());
    let now = reg.list().await.unwrap().revision;
    reg.compact(now).await.unwrap();
    let mut rx = reg.watch(first.revision + 1).await.unwrap();
    assert!(matches!(rx.recv().await, Some(WatchItem::Compacted)));
}

#[tokio::test]
async fn renewal_refuses_a_subnet_held_by_another_host() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let key: SubnetKey = "10.5.3.0-24".parse().unwrap();
    let me = LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 3));
    assert!(reg.create(&key, &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 4)), LEASE_TTL).await.unwrap());
    let err = reg.renew(&key, &me, Some(LEASE_TTL)).await.unwrap_err();
    assert!(matches!(err, weft::registry::RegistryError::Lost(_)), "{err}");
    // A key that vanished (expired) is simply taken back by renewal.
    reg.delete(&key).await.unwrap();
    reg.renew(&key, &me, Some(LEASE_TTL)).await.unwrap();
    assert_eq!(reg.list().await.unwrap().leases[0].attrs, me);
}

/// Rows of a store file of the schema before create revisions (weft ≤ the first release).
const OLD_SCHEMA: &str = "
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('revision', 6), ('compacted', 0);
CREATE TABLE leases (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_ms INTEGER, mod_revision INTEGER NOT NULL);
CREATE TABLE changes (revision INTEGER PRIMARY KEY, key TEXT NOT NULL, value TEXT);
INSERT INTO changes VALUES
    (5, '/coreos.com/network/subnets/10.5.60.0-24', '{\"PublicIP\":\"192.0.2.60\",\"PublicIPv6\":null}'),
    (6, '/coreos.com/network/subnets/10.5.50.0-24', '{\"PublicIP\":\"192.0.2.50\",\"PublicIPv6\":null}');
INSERT INTO leases VALUES
    ('/coreos.com/network/subnets/10.5.60.0-24', '{\"PublicIP\":\"192.0.2.60\",\"PublicIPv6\":null}', NULL, 5),
    ('/coreos.com/network/subnets/10.5.50.0-24', '{\"PublicIP\":\"192.0.2.50\",\"PublicIPv6\":null}', NULL, 6);
";

fn revisions(leases: &[weft_core::lease::Lease]) -> Vec<(String, i64)> {
    leases.iter().map(|l| (l.key.to_string(), l.revision)).collect()
}

/// Collects watch puts as (key, create revision) until `n` arrived.
async fn watched_puts(rx: &mut tokio::sync::mpsc::Receiver<WatchItem>, n: usize) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap() {
            WatchItem::Changes { changes, .. } => out.extend(changes.into_iter().filter_map(|c| match c {
                weft::registry::Change::Put(l) => Some((l.key.to_string(), l.revision)),
                weft::registry::Change::Delete(_) => None,
            })),
            WatchItem::Progress => {}
            other => panic!("{other:?}"),
        }
    }
    out
}

#[tokio::test]
async fn a_key_keeps_its_create_revision_through_rewrites_in_list_and_watch() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let start = reg.list().await.unwrap().revision;
    let v = |ip: u8| format!(r#"{{"PublicIP":"192.0.2.{ip}","PublicIPv6":null}}"#);
    // The older key sorts last, so an order by key (or by last write) picks the wrong one.
    reg.put_raw("10.5.60.0-24", &v(60)).await.unwrap();
    reg.put_raw("10.5.50.0-24", &v(50)).await.unwrap();
    reg.put_raw("10.5.60.0-24", &v(61)).await.unwrap();
    let listed = revisions(&reg.list().await.unwrap().leases);
    assert_eq!(listed, [("10.5.50.0-24".to_string(), start + 2), ("10.5.60.0-24".to_string(), start + 1)]);
    let mut rx = reg.watch(start + 1).await.unwrap();
    let watched = watched_puts(&mut rx, 3).await;
    let expect: Vec<(String, i64)> =
        [("10.5.60.0-24", start + 1), ("10.5.50.0-24", start + 2), ("10.5.60.0-24", start + 1)]
            .iter()
            .map(|(k, r)| (k.to_string(), *r))
            .collect();
    assert_eq!(watched, expect, "a watched rewrite carries the create revision, not its own");
    // Deleted and written again: a new key, a new create revision (as in etcd).
    reg.delete(&"10.5.60.0-24".parse().unwrap()).await.unwrap();
    reg.put_raw("10.5.60.0-24", &v(60)).await.unwrap();
    let listed = revisions(&reg.list().await.unwrap().leases);
    assert_eq!(listed[1], ("10.5.60.0-24".to_string(), start + 5));
}

#[tokio::test]
async fn a_store_file_of_the_old_schema_opens_and_works() {
    let dir = tempfile::tempdir().unwrap();
    rusqlite::Connection::open(dir.path().join("leases.db")).unwrap().execute_batch(OLD_SCHEMA).unwrap();
    let reg = open(dir.path());
    // Old rows: their last revision stands in for the create revision.
    let listing = reg.list().await.unwrap();
    assert_eq!(listing.revision, 6);
    assert_eq!(revisions(&listing.leases), [("10.5.50.0-24".to_string(), 6), ("10.5.60.0-24".to_string(), 5)]);
    // Rewriting an old row keeps it; new keys get theirs; the old history still replays.
    let other = open(dir.path());
    other.put_raw("10.5.60.0-24", r#"{"PublicIP":"192.0.2.61","PublicIPv6":null}"#).await.unwrap();
    assert!(
        other
            .create(&"10.5.70.0-24".parse().unwrap(), &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 70)), LEASE_TTL)
            .await
            .unwrap()
    );
    let mut rx = reg.watch(5).await.unwrap();
    let watched = watched_puts(&mut rx, 4).await;
    let expect: Vec<(String, i64)> =
        [("10.5.60.0-24", 5), ("10.5.50.0-24", 6), ("10.5.60.0-24", 5), ("10.5.70.0-24", 8)]
            .iter()
            .map(|(k, r)| (k.to_string(), *r))
            .collect();
    assert_eq!(watched, expect);
    drop((reg, other));
    // Opening the migrated file again changes nothing.
    let again = open(dir.path());
    assert_eq!(
        revisions(&again.list().await.unwrap().leases),
        [("10.5.50.0-24".to_string(), 6), ("10.5.60.0-24".to_string(), 5), ("10.5.70.0-24".to_string(), 8)]
    );
}

/// The daemon's log lines that reject `key` as a peer (since byte `from` of the log).
fn rejections(log: &str, from: usize, key: &str) -> usize {
    log[from..].lines().filter(|l| l.contains("rejecting peer lease") && l.contains(&format!("peer={key}"))).count()
}

#[test]
fn of_two_conflicting_local_leases_the_older_wins_live_and_after_a_restart() {
    use common::cluster::{Daemon, PREFIX};
    use common::{wait_for, weft_bin};
    let prefix = common::prefix("fxl");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("net-conf.json"), r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#).unwrap();
    let lan = weft::lab::netns::Lan::new(&prefix, "192.0.2").unwrap();
    let host = lan.add_host(1).unwrap();
    let store = format!("--local-store={}", dir.join("leases.db").display());
    let conf = format!("--net-config-path={}", dir.join("net-conf.json").display());
    let sf = format!("--subnet-file={}", dir.join("h1.env").display());
    let args = ["--store=local", store.as_str(), conf.as_str(), sf.as_str(), "--healthz-port=8081"];
    let mut d = Daemon::start(&host, dir, &args);
    wait_for(Duration::from_secs(20), "subnet file", || std::fs::read_to_string(dir.join("h1.env")).ok());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin = LocalRegistry::open(&dir.join("leases.db"), PREFIX, &dir.join("net-conf.json")).unwrap();
    let put = |suffix: &str, ip: u8| {
        let v = format!(r#"{{"PublicIP":"192.0.2.{ip}","PublicIPv6":null}}"#);
        rt.block_on(admin.put_raw(suffix, &v)).unwrap()
    };
    // 10.5.60.0/24 first, then 10.5.50.0/24 claiming the same PublicIP. The older one sorts
    // last by key, and is rewritten after the younger one (its last write is the newest):
    // only its create revision says it is older. Other keys are written in between.
    put("10.5.60.0-24", 50);
    put("10.5.77.0-24", 77);
    put("10.5.50.0-24", 50);
    put("10.5.60.0-24", 50);
    put("10.5.77.0-24", 77);
    put("10.5.90.0-24", 90);
    // On a timeout, the daemon's log says where it stood (this wait failed once in a loaded
    // full run and never alone).
    let wait_marker = |from: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !d_log(dir, &host.name)[from..].contains("subnet=10.5.90.0-24") {
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon did not see the last key within 20 s; its log since offset {from}:\n{}",
                &d_log(dir, &host.name)[from..]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_marker(0);
    let log = d.log();
    assert!(rejections(&log, 0, "10.5.50.0-24") >= 1, "the younger lease is rejected:\n{log}");
    assert_eq!(rejections(&log, 0, "10.5.60.0-24"), 0, "the older lease is never rejected:\n{log}");
    // After a restart the listing alone must give the same answer.
    let from = log.len();
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success());
    let d = Daemon::start(&host, dir, &args);
    wait_marker(from);
    let log = d.log();
    assert_eq!(rejections(&log, from, "10.5.50.0-24"), 1, "the younger lease is rejected:\n{}", &log[from..]);
    assert_eq!(rejections(&log, from, "10.5.60.0-24"), 0, "the older lease wins:\n{}", &log[from..]);
    let table =
        std::process::Command::new(weft_bin()).args(["leases", "--store=local", &store, &conf]).output().unwrap();
    assert!(table.status.success(), "weft leases: {}", String::from_utf8_lossy(&table.stderr));
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    // A missing row fails: an empty one would contain no "rejected".
    let row =
        |k: &str| table.lines().find(|l| l.starts_with(k)).unwrap_or_else(|| panic!("no {k} in {table}")).to_string();
    assert!(row("10.5.50.0/24").contains("rejected (conflict)"), "{table}");
    assert!(!row("10.5.60.0/24").contains("rejected"), "{table}");
}

fn d_log(dir: &Path, host: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{host}.log"))).unwrap_or_default()
}
