//! wireguard: `flannel-wg` (and `flannel-wg-v6` in `separate` mode with IPv6) carries the
//! whole cluster network, encrypted, as flanneld's wireguard backend does, and speaks the
//! same protocol to the same lease data (a mixed cluster of weft and flanneld hosts works).
//! flanneld needs the kernel's WireGuard; weft probes the kernel: where it can create a
//! `wireguard` link, the device is programmed over generic netlink
//! (`crate::wireguard::kernel`); otherwise (or with `WEFT_WIREGUARD=userspace`) WireGuard
//! runs in userspace on a TUN device (`crate::wireguard`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use futures::future::BoxFuture;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::value::RawValue;
use weft_core::cache::{LeaseCache, LeaseEvent};
use weft_core::config::NetworkConfig;
use weft_core::iface::External;
use weft_core::lease::{Lease, LeaseAttrs, SubnetKey};
use weft_core::plan::Plan;
use weft_core::wireguard::{
    DEVICE, DEVICE_V6, DeviceSpec, Key, Local, WireguardSettings, devices, ip_family_wanted, lease_data, plan_peers,
};

use super::{Backend, BackendError};
use crate::kernel::{Kernel, KernelError};
use crate::metrics::Metrics;
use crate::wireguard::Engine;
use crate::wireguard::kernel::{KernelDevice, PeerSettings};
use crate::wireguard::key::{key_path, load_or_generate, public_of};

/// How a device moves packets.
enum DataPath {
    /// weft's userspace engine on a TUN device.
    User(Engine),
    /// A kernel `wireguard` link, programmed over generic netlink (it knows what it last
    /// programmed; a re-created link is configured whole again).
    Kernel(KernelDevice),
}

/// One of the backend's devices: what it is for, its data path, its index.
struct Device {
    spec: DeviceSpec,
    path: DataPath,
    /// Its index, as of the last repair.
    index: Option<u32>,
    /// Its peers as last planned, by lease (the kernel path programs what changed on the
    /// next pass).
    peers: std::sync::Mutex<BTreeMap<SubnetKey, weft_core::wireguard::Peer>>,
}

/// Which data path `WEFT_WIREGUARD` asks for: `userspace`, `kernel`, or (unset) the
/// kernel's when it can create a `wireguard` link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Userspace,
    Kernel,
    Probe,
}

fn wanted_path(v: Option<&str>) -> Result<Want, BackendError> {
    match v {
        None | Some("") => Ok(Want::Probe),
        Some("userspace") => Ok(Want::Userspace),
        Some("kernel") => Ok(Want::Kernel),
        Some(other) => Err(BackendError::Address(format!(
            "WEFT_WIREGUARD={other:?} is not a WireGuard data path: use userspace or kernel, or unset it to let weft \
             choose"
        ))),
    }
}

/// The wireguard backend (userspace data path): `flannel-wg`, and `flannel-wg-v6` in
/// `separate` mode with IPv6.
pub struct WireguardBackend {
    devs: Vec<Device>,
    settings: WireguardSettings,
    mtu: u32,
    /// The IPv4 network and its lease prefix length.
    v4: Option<(Ipv4Net, u8)>,
    /// The IPv6 network and its lease prefix length.
    v6: Option<(Ipv6Net, u8)>,
    own: Option<SubnetKey>,
    public: Key,
    local: Local,
    peers_gauge: Option<prometheus_client::metrics::gauge::Gauge>,
    /// The private key (the kernel path writes it into the device).
    private: Key,
}

fn kernel_err(op: String) -> KernelError {
    KernelError { op, source: rtnetlink::Error::RequestFailed }
}

/// The local addresses a device's sockets bind (`ListenPort` on the interface's address of
/// each outer family the device speaks).
fn binds(s: &WireguardSettings, spec: &DeviceSpec, ext: &External) -> Result<Vec<SocketAddr>, BackendError> {
    let v4 = ext.iface_addr.map(|a| SocketAddr::new(IpAddr::V4(a), spec.port));
    // A link-local address needs its interface.
    let v6 = ext.iface_addr_v6.map(|a| {
        let scope = if (a.segments()[0] & 0xffc0) == 0xfe80 { ext.index } else { 0 };
        SocketAddr::V6(SocketAddrV6::new(a, spec.port, 0, scope))
    });
    let missing = |family: &str| {
        BackendError::Address(format!(
            "wireguard: {} reaches its peers over {family}, but interface {} has no {family} address; \
             give it one, or choose another Mode",
            spec.name, ext.name
        ))
    };
    match ip_family_wanted(s, spec) {
        Some(false) => Ok(vec![v4.ok_or_else(|| missing("IPv4"))?]),
        Some(true) => Ok(vec![v6.ok_or_else(|| missing("IPv6"))?]),
        None => {
            let b: Vec<SocketAddr> = v4.into_iter().chain(v6).collect();
            if b.is_empty() { Err(missing("IPv4 or IPv6")) } else { Ok(b) }
        }
    }
}

