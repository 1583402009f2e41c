//! Acquisition and watch scenarios that every registry must pass, run against etcd and the
//! local store alike.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use weft::metrics::Metrics;
use weft::registry::acquire::{AcquireFailed, acquire};
use weft::registry::watch::{self, WatchEvent};
use weft::registry::{LEASE_TTL, Registry};
use weft_core::cache::LeaseEvent;
use weft_core::config::NetworkConfig;
use weft_core::lease::{Expiry, LeaseAttrs, SubnetKey};
use weft_core::validate::Rules;

/// A /16 with the default /24 subnets: 254 to hand out.
pub fn wide_config() -> NetworkConfig {
    NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#).unwrap()
}

/// Hosts acquire at the same moment, each through its own client in `clients`: all succeed,
/// all subnets differ, and the store (seen through `lister`) holds exactly those leases
/// with the right owners.
pub async fn concurrent_acquisitions<R: Registry>(clients: Vec<R>, lister: &R) {
    let cfg = wide_config();
    let n = clients.len();
    let mut tasks = Vec::new();
    for (i, reg) in (1..).zip(clients) {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let attrs = LeaseAttrs::new(Ipv4Addr::new(198, 51, 100, i));
            acquire(&reg, &cfg, &attrs, None, LEASE_TTL).await.map(|a| (i, a.lease.key))
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap().expect("every concurrent acquisition succeeds"));
    }
    let keys: BTreeSet<SubnetKey> = got.iter().map(|(_, k)| *k).collect();
    assert_eq!(keys.len(), n, "{n} acquisitions gave {} distinct subnets: {got:?}", keys.len());
    let listing = lister.list().await.unwrap();
    assert_eq!(listing.leases.len(), n);
    for (i, key) in got {
        let l = listing.leases.iter().find(|l| l.key == key).unwrap();
        assert_eq!(l.attrs.public_ip, Ipv4Addr::new(198, 51, 100, i), "lease {key} belongs to its acquirer");
    }
}

/// A tiny range (three /30s). `reserve` writes a reservation (no expiry) of the first one
/// for 203.0.113.1. Others get the remaining two, a fourth host finds nothing, and the
/// reservation's owner gets its subnet, which stays a reservation.
pub async fn reservation_is_honoured<R: Registry>(reg: &R, reserve: impl AsyncFnOnce(&SubnetKey, &LeaseAttrs)) {
    let cfg = NetworkConfig::parse(r#"{"Network":"10.9.0.0/28","Backend":{"Type":"alloc"}}"#).unwrap();
    let reserved: SubnetKey = "10.9.0.4-30".parse().unwrap();
    let owner = LeaseAttrs::new(Ipv4Addr::new(203, 0, 113, 1));
    reserve(&reserved, &owner).await;
    let mut others = BTreeSet::new();
    for i in 2..=3 {
        let a = acquire(reg, &cfg, &LeaseAttrs::new(Ipv4Addr::new(203, 0, 113, i)), Some(reserved), LEASE_TTL)
            .await
            .unwrap();
        assert_ne!(a.lease.key, reserved, "a reservation is never given to another host, even as its previous subnet");
        others.insert(a.lease.key.to_string());
    }
    assert_eq!(others, BTreeSet::from(["10.9.0.8-30".to_string(), "10.9.0.12-30".to_string()]));
    let full = acquire(reg, &cfg, &LeaseAttrs::new(Ipv4Addr::new(203, 0, 113, 4)), None, LEASE_TTL).await;
    assert!(matches!(full, Err(AcquireFailed::Plan(_))), "{full:?}");
    let mine = acquire(reg, &cfg, &owner, None, LEASE_TTL).await.unwrap();
    assert_eq!(mine.lease.key, reserved);
    let listing = reg.list().await.unwrap();
    let l = listing.leases.iter().find(|l| l.key == reserved).unwrap();
    assert_eq!(l.expiry, Expiry::Reservation, "still a reservation after its owner took it");
}

/// Starts the lease watch for the host holding `own` in the network of `cfg` and returns
/// its event channel (peer leases are validated against `cfg` as a daemon's are).
pub fn start_watch<R: Registry>(
    reg: Arc<R>,
    cfg: &NetworkConfig,
    own: SubnetKey,
) -> (mpsc::Receiver<WatchEvent>, Arc<Metrics>) {
    let (tx, rx) = mpsc::channel(64);
    let metrics = Arc::new(Metrics::new());
    let cache = watch::SharedLeaseCache::for_host(Rules::from_config(cfg), own);
    tokio::spawn(watch::run(reg, cache, tx, metrics.clone()));
    (rx, metrics)
}

/// Collects peer events until `want` of them arrived (or 20 s pass); own-lease events are
/// returned separately.
pub async fn collect(rx: &mut mpsc::Receiver<WatchEvent>, want: usize) -> (Vec<LeaseEvent>, Vec<String>) {
    let mut peers = Vec::new();
    let mut own = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while peers.len() < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(WatchEvent::Peers(e))) => peers.extend(e),
            Ok(Some(WatchEvent::OwnGone)) => own.push("gone".to_string()),
            Ok(Some(WatchEvent::OwnWritten(_))) => own.push("written".to_string()),
            Ok(Some(WatchEvent::Synced)) => {}
            Ok(None) => panic!("watch ended"),
            Err(_) => panic!("timed out with {peers:?}, wanted {want} events"),
        }
    }
    (peers, own)
}

/// Describes events compactly: "+10.5.1.0-24", "-10.5.2.0-24".
pub fn describe(events: &[LeaseEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            LeaseEvent::Added(l) => format!("+{}", l.key),
            LeaseEvent::Removed(l) => format!("-{}", l.key),
        })
        .collect()
}

/// The watch reports existing peers, new ones, changed ones, deleted ones, and the deletion
/// of our own lease; garbage written by another host is skipped without stopping it.
pub async fn watch_follows_changes<R: Registry>(reg: Arc<R>, garbage: impl AsyncFnOnce()) {
    let cfg = wide_config();
    let me =
        acquire(&*reg, &cfg, &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 1)), None, LEASE_TTL).await.unwrap().lease.key;
    let a: SubnetKey = "10.5.200.0-24".parse().unwrap();
    let b: SubnetKey = "10.5.201.0-24".parse().unwrap();
    assert!(reg.create(&a, &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 2)), LEASE_TTL).await.unwrap());
    let (mut rx, _) = start_watch(reg.clone(), &cfg, me);
    let (ev, _) = collect(&mut rx, 1).await;
    assert_eq!(describe(&ev), ["+10.5.200.0-24"], "the initial list announces existing peers, not ourselves");
    garbage().await;
    assert!(reg.create(&b, &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 3)), LEASE_TTL).await.unwrap());
    reg.delete(&a).await.unwrap();
    let (ev, _) = collect(&mut rx, 2).await;
    assert_eq!(describe(&ev), ["+10.5.201.0-24", "-10.5.200.0-24"]);
    reg.delete(&me).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await.expect("own deletion is reported") {
            Some(WatchEvent::OwnGone) => break,
            Some(_) => continue,
            None => panic!("watch ended"),
        }
    }
}
