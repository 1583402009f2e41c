//! The daemon's scheduling as a pure state machine: events in, actions and the next deadline
//! out.
//!
//! The daemon loop owns the effects (a reconcile pass, a lease renewal, readiness, exit); this
//! module decides when each one is due. The loop sleeps until [`Scheduler::next_deadline`] or
//! until something happens, tells the scheduler with [`Scheduler::on`], carries out the
//! returned [`Action`]s in order and reports each outcome back as an event. Time is passed in;
//! nothing here reads a clock. Everything the data plane keeps in the kernel (routes, devices,
//! neighbours, the blackhole routes of `--ip-blackhole-route`) is its desired state, put back
//! by a reconcile pass, so a pass is the only kernel effect scheduled here.
//!
//! The rules it keeps:
//! - no reconcile pass before the first full list of peers ([`Event::Synced`]): an empty view
//!   would tear down every route of a restarted daemon;
//! - a peer change asks for a pass at once; kernel notifications are coalesced: a burst gives
//!   one pass, `debounce` after the first of them;
//! - one pass at a time; what arrives during a pass is served by one pass after it;
//! - a pass with errors is retried after `error_retry`, and kernel notifications (often caused
//!   by the failed pass itself) do not bring that retry forward;
//! - the kernel is compared with the plan at least every `resync` after the last pass; before
//!   the first list the loop still wakes every `resync`, so a health check sees it alive;
//! - the lease is renewed `renew_margin` before it expires (at once if that is already past);
//!   a failed renewal is retried after a tenth of the time left, within
//!   [`RENEW_RETRY_MIN`]..[`RENEW_RETRY_MAX`]; a reservation is never renewed;
//! - a lease that expires without a successful renewal ends the daemon: the store may give
//!   the subnet to another host, and two hosts must never share one;
//! - ready once started with a live lease; not ready once exiting;
//! - shutdown, our lease revoked, overwritten, lost or expired, or the end of the watch: exit.

use std::time::{Duration, Instant, SystemTime};

use crate::lease::Expiry;

/// How often the kernel is compared with the plan even when nothing was noticed.
pub const RESYNC: Duration = Duration::from_secs(10);
/// How long a burst of kernel notifications is collected before one pass serves it.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// When a pass that had errors is tried again.
pub const ERROR_RETRY: Duration = Duration::from_secs(1);
/// The shortest wait before a failed lease renewal is tried again.
pub const RENEW_RETRY_MIN: Duration = Duration::from_millis(500);
/// The longest wait before a failed lease renewal is tried again.
pub const RENEW_RETRY_MAX: Duration = Duration::from_secs(60);
/// How long a due deadline may go unserved, or an action run, before the loop counts as stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(60);
/// The shortest period the scheduler accepts; shorter settings are raised to it, so that no
/// setting can turn the loop into a busy loop.
pub const MIN_PERIOD: Duration = Duration::from_millis(10);

/// When a failed renewal is tried again, with `left` until the lease expires: a tenth of it
/// (several tries before the expiry), within [`RENEW_RETRY_MIN`]..[`RENEW_RETRY_MAX`].
pub fn renew_retry_after(left: Duration) -> Duration {
    (left / 10).clamp(RENEW_RETRY_MIN, RENEW_RETRY_MAX)
}

/// The scheduler's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The periodic reconcile pass, counted from the end of the last pass.
    pub resync: Duration,
    /// How long before its expiry the lease is renewed.
    pub renew_margin: Duration,
    /// How long kernel notifications are coalesced before a pass.
    pub debounce: Duration,
    /// When a pass with errors is tried again.
    pub error_retry: Duration,
    /// See [`Progress::stalled`].
    pub stall_after: Duration,
}

impl Config {
    /// The daemon's settings: the configured renewal margin (at most half the lease's
    /// `lease_ttl`: a larger one, possible with a short test lease, would renew without
    /// pause), and the module's constants for the rest.
    pub fn new(renew_margin: Duration, lease_ttl: Duration) -> Self {
        Config {
            resync: RESYNC,
            renew_margin: renew_margin.min(lease_ttl / 2),
            debounce: DEBOUNCE,
            error_retry: ERROR_RETRY,
            stall_after: STALL_AFTER,
        }
    }
}

/// How long our lease lives, on the caller's monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseTerm {
    /// Expires at this instant; renewed `renew_margin` before it.
    Expires(Instant),
    /// Never expires (a reservation, or a lease whose expiry is not known): never renewed.
    Never,
}

impl LeaseTerm {
    /// The term of a lease with `expiry` (wall clock), read at `wall_now` / `now` (the same
    /// moment on the wall and the monotonic clock). An expiry in the past is due now; one
    /// too far ahead to represent never comes.
    pub fn from_expiry(expiry: Expiry, wall_now: SystemTime, now: Instant) -> Self {
        match expiry {
            Expiry::At(t) => {
                let left = t.duration_since(wall_now).unwrap_or(Duration::ZERO);
                now.checked_add(left).map_or(LeaseTerm::Never, LeaseTerm::Expires)
            }
            Expiry::Reservation | Expiry::Unknown => LeaseTerm::Never,
        }
    }
}

/// The outcome of a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed; the lease now lives this long.
    Renewed(LeaseTerm),
    /// The subnet is held by another host now.
    Lost,
    /// The store did not renew it (unreachable, timeout, …).
    Failed,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Startup is done (lease taken, subnet file written); the loop begins.
    Started {
        /// The term of the lease just acquired.
        lease: LeaseTerm,
    },
    /// The watch applied a full list of peers: the peer set is complete.
    Synced,
    /// Peer leases changed (already applied to the data plane's view).
    PeersChanged,
    /// The kernel reported a change that may need repair.
    KernelChanged,
    /// Nothing happened; the loop woke for [`Scheduler::next_deadline`].
    Tick,
    /// A reconcile pass ended.
    ReconcileDone {
        /// Some kernel change failed.
        errors: bool,
    },
    /// A renewal ended.
    RenewDone(Renewal),
    /// Our lease was deleted or expired in the store.
    OwnGone,
    /// Our lease was written by another host.
    OwnOverwritten,
    /// The watch stopped for good.
    WatchEnded,
    /// SIGINT or SIGTERM.
    Shutdown,
}