impl WireguardBackend {
    /// Loads (or generates) the private key, decides the data path, opens the devices the
    /// network needs and binds their sockets.
    pub async fn open(
        kernel: &Kernel,
        cfg: &NetworkConfig,
        ext: &External,
        s: WireguardSettings,
        mtu: u32,
    ) -> Result<WireguardBackend, BackendError> {
        let (v4, v6) = (cfg.v4.map(|r| (r.network, r.subnet_len)), cfg.v6.map(|r| (r.network, r.subnet_len)));
        let specs = devices(&s, v4.is_some(), v6.is_some());
        if specs.is_empty() {
            return Err(BackendError::Address(
                "wireguard: the network config has neither Network nor IPv6Network".into(),
            ));
        }
        let path = key_path();
        let (private, generated) = load_or_generate(&path).map_err(|e| BackendError::Address(e.to_string()))?;
        let public = public_of(&private);
        if generated {
            tracing::info!(file = %path.display(), public_key = %public.to_base64(), "generated a WireGuard private key");
        } else {
            tracing::info!(file = %path.display(), public_key = %public.to_base64(), "loaded the WireGuard private key");
        }
        let fail = |source| BackendError::Kernel { backend: "wireguard", source };
        // flanneld deletes an existing device of that name and creates its own; one left by
        // another Mode (flannel-wg-v6 of `separate`) goes too.
        for name in [DEVICE, DEVICE_V6] {
            if kernel.delete_link(name).await.map_err(fail)? {
                tracing::info!("deleted an existing {name} device (a previous flanneld's or weft's)");
            }
        }
        let want = wanted_path(std::env::var("WEFT_WIREGUARD").ok().as_deref())?;
        let use_kernel = match want {
            Want::Userspace => {
                tracing::info!("wireguard path: userspace (WEFT_WIREGUARD=userspace)");
                false
            }
            Want::Kernel | Want::Probe => match kernel.probe_wireguard(DEVICE).await {
                Ok(()) => {
                    tracing::info!("wireguard path: kernel (this kernel creates wireguard links)");
                    true
                }
                Err(e) if want == Want::Kernel => {
                    return Err(BackendError::Address(format!(
                        "wireguard: WEFT_WIREGUARD=kernel, but this kernel cannot create a wireguard link ({e}); \
                         load the wireguard module, or unset WEFT_WIREGUARD for the userspace path"
                    )));
                }
                Err(e) => {
                    tracing::info!("wireguard path: userspace, since this kernel cannot create a wireguard link ({e})");
                    false
                }
            },
        };
        let mut devs = Vec::new();
        for spec in specs {
            let path = if use_kernel {
                let dev = KernelDevice::connect(spec.name).map_err(|e| BackendError::Address(e.to_string()))?;
                DataPath::Kernel(dev)
            } else {
                // The kernel's device listens on every address; weft's sockets bind the
                // interface's, one per outer family the device speaks.
                let b = binds(&s, &spec, ext)?;
                DataPath::User(Engine::open(spec.name, &b, &private).map_err(|e| {
                    let at: Vec<String> = b.iter().map(|a| a.to_string()).collect();
                    BackendError::Address(format!(
                        "wireguard: cannot open {} or bind UDP {}: {e}; is another flanneld or weft running here?",
                        spec.name,
                        at.join(" and ")
                    ))
                })?)
            };
            devs.push(Device { spec, path, index: None, peers: Default::default() });
        }
        Ok(WireguardBackend {
            devs,
            settings: s,
            mtu,
            v4,
            v6,
            own: None,
            public,
            local: Local { has_v4: ext.iface_addr.is_some(), v6: ext.iface_addr_v6 },
            peers_gauge: None,
            private,
        })
    }

