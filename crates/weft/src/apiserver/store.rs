//! Objects in memory, one global resourceVersion, a bounded event history for watches, and
//! persistence to a directory (a snapshot plus an append-only log) so that a restarted
//! server has the same objects and versions.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value, json};

use super::patch::{self, PatchType};
use super::resources::{self, RESOURCES, Resource};

/// An API error, answered as a Kubernetes `Status` object.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 404.
    #[error("{plural} \"{name}\" not found")]
    NotFound {
        /// Resource (plural).
        plural: String,
        /// Object name.
        name: String,
    },
    /// 409, create of an existing object.
    #[error("{plural} \"{name}\" already exists")]
    AlreadyExists {
        /// Resource (plural).
        plural: String,
        /// Object name.
        name: String,
    },
    /// 409, a resourceVersion or UID precondition failed.
    #[error("Operation cannot be fulfilled on {plural} \"{name}\": {msg}")]
    Conflict {
        /// Resource (plural).
        plural: String,
        /// Object name.
        name: String,
        /// What failed.
        msg: String,
    },
    /// 422, the object is not valid.
    #[error("{kind} \"{name}\" is invalid: {field}: {msg}")]
    Invalid {
        /// Kind.
        kind: String,
        /// Object name.
        name: String,
        /// The offending field.
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 410, the requested version is older than the kept history.
    #[error("too old resource version: {requested} ({oldest})")]
    Gone {
        /// The version the client asked for.
        requested: u64,
        /// The oldest version still served.
        oldest: u64,
    },
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// HTTP code and `reason` of the Status.
    pub fn code_reason(&self) -> (u16, &'static str) {
        match self {
            Self::NotFound { .. } => (404, "NotFound"),
            Self::AlreadyExists { .. } => (409, "AlreadyExists"),
            Self::Conflict { .. } => (409, "Conflict"),
            Self::Invalid { .. } => (422, "Invalid"),
            Self::BadRequest(_) => (400, "BadRequest"),
            Self::Gone { .. } => (410, "Expired"),
            Self::Internal(_) => (500, "InternalError"),
        }
    }

    /// The `Status` object the real server sends for this error.
    pub fn status(&self) -> Value {
        let (code, reason) = self.code_reason();
        let mut s = status_value(code, reason, &self.to_string());
        let details = match self {
            Self::NotFound { plural, name }
            | Self::AlreadyExists { plural, name }
            | Self::Conflict { plural, name, .. } => Some(json!({"name": name, "kind": plural})),
            Self::Invalid { kind, name, field, msg } => Some(json!({
                "name": name, "kind": kind,
                "causes": [{"reason": "FieldValueInvalid", "message": msg, "field": field}]
            })),
            _ => None,
        };
        if let Some(d) = details {
            s["details"] = d;
        }
        s
    }
}

/// A failure `Status` object.
pub fn status_value(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Deleted.
    Deleted,
}

impl EventType {
    /// The watch event's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, at one resourceVersion.
#[derive(Debug, Clone)]
pub struct Event {
    /// The version this change created.
    pub rv: u64,
    /// Resource of the object.
    pub res: &'static Resource,
    /// Namespace ("" when cluster-scoped).
    pub ns: String,
    /// Name.
    pub name: String,
    /// Type.
    pub ty: EventType,
    /// The object after the change (for a deletion: the last state, at version `rv`).
    pub obj: Arc<Value>,
    /// The object before the change.
    pub prev: Option<Arc<Value>>,
}

type Key = (&'static str, &'static str, String, String);

fn key(res: &'static Resource, ns: &str, name: &str) -> Key {
    (res.group, res.plural, ns.to_string(), name.to_string())
}

/// A consistent list: the version it was taken at and the objects, in (namespace, name) order.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The list's resourceVersion.
    pub rv: u64,
    /// The objects.
    pub items: Vec<Arc<Value>>,
}

struct Persist {
    dir: PathBuf,
    log: std::fs::File,
    lines: usize,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Arc<Event>>,
    /// Watches from versions `>= compacted` are served from `history`.
    compacted: u64,
    max_history: usize,
    persist: Option<Persist>,
}

