//! The resumable lease watch: list, then watch from the next revision; on a broken
//! connection resume from the last revision seen; after compaction re-list and emit the
//! difference. The same for every registry. Every lease goes into the one [`LeaseCache`],
//! which validates it; only changes to the accepted peer set go on to the daemon.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use weft_core::cache::{LeaseCache, LeaseEvent, Outcome};
use weft_core::lease::{Lease, LeaseAttrs, SubnetKey};
use weft_core::validate::Rules;

use super::{Change, Registry, WatchItem, same_holder};
use crate::metrics::Metrics;

/// The one peer set of a host: written by the lease watch, read by the data plane when it
/// plans. Never held across an `.await`.
#[derive(Debug, Clone)]
pub struct SharedLeaseCache {
    inner: Arc<RwLock<LeaseCache>>,
    own: SubnetKey,
}

impl SharedLeaseCache {
    /// An empty cache for the host holding `own`, judging peer leases by `rules`.
    pub fn for_host(mut rules: Rules, own: SubnetKey) -> Self {
        rules.own = Some(own);
        SharedLeaseCache { inner: Arc::new(RwLock::new(LeaseCache::new(rules))), own }
    }

    /// Our own lease.
    pub fn own(&self) -> SubnetKey {
        self.own
    }

    /// Reads the cache (a poisoned lock still holds a consistent cache: every write is one
    /// call of a pure method).
    pub fn read(&self) -> RwLockReadGuard<'_, LeaseCache> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, LeaseCache> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Logs and counts the leases a change rejected, updates the peer gauge, and hands back
/// the changes to the accepted set.
fn absorb(outcome: Outcome, cache: &SharedLeaseCache, metrics: &Metrics) -> Vec<LeaseEvent> {
    for (key, why) in &outcome.rejected {
        tracing::warn!(peer = %key, reason = why.label(), "rejecting peer lease: {why}");
        metrics.leases_rejected.get_or_create(&vec![("reason", why.label())]).inc();
    }
    metrics.peers.set(cache.read().len() as i64);
    outcome.events
}

/// What the watch tells the daemon.
#[derive(Debug)]
pub enum WatchEvent {
    /// The accepted peer set changed (already applied to the shared cache).
    Peers(Vec<LeaseEvent>),
    /// Our own lease was written (by our renewal, or by someone else).
    OwnWritten(Lease),
    /// Our own lease is gone from the store.
    OwnGone,
    /// A full list was just applied: the peer set is complete (sent after every list, so
    /// a data plane never acts on a partial view, e.g. right after a restart).
    Synced,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Watches all leases into `cache` until `tx` is closed; our own lease is the cache's.
pub async fn run<R: Registry>(
    reg: Arc<R>,
    cache: SharedLeaseCache,
    tx: mpsc::Sender<WatchEvent>,
    metrics: Arc<Metrics>,
) {
    run_as(reg, None, cache, tx, metrics).await
}

/// [`run`], for the holder `identity`: a listing that finds our key held by another host
/// reports it (as `OwnWritten` with the other holder), not only a key that is gone. Every
/// answer of the store marks progress in `metrics` (for `/healthz`).
pub async fn run_as<R: Registry>(
    reg: Arc<R>,
    identity: Option<LeaseAttrs>,
    cache: SharedLeaseCache,
    tx: mpsc::Sender<WatchEvent>,
    metrics: Arc<Metrics>,
) {
    let own = cache.own();
    let mut backoff = BACKOFF_MIN;
    let sleep_backoff = async |backoff: &mut Duration| {
        metrics.store_reconnects.inc();
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
    };
    'relist: loop {
        let listing = match reg.list().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("listing leases failed, retrying in {backoff:?}: {e}");
                sleep_backoff(&mut backoff).await;
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        metrics.store_progress();
        let own_lease = listing.leases.iter().find(|l| l.key == own).cloned();
        let own_present = own_lease.is_some();
        let foreign = own_lease.filter(|l| identity.as_ref().is_some_and(|me| !same_holder(me, &l.attrs)));
        let outcome = cache.write().replace_all(listing.leases);
        let events = absorb(outcome, &cache, &metrics);
        if !events.is_empty() && tx.send(WatchEvent::Peers(events)).await.is_err() {
            return;
        }
        if tx.send(WatchEvent::Synced).await.is_err() {
            return;
        }
        if !own_present && tx.send(WatchEvent::OwnGone).await.is_err() {
            return;
        }
        if let Some(l) = foreign
            && tx.send(WatchEvent::OwnWritten(l)).await.is_err()
        {
            return;
        }
        let mut revision = listing.revision;
        loop {
            let mut rx = match reg.watch(revision + 1).await {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::warn!("starting the lease watch failed, retrying in {backoff:?}: {e}");
                    sleep_backoff(&mut backoff).await;
                    continue;
                }
            };
            while let Some(item) = rx.recv().await {
                match item {
                    WatchItem::Progress => {
                        backoff = BACKOFF_MIN;
                        metrics.store_progress();
                    }
                    WatchItem::Changes { revision: r, changes } => {
                        backoff = BACKOFF_MIN;
                        metrics.store_progress();
                        revision = r;
                        let mut events = Vec::new();
                        for c in changes {
                            match c {
                                Change::Put(l) if l.key == own => {
                                    if tx.send(WatchEvent::OwnWritten(l)).await.is_err() {
                                        return;
                                    }
                                }
                                Change::Put(l) => {
                                    let outcome = cache.write().put(l);
                                    events.extend(absorb(outcome, &cache, &metrics));
                                }
                                Change::Delete(k) if k == own => {
                                    if tx.send(WatchEvent::OwnGone).await.is_err() {
                                        return;
                                    }
                                }
                                Change::Delete(k) => {
                                    let outcome = cache.write().delete(&k);
                                    events.extend(absorb(outcome, &cache, &metrics));
                                }
                            }
                        }
                        if !events.is_empty() && tx.send(WatchEvent::Peers(events)).await.is_err() {
                            return;
                        }
                    }
                    WatchItem::Compacted => {
                        tracing::info!(revision, "the store compacted past our revision; re-listing leases");
                        metrics.store_relists.inc();
                        continue 'relist;
                    }
                    WatchItem::Broken(e) => {
                        tracing::warn!(revision, "lease watch broken, resuming in {backoff:?}: {e}");
                        break;
                    }
                }
            }
            if tx.is_closed() {
                return;
            }
            sleep_backoff(&mut backoff).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Mutex;
    use std::time::Duration;

    use weft_core::lease::{Expiry, LeaseAttrs};

    use super::*;
    use crate::registry::{Listing, RegistryError};

    /// A store whose watches deliver scripted items, recording where each watch started.
    struct Fake {
        listing: Vec<Lease>,
        scripts: Mutex<Vec<Vec<WatchItem>>>,
        starts: Mutex<Vec<i64>>,
    }

    fn lease(k: &str, ip: u8) -> Lease {
        Lease {
            key: k.parse().unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, ip)),
            expiry: Expiry::Unknown,
            revision: 0,
        }
    }

