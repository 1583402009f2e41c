//! The Kubernetes store (flanneld's `--kube-subnet-mgr`): our lease is our Node's
//! `spec.podCIDR(s)`, peer leases are the other Nodes with flannel's annotations.
//!
//! One task follows every Node with kube-rs' runtime watcher (list, watch with bookmarks,
//! resume from the last resourceVersion, re-list on `410 Gone`) and keeps, per Node, only
//! the lease read from it (a few hundred bytes, not the 5–15 KB object). Every change to
//! the set of leases gets a revision of this process and goes into a bounded change log, so
//! the store looks like every other [`Registry`]: `list` at a revision, `watch` from the
//! next one, and the daemon's one watch/cache/validation/planner path follows it.
//!
//! Our "renewal" is the annotation patch of our Node's `status` subresource, written as
//! flanneld writes it and only when something differs; it is re-asserted when someone
//! changes our annotations. Every API call has a deadline; an API server that is down or
//! frozen makes calls fail (and the daemon wait), never hang.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use tokio::sync::{Notify, mpsc, watch};
use weft_core::config::NetworkConfig;
use weft_core::kube::{self as core, AnnotationNames, NodeView};
use weft_core::lease::{Lease, LeaseAttrs, SubnetKey};

use super::{Change, Listing, Registry, RegistryError, WatchItem};

/// The deadline of one API request (get, patch).
const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// The server-side timeout of one watch request; the watcher then watches again from where it
/// was. Kept well under [`READ_TIMEOUT`] so a quiet watch is never taken for a dead one.
const WATCH_TIMEOUT_SECS: u32 = 30;
/// How long a connection may stay silent: a frozen API server fails every call (the list
/// included) after this.
const READ_TIMEOUT: Duration = Duration::from_secs(45);
/// How long `list` waits for the first complete list of Nodes.
const SYNC_WAIT: Duration = Duration::from_secs(20);
/// Changes kept for watches that fall behind; older ones make a watch re-list (from memory:
/// cheap). A watch only needs the changes after its list, so few are kept.
const LOG_MAX: usize = 4096;
/// How often a watch reports that the API server is answering.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How to reach the API server and who we are (flanneld's flags and environment).
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// `--kube-api-url` (empty: from the kubeconfig, or in-cluster).
    pub api_url: String,
    /// `--kubeconfig-file` (empty: in-cluster when `api_url` is empty too).
    pub kubeconfig: String,
    /// `--kube-annotation-prefix`, normalised.
    pub annotation_prefix: String,
    /// `--set-node-network-unavailable`.
    pub set_node_network_unavailable: bool,
    /// `--net-config-path`.
    pub net_config_path: PathBuf,
    /// `NODE_NAME`.
    pub node_name: Option<String>,
    /// `POD_NAMESPACE` and `POD_NAME`, when `NODE_NAME` is not set: our node is the pod's.
    pub pod: Option<(String, String)>,
}

fn err(detail: impl std::fmt::Display) -> RegistryError {
    RegistryError::Kube(detail.to_string())
}

/// Runs one API call with [`CALL_DEADLINE`].
async fn deadline<T>(what: &str, f: impl Future<Output = Result<T, kube::Error>>) -> Result<T, RegistryError> {
    match tokio::time::timeout(CALL_DEADLINE, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(err(format!("{what}: {e}"))),
        Err(_) => Err(err(format!("{what}: no answer within {CALL_DEADLINE:?}"))),
    }
}