/// Why the daemon stops (all of them clean exits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// A signal.
    Shutdown,
    /// Our lease was deleted or expired in the store.
    LeaseRevoked,
    /// Another host wrote our lease.
    LeaseOverwritten,
    /// A renewal found our subnet held by another host.
    LeaseLost,
    /// Our lease ran out while renewals kept failing.
    LeaseExpired,
    /// The watch stopped for good.
    WatchEnded,
}

/// What the loop must do, in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Report readiness (`/readyz`, the `ready` metric).
    SetReady(bool),
    /// Run one reconcile pass, then report [`Event::ReconcileDone`].
    Reconcile,
    /// Start renewing our lease, and report [`Event::RenewDone`] when it ends.
    Renew,
    /// Stop the daemon; nothing follows.
    Exit(ExitReason),
}

/// An action that takes time, as [`Progress`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// A reconcile pass.
    Reconcile,
    /// A lease renewal.
    Renew,
}

/// Why the loop counts as stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// A deadline came at `since` and the loop has not served it.
    Overdue {
        /// The deadline.
        since: Instant,
    },
    /// An action has been running since `since`.
    Busy {
        /// The action.
        action: Busy,
        /// When it was asked for.
        since: Instant,
    },
}

/// A snapshot of the loop's progress, cheap to copy to a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// When the loop last handed the scheduler an event.
    pub last_event: Option<Instant>,
    /// When the store last delivered something (a list, a peer change, a renewal).
    pub last_store: Option<Instant>,
    /// The longest-running action, and since when.
    pub busy: Option<(Busy, Instant)>,
    /// The next deadline as of the last event.
    pub next_deadline: Option<Instant>,
}

impl Progress {
    /// Whether the loop is stuck at `now`: an action has run longer than `after`, or the next
    /// deadline passed more than `after` ago without the loop serving it. The scheduler
    /// always has a deadline within `resync` while running, so a loop stuck anywhere shows
    /// here within `resync + after`.
    pub fn stalled(&self, now: Instant, after: Duration) -> Option<Stall> {
        let late = |since: Instant| now.checked_duration_since(since).is_some_and(|d| d > after);
        if let Some((action, since)) = self.busy
            && late(since)
        {
            return Some(Stall::Busy { action, since });
        }
        self.next_deadline.filter(|&d| late(d)).map(|since| Stall::Overdue { since })
    }
}

/// The scheduling state machine. See the module documentation for its rules.
#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: Config,
    /// The latest `now` seen; an earlier one passed in is taken as this.
    now: Option<Instant>,
    started: bool,
    exited: bool,
    ready: bool,
    /// A full list of peers has arrived.
    synced: bool,
    /// When the next pass should start (only while synced).
    pass_due: Option<Instant>,
    /// The pass running, since when.
    passing: Option<Instant>,
    /// The kernel changed during the running pass.
    wake_pending: bool,
    /// When the periodic pass comes (before the first list: a wake-up with nothing to do).
    resync_at: Option<Instant>,
    renew_at: Option<Instant>,
    renewing: Option<Instant>,
    /// When the lease expires (`None`: never).
    expires: Option<Instant>,
    last_store: Option<Instant>,
}

impl Scheduler {
    /// A scheduler that waits for [`Event::Started`]. Periods shorter than [`MIN_PERIOD`]
    /// are raised to it.
    pub fn new(cfg: Config) -> Self {
        let cfg = Config { resync: cfg.resync.max(MIN_PERIOD), error_retry: cfg.error_retry.max(MIN_PERIOD), ..cfg };
        Scheduler {
            cfg,
            now: None,
            started: false,
            exited: false,
            ready: false,
            synced: false,
            pass_due: None,
            passing: None,
            wake_pending: false,
            resync_at: None,
            renew_at: None,
            renewing: None,
            expires: None,
            last_store: None,
        }
    }

