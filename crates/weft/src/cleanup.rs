//! `weft cleanup [--release-lease]`: removes everything weft installed on this host — its
//! devices (and the neighbours, FDB entries, addresses and routes on them), its protocol-87
//! routes, the blackhole routes of its subnets, its iptables chains and rules, its nftables
//! tables (the NetworkPolicy table `inet weft-netpol` too), `subnet.env` and the CNI
//! plugin's saved state — and, with `--release-lease`, our lease in the store. Takes the
//! daemon's flags (and `FLANNELD_*` environment), so it acts on exactly what that daemon
//! used. Idempotent; safe with no daemon or half a daemon's state. Run it after the daemon
//! has stopped: a running daemon puts its state back, so cleanup refuses while one answers
//! on `--healthz-port`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use weft_core::flags::{self, FlagError, Kind, Parsed, Spec, Values};
use weft_core::lease::SubnetKey;

use crate::cli::{self, DaemonOptions, StoreChoice};
use crate::registry::Registry;
use crate::registry::etcd::EtcdRegistry;
use crate::registry::local::LocalRegistry;

/// How long one store call of cleanup may take.
pub const STORE_DEADLINE: Duration = Duration::from_secs(10);

/// `weft cleanup`'s own flags, beside the daemon's.
pub const CLEANUP_FLAGS: &[Spec] = &[
    Spec {
        name: "release-lease",
        kind: Kind::Bool,
        default: "false",
        help: "also delete this host's lease from the store (another host may then take the subnet)",
    },
    Spec {
        name: "cni-data-dir",
        kind: Kind::Str,
        default: "/var/lib/cni/flannel",
        help: "the CNI plugin's dataDir, whose saved delegate configs are removed",
    },
];

/// The daemon's flags plus a command's own: parsed together (so errors and `FLANNELD_*`
/// work the same), then the daemon's are typed by [`cli::parse_daemon`]. `None`: help or
/// version was asked for.
pub fn parse_with(
    extra: &[Spec],
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(DaemonOptions, Values)>, FlagError> {
    let mut all = cli::daemon_specs();
    all.extend_from_slice(extra);
    let values = match flags::parse(&all, args, env)? {
        Parsed::Values(v) => v,
        Parsed::Help | Parsed::Version => return Ok(None),
    };
    // The command's own flags out, the daemon's in.
    let mut rest = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let body = a.trim_start_matches('-');
        let (name, inline) = match body.split_once('=') {
            Some((n, _)) => (n, true),
            None => (body, false),
        };
        match extra.iter().find(|s| s.name == name) {
            Some(s) => {
                if !inline && s.kind != Kind::Bool {
                    i += 1;
                }
            }
            None => rest.push(a.clone()),
        }
    }
    let env_without_extra = |k: &str| {
        if extra.iter().any(|s| flags_env_name(s.name) == k) { None } else { env(k) }
    };
    Ok(cli::parse_daemon(&rest, &env_without_extra)?.map(|o| (o, values)))
}

fn flags_env_name(name: &str) -> String {
    format!("FLANNELD_{}", name.to_uppercase().replace('-', "_"))
}

/// Usage of a command that takes the daemon's flags plus its own.
pub fn usage_with(command: &str, extra: &[Spec]) -> String {
    let mut all = cli::daemon_specs();
    all.extend_from_slice(extra);
    flags::usage(command, &all)
}

/// What cleanup did, line by line, and what failed.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per thing removed.
    pub removed: Vec<String>,
    /// One line per failure (the exit status is then 1).
    pub failed: Vec<String>,
}

/// Our subnets from `subnet.env` (network form), if the file is there.
fn own_subnets(path: &Path) -> (Vec<IpNet>, Option<SubnetKey>) {
    let Some(p) = crate::daemon::subnet_file::read_previous(path) else { return (Vec::new(), None) };
    let (v4, v6) = (p.previous_subnet(), p.previous_ipv6_subnet());
    let nets = v4.map(IpNet::V4).into_iter().chain(v6.map(IpNet::V6)).collect();
    (nets, (v4.is_some() || v6.is_some()).then_some(SubnetKey { v4, v6 }))
}