    /// `userspace` or `kernel`.
    fn path_name(&self) -> &'static str {
        match self.devs.first().map(|d| &d.path) {
            Some(DataPath::Kernel(_)) => "kernel",
            _ => "userspace",
        }
    }

    /// Our subnets a device carries.
    fn own_of(&self, spec: &DeviceSpec) -> Vec<IpNet> {
        let Some(own) = self.own else { return Vec::new() };
        let v4 = own.v4.filter(|_| spec.inner_v4).map(IpNet::V4);
        let v6 = own.v6.filter(|_| spec.inner_v6).map(IpNet::V6);
        v4.into_iter().chain(v6).collect()
    }

    /// Each device up with our MTU, our subnet's base address (/32, /128) and the route of
    /// the network of each family it carries; re-opened when it was deleted. Changes only
    /// what is wrong.
    async fn ensure(&mut self, kernel: &Kernel) -> Result<bool, KernelError> {
        let Some(own) = self.own else { return Ok(false) };
        let mut changed = false;
        let ps = PeerSettings { psk: self.settings.psk, keepalive: self.settings.keepalive };
        for d in &mut self.devs {
            let name = d.spec.name;
            let link = match kernel.link(name).await? {
                Some(l) => l,
                None => {
                    match &mut d.path {
                        DataPath::User(engine) => {
                            tracing::warn!("{name} is gone; re-opening it and restarting the engine");
                            engine.reopen().map_err(|e| kernel_err(format!("re-open {name}: {e}")))?;
                        }
                        DataPath::Kernel(dev) => {
                            tracing::warn!("{name} is gone; creating it again");
                            kernel.add_wireguard_link(name).await?;
                            dev.created();
                        }
                    }
                    changed = true;
                    kernel.link(name).await?.ok_or_else(|| kernel_err(format!("find {name} after re-opening it")))?
                }
            };
            // The kernel path's peers are desired state: each pass sends what differs from
            // what the device was last given (nothing when no lease changed; the peer of a
            // lease event alone), and now and then everything (drift, see `FULL_RESEND`).
            if let DataPath::Kernel(dev) = &mut d.path {
                let c = dev.changes(d.peers.lock().unwrap_or_else(|p| p.into_inner()).values(), &ps);
                dev.program(&self.private, d.spec.port, c).await.map_err(|e| kernel_err(e.to_string()))?;
            }
            d.index = Some(link.index);
            if !link.up || link.mtu != Some(self.mtu) {
                tracing::warn!("{name} was down or had another MTU; restoring it");
                kernel.set_up(link.index, self.mtu, name).await?;
                changed = true;
            }
            if d.spec.inner_v4
                && let (Some(sub), Some((net, _))) = (own.v4, self.v4)
            {
                let addr = IpNet::new(IpAddr::V4(sub.network()), 32).expect("/32");
                changed |= kernel.ensure_address(link.index, addr, IpNet::V4(net)).await?;
                kernel.ensure_device_route(net, link.index).await?;
            }
            if d.spec.inner_v6
                && let (Some(sub), Some((net, _))) = (own.v6, self.v6)
            {
                let addr = IpNet::new(IpAddr::V6(sub.network()), 128).expect("/128");
                changed |= kernel.ensure_address(link.index, addr, IpNet::V6(net)).await?;
                kernel.ensure_device_route_v6(net, link.index).await?;
            }
        }
        Ok(changed)
    }

    /// The lease prefix lengths (IPv4, IPv6) the engines key their tables by.
    fn prefixes(&self) -> (u8, u8) {
        (self.v4.map(|(_, l)| l).unwrap_or(24), self.v6.map(|(_, l)| l).unwrap_or(64))
    }

    fn warn_unreachable(d: &Device, left_out: &[weft_core::wireguard::Peer]) {
        for p in left_out {
            tracing::warn!(
                peer = %p.lease,
                "ignoring peer lease: its endpoint {} is of an address family {} has no socket for",
                p.endpoint,
                d.spec.name
            );
        }
    }

    /// The gauge from the tables' sizes (O(devices)).
    fn count(&self) {
        let Some(g) = &self.peers_gauge else { return };
        let n: usize = self
            .devs
            .iter()
            .map(|d| match &d.path {
                DataPath::User(engine) => engine.peer_count(),
                DataPath::Kernel(_) => d.peers.lock().map(|p| p.len()).unwrap_or(0),
            })
            .sum();
        g.set(n as i64);
    }

    /// Rebuilds every device's peers from `leases` (the whole accepted set).
    fn set_peers(&self, leases: &[&Lease]) {
        let (prefix, prefix6) = self.prefixes();
        for d in &self.devs {
            let plan = plan_peers(&self.settings, &d.spec, &self.local, leases.iter().copied());
            for (key, why) in &plan.skipped {
                tracing::warn!(peer = %key, "ignoring peer lease: {why}");
            }
            let left_out = match &d.path {
                DataPath::User(engine) => {
                    engine.set_peers(prefix, prefix6, &plan.peers, self.settings.psk, self.settings.keepalive)
                }
                DataPath::Kernel(_) => Vec::new(),
            };
            *d.peers.lock().unwrap_or_else(|p| p.into_inner()) = plan.peers.into_iter().map(|p| (p.lease, p)).collect();
            Self::warn_unreachable(d, &left_out);
        }
        self.count();
    }

    /// Changes, on every device, the peers of the leases in `events` alone, to what `cache`
    /// has in use for them now.
    fn change_peers(&self, events: &[LeaseEvent], cache: &LeaseCache) {
        let (prefix, prefix6) = self.prefixes();
        let mut planned = Vec::with_capacity(events.len());
        for d in &self.devs {
            planned.clear();
            for (key, lease) in cache.current(events) {
                let mut plan = plan_peers(&self.settings, &d.spec, &self.local, lease);
                for (key, why) in &plan.skipped {
                    tracing::warn!(peer = %key, "ignoring peer lease: {why}");
                }
                planned.push((key, plan.peers.pop()));
            }
            let left_out = match &d.path {
                DataPath::User(engine) => engine.update_peers(
                    prefix,
                    prefix6,
                    planned.iter().map(|(k, p)| (*k, p.as_ref())),
                    self.settings.psk,
                    self.settings.keepalive,
                ),
                DataPath::Kernel(_) => Vec::new(),
            };
            let mut m = d.peers.lock().unwrap_or_else(|p| p.into_inner());
            for (key, p) in planned.drain(..) {
                match p {
                    Some(p) => m.insert(key, p),
                    None => m.remove(&key),
                };
            }
            drop(m);
            Self::warn_unreachable(d, &left_out);
        }
        self.count();
    }
}

