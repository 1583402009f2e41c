//! Backends with effects: what a host advertises in its lease, the devices it needs, and
//! the reconciler that keeps the kernel equal to the plan for the current peers.

pub mod alloc;
pub mod host_gw;
pub mod udp;
pub mod vxlan;
pub mod wireguard;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use ipnet::IpNet;
use weft_core::backend::BackendSpec;
use weft_core::cache::{LeaseCache, LeaseEvent};
use weft_core::config::NetworkConfig;
use weft_core::iface::External;
use weft_core::lease::{Lease, LeaseAttrs, SubnetKey};
use weft_core::plan::{self, Plan};
use weft_core::validate::Rules;

use crate::kernel::monitor::{Interest, SharedInterest};
use crate::kernel::{Kernel, KernelError, Links};
use crate::metrics::Metrics;
use crate::registry::watch::SharedLeaseCache;

/// A backend that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Invalid settings.
    #[error(transparent)]
    Config(#[from] weft_core::backend::BackendError),
    /// The host lacks an address the backend needs.
    #[error("{0}")]
    Address(String),
    /// Setting up a device failed.
    #[error("setting up the {backend} backend failed: {source}")]
    Kernel {
        /// Backend name.
        backend: &'static str,
        /// The netlink error.
        source: KernelError,
    },
}

/// What a backend is: each backend (alloc, host-gw, vxlan, udp) implements it in its own
/// file, and the [`DataPlane`] holds exactly one. Every kernel change goes through the
/// [`Kernel`] in plan terms; the reconciler calls these on every pass.
pub trait Backend: Send {
    /// The backend's name, as in the network config.
    fn name(&self) -> &'static str;

    /// Puts what peers need to reach us into our lease (vxlan: `VtepMAC`).
    fn advertise(&self, _attrs: &mut LeaseAttrs) {}

    /// Whether the backend programs the kernel at all (alloc does not).
    fn programs_kernel(&self) -> bool {
        true
    }

    /// Whether the backend's entries sit on the external interface, which the reconciler
    /// then follows by name when it is re-created.
    fn uses_underlay(&self) -> bool {
        true
    }

    /// The external interface has a new index: the devices must sit on it.
    fn set_underlay(&mut self, _index: u32) {}

    /// Our lease is known: address the devices for it and start the engine, if any.
    fn start<'a>(
        &'a mut self,
        _kernel: &'a Kernel,
        _own: &'a SubnetKey,
        _metrics: &'a Metrics,
    ) -> BoxFuture<'a, Result<(), KernelError>> {
        Box::pin(async { Ok(()) })
    }

    /// The devices the backend needs, repaired to their desired state whatever happened to
    /// them; `Ok(true)` when something had to change.
    fn ensure_devices<'a>(
        &'a mut self,
        _kernel: &'a Kernel,
        _own: &'a SubnetKey,
    ) -> BoxFuture<'a, Result<bool, KernelError>> {
        Box::pin(async { Ok(false) })
    }

    /// The links per-peer entries live on (after [`Backend::ensure_devices`]).
    fn links(&self, _links: &mut Links) {}

    /// The backend's devices as they are now (name, index): what the netlink monitor
    /// watches for the reconciler.
    fn devices(&self) -> Vec<(String, u32)> {
        Vec::new()
    }

    /// The per-peer kernel entries wanted for `peers` (the accepted leases), from the pure
    /// planner; `None` when the backend keeps no per-peer kernel entries (alloc, udp), so
    /// nothing is read or diffed.
    fn plan(&self, peers: &mut dyn Iterator<Item = &Lease>) -> Option<Plan>;

    /// As [`Backend::plan`], for the accepted peers of `cache` as it read them when they
    /// arrived (backend data parsed once): what the full pass calls, so a resync parses no
    /// JSON. The default plans from the leases.
    fn plan_cached(&self, cache: &LeaseCache) -> Option<Plan> {
        self.plan(&mut cache.accepted())
    }

    /// The accepted peers changed: `events` (already applied to `cache`) name the peers
    /// whose entries in the backend's own tables (udp, wireguard: the engine's peer table)
    /// must become what `cache` has in use for them now. One event touches its peer's
    /// entries alone: O(events), whatever the number of peers.
    fn peers_changed(&self, _events: &[LeaseEvent], _cache: &LeaseCache) {}

    /// The whole peer set is `cache`'s accepted leases (a new own lease, hence a new cache):
    /// the backend's own tables are rebuilt whole.
    fn peers_reset(&self, _cache: &LeaseCache) {}

    /// Stops the engine, if any, and joins its threads. Devices and kernel entries are left
    /// in place, as flanneld leaves them, so traffic keeps flowing across a restart.
    fn stop(&mut self) {}
}