/// The client for `opts`: kubeconfig (with `--kube-api-url` overriding its server), a bare
/// URL, or the in-cluster service account, with deadlines on every connection.
async fn client(opts: &KubeOptions) -> Result<kube::Client, RegistryError> {
    let setup = |e: String| RegistryError::Setup(e);
    let mut config = if !opts.kubeconfig.is_empty() {
        let kc = kube::config::Kubeconfig::read_from(&opts.kubeconfig)
            .map_err(|e| setup(format!("cannot read --kubeconfig-file {}: {e}", opts.kubeconfig)))?;
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|e| setup(format!("cannot use --kubeconfig-file {}: {e}", opts.kubeconfig)))?
    } else if !opts.api_url.is_empty() {
        let url = opts.api_url.parse().map_err(|e| setup(format!("invalid --kube-api-url {:?}: {e}", opts.api_url)))?;
        kube::Config::new(url)
    } else {
        kube::Config::incluster().map_err(|e| {
            setup(format!(
                "no --kube-api-url or --kubeconfig-file, and no in-cluster configuration ({e}); run inside a pod with a service account, or give --kubeconfig-file"
            ))
        })?
    };
    if !opts.api_url.is_empty() && !opts.kubeconfig.is_empty() {
        config.cluster_url =
            opts.api_url.parse().map_err(|e| setup(format!("invalid --kube-api-url {:?}: {e}", opts.api_url)))?;
    }
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(READ_TIMEOUT);
    config.write_timeout = Some(CALL_DEADLINE);
    config.reset_reader_on_write = true;
    kube::Client::try_from(config).map_err(|e| setup(format!("cannot build the Kubernetes client: {e}")))
}

/// A Node as weft decodes it: only the fields it reads. The rest of the object (status with
/// its images and conditions, managed fields: most of the 5–15 KB) is skipped while
/// decoding, so a list page of 500 nodes costs little memory.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct LeanNode {
    /// name, resourceVersion, creationTimestamp, annotations.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    /// podCIDR(s).
    #[serde(default)]
    pub spec: Option<LeanNodeSpec>,
}

/// The part of a Node's spec weft reads.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct LeanNodeSpec {
    /// `spec.podCIDR`.
    #[serde(rename = "podCIDR", default)]
    pub pod_cidr: Option<String>,
    /// `spec.podCIDRs`.
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Option<Vec<String>>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    creation_timestamp: Option<Time>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

fn lean_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = <LeanMeta as serde::Deserialize>::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        resource_version: m.resource_version,
        creation_timestamp: m.creation_timestamp,
        annotations: m.annotations,
        ..Default::default()
    })
}

impl k8s_openapi::Resource for LeanNode {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Node";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "nodes";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::Metadata for LeanNode {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The part of a Node that matters, with only our annotations.
fn view_of(node: &LeanNode, names: &AnnotationNames) -> NodeView {
    let meta = &node.metadata;
    let spec = node.spec.as_ref();
    NodeView {
        name: meta.name.clone().unwrap_or_default(),
        pod_cidr: spec.and_then(|s| s.pod_cidr.clone()),
        pod_cidrs: spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default(),
        annotations: meta
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| names.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        created: meta.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
    }
}

/// What is kept of one Node.
#[derive(Debug)]
struct Entry {
    /// Its lease, if it reads.
    lease: Option<Lease>,
    /// Why it does not read (logged when it changes).
    skip: Option<String>,
}

/// The leases of all Nodes, the change log, and our own Node.
#[derive(Default)]
struct State {
    synced: bool,
    rev: i64,
    log: VecDeque<(i64, Change)>,
    nodes: HashMap<String, Entry>,
    /// Who claims each subnet key: (creation time, name); the oldest holds it.
    claims: BTreeMap<SubnetKey, BTreeSet<(i64, String)>>,
    /// The leases as the store shows them: one per key.
    view: BTreeMap<SubnetKey, Lease>,
    /// Our lease key and attributes once `renew` wrote them: our Node shows these.
    own: Option<(SubnetKey, LeaseAttrs)>,
    /// Our Node's annotations as last seen.
    own_annotations: Option<BTreeMap<String, String>>,
    last_error: Option<String>,
}

/// Shared between the registry, its watcher task and its watches.
struct Shared {
    state: Mutex<State>,
    rev: watch::Sender<i64>,
    /// The watcher's last call succeeded.
    healthy: AtomicBool,
    /// Our annotations need writing again.
    repatch: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn push(&mut self, c: Change) {
        self.rev += 1;
        self.log.push_back((self.rev, c));
        if self.log.len() > LOG_MAX {
            self.log.pop_front();
        }
    }