impl Backend for WireguardBackend {
    fn name(&self) -> &'static str {
        "wireguard"
    }

    /// `{"PublicKey":"…","Port":<ListenPort>}`, and `BackendV6Data` with IPv6.
    fn advertise(&self, attrs: &mut LeaseAttrs) {
        let (v4, v6) = lease_data(&self.settings, &self.public, self.v4.is_some(), self.v6.is_some());
        attrs.backend_data = v4.and_then(|d| RawValue::from_string(d).ok());
        attrs.backend_v6_data = v6.and_then(|d| RawValue::from_string(d).ok());
    }

    /// The sockets are bound to the interface's addresses; the devices are repaired by name.
    fn uses_underlay(&self) -> bool {
        false
    }

    fn start<'a>(
        &'a mut self,
        kernel: &'a Kernel,
        own: &'a SubnetKey,
        metrics: &'a Metrics,
    ) -> BoxFuture<'a, Result<(), KernelError>> {
        Box::pin(async move {
            self.own = Some(*own);
            self.ensure(kernel).await?;
            metrics.wg_path.get_or_create(&vec![("path", self.path_name())]).set(1);
            self.peers_gauge = Some(metrics.wg_peers.clone());
            let planned = |d: &Device| d.peers.lock().map(|p| p.len()).unwrap_or(0);
            metrics.wg_peers.set(self.devs.iter().map(planned).sum::<usize>() as i64);
            for i in 0..self.devs.len() {
                let nets = self.own_of(&self.devs[i].spec);
                let d = &mut self.devs[i];
                if let DataPath::User(engine) = &mut d.path {
                    engine
                        .start(nets, metrics)
                        .map_err(|e| kernel_err(format!("start the wireguard engine of {}: {e}", d.spec.name)))?;
                }
            }
            Ok(())
        })
    }

    fn ensure_devices<'a>(
        &'a mut self,
        kernel: &'a Kernel,
        _own: &'a SubnetKey,
    ) -> BoxFuture<'a, Result<bool, KernelError>> {
        Box::pin(self.ensure(kernel))
    }

    fn devices(&self) -> Vec<(String, u32)> {
        self.devs.iter().filter_map(|d| d.index.map(|i| (d.spec.name.to_string(), i))).collect()
    }

    /// The device routes by its own peer table; the kernel's routing table holds only the
    /// device routes.
    fn plan(&self, _peers: &mut dyn Iterator<Item = &Lease>) -> Option<Plan> {
        None
    }

    fn peers_changed(&self, events: &[LeaseEvent], cache: &LeaseCache) {
        self.change_peers(events, cache);
    }

    fn peers_reset(&self, cache: &LeaseCache) {
        let leases: Vec<&Lease> = cache.accepted().collect();
        self.set_peers(&leases);
    }

    /// Stops the engines and deletes the devices, as flanneld deletes its WireGuard devices
    /// on shutdown (a TUN device goes with its descriptor; a kernel one, or a persistent
    /// one left by someone, by name).
    fn stop(&mut self) {
        if self.devs.is_empty() {
            return;
        }
        let names: Vec<&str> = self.devs.iter().map(|d| d.spec.name).collect();
        // Dropping an engine joins its threads and closes its TUN descriptor; a kernel
        // device is deleted by name below.
        self.devs.clear();
        match remove_devices_blocking() {
            Ok(left) if !left.is_empty() => tracing::info!(devices = ?left, "deleted the remaining WireGuard devices"),
            Ok(_) => {}
            Err(e) => tracing::warn!("deleting the WireGuard devices {names:?} failed: {e}"),
        }
        tracing::info!(devices = ?names, "wireguard devices deleted (as flanneld does on shutdown)");
    }
}

