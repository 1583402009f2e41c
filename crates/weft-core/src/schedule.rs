//! The daemon's scheduling as a pure state machine: events in, actions and the next deadline
//! out.
//!
//! The daemon loop owns the effects (a reconcile pass, a firewall resync, a lease renewal,
//! readiness, exit); this module decides when each one is due. The loop sleeps until
//! [`Scheduler::next_deadline`] or until something happens, tells the scheduler with
//! [`Scheduler::on`], carries out the returned [`Action`]s in order and reports each outcome
//! back as an event. Time is passed in; nothing here reads a clock.
//!
//! The rules it keeps:
//! - no reconcile pass before the first full list of peers ([`Event::Synced`]): an empty view
//!   would tear down every route of a restarted daemon;
//! - a peer change asks for a pass at once; kernel notifications are coalesced: a burst gives
//!   one pass, `debounce` after the first of them;
//! - one pass at a time; what arrives during a pass is served by one pass after it;
//! - a pass with errors is retried after `error_retry`, and kernel notifications (often caused
//!   by the failed pass itself) do not bring that retry forward;
//! - the kernel is compared with the plan at least every `resync` after the last pass;
//! - the lease is renewed `renew_margin` before it expires (at once if that is already past);
//!   a failed renewal is retried after `renew_retry`; a reservation is never renewed;
//! - ready once started with a live lease; not ready while the lease has expired unrenewed,
//!   nor once exiting;
//! - shutdown, our lease revoked, overwritten or lost, or the end of the watch: exit.

use std::time::{Duration, Instant, SystemTime};

use crate::lease::Expiry;

/// How often the kernel is compared with the plan even when nothing was noticed.
pub const RESYNC: Duration = Duration::from_secs(10);
/// How long a burst of kernel notifications is collected before one pass serves it.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// When a pass that had errors is tried again.
pub const ERROR_RETRY: Duration = Duration::from_secs(1);
/// When a failed lease renewal is tried again.
pub const RENEW_RETRY: Duration = Duration::from_secs(60);
/// How long a due deadline may go unserved, or an action run, before the loop counts as stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(60);
/// The shortest period the scheduler accepts; shorter settings are raised to it, so that no
/// setting can turn the loop into a busy loop.
pub const MIN_PERIOD: Duration = Duration::from_millis(10);

/// The scheduler's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The periodic reconcile pass, counted from the end of the last pass.
    pub resync: Duration,
    /// The periodic firewall (and blackhole route) resync; `None`: nothing to resync.
    pub firewall_resync: Option<Duration>,
    /// How long before its expiry the lease is renewed.
    pub renew_margin: Duration,
    /// When a failed renewal is tried again.
    pub renew_retry: Duration,
    /// How long kernel notifications are coalesced before a pass.
    pub debounce: Duration,
    /// When a pass with errors is tried again.
    pub error_retry: Duration,
    /// See [`Progress::stalled`].
    pub stall_after: Duration,
}