    /// The settings in force (after raising short periods).
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Handles `event` at `now` and returns what to do, in order. Every deadline that has
    /// come by `now` is served here too, whatever the event; an expiry that has come is
    /// served first, so nothing (not even a late renewal) revives an expired lease.
    pub fn on(&mut self, now: Instant, event: Event) -> Vec<Action> {
        let now = self.now.map_or(now, |last| now.max(last));
        self.now = Some(now);
        let mut out = Vec::new();
        if self.exited {
            return out;
        }
        if self.expired(now) {
            return self.exit(ExitReason::LeaseExpired, out);
        }
        match event {
            Event::Started { lease } => {
                self.started = true;
                self.set_term(lease, now);
                if self.expired(now) {
                    return self.exit(ExitReason::LeaseExpired, out);
                }
                self.set_ready(true, &mut out);
                self.resync_at = now.checked_add(self.cfg.resync);
            }
            Event::Synced => {
                self.synced = true;
                self.last_store = Some(now);
                self.pass_due = Some(now);
            }
            Event::PeersChanged => {
                self.last_store = Some(now);
                if self.synced {
                    self.pass_due = Some(now);
                }
            }
            Event::KernelChanged => {
                if !self.synced {
                    // The first pass, after the list, will see this change anyway.
                } else if self.passing.is_some() {
                    self.wake_pending = true;
                } else if self.pass_due.is_none() {
                    self.pass_due = now.checked_add(self.cfg.debounce);
                }
            }
            Event::Tick => {}
            Event::ReconcileDone { errors } => {
                if self.passing.take().is_some() {
                    self.resync_at = now.checked_add(self.cfg.resync);
                    let wake = std::mem::take(&mut self.wake_pending);
                    if errors {
                        // A pass already asked for (a peer change) stays; else retry later,
                        // and notifications caused by the failed pass do not hurry it.
                        if self.pass_due.is_none() {
                            self.pass_due = now.checked_add(self.cfg.error_retry);
                        }
                    } else if wake && self.pass_due.is_none() {
                        self.pass_due = now.checked_add(self.cfg.debounce);
                    }
                }
            }
            Event::RenewDone(outcome) => {
                let asked = self.renewing.take().is_some();
                match outcome {
                    Renewal::Renewed(term) => {
                        self.last_store = Some(now);
                        self.set_term(term, now);
                        if self.expired(now) {
                            return self.exit(ExitReason::LeaseExpired, out);
                        }
                    }
                    Renewal::Lost => return self.exit(ExitReason::LeaseLost, out),
                    Renewal::Failed if asked => {
                        // Retry well before the real expiry, which stays what it is.
                        self.renew_at = self.expires.map(|t| {
                            let left = t.saturating_duration_since(now);
                            now.checked_add(renew_retry_after(left)).map_or(t, |r| r.min(t))
                        });
                    }
                    Renewal::Failed => {}
                }
            }
            Event::OwnGone => return self.exit(ExitReason::LeaseRevoked, out),
            Event::OwnOverwritten => return self.exit(ExitReason::LeaseOverwritten, out),
            Event::WatchEnded => return self.exit(ExitReason::WatchEnded, out),
            Event::Shutdown => return self.exit(ExitReason::Shutdown, out),
        }
        self.serve_due(now, &mut out);
        out
    }