    /// Recomputes which lease shows for `key` and logs the change.
    fn settle(&mut self, key: SubnetKey, own_name: &str) {
        let winner = self.claims.get(&key).and_then(|c| c.iter().next()).map(|(_, n)| n.clone());
        let lease = winner.and_then(|n| {
            if n == own_name {
                self.own.as_ref().filter(|(k, _)| *k == key).map(|(k, a)| Lease {
                    key: *k,
                    attrs: a.clone(),
                    expiry: weft_core::lease::Expiry::Reservation,
                    revision: 0,
                })
            } else {
                self.nodes.get(&n).and_then(|e| e.lease.clone())
            }
        });
        match (self.view.get(&key), lease) {
            (None, None) => {}
            (Some(_), None) => {
                self.view.remove(&key);
                self.push(Change::Delete(key));
            }
            (Some(old), Some(new)) if old.attrs == new.attrs && old.revision == new.revision => {}
            (_, Some(new)) => {
                self.view.insert(key, new.clone());
                self.push(Change::Put(new));
            }
        }
    }

    fn unclaim(&mut self, key: SubnetKey, age: (i64, String)) {
        if let Some(c) = self.claims.get_mut(&key) {
            c.remove(&age);
            if c.is_empty() {
                self.claims.remove(&key);
            }
        }
    }

    /// Our own Node's key: from its podCIDRs (our lease as written, once `renew` ran).
    fn own_key(&self, view: &NodeView, fam: (bool, bool)) -> Option<SubnetKey> {
        let (v4, v6) = core::node_subnets(view).ok()?;
        let key = SubnetKey { v4: v4.filter(|_| fam.0), v6: v6.filter(|_| fam.1) };
        (key.v4.is_some() || key.v6.is_some()).then_some(key)
    }

    /// A Node was added or changed (`Some`), or deleted (`None` view with its name).
    fn apply(&mut self, name: &str, view: Option<&NodeView>, k: &Ctx) {
        let old = self.nodes.remove(name);
        let old_key = old.as_ref().and_then(|e| e.lease.as_ref()).map(|l| (l.key, l.revision));
        let entry = view.map(|v| {
            if v.name == k.node {
                self.own_annotations = Some(v.annotations.clone());
                let lease = self.own_key(v, k.families).map(|key| Lease {
                    key,
                    attrs: LeaseAttrs::new(std::net::Ipv4Addr::UNSPECIFIED),
                    expiry: weft_core::lease::Expiry::Reservation,
                    revision: i64::MIN,
                });
                return Entry { lease, skip: None };
            }
            match core::node_lease(v, &k.names, k.families.0, k.families.1) {
                Ok(lease) => Entry { lease, skip: None },
                Err(skip) => {
                    if old.as_ref().and_then(|e| e.skip.as_ref()) != Some(&skip.0) {
                        tracing::warn!(node = %v.name, "skipping node: {skip}");
                    }
                    Entry { lease: None, skip: Some(skip.0) }
                }
            }
        });
        if view.is_none() && name == k.node {
            self.own_annotations = None;
        }
        let new_key = entry.as_ref().and_then(|e| e.lease.as_ref()).map(|l| (l.key, l.revision));
        if let Some((key, rev)) = old_key {
            self.unclaim(key, (rev, name.to_string()));
        }
        if let Some((key, rev)) = new_key {
            self.claims.entry(key).or_default().insert((rev, name.to_string()));
        }
        if let Some(e) = entry {
            self.nodes.insert(name.to_string(), e);
        }
        for key in [old_key.map(|k| k.0), new_key.map(|k| k.0)].into_iter().flatten().collect::<BTreeSet<_>>() {
            self.settle(key, &k.node);
            let losers: Vec<String> =
                self.claims.get(&key).map(|c| c.iter().skip(1).map(|(_, n)| n.clone()).collect()).unwrap_or_default();
            for l in losers {
                if l == name {
                    tracing::warn!(node = %l, subnet = %key, "skipping node: an older node has the same podCIDR");
                }
            }
        }
    }