impl Config {
    /// The daemon's settings: the given renewal margin and firewall resync period, the
    /// module's constants for the rest.
    pub fn new(renew_margin: Duration, firewall_resync: Option<Duration>) -> Self {
        Config {
            resync: RESYNC,
            firewall_resync,
            renew_margin,
            renew_retry: RENEW_RETRY,
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
    /// A firewall resync ended (its errors are the caller's to log; the next is periodic).
    FirewallDone,
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
    /// Resync the firewall rules (and blackhole routes), then report [`Event::FirewallDone`].
    ResyncFirewall,
    /// Renew our lease, then report [`Event::RenewDone`].
    Renew,
    /// Stop the daemon; nothing follows.
    Exit(ExitReason),
}

/// An action that takes time, as [`Progress`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// A reconcile pass.
    Reconcile,
    /// A firewall resync.
    Firewall,
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
    /// When the periodic pass comes.
    resync_at: Option<Instant>,
    firewall_at: Option<Instant>,
    firewalling: Option<Instant>,
    renew_at: Option<Instant>,
    renewing: Option<Instant>,
    /// When the lease expires, while it has not yet been seen to expire.
    expires: Option<Instant>,
    last_store: Option<Instant>,
}

impl Scheduler {
    /// A scheduler that waits for [`Event::Started`]. Periods shorter than [`MIN_PERIOD`]
    /// are raised to it.
    pub fn new(cfg: Config) -> Self {
        let cfg = Config {
            resync: cfg.resync.max(MIN_PERIOD),
            firewall_resync: cfg.firewall_resync.map(|d| d.max(MIN_PERIOD)),
            renew_retry: cfg.renew_retry.max(MIN_PERIOD),
            error_retry: cfg.error_retry.max(MIN_PERIOD),
            ..cfg
        };
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
            firewall_at: None,
            firewalling: None,
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
    /// come by `now` is served here too, whatever the event.
    pub fn on(&mut self, now: Instant, event: Event) -> Vec<Action> {
        let now = self.now.map_or(now, |last| now.max(last));
        self.now = Some(now);
        let mut out = Vec::new();
        if self.exited {
            return out;
        }
        match event {
            Event::Started { lease } => {
                self.started = true;
                self.set_term(lease, now, &mut out);
                self.firewall_at = self.cfg.firewall_resync.and_then(|p| now.checked_add(p));
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
            Event::FirewallDone => {
                if self.firewalling.take().is_some() {
                    self.firewall_at = self.cfg.firewall_resync.and_then(|p| now.checked_add(p));
                }
            }
            Event::RenewDone(outcome) => {
                let asked = self.renewing.take().is_some();
                match outcome {
                    Renewal::Renewed(term) => {
                        self.last_store = Some(now);
                        self.set_term(term, now, &mut out);
                    }
                    Renewal::Lost => return self.exit(ExitReason::LeaseLost, out),
                    Renewal::Failed if asked => self.renew_at = now.checked_add(self.cfg.renew_retry),
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
            self.resync_at.filter(|_| idle_pass),
            self.firewall_at.filter(|_| self.firewalling.is_none()),
            self.renew_at.filter(|_| self.renewing.is_none()),
            self.expires,
        ]
        .into_iter()
        .flatten()
        .min()
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
        let busy = [
            self.passing.map(|t| (Busy::Reconcile, t)),
            self.firewalling.map(|t| (Busy::Firewall, t)),
            self.renewing.map(|t| (Busy::Renew, t)),
        ]
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

    /// A new term for our lease: renew `margin` before it ends, never in the past.
    fn set_term(&mut self, term: LeaseTerm, now: Instant, out: &mut Vec<Action>) {
        match term {
            LeaseTerm::Expires(t) => {
                self.renew_at = Some(t.checked_sub(self.cfg.renew_margin).map_or(now, |r| r.max(now)));
                self.expires = (t > now).then_some(t);
                self.set_ready(t > now, out);
            }
            LeaseTerm::Never => {
                self.renew_at = None;
                self.expires = None;
                self.set_ready(true, out);
            }
        }
    }

    fn exit(&mut self, reason: ExitReason, mut out: Vec<Action>) -> Vec<Action> {
        self.set_ready(false, &mut out);
        self.exited = true;
        out.push(Action::Exit(reason));
        out
    }

    /// Serves every deadline that has come by `now`.
    fn serve_due(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.started {
            return;
        }
        let due = |at: Option<Instant>| at.is_some_and(|t| t <= now);
        if due(self.expires) {
            // Renewals kept failing until the store let the lease go; another host may take
            // the subnet, so do not claim readiness until a renewal succeeds.
            self.expires = None;
            self.set_ready(false, out);
        }
        if self.renewing.is_none() && due(self.renew_at) {
            self.renew_at = None;
            self.renewing = Some(now);
            out.push(Action::Renew);
        }
        if self.firewalling.is_none() && due(self.firewall_at) {
            self.firewall_at = None;
            self.firewalling = Some(now);
            out.push(Action::ResyncFirewall);
        }
        if !self.synced {
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
        Config::new(HOUR, Some(5 * SEC))
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
                        Action::ResyncFirewall => queue.push(Event::FirewallDone),
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
        let mut s = Scheduler::new(Config::new(HOUR, None));
        s.on(t0, Event::Started { lease: LeaseTerm::Expires(t0 + DAY) });
        assert_eq!(s.on(t0 + DAY - HOUR - SEC, Event::Tick), []);
        assert_eq!(s.on(t0 + DAY - HOUR, Event::Tick), [Action::Renew]);
        // The next renewal is counted from the renewed term.
        let t1 = t0 + DAY - HOUR;
        assert_eq!(s.on(t1, Event::RenewDone(Renewal::Renewed(LeaseTerm::Expires(t1 + DAY)))), []);
        assert_eq!(s.next_deadline(), Some(t1 + DAY - HOUR));
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
        let mut s = Scheduler::new(Config { renew_retry: Duration::MAX, resync: Duration::MAX, ..config() });
        s.on(t0, Event::Started { lease: LeaseTerm::Never });
        s.on(t0, Event::Synced);
        s.on(t0, Event::ReconcileDone { errors: false });
        assert_eq!(s.next_deadline(), Some(t0 + 5 * SEC));
    }

    #[test]
    fn a_failed_renewal_is_retried_in_a_minute_and_a_lost_one_exits() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Config::new(HOUR, None));
        s.on(t0, Event::Started { lease: LeaseTerm::Expires(t0 + HOUR + SEC) });
        let t1 = t0 + SEC;
        assert_eq!(s.on(t1, Event::Tick), [Action::Renew]);
        assert_eq!(s.on(t1 + SEC, Event::Tick), [], "no second renewal while one runs");
        assert_eq!(s.on(t1 + SEC, Event::RenewDone(Renewal::Failed)), []);
        assert_eq!(s.next_deadline(), Some(t1 + SEC + RENEW_RETRY));
        assert_eq!(s.on(t1 + SEC + RENEW_RETRY, Event::Tick), [Action::Renew]);
        assert_eq!(
            s.on(t1 + SEC + RENEW_RETRY, Event::RenewDone(Renewal::Lost)),
            [Action::SetReady(false), Action::Exit(ExitReason::LeaseLost)]
        );
        assert_eq!(s.next_deadline(), None);
        assert_eq!(s.on(t1 + DAY, Event::Synced), []);
    }

    #[test]
    fn a_lease_that_expires_unrenewed_is_not_ready_until_renewed() {
        let t0 = Instant::now();
        let expiry = t0 + HOUR + 90 * SEC;
        let mut s = Scheduler::new(Config::new(HOUR, None));
        s.on(t0, Event::Started { lease: LeaseTerm::Expires(expiry) });
        let mut now = t0;
        let mut renewals = 0;
        while now < t0 + 2 * HOUR {
            now = s.next_deadline().unwrap();
            for a in s.on(now, Event::Tick) {
                match a {
                    Action::Renew => {
                        renewals += u32::from(now < expiry);
                        assert_eq!(s.on(now, Event::RenewDone(Renewal::Failed)), []);
                    }
                    Action::SetReady(false) => assert_eq!(now, expiry, "not ready from the expiry on"),
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(s.ready(), now < expiry);
        }
        assert_eq!(renewals, 60, "at the margin, then once a minute until the expiry");
        let out = s.on(now, Event::RenewDone(Renewal::Renewed(LeaseTerm::Expires(now + DAY))));
        assert_eq!(out, [Action::SetReady(true)]);
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
        let mut s = Scheduler::new(Config::new(HOUR, None));
        s.on(t0, Event::Started { lease: LeaseTerm::Never });
        for i in 0..100u32 {
            let now = t0 + i * SEC;
            let ev = [Event::PeersChanged, Event::KernelChanged, Event::Tick][i as usize % 3];
            assert_eq!(s.on(now, ev), [], "at {i} s");
            assert_eq!(s.next_deadline(), None, "nothing to wake for before the list");
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
        let mut s = running(Config::new(HOUR, None), t0);
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
        assert_eq!(s.next_deadline(), Some(t0 + 5 * SEC), "the firewall resync, then the periodic pass");
    }

    #[test]
    fn a_failed_pass_is_retried_after_a_second_and_notifications_do_not_hurry_it() {
        let t0 = Instant::now();
        let mut s = running(Config::new(HOUR, None), t0);
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
        let fw: Vec<Duration> = seen.iter().filter(|(_, a)| *a == Action::ResyncFirewall).map(|(t, _)| *t).collect();
        assert_eq!(fw, (1..=12).map(|i| i * 5 * SEC).collect::<Vec<_>>());
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
        let mut s = running(Config::new(HOUR, None), t0);
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
    fn without_firewall_there_is_no_firewall_resync() {
        let t0 = Instant::now();
        let mut s = running(Config::new(HOUR, None), t0);
        let seen = drive(&mut s, t0, t0 + 600 * SEC, SEC);
        assert!(!seen.iter().any(|(_, a)| *a == Action::ResyncFirewall), "{seen:?}");
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
        // Started with a lease already expired: renew first, ready when it is renewed.
        let mut s = Scheduler::new(config());
        assert_eq!(s.on(t0, Event::Started { lease: LeaseTerm::Expires(t0) }), [Action::Renew]);
        let out = s.on(t0 + SEC, Event::RenewDone(Renewal::Renewed(LeaseTerm::Expires(t0 + DAY))));
        assert_eq!(out, [Action::SetReady(true)]);
    }

    #[test]
    fn periods_of_zero_do_not_make_a_busy_loop() {
        let t0 = Instant::now();
        let zero = Config {
            resync: Duration::ZERO,
            firewall_resync: Some(Duration::ZERO),
            renew_margin: Duration::ZERO,
            renew_retry: Duration::ZERO,
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
        let mut s = running(Config::new(HOUR, None), t0);
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
        let mut s = running(Config::new(HOUR, None), t0 + SEC);
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
            2 => Just(Event::FirewallDone),
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
        (d(20_000), proptest::option::of(d(10_000)), d(100_000), d(90_000), d(200), d(2_000)).prop_map(
            |(resync, firewall_resync, renew_margin, renew_retry, debounce, error_retry)| Config {
                resync,
                firewall_resync,
                renew_margin,
                renew_retry,
                debounce,
                error_retry,
                stall_after: STALL_AFTER,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1_500))]

        /// For any sequence of events: the next deadline is always after the last `now`
        /// (the loop never spins on a past deadline), no pass before a full list, one pass,
        /// one renewal and one firewall resync at a time, nothing after an exit, readiness
        /// reported only on change, and a lease that was only ever a reservation is never
        /// renewed.
        #[test]
        fn any_event_sequence_keeps_the_invariants(
            cfg in arb_config(),
            steps in proptest::collection::vec((arb_advance(), arb_event()), 0..150),
        ) {
            let mut s = Scheduler::new(cfg);
            let mut now = base();
            let (mut synced, mut passing, mut exited, mut ready) = (false, false, false, false);
            let (mut renewing, mut firewalling) = (false, false);
            let mut only_reservations = true;
            for (adv, ev) in steps {
                now += adv;
                match ev {
                    Event::Synced => synced = true,
                    Event::ReconcileDone { .. } => passing = false,
                    Event::FirewallDone => firewalling = false,
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
                        Action::Exit(_) => {
                            prop_assert_eq!(i, out.len() - 1, "an action after the exit");
                            prop_assert!(!ready);
                            exited = true;
                        }
                        Action::Renew => {
                            prop_assert!(!only_reservations, "a reservation was renewed");
                            prop_assert!(!renewing, "a second renewal while one runs");
                            renewing = true;
                        }
                        Action::ResyncFirewall => {
                            prop_assert!(cfg.firewall_resync.is_some());
                            prop_assert!(!firewalling, "a second firewall resync while one runs");
                            firewalling = true;
                        }
                    }
                }
                prop_assert_eq!(s.ready(), ready);
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
                        Action::ResyncFirewall => pending.push_back(Event::FirewallDone),
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
