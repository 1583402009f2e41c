//! The resumable lease watch: list, then watch from the next revision; on a broken
//! connection resume from the last revision seen; after compaction re-list and emit the
//! difference. The same for every registry.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use weft_core::cache::{LeaseCache, LeaseEvent};
use weft_core::lease::{Lease, SubnetKey};

use super::{Change, Registry, WatchItem};
use crate::daemon::metrics::Metrics;

/// What the watch tells the daemon.
#[derive(Debug)]
pub enum WatchEvent {
    /// Peer leases changed.
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

/// Watches all leases until `tx` is closed.
pub async fn run<R: Registry>(reg: Arc<R>, own: SubnetKey, tx: mpsc::Sender<WatchEvent>, metrics: Arc<Metrics>) {
    let mut cache = LeaseCache::new(Some(own));
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
        let own_present = listing.leases.iter().any(|l| l.key == own);
        let events = cache.replace_all(listing.leases);
        if !events.is_empty() && tx.send(WatchEvent::Peers(events)).await.is_err() {
            return;
        }
        metrics.peers.set(cache.len() as i64);
        if tx.send(WatchEvent::Synced).await.is_err() {
            return;
        }
        if !own_present && tx.send(WatchEvent::OwnGone).await.is_err() {
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
                    WatchItem::Changes { revision: r, changes } => {
                        backoff = BACKOFF_MIN;
                        revision = r;
                        let mut events = Vec::new();
                        for c in changes {
                            match c {
                                Change::Put(l) if l.key == own => {
                                    if tx.send(WatchEvent::OwnWritten(l)).await.is_err() {
                                        return;
                                    }
                                }
                                Change::Put(l) => events.extend(cache.put(l)),
                                Change::Delete(k) if k == own => {
                                    if tx.send(WatchEvent::OwnGone).await.is_err() {
                                        return;
                                    }
                                }
                                Change::Delete(k) => events.extend(cache.delete(&k)),
                            }
                        }
                        metrics.peers.set(cache.len() as i64);
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