    /// Whether our annotations differ from what we wrote.
    fn own_drifted(&self, names: &AnnotationNames) -> bool {
        match (&self.own, &self.own_annotations) {
            (Some((key, attrs)), Some(current)) => core::annotation_patch(current, attrs, key, names).is_some(),
            _ => false,
        }
    }
}

/// Who we are and how Nodes read.
struct Ctx {
    node: String,
    names: AnnotationNames,
    /// IPv4, IPv6 in the network config.
    families: (bool, bool),
}

/// The fixed part of the registry, shared with its tasks.
struct Kube {
    nodes: Api<LeanNode>,
    ctx: Ctx,
}

/// The Kubernetes registry.
pub struct KubeRegistry {
    kube: Arc<Kube>,
    shared: Arc<Shared>,
    net_config_path: PathBuf,
    set_node_network_unavailable: bool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeRegistry {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KubeRegistry {
    /// Connects (no request yet but the pod lookup for our node name) and starts following
    /// Nodes.
    pub async fn connect(opts: &KubeOptions) -> Result<Self, RegistryError> {
        let names = AnnotationNames::new(&opts.annotation_prefix).map_err(|e| RegistryError::Setup(e.to_string()))?;
        let client = client(opts).await?;
        let node = match (&opts.node_name, &opts.pod) {
            (Some(n), _) if !n.is_empty() => n.clone(),
            (_, Some((ns, pod))) => node_of_pod(&client, ns, pod).await?,
            _ => {
                return Err(RegistryError::Setup(
                    "env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME): weft needs the name of its node"
                        .into(),
                ));
            }
        };
        // Which families leases have is the network config's: read it now (a missing or bad
        // file is reported by the daemon when it reads the config; IPv4 meanwhile).
        let families = std::fs::read_to_string(&opts.net_config_path)
            .ok()
            .and_then(|t| NetworkConfig::parse(&t).ok())
            .map_or((true, false), |c| (c.v4.is_some(), c.v6.is_some()));
        let kube = Arc::new(Kube { nodes: Api::all(client), ctx: Ctx { node, names, families } });
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            rev: watch::channel(0).0,
            healthy: AtomicBool::new(false),
            repatch: Notify::new(),
        });
        let tasks = vec![
            tokio::spawn(follow_nodes(kube.clone(), shared.clone())),
            tokio::spawn(keep_annotations(kube.clone(), shared.clone())),
        ];
        tracing::info!(node = %kube.ctx.node, "following Kubernetes nodes");
        Ok(KubeRegistry {
            kube,
            shared,
            net_config_path: opts.net_config_path.clone(),
            set_node_network_unavailable: opts.set_node_network_unavailable,
            tasks,
        })
    }

    /// Our node's name.
    pub fn node_name(&self) -> &str {
        &self.kube.ctx.node
    }

    /// The client this store uses (with its deadlines), for other followers of the API
    /// server (NetworkPolicy).
    pub fn client(&self) -> kube::Client {
        self.kube.nodes.clone().into_client()
    }

