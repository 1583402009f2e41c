//! `weft daemon`: flanneld's job. Startup order follows flanneld (config, interface, lease,
//! subnet.env, ready), then a loop that follows peer leases and renews our own.

pub mod health;
mod main_loop;
pub mod netpol;
pub mod subnet_file;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, watch};
use weft_core::config::NetworkConfig;
use weft_core::firewall::Family;
use weft_core::iface::{self, IfaceError, Selection};
use weft_core::lease::{Expiry, SubnetKey};
use weft_core::schedule::{self, Event, LeaseTerm, Scheduler};
use weft_core::subnet_env::SubnetEnv;

use self::main_loop::Running;
use crate::backend::{BackendError, DataPlane};
use crate::cli::{DaemonOptions, StoreChoice};
use crate::firewall::{FamilyRules, Firewall, FirewallSpec};
use crate::host::{self, HostError};
use crate::kernel::{Kernel, monitor};
use crate::metrics::Metrics;
use crate::registry::acquire::{AcquireFailed, acquire};
use crate::registry::etcd::EtcdRegistry;
use crate::registry::kube::KubeRegistry;
use crate::registry::local::LocalRegistry;
use crate::registry::watch as lease_watch;
use crate::registry::{Registry, RegistryError, lease_ttl};

/// Why the daemon stopped with an error (exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store could not be set up.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Reading the host failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// No interface could be chosen.
    #[error(transparent)]
    Iface(#[from] IfaceError),
    /// The backend cannot run.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// No lease could be taken.
    #[error("failed to acquire a subnet lease: {0}")]
    Acquire(#[from] AcquireFailed),
    /// The subnet file could not be written.
    #[error(
        "cannot write the subnet file {path}: {source}; make its directory writable or choose another path with --subnet-file"
    )]
    SubnetFile {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The health server could not bind.
    #[error("cannot listen on {addr} for the health server: {source}; choose another --healthz-port or --healthz-ip")]
    Health {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Netlink could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Netlink(std::io::Error),
    /// A kernel change needed at startup failed.
    #[error("cannot {what}: {source}")]
    Kernel {
        /// What was attempted.
        what: &'static str,
        /// The netlink error.
        source: crate::kernel::KernelError,
    },
    /// Firewall rules could not be installed.
    #[error("installing firewall rules failed: {0}")]
    Firewall(#[from] crate::firewall::FirewallError),
    /// NetworkPolicy was enabled where it cannot work.
    #[error("{0}")]
    NetworkPolicy(String),
}

/// Resolves when SIGINT or SIGTERM arrives; a second signal ends the process at once.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
            tracing::error!("cannot install signal handlers; SIGTERM will kill the daemon without a clean shutdown");
            return;
        };
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        tracing::info!("shutting down (a second signal stops at once)");
        crate::notify::stopping();
        let _ = tx.send(true);
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        std::process::exit(130);
    });
    rx
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Runs the daemon until a signal or the loss of our lease (both: `Ok`).
pub async fn run(opts: DaemonOptions) -> Result<(), DaemonError> {
    tracing::info!(?opts, "weft daemon starting");
    raise_nofile_limit();
    let metrics = Arc::new(Metrics::new());
    let (ready_tx, ready_rx) = watch::channel(false);
    let shutdown = shutdown_signal();
    if opts.healthz_port > 0 {
        let addr = SocketAddr::new(opts.healthz_ip, opts.healthz_port);
        health::serve(addr, ready_rx, metrics.clone(), stopped(shutdown.clone()))
            .await
            .map_err(|source| DaemonError::Health { addr, source })?;
    }
    match &opts.store {
        StoreChoice::Etcd(e) => {
            let reg = EtcdRegistry::connect(e).await?.with_metrics(metrics.clone());
            run_with(Arc::new(reg), &opts, metrics, ready_tx, shutdown, None).await
        }
        StoreChoice::Local { path, prefix, config } => {
            let reg = LocalRegistry::open(path, prefix, config)?;
            run_with(Arc::new(reg), &opts, metrics, ready_tx, shutdown, None).await
        }
        StoreChoice::Kube(k) => {
            let reg = KubeRegistry::connect(k).await?;
            let policy = netpol::Source { client: reg.client(), node: reg.node_name().to_string() };
            run_with(Arc::new(reg), &opts, metrics, ready_tx, shutdown, Some(policy)).await
        }
    }
}