/// The object store of the test API server.
pub struct Store {
    inner: Mutex<Inner>,
    notify: tokio::sync::watch::Sender<u64>,
}

const SNAPSHOT: &str = "state.json";
const LOG: &str = "state.log";

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    meta(obj).and_then(|m| m.get(field)).and_then(Value::as_str).unwrap_or("")
}

fn meta_mut(obj: &mut Map<String, Value>) -> &mut Map<String, Value> {
    let m = obj.entry("metadata").or_insert_with(|| json!({}));
    if !m.is_object() {
        *m = json!({});
    }
    m.as_object_mut().expect("just made an object")
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn random_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

fn random_suffix() -> String {
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5).map(|_| ALPHA[rand::random_range(0..ALPHA.len())] as char).collect()
}

fn dns_subdomain(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "Invalid value: {s:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        ))
    }
}

fn dns_label(s: &str) -> Result<(), String> {
    if s.len() <= 63 && !s.contains('.') && dns_subdomain(s).is_ok() {
        Ok(())
    } else {
        Err(format!(
            "Invalid value: {s:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        ))
    }
}

/// Checks `apiVersion` and `kind` of a body against the resource it was sent to, and fills
/// them in when absent.
fn check_type(res: &Resource, obj: &mut Map<String, Value>) -> Result<(), ApiError> {
    let av = res.api_version();
    match obj.get("apiVersion") {
        None | Some(Value::Null) => {
            obj.insert("apiVersion".into(), json!(av));
        }
        Some(Value::String(s)) if *s == av => {}
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "the API version in the data ({}) does not match the expected API version ({av})",
                other.as_str().unwrap_or("?")
            )));
        }
    }
    match obj.get("kind") {
        None | Some(Value::Null) => {
            obj.insert("kind".into(), json!(res.kind));
        }
        Some(Value::String(s)) if s == res.kind => {}
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "the kind in the data ({}) does not match the expected kind ({})",
                other.as_str().unwrap_or("?"),
                res.kind
            )));
        }
    }
    Ok(())
}

fn typed(res: &Resource, obj: Value, strict: bool) -> Result<Value, ApiError> {
    let out = resources::typed_roundtrip(res, obj.clone())
        .map_err(|e| ApiError::BadRequest(format!("{} in body: {e}", res.kind)))?;
    if strict {
        let unknown = resources::unknown_fields(&obj, &out);
        if !unknown.is_empty() {
            let list: Vec<String> = unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
            return Err(ApiError::BadRequest(format!("strict decoding error: {}", list.join(", "))));
        }
    }
    Ok(out)
}

fn parse_rv(s: &str) -> Option<u64> {
    s.parse().ok()
}

impl Inner {
    fn range(&self, res: &'static Resource, ns: Option<&str>) -> impl Iterator<Item = (&Key, &Arc<Value>)> {
        let lo = (res.group, res.plural, ns.unwrap_or("").to_string(), String::new());
        self.objects
            .range(lo..)
            .take_while(move |(k, _)| k.0 == res.group && k.1 == res.plural && ns.is_none_or(|n| k.2 == n))
    }

    /// Records a change at the next version: log line first (nothing changes if that
    /// fails), then memory, history and watchers.
    fn commit(
        &mut self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        ty: EventType,
        mut obj: Value,
    ) -> Result<Arc<Value>, ApiError> {
        let rv = self.rv + 1;
        if let Some(m) = obj.as_object_mut() {
            meta_mut(m).insert("resourceVersion".into(), json!(rv.to_string()));
        }
        if let Some(p) = &mut self.persist {
            let mut line = serde_json::to_vec(&json!({"rv": rv, "type": ty.as_str(), "object": obj}))
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            line.push(b'\n');
            // One write(2): a killed server leaves whole lines (a torn last line is skipped).
            p.log
                .write_all(&line)
                .map_err(|e| ApiError::Internal(format!("persisting to {}: {e}", p.dir.join(LOG).display())))?;
            p.lines += 1;
        }
        self.rv = rv;
        let obj = Arc::new(obj);
        let k = key(res, ns, name);
        let prev = match ty {
            EventType::Deleted => self.objects.remove(&k),
            _ => self.objects.insert(k, obj.clone()),
        };
        self.history.push_back(Arc::new(Event {
            rv,
            res,
            ns: ns.to_string(),
            name: name.to_string(),
            ty,
            obj: obj.clone(),
            prev,
        }));
        while self.history.len() > self.max_history {
            if let Some(e) = self.history.pop_front() {
                self.compacted = e.rv;
            }
        }
        let snapshot_due = self.persist.as_ref().is_some_and(|p| p.lines > 1000 + 2 * self.objects.len());
        if snapshot_due && let Err(e) = self.snapshot() {
            tracing::warn!("test API server: snapshot failed (the log still has every change): {e}");
        }
        Ok(obj)
    }