/// Result of one reconciliation.
#[derive(Debug, Default)]
pub struct Report {
    /// Changes applied.
    pub changes: usize,
    /// Changes that failed (retried on the next pass).
    pub errors: Vec<KernelError>,
}

/// The data plane of one host.
pub struct DataPlane {
    backend: Box<dyn Backend>,
    kernel: Kernel,
    links: Links,
    networks: Vec<IpNet>,
    own: Vec<IpNet>,
    own_key: SubnetKey,
    metrics: Arc<Metrics>,
    warned: BTreeMap<SubnetKey, String>,
    /// The one peer set, validated (written by the lease watch): the planner and the udp
    /// peer table read its accepted leases.
    peers: SharedLeaseCache,
    /// What peer leases are judged by (the network, our addresses).
    rules: Rules,
    /// Destinations where a route of someone else keeps us from installing ours (logged once).
    blocked: std::collections::BTreeSet<IpNet>,
    /// The external interface's name: found again by it when the interface is re-created.
    ext_name: String,
    /// Keep `blackhole <own subnet>` routes (`--ip-blackhole-route`).
    blackhole: bool,
    /// What we own and want, for the netlink monitor's filter (updated on every pass).
    interest: SharedInterest,
    /// Whether the external interface is missing (logged once).
    ext_missing: bool,
    /// Peer changes since the last pass, for a pass that touches only their entries.
    pending: Vec<LeaseEvent>,
    /// Whether the model (`interest.desired`) matches the kernel: set by a clean full pass,
    /// cleared by any failure.
    model_ok: bool,
    /// When the last full pass (dump and diff of everything) ran.
    last_full: Option<Instant>,
    /// The next nexthop id to try for a new peer.
    next_nhid: u32,
    /// Many peers changed since the last full pass: hand the memory of their events back
    /// after it.
    trim: bool,
}

/// A full pass with this many changes (or after this many peer events) hands the memory of
/// its messages and dumps back to the system.
const TRIM_AFTER: usize = 256;

/// Returns the allocator's free pages to the system: the first pass at 20 000 peers builds
/// tens of MiB of requests, dumps and events that are not needed again.
/// CPU time of the whole process (user and system): a pass's cost apart from the waiting
/// that a loaded machine adds to its wall time.
fn cpu_time() -> std::time::Duration {
    // SAFETY: an all-zero rusage is a valid value; getrusage only writes into it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage for the call's duration.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return std::time::Duration::ZERO;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    std::time::Duration::from_micros(us(u.ru_utime) + us(u.ru_stime))
}

/// The allocator's bytes in use and free-but-held (KiB), for the debug log of a full pass:
/// where RSS goes (live data, or memory the allocator keeps).
fn heap_kib() -> (u64, u64) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 has no preconditions; it only reads glibc's arena statistics.
        let m = unsafe { libc::mallinfo2() };
        ((m.uordblks / 1024) as u64, (m.fordblks / 1024) as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        (0, 0)
    }
}

