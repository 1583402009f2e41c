//! The effects of the daemon's main loop: the loop turns what happens into scheduler events
//! ([`weft_core::schedule`]) and carries out the actions the scheduler returns, each in one
//! small function here.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, watch};
use tokio::task::{JoinError, JoinHandle};
use weft_core::cache::LeaseEvent;
use weft_core::lease::{LeaseAttrs, SubnetKey};
use weft_core::schedule::{Action, Event, ExitReason, LeaseTerm, Renewal, Scheduler};

use crate::backend::DataPlane;
use crate::metrics::Metrics;
use crate::registry::watch::WatchEvent;
use crate::registry::{Registry, RegistryError, same_holder};

/// What a renewal task hands back: when it started (wall and monotonic clock) and the
/// store's answer.
pub(super) type RenewOutcome = (SystemTime, Instant, Result<(), RegistryError>);

/// The daemon once its lease is taken: what the scheduler's actions act on.
pub(super) struct Running<R: Registry> {
    pub reg: Arc<R>,
    pub own: SubnetKey,
    pub attrs: LeaseAttrs,
    pub ttl: Duration,
    pub dataplane: DataPlane,
    pub metrics: Arc<Metrics>,
    pub ready: watch::Sender<bool>,
    /// The renewal running beside the loop (a slow store never holds up peer events).
    pub renewing: Option<JoinHandle<RenewOutcome>>,
    /// The host that wrote our lease, for the exit line.
    pub overwritten_by: Option<Ipv4Addr>,
    /// Wakes the firewall's resync task on every reconcile pass (it runs apart, so a hung
    /// iptables never stalls this loop, but on the same triggers).
    pub firewall_kick: Arc<Notify>,
    /// A renewal's outcome to log once the scheduler has planned what follows it.
    pub renew_report: Option<Result<(), RegistryError>>,
}

impl<R: Registry> Running<R> {
    /// Hands `event` to the scheduler and carries out its actions (and those that their
    /// outcomes bring) in order. `true`: the daemon must stop.
    pub async fn feed(&mut self, sched: &mut Scheduler, event: Event) -> bool {
        let mut events = VecDeque::from([event]);
        while let Some(event) = events.pop_front() {
            for action in sched.on(Instant::now(), event) {
                match action {
                    Action::SetReady(ready) => self.set_ready(ready),
                    Action::Reconcile => events.push_back(self.reconcile().await),
                    Action::Renew => self.start_renewal(),
                    Action::Exit(reason) => {
                        self.log_exit(reason);
                        return true;
                    }
                }
            }
        }
        self.log_renewal(sched);
        false
    }

    /// Waits for the running renewal (never resolves without one).
    pub async fn renewal(&mut self) -> Result<RenewOutcome, JoinError> {
        match self.renewing.as_mut() {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    }

    /// The scheduler's event for a renewal that ended.
    pub fn renewal_done(&mut self, done: Result<RenewOutcome, JoinError>) -> Event {
        self.renewing = None;
        let (wall, started, outcome) = done.unwrap_or_else(|e| {
            (
                SystemTime::now(),
                Instant::now(),
                Err(RegistryError::Unavailable { store: "renewal", detail: e.to_string() }),
            )
        });
        match outcome {
            Ok(()) => {
                self.set_expiry_metric(wall + self.ttl);
                self.renew_report = Some(Ok(()));
                let term = started.checked_add(self.ttl).map_or(LeaseTerm::Never, LeaseTerm::Expires);
                Event::RenewDone(Renewal::Renewed(term))
            }
            Err(RegistryError::Lost(_)) => Event::RenewDone(Renewal::Lost),
            Err(e) => {
                self.metrics.error("renew");
                self.renew_report = Some(Err(e));
                Event::RenewDone(Renewal::Failed)
            }
        }
    }

    /// The scheduler's event for what the lease watch reports (`None`: it ended).
    pub fn watched(&mut self, ev: Option<WatchEvent>) -> Event {
        match ev {
            None => Event::WatchEnded,
            Some(WatchEvent::OwnGone) => Event::OwnGone,
            Some(WatchEvent::OwnWritten(l)) if !same_holder(&self.attrs, &l.attrs) => {
                self.overwritten_by = Some(l.attrs.public_ip);
                Event::OwnOverwritten
            }
            Some(WatchEvent::OwnWritten(_)) => Event::Tick,
            Some(WatchEvent::Synced) => Event::Synced,
            Some(WatchEvent::Peers(events)) => {
                self.peers_changed(&events);
                Event::PeersChanged
            }
        }
    }

    /// Sets the `weft_lease_expiry_timestamp_seconds` gauge.
    pub fn set_expiry_metric(&self, expiry: SystemTime) {
        self.metrics.lease_expiry.set(expiry.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0));
    }