    /// Writes the whole state atomically and empties the log.
    fn snapshot(&mut self) -> std::io::Result<()> {
        let Some(p) = &mut self.persist else { return Ok(()) };
        let items: Vec<&Value> = self.objects.values().map(|v| v.as_ref()).collect();
        let data = serde_json::to_vec(&json!({"resourceVersion": self.rv, "items": items}))?;
        crate::fsutil::write_atomic(&p.dir.join(SNAPSHOT), &data, 0o600, 0o700)?;
        p.log.set_len(0)?;
        p.lines = 0;
        Ok(())
    }
}

fn resource_of(obj: &Value) -> Option<&'static Resource> {
    let av = obj.get("apiVersion")?.as_str()?;
    let kind = obj.get("kind")?.as_str()?;
    RESOURCES.iter().find(|r| r.kind == kind && r.api_version() == av)
}

/// How a write is done: `dryRun=All`, `fieldValidation=Strict`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOpts {
    /// Check and answer, change nothing.
    pub dry_run: bool,
    /// Reject fields the type does not know (else they are dropped, as the real server does).
    pub strict: bool,
}

/// Default number of events kept for watches.
pub const DEFAULT_HISTORY: usize = 10_000;

impl Store {
    /// A store kept only in memory, with the namespaces every cluster has.
    pub fn in_memory(max_history: usize) -> Self {
        let s = Self::empty(max_history, None, 0, BTreeMap::new());
        s.seed_namespaces();
        s
    }

    fn empty(max_history: usize, persist: Option<Persist>, rv: u64, objects: BTreeMap<Key, Arc<Value>>) -> Self {
        let inner =
            Inner { rv, objects, history: VecDeque::new(), compacted: rv, max_history: max_history.max(1), persist };
        Self { inner: Mutex::new(inner), notify: tokio::sync::watch::channel(rv).0 }
    }