/// Raises the soft limit of open files to the hard limit, as flanneld does (many peers and
/// watches; a low soft limit would fail them one by one).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own and pass by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit only reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!(
            soft = lim.rlim_cur,
            hard = lim.rlim_max,
            "cannot raise the open-files limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Fetches and validates the config, retrying every second like flanneld. An unreachable
/// store is logged on every attempt (naming the endpoints tried and the last error); a
/// config problem whenever it changes, so an operator sees what to fix.
async fn network_config<R: Registry>(reg: &R, shutdown: &watch::Receiver<bool>) -> Option<NetworkConfig> {
    let mut last = String::new();
    loop {
        let outcome = match reg.network_config().await {
            Ok(text) => NetworkConfig::parse(&text).map_err(|e| (false, e.to_string())),
            Err(e) => Err((e.is_transient(), e.to_string())),
        };
        match outcome {
            Ok(cfg) => return Some(cfg),
            Err((unreachable, msg)) => {
                if unreachable || msg != last {
                    tracing::error!("Couldn't fetch network config (retrying every second): {msg}");
                    last = msg;
                }
            }
        }
        if !pause_unless_shutdown(Duration::from_secs(1), shutdown).await {
            return None;
        }
    }
}

/// Waits `delay` before a retry; `false` (at once) when shutdown is asked for meanwhile.
async fn pause_unless_shutdown(delay: Duration, shutdown: &watch::Receiver<bool>) -> bool {
    let mut s = shutdown.clone();
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = s.wait_for(|s| *s) => false,
    }
}

/// The masquerade and forward rules for our lease.
fn firewall_spec(opts: &DaemonOptions, cfg: &NetworkConfig, own: &SubnetKey) -> FirewallSpec {
    let v4 = cfg.v4.zip(own.v4).map(|(r, s)| FamilyRules {
        family: Family::V4,
        network: r.network.to_string(),
        subnet: s.to_string(),
    });
    let v6 = cfg.v6.zip(own.v6).map(|(r, s)| FamilyRules {
        family: Family::V6,
        network: r.network.to_string(),
        subnet: s.to_string(),
    });
    FirewallSpec {
        masq: opts.ip_masq,
        forward: opts.iptables_forward_rules,
        fully_random_disable: opts.ip_masq_fully_random_disable,
        families: v4.into_iter().chain(v6).collect(),
    }
}

