//! The Prometheus metrics (flanneld has none): a leaf that the store, the data plane and the
//! udp engine report into through a shared handle; it imports nothing of theirs.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set of the counters with a `kind`/`type` label.
pub type Labels = Vec<(&'static str, &'static str)>;

/// Label set of the per-endpoint store gauges.
pub type EndpointLabels = Vec<(&'static str, String)>;

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The environment variable that sets [`stale_limit`] in seconds.
pub const STALE_ENV: &str = "WEFT_HEALTHZ_STALE_SECS";

/// How long the main loop or the store may go without progress before `/healthz` fails:
/// 60 s, or `WEFT_HEALTHZ_STALE_SECS`.
pub fn stale_limit() -> std::time::Duration {
    std::env::var(STALE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| std::time::Duration::from_secs(s.max(1)))
        .unwrap_or(std::time::Duration::from_secs(60))
}

/// Brings metrics kept elsewhere up to date before a rendering.
pub type Refresher = Box<dyn Fn() + Send + Sync>;

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Unix time at which our lease expires (0 for a reservation).
    pub lease_expiry: Gauge,
    /// Peer leases in use (valid, not lost to an older conflicting lease).
    pub peers: Gauge,
    /// 1 once subnet.env is written.
    pub ready: Gauge,
    /// Times the store connection or watch was re-established.
    pub store_reconnects: Counter,
    /// Times the store compacted past our revision and the leases were listed afresh.
    pub store_relists: Counter,
    /// Changes to the accepted peer set, by type (added, removed).
    pub lease_events: Family<Labels, Counter>,
    /// Reconciliation passes over the kernel state.
    pub reconciles: Counter,
    /// Kernel entries changed by the reconciler.
    pub kernel_changes: Counter,
    /// Duration of the last reconciliation, in milliseconds.
    pub reconcile_ms: Gauge,
    /// udp backend packets, by direction (tx, rx, icmp_unreachable).
    pub udp_packets: Family<Labels, Counter>,
    /// udp backend drops, by reason.
    pub udp_drops: Family<Labels, Counter>,
    /// udp backend offload paths in use (1) or not (0), by feature.
    pub udp_offload: Family<Labels, Gauge>,
    /// udp packets the kernel fast path carried, by direction (tx, rx); read from the
    /// kernel at each rendering.
    pub udp_fast_path_packets: Family<Labels, Counter>,
    /// Run before each rendering: counters kept elsewhere (the udp fast path's, in the
    /// kernel) are brought up to date.
    refreshers: std::sync::Mutex<Vec<Refresher>>,
    /// Errors, by kind (renew, store, …).
    pub errors: Family<Labels, Counter>,
    /// Peer leases rejected by validation, by reason.
    pub leases_rejected: Family<Labels, Counter>,
    /// Store requests retried on another endpoint, by operation.
    pub store_retries: Family<Labels, Counter>,
    /// 1 while the last request to an endpoint succeeded, 0 after it failed.
    pub store_endpoint_up: Family<EndpointLabels, Gauge>,
    /// Unix time (ms) the store last answered the lease list or watch (0: not yet).
    pub store_progress_ms: Gauge,
    /// Unix time (ms) the daemon's main loop last ran (0: not yet).
    pub main_loop_ms: Gauge,
    /// wireguard packets, by kind (tx, rx, handshake_sent, handshake_received, keepalive).
    pub wg_packets: Family<Labels, Counter>,
    /// wireguard drops, by reason (auth_failure, replay, unknown_key, no_peer, …).
    pub wg_drops: Family<Labels, Counter>,
    /// The wireguard data path in use (1): `path` = kernel or userspace.
    pub wg_path: Family<Labels, Gauge>,
    /// wireguard peers configured.
    pub wg_peers: Gauge,
    /// 1 when this daemon enforces NetworkPolicy (`weft doctor` reads it).
    pub netpol_enabled: Gauge,
    /// NetworkPolicy `nft` transactions run (changes and drift repairs).
    pub netpol_transactions: Counter,
    /// NetworkPolicies known (all namespaces).
    pub netpol_policies: Gauge,
    /// NetworkPolicies that cannot be read and are enforced fail-closed.
    pub netpol_policy_errors: Gauge,
    /// Seconds the last NetworkPolicy compile and apply took.
    pub netpol_last_apply_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            lease_expiry: Gauge::default(),
            peers: Gauge::default(),
            ready: Gauge::default(),
            store_reconnects: Counter::default(),
            store_relists: Counter::default(),
            lease_events: Family::default(),
            reconciles: Counter::default(),
            kernel_changes: Counter::default(),
            reconcile_ms: Gauge::default(),
            udp_packets: Family::default(),
            udp_drops: Family::default(),
            udp_offload: Family::default(),
            udp_fast_path_packets: Family::default(),
            refreshers: std::sync::Mutex::new(Vec::new()),
            errors: Family::default(),
            leases_rejected: Family::default(),
            store_retries: Family::default(),
            store_endpoint_up: Family::default(),
            store_progress_ms: Gauge::default(),
            main_loop_ms: Gauge::default(),
            wg_packets: Family::default(),
            wg_drops: Family::default(),
            wg_path: Family::default(),
            wg_peers: Gauge::default(),
            netpol_enabled: Gauge::default(),
            netpol_transactions: Counter::default(),
            netpol_policies: Gauge::default(),
            netpol_policy_errors: Gauge::default(),
            netpol_last_apply_seconds: Gauge::default(),
        };
        registry.register(
            "weft_lease_expiry_timestamp_seconds",
            "Unix time our subnet lease expires (0: reservation)",
            m.lease_expiry.clone(),
        );
        registry.register("weft_peers", "Peer subnet leases in use (rejected leases are not counted)", m.peers.clone());
        registry.register("weft_ready", "1 once subnet.env is written", m.ready.clone());
        registry.register(
            "weft_store_reconnects",
            "Times the store list/watch was re-established",
            m.store_reconnects.clone(),
        );
        registry.register(
            "weft_store_relists",
            "Times the leases were re-listed after the store compacted its history",
            m.store_relists.clone(),
        );
        registry.register(
            "weft_lease_events",
            "Changes to the set of peer leases in use (rejected leases are counted in weft_leases_rejected)",
            m.lease_events.clone(),
        );
        registry.register("weft_reconciles", "Passes comparing the kernel with the plan", m.reconciles.clone());
        registry.register(
            "weft_kernel_changes",
            "Routes, neighbours, FDB entries and devices changed",
            m.kernel_changes.clone(),
        );
        registry.register("weft_reconcile_milliseconds", "Duration of the last reconciliation", m.reconcile_ms.clone());
        registry.register("weft_udp_packets", "udp backend packets forwarded", m.udp_packets.clone());
        registry.register("weft_udp_drops", "udp backend packets dropped, by reason", m.udp_drops.clone());
        registry.register("weft_udp_offload", "udp backend offload paths in use", m.udp_offload.clone());
        registry.register(
            "weft_udp_fast_path_packets",
            "udp packets carried by the kernel fast path",
            m.udp_fast_path_packets.clone(),
        );
        registry.register("weft_errors", "Errors by kind", m.errors.clone());
        registry.register("weft_wireguard_packets", "wireguard packets, by kind", m.wg_packets.clone());
        registry.register("weft_wireguard_drops", "wireguard packets dropped, by reason", m.wg_drops.clone());
        registry.register("weft_wireguard_path", "wireguard data path in use (1), by path", m.wg_path.clone());
        registry.register("weft_wireguard_peers", "wireguard peers configured", m.wg_peers.clone());
        registry.register(
            "weft_leases_rejected",
            "Peer leases rejected (invalid, or losing a conflict to an older lease), by reason",
            m.leases_rejected.clone(),
        );
        registry.register(
            "weft_store_retries",
            "Store requests retried on another endpoint, by operation",
            m.store_retries.clone(),
        );
        registry.register(
            "weft_store_endpoint_up",
            "1 while the last request to this store endpoint succeeded",
            m.store_endpoint_up.clone(),
        );
        registry.register(
            "weft_store_last_progress_milliseconds",
            "Unix time (ms) the store last answered the lease list or watch",
            m.store_progress_ms.clone(),
        );
        registry.register(
            "weft_main_loop_last_progress_milliseconds",
            "Unix time (ms) the daemon main loop last ran",
            m.main_loop_ms.clone(),
        );
        registry.register("weft_netpol_enabled", "1 when this daemon enforces NetworkPolicy", m.netpol_enabled.clone());
        registry.register(
            "weft_netpol_transactions",
            "NetworkPolicy nft transactions run (changes and drift repairs)",
            m.netpol_transactions.clone(),
        );
        registry.register("weft_netpol_policies", "NetworkPolicies known, all namespaces", m.netpol_policies.clone());
        registry.register(
            "weft_netpol_policy_errors",
            "NetworkPolicies that cannot be read and are enforced fail-closed",
            m.netpol_policy_errors.clone(),
        );
        registry.register(
            "weft_netpol_last_apply_seconds",
            "Seconds the last NetworkPolicy compile and apply took",
            m.netpol_last_apply_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&vec![("kind", kind)]).inc();
    }

    /// Marks that the store answered the lease list or watch just now.
    pub fn store_progress(&self) {
        self.store_progress_ms.set(unix_ms());
    }

    /// Marks that the main loop ran just now.
    pub fn main_loop_progress(&self) {
        self.main_loop_ms.set(unix_ms());
    }

    /// How long ago the store last answered the list or watch (`None`: never).
    pub fn store_progress_age(&self) -> Option<std::time::Duration> {
        age(self.store_progress_ms.get())
    }

    /// How long ago the main loop last ran (`None`: not started).
    pub fn main_loop_age(&self) -> Option<std::time::Duration> {
        age(self.main_loop_ms.get())
    }

    /// Adds `f` to what runs before each rendering.
    pub fn on_render(&self, f: Refresher) {
        self.refreshers.lock().unwrap_or_else(|p| p.into_inner()).push(f);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        for refresh in self.refreshers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            refresh();
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn age(ms: i64) -> Option<std::time::Duration> {
    (ms > 0).then(|| std::time::Duration::from_millis(unix_ms().saturating_sub(ms).max(0) as u64))
}
