//! `weft doctor [--json]`: gathers the facts of this host and its daemon (sysctls, links,
//! firewall listings, subnet.env, the store, the health port) for the checks in
//! [`weft_core::doctor`]. Takes the daemon's flags, so it looks at exactly what that daemon
//! uses. Reads only: it changes nothing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use weft_core::backend::{BackendSpec, UDP_OVERHEAD, VXLAN_OVERHEAD};
use weft_core::cache::LeaseCache;
use weft_core::config::NetworkConfig;
use weft_core::doctor::{DataPlaneDiff, Dev, Facts, Health, SubnetEnvFacts};
use weft_core::flags::{Kind, Spec};
use weft_core::iface::{self, Selection};
use weft_core::lease::{Expiry, Lease};
use weft_core::plan::{self, HostFacts};
use weft_core::validate::Rules;

use crate::cli::{DaemonOptions, StoreChoice};
use crate::kernel::{Kernel, Links};
use crate::registry::Registry;
use crate::registry::etcd::EtcdRegistry;
use crate::registry::kube::KubeRegistry;
use crate::registry::local::LocalRegistry;

/// How long one store call or health request of doctor may take.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// `weft doctor`'s own flags, beside the daemon's.
pub const DOCTOR_FLAGS: &[Spec] = &[
    Spec { name: "json", kind: Kind::Bool, default: "false", help: "print the checks as JSON" },
    Spec { name: "cni-bridge", kind: Kind::Str, default: "cni0", help: "the pods' bridge (the CNI bridge plugin's)" },
];

fn sysctl(path: &str) -> Option<u8> {
    std::fs::read_to_string(format!("/proc/sys/{path}")).ok()?.trim().parse().ok()
}

async fn with_deadline<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("{what} took longer than {DEADLINE:?}")),
    }
}

/// The network config and every lease, each call within [`DEADLINE`].
async fn from_store<R: Registry>(reg: &R) -> Result<(String, Vec<Lease>), String> {
    let config = with_deadline("reading the network config", reg.network_config()).await?;
    let mut leases = with_deadline("listing leases", reg.list()).await?.leases;
    with_deadline("reading lease expiries", reg.resolve_expiry(&mut leases)).await?;
    Ok((config, leases))
}

async fn store(opts: &DaemonOptions) -> Result<(String, Vec<Lease>), String> {
    match &opts.store {
        StoreChoice::Etcd(e) => from_store(&with_deadline("connecting to etcd", EtcdRegistry::connect(e)).await?).await,
        StoreChoice::Local { path, prefix, config } => {
            from_store(&LocalRegistry::open(path, prefix, config).map_err(|e| e.to_string())?).await
        }
        StoreChoice::Kube(k) => {
            let reg = with_deadline("connecting to the Kubernetes API", KubeRegistry::connect(k)).await?;
            from_store(&reg).await
        }
    }
}

/// Transmit checksum offload of `dev` (the `ETHTOOL_GTXCSUM` ioctl).
fn tx_checksum(dev: &str) -> Option<bool> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_GTXCSUM: u32 = 0x16;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if dev.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut value = EthtoolValue { cmd: ETHTOOL_GTXCSUM, data: 0 };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: socket(2) with constant arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL reads the NUL-terminated name in ifr (zeroed beyond it) and writes
    // an ethtool_value through ifru_data, which points at `value`, alive for the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut ifr) };
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    (rc == 0).then_some(value.data != 0)
}

fn kernel_version() -> Option<(u32, u32)> {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut it = r.trim().split(['.', '-']).map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

/// Chains named `FLANNEL-*` in a `*-save` listing; `None` when the tool is missing.
async fn flannel_chains(save: &str) -> Option<Vec<String>> {
    match crate::firewall::run(save, &[], None).await {
        Ok(out) => Some(
            out.lines()
                .filter_map(|l| l.strip_prefix(':'))
                .filter_map(|l| l.split_whitespace().next())
                .filter(|c| c.starts_with("FLANNEL-"))
                .map(String::from)
                .collect(),
        ),
        Err(crate::firewall::FirewallError::Spawn { .. }) => None,
        // The tool is there but cannot list (e.g. no legacy tables in this kernel): none.
        Err(_) => Some(Vec::new()),
    }
}

/// The devices attached to `bridge`, from `ip -j link show master`.
fn bridge_ports(bridge: &str) -> Vec<Dev> {
    let Ok(out) = crate::lab::netns::ip(&["-j", "link", "show", "master", bridge]) else { return Vec::new() };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| Some(Dev { name: l["ifname"].as_str()?.to_string(), mtu: l["mtu"].as_u64()? as u32 }))
                .collect()
        })
        .unwrap_or_default()
}