async fn run_with<R: Registry>(
    reg: Arc<R>,
    opts: &DaemonOptions,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
    shutdown: watch::Receiver<bool>,
    policy: Option<netpol::Source>,
) -> Result<(), DaemonError> {
    let _watchdog = crate::notify::spawn_watchdog(metrics.clone()).map(AbortOnDrop);
    let Some(cfg) = network_config(&*reg, &shutdown).await else { return Ok(()) };
    let policy = match policy {
        Some(p) if opts.network_policy || cfg.network_policy => Some(p),
        None if opts.network_policy || cfg.network_policy => {
            return Err(DaemonError::NetworkPolicy(crate::cli::NETPOL_NEEDS_KUBE.into()));
        }
        _ => {
            netpol::remove_leftover().await;
            None
        }
    };
    if cfg.backend.defaulted {
        tracing::warn!(
            "the network config has no Backend: using udp as flannel does; set \"Backend\": {{\"Type\": \"vxlan\"}} for a faster data path"
        );
    }
    let Some((public_ip, public_ipv6)) = public_ips(&*reg, opts, &shutdown).await? else { return Ok(()) };
    let handle = host::connect().map_err(DaemonError::Netlink)?;
    let snapshot = host::snapshot(&handle, opts.iface_can_reach).await?;
    let ext = iface::select(
        &snapshot,
        &Selection {
            iface: opts.iface.clone(),
            iface_regex: opts.iface_regex.clone(),
            can_reach: opts.iface_can_reach.is_some(),
            public_ip,
            public_ipv6,
            want_v4: cfg.v4.is_some(),
            want_v6: cfg.v6.is_some(),
        },
    )?;
    tracing::info!(iface = %ext.name, public_ip = ?ext.public_ip, public_ipv6 = ?ext.public_ipv6, mtu = ext.mtu, "using interface");
    let kernel = Kernel::new(handle.clone());
    let prepared = DataPlane::prepare(&cfg, &ext, kernel, metrics.clone()).await?;
    let mut dataplane = prepared.dataplane;

    let previous = subnet_file::read_previous(&opts.subnet_file).and_then(|p| {
        let key = SubnetKey { v4: cfg.v4.and(p.previous_subnet()), v6: cfg.v6.and(p.previous_ipv6_subnet()) };
        (key.v4.is_some() || key.v6.is_some()).then_some(key)
    });
    let ttl = lease_ttl();
    let Some(acquired) = acquire_waiting(&*reg, &cfg, &prepared.attrs, previous, ttl, &shutdown).await? else {
        return Ok(());
    };
    let own = acquired.lease.key;
    tracing::info!(subnet = %own, how = ?acquired.choice, store = reg.name(), "acquired lease");
    dataplane.set_blackhole(opts.ip_blackhole_route);
    dataplane
        .set_own(&own)
        .await
        .map_err(|source| DaemonError::Kernel { what: "set up the backend's device for our lease", source })?;

    // Rules go in before subnet.env is written, as flanneld orders it.
    let fw_spec = firewall_spec(opts, &cfg, &own);
    let firewall = if fw_spec.masq || fw_spec.forward || cfg.enable_nftables {
        Some(Firewall::setup(cfg.enable_nftables, &fw_spec).await?)
    } else {
        None
    };

    // Policy goes in before subnet.env too (new pods start under it), waiting a bounded time.
    let firewall_kick = Arc::new(Notify::new());
    let (reconciled, _policy) = match policy {
        Some(source) => {
            metrics.netpol_enabled.set(1);
            let (applied_tx, mut applied) = watch::channel(false);
            let kick = Arc::new(Notify::new());
            let task = netpol::spawn(
                source,
                Duration::from_secs(opts.iptables_resync_secs),
                kick.clone(),
                metrics.clone(),
                applied_tx,
                shutdown.clone(),
            );
            if tokio::time::timeout(netpol::FIRST_APPLY_WAIT, applied.wait_for(|a| *a)).await.is_err() {
                tracing::warn!(
                    "NetworkPolicy rules are not in place after {:?} (API server slow?); going on, they follow when ready",
                    netpol::FIRST_APPLY_WAIT
                );
            }
            // Each reconciler pass kicks both the firewall and the policy resync.
            let reconciled = Arc::new(Notify::new());
            let fan_out = {
                let (reconciled, firewall_kick) = (reconciled.clone(), firewall_kick.clone());
                tokio::spawn(async move {
                    loop {
                        reconciled.notified().await;
                        firewall_kick.notify_one();
                        kick.notify_one();
                    }
                })
            };
            (reconciled, Some((AbortOnDrop(task), AbortOnDrop(fan_out))))
        }
        None => (firewall_kick.clone(), None),
    };

    let env = SubnetEnv {
        network: cfg.v4.map(|r| r.network),
        subnet: own.v4,
        ipv6_network: cfg.v6.map(|r| r.network),
        ipv6_subnet: own.v6,
        mtu: prepared.mtu,
        ip_masq: opts.ip_masq,
    };
    subnet_file::write_atomic(&opts.subnet_file, &env.render())
        .map_err(|source| DaemonError::SubnetFile { path: opts.subnet_file.display().to_string(), source })?;

    let mut sched = Scheduler::new(schedule::Config::new(Duration::from_secs(opts.renew_margin_minutes * 60), ttl));
    // Kernel changes behind our back wake the reconciler; the scheduler's resync catches the rest.
    let wake = Arc::new(Notify::new());
    let _monitor = if dataplane.programs_kernel() || opts.ip_blackhole_route {
        Some(AbortOnDrop(monitor::spawn(wake.clone(), dataplane.interest()).map_err(DaemonError::Netlink)?))
    } else {
        None
    };
    let mut d = Running {
        reg: reg.clone(),
        own,
        attrs: prepared.attrs.clone(),
        ttl,
        dataplane,
        metrics: metrics.clone(),
        ready,
        renewing: None,
        overwritten_by: None,
        renew_report: None,
        firewall_kick: reconciled,
    };
    if let Expiry::At(t) = acquired.lease.expiry {
        d.set_expiry_metric(t);
    }
    let lease = LeaseTerm::from_expiry(acquired.lease.expiry, SystemTime::now(), std::time::Instant::now());
    if d.feed(&mut sched, Event::Started { lease }).await {
        return Ok(());
    }
    tracing::info!(path = %opts.subnet_file.display(), "wrote subnet file; ready");
    reg.up().await;
    crate::notify::ready(&format!(
        "lease {own} ({} backend), subnet file {}",
        d.dataplane.backend(),
        opts.subnet_file.display()
    ));

    let (tx, mut rx) = mpsc::channel(256);
    let watcher = tokio::spawn(lease_watch::run_as(
        reg.clone(),
        Some(prepared.attrs.clone()),
        d.dataplane.peer_cache(),
        tx,
        metrics.clone(),
    ));
    let _stop_watcher = AbortOnDrop(watcher);
    // Firewall commands run on a task of their own: a hung iptables never stalls this loop.
    let _firewall = firewall.map(|fw| {
        AbortOnDrop(crate::firewall::spawn_resync(
            fw,
            fw_spec.clone(),
            Duration::from_secs(opts.iptables_resync_secs),
            firewall_kick.clone(),
            metrics.clone(),
        ))
    });
    let mut shutdown = shutdown;
    loop {
        metrics.main_loop_progress();
        let deadline = sched.next_deadline().map(tokio::time::Instant::from_std);
        let event = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => Event::Shutdown,
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => Event::Tick,
            _ = wake.notified() => Event::KernelChanged,
            done = d.renewal(), if d.renewing.is_some() => d.renewal_done(done),
            ev = rx.recv() => d.watched(ev),
        };
        if d.feed(&mut sched, event).await {
            return Ok(());
        }
    }
}