/// Keeps glibc's allocator from holding on to freed memory, for the daemon (called once,
/// at its start). By default a freed large block raises the mmap threshold (up to 32 MiB)
/// and the trim threshold with it (up to 64 MiB), so after a pass at 20 000 peers (tens of
/// MiB of dumps and requests, freed at its end) the memory stays in the process; and every
/// thread that allocates may get an arena of its own. Fixed thresholds hand large blocks
/// back when they are freed and trim the heap's free top above 1 MiB; two arenas are plenty
/// for a daemon whose allocations happen on two runtime threads (the udp and wireguard
/// engines do not allocate per packet).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets parameters of glibc's allocator, under its own lock; no
    // pointer is passed.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
}

fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only releases free memory of glibc's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Drop for DataPlane {
    /// A stopped daemon leaves no engine thread behind (SIGTERM, a lost lease, an error).
    fn drop(&mut self) {
        self.backend.stop();
    }
}

/// What `prepare` hands back before the lease exists.
pub struct Prepared {
    /// Our lease attributes.
    pub attrs: LeaseAttrs,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
    /// The data plane, to be finished once the lease is known.
    pub dataplane: DataPlane,
}

impl DataPlane {
    /// Validates the backend and sets up what must exist before the lease (the vxlan
    /// device, whose MAC goes into the lease).
    pub async fn prepare(
        cfg: &NetworkConfig,
        ext: &External,
        kernel: Kernel,
        metrics: Arc<Metrics>,
    ) -> Result<Prepared, BackendError> {
        let spec = BackendSpec::from_config(&cfg.backend)?;
        let mut attrs = LeaseAttrs::new(ext.public_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED));
        attrs.public_ipv6 = ext.public_ipv6;
        attrs.backend_type = spec.lease_type().to_string();
        let networks: Vec<IpNet> =
            cfg.v4.map(|r| IpNet::V4(r.network)).into_iter().chain(cfg.v6.map(|r| IpNet::V6(r.network))).collect();
        let backend: Box<dyn Backend> = match spec {
            BackendSpec::Alloc => Box::new(alloc::Alloc),
            BackendSpec::HostGw => Box::new(host_gw::HostGw::new(ext)?),
            BackendSpec::Vxlan(settings) => Box::new(vxlan::Vxlan::create(&kernel, cfg, ext, settings).await?),
            BackendSpec::Udp(settings) => Box::new(udp::UdpBackend::open(
                ext,
                settings,
                spec.mtu(ext.mtu),
                cfg.v4.map(|r| r.network),
                cfg.v4.map(|r| r.subnet_len).unwrap_or(24),
            )?),
            BackendSpec::Wireguard(settings) => {
                Box::new(wireguard::WireguardBackend::open(&kernel, cfg, ext, settings, spec.mtu(ext.mtu)).await?)
            }
        };
        backend.advertise(&mut attrs);
        let mut links = Links { external: ext.index, ..Links::default() };
        backend.links(&mut links);
        let mut rules = Rules::from_config(cfg);
        rules.own_ips = [ext.public_ip, ext.iface_addr]
            .into_iter()
            .flatten()
            .map(std::net::IpAddr::V4)
            .chain([ext.public_ipv6, ext.iface_addr_v6].into_iter().flatten().map(std::net::IpAddr::V6))
            .collect();
        Ok(Prepared {
            attrs,
            mtu: spec.mtu(ext.mtu),
            dataplane: DataPlane {
                backend,
                kernel,
                links,
                networks,
                own: Vec::new(),
                own_key: SubnetKey { v4: None, v6: None },
                metrics,
                warned: BTreeMap::new(),
                peers: SharedLeaseCache::for_host(rules.clone(), SubnetKey { v4: None, v6: None }),
                rules,
                blocked: Default::default(),
                ext_name: ext.name.clone(),
                blackhole: false,
                interest: Default::default(),
                ext_missing: false,
                pending: Vec::new(),
                model_ok: false,
                last_full: None,
                next_nhid: plan::NEXTHOP_IDS.start,
                trim: false,
            },
        })
    }

    /// Keeps `blackhole <own subnet>` routes as part of the desired state
    /// (`--ip-blackhole-route`); call before [`DataPlane::set_own`].
    pub fn set_blackhole(&mut self, on: bool) {
        self.blackhole = on;
    }

    /// The filter the netlink monitor applies, kept current by every pass.
    pub fn interest(&self) -> SharedInterest {
        self.interest.clone()
    }

    fn set_interest(&self, f: impl FnOnce(&mut Interest)) {
        let mut g = self.interest.write().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }

    /// Whether this backend programs the kernel at all.
    pub fn programs_kernel(&self) -> bool {
        self.backend.programs_kernel()
    }

    /// Records our lease (and gives the vxlan device its address).
    pub async fn set_own(&mut self, own: &SubnetKey) -> Result<(), KernelError> {
        self.own = own.v4.map(IpNet::V4).into_iter().chain(own.v6.map(IpNet::V6)).collect();
        self.peers = SharedLeaseCache::for_host(self.rules.clone(), *own);
        self.own_key = *own;
        self.backend.start(&self.kernel, own, &self.metrics).await?;
        self.backend.peers_reset(&self.peers.read());
        let (own, networks, blackhole) = (self.own.clone(), self.networks.clone(), self.blackhole);
        self.set_interest(move |i| (i.own, i.networks, i.blackhole) = (own, networks, blackhole));
        // In place before subnet.env is written, as flanneld orders it.
        if self.blackhole
            && let Err(e) = self.kernel.ensure_blackholes(&self.own).await
        {
            tracing::warn!("{e}");
        }
        Ok(())
    }

    /// The peer cache the lease watch must write (valid once [`DataPlane::set_own`] ran).
    pub fn peer_cache(&self) -> SharedLeaseCache {
        self.peers.clone()
    }

    /// The accepted peer set changed (`events`, already in the cache): the engine's peer
    /// table (udp, wireguard) follows, one peer per event; the next reconcile plans from the
    /// cache.
    pub fn peers_changed(&mut self, events: &[LeaseEvent]) {
        for e in events {
            if let LeaseEvent::Removed(l) = e {
                self.warned.remove(&l.key);
            }
        }
        if self.pending.len() + events.len() >= TRIM_AFTER {
            // So many changes (a listing at start) are served by a full pass: no copy of
            // every lease is kept for a pass that will not use it.
            self.pending = Vec::new();
            self.model_ok = false;
            self.trim = true;
        } else {
            self.pending.extend_from_slice(events);
        }
        self.backend.peers_changed(events, &self.peers.read());
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.backend.name()
    }

    /// Follows the external interface by name: deleted and re-created (a new index), it is
    /// found again and everything on it re-programmed (the kernel deletes a vxlan device
    /// with its underlay; the repair re-creates it on the new one). `Ok(false)` while the
    /// interface is missing.
    async fn follow_external(&mut self) -> Result<bool, KernelError> {
        let link = self.kernel.link(&self.ext_name).await?;
        let Some(link) = link else {
            if !self.ext_missing {
                tracing::warn!(iface = %self.ext_name, "the external interface is gone; waiting for it to come back");
                self.ext_missing = true;
            }
            return Ok(false);
        };
        let index = link.index;
        if self.ext_missing || index != self.links.external {
            tracing::info!(iface = %self.ext_name, index, "the external interface is back; re-programming everything on it");
            self.ext_missing = false;
            self.links.external = index;
            self.backend.set_underlay(index);
        }
        Ok(true)
    }

    /// Makes the kernel match the plan for the current peers. Devices deleted behind our
    /// back are re-created first (same MAC). Failures are reported, not fatal.
    pub async fn reconcile(&mut self) -> Report {
        let mut report = Report::default();
        if self.blackhole
            && let Err(e) = self.kernel.ensure_blackholes(&self.own).await
        {
            report.errors.push(e);
        }
        if !self.programs_kernel() {
            return report;
        }
        if self.backend.uses_underlay() {
            match self.follow_external().await {
                Ok(true) => {}
                Ok(false) => return report,
                Err(e) => {
                    report.errors.push(e);
                    return report;
                }
            }
        }
        match self.backend.ensure_devices(&self.kernel, &self.own_key).await {
            Ok(changed) => {
                if changed {
                    report.changes += 1;
                }
                self.backend.links(&mut self.links);
                let (links, devices, own) = (self.links, self.backend.devices(), self.own.clone());
                let (networks, ext_name, blackhole) = (self.networks.clone(), self.ext_name.clone(), self.blackhole);
                self.set_interest(move |i| {
                    (i.links, i.devices, i.own, i.networks, i.ext_name, i.blackhole) =
                        (links, devices, own, networks, ext_name, blackhole);
                });
            }
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        }
        let started = Instant::now();
        if self.peer_pass_possible() {
            let events = std::mem::take(&mut self.pending);
            if let Some(r) = self.peer_pass(&events).await {
                report.changes += r.changes;
                report.errors.extend(r.errors);
                return report;
            }
        }
        // Not `clear`: the first pass after a listing held every peer's event.
        self.pending = Vec::new();
        self.last_full = Some(started);
        let changed = self.interest.read().unwrap_or_else(|p| p.into_inner()).changed.clone();
        changed.store(false, std::sync::atomic::Ordering::SeqCst);
        self.model_ok = false;
        // Backends without per-peer kernel entries (udp forwards by its own table) are done
        // (an empty plan says which).
        if self.backend.plan(&mut std::iter::empty()).is_none() {
            return report;
        }
        let cpu = cpu_time();
        // The kernel is read on two other threads while this one plans.
        let reading = self.kernel.begin_read(&self.links, &self.networks, &self.own).await;
        let Some(mut p) = self.backend.plan_cached(&self.peers.read()) else { return report };
        let planned = started.elapsed();
        for (key, why) in p.skipped {
            if self.warned.get(&key) != Some(&why) {
                tracing::warn!(peer = %key, "ignoring peer lease: {why}");
                self.warned.insert(key, why);
            }
        }
        let (actual, displaced) = match reading.finish(&mut p.state).await {
            Ok(a) => a,
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        };
        for net in displaced {
            match self.kernel.restore_own_route(net, self.links.external).await {
                Ok(true) => {
                    tracing::warn!(
                        "the route of our own subnet {net} had been displaced to the external interface; restored it on the bridge"
                    );
                    report.changes += 1;
                }
                Ok(false) => {}
                Err(e) => report.errors.push(e),
            }
        }
        let read = started.elapsed();
        let ops = plan::diff(&p.state, &actual);
        let diffed = started.elapsed();
        // Before applying: the echoes of this pass then match what is wanted. The model it
        // replaces is dropped after the lock is released.
        let mut state = p.state;
        let entries = state.routes.len() + state.neighbors.len() + state.fdb.len();
        self.set_interest(|i| std::mem::swap(&mut i.desired, &mut state));
        drop(state);
        drop(actual);
        tracing::debug!(
            plan_us = planned.as_micros() as u64,
            read_us = (read - planned).as_micros() as u64,
            diff_us = (diffed - read).as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            cpu_us = cpu_time().saturating_sub(cpu).as_micros() as u64,
            changes = ops.len(),
            heap_kib = heap_kib().0,
            heap_free_kib = heap_kib().1,
            "full pass"
        );
        if !ops.is_empty() {
            // Routes known to be blocked by someone else's are retried quietly on every pass.
            let quiet = ops.len() == ops.routes_add.iter().filter(|r| self.blocked.contains(&r.dst)).count();
            if ops.len() <= 20 && !quiet {
                for line in ops.describe() {
                    tracing::info!("{line}");
                }
            }
            let applied = self.kernel.apply(&ops, &self.links).await;
            report.errors.extend(applied.errors);
            for r in &applied.blocked {
                if self.blocked.insert(r.dst) {
                    tracing::warn!(
                        "a route to {} that weft did not install is in the way: leaving it alone, so peer subnet {} is not routed by weft; remove that route if the peer should be reachable",
                        r.dst,
                        r.dst
                    );
                    self.metrics.error("route_blocked");
                }
            }
            self.blocked.retain(|d| applied.blocked.iter().any(|r| r.dst == *d));
            report.changes += ops.len() - (report.errors.len() + applied.blocked.len()).min(ops.len());
            if !quiet {
                tracing::info!(
                    changes = ops.len(),
                    failed = report.errors.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "kernel reconciled"
                );
            }
        }
        self.model_ok = report.errors.is_empty() && self.blocked.is_empty();
        self.next_nhid = plan::NEXTHOP_IDS.start;
        if ops.len() >= TRIM_AFTER || std::mem::take(&mut self.trim) {
            release_free_memory();
            // Once more when the echoes of this pass (the netlink monitor's backlog) are gone.
            tokio::spawn(async {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                let _ = tokio::task::spawn_blocking(release_free_memory).await;
            });
        } else if entries >= TRIM_AFTER {
            // Even a pass with nothing to do read and freed every entry the kernel holds
            // (80 000 at 20 000 peers), between the live data: the freed pages go back (off
            // the pass's clock). Without it RSS at 20 000 peers crept from 26 to 35 MiB over
            // three resyncs.
            drop(tokio::task::spawn_blocking(release_free_memory));
        }
        report
    }

    /// Whether the next pass may touch only the changed peers' entries: a clean full pass
    /// came before, within the resync period, nothing changed in the kernel since, and the
    /// nexthop mode is known.
    fn peer_pass_possible(&self) -> bool {
        let changed =
            self.interest.read().unwrap_or_else(|p| p.into_inner()).changed.load(std::sync::atomic::Ordering::SeqCst);
        self.model_ok
            && !changed
            && !self.pending.is_empty()
            && self.kernel.nexthops_in_use().is_some()
            && self.last_full.is_some_and(|t| t.elapsed() < weft_core::schedule::RESYNC)
    }

    /// Programs the entries of the peers in `events` alone: O(changes), no dump. `None` when
    /// a full pass must serve them (a changed peer, a duplicate, a route in the way).
    async fn peer_pass(&mut self, events: &[LeaseEvent]) -> Option<Report> {
        let started = Instant::now();
        let mut keys = std::collections::BTreeSet::new();
        let mut gone = plan::KernelState::default();
        let mut new = plan::KernelState::default();
        for e in events {
            let (l, into) = match e {
                LeaseEvent::Added(l) => (l, &mut new),
                LeaseEvent::Removed(l) => (l, &mut gone),
            };
            if !keys.insert(l.key) {
                return None;
            }
            let p = self.backend.plan(&mut std::iter::once(l))?;
            for (key, why) in p.skipped {
                if self.warned.get(&key) != Some(&why) {
                    tracing::warn!(peer = %key, "ignoring peer lease: {why}");
                    self.warned.insert(key, why);
                }
            }
            into.routes.extend(p.state.routes);
            into.neighbors.extend(p.state.neighbors);
            into.fdb.extend(p.state.fdb);
        }
        let foreign =
            if self.kernel.nexthops_in_use() == Some(true) { Some(self.kernel.foreign_nexthop_ids()) } else { None };
        let ops = {
            let mut i = self.interest.write().unwrap_or_else(|p| p.into_inner());
            let taken = |id: u32| foreign.as_ref().is_some_and(|f| f.contains(&id));
            let ids = foreign.is_some().then_some((&taken as &dyn Fn(u32) -> bool, &mut self.next_nhid));
            plan::peer_delta(&mut i.desired, &gone, &new, ids)?
        };
        let applied = self.kernel.apply(&ops, &self.links).await;
        let mut report = Report { changes: ops.len() - applied.errors.len().min(ops.len()), errors: applied.errors };
        if !report.errors.is_empty() || !applied.blocked.is_empty() {
            // The model no longer says what the kernel holds: the next pass is a full one.
            self.model_ok = false;
            if !applied.blocked.is_empty() {
                return None;
            }
            report.changes = report.changes.min(ops.len());
        }
        tracing::debug!(changes = ops.len(), took_us = started.elapsed().as_micros() as u64, "peers programmed");
        Some(report)
    }
}
