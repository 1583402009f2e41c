//! The embedded local store: the same scenarios as etcd, through separate connections to one
//! file (as separate daemons on one machine use it).

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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
    assert!(reg.create(&key, &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 3)), Duration::from_millis(300)).await.unwrap());
    assert!(
        !reg.create(&key, &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 4)), LEASE_TTL).await.unwrap(),
        "create-if-absent"
    );
    let first = reg.list().await.unwrap();
    assert!(matches!(first.leases[0].expiry, Expiry::At(_)));
    let mut rx = reg.watch(first.revision + 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The expiry shows up as a deletion in the watch, as etcd reports an expired lease.
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap() {
        WatchItem::Changes { changes, .. } => {
            assert!(matches!(changes.as_slice(), [weft::registry::Change::Delete(k)] if *k == key))
        }
        other => panic!("{other:?}"),
    }
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
