//! systemd's notify protocol (`Type=notify`): `READY=1` once `subnet.env` is written and
//! the data plane programmed, `STATUS=` with the lease, `STOPPING=1` on the way out, and
//! `WATCHDOG=1` at half of `WatchdogSec` while the daemon is healthy. Without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::metrics::Metrics;

fn send(states: &[NotifyState]) {
    // A lost notification must not stop the daemon: systemd then times the start out or
    // restarts us, which the log line explains.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new status line.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The watchdog interval asked for by systemd: `WATCHDOG_USEC`, when `WATCHDOG_PID` is
/// absent or ours (as `sd_watchdog_enabled(3)` reads them).
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    match pid.map(|p| p.trim().parse::<u32>()) {
        None => {}
        Some(Ok(p)) if p == own_pid => {}
        Some(_) => return None,
    }
    Some(Duration::from_micros(usec))
}

/// Sends `WATCHDOG=1` every half interval while the main loop makes progress (within
/// `/healthz`'s limit), so systemd restarts a daemon that hangs. `None` when systemd asked for no watchdog.
pub fn spawn_watchdog(metrics: Arc<Metrics>) -> Option<tokio::task::JoinHandle<()>> {
    let interval = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )?;
    tracing::info!(?interval, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        let mut warned = false;
        loop {
            tick.tick().await;
            // Only a hung main loop starves the watchdog: a store outage is waited out (the
            // daemon keeps the data plane; a restart would not bring the store back).
            let limit = crate::metrics::stale_limit();
            let hung = metrics
                .main_loop_age()
                .filter(|a| *a > limit)
                .map(|a| format!("the main loop has not run for {}s", a.as_secs()));
            match hung {
                None => {
                    send(&[NotifyState::Watchdog]);
                    warned = false;
                }
                Some(why) if !warned => {
                    tracing::error!("not feeding the systemd watchdog: {why}");
                    warned = true;
                }
                Some(_) => {}
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_follows_sd_watchdog_enabled() {
        assert_eq!(watchdog_interval(Some("2000000"), None, 7), Some(Duration::from_secs(2)));
        assert_eq!(watchdog_interval(Some("2000000"), Some("7"), 7), Some(Duration::from_secs(2)));
        assert_eq!(watchdog_interval(Some("2000000"), Some("8"), 7), None, "another process's watchdog");
        assert_eq!(watchdog_interval(Some("2000000"), Some("x"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }
}