    fn peers_changed(&mut self, events: &[LeaseEvent]) {
        self.dataplane.peers_changed(events);
        for e in events {
            let (kind, lease) = match e {
                LeaseEvent::Added(l) => ("added", l),
                LeaseEvent::Removed(l) => ("removed", l),
            };
            self.metrics.lease_events.get_or_create(&vec![("type", kind)]).inc();
            tracing::info!(subnet = %lease.key, public_ip = %lease.attrs.public_ip, "peer lease {kind}");
        }
    }

    fn set_ready(&self, ready: bool) {
        let _ = self.ready.send(ready);
        self.metrics.ready.set(i64::from(ready));
    }

    /// One reconcile pass of the data plane.
    async fn reconcile(&mut self) -> Event {
        let started = Instant::now();
        self.firewall_kick.notify_one();
        let report = self.dataplane.reconcile().await;
        self.metrics.reconciles.inc();
        self.metrics.kernel_changes.inc_by(report.changes as u64);
        self.metrics.reconcile_ms.set(started.elapsed().as_millis() as i64);
        for e in &report.errors {
            self.metrics.error("netlink");
            tracing::warn!("kernel change failed (retrying on the next pass): {e}");
        }
        Event::ReconcileDone { errors: !report.errors.is_empty() }
    }

    fn start_renewal(&mut self) {
        let (reg, attrs, own, ttl) = (self.reg.clone(), self.attrs.clone(), self.own, self.ttl);
        let (wall, started) = (SystemTime::now(), Instant::now());
        self.renewing = Some(tokio::spawn(async move { (wall, started, reg.renew(&own, &attrs, Some(ttl)).await) }));
    }

    fn log_renewal(&mut self, sched: &Scheduler) {
        match self.renew_report.take() {
            Some(Ok(())) => tracing::info!(subnet = %self.own, "renewed lease"),
            Some(Err(e)) => {
                // The real expiry stays what it is; the retry comes well before it.
                let wait = sched.next_renewal().map_or(Duration::ZERO, |t| t.saturating_duration_since(Instant::now()));
                tracing::warn!("renewing the lease failed, retrying in {wait:?}: {e}");
            }
            None => {}
        }
    }

    fn log_exit(&self, reason: ExitReason) {
        let own = &self.own;
        match reason {
            // The signal handler has said so.
            ExitReason::Shutdown => {}
            // The watch task ends only when it cannot go on (a panic).
            ExitReason::WatchEnded => tracing::error!("the lease watch stopped; shutting down"),
            ExitReason::LeaseRevoked => tracing::warn!(subnet = %own, "Lease has been revoked. Shutting down daemon."),
            ExitReason::LeaseOverwritten => {
                let holder = self.overwritten_by.map(|ip| ip.to_string()).unwrap_or_default();
                tracing::warn!(subnet = %own, %holder, "our lease was overwritten by another host. Shutting down daemon.")
            }
            ExitReason::LeaseLost => {
                tracing::error!(subnet = %own, "our subnet is held by another host now; shutting down rather than share it")
            }
            // Renewal kept failing until the lease ran out: the store may have given our
            // subnet to another host by now. Never share it.
            ExitReason::LeaseExpired => tracing::error!(
                subnet = %own,
                "our lease expired while the store could not be reached; shutting down rather than risk sharing the subnet with another host"
            ),
        }
    }
}