    fn seed_namespaces(&self) {
        let ns = RESOURCES.iter().find(|r| r.plural == "namespaces").expect("namespaces are served");
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"metadata": {"name": name}});
            if let Err(e) = self.create(ns, "", obj, WriteOpts::default()) {
                tracing::warn!("test API server: seeding namespace {name}: {e}");
            }
        }
    }

    /// Opens the store persisted in `dir` (`state.json` + `state.log`), or a new one.
    pub fn open(dir: &Path, max_history: usize) -> Result<Self, String> {
        crate::fsutil::ensure_dir(dir, 0o700).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        crate::fsutil::remove_stale_temps(dir, SNAPSHOT);
        let mut rv = 0u64;
        let mut objects = BTreeMap::new();
        let snap = dir.join(SNAPSHOT);
        let fresh = !snap.exists();
        if !fresh {
            let data = std::fs::read(&snap).map_err(|e| format!("reading {}: {e}", snap.display()))?;
            let v: Value = serde_json::from_slice(&data).map_err(|e| {
                format!(
                    "{} is not a state file of the test API server ({e}); move it away to start empty",
                    snap.display()
                )
            })?;
            rv = v.get("resourceVersion").and_then(Value::as_u64).unwrap_or(0);
            for obj in v.get("items").and_then(Value::as_array).cloned().unwrap_or_default() {
                let Some(res) = resource_of(&obj) else { continue };
                let k = key(res, meta_str(&obj, "namespace"), meta_str(&obj, "name"));
                objects.insert(k, Arc::new(obj));
            }
        }
        let log_path = dir.join(LOG);
        if let Ok(f) = std::fs::File::open(&log_path) {
            for line in std::io::BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                // A torn last line (killed mid-write) ends the replay.
                let Ok(e) = serde_json::from_str::<Value>(&line) else { break };
                let (Some(erv), Some(ty), Some(obj)) =
                    (e.get("rv").and_then(Value::as_u64), e.get("type").and_then(Value::as_str), e.get("object"))
                else {
                    break;
                };
                if erv <= rv {
                    continue;
                }
                let Some(res) = resource_of(obj) else { continue };
                let k = key(res, meta_str(obj, "namespace"), meta_str(obj, "name"));
                if ty == "DELETED" {
                    objects.remove(&k);
                } else {
                    objects.insert(k, Arc::new(obj.clone()));
                }
                rv = erv;
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let persist = Persist { dir: dir.to_path_buf(), log, lines: 0 };
        let s = Self::empty(max_history, Some(persist), rv, objects);
        s.lock().snapshot().map_err(|e| format!("writing {}: {e}", snap.display()))?;
        if fresh {
            s.seed_namespaces();
        }
        Ok(s)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied change (commit changes
        // memory only after everything that can fail), so the data is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes of versions `> rv` are announced here (the value is the newest version).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notify.subscribe()
    }

    fn announce(&self, rv: u64) {
        self.notify.send_replace(rv);
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// The oldest version a watch can start from.
    pub fn oldest_watchable(&self) -> u64 {
        self.lock().compacted
    }

    /// Forgets the event history: every watch or continue from an older version than now
    /// gets `410 Gone`.
    pub fn compact(&self) -> u64 {
        let mut g = self.lock();
        g.history.clear();
        g.compacted = g.rv;
        g.rv
    }

    /// One object.
    pub fn get(&self, res: &'static Resource, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        self.lock()
            .objects
            .get(&key(res, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::NotFound { plural: res.plural.into(), name: name.into() })
    }

    /// The objects of `res` (in `ns`, or all namespaces) now, or at version `at` (for a
    /// continued list), reconstructed from the history.
    pub fn list(&self, res: &'static Resource, ns: Option<&str>, at: Option<u64>) -> Result<Snapshot, ApiError> {
        let g = self.lock();
        let mut items: BTreeMap<(String, String), Arc<Value>> =
            g.range(res, ns).map(|(k, v)| ((k.2.clone(), k.3.clone()), v.clone())).collect();
        let rv = match at {
            Some(at) if at < g.rv => {
                if at < g.compacted {
                    return Err(ApiError::Gone { requested: at, oldest: g.compacted });
                }
                for e in g.history.iter().rev().take_while(|e| e.rv > at) {
                    if !std::ptr::eq(e.res, res) || ns.is_some_and(|n| e.ns != n) {
                        continue;
                    }
                    let k = (e.ns.clone(), e.name.clone());
                    match &e.prev {
                        Some(p) => items.insert(k, p.clone()),
                        None => items.remove(&k),
                    };
                }
                at
            }
            _ => g.rv,
        };
        Ok(Snapshot { rv, items: items.into_values().collect() })
    }

    /// The events after version `rv`, at most `max`, or `Gone` when they are no longer kept.
    pub fn events_after(&self, rv: u64, max: usize) -> Result<Vec<Arc<Event>>, ApiError> {
        let g = self.lock();
        if rv < g.compacted {
            return Err(ApiError::Gone { requested: rv, oldest: g.compacted });
        }
        let start = g.history.partition_point(|e| e.rv <= rv);
        Ok(g.history.range(start..).take(max).cloned().collect())
    }

    /// Creates an object (`POST`); the server sets uid, creationTimestamp and resourceVersion.
    pub fn create(
        &self,
        res: &'static Resource,
        ns: &str,
        body: Value,
        opts: WriteOpts,
    ) -> Result<Arc<Value>, ApiError> {
        let Value::Object(mut obj) = body else {
            return Err(ApiError::BadRequest(format!("the body of a {} must be a JSON object", res.kind)));
        };
        check_type(res, &mut obj)?;
        let m = meta_mut(&mut obj);
        if m.get("resourceVersion").and_then(Value::as_str).is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::BadRequest("resourceVersion should not be set on objects to be created".into()));
        }
        let mut name = m.get("name").and_then(Value::as_str).unwrap_or("").to_string();
        if name.is_empty() {
            match m.get("generateName").and_then(Value::as_str) {
                Some(g) if !g.is_empty() => name = format!("{g}{}", random_suffix()),
                _ => {
                    return Err(ApiError::Invalid {
                        kind: res.kind.into(),
                        name: String::new(),
                        field: "metadata.name".into(),
                        msg: "Required value: name or generateName is required".into(),
                    });
                }
            }
        }
        let valid = if res.plural == "namespaces" { dns_label(&name) } else { dns_subdomain(&name) };
        valid.map_err(|msg| ApiError::Invalid {
            kind: res.kind.into(),
            name: name.clone(),
            field: "metadata.name".into(),
            msg,
        })?;
        if res.namespaced {
            match m.get("namespace").and_then(Value::as_str) {
                Some(n) if !n.is_empty() && n != ns => {
                    return Err(ApiError::BadRequest(
                        "the namespace of the provided object does not match the namespace sent on the request".into(),
                    ));
                }
                _ => {}
            }
            m.insert("namespace".into(), json!(ns));
        } else {
            m.remove("namespace");
        }
        m.insert("name".into(), json!(name));
        m.insert("uid".into(), json!(random_uid()));
        m.insert("creationTimestamp".into(), json!(now()));
        for f in ["deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"] {
            m.remove(f);
        }
        resources::prepare_create(res, &mut obj);
        let obj = typed(res, Value::Object(obj), opts.strict)?;
        let ns = if res.namespaced { ns } else { "" };
        let mut g = self.lock();
        if res.namespaced && !g.objects.contains_key(&key(namespaces(), "", ns)) {
            return Err(ApiError::NotFound { plural: "namespaces".into(), name: ns.into() });
        }
        if g.objects.contains_key(&key(res, ns, &name)) {
            return Err(ApiError::AlreadyExists { plural: res.plural.into(), name });
        }
        if opts.dry_run {
            return Ok(Arc::new(obj));
        }
        let out = g.commit(res, ns, &name, EventType::Added, obj)?;
        let rv = g.rv;
        drop(g);
        self.announce(rv);
        Ok(out)
    }

    /// Replaces an object (`PUT`), or its status when `status`.
    pub fn update(
        &self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        body: Value,
        status: bool,
        opts: WriteOpts,
    ) -> Result<Arc<Value>, ApiError> {
        self.change(res, ns, name, status, opts, |_| Ok(body))
    }

    /// Patches an object (`PATCH`), or its status when `status`.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        ty: PatchType,
        patch_body: &Value,
        status: bool,
        opts: WriteOpts,
    ) -> Result<Arc<Value>, ApiError> {
        self.change(res, ns, name, status, opts, |old| {
            let mut doc = old.clone();
            patch::apply(ty, &mut doc, patch_body).map_err(ApiError::BadRequest)?;
            Ok(doc)
        })
    }

    fn change(
        &self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        status: bool,
        opts: WriteOpts,
        make: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Arc<Value>, ApiError> {
        let ns = if res.namespaced { ns } else { "" };
        let mut g = self.lock();
        let k = key(res, ns, name);
        let old = g
            .objects
            .get(&k)
            .cloned()
            .ok_or_else(|| ApiError::NotFound { plural: res.plural.into(), name: name.into() })?;
        let Value::Object(mut new) = make(&old)? else {
            return Err(ApiError::BadRequest(format!("the body of a {} must be a JSON object", res.kind)));
        };
        check_type(res, &mut new)?;
        let old_m = meta(&old).cloned().unwrap_or_default();
        let nm = meta_mut(&mut new);
        let body_name = nm.get("name").and_then(Value::as_str).unwrap_or("");
        if body_name != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if res.namespaced && nm.get("namespace").and_then(Value::as_str).is_some_and(|n| !n.is_empty() && n != ns) {
            return Err(ApiError::BadRequest(
                "the namespace of the provided object does not match the namespace sent on the request".into(),
            ));
        }
        let want_rv = nm.get("resourceVersion").and_then(Value::as_str).unwrap_or("");
        if !want_rv.is_empty() && want_rv != old_m.get("resourceVersion").and_then(Value::as_str).unwrap_or("") {
            return Err(ApiError::Conflict {
                plural: res.plural.into(),
                name: name.into(),
                msg: "the object has been modified; please apply your changes to the latest version and try again"
                    .into(),
            });
        }
        // Fields only the server sets.
        for f in ["uid", "creationTimestamp", "namespace", "deletionTimestamp", "resourceVersion"] {
            match old_m.get(f) {
                Some(v) => nm.insert(f.into(), v.clone()),
                None => nm.remove(f),
            };
        }
        if res.status {
            let old_obj = old.as_object().cloned().unwrap_or_default();
            if status {
                // The status subresource changes status (and, for nodes, metadata) only.
                let new_status = new.remove("status");
                let new_meta = new.remove("metadata");
                new = old_obj;
                if let Some(s) = new_status {
                    new.insert("status".into(), s);
                }
                if resources::status_keeps_metadata(res)
                    && let Some(m) = new_meta
                {
                    new.insert("metadata".into(), m);
                }
            } else {
                match old_obj.get("status") {
                    Some(s) => new.insert("status".into(), s.clone()),
                    None => new.remove("status"),
                };
            }
        } else if status {
            return Err(ApiError::NotFound { plural: format!("{}/status", res.plural), name: name.into() });
        }
        let new = typed(res, Value::Object(new), opts.strict)?;
        if new == *old {
            // A change that changes nothing keeps the version, as in Kubernetes.
            return Ok(old);
        }
        if opts.dry_run {
            return Ok(Arc::new(new));
        }
        let out = g.commit(res, ns, name, EventType::Modified, new)?;
        let rv = g.rv;
        drop(g);
        self.announce(rv);
        Ok(out)
    }

    /// Deletes an object (`DELETE`), checking the preconditions of a DeleteOptions body; a
    /// namespace takes its objects with it.
    pub fn delete(
        &self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        options: Option<&Value>,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let ns = if res.namespaced { ns } else { "" };
        let mut g = self.lock();
        let old = g
            .objects
            .get(&key(res, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::NotFound { plural: res.plural.into(), name: name.into() })?;
        if let Some(pre) = options.and_then(|o| o.get("preconditions")) {
            for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
                if let Some(want) = pre.get(field).and_then(Value::as_str) {
                    let have = meta_str(&old, field);
                    if want != have {
                        return Err(ApiError::Conflict {
                            plural: res.plural.into(),
                            name: name.into(),
                            msg: format!(
                                "Precondition failed: {what} in precondition: {want}, {what} in object meta: {have}"
                            ),
                        });
                    }
                }
            }
        }
        if dry_run {
            return Ok(old);
        }
        if res.plural == "namespaces" {
            let inside: Vec<(Key, Arc<Value>)> =
                g.objects.iter().filter(|(k, _)| k.2 == name).map(|(k, v)| (k.clone(), v.clone())).collect();
            for (k, v) in inside {
                let Some(r) = RESOURCES.iter().find(|r| r.group == k.0 && r.plural == k.1 && r.namespaced) else {
                    continue;
                };
                g.commit(r, &k.2, &k.3, EventType::Deleted, (*v).clone())?;
            }
        }
        let out = g.commit(res, ns, name, EventType::Deleted, (*old).clone())?;
        let rv = g.rv;
        drop(g);
        self.announce(rv);
        Ok(out)
    }

    /// Parses a resourceVersion parameter.
    pub fn parse_rv(s: &str) -> Result<u64, ApiError> {
        parse_rv(s).ok_or_else(|| ApiError::BadRequest(format!("invalid resourceVersion {s:?}: not a number")))
    }
}

fn namespaces() -> &'static Resource {
    RESOURCES.iter().find(|r| r.plural == "namespaces").expect("namespaces are served")
}
