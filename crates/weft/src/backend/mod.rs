//! Backends with effects: what a host advertises in its lease, the devices it needs, and
//! the reconciler that keeps the kernel equal to the plan for the current peers.

pub mod host_gw;
pub mod udp;
pub mod vxlan;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;
use weft_core::backend::{BackendSpec, Mac};
use weft_core::cache::LeaseEvent;
use weft_core::config::NetworkConfig;
use weft_core::iface::External;
use weft_core::lease::{Lease, LeaseAttrs, SubnetKey};
use weft_core::plan::{self, HostFacts};
use weft_core::validate::{Outcome, Rules, Validator};

use crate::daemon::metrics::Metrics;
use crate::kernel::{Kernel, KernelError, Links};

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
    spec: BackendSpec,
    kernel: Kernel,
    links: Links,
    networks: Vec<IpNet>,
    own: Vec<IpNet>,
    facts: HostFacts,
    vxlan: Option<vxlan::Vxlan>,
    udp: Option<udp::UdpBackend>,
    subnet_len: u8,
    metrics: Arc<Metrics>,
    peers: BTreeMap<SubnetKey, Lease>,
    warned: BTreeMap<SubnetKey, String>,
    /// Judges peer leases before they reach the planner or the udp peer table.
    validator: Validator,
    rules: Rules,
    /// Destinations where a route of someone else keeps us from installing ours (logged once).
    blocked: std::collections::BTreeSet<IpNet>,
    /// The external interface's name: found again by it when the interface is re-created.
    ext_name: String,
    /// Whether the external interface is missing (logged once).
    ext_missing: bool,
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
        let mut links = Links { external: ext.index, ..Links::default() };
        let mut vx = None;
        let mut udp_backend = None;
        match spec {
            BackendSpec::Alloc => {}
            BackendSpec::HostGw => host_gw::check(ext)?,
            BackendSpec::Vxlan(settings) => {
                let v = vxlan::Vxlan::create(&kernel, cfg, ext, settings).await?;
                v.fill_lease(&mut attrs);
                links.vxlan4 = v.v4.map(|d| d.index);
                links.vxlan6 = v.v6.map(|d| d.index);
                vx = Some(v);
            }
            BackendSpec::Udp(settings) => {
                udp_backend = Some(udp::UdpBackend::open(ext, settings, spec.mtu(ext.mtu), cfg.v4.map(|r| r.network))?);
            }
        }
        let networks: Vec<IpNet> =
            cfg.v4.map(|r| IpNet::V4(r.network)).into_iter().chain(cfg.v6.map(|r| IpNet::V6(r.network))).collect();
        let connected = if matches!(spec, BackendSpec::Vxlan(v) if v.direct_routing) {
            kernel
                .connected_prefixes(ext.index)
                .await
                .map_err(|source| BackendError::Kernel { backend: "vxlan", source })?
        } else {
            Vec::new()
        };
        let facts = HostFacts { connected, vxlan6: links.vxlan6.is_some() };
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
                spec,
                kernel,
                links,
                networks,
                own: Vec::new(),
                facts,
                vxlan: vx,
                udp: udp_backend,
                subnet_len: cfg.v4.map(|r| r.subnet_len).unwrap_or(24),
                metrics,
                peers: BTreeMap::new(),
                warned: BTreeMap::new(),
                validator: Validator::new(rules.clone()),
                rules,
                blocked: Default::default(),
                ext_name: ext.name.clone(),
                ext_missing: false,
            },
        })
    }

    /// Whether this backend programs the kernel at all.
    pub fn programs_kernel(&self) -> bool {
        !matches!(self.spec, BackendSpec::Alloc)
    }

    /// Records our lease (and gives the vxlan device its address).
    pub async fn set_own(&mut self, own: &SubnetKey) -> Result<(), KernelError> {
        self.own = own.v4.map(IpNet::V4).into_iter().chain(own.v6.map(IpNet::V6)).collect();
        self.rules.own = Some(*own);
        let outcome = self.validator.set_rules(self.rules.clone());
        self.absorb(outcome);
        if let Some(v) = &self.vxlan {
            v.address(&self.kernel, own).await?;
        }
        if let (Some(u), Some(v4)) = (&mut self.udp, own.v4) {
            u.start(&self.kernel, v4, &self.metrics).await?;
        }
        Ok(())
    }

    /// Our lease subnets.
    pub fn own_subnets(&self) -> &[IpNet] {
        &self.own
    }

    /// Applies peer lease events to the peer table, through the validator: a lease that
    /// breaks a rule or loses a conflict never reaches the planner or the udp engine.
    pub fn update(&mut self, events: &[LeaseEvent]) {
        for e in events {
            let outcome = self.validator.apply(e);
            self.absorb(outcome);
        }
        if let Some(u) = &self.udp {
            u.set_peers(self.subnet_len, self.peers.values());
        }
    }

    /// The peer leases not in use, with why (for `/metrics` and logs).
    pub fn rejected(&self) -> &BTreeMap<SubnetKey, weft_core::validate::Reject> {
        self.validator.rejected()
    }

    fn absorb(&mut self, outcome: Outcome) {
        for (key, why) in &outcome.rejected {
            tracing::warn!(peer = %key, reason = why.label(), "rejecting peer lease: {why}");
            self.metrics.leases_rejected.get_or_create(&vec![("reason", why.label())]).inc();
        }
        for e in &outcome.events {
            match e {
                LeaseEvent::Added(l) => {
                    self.peers.insert(l.key, l.clone());
                }
                LeaseEvent::Removed(l) => {
                    self.peers.remove(&l.key);
                    self.warned.remove(&l.key);
                }
            }
        }
    }

    /// The MAC(s) we advertise, if vxlan.
    pub fn vtep_macs(&self) -> (Option<Mac>, Option<Mac>) {
        match &self.vxlan {
            Some(v) => (v.v4.map(|d| d.mac), v.v6.map(|d| d.mac)),
            None => (None, None),
        }
    }

    /// Follows the external interface by name: deleted and re-created (a new index), it is
    /// found again and everything on it re-programmed (the kernel deletes a vxlan device
    /// with its underlay; the repair re-creates it on the new one). `Ok(false)` while the
    /// interface is missing.
    async fn follow_external(&mut self) -> Result<bool, KernelError> {
        let link = crate::kernel::vxlan::link_by_name(&self.kernel.handle, &self.ext_name).await?;
        let Some(link) = link else {
            if !self.ext_missing {
                tracing::warn!(iface = %self.ext_name, "the external interface is gone; waiting for it to come back");
                self.ext_missing = true;
            }
            return Ok(false);
        };
        let index = link.header.index;
        if self.ext_missing || index != self.links.external {
            tracing::info!(iface = %self.ext_name, index, "the external interface is back; re-programming everything on it");
            self.ext_missing = false;
            self.links.external = index;
            if let Some(v) = &mut self.vxlan {
                v.set_underlay(index);
            }
        }
        Ok(true)
    }

    /// Makes the kernel match the plan for the current peers. Devices deleted behind our
    /// back are re-created first (same MAC). Failures are reported, not fatal.
    pub async fn reconcile(&mut self) -> Report {
        let mut report = Report::default();
        if !self.programs_kernel() {
            return report;
        }
        if let Some(u) = &self.udp {
            // The engine forwards by its peer table; the kernel only needs flannel0 in place.
            if let Err(e) = u.ensure(&self.kernel).await {
                report.errors.push(e);
            }
            return report;
        }
        match self.follow_external().await {
            Ok(true) => {}
            Ok(false) => return report,
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        }
        if let Some(v) = &mut self.vxlan {
            match v.repair(&self.kernel, &self.own).await {
                Ok(changed) => {
                    if changed {
                        report.changes += 1;
                    }
                    self.links.vxlan4 = v.v4.map(|d| d.index);
                    self.links.vxlan6 = v.v6.map(|d| d.index);
                }
                Err(e) => {
                    report.errors.push(e);
                    return report;
                }
            }
        }
        let started = Instant::now();
        let p = plan::plan(&self.spec, self.peers.values(), &self.facts);
        for (key, why) in p.skipped {
            if self.warned.get(&key) != Some(&why) {
                tracing::warn!(peer = %key, "ignoring peer lease: {why}");
                self.warned.insert(key, why);
            }
        }
        let (actual, displaced) = match self.kernel.read_state(&self.links, &self.networks, &self.own).await {
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
        let ops = plan::diff(&p.state, &actual);
        if !ops.is_empty() {
            // Routes known to be blocked by someone else's are retried quietly on every pass.
            let quiet = ops.len() == ops.routes_add.iter().filter(|r| self.blocked.contains(&r.dst)).count();
            if ops.len() <= 20 && !quiet {
                for line in ops.describe() {
                    tracing::info!("{line}");
                }
            }
            let applied = self.kernel.apply(&ops, &self.links).await;
            report.errors = applied.errors;
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
        report
    }
}