    fn cache(own: SubnetKey) -> SharedLeaseCache {
        let rules = Rules { v4: Some(("10.5.0.0/16".parse().unwrap(), 24)), ..Rules::default() };
        SharedLeaseCache::for_host(rules, own)
    }

    impl Registry for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        async fn network_config(&self) -> Result<String, RegistryError> {
            Ok(String::new())
        }
        async fn list(&self) -> Result<Listing, RegistryError> {
            Ok(Listing { leases: self.listing.clone(), revision: 10 })
        }
        async fn create(&self, _: &SubnetKey, _: &LeaseAttrs, _: Duration) -> Result<bool, RegistryError> {
            Ok(false)
        }
        async fn renew(&self, _: &SubnetKey, _: &LeaseAttrs, _: Option<Duration>) -> Result<(), RegistryError> {
            Ok(())
        }
        async fn delete(&self, _: &SubnetKey) -> Result<(), RegistryError> {
            Ok(())
        }
        async fn watch(&self, from: i64) -> Result<mpsc::Receiver<WatchItem>, RegistryError> {
            self.starts.lock().unwrap().push(from);
            let (tx, rx) = mpsc::channel(16);
            let script = {
                let mut s = self.scripts.lock().unwrap();
                if s.is_empty() { Vec::new() } else { s.remove(0) }
            };
            tokio::spawn(async move {
                for item in script {
                    let _ = tx.send(item).await;
                }
                // Then silence, as a healthy watch without changes.
                tx.closed().await;
            });
            Ok(rx)
        }
        async fn resolve_expiry(&self, _: &mut [Lease]) -> Result<(), RegistryError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_watch_broken_mid_catch_up_resumes_after_the_last_delivered_event() {
        let own = lease("10.5.1.0-24", 1);
        let a = lease("10.5.2.0-24", 2);
        let b = lease("10.5.3.0-24", 3);
        let fake = Arc::new(Fake {
            listing: vec![own.clone()],
            scripts: Mutex::new(vec![
                // Catch-up, part one (events up to 12), then the member dies.
                vec![
                    WatchItem::Changes { revision: 12, changes: vec![Change::Put(a.clone()), Change::Put(b.clone())] },
                    WatchItem::Broken("h2 protocol error".into()),
                ],
                // The rest of the history, from another member.
                vec![WatchItem::Changes { revision: 13, changes: vec![Change::Delete(a.key)] }],
            ]),
            starts: Mutex::new(Vec::new()),
        });
        let (tx, mut rx) = mpsc::channel(16);
        let metrics = Arc::new(Metrics::new());
        let task = tokio::spawn(run_as(fake.clone(), Some(own.attrs.clone()), cache(own.key), tx, metrics.clone()));
        let mut seen = Vec::new();
        while seen.len() < 3 {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap() {
                WatchEvent::Peers(evs) => seen.extend(evs.into_iter().map(|e| match e {
                    LeaseEvent::Added(l) => format!("+{}", l.key),
                    LeaseEvent::Removed(l) => format!("-{}", l.key),
                })),
                WatchEvent::Synced | WatchEvent::OwnWritten(_) => {}
                WatchEvent::OwnGone => panic!("our lease is in the listing"),
            }
        }
        assert_eq!(seen, ["+10.5.2.0-24", "+10.5.3.0-24", "-10.5.2.0-24"]);
        assert_eq!(*fake.starts.lock().unwrap(), [11, 13], "resumed after revision 12, the last one delivered");
        assert!(metrics.store_progress_age().is_some());
        task.abort();
    }

    #[tokio::test]
    async fn a_listing_that_finds_our_key_held_by_another_host_says_so() {
        let own = lease("10.5.1.0-24", 1);
        let usurper = Lease { attrs: LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 99)), ..own.clone() };
        let fake =
            Arc::new(Fake { listing: vec![usurper], scripts: Mutex::new(Vec::new()), starts: Mutex::new(Vec::new()) });
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(run_as(fake, Some(own.attrs.clone()), cache(own.key), tx, Arc::new(Metrics::new())));
        loop {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap() {
                WatchEvent::OwnWritten(l) => {
                    assert_eq!(l.attrs.public_ip, Ipv4Addr::new(192, 0, 2, 99));
                    break;
                }
                WatchEvent::OwnGone => panic!("the key exists; it is held by another host"),
                _ => {}
            }
        }
        task.abort();
    }
}
