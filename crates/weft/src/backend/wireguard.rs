//! wireguard: `flannel-wg` carries the whole cluster network, encrypted, as flanneld's
//! wireguard backend does, and speaks the same protocol to the same lease data (a mixed
//! cluster of weft and flanneld hosts works). flanneld needs the kernel's WireGuard; these
//! hosts' kernels often lack it, so weft probes the kernel and, without it, runs WireGuard
//! in userspace on a TUN device (`crate::wireguard`).

use std::net::IpAddr;

use futures::future::BoxFuture;
use ipnet::{IpNet, Ipv4Net};
use serde_json::value::RawValue;
use weft_core::config::NetworkConfig;
use weft_core::iface::External;
use weft_core::lease::{Lease, LeaseAttrs, SubnetKey};
use weft_core::plan::Plan;
use weft_core::wireguard::{DEVICE, Key, Mode, WireguardSettings, backend_data, plan_v4};

use super::{Backend, BackendError};
use crate::kernel::{Kernel, KernelError};
use crate::metrics::Metrics;
use crate::wireguard::Engine;
use crate::wireguard::key::{key_path, load_or_generate, public_of};

/// The wireguard backend (userspace data path).
pub struct WireguardBackend {
    engine: Engine,
    settings: WireguardSettings,
    mtu: u32,
    network: Ipv4Net,
    subnet_len: u8,
    own: Option<Ipv4Net>,
    public: Key,
    /// `flannel-wg`'s index, as of the last repair.
    index: Option<u32>,
}

fn kernel_err(op: String) -> KernelError {
    KernelError { op, source: rtnetlink::Error::RequestFailed }
}

impl WireguardBackend {
    /// Loads (or generates) the private key, decides the data path, opens `flannel-wg`
    /// and binds `<interface address>:ListenPort`.
    pub async fn open(
        kernel: &Kernel,
        cfg: &NetworkConfig,
        ext: &External,
        s: WireguardSettings,
        mtu: u32,
    ) -> Result<WireguardBackend, BackendError> {
        let network = cfg
            .v4
            .map(|r| r.network)
            .ok_or_else(|| BackendError::Address("wireguard: the userspace path needs an IPv4 Network".into()))?;
        if cfg.v6.is_some() || s.mode == Mode::Ipv6 {
            return Err(BackendError::Address(
                "wireguard: weft's userspace WireGuard carries IPv4 over IPv4 only; remove IPv6Network \
                 (and Mode \"ipv6\") from the network config"
                    .into(),
            ));
        }
        let bind = ext
            .iface_addr
            .ok_or_else(|| BackendError::Address(format!("wireguard: interface {} has no IPv4 address", ext.name)))?;
        let path = key_path();
        let (private, generated) = load_or_generate(&path).map_err(|e| BackendError::Address(e.to_string()))?;
        let public = public_of(&private);
        if generated {
            tracing::info!(file = %path.display(), public_key = %public.to_base64(), "generated a WireGuard private key");
        } else {
            tracing::info!(file = %path.display(), public_key = %public.to_base64(), "loaded the WireGuard private key");
        }
        let fail = |source| BackendError::Kernel { backend: "wireguard", source };
        // flanneld deletes an existing device of that name and creates its own.
        if kernel.delete_link(DEVICE).await.map_err(fail)? {
            tracing::info!("deleted an existing {DEVICE} device (a previous flanneld's or weft's)");
        }
        match std::env::var("WEFT_WIREGUARD").as_deref() {
            Ok("userspace") => tracing::info!("wireguard path: userspace (WEFT_WIREGUARD=userspace)"),
            _ => match kernel.probe_wireguard(DEVICE).await {
                Ok(()) => tracing::warn!(
                    "wireguard path: userspace; this kernel can create wireguard links, but weft does not \
                     program kernel WireGuard yet"
                ),
                Err(e) => {
                    tracing::info!("wireguard path: userspace, since this kernel cannot create a wireguard link ({e})")
                }
            },
        }
        let engine = Engine::open(bind, s.listen_port, &private).map_err(|e| {
            BackendError::Address(format!(
                "wireguard: cannot open {DEVICE} or bind UDP {bind}:{}: {e}; is another flanneld or weft running here?",
                s.listen_port
            ))
        })?;
        Ok(WireguardBackend {
            engine,
            settings: s,
            mtu,
            network,
            subnet_len: cfg.v4.map(|r| r.subnet_len).unwrap_or(24),
            own: None,
            public,
            index: None,
        })
    }

    /// `flannel-wg` up with our MTU, our base address /32, and `<Network> dev flannel-wg`;
    /// re-opened when it was deleted. Changes only what is wrong.
    async fn ensure(&mut self, kernel: &Kernel) -> Result<bool, KernelError> {
        let Some(own) = self.own else { return Ok(false) };
        let mut changed = false;
        let link = match kernel.link(DEVICE).await? {
            Some(l) => l,
            None => {
                tracing::warn!("{DEVICE} is gone; re-opening it and restarting the engine");
                self.engine.reopen().map_err(|e| kernel_err(format!("re-open {DEVICE}: {e}")))?;
                changed = true;
                kernel.link(DEVICE).await?.ok_or_else(|| kernel_err(format!("find {DEVICE} after re-opening it")))?
            }
        };
        self.index = Some(link.index);
        if !link.up || link.mtu != Some(self.mtu) {
            tracing::warn!("{DEVICE} was down or had another MTU; restoring it");
            kernel.set_up(link.index, self.mtu, DEVICE).await?;
            changed = true;
        }
        changed |= kernel
            .ensure_address(
                link.index,
                IpNet::new(IpAddr::V4(own.network()), 32).expect("/32"),
                IpNet::V4(self.network),
            )
            .await?;
        kernel.ensure_device_route(self.network, link.index).await?;
        Ok(changed)
    }

    fn set_peers<'a>(&self, peers: impl Iterator<Item = &'a Lease>) {
        let plan = plan_v4(&self.settings, self.settings.listen_port, peers);
        for (key, why) in &plan.skipped {
            tracing::warn!(peer = %key, "ignoring peer lease: {why}");
        }
        self.engine.set_peers(self.subnet_len, &plan.peers, self.settings.psk, self.settings.keepalive);
    }
}

impl Backend for WireguardBackend {
    fn name(&self) -> &'static str {
        "wireguard"
    }

    /// `{"PublicKey":"…","Port":<ListenPort>}`.
    fn advertise(&self, attrs: &mut LeaseAttrs) {
        attrs.backend_data = RawValue::from_string(backend_data(&self.public, self.settings.listen_port)).ok();
    }

    /// The socket is bound to the interface address; `flannel-wg` is repaired by name.
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
            let Some(v4) = own.v4 else { return Ok(()) };
            self.own = Some(v4);
            self.ensure(kernel).await?;
            metrics.wg_path.get_or_create(&vec![("path", "userspace")]).set(1);
            self.engine.start(v4, metrics).map_err(|e| kernel_err(format!("start the wireguard engine: {e}")))
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
        self.index.map(|i| (DEVICE.to_string(), i)).into_iter().collect()
    }

    /// The engine routes by its own peer table; the kernel holds only the device route.
    fn plan(&self, _peers: &mut dyn Iterator<Item = &Lease>) -> Option<Plan> {
        None
    }

    fn peers_changed(&self, peers: &mut dyn Iterator<Item = &Lease>) {
        self.set_peers(peers);
    }

    fn stop(&mut self) {
        self.engine.stop();
    }
}
