//! The etcd v3 store, in flannel's layout: `<prefix>/config` and `<prefix>/subnets/<key>`,
//! each lease key attached to an etcd lease.
//!
//! etcd runs as a cluster and members fail, so every request goes through [`EtcdRegistry::call`]:
//! one client per endpoint (connected lazily), a deadline on every attempt, and on a transport
//! error, `Unavailable`, a timeout or "no leader" the same request on the next endpoint, with
//! bounded backoff, starting from the last endpoint that answered. Writes stay safe to retry:
//! acquisition is a create-if-absent transaction (a retry that finds our own identity on the
//! key is a success), renewal is guarded by the key's modification revision.
//!
//! Watches run on one member and are probed every [`PROBE_EVERY`] with a cheap linearizable
//! read on that same member: a member that died, lost its leader or was cut off from its
//! peers stops the watch within [`PROBE_EVERY`] + [`PROBE_TIMEOUT`], and the caller resumes it on
//! another member from the revision after the last event delivered.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, KvClient, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse, WatchClient, WatchOptions,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use weft_core::lease::{Expiry, Lease, LeaseAttrs, SubnetKey};

use super::{Change, Listing, Registry, RegistryError, WatchItem, parse_entry, same_holder};
use crate::metrics::Metrics;

/// Deadline of one attempt of a unary request (and of the start of a watch). A member that
/// lost its leader holds linearizable requests for up to its own 7 s; we move on sooner.
pub const ATTEMPT: Duration = Duration::from_secs(3);
/// Deadline of establishing a connection to one member.
const CONNECT: Duration = Duration::from_secs(2);
/// How often a watch checks that its member still answers linearizable reads.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Deadline of that check (a healthy member answers in milliseconds).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often every endpoint is checked for `weft_store_endpoint_up`.
pub const ENDPOINT_CHECK: Duration = Duration::from_secs(5);
/// Rounds over all endpoints before a request fails (callers retry further).
const ROUNDS: usize = 3;
/// Keys per page of a list; halved while a page is too large for one message.
const PAGE: i64 = 500;
/// Largest message we accept (gRPC's default is 4 MiB; a lease value can be 1.5 MiB).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// How to reach etcd (flanneld's `--etcd-*` flags).
#[derive(Clone, Default)]
pub struct EtcdOptions {
    /// Endpoint URLs.
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/coreos.com/network`.
    pub prefix: String,
    /// Client key file (TLS needs both key and cert).
    pub keyfile: String,
    /// Client certificate file.
    pub certfile: String,
    /// CA certificate file.
    pub cafile: String,
    /// Basic-auth user.
    pub username: String,
    /// Basic-auth password.
    pub password: String,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password must never reach a log.
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("keyfile", &self.keyfile)
            .field("certfile", &self.certfile)
            .field("cafile", &self.cafile)
            .field("username", &self.username)
            .field("password", &if self.password.is_empty() { "" } else { "<redacted>" })
            .finish()
    }
}

/// One member's clients, sharing one HTTP/2 connection.
#[derive(Clone)]
struct Conn {
    client: Client,
    kv: KvClient,
    watch: WatchClient,
}

impl Conn {
    fn new(client: Client) -> Conn {
        let kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let watch = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        Conn { client, kv, watch }
    }
}

struct Endpoint {
    url: String,
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// When the last attempt on this endpoint failed (tried last for a while).
    failed_at: Mutex<Option<Instant>>,
}

struct Inner {
    endpoints: Vec<Endpoint>,
    options: ConnectOptions,
    /// The endpoint that answered last: requests start there.
    preferred: AtomicUsize,
    metrics: OnceLock<Arc<Metrics>>,
}

/// A connected etcd registry.
#[derive(Clone)]
pub struct EtcdRegistry {
    inner: Arc<Inner>,
    prefix: String,
}

fn unavailable(detail: impl Into<String>) -> RegistryError {
    RegistryError::Unavailable { store: "etcd", detail: detail.into() }
}

fn read_file(path: &str, what: &str) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|e| RegistryError::Setup(format!("cannot read {what} {path}: {e}")))
}

/// Why one attempt failed, and whether another member may do better.
#[derive(Debug)]
enum Failure {
    /// The member is down, slow, leaderless or the connection broke: try another.
    Retry(String),
    /// The request itself is wrong (auth, permission, compaction, too large): stop.
    Final(etcd_client::Error),
}

/// gRPC status codes (tonic's `Code` as numbers; tonic is not a direct dependency).
mod code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const ABORTED: i32 = 10;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

/// Whether a failure with this gRPC `code` and `message` may succeed on another member.
fn retryable_status(code: i32, m: &str) -> bool {
    matches!(code, code::UNAVAILABLE | code::DEADLINE_EXCEEDED | code::CANCELLED | code::ABORTED | code::UNKNOWN)
        || (code == code::INTERNAL && !m.contains("message length too large"))
        || m.contains("no leader")
        || m.contains("leader changed")
        || m.contains("timed out")
}

/// Sorts an etcd error into retry-elsewhere or final.
fn classify(e: etcd_client::Error) -> Failure {
    use etcd_client::Error as E;
    let retry = match &e {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::EndpointError(_) => true,
        E::GRpcStatus(s) => retryable_status(s.code() as i32, s.message()),
        _ => false,
    };
    if retry { Failure::Retry(e.to_string()) } else { Failure::Final(e) }
}

/// True for "this page does not fit in one message": the list halves its page.
fn too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() as i32 == code::RESOURCE_EXHAUSTED || s.message().contains("message length too large"))
}

/// The key just after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// One event of a watch response, decoded.
#[derive(Debug)]
pub struct RawEvent<'a> {
    /// A put (else a delete).
    pub put: bool,
    /// The revision of this change.
    pub mod_revision: i64,
    /// The full key, when it is UTF-8.
    pub key: Option<&'a str>,
    /// For a put: the lease parsed from the value, if it parsed.
    pub lease: Option<Lease>,
}

/// The changes of one watch response and the revision a resumed watch must start after: the
/// last event's own revision, never the response header's (during a catch-up the header
/// carries the store's current revision while the events are only a part of the history,
/// so resuming after the header would skip the rest of the catch-up).
pub fn changes_of<'a>(
    subnets_prefix: &str,
    events: impl IntoIterator<Item = RawEvent<'a>>,
) -> (Option<i64>, Vec<Change>) {
    let mut revision = None;
    let mut changes = Vec::new();
    for ev in events {
        revision = Some(revision.unwrap_or(0).max(ev.mod_revision));
        if ev.put {
            changes.extend(ev.lease.map(Change::Put));
            continue;
        }
        match ev.key.and_then(|k| k.strip_prefix(subnets_prefix)).map(str::parse::<SubnetKey>) {
            Some(Ok(k)) => changes.push(Change::Delete(k)),
            _ => tracing::warn!(key = ?ev.key, "ignoring deletion of an unreadable subnet key"),
        }
    }
    (revision, changes)
}

impl EtcdRegistry {
    /// Builds the clients. Nothing is sent yet: an unreachable etcd shows up as
    /// `Unavailable` on the first request (callers retry); only a bad endpoint URL or an
    /// unreadable certificate is an error here.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, RegistryError> {
        let mut co = ConnectOptions::new()
            .with_connect_timeout(CONNECT)
            .with_timeout(Duration::from_secs(15))
            // A member that stops answering (cut off, frozen) is noticed by the connection.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_require_leader(true);
        let tls = !opts.certfile.is_empty() && !opts.keyfile.is_empty();
        if tls {
            let mut t = TlsOptions::new().identity(Identity::from_pem(
                read_file(&opts.certfile, "--etcd-certfile")?,
                read_file(&opts.keyfile, "--etcd-keyfile")?,
            ));
            if !opts.cafile.is_empty() {
                t = t.ca_certificate(Certificate::from_pem(read_file(&opts.cafile, "--etcd-cafile")?));
            }
            co = co.with_tls(t);
        } else if !opts.cafile.is_empty() || !opts.certfile.is_empty() || !opts.keyfile.is_empty() {
            tracing::warn!("TLS needs both --etcd-certfile and --etcd-keyfile; connecting to etcd without TLS");
        }
        if opts.endpoints.is_empty() {
            return Err(RegistryError::Setup("no --etcd-endpoints given".into()));
        }
        let mut endpoints = Vec::new();
        for e in &opts.endpoints {
            // etcd-client insists on https:// URLs with TLS; flannel users often write http://.
            let url = if tls { e.replacen("http://", "https://", 1) } else { e.clone() };
            // Without credentials a client sends nothing when built: this checks the URL.
            let client = Client::connect([url.as_str()], Some(co.clone())).await.map_err(|err| match err {
                etcd_client::Error::InvalidArgs(m) => RegistryError::Setup(format!("bad --etcd-endpoints {e:?}: {m}")),
                etcd_client::Error::InvalidUri(m) => RegistryError::Setup(format!("bad --etcd-endpoints {e:?}: {m}")),
                other => RegistryError::Setup(format!("bad --etcd-endpoints {e:?}: {other}")),
            })?;
            let conn = if opts.username.is_empty() { Some(Conn::new(client)) } else { None };
            endpoints.push(Endpoint { url, conn: tokio::sync::Mutex::new(conn), failed_at: Mutex::new(None) });
        }
        if !opts.username.is_empty() {
            // Authentication talks to the member: done lazily, per endpoint, with retries.
            co = co.with_user(opts.username.clone(), opts.password.clone()).with_auto_token_refresh(true);
        }
        Ok(EtcdRegistry {
            inner: Arc::new(Inner { endpoints, options: co, preferred: AtomicUsize::new(0), metrics: OnceLock::new() }),
            prefix: opts.prefix.trim_end_matches('/').to_string(),
        })
    }

    /// Counts retries and endpoint health in `metrics` from now on, and checks every
    /// endpoint every [`ENDPOINT_CHECK`] (a linearizable read: "up" means usable), so
    /// `weft_store_endpoint_up` also follows members no request went to. Call it inside the
    /// runtime; the checks end with the last clone of this registry.
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        let _ = self.inner.metrics.set(metrics);
        let weak = Arc::downgrade(&self.inner);
        let prefix = self.prefix.clone();
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let reg = EtcdRegistry { inner, prefix: prefix.clone() };
                for i in 0..reg.inner.endpoints.len() {
                    let up = match reg.conn(i).await {
                        Err(_) => false,
                        Ok(mut c) => {
                            let get = c.kv.get(format!("{prefix}/config"), Some(GetOptions::new().with_count_only()));
                            matches!(tokio::time::timeout(ATTEMPT, get).await, Ok(Ok(_)))
                        }
                    };
                    reg.set_up(&reg.inner.endpoints[i], up);
                }
                drop(reg);
                tokio::time::sleep(ENDPOINT_CHECK).await;
            }
        });
        self
    }

    /// The endpoint URLs, in the order given.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.endpoints.iter().map(|e| e.url.clone()).collect()
    }

    fn set_up(&self, e: &Endpoint, up: bool) {
        *e.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = (!up).then(Instant::now);
        if let Some(m) = self.inner.metrics.get() {
            m.store_endpoint_up.get_or_create(&vec![("endpoint", e.url.clone())]).set(i64::from(up));
        }
    }

    fn count_retry(&self, op: &'static str) {
        if let Some(m) = self.inner.metrics.get() {
            m.store_retries.get_or_create(&vec![("op", op)]).inc();
        }
    }

    /// Endpoint indices to try: the preferred one first, then the others, the ones that failed
    /// in the last 10 s last.
    fn order(&self) -> Vec<usize> {
        let n = self.inner.endpoints.len();
        let first = self.inner.preferred.load(Ordering::Relaxed) % n;
        let mut order: Vec<usize> = (0..n).map(|i| (first + i) % n).collect();
        let recently_failed = |i: &usize| {
            self.inner.endpoints[*i]
                .failed_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        };
        order.sort_by_key(|i| recently_failed(i));
        order
    }

    /// The clients of endpoint `i`, connecting (and authenticating) within [`CONNECT`].
    async fn conn(&self, i: usize) -> Result<Conn, Failure> {
        let e = &self.inner.endpoints[i];
        let mut slot = e.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let connect = Client::connect([e.url.as_str()], Some(self.inner.options.clone()));
        let client = match tokio::time::timeout(CONNECT + ATTEMPT, connect).await {
            Err(_) => return Err(Failure::Retry(format!("connecting to {} timed out", e.url))),
            Ok(Err(err)) => return Err(classify(err)),
            Ok(Ok(c)) => c,
        };
        let c = Conn::new(client);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection of endpoint `i` (after a hung call), so the next use dials anew.
    async fn drop_conn(&self, i: usize) {
        self.inner.endpoints[i].conn.lock().await.take();
    }

    /// Runs `f` against one member after another until one answers, each attempt within
    /// [`ATTEMPT`]. Errors that another member cannot fix end the call at once.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, RegistryError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_at(op, |c, _| f(c)).await.map(|(t, _)| t).map_err(CallError::into_registry)
    }

    /// [`Self::call`], also telling which endpoint answered, and leaving a final etcd error as
    /// it is (a list reacts to some of them).
    async fn call_at<T, F, Fut>(&self, op: &'static str, f: F) -> Result<(T, usize), CallError>
    where
        F: Fn(Conn, usize) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = String::new();
        let mut tried = Vec::new();
        let mut backoff = Duration::from_millis(50);
        for round in 0..ROUNDS {
            if round > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 4).min(Duration::from_secs(1));
            }
            for i in self.order() {
                let e = &self.inner.endpoints[i];
                if !tried.contains(&e.url) {
                    tried.push(e.url.clone());
                }
                if !last.is_empty() {
                    self.count_retry(op);
                }
                let outcome = match self.conn(i).await {
                    Err(f) => f,
                    Ok(c) => match tokio::time::timeout(ATTEMPT, f(c, i)).await {
                        Ok(Ok(t)) => {
                            self.set_up(e, true);
                            self.inner.preferred.store(i, Ordering::Relaxed);
                            return Ok((t, i));
                        }
                        Ok(Err(err)) => classify(err),
                        Err(_) => {
                            // The call hung: drop the connection it hung on.
                            self.drop_conn(i).await;
                            Failure::Retry(format!("no answer within {ATTEMPT:?}"))
                        }
                    },
                };
                match outcome {
                    Failure::Final(err) => {
                        // The member answered, so it is up.
                        self.set_up(e, true);
                        return Err(CallError::Final(err, e.url.clone()));
                    }
                    Failure::Retry(msg) => {
                        tracing::debug!(endpoint = %e.url, op, "etcd request failed, trying another member: {msg}");
                        self.set_up(e, false);
                        last = format!("{}: {msg}", e.url);
                    }
                }
            }
        }
        Err(CallError::Exhausted(format!("no member answered (tried {}); last error: {last}", tried.join(", "))))
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn key(&self, k: &SubnetKey) -> String {
        format!("{}/subnets/{k}", self.prefix)
    }

    fn lease_from_kv(&self, kv: &etcd_client::KeyValue) -> Option<Lease> {
        let key = kv.key_str().ok()?;
        let suffix = key.strip_prefix(&self.subnets_prefix())?;
        let value = match kv.value_str() {
            Ok(v) => v,
            Err(_) => {
                tracing::warn!(key, "skipping lease whose value is not UTF-8");
                return None;
            }
        };
        let (key, attrs) = parse_entry("etcd", suffix, value)?;
        let expiry = if kv.lease() == 0 { Expiry::Reservation } else { Expiry::Unknown };
        Some(Lease { key, attrs, expiry, revision: kv.create_revision() })
    }

    /// Revokes an etcd lease we no longer need; a failure only leaves it to expire.
    async fn revoke(&self, id: i64) {
        if let Err(e) = self.call("revoke", |mut c| async move { c.client.lease_revoke(id).await }).await {
            tracing::warn!(lease = id, "could not revoke an unused etcd lease (it will expire): {e}");
        }
    }

    /// One list page attempt loop at `revision` (0: current), halving the page while too large.
    async fn list_page(&self, start: &[u8], end: &[u8], revision: i64) -> Result<etcd_client::GetResponse, ListError> {
        let mut limit = PAGE;
        loop {
            let opts = {
                let o = GetOptions::new().with_range(end.to_vec()).with_limit(limit);
                if revision > 0 { o.with_revision(revision) } else { o }
            };
            let start = start.to_vec();
            let r = self
                .call_at("list", move |mut c, _| {
                    let (start, opts) = (start.clone(), opts.clone());
                    async move { c.kv.get(start, Some(opts)).await }
                })
                .await;
            match r {
                Ok((resp, _)) => return Ok(resp),
                Err(CallError::Final(e, _)) if too_large(&e) && limit > 1 => limit = (limit / 2).max(1),
                Err(CallError::Final(e, _)) if e.to_string().contains("compacted") => return Err(ListError::Compacted),
                Err(e) => return Err(ListError::Store(e.into_registry())),
            }
        }
    }

    /// Our key as stored now, or `None`.
    async fn current(&self, k: &str) -> Result<Option<etcd_client::KeyValue>, RegistryError> {
        let k = k.to_string();
        let resp = self
            .call("get", move |mut c| {
                let k = k.clone();
                async move { c.kv.get(k, None).await }
            })
            .await?;
        Ok(resp.kvs().first().cloned())
    }
}

/// Why a call failed on every member it tried.
#[derive(Debug)]
enum CallError {
    /// A member answered with an error no other member would avoid.
    Final(etcd_client::Error, String),
    /// No member answered.
    Exhausted(String),
}

impl CallError {
    fn into_registry(self) -> RegistryError {
        match self {
            CallError::Final(e, url) => unavailable(format!("{e} (from {url})")),
            CallError::Exhausted(m) => unavailable(m),
        }
    }
}

enum ListError {
    Compacted,
    Store(RegistryError),
}

fn holder_of(kv: &etcd_client::KeyValue) -> Option<LeaseAttrs> {
    kv.value_str().ok().and_then(|v| LeaseAttrs::from_json(v).ok())
}

impl Registry for EtcdRegistry {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn network_config(&self) -> Result<String, RegistryError> {
        let key = format!("{}/config", self.prefix);
        let k = key.clone();
        let resp = self
            .call("config", move |mut c| {
                let k = k.clone();
                async move { c.kv.get(k, None).await }
            })
            .await?;
        match resp.kvs().first() {
            Some(kv) => kv
                .value_str()
                .map(str::to_string)
                .map_err(|_| RegistryError::ConfigMissing(format!("{key} is not UTF-8 text"))),
            None => Err(RegistryError::ConfigMissing(format!(
                "flannel config not found in etcd store at {key}. Did you create your config using etcdv3 API? e.g. ETCDCTL_API=3 etcdctl put {key} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}'"
            ))),
        }
    }

    async fn list(&self) -> Result<Listing, RegistryError> {
        let prefix = self.subnets_prefix().into_bytes();
        let end = prefix_end(&prefix);
        // A listing is paged, every page at the revision of the first; should that revision be
        // compacted between two pages, the listing starts over.
        'again: for _ in 0..5 {
            let mut start = prefix.clone();
            let mut revision = 0;
            let mut leases = Vec::new();
            loop {
                let resp = match self.list_page(&start, &end, revision).await {
                    Ok(r) => r,
                    Err(ListError::Compacted) => continue 'again,
                    Err(ListError::Store(e)) => return Err(e),
                };
                if revision == 0 {
                    revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                }
                leases.extend(resp.kvs().iter().filter_map(|kv| self.lease_from_kv(kv)));
                match resp.kvs().last() {
                    Some(last) if resp.more() => {
                        start = last.key().to_vec();
                        start.push(0);
                    }
                    _ => return Ok(Listing { leases, revision }),
                }
            }
        }
        Err(unavailable("the store compacted its history faster than we could list it"))
    }

    async fn create(&self, key: &SubnetKey, attrs: &LeaseAttrs, ttl: Duration) -> Result<bool, RegistryError> {
        let secs = ttl.as_secs().max(1) as i64;
        let grant = self.call("create", |mut c| async move { c.client.lease_grant(secs, None).await }).await?.id();
        let k = self.key(key);
        let value = attrs.to_json();
        let txn = Txn::new()
            .when([Compare::version(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k.clone(), value.clone(), Some(PutOptions::new().with_lease(grant)))])
            .or_else([TxnOp::get(k.clone(), None)]);
        // Retrying is safe: the transaction only writes an absent key.
        let resp = self
            .call("create", move |mut c| {
                let txn = txn.clone();
                async move { c.kv.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            return Ok(true);
        }
        let existing = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        match existing {
            // An earlier attempt whose answer was lost wrote it: ours.
            Some(kv) if kv.lease() == grant => Ok(true),
            // Ours from before (same identity): it is ours; attach it to the fresh grant.
            Some(kv) if holder_of(&kv).is_some_and(|h| same_holder(attrs, &h)) => {
                match self.renew(key, attrs, Some(ttl)).await {
                    Ok(()) => {
                        self.revoke(grant).await;
                        Ok(true)
                    }
                    Err(RegistryError::Lost(_)) => {
                        self.revoke(grant).await;
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            }
            _ => {
                // Lost the race: give the grant back rather than leave it to expire.
                self.revoke(grant).await;
                Ok(false)
            }
        }
    }

    async fn renew(&self, key: &SubnetKey, attrs: &LeaseAttrs, ttl: Option<Duration>) -> Result<(), RegistryError> {
        let k = self.key(key);
        let mut grant = None;
        // etcd leases the key held before this renewal: revoked once the key moved to the new
        // one, so each subnet keeps exactly one etcd lease.
        let mut old = Vec::new();
        // A few rounds only matter when something else writes the key at the same moment, or
        // when an earlier attempt's answer was lost.
        for _ in 0..5 {
            let guard = match self.current(&k).await? {
                None => Compare::version(k.clone(), CompareOp::Equal, 0),
                Some(kv) => {
                    if !holder_of(&kv).is_some_and(|h| same_holder(attrs, &h)) {
                        if let Some(g) = grant {
                            self.revoke(g).await;
                        }
                        return Err(RegistryError::Lost(*key));
                    }
                    if kv.lease() != 0 && Some(kv.lease()) != grant && !old.contains(&kv.lease()) {
                        old.push(kv.lease());
                    }
                    Compare::mod_revision(k.clone(), CompareOp::Equal, kv.mod_revision())
                }
            };
            let put_opts = match ttl {
                Some(ttl) => {
                    let id = match grant {
                        Some(g) => g,
                        None => {
                            let secs = ttl.as_secs().max(1) as i64;
                            let g = self
                                .call("renew", |mut c| async move { c.client.lease_grant(secs, None).await })
                                .await?
                                .id();
                            grant = Some(g);
                            g
                        }
                    };
                    Some(PutOptions::new().with_lease(id))
                }
                None => None,
            };
            let txn = Txn::new().when([guard]).and_then([TxnOp::put(k.clone(), attrs.to_json(), put_opts)]);
            let ok = self
                .call("renew", move |mut c| {
                    let txn = txn.clone();
                    async move { c.kv.txn(txn).await }
                })
                .await?
                .succeeded();
            if ok {
                for id in old {
                    self.revoke(id).await;
                }
                return Ok(());
            }
        }
        if let Some(g) = grant {
            self.revoke(g).await;
        }
        Err(unavailable(format!("{k} kept changing while renewing it")))
    }

    async fn delete(&self, key: &SubnetKey) -> Result<(), RegistryError> {
        let k = self.key(key);
        self.call("delete", move |mut c| {
            let k = k.clone();
            async move { c.kv.delete(k, None).await }
        })
        .await?;
        Ok(())
    }

    async fn watch(&self, from_revision: i64) -> Result<mpsc::Receiver<WatchItem>, RegistryError> {
        let prefix = self.subnets_prefix();
        // The start of a watch has a deadline too: the member must confirm it.
        let ((mut stream, first), at) = self
            .call_at("watch", move |mut c, _| {
                let prefix = prefix.clone();
                async move {
                    let opts = WatchOptions::new().with_prefix().with_start_revision(from_revision);
                    let mut stream = c.watch.watch(prefix, Some(opts)).await?;
                    let first = stream.next().await.unwrap_or_else(|| {
                        Err(etcd_client::Error::WatchError("the watch ended before it started".into()))
                    })?;
                    if first.canceled() && first.compact_revision() == 0 {
                        // e.g. "no leader": another member may do better, right away.
                        return Err(etcd_client::Error::WatchError(format!(
                            "watch canceled: {}",
                            first.cancel_reason()
                        )));
                    }
                    Ok((stream, first))
                }
            })
            .await
            .map_err(CallError::into_registry)?;
        let conn = self.conn(at).await.map_err(|f| unavailable(format!("{f:?}")))?;
        let url = self.inner.endpoints[at].url.clone();
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        let probe_key = format!("{}/config", self.prefix);
        tokio::spawn(async move {
            let mut probe = tokio::time::interval(PROBE_EVERY);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut pending = Some(Ok(first));
            loop {
                let next = match pending.take() {
                    Some(r) => Some(r),
                    None => tokio::select! {
                        r = stream.next() => r,
                        _ = probe.tick() => {
                            let mut kv = conn.kv.clone();
                            let opts = GetOptions::new().with_count_only();
                            let item = match tokio::time::timeout(PROBE_TIMEOUT, kv.get(probe_key.clone(), Some(opts))).await {
                                Ok(Ok(_)) => WatchItem::Progress,
                                Ok(Err(e)) => WatchItem::Broken(format!("{url} stopped answering: {e}")),
                                Err(_) => WatchItem::Broken(format!("{url} did not answer within {PROBE_TIMEOUT:?}")),
                            };
                            if let WatchItem::Broken(_) = item {
                                this.set_up(&this.inner.endpoints[at], false);
                                this.drop_conn(at).await;
                                let _ = tx.send(item).await;
                                return;
                            }
                            // Progress is advisory: skip it when the reader is busy.
                            if tx.try_send(item).is_err() && tx.is_closed() {
                                return;
                            }
                            continue;
                        }
                        _ = tx.closed() => return,
                    },
                };
                let item = match next {
                    None => WatchItem::Broken(format!("the watch stream from {url} ended")),
                    Some(Err(e)) => WatchItem::Broken(format!("{url}: {e}")),
                    Some(Ok(resp)) => {
                        if resp.compact_revision() > 0 {
                            WatchItem::Compacted
                        } else if resp.canceled() {
                            WatchItem::Broken(format!("watch canceled by {url}: {}", resp.cancel_reason()))
                        } else if resp.events().is_empty() {
                            continue;
                        } else {
                            let subnets = this.subnets_prefix();
                            let events = resp.events().iter().filter_map(|ev| {
                                let kv = ev.kv()?;
                                let put = ev.event_type() == EventType::Put;
                                Some(RawEvent {
                                    put,
                                    mod_revision: kv.mod_revision(),
                                    key: kv.key_str().ok(),
                                    lease: if put { this.lease_from_kv(kv) } else { None },
                                })
                            });
                            let (revision, changes) = changes_of(&subnets, events);
                            match revision {
                                Some(revision) => WatchItem::Changes { revision, changes },
                                None => continue,
                            }
                        }
                    }
                };
                let end = !matches!(item, WatchItem::Changes { .. });
                if end {
                    this.set_up(&this.inner.endpoints[at], false);
                }
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn resolve_expiry(&self, leases: &mut [Lease]) -> Result<(), RegistryError> {
        for l in leases.iter_mut().filter(|l| l.expiry == Expiry::Unknown) {
            let Some(id) = self.current(&self.key(&l.key)).await?.map(|kv| kv.lease()) else { continue };
            if id == 0 {
                l.expiry = Expiry::Reservation;
                continue;
            }
            let ttl = self.call("leases", |mut c| async move { c.client.lease_time_to_live(id, None).await }).await?;
            if ttl.ttl() >= 0 {
                l.expiry = Expiry::At(SystemTime::now() + Duration::from_secs(ttl.ttl() as u64));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/subnets/"), b"/a/subnets0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn a_response_resumes_after_its_last_event_not_after_its_header() {
        use std::net::Ipv4Addr;
        let lease = |k: &str| Lease {
            key: k.parse().unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 7)),
            expiry: Expiry::Unknown,
            revision: 0,
        };
        // A catch-up response: the header says revision 100, the events stop at 6; the put at
        // 7 and the delete at 8 come in the next response, which never arrives.
        let (rev, changes) = changes_of(
            "/p/subnets/",
            [
                RawEvent {
                    put: true,
                    mod_revision: 5,
                    key: Some("/p/subnets/10.5.1.0-24"),
                    lease: Some(lease("10.5.1.0-24")),
                },
                RawEvent { put: false, mod_revision: 6, key: Some("/p/subnets/10.5.2.0-24"), lease: None },
                RawEvent { put: false, mod_revision: 6, key: Some("/p/subnets/junk"), lease: None },
            ],
        );
        assert_eq!(rev, Some(6));
        assert_eq!(changes.len(), 2);
        assert!(matches!(&changes[1], Change::Delete(k) if k.to_string() == "10.5.2.0-24"));
        // Only garbage: still a revision to resume after, no change.
        let (rev, changes) = changes_of(
            "/p/subnets/",
            [RawEvent { put: true, mod_revision: 9, key: Some("/p/subnets/x"), lease: None }],
        );
        assert_eq!((rev, changes.len()), (Some(9), 0));
    }

    #[test]
    fn only_store_side_failures_are_retried_elsewhere() {
        for (code, msg) in [
            (code::UNAVAILABLE, "etcdserver: no leader"),
            (code::UNKNOWN, "h2 protocol error: error reading a body from connection"),
            (code::DEADLINE_EXCEEDED, "context deadline exceeded"),
            (code::UNAVAILABLE, "etcdserver: request timed out"),
        ] {
            assert!(retryable_status(code, msg), "{msg}");
        }
        for (code, msg) in [
            (3, "etcdserver: authentication failed, invalid user ID or password"),
            (7, "etcdserver: permission denied"),
            (11, "etcdserver: mvcc: required revision has been compacted"),
            (code::RESOURCE_EXHAUSTED, "grpc: received message larger than max"),
        ] {
            assert!(!retryable_status(code, msg), "{msg}");
        }
    }
}