/// Takes a lease, waiting (with backoff, one log line per attempt) while the store cannot be
/// reached; `None` on shutdown. Only a plan that cannot succeed (no free subnet, endless
/// contention) is an error.
async fn acquire_waiting<R: Registry>(
    reg: &R,
    cfg: &NetworkConfig,
    attrs: &weft_core::lease::LeaseAttrs,
    previous: Option<SubnetKey>,
    ttl: Duration,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<crate::registry::acquire::Acquired>, DaemonError> {
    let mut backoff = Duration::from_secs(1);
    loop {
        match acquire(reg, cfg, attrs, previous, ttl).await {
            Ok(a) => return Ok(Some(a)),
            Err(AcquireFailed::Registry(e)) if e.is_transient() => {
                tracing::error!("failed to acquire a subnet lease, retrying in {backoff:?}: {e}");
            }
            Err(e) => return Err(e.into()),
        }
        if !pause_unless_shutdown(backoff, shutdown).await {
            return Ok(None);
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// `--public-ip` / `--public-ipv6`, unless the store overrides them (Kubernetes: our node's
/// `node-public-ip` annotations, as flanneld reads them before choosing the interface);
/// waits while the store cannot be reached. `None` on shutdown.
async fn public_ips<R: Registry>(
    reg: &R,
    opts: &DaemonOptions,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<(Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>)>, DaemonError> {
    let mut backoff = Duration::from_secs(1);
    loop {
        match reg.public_ip_overrides().await {
            Ok((v4, v6)) => {
                if let Some(ip) = v4 {
                    tracing::info!(%ip, "the store overrides --public-ip");
                }
                if let Some(ip) = v6 {
                    tracing::info!(%ip, "the store overrides --public-ipv6");
                }
                return Ok(Some((v4.or(opts.public_ip), v6.or(opts.public_ipv6))));
            }
            Err(e) if e.is_transient() => {
                tracing::error!("cannot read our public address overrides, retrying in {backoff:?}: {e}")
            }
            Err(e) => return Err(e.into()),
        }
        if !pause_unless_shutdown(backoff, shutdown).await {
            return Ok(None);
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Stops a background task when the daemon loop ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