/// Runs cleanup. `release`: also delete our lease; `cni_dir`: the CNI plugin's dataDir.
pub async fn run(opts: &DaemonOptions, release: bool, cni_dir: &Path) -> Report {
    let mut report = Report::default();
    // A running daemon would put everything back (and lose its lease under it): refuse.
    if let Some(addr) = crate::doctor::health_addr(opts)
        && let Ok((200, body)) = crate::doctor::http_get(addr, "/healthz").await
    {
        report.failed.push(format!(
            "a weft daemon answers on {addr} ({}): stop it first (systemctl stop weft), then run cleanup again",
            body.trim()
        ));
        return report;
    }
    let (subnets, key) = own_subnets(&opts.subnet_file);
    let handle = match crate::host::connect() {
        Ok(h) => Some(h),
        Err(e) => {
            report.failed.push(format!("cannot open a netlink socket: {e}"));
            None
        }
    };
    if release && let Some(h) = &handle {
        release_lease(opts, h, key, &mut report).await;
    }
    if let Some(h) = &handle {
        // Nexthops first: the kernel takes the routes through them along.
        match crate::kernel::Kernel::new(h.clone()).remove_own_nexthops().await {
            Ok(ids) => report.removed.extend(ids.into_iter().map(|id| format!("nexthop id {id} (proto 87)"))),
            Err(e) => report.failed.push(e.to_string()),
        }
        match crate::kernel::teardown::remove_routes(h, &subnets).await {
            Ok(r) => report.removed.extend(r.into_iter().map(|r| format!("route {r}"))),
            Err(e) => report.failed.push(e.to_string()),
        }
        match crate::kernel::teardown::remove_devices(h).await {
            Ok(d) => report
                .removed
                .extend(d.into_iter().map(|d| format!("device {d} (with its neighbours, FDB entries and routes)"))),
            Err(e) => report.failed.push(e.to_string()),
        }
        // flannel's WireGuard devices (kernel wireguard links, or TUN devices left persistent).
        match crate::backend::wireguard::remove_devices(h).await {
            Ok(d) => {
                report.removed.extend(d.into_iter().map(|d| format!("device {d} (with its addresses and routes)")))
            }
            Err(e) => report.failed.push(e.to_string()),
        }
    }
    firewall(&mut report).await;
    remove_file(&opts.subnet_file, "subnet file", &mut report);
    cni_state(cni_dir, &mut report);
    report
}

/// Whether `table`/`chain` exists for `bin`; `None` when the binary is not installed.
async fn chain_exists(bin: &str, table: &str, chain: &str) -> Option<bool> {
    match crate::firewall::run(bin, &["-w", "-t", table, "-S", chain], None).await {
        Ok(_) => Some(true),
        Err(crate::firewall::FirewallError::Spawn { .. }) => None,
        Err(_) => Some(false),
    }
}

async fn nft_table_exists(fam: &str, table: &str) -> Option<bool> {
    match crate::firewall::run("nft", &["list", "table", fam, table], None).await {
        Ok(_) => Some(true),
        Err(crate::firewall::FirewallError::Spawn { .. }) => None,
        Err(_) => Some(false),
    }
}

const CHAINS: [(&str, &str, &str); 4] = [
    ("iptables", "nat", "FLANNEL-POSTRTG"),
    ("iptables", "filter", "FLANNEL-FWD"),
    ("ip6tables", "nat", "FLANNEL-POSTRTG"),
    ("ip6tables", "filter", "FLANNEL-FWD"),
];
const TABLES: [(&str, &str); 3] = [
    ("ip", "flannel-ipv4"),
    ("ip6", "flannel-ipv6"),
    (weft_core::netpol::render::TABLE_FAMILY, weft_core::netpol::render::TABLE),
];

async fn firewall(report: &mut Report) {
    let mut before = Vec::new();
    for (bin, table, chain) in CHAINS {
        before.push(chain_exists(bin, table, chain).await);
    }
    let mut nft_before = Vec::new();
    for (fam, table) in TABLES {
        nft_before.push(nft_table_exists(fam, table).await);
    }
    crate::firewall::iptables::remove_all().await;
    crate::firewall::nftables::remove_all().await;
    // The NetworkPolicy table, only when there (removing runs nft, which may be absent).
    if nft_before.last().copied().flatten() == Some(true)
        && let Err(e) = crate::netpol::PolicyTable::new().remove().await
    {
        report.failed.push(format!("cannot remove the NetworkPolicy table: {e}"));
    }
    for ((bin, table, chain), was) in CHAINS.into_iter().zip(before) {
        match (was, chain_exists(bin, table, chain).await) {
            (_, Some(true)) => report.failed.push(format!(
                "{bin} chain {chain} (table {table}) is still there: a rule of another program jumps to it; remove that rule and run cleanup again"
            )),
            (Some(true), _) => report.removed.push(format!("{bin} chain {chain} (table {table}) and the rule jumping to it")),
            _ => {}
        }
    }
    for ((fam, table), was) in TABLES.into_iter().zip(nft_before) {
        match (was, nft_table_exists(fam, table).await) {
            (_, Some(true)) => report.failed.push(format!("nftables table {fam} {table} could not be deleted")),
            (Some(true), _) => report.removed.push(format!("nftables table {fam} {table}")),
            _ => {}
        }
    }
}