/// A plain HTTP/1.0 GET with a deadline: (status, body).
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        s.take(4 << 20).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = with_deadline(&format!("GET http://{addr}{path}"), fetch).await?;
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("not an HTTP answer")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Where the daemon's health server answers (`None`: `--healthz-port=0`).
pub(crate) fn health_addr(opts: &DaemonOptions) -> Option<SocketAddr> {
    if opts.healthz_port == 0 {
        return None;
    }
    let ip = match opts.healthz_ip {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Some(SocketAddr::new(ip, opts.healthz_port))
}

/// The daemon's answers, and whether it enforces NetworkPolicy (`None`: not asked).
async fn health(opts: &DaemonOptions) -> (Health, Option<bool>) {
    let Some(addr) = health_addr(opts) else { return (Health::Off, None) };
    let healthz = match http_get(addr, "/healthz").await {
        Ok((200, _)) => Ok(()),
        Ok((_, body)) => Err(body.trim().to_string()),
        Err(e) => return (Health::Unreachable(e), None),
    };
    let ready = matches!(http_get(addr, "/readyz").await, Ok((200, _)));
    let metrics = http_get(addr, "/metrics").await.map(|(_, b)| b).unwrap_or_default();
    let now_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as f64).unwrap_or(0.0);
    let main_loop_age = metric(&metrics, "weft_main_loop_last_progress_milliseconds")
        .filter(|ms| *ms > 0.0)
        .map(|ms| Duration::from_millis((now_ms - ms).max(0.0) as u64));
    let reconciles = metric(&metrics, "weft_reconciles_total").map(|v| v as u64);
    let policy = metric(&metrics, "weft_netpol_enabled").map(|v| v == 1.0);
    (Health::Answered { healthz, ready, main_loop_age, reconciles }, policy)
}

fn describe(ops: &plan::Ops, actual: &plan::KernelState) -> DataPlaneDiff {
    let mac = weft_core::backend::mac_to_string;
    let mut d = DataPlaneDiff::default();
    for r in &ops.routes_add {
        d.missing.push(format!("route {} via {}", r.dst, r.via));
    }
    for r in &ops.routes_set {
        d.missing.push(format!("route {} via {} (the kernel's differs)", r.dst, r.via));
    }
    for (l, ip, m) in &ops.neighbors_set {
        match actual.neighbors.get(&(*l, *ip)) {
            Some(have) => d.wrong_mac.push(format!("neighbour {ip} has {} instead of {}", mac(have), mac(m))),
            None => d.missing.push(format!("neighbour {ip} {}", mac(m))),
        }
    }
    for (_, m, dst) in &ops.fdb_set {
        d.missing.push(format!("fdb {} dst {dst}", mac(m)));
    }
    for r in &ops.routes_del {
        d.extra.push(format!("route {} via {}", r.dst, r.via));
    }
    for (_, ip, m) in &ops.neighbors_del {
        if !ops.neighbors_set.iter().any(|(_, i, _)| i == ip) {
            d.extra.push(format!("neighbour {ip} {}", mac(m)));
        }
    }
    for (_, m, dst) in &ops.fdb_del {
        d.extra.push(format!("fdb {} dst {dst}", mac(m)));
    }
    d
}

