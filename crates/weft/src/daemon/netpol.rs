//! The daemon's NetworkPolicy side (kube mode, opt-in).
//!
//! One task follows Pods (all namespaces: peers can be anywhere), Namespaces and
//! NetworkPolicies with kube-rs reflectors on the Kubernetes store's own client. On any
//! change it waits briefly for more (a rollout is many events), converts the whole cluster
//! ([`crate::netpol::cluster_from`]), compiles this node's ruleset and hands it to
//! [`PolicyTable::update`], which runs an `nft` transaction only when the ruleset differs:
//! a change that does not touch this node's pods costs no transaction. The reconciler's kick
//! and the `--iptables-resync` timer re-check the kernel and repair drift.
//!
//! The API server going away stops nothing: the watchers retry with backoff, the rules in
//! the kernel stay as they were, and nothing is applied until every list is complete again
//! (a half-listed cluster would open what its policies close).
//!
//! When the feature is off, a table left by an earlier run is removed at startup.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use tokio::sync::{Notify, watch};
use weft_core::netpol::compile::{Ruleset, compile};
use weft_core::netpol::render::{TABLE, TABLE_FAMILY};

use crate::metrics::Metrics;
use crate::netpol::PolicyTable;

/// How long to wait after a change for more before compiling (one pass per burst).
const COALESCE: Duration = Duration::from_millis(80);
/// The server-side timeout of one watch request (then the watcher watches again).
const WATCH_TIMEOUT_SECS: u32 = 30;
/// How long subnet.env waits for the first ruleset, so new pods start under policy.
pub const FIRST_APPLY_WAIT: Duration = Duration::from_secs(10);

/// Where the policy task reads from: the Kubernetes store's client and our node.
#[derive(Clone)]
pub struct Source {
    /// The API client (deadlines set by the store).
    pub client: kube::Client,
    /// Our node's name: only its pods get rules here.
    pub node: String,
}

/// Removes a policy table left by an earlier run with NetworkPolicy on. Touches nothing
/// when there is none (or no `nft` at all: a flannel drop-in host may not have it).
pub async fn remove_leftover() {
    if !crate::netpol::table_present().await {
        return;
    }
    match PolicyTable::new().remove().await {
        Ok(()) => {
            tracing::info!(
                "NetworkPolicy is off: removed the policy table {TABLE_FAMILY} {TABLE} left by an earlier run"
            )
        }
        Err(e) => {
            tracing::warn!("NetworkPolicy is off, but removing the leftover table {TABLE_FAMILY} {TABLE} failed: {e}")
        }
    }
}

/// Makes bridged pod-to-pod traffic (two pods on one `cni0`) cross the `forward` hook, where
/// the policy table sees it. Needs the `br_netfilter` module; without it same-node traffic
/// is not policed, which is said loudly.
pub fn bridge_netfilter() {
    let dir = std::path::Path::new("/proc/sys/net/bridge");
    if !dir.exists() {
        tracing::error!(
            "NetworkPolicy: /proc/sys/net/bridge is missing (module br_netfilter not loaded): traffic between pods on this node is NOT policed; run `modprobe br_netfilter` and restart weft"
        );
        return;
    }
    for name in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        match std::fs::write(&path, "1") {
            Ok(()) => tracing::info!("NetworkPolicy: set net.bridge.{name}=1 so same-node pod traffic is policed"),
            Err(e) => tracing::error!(
                "NetworkPolicy: cannot set net.bridge.{name}=1 ({e}): traffic between pods on this node is NOT policed"
            ),
        }
    }
}

/// Follows one kind of object into `writer`'s store until aborted; `ready` once listed.
/// Errors (API server down, 410 Gone) are retried with backoff, the store keeping what it had.
async fn follow<K>(api: Api<K>, writer: reflector::store::Writer<K>, ready: Arc<AtomicBool>, changed: Arc<Notify>)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let what = K::plural(&Default::default()).to_string();
    let cfg = watcher::Config::default().timeout(WATCH_TIMEOUT_SECS);
    // Managed fields are most of an object's size and say nothing to policy.
    let stream = watcher::watcher(api, cfg).map(|r| r.map(|e| e.modify(|o| o.meta_mut().managed_fields = None)));
    let mut stream = reflector::reflector(writer, stream).boxed();
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(ev) => {
                backoff = Duration::from_millis(100);
                if failing {
                    tracing::info!("NetworkPolicy: following {what} again");
                    failing = false;
                }
                match ev {
                    watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                    watcher::Event::InitDone => ready.store(true, Ordering::Release),
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => {}
                }
                changed.notify_one();
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        "NetworkPolicy: watching {what} failed, retrying with backoff (rules stay as they are): {e}"
                    );
                    failing = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The policy task; see the module doc. `applied` turns true after the first ruleset is in