fn remove_file(path: &Path, what: &str, report: &mut Report) {
    match std::fs::remove_file(path) {
        Ok(()) => report.removed.push(format!("{what} {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => report.failed.push(format!("cannot remove the {what} {}: {e}", path.display())),
    }
}

/// The CNI plugin's saved delegate configs: files named by a container ID (and the
/// `.<id>.ifname` notes beside them). Anything else in the directory is left alone.
fn cni_state(dir: &Path, report: &mut Report) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            report.failed.push(format!("cannot read the CNI state directory {}: {e}", dir.display()));
            return;
        }
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let id = name.strip_prefix('.').and_then(|n| n.strip_suffix(".ifname")).unwrap_or(&name);
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if !is_file || weft_core::cni::validate_container_id(id).is_err() {
            continue;
        }
        let p: PathBuf = entry.path();
        match std::fs::remove_file(&p) {
            Ok(()) => n += usize::from(!name.starts_with('.')),
            Err(e) => report.failed.push(format!("cannot remove CNI state {}: {e}", p.display())),
        }
    }
    if n > 0 {
        report.removed.push(format!("CNI saved state of {n} container(s) in {}", dir.display()));
    }
}

async fn release_lease(opts: &DaemonOptions, h: &rtnetlink::Handle, key: Option<SubnetKey>, report: &mut Report) {
    // Ours: the lease held by --public-ip, or by an address of this host.
    let mine: Vec<IpAddr> = match opts.public_ip {
        Some(ip) => vec![IpAddr::V4(ip)],
        None => match crate::host::snapshot(h, None).await {
            Ok(s) => s.interfaces.iter().flat_map(|i| i.addrs.iter().map(|a| a.ip)).collect(),
            Err(e) => {
                report.failed.push(format!("cannot read this host's addresses to find our lease: {e}"));
                return;
            }
        },
    };
    let outcome = match &opts.store {
        StoreChoice::Etcd(e) => match tokio::time::timeout(STORE_DEADLINE, EtcdRegistry::connect(e)).await {
            Ok(Ok(reg)) => release_from(&reg, &mine, key).await,
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("connecting to etcd took longer than {STORE_DEADLINE:?}")),
        },
        StoreChoice::Local { path, prefix, config } => match LocalRegistry::open(path, prefix, config) {
            Ok(reg) => release_from(&reg, &mine, key).await,
            Err(e) => Err(e.to_string()),
        },
        // The node's podCIDR is the controller manager's to give and take back, as in flannel.
        StoreChoice::Kube(_) => Err("with --kube-subnet-mgr the lease is the node's spec.podCIDR, which the \
             controller manager assigns and releases (delete the Node object to free it)"
            .to_string()),
    };
    match outcome {
        Ok(released) if released.is_empty() => {}
        Ok(released) => report.removed.extend(released.into_iter().map(|k| format!("lease {k} in the store"))),
        Err(e) => report.failed.push(format!("cannot release our lease: {e}; the store keeps it until it expires")),
    }
}

async fn release_from<R: Registry>(reg: &R, mine: &[IpAddr], key: Option<SubnetKey>) -> Result<Vec<SubnetKey>, String> {
    let listing = tokio::time::timeout(STORE_DEADLINE, reg.list())
        .await
        .map_err(|_| format!("listing leases took longer than {STORE_DEADLINE:?}"))?
        .map_err(|e| e.to_string())?;
    let held = |l: &weft_core::lease::Lease| {
        mine.contains(&IpAddr::V4(l.attrs.public_ip))
            || l.attrs.public_ipv6.is_some_and(|ip| mine.contains(&IpAddr::V6(ip)))
    };
    let mut released = Vec::new();
    // With subnet.env we release exactly its lease (if this host holds it); without it,
    // every lease this host holds.
    for l in listing.leases.iter().filter(|l| held(l) && key.is_none_or(|k| k == l.key)) {
        tokio::time::timeout(STORE_DEADLINE, reg.delete(&l.key))
            .await
            .map_err(|_| format!("deleting lease {} took longer than {STORE_DEADLINE:?}", l.key))?
            .map_err(|e| e.to_string())?;
        released.push(l.key);
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_daemons_flags_and_our_own_parse_together() {
        let (o, v) = parse_with(
            CLEANUP_FLAGS,
            &args(&["--release-lease", "-subnet-file", "/x/s.env", "-cni-data-dir", "/c", "--store=local"]),
            &|_| None,
        )
        .unwrap()
        .unwrap();
        assert!(v.bool("release-lease"));
        assert_eq!(v.str("cni-data-dir"), "/c");
        assert_eq!(o.subnet_file, PathBuf::from("/x/s.env"));
        assert!(matches!(o.store, StoreChoice::Local { .. }));
        // FLANNELD_* works for both.
        let env = |k: &str| match k {
            "FLANNELD_SUBNET_FILE" => Some("/e/s.env".to_string()),
            "FLANNELD_RELEASE_LEASE" => Some("true".to_string()),
            _ => None,
        };
        let (o, v) = parse_with(CLEANUP_FLAGS, &[], &env).unwrap().unwrap();
        assert_eq!((o.subnet_file, v.bool("release-lease")), (PathBuf::from("/e/s.env"), true));
        assert!(parse_with(CLEANUP_FLAGS, &args(&["--nope"]), &|_| None).unwrap_err().0.contains("-nope"));
        assert!(parse_with(CLEANUP_FLAGS, &args(&["--help"]), &|_| None).unwrap().is_none());
    }
}