/// Gathers every fact; never fails (what cannot be read is `None` and named by its check).
pub async fn gather(opts: &DaemonOptions, bridge: &str) -> Facts {
    let (health, policy_enforced) = health(opts).await;
    let mut f = Facts {
        renew_margin: Duration::from_secs(opts.renew_margin_minutes * 60),
        ip_forward: sysctl("net/ipv4/ip_forward").map(|v| v == 1),
        ip6_forward: sysctl("net/ipv6/conf/all/forwarding").map(|v| v == 1),
        bridge_nf_call_iptables: sysctl("net/bridge/bridge-nf-call-iptables").map(|v| v == 1),
        kernel: kernel_version(),
        legacy_chains: flannel_chains("iptables-legacy-save").await,
        nft_chains: flannel_chains("iptables-nft-save").await,
        health: Some(health),
        // doctor's own --network-policy says so too (the daemon may not run yet).
        policy_enforced: if opts.network_policy { Some(true) } else { policy_enforced },
        policy_table: crate::netpol::table_state().await,
        ..Facts::default()
    };
    if let Some(p) = crate::daemon::subnet_file::read_previous(&opts.subnet_file) {
        f.subnet_env = Some(SubnetEnvFacts {
            path: opts.subnet_file.display().to_string(),
            network: p.networks.first().map(|n| n.to_string()),
            subnet: p.previous_subnet().map(|n| n.to_string()),
            mtu: p.mtu,
        });
    }
    let from_store = store(opts).await;
    f.store = Some(from_store.as_ref().map(|_| ()).map_err(Clone::clone));
    let (cfg, leases) = match from_store {
        Ok((text, leases)) => match NetworkConfig::parse(&text) {
            Ok(cfg) => (Some(cfg), leases),
            Err(e) => {
                f.store = Some(Err(format!("the network config in the store is invalid: {e}")));
                (None, leases)
            }
        },
        Err(e) => {
            f.dataplane_error = Some(format!("the store does not answer: {e}"));
            (None, Vec::new())
        }
    };
    let Some(cfg) = cfg else {
        f.dataplane_error.get_or_insert_with(|| "no network config".into());
        return f;
    };
    f.ipv6 = cfg.v6.is_some();
    f.network = cfg.v4.map(|r| r.network.to_string());
    let spec = match BackendSpec::from_config(&cfg.backend) {
        Ok(s) => s,
        Err(e) => {
            f.dataplane_error = Some(format!("the backend config is invalid: {e}"));
            return f;
        }
    };
    let (backend, overlay, overhead) = match &spec {
        BackendSpec::Alloc => ("alloc", None, 0),
        BackendSpec::HostGw => ("host-gw", None, 0),
        BackendSpec::Vxlan(v) => ("vxlan", Some(format!("flannel.{}", v.vni)), VXLAN_OVERHEAD),
        BackendSpec::Udp(_) => ("udp", Some("flannel0".to_string()), UDP_OVERHEAD),
        BackendSpec::Wireguard(_) => {
            ("wireguard", Some(weft_core::wireguard::DEVICE.to_string()), weft_core::wireguard::OVERHEAD)
        }
    };
    f.backend = Some(backend.to_string());
    f.overhead = overhead;
    let handle = match crate::host::connect() {
        Ok(h) => h,
        Err(e) => {
            f.dataplane_error = Some(format!("cannot open netlink: {e}"));
            return f;
        }
    };
    let snapshot = match crate::host::snapshot(&handle, opts.iface_can_reach).await {
        Ok(s) => s,
        Err(e) => {
            f.dataplane_error = Some(e.to_string());
            return f;
        }
    };
    let dev = |name: &str| snapshot.interfaces.iter().find(|i| i.name == name);
    let selection = Selection {
        iface: opts.iface.clone(),
        iface_regex: opts.iface_regex.clone(),
        can_reach: opts.iface_can_reach.is_some(),
        public_ip: opts.public_ip,
        public_ipv6: opts.public_ipv6,
        want_v4: cfg.v4.is_some(),
        want_v6: cfg.v6.is_some(),
    };
    let ext = match iface::select(&snapshot, &selection) {
        Ok(e) => e,
        Err(e) => {
            f.dataplane_error = Some(e.to_string());
            return f;
        }
    };
    f.external = Some(Dev { name: ext.name.clone(), mtu: ext.mtu });
    f.expected_mtu = Some(spec.mtu(ext.mtu));
    f.overlay = overlay.as_deref().and_then(dev).map(|i| Dev { name: i.name.clone(), mtu: i.mtu });
    f.bridge = dev(bridge).map(|i| Dev { name: i.name.clone(), mtu: i.mtu });
    if f.bridge.is_some() {
        f.pod_veths = bridge_ports(bridge);
    }
    let all = sysctl("net/ipv4/conf/all/rp_filter").unwrap_or(0);
    for d in
        [Some(ext.name.clone()), f.overlay.as_ref().map(|o| o.name.clone()), f.bridge.as_ref().map(|b| b.name.clone())]
            .into_iter()
            .flatten()
    {
        let own = sysctl(&format!("net/ipv4/conf/{d}/rp_filter")).unwrap_or(0);
        f.rp_filter.push((d, all.max(own)));
    }
    if backend == "vxlan" {
        f.vxlan_tx_checksum = f.overlay.as_ref().and_then(|o| tx_checksum(&o.name));
    }

    // Our lease: held by our public address, the one subnet.env names when there are several.
    let public = opts.public_ip.or(ext.public_ip).or(ext.iface_addr);
    let env_subnet = f.subnet_env.as_ref().and_then(|s| s.subnet.clone());
    let mut mine: Vec<&Lease> = leases.iter().filter(|l| Some(l.attrs.public_ip) == public).collect();
    if mine.len() > 1
        && let Some(s) = &env_subnet
    {
        mine.retain(|l| l.key.v4.map(|n| n.to_string()).as_ref() == Some(s));
    }
    let own = mine.first().copied();
    if let Some(l) = own {
        let left = match l.expiry {
            Expiry::At(t) => Some(t.duration_since(SystemTime::now()).unwrap_or_default()),
            Expiry::Reservation | Expiry::Unknown => None,
        };
        f.own_lease = Some((l.key.v4.map(|n| n.to_string()).unwrap_or_else(|| l.key.to_string()), left));
    }
    f.dataplane = match own {
        None => {
            f.dataplane_error = Some("this host holds no lease".into());
            None
        }
        Some(own) => dataplane(&handle, &cfg, &spec, &ext, own, &leases, overlay.as_deref(), &snapshot).await,
    };
    if f.dataplane.is_none() && f.dataplane_error.is_none() {
        f.dataplane_error = Some("reading the kernel's routes failed".into());
    }
    f
}