    /// When the loop must wake with [`Event::Tick`] if nothing else happens first; always
    /// later than the last `now` handled. `None`: only an event can wake it.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.exited || !self.started {
            return None;
        }
        let idle_pass = self.synced && self.passing.is_none();
        [
            self.pass_due.filter(|_| idle_pass),
            self.resync_at.filter(|_| self.passing.is_none()),
            self.renew_at.filter(|_| self.renewing.is_none()),
            self.expires,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// When the next renewal starts, if one is planned and none runs (for the caller's log).
    pub fn next_renewal(&self) -> Option<Instant> {
        self.renew_at.filter(|_| self.renewing.is_none() && !self.exited)
    }

    /// Whether the daemon is ready, as last reported with [`Action::SetReady`].
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Whether a full list of peers has arrived.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The loop's progress, for a health check.
    pub fn progress(&self) -> Progress {
        let busy = [self.passing.map(|t| (Busy::Reconcile, t)), self.renewing.map(|t| (Busy::Renew, t))]
            .into_iter()
            .flatten()
            .min_by_key(|&(_, t)| t);
        Progress { last_event: self.now, last_store: self.last_store, busy, next_deadline: self.next_deadline() }
    }

    /// Whether the loop is stuck at `now`, by the configured `stall_after`; see
    /// [`Progress::stalled`].
    pub fn stalled(&self, now: Instant) -> Option<Stall> {
        self.progress().stalled(now, self.cfg.stall_after)
    }

    fn set_ready(&mut self, ready: bool, out: &mut Vec<Action>) {
        if self.ready != ready {
            self.ready = ready;
            out.push(Action::SetReady(ready));
        }
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|t| t <= now)
    }

    /// A new term for our lease: renew `margin` before it ends, never in the past.
    fn set_term(&mut self, term: LeaseTerm, now: Instant) {
        match term {
            LeaseTerm::Expires(t) => {
                self.renew_at = Some(t.checked_sub(self.cfg.renew_margin).map_or(now, |r| r.max(now)));
                self.expires = Some(t);
            }
            LeaseTerm::Never => {
                self.renew_at = None;
                self.expires = None;
            }
        }
    }

    fn exit(&mut self, reason: ExitReason, mut out: Vec<Action>) -> Vec<Action> {
        self.set_ready(false, &mut out);
        self.exited = true;
        out.push(Action::Exit(reason));
        out
    }

    /// Serves every deadline (but the expiry, served in [`Scheduler::on`]) that has come by
    /// `now`.
    fn serve_due(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.started {
            return;
        }
        let due = |at: Option<Instant>| at.is_some_and(|t| t <= now);
        if self.renewing.is_none() && due(self.renew_at) {
            self.renew_at = None;
            self.renewing = Some(now);
            out.push(Action::Renew);
        }
        if !self.synced {
            if due(self.resync_at) {
                // Nothing to compare yet; only wake again, so the loop is seen alive.
                self.resync_at = now.checked_add(self.cfg.resync);
            }
            return;
        }
        if due(self.resync_at) {
            self.resync_at = None;
            // A running pass counts as this one and sets the next resync when it ends.
            if self.passing.is_none() {
                self.pass_due = Some(now);
            }
        }
        if self.passing.is_none() && due(self.pass_due) {
            self.pass_due = None;
            self.wake_pending = false;
            self.passing = Some(now);
            out.push(Action::Reconcile);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86400);

    fn config() -> Config {
        Config::new(HOUR, DAY)
    }

    /// A started and synced scheduler whose first pass has completed cleanly at `t0`.
    fn running(cfg: Config, t0: Instant) -> Scheduler {
        let mut s = Scheduler::new(cfg);
        assert_eq!(s.on(t0, Event::Started { lease: LeaseTerm::Expires(t0 + DAY) }), [Action::SetReady(true)]);
        assert_eq!(s.on(t0, Event::Synced), [Action::Reconcile]);
        assert_eq!(s.on(t0, Event::ReconcileDone { errors: false }), []);
        s
    }

    /// Feeds ticks from `from` to `to` every `step`, completing each action at once with
    /// the given outcomes; returns the actions with the instant they came at.
    fn drive(s: &mut Scheduler, from: Instant, to: Instant, step: Duration) -> Vec<(Duration, Action)> {
        let mut seen = Vec::new();
        let mut now = from;
        while now <= to {
            let mut queue = vec![Event::Tick];
            while let Some(ev) = queue.pop() {
                for a in s.on(now, ev) {
                    seen.push((now - from, a));
                    match a {
                        Action::Reconcile => queue.push(Event::ReconcileDone { errors: false }),
                        Action::Renew => queue.push(Event::RenewDone(Renewal::Renewed(LeaseTerm::Expires(now + DAY)))),
                        Action::SetReady(_) | Action::Exit(_) => {}
                    }
                }
            }
            now += step;
        }
        seen
    }

    #[test]
    fn renewal_comes_margin_before_expiry() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config());
        s.on(t0, Event::Started { lease: LeaseTerm::Expires(t0 + DAY) });
        assert_eq!(s.on(t0 + DAY - HOUR - SEC, Event::Tick), []);
        assert_eq!(s.on(t0 + DAY - HOUR, Event::Tick), [Action::Renew]);
        // The next renewal is counted from the renewed term.
        let t1 = t0 + DAY - HOUR;
        assert_eq!(s.on(t1, Event::RenewDone(Renewal::Renewed(LeaseTerm::Expires(t1 + DAY)))), []);
        assert_eq!(s.next_renewal(), Some(t1 + DAY - HOUR));
        assert!(s.ready());
    }

    #[test]
    fn a_renewal_already_due_is_done_at_once_not_in_the_past() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config());
        // Ten seconds left, an hour of margin: renew now.
        assert_eq!(
            s.on(t0, Event::Started { lease: LeaseTerm::Expires(t0 + 10 * SEC) }),
            [Action::SetReady(true), Action::Renew]
        );
        // A wall-clock expiry already past is due now, too.
        let wall = SystemTime::UNIX_EPOCH + DAY;
        assert_eq!(LeaseTerm::from_expiry(Expiry::At(wall - SEC), wall, t0), LeaseTerm::Expires(t0));
        assert_eq!(LeaseTerm::from_expiry(Expiry::At(wall + HOUR), wall, t0), LeaseTerm::Expires(t0 + HOUR));
    }

    #[test]
    fn an_expiry_beyond_the_clock_never_comes_and_does_not_panic() {
        let t0 = Instant::now();
        let far = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(i64::MAX as u64)).unwrap();
        assert_eq!(LeaseTerm::from_expiry(Expiry::At(far), SystemTime::UNIX_EPOCH, t0), LeaseTerm::Never);
        let mut s = Scheduler::new(Config { resync: Duration::MAX, ..config() });
        s.on(t0, Event::Started { lease: LeaseTerm::Never });
        s.on(t0, Event::Synced);
        s.on(t0, Event::ReconcileDone { errors: false });
        // Neither a lease that never expires nor a resync beyond the clock is a deadline.
        assert_eq!(s.next_deadline(), None);
        assert_eq!(s.on(t0 + DAY, Event::Tick), []);
    }

    #[test]
    fn the_margin_is_at_most_half_the_lease() {
        let t0 = Instant::now();
        // A 10 s test lease and the default hour of margin: renew after 5 s, not without pause.
        let cfg = Config::new(HOUR, 10 * SEC);
        assert_eq!(cfg.renew_margin, 5 * SEC);
        let mut s = Scheduler::new(cfg);
        assert_eq!(s.on(t0, Event::Started { lease: LeaseTerm::Expires(t0 + 10 * SEC) }), [Action::SetReady(true)]);
        assert_eq!(s.next_deadline(), Some(t0 + 5 * SEC));
        assert_eq!(s.on(t0 + 5 * SEC - MS, Event::Tick), []);
        assert_eq!(s.on(t0 + 5 * SEC, Event::Tick), [Action::Renew]);
        // A margin below half the lease stays as configured.
        assert_eq!(Config::new(HOUR, DAY).renew_margin, HOUR);
    }

    #[test]
    fn a_failed_renewal_is_retried_after_a_tenth_of_the_time_left() {
        assert_eq!(renew_retry_after(HOUR), RENEW_RETRY_MAX, "at most a minute");
        assert_eq!(renew_retry_after(300 * SEC), 30 * SEC);
        assert_eq!(renew_retry_after(2 * SEC), RENEW_RETRY_MIN, "at least half a second");
        assert_eq!(renew_retry_after(Duration::ZERO), RENEW_RETRY_MIN);
        // Ten seconds of a short lease left: retried after one second, not after a minute
        // (which would come after the expiry).
        let t0 = Instant::now();
        let mut s = Scheduler::new(Config::new(HOUR, 20 * SEC));
        assert_eq!(s.on(t0, Event::Started { lease: LeaseTerm::Expires(t0 + 20 * SEC) }), [Action::SetReady(true)]);
        assert_eq!(s.on(t0 + 10 * SEC, Event::Tick), [Action::Renew]);
        assert_eq!(s.on(t0 + 10 * SEC, Event::RenewDone(Renewal::Failed)), []);
        assert_eq!(s.next_renewal(), Some(t0 + 11 * SEC));
        assert_eq!(s.next_deadline(), Some(t0 + 11 * SEC));
        // A retry never comes after the expiry.
        assert_eq!(s.on(t0 + 11 * SEC, Event::Tick), [Action::Renew]);
        assert_eq!(s.on(t0 + 19 * SEC + 800 * MS, Event::RenewDone(Renewal::Failed)), []);
        assert_eq!(s.next_deadline(), Some(t0 + 20 * SEC));
    }

    #[test]
    fn a_failed_renewal_is_retried_in_a_minute_and_a_lost_one_exits() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config());
        s.on(t0, Event::Started { lease: LeaseTerm::Expires(t0 + HOUR + SEC) });
        let t1 = t0 + SEC;
        assert_eq!(s.on(t1, Event::Tick), [Action::Renew]);
        assert_eq!(s.on(t1 + SEC, Event::Tick), [], "no second renewal while one runs");
        assert_eq!(s.on(t1 + SEC, Event::RenewDone(Renewal::Failed)), []);
        assert_eq!(s.next_renewal(), Some(t1 + SEC + RENEW_RETRY_MAX));
        assert_eq!(s.on(t1 + SEC + RENEW_RETRY_MAX, Event::Tick), [Action::Renew]);
        assert_eq!(
            s.on(t1 + SEC + RENEW_RETRY_MAX, Event::RenewDone(Renewal::Lost)),
            [Action::SetReady(false), Action::Exit(ExitReason::LeaseLost)]
        );
        assert_eq!(s.next_deadline(), None);
        assert_eq!(s.on(t1 + DAY, Event::Synced), []);
    }

    #[test]
    fn a_lease_that_expires_unrenewed_ends_the_daemon() {
        let t0 = Instant::now();
        let expiry = t0 + HOUR + 90 * SEC;
        let mut s = Scheduler::new(config());
        s.on(t0, Event::Started { lease: LeaseTerm::Expires(expiry) });
        let mut renewals = Vec::new();
        let now = loop {
            let now = s.next_deadline().unwrap();
            let out = s.on(now, Event::Tick);
            if out.is_empty() {
                // The wake-up that shows the loop alive (no list has come in this test).
                continue;
            }
            if now == expiry {
                assert_eq!(out, [Action::SetReady(false), Action::Exit(ExitReason::LeaseExpired)]);
                break now;
            }
            assert_eq!(out, [Action::Renew], "at {:?}", now - t0);
            assert!(s.ready());
            renewals.push(now);
            assert_eq!(s.on(now, Event::RenewDone(Renewal::Failed)), []);
        };
        assert_eq!(renewals[0], t0 + 90 * SEC, "first at the margin");
        for w in renewals.windows(2) {
            assert_eq!(w[1] - w[0], renew_retry_after(expiry - w[0]), "a tenth of the time left");
        }
        // A minute apart while time is plenty, then closer, until the last half second.
        assert!(renewals.len() > 60, "{}", renewals.len());
        assert!(expiry - *renewals.last().unwrap() <= RENEW_RETRY_MIN);
        assert_eq!(s.next_deadline(), None);
        assert_eq!(s.on(now + SEC, Event::RenewDone(Renewal::Renewed(LeaseTerm::Expires(now + DAY)))), []);
    }

    #[test]
    fn a_renewal_that_ends_after_the_expiry_does_not_revive_the_lease() {
        let t0 = Instant::now();
        let expiry = t0 + 2 * HOUR;
        let mut s = Scheduler::new(config());
        s.on(t0, Event::Started { lease: LeaseTerm::Expires(expiry) });
        assert_eq!(s.on(t0 + HOUR, Event::Tick), [Action::Renew]);
        // The store answers only after the expiry (and before the loop woke for it).
        let out = s.on(expiry + MS, Event::RenewDone(Renewal::Renewed(LeaseTerm::Expires(t0 + HOUR + DAY))));
        assert_eq!(out, [Action::SetReady(false), Action::Exit(ExitReason::LeaseExpired)]);
        // A renewal still running at the expiry: the expiry is due all the same.
        let mut s = Scheduler::new(config());
        s.on(t0, Event::Started { lease: LeaseTerm::Expires(expiry) });
        assert_eq!(s.on(t0 + HOUR, Event::Tick), [Action::Renew]);
        let mut now = t0 + HOUR;
        while now < expiry {
            assert_eq!(s.on(now, Event::Tick), [], "at {:?}", now - t0);
            now = s.next_deadline().unwrap();
        }
        assert_eq!(now, expiry, "the loop wakes for the expiry");
        assert_eq!(s.on(expiry, Event::Tick), [Action::SetReady(false), Action::Exit(ExitReason::LeaseExpired)]);
    }

    #[test]
    fn a_reservation_is_never_renewed() {
        let t0 = Instant::now();
        for expiry in [Expiry::Reservation, Expiry::Unknown] {
            let lease = LeaseTerm::from_expiry(expiry, SystemTime::now(), t0);
            assert_eq!(lease, LeaseTerm::Never);
            let mut s = Scheduler::new(config());
            assert_eq!(s.on(t0, Event::Started { lease }), [Action::SetReady(true)]);
            let seen = drive(&mut s, t0, t0 + 3 * DAY, Duration::from_secs(600));
            assert!(!seen.iter().any(|(_, a)| *a == Action::Renew), "{seen:?}");
            assert!(s.ready());
        }
    }

    #[test]
    fn no_pass_before_the_first_full_list() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config());
        s.on(t0, Event::Started { lease: LeaseTerm::Never });
        for i in 0..100u32 {
            let now = t0 + i * SEC;
            let ev = [Event::PeersChanged, Event::KernelChanged, Event::Tick][i as usize % 3];
            assert_eq!(s.on(now, ev), [], "at {i} s");
            // Only the wake-up that shows the loop alive to a health check.
            let next = s.next_deadline().unwrap();
            assert!(next > now && next <= now + RESYNC, "at {i} s: {:?}", next - now);
        }
        assert_eq!(s.on(t0 + 100 * SEC, Event::Synced), [Action::Reconcile]);
    }

    #[test]
    fn nothing_happens_before_start_but_an_exit() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config());
        assert_eq!(s.on(t0, Event::Synced), []);
        assert_eq!(s.on(t0 + DAY, Event::Tick), []);
        assert_eq!(s.next_deadline(), None);
        assert_eq!(
            s.on(t0 + DAY, Event::Started { lease: LeaseTerm::Never }),
            [Action::SetReady(true), Action::Reconcile]
        );
        let mut s = Scheduler::new(config());
        assert_eq!(s.on(t0, Event::Shutdown), [Action::Exit(ExitReason::Shutdown)]);
    }

    #[test]
    fn a_burst_of_kernel_notifications_gives_one_pass_after_the_debounce() {
        let t0 = Instant::now();
        let mut s = running(config(), t0);
        let t1 = t0 + SEC;
        for i in 0..200u32 {
            assert_eq!(s.on(t1 + i * Duration::from_micros(200), Event::KernelChanged), []);
        }
        assert_eq!(s.next_deadline(), Some(t1 + DEBOUNCE), "counted from the first notification");
        assert_eq!(s.on(t1 + DEBOUNCE - MS, Event::Tick), []);
        assert_eq!(s.on(t1 + DEBOUNCE, Event::Tick), [Action::Reconcile]);
        // Notifications during the pass (ours, mostly) give one more pass, not one each.
        for _ in 0..50 {
            assert_eq!(s.on(t1 + DEBOUNCE + MS, Event::KernelChanged), []);
        }
        let t2 = t1 + DEBOUNCE + 2 * MS;
        assert_eq!(s.on(t2, Event::ReconcileDone { errors: false }), []);
        assert_eq!(s.next_deadline(), Some(t2 + DEBOUNCE));
        assert_eq!(s.on(t2 + DEBOUNCE, Event::Tick), [Action::Reconcile]);
        assert_eq!(s.on(t2 + DEBOUNCE, Event::ReconcileDone { errors: false }), []);
        assert_eq!(s.next_deadline(), Some(t2 + DEBOUNCE + RESYNC), "quiet again: only the resync");
    }

    #[test]
    fn a_peer_change_is_served_at_once_even_during_a_debounce() {
        let t0 = Instant::now();
        let mut s = running(config(), t0);
        let t1 = t0 + SEC;
        assert_eq!(s.on(t1, Event::KernelChanged), []);
        assert_eq!(s.on(t1 + MS, Event::PeersChanged), [Action::Reconcile]);
        // A change during the pass: one more pass right after it.
        assert_eq!(s.on(t1 + 2 * MS, Event::PeersChanged), []);
        assert_eq!(s.on(t1 + 2 * MS, Event::PeersChanged), []);
        assert_eq!(s.on(t1 + 3 * MS, Event::ReconcileDone { errors: false }), [Action::Reconcile]);
        assert_eq!(s.on(t1 + 4 * MS, Event::ReconcileDone { errors: false }), []);
        assert_eq!(s.next_deadline(), Some(t1 + 4 * MS + RESYNC), "the periodic pass, counted from the last");
    }

    #[test]
    fn a_failed_pass_is_retried_after_a_second_and_notifications_do_not_hurry_it() {
        let t0 = Instant::now();
        let mut s = running(config(), t0);
        let t1 = t0 + SEC;
        assert_eq!(s.on(t1, Event::PeersChanged), [Action::Reconcile]);
        assert_eq!(s.on(t1 + MS, Event::KernelChanged), []);
        assert_eq!(s.on(t1 + 2 * MS, Event::ReconcileDone { errors: true }), []);
        assert_eq!(s.on(t1 + 3 * MS, Event::KernelChanged), []);
        assert_eq!(s.next_deadline(), Some(t1 + 2 * MS + ERROR_RETRY));
        assert_eq!(s.on(t1 + 2 * MS + ERROR_RETRY - MS, Event::Tick), []);
        assert_eq!(s.on(t1 + 2 * MS + ERROR_RETRY, Event::Tick), [Action::Reconcile]);
        // A pass that fails while a peer change waits serves the change at once.
        let t2 = t1 + 2 * SEC;
        assert_eq!(s.on(t2, Event::PeersChanged), []);
        assert_eq!(s.on(t2, Event::ReconcileDone { errors: true }), [Action::Reconcile]);
    }

    #[test]
    fn the_kernel_is_compared_every_resync_when_nothing_happens() {
        let t0 = Instant::now();
        let mut s = running(config(), t0);
        let seen = drive(&mut s, t0, t0 + 60 * SEC, 100 * MS);
        let passes: Vec<Duration> = seen.iter().filter(|(_, a)| *a == Action::Reconcile).map(|(t, _)| *t).collect();
        assert_eq!(passes, (1..=6).map(|i| i * RESYNC).collect::<Vec<_>>());
        // A pass for another reason pushes the periodic one back: it just compared everything.
        let t1 = t0 + 61 * SEC;
        assert_eq!(s.on(t1, Event::PeersChanged), [Action::Reconcile]);
        assert_eq!(s.on(t1, Event::ReconcileDone { errors: false }), []);
        assert!(!s.on(t1 + RESYNC - MS, Event::Tick).contains(&Action::Reconcile));
        assert!(s.on(t1 + RESYNC, Event::Tick).contains(&Action::Reconcile));
    }

    #[test]
    fn a_slow_pass_does_not_queue_resyncs() {
        let t0 = Instant::now();
        let mut s = running(config(), t0);
        assert_eq!(s.on(t0 + RESYNC, Event::Tick), [Action::Reconcile]);
        // The pass takes a minute; the resyncs that come meanwhile ask for nothing more.
        for i in 1..=6 {
            assert_eq!(s.on(t0 + RESYNC + i * RESYNC, Event::Tick), []);
        }
        let t1 = t0 + RESYNC + 60 * SEC;
        assert_eq!(s.on(t1, Event::ReconcileDone { errors: false }), []);
        assert_eq!(s.next_deadline(), Some(t1 + RESYNC));
    }

    #[test]
    fn shutdown_and_losing_our_lease_exit_at_once_even_mid_pass() {
        let cases = [
            (Event::Shutdown, ExitReason::Shutdown),
            (Event::OwnGone, ExitReason::LeaseRevoked),
            (Event::OwnOverwritten, ExitReason::LeaseOverwritten),
            (Event::WatchEnded, ExitReason::WatchEnded),
            (Event::RenewDone(Renewal::Lost), ExitReason::LeaseLost),
        ];
        for (ev, reason) in cases {
            let t0 = Instant::now();
            let mut s = running(config(), t0);
            assert_eq!(s.on(t0 + SEC, Event::PeersChanged), [Action::Reconcile]);
            assert_eq!(s.on(t0 + SEC, ev), [Action::SetReady(false), Action::Exit(reason)]);
            assert!(!s.ready());
            assert_eq!(s.next_deadline(), None);
            for later in [Event::ReconcileDone { errors: false }, Event::Synced, Event::Tick, Event::Shutdown] {
                assert_eq!(s.on(t0 + DAY, later), [], "nothing after the exit");
            }
        }
    }

    #[test]
    fn ready_once_started_with_a_live_lease() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config());
        assert!(!s.ready());
        assert_eq!(s.on(t0, Event::Started { lease: LeaseTerm::Expires(t0 + DAY) }), [Action::SetReady(true)]);
        // Readiness does not wait for the peer list (flanneld's order: subnet file, ready).
        assert!(s.ready() && !s.synced());
        // Started with a lease already expired: never ready, exit at once.
        let mut s = Scheduler::new(config());
        assert_eq!(
            s.on(t0, Event::Started { lease: LeaseTerm::Expires(t0) }),
            [Action::Exit(ExitReason::LeaseExpired)]
        );
        assert!(!s.ready());
    }

    #[test]
    fn periods_of_zero_do_not_make_a_busy_loop() {
        let t0 = Instant::now();
        let zero = Config {
            resync: Duration::ZERO,
            renew_margin: Duration::ZERO,
            debounce: Duration::ZERO,
            error_retry: Duration::ZERO,
            stall_after: Duration::ZERO,
        };
        let mut s = running(zero, t0);
        assert_eq!(s.next_deadline(), Some(t0 + MIN_PERIOD));
        assert_eq!(s.on(t0, Event::KernelChanged), [Action::Reconcile], "a zero debounce: at once");
        assert_eq!(s.on(t0, Event::ReconcileDone { errors: true }), []);
        assert_eq!(s.next_deadline(), Some(t0 + MIN_PERIOD));
    }

    #[test]
    fn a_stuck_loop_or_action_shows_as_stalled() {
        let t0 = Instant::now();
        let mut s = running(config(), t0);
        assert_eq!(s.stalled(t0 + RESYNC + STALL_AFTER), None, "a deadline just missed is not a stall");
        assert_eq!(s.stalled(t0 + RESYNC + STALL_AFTER + MS), Some(Stall::Overdue { since: t0 + RESYNC }));
        let t1 = t0 + SEC;
        s.on(t1, Event::PeersChanged);
        assert_eq!(s.stalled(t1 + STALL_AFTER), None);
        assert_eq!(s.stalled(t1 + STALL_AFTER + MS), Some(Stall::Busy { action: Busy::Reconcile, since: t1 }));
        s.on(t1 + 2 * SEC, Event::ReconcileDone { errors: false });
        assert_eq!(s.stalled(t1 + 2 * SEC), None);
        let p = s.progress();
        assert_eq!((p.last_event, p.last_store, p.busy), (Some(t1 + 2 * SEC), Some(t1), None));
    }

    #[test]
    fn an_earlier_now_is_taken_as_the_latest_one() {
        let t0 = Instant::now();
        let mut s = running(config(), t0 + SEC);
        assert_eq!(s.on(t0, Event::KernelChanged), []);
        assert_eq!(s.next_deadline(), Some(t0 + SEC + DEBOUNCE));
    }

    fn arb_term() -> impl Strategy<Value = LeaseTerm> {
        prop_oneof![
            3 => (0u64..200_000).prop_map(|ms| LeaseTerm::Expires(base() + Duration::from_millis(ms))),
            1 => Just(LeaseTerm::Never),
        ]
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => Just(Event::Tick),
            3 => Just(Event::KernelChanged),
            2 => Just(Event::PeersChanged),
            1 => Just(Event::Synced),
            3 => any::<bool>().prop_map(|errors| Event::ReconcileDone { errors }),
            2 => arb_term().prop_map(|t| Event::RenewDone(Renewal::Renewed(t))),
            2 => Just(Event::RenewDone(Renewal::Failed)),
            1 => arb_term().prop_map(|lease| Event::Started { lease }),
            1 => prop_oneof![
                Just(Event::RenewDone(Renewal::Lost)),
                Just(Event::OwnGone),
                Just(Event::OwnOverwritten),
                Just(Event::WatchEnded),
                Just(Event::Shutdown),
            ],
        ]
    }

    /// Most steps small (a burst), some long (timers come due).
    fn arb_advance() -> impl Strategy<Value = Duration> {
        prop_oneof![3 => 0u64..100, 2 => 0u64..20_000, 1 => 0u64..3_000_000].prop_map(Duration::from_millis)
    }

    /// A fixed origin for generated instants (terms are relative to it, so some lie in the
    /// past of the running clock).
    fn base() -> Instant {
        use std::sync::OnceLock;
        static BASE: OnceLock<Instant> = OnceLock::new();
        *BASE.get_or_init(Instant::now)
    }

    fn arb_config() -> impl Strategy<Value = Config> {
        let d = |max: u64| (0..max).prop_map(Duration::from_millis);
        (d(20_000), d(100_000), d(200), d(2_000)).prop_map(|(resync, renew_margin, debounce, error_retry)| Config {
            resync,
            renew_margin,
            debounce,
            error_retry,
            stall_after: STALL_AFTER,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1_500))]

        /// For any sequence of events: the next deadline is always after the last `now`
        /// (the loop never spins on a past deadline), no pass before a full list, one pass
        /// and one renewal at a time, nothing after an exit, readiness reported only on
        /// change, a lease that was only ever a reservation is never renewed, and a lease
        /// past its expiry ends the daemon at once (and only then is the expiry the reason).
        #[test]
        fn any_event_sequence_keeps_the_invariants(
            cfg in arb_config(),
            steps in proptest::collection::vec((arb_advance(), arb_event()), 0..150),
        ) {
            let mut s = Scheduler::new(cfg);
            let mut now = base();
            let (mut synced, mut passing, mut exited, mut ready) = (false, false, false, false);
            let mut renewing = false;
            let mut only_reservations = true;
            // The lease's expiry as the scheduler last accepted it.
            let mut expiry: Option<Instant> = None;
            for (adv, ev) in steps {
                now += adv;
                let was_exited = exited;
                if !exited && expiry.is_none_or(|t| t > now)
                    && let Event::Started { lease: term } | Event::RenewDone(Renewal::Renewed(term)) = ev
                {
                    expiry = match term {
                        LeaseTerm::Expires(t) => Some(t),
                        LeaseTerm::Never => None,
                    };
                }
                let must_expire = !was_exited && expiry.is_some_and(|t| t <= now);
                match ev {
                    Event::Synced => synced = true,
                    Event::ReconcileDone { .. } => passing = false,
                    Event::Started { lease: LeaseTerm::Expires(_) }
                    | Event::RenewDone(Renewal::Renewed(LeaseTerm::Expires(_))) => only_reservations = false,
                    _ => {}
                }
                if let Event::RenewDone(_) = ev {
                    renewing = false;
                }
                let out = s.on(now, ev);
                if exited {
                    prop_assert!(out.is_empty(), "{out:?} after the exit");
                }
                for (i, a) in out.iter().enumerate() {
                    match *a {
                        Action::Reconcile => {
                            prop_assert!(synced, "a pass before the first full list");
                            prop_assert!(!passing, "a second pass while one runs");
                            passing = true;
                        }
                        Action::SetReady(r) => {
                            prop_assert_ne!(r, ready, "readiness reported without a change");
                            ready = r;
                        }
                        Action::Exit(reason) => {
                            prop_assert_eq!(reason == ExitReason::LeaseExpired, must_expire, "{:?}", reason);
                            prop_assert_eq!(i, out.len() - 1, "an action after the exit");
                            prop_assert!(!ready);
                            exited = true;
                        }
                        Action::Renew => {
                            prop_assert!(!only_reservations, "a reservation was renewed");
                            prop_assert!(!renewing, "a second renewal while one runs");
                            renewing = true;
                        }
                    }
                }
                prop_assert_eq!(s.ready(), ready);
                if must_expire {
                    prop_assert_eq!(out.last(), Some(&Action::Exit(ExitReason::LeaseExpired)), "a lease past its expiry lives on");
                }
                if let Some(d) = s.next_deadline() {
                    prop_assert!(d > now, "next deadline {:?} not after now", d - base());
                    prop_assert!(!exited);
                }
            }
        }

        /// Driven as the daemon drives it (sleep to the deadline, actions completed at once,
        /// renewals that succeed): after the first list a pass comes at least every resync
        /// period, every deadline is served when it comes, and the daemon stays ready.
        #[test]
        fn a_faithful_loop_resyncs_and_stays_ready(
            cfg in arb_config(),
            ttl_ms in 1_000u64..200_000,
            external in proptest::collection::vec((1u64..30_000, 0u8..3), 0..60),
        ) {
            let t0 = base();
            // The daemon's margin is at least a minute; renewing at the instant of expiry
            // would (rightly) report not ready for that instant.
            let cfg = Config { renew_margin: cfg.renew_margin.max(Duration::from_millis(1)), ..cfg };
            let mut s = Scheduler::new(cfg);
            let ttl = Duration::from_millis(ttl_ms).max(cfg.renew_margin + Duration::from_millis(1));
            let mut pending =
                VecDeque::from([Event::Started { lease: LeaseTerm::Expires(t0 + ttl) }, Event::Synced]);
            let mut now = t0;
            let mut last_pass: Option<Instant> = None;
            let mut external = external.into_iter();
            let mut next_external = None;
            for _ in 0..2_000 {
                let ev = match pending.pop_front() {
                    Some(ev) => ev,
                    None => {
                        if next_external.is_none() {
                            next_external = external.next().map(|(gap, kind)| (now + Duration::from_millis(gap), kind));
                        }
                        let deadline = s.next_deadline().expect("a running daemon always has a deadline");
                        match next_external {
                            Some((at, kind)) if at < deadline => {
                                next_external = None;
                                now = at;
                                [Event::PeersChanged, Event::KernelChanged, Event::Synced][kind as usize]
                            }
                            _ => {
                                now = deadline;
                                Event::Tick
                            }
                        }
                    }
                };
                let out = s.on(now, ev);
                if ev == Event::Tick {
                    prop_assert!(!out.is_empty(), "woken for nothing at {:?}", now - t0);
                }
                for a in out {
                    match a {
                        Action::Reconcile => {
                            if let Some(last) = last_pass {
                                prop_assert!(now - last <= s.config().resync, "no pass for {:?}", now - last);
                            }
                            last_pass = Some(now);
                            pending.push_back(Event::ReconcileDone { errors: false });
                        }
                        Action::Renew => {
                            pending.push_back(Event::RenewDone(Renewal::Renewed(LeaseTerm::Expires(now + ttl))));
                        }
                        Action::SetReady(r) => prop_assert!(r, "not ready at {:?}", now - t0),
                        Action::Exit(r) => prop_assert!(false, "exit {r:?}"),
                    }
                }
                prop_assert!(s.ready());
                prop_assert_eq!(s.stalled(now), None);
            }
        }
    }
}