/// the kernel. Stops on shutdown (leaving the table: the pods still run).
pub fn spawn(
    source: Source,
    resync_every: Duration,
    kick: Arc<Notify>,
    metrics: Arc<Metrics>,
    applied: watch::Sender<bool>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(source, resync_every, kick, metrics, applied, shutdown))
}

struct Followers {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    policies: Store<NetworkPolicy>,
    ready: [Arc<AtomicBool>; 3],
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Followers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Followers {
    fn start(client: &kube::Client, changed: &Arc<Notify>) -> Followers {
        let ready: [Arc<AtomicBool>; 3] = Default::default();
        let (pods, pw) = reflector::store();
        let (namespaces, nw) = reflector::store();
        let (policies, yw) = reflector::store();
        let tasks = vec![
            tokio::spawn(follow(Api::<Pod>::all(client.clone()), pw, ready[0].clone(), changed.clone())),
            tokio::spawn(follow(Api::<Namespace>::all(client.clone()), nw, ready[1].clone(), changed.clone())),
            tokio::spawn(follow(Api::<NetworkPolicy>::all(client.clone()), yw, ready[2].clone(), changed.clone())),
        ];
        Followers { pods, namespaces, policies, ready, tasks }
    }

    fn listed(&self) -> bool {
        self.ready.iter().all(|r| r.load(Ordering::Acquire))
    }
}

/// The outcome of one conversion and compile.
struct Compiled {
    ruleset: Ruleset,
    errors: Vec<String>,
    policies: usize,
}

fn compile_now(f: &Followers, node: &str) -> Compiled {
    let (ns, pods, pols) = (f.namespaces.state(), f.pods.state(), f.policies.state());
    let (cluster, errors) = crate::netpol::cluster_from(
        ns.iter().map(|o| &**o),
        pods.iter().map(|o| &**o),
        pols.iter().map(|o| &**o),
        BTreeMap::new(),
    );
    let mut errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
    errors.sort();
    Compiled { ruleset: compile(&cluster, node), errors, policies: pols.len() }
}

async fn run(
    source: Source,
    resync_every: Duration,
    kick: Arc<Notify>,
    metrics: Arc<Metrics>,
    applied: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    bridge_netfilter();
    let changed = Arc::new(Notify::new());
    let followers = Arc::new(Followers::start(&source.client, &changed));
    tracing::info!(node = %source.node, "NetworkPolicy: following pods, namespaces and network policies");
    let mut table = PolicyTable::new();
    let mut tick = tokio::time::interval(resync_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = false;
    let mut last_errors: Vec<String> = Vec::new();
    loop {
        let mut resync = false;
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = changed.notified() => dirty = true,
            _ = kick.notified() => resync = true,
            _ = tick.tick() => resync = true,
        }
        if !followers.listed() {
            continue;
        }
        if dirty {
            // Let a burst of events land, then take them all in one pass.
            if !super::pause_unless_shutdown(COALESCE, &shutdown).await {
                return;
            }
            dirty = false;
            let start = Instant::now();
            let f = followers.clone();
            let node = source.node.clone();
            let Ok(c) = tokio::task::spawn_blocking(move || compile_now(&f, &node)).await else {
                tracing::error!("NetworkPolicy: compiling the ruleset panicked; rules stay as they are");
                continue;
            };
            report_errors(&c.errors, &mut last_errors);
            metrics.netpol_policies.set(c.policies as i64);
            metrics.netpol_policy_errors.set(c.errors.len() as i64);
            match table.update(&c.ruleset).await {
                Ok(ran) => {
                    if ran {
                        metrics.netpol_transactions.inc();
                    }
                    metrics.netpol_last_apply_seconds.set(start.elapsed().as_secs_f64());
                    applied.send_replace(true);
                }
                Err(e) => {
                    // Tried again on the next tick; the kernel keeps the last table meanwhile.
                    dirty = true;
                    metrics.error("netpol");
                    tracing::warn!("NetworkPolicy: applying the rules failed, retrying in {resync_every:?}: {e}");
                }
            }
        } else if resync {
            match table.resync().await {
                Ok(true) => {
                    metrics.netpol_transactions.inc();
                    tracing::info!("NetworkPolicy: the policy table was missing or changed; restored");
                }
                Ok(false) => {}
                Err(e) => {
                    metrics.error("netpol");
                    tracing::warn!("NetworkPolicy: repairing the policy table failed: {e}");
                }
            }
        }
    }
}

/// Logs policy conversion errors when the set of them changes (not on every pass).
fn report_errors(now: &[String], last: &mut Vec<String>) {
    if now == last.as_slice() {
        return;
    }
    for e in now.iter().filter(|e| !last.contains(e)) {
        tracing::error!("{e}; enforcing it fail-closed (its pods are isolated, nothing allowed) until it is fixed");
    }
    if now.is_empty() {
        tracing::info!("NetworkPolicy: every policy is readable again");
    }
    *last = now.to_vec();
}