    /// Our node, fresh from the API server.
    async fn own_node(&self) -> Result<NodeView, RegistryError> {
        let node =
            deadline(&format!("getting node {:?}", self.kube.ctx.node), self.kube.nodes.get(&self.kube.ctx.node))
                .await?;
        Ok(view_of(&node, &self.kube.ctx.names))
    }
}

async fn node_of_pod(client: &kube::Client, ns: &str, pod: &str) -> Result<String, RegistryError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut backoff = Duration::from_secs(1);
    loop {
        match deadline(&format!("getting pod {ns}/{pod}"), pods.get(pod)).await {
            Ok(p) => {
                return p.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()).ok_or_else(|| {
                    RegistryError::Setup(format!("pod {ns}/{pod} has no spec.nodeName; set NODE_NAME instead"))
                });
            }
            Err(e) => tracing::error!("cannot find our node through our pod, retrying in {backoff:?}: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Follows every Node into the shared state until aborted. The watcher resumes from the last
/// resourceVersion after a broken connection and re-lists after `410 Gone`; a re-list is
/// diffed against what was known, so nodes deleted meanwhile are removed.
async fn follow_nodes(kube: Arc<Kube>, shared: Arc<Shared>) {
    let cfg = watcher::Config::default().timeout(WATCH_TIMEOUT_SECS);
    let mut stream = watcher::watcher(kube.nodes.clone(), cfg).boxed();
    let mut pending: Option<HashMap<String, NodeView>> = None;
    let mut backoff = Duration::from_millis(100);
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(ev) => ev,
            Err(e) => {
                shared.healthy.store(false, Ordering::Relaxed);
                let gone = matches!(&e, watcher::Error::WatchError(s) if s.code == 410);
                let msg = e.to_string();
                if gone {
                    tracing::info!("the node watch is too old for the API server (410 Gone); listing nodes again");
                } else {
                    tracing::warn!("Kubernetes node watch failed, retrying in {backoff:?}: {msg}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                shared.lock().last_error = Some(msg);
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        shared.healthy.store(true, Ordering::Relaxed);
        let mut st = shared.lock();
        let (before, was_synced) = (st.rev, st.synced);
        match event {
            watcher::Event::Init => pending = Some(HashMap::new()),
            watcher::Event::InitApply(n) => {
                let v = view_of(&n, &kube.ctx.names);
                pending.get_or_insert_default().insert(v.name.clone(), v);
            }
            watcher::Event::InitDone => {
                let listed = pending.take().unwrap_or_default();
                let gone: Vec<String> = st.nodes.keys().filter(|n| !listed.contains_key(*n)).cloned().collect();
                for name in gone {
                    st.apply(&name, None, &kube.ctx);
                }
                for (name, v) in &listed {
                    st.apply(name, Some(v), &kube.ctx);
                }
                if !st.synced {
                    tracing::info!(nodes = listed.len(), "listed Kubernetes nodes");
                }
                st.synced = true;
                st.last_error = None;
            }
            watcher::Event::Apply(n) => {
                let v = view_of(&n, &kube.ctx.names);
                st.apply(&v.name.clone(), Some(&v), &kube.ctx);
            }
            watcher::Event::Delete(n) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                st.apply(&name, None, &kube.ctx);
            }
        }
        let drifted = st.synced && st.own_drifted(&kube.ctx.names);
        let (after, synced) = (st.rev, st.synced);
        drop(st);
        if drifted {
            shared.repatch.notify_one();
        }
        // Watches wake on new changes; list() also on the first complete list.
        if synced && (after != before || !was_synced) {
            shared.rev.send_replace(after);
        }
    }
}

/// Writes our annotations again whenever someone changed them (the kube form of renewal).
async fn keep_annotations(kube: Arc<Kube>, shared: Arc<Shared>) {
    loop {
        shared.repatch.notified().await;
        let own = shared.lock().own.clone();
        let Some((key, attrs)) = own else { continue };
        if let Err(e) = patch_annotations(&kube, &key, &attrs).await {
            tracing::warn!("restoring our node's annotations failed, retrying in 5s: {e}");
            tokio::time::sleep(Duration::from_secs(5)).await;
            shared.repatch.notify_one();
        }
    }
}

/// Patches our annotations to flanneld's values for `attrs`, if any differs. `Err(Lost)`
/// when our node's podCIDRs are no longer `key`.
async fn patch_annotations(kube: &Kube, key: &SubnetKey, attrs: &LeaseAttrs) -> Result<(), RegistryError> {
    let node = deadline(&format!("getting node {:?}", kube.ctx.node), kube.nodes.get(&kube.ctx.node)).await?;
    let view = view_of(&node, &kube.ctx.names);
    let (v4, v6) = core::node_subnets(&view).unwrap_or((None, None));
    let now = SubnetKey { v4: v4.filter(|_| key.v4.is_some()), v6: v6.filter(|_| key.v6.is_some()) };
    if now != *key {
        return Err(RegistryError::Lost(*key));
    }
    let Some(patch) = core::annotation_patch(&view.annotations, attrs, key, &kube.ctx.names) else {
        return Ok(());
    };
    let body: serde_json::Value = serde_json::from_str(&patch).map_err(err)?;
    tracing::info!(node = %kube.ctx.node, "writing our node's annotations: {patch}");
    deadline(
        &format!("patching the status of node {:?}", kube.ctx.node),
        kube.nodes.patch_status(&kube.ctx.node, &PatchParams::default(), &Patch::Strategic(body)),
    )
    .await
    .map(|_| ())
}

impl Registry for KubeRegistry {
    fn name(&self) -> &'static str {
        "kube"
    }

    async fn network_config(&self) -> Result<String, RegistryError> {
        let text = std::fs::read_to_string(&self.net_config_path).map_err(|e| {
            RegistryError::ConfigMissing(format!(
                "cannot read the network config {}: {e}; mount the kube-flannel-cfg ConfigMap there or set --net-config-path",
                self.net_config_path.display()
            ))
        })?;
        // Subnets are the controller's podCIDRs: their length, not flannel's default, is
        // what peer leases are checked against.
        let view = self.own_node().await?;
        Ok(match core::config_with_node_lengths(&text, &view) {
            Some(adjusted) => {
                tracing::info!(node = %view.name, "subnet length from our node's podCIDR: {adjusted}");
                adjusted
            }
            None => text,
        })
    }

    async fn list(&self) -> Result<Listing, RegistryError> {
        let mut rx = self.shared.rev.subscribe();
        let wait = async {
            loop {
                if self.shared.lock().synced {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(SYNC_WAIT, wait).await.is_err() {
            let last = self.shared.lock().last_error.clone().unwrap_or_else(|| "no answer".into());
            return Err(err(format!("listing nodes: not done after {SYNC_WAIT:?} ({last})")));
        }
        let st = self.shared.lock();
        Ok(Listing { leases: st.view.values().cloned().collect(), revision: st.rev })
    }

    async fn create(&self, key: &SubnetKey, _: &LeaseAttrs, _: Duration) -> Result<bool, RegistryError> {
        Err(RegistryError::Setup(format!(
            "cannot create lease {key}: in Kubernetes a node's subnet is its spec.podCIDR, assigned by kube-controller-manager"
        )))
    }

    async fn renew(&self, key: &SubnetKey, attrs: &LeaseAttrs, _: Option<Duration>) -> Result<(), RegistryError> {
        patch_annotations(&self.kube, key, attrs).await?;
        let mut st = self.shared.lock();
        if st.own.as_ref() != Some(&(*key, attrs.clone())) {
            st.own = Some((*key, attrs.clone()));
            st.settle(*key, &self.kube.ctx.node);
            let rev = st.rev;
            drop(st);
            self.shared.rev.send_replace(rev);
        }
        Ok(())
    }

    async fn delete(&self, key: &SubnetKey) -> Result<(), RegistryError> {
        Err(RegistryError::Setup(format!(
            "cannot delete lease {key}: in Kubernetes delete the node (kubectl delete node)"
        )))
    }

    async fn watch(&self, from: i64) -> Result<mpsc::Receiver<WatchItem>, RegistryError> {
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut next = from;
            let mut rev_rx = shared.rev.subscribe();
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            loop {
                let item = {
                    let st = shared.lock();
                    let oldest = st.log.front().map_or(st.rev + 1, |(r, _)| *r);
                    if next < oldest && next <= st.rev {
                        Some(WatchItem::Compacted)
                    } else {
                        // Revisions in the log are consecutive: skip straight to `next`.
                        let skip = usize::try_from(next - oldest).unwrap_or(0);
                        let changes: Vec<Change> = st.log.iter().skip(skip).map(|(_, c)| c.clone()).collect();
                        (!changes.is_empty()).then(|| {
                            next = st.rev + 1;
                            WatchItem::Changes { revision: st.rev, changes }
                        })
                    }
                };
                if let Some(item) = item {
                    let compacted = matches!(item, WatchItem::Compacted);
                    if tx.send(item).await.is_err() || compacted {
                        return;
                    }
                }
                tokio::select! {
                    r = rev_rx.changed() => if r.is_err() { return },
                    _ = tick.tick() => {
                        if shared.healthy.load(Ordering::Relaxed) && tx.send(WatchItem::Progress).await.is_err() {
                            return;
                        }
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }

    async fn resolve_expiry(&self, _: &mut [Lease]) -> Result<(), RegistryError> {
        Ok(())
    }

    async fn assigned(&self, cfg: &NetworkConfig) -> Result<Option<SubnetKey>, RegistryError> {
        let view = self.own_node().await?;
        core::own_key(&view, cfg).map(Some).map_err(|e| match e {
            core::OwnLeaseError::NotAssigned { .. } => RegistryError::NotAssigned(e.to_string()),
            core::OwnLeaseError::Unusable { .. } => RegistryError::NotAssigned(e.to_string()),
        })
    }

    async fn public_ip_overrides(
        &self,
    ) -> Result<(Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>), RegistryError> {
        let view = self.own_node().await?;
        let (v4, v6) = core::public_ip_overrides(&view, &self.kube.ctx.names);
        Ok((v4.map_err(RegistryError::Setup)?, v6.map_err(RegistryError::Setup)?))
    }

    async fn up(&self) {
        if !self.set_node_network_unavailable {
            return;
        }
        let kube = self.kube.clone();
        // In the background: the daemon is up whether or not the API server takes it now.
        tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
                let body: serde_json::Value =
                    serde_json::from_str(&core::condition_patch(now)).unwrap_or(serde_json::Value::Null);
                match deadline(
                    &format!("setting the NetworkUnavailable condition of node {:?}", kube.ctx.node),
                    kube.nodes.patch_status(&kube.ctx.node, &PatchParams::default(), &Patch::Strategic(body)),
                )
                .await
                {
                    Ok(_) => {
                        tracing::info!(node = %kube.ctx.node, "set NetworkUnavailable=False (FlannelIsUp)");
                        return;
                    }
                    Err(e) => tracing::warn!("{e}; retrying in {backoff:?}"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx {
        Ctx { node: "me".into(), names: AnnotationNames::new(core::DEFAULT_PREFIX).unwrap(), families: (true, false) }
    }

    fn node(name: &str, cidr: &str, ip: &str, created: i64) -> NodeView {
        let a = |k: &str, v: &str| (format!("flannel.alpha.coreos.com/{k}"), v.to_string());
        NodeView {
            name: name.into(),
            pod_cidr: Some(cidr.into()),
            pod_cidrs: vec![cidr.into()],
            annotations: [a("kube-subnet-manager", "true"), a("backend-type", "host-gw"), a("public-ip", ip)].into(),
            created,
        }
    }

    fn changes(st: &State, from: i64) -> Vec<String> {
        st.log
            .iter()
            .filter(|(r, _)| *r >= from)
            .map(|(_, c)| match c {
                Change::Put(l) => format!("+{} {}", l.key, l.attrs.public_ip),
                Change::Delete(k) => format!("-{k}"),
            })
            .collect()
    }

    #[test]
    fn a_node_is_decoded_lean() {
        let full = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1","resourceVersion":"42",
            "creationTimestamp":"2026-12-02T04:10:52Z","uid":"u","labels":{"a":"b"},
            "annotations":{"flannel.alpha.coreos.com/public-ip":"192.0.2.5","other":"x"},
            "managedFields":[{"manager":"kubelet","fieldsV1":{"f:status":{}}}]},
            "spec":{"podCIDR":"10.244.5.0/24","podCIDRs":["10.244.5.0/24"],"providerID":"p"},
            "status":{"images":[{"names":["x"],"sizeBytes":1}],"conditions":[]}}"#;
        let n: LeanNode = serde_json::from_str(full).unwrap();
        assert_eq!(n.metadata.resource_version.as_deref(), Some("42"));
        assert!(n.metadata.managed_fields.is_none() && n.metadata.labels.is_none());
        let v = view_of(&n, &ctx().names);
        assert_eq!((v.name.as_str(), v.created), ("n1", 1_796_184_652));
        assert_eq!(v.pod_cidrs, ["10.244.5.0/24"]);
        assert_eq!(v.annotations.len(), 1, "only our annotations are kept: {:?}", v.annotations);
        // Hostile shapes fail the decoding of that object, not the daemon.
        assert!(serde_json::from_str::<LeanNode>(r#"{"metadata":{"name":5}}"#).is_err());
        let empty: LeanNode = serde_json::from_str("{}").unwrap();
        assert_eq!(view_of(&empty, &ctx().names), NodeView::default());
    }

    #[test]
    fn the_older_of_two_nodes_with_one_pod_cidr_keeps_it() {
        let (mut st, c) = (State::default(), ctx());
        st.apply("young", Some(&node("young", "10.244.2.0/24", "192.0.2.12", 200)), &c);
        st.apply("old", Some(&node("old", "10.244.2.0/24", "192.0.2.11", 100)), &c);
        assert_eq!(changes(&st, 1), ["+10.244.2.0-24 192.0.2.12", "+10.244.2.0-24 192.0.2.11"]);
        let r = st.rev;
        // The younger one changing changes nothing seen.
        st.apply("young", Some(&node("young", "10.244.2.0/24", "192.0.2.13", 200)), &c);
        assert_eq!(st.rev, r);
        st.apply("old", None, &c);
        assert_eq!(changes(&st, r + 1), ["+10.244.2.0-24 192.0.2.13"], "the survivor takes over");
        st.apply("young", None, &c);
        assert_eq!(changes(&st, r + 2), ["-10.244.2.0-24"]);
        assert!(st.view.is_empty() && st.claims.is_empty());
    }

    #[test]
    fn garbage_and_unchanged_nodes_emit_nothing() {
        let (mut st, c) = (State::default(), ctx());
        st.apply("a", Some(&node("a", "10.244.2.0/24", "not-an-ip", 1)), &c);
        st.apply("b", Some(&node("b", "garbage", "192.0.2.12", 1)), &c);
        assert_eq!(st.rev, 0);
        st.apply("a", Some(&node("a", "10.244.2.0/24", "192.0.2.12", 1)), &c);
        st.apply("a", Some(&node("a", "10.244.2.0/24", "192.0.2.12", 1)), &c);
        assert_eq!(changes(&st, 1), ["+10.244.2.0-24 192.0.2.12"]);
        // Its annotations turned to garbage: the lease goes.
        st.apply("a", Some(&node("a", "10.244.2.0/24", "", 1)), &c);
        assert_eq!(changes(&st, 2), ["-10.244.2.0-24"]);
    }

    #[test]
    fn our_node_shows_our_attributes_once_written_and_goes_when_deleted() {
        let (mut st, c) = (State::default(), ctx());
        let mut me = node("me", "10.244.1.0/24", "6.6.6.6", 1);
        me.annotations.clear();
        st.apply("me", Some(&me), &c);
        assert!(st.view.is_empty(), "not ours to show before we wrote it");
        let key: SubnetKey = "10.244.1.0-24".parse().unwrap();
        let attrs = LeaseAttrs::new("192.0.2.11".parse().unwrap());
        st.own = Some((key, attrs.clone()));
        st.settle(key, "me");
        assert_eq!(st.view[&key].attrs, attrs);
        assert!(st.own_drifted(&c.names), "our annotations are not written yet");
        // A peer claiming our subnet does not take it from us, however old.
        st.apply("x", Some(&node("x", "10.244.1.0/24", "192.0.2.99", -5)), &c);
        assert_eq!(st.view[&key].attrs, attrs);
        st.apply("me", None, &c);
        assert_eq!(changes(&st, st.rev), ["+10.244.1.0-24 192.0.2.99"], "deleted: the key is no longer ours");
    }
}