#[allow(clippy::too_many_arguments)]
async fn dataplane(
    handle: &rtnetlink::Handle,
    cfg: &NetworkConfig,
    spec: &BackendSpec,
    ext: &weft_core::iface::External,
    own: &Lease,
    leases: &[Lease],
    overlay: Option<&str>,
    snapshot: &weft_core::iface::HostSnapshot,
) -> Option<DataPlaneDiff> {
    let index = |name: &str| snapshot.interfaces.iter().find(|i| i.name == name).map(|i| i.index);
    let mut missing_dev = DataPlaneDiff::default();
    if let Some(o) = overlay
        && index(o).is_none()
    {
        missing_dev.missing.push(format!("device {o}"));
        return Some(missing_dev);
    }
    if let BackendSpec::Udp(_) = spec {
        let Some(net) = cfg.v4.map(|r| r.network) else { return Some(missing_dev) };
        let out = crate::lab::netns::ip(&["route", "show", "exact", &net.to_string(), "dev", "flannel0"]).ok()?;
        if out.trim().is_empty() {
            missing_dev.missing.push(format!("route {net} dev flannel0"));
        }
        return Some(missing_dev);
    }
    let vni = if let BackendSpec::Vxlan(v) = spec { Some(v.vni) } else { None };
    let links = Links {
        external: ext.index,
        vxlan4: vni.and_then(|v| index(&format!("flannel.{v}"))),
        vxlan6: vni.and_then(|v| index(&format!("flannel-v6.{v}"))),
    };
    let mut rules = Rules::from_config(cfg);
    rules.own = Some(own.key);
    rules.own_ips = [ext.public_ip, ext.iface_addr].into_iter().flatten().map(IpAddr::V4).collect();
    let mut peers = LeaseCache::new(rules);
    peers.replace_all(leases.iter().cloned());
    let kernel = Kernel::new(handle.clone());
    let connected = match spec {
        BackendSpec::Vxlan(v) if v.direct_routing => kernel.connected_prefixes(ext.index).await.ok()?,
        _ => Vec::new(),
    };
    let mut desired =
        plan::plan(spec, peers.accepted(), &HostFacts { connected, vxlan6: links.vxlan6.is_some() }).state;
    let networks: Vec<IpNet> =
        cfg.v4.map(|r| IpNet::V4(r.network)).into_iter().chain(cfg.v6.map(|r| IpNet::V6(r.network))).collect();
    let own_nets: Vec<IpNet> = own.key.v4.map(IpNet::V4).into_iter().chain(own.key.v6.map(IpNet::V6)).collect();
    let (actual, _) = kernel.read_state(&links, &networks, &own_nets, &mut desired).await.ok()?;
    Some(describe(&plan::diff(&desired, &actual), &actual))
}

/// `weft doctor`: prints the report, returns the exit status (0 ok, 1 warnings, 2 problems).
pub async fn run(opts: &DaemonOptions, json: bool, bridge: &str) -> u8 {
    let facts = gather(opts, bridge).await;
    let checks = weft_core::doctor::checks(&facts);
    if json {
        let v = serde_json::json!({
            "checks": checks,
            "exit": weft_core::doctor::exit_code(&checks),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", weft_core::doctor::render(&checks));
    }
    weft_core::doctor::exit_code(&checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_by_exact_name() {
        let body =
            "weft_reconciles_total 7\nweft_reconciles_total_x 9\nweft_main_loop_last_progress_milliseconds 1.5e12\n";
        assert_eq!(metric(body, "weft_reconciles_total"), Some(7.0));
        assert_eq!(metric(body, "weft_main_loop_last_progress_milliseconds"), Some(1.5e12));
        assert_eq!(metric(body, "weft_nope"), None);
    }

    #[test]
    fn a_missing_device_has_no_offload_answer() {
        assert_eq!(tx_checksum("nonexistent-dev0"), None);
        assert_eq!(tx_checksum("a-name-that-is-far-too-long-for-linux"), None);
    }

    #[test]
    fn kernel_version_parses() {
        let v = kernel_version().unwrap();
        assert!(v.0 >= 3, "{v:?}");
    }
}