/// Whether a link is a WireGuard device of flannel's: named `flannel-wg` or
/// `flannel-wg-v6`, and a kernel `wireguard` link or a TUN device (weft's userspace path,
/// wireguard-go). A link of another kind with that name is someone else's.
pub fn is_own_device(name: &str, kind: Option<&netlink_packet_route::link::InfoKind>) -> bool {
    use netlink_packet_route::link::InfoKind;
    (name == DEVICE || name == DEVICE_V6) && matches!(kind, Some(InfoKind::Wireguard | InfoKind::Tun))
}

/// Deletes flannel's WireGuard devices (see [`is_own_device`]) in this network namespace;
/// returns their names. flanneld deletes them on shutdown; `weft cleanup` does too.
pub async fn remove_devices(h: &rtnetlink::Handle) -> Result<Vec<String>, KernelError> {
    use futures::TryStreamExt;
    use netlink_packet_route::link::{LinkAttribute, LinkInfo};
    let mut removed = Vec::new();
    for name in [DEVICE, DEVICE_V6] {
        let found = match h.link().get().match_name(name.to_string()).execute().try_next().await {
            Ok(l) => l,
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => None,
            Err(e) => return Err(KernelError { op: format!("look up {name}"), source: e }),
        };
        let Some(l) = found else { continue };
        let kind = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => {
                infos.iter().find_map(|i| if let LinkInfo::Kind(k) = i { Some(k.clone()) } else { None })
            }
            _ => None,
        });
        if !is_own_device(name, kind.as_ref()) {
            continue;
        }
        match h.link().del(l.header.index).execute().await {
            Ok(()) => removed.push(name.to_string()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
            Err(e) => return Err(KernelError { op: format!("delete {name}"), source: e }),
        }
    }
    Ok(removed)
}

/// [`remove_devices`] from synchronous code (a backend's `stop`, which may run outside
/// the runtime): on a thread of its own, with its own netlink connection, in this thread's
/// network namespace.
fn remove_devices_blocking() -> Result<Vec<String>, String> {
    let netns = std::fs::File::open("/proc/thread-self/ns/net").map_err(|e| e.to_string())?;
    let t = std::thread::spawn(move || -> Result<Vec<String>, String> {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(async {
            let (conn, h, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
            let task = tokio::spawn(conn);
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), remove_devices(&h)).await;
            task.abort();
            match r {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("netlink did not answer within 5 s".into()),
            }
        })
    });
    t.join().map_err(|_| "the device removal thread panicked".to_string())?
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::link::InfoKind;

    use super::*;

    #[test]
    fn the_data_path_setting_is_checked() {
        assert_eq!(wanted_path(None).unwrap(), Want::Probe);
        assert_eq!(wanted_path(Some("")).unwrap(), Want::Probe);
        assert_eq!(wanted_path(Some("userspace")).unwrap(), Want::Userspace);
        assert_eq!(wanted_path(Some("kernel")).unwrap(), Want::Kernel);
        let e = wanted_path(Some("Kernel")).unwrap_err().to_string();
        assert!(e.contains("WEFT_WIREGUARD") && e.contains("userspace or kernel"), "{e}");
    }

    #[test]
    fn only_flannels_wireguard_devices_are_ours() {
        assert!(is_own_device("flannel-wg", Some(&InfoKind::Wireguard)));
        assert!(is_own_device("flannel-wg-v6", Some(&InfoKind::Tun)));
        assert!(!is_own_device("flannel-wg", Some(&InfoKind::Dummy)), "someone's dummy called flannel-wg");
        assert!(!is_own_device("flannel-wg", None));
        assert!(!is_own_device("flannel-wg0", Some(&InfoKind::Wireguard)));
        assert!(!is_own_device("wg0", Some(&InfoKind::Wireguard)));
    }
}
