//! The HTTP side: authentication, discovery, routing of resource paths to the store, list
//! and watch, and Kubernetes `Status` errors for everything that goes wrong.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use hyper::{Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};

use super::patch::PatchType;
use super::resources::{self, RESOURCES, Resource};
use super::select::{FieldSelector, LabelSelector};
use super::store::{ApiError, EventType, Store, WriteOpts, status_value};

/// What every request handler shares.
pub struct Shared {
    /// The objects.
    pub store: Arc<Store>,
    /// The bearer token clients must send.
    pub token: String,
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// The largest request body accepted.
    pub max_body: usize,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// The address clients reach the server at (for `/api`'s serverAddressByClientCIDRs).
    pub address: String,
}

type Resp = Response<Body>;

fn json_response(code: u16, v: &Value) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_default()
}

fn error(e: &ApiError) -> Resp {
    json_response(e.code_reason().0, &e.status())
}

fn fail(code: u16, reason: &str, message: &str) -> Resp {
    json_response(code, &status_value(code, reason, message))
}

fn not_found_path(path: &str) -> Resp {
    let mut s = status_value(404, "NotFound", "the server could not find the requested resource");
    s["details"] =
        json!({"causes": [{"reason": "UnexpectedServerResponse", "message": format!("404 page not found: {path}")}]});
    json_response(404, &s)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn truthy(q: &HashMap<String, String>, k: &str) -> bool {
    matches!(q.get(k).map(String::as_str), Some("1" | "true" | "True"))
}

/// Handles one request; never panics on anything a client sends.
pub async fn handle(sh: Arc<Shared>, req: Request<hyper::body::Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let public = matches!(path.as_str(), "/healthz" | "/livez" | "/readyz" | "/version");
    if !public {
        let want = format!("Bearer {}", sh.token);
        let ok = req.headers().get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()).is_some_and(|h| h == want);
        if !ok {
            return fail(401, "Unauthorized", "Unauthorized");
        }
    }
    let q = query(req.uri().query());
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz" | "/livez" | "/readyz") => {
            return Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Body::from("ok"))
                .unwrap_or_default();
        }
        (&Method::GET, "/version") => {
            return json_response(
                200,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-weft", "gitCommit": "weft-test-apiserver",
                        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24.0",
                        "compiler": "gc", "platform": "linux/amd64"}),
            );
        }
        (&Method::GET, "/api") => {
            return json_response(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"],
                        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": sh.address}]}),
            );
        }
        (&Method::GET, "/apis") => {
            let groups: Vec<Value> = resources::groups().into_iter().map(group_json).collect();
            return json_response(200, &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}));
        }
        (&Method::GET, "/api/v1") => return json_response(200, &resource_list("", "v1")),
        (&Method::GET, "/openapi/v3") => return json_response(200, &openapi_root()),
        (&Method::GET, p) if p.starts_with("/openapi/v3/") => {
            let gv = &p["/openapi/v3/".len()..];
            return match openapi_gv(gv) {
                Some(doc) => json_response(200, &doc),
                None => not_found_path(p),
            };
        }
        (&Method::POST, "/weft-test/compact") => {
            let rv = sh.store.compact();
            return json_response(200, &json!({"compactedTo": rv.to_string()}));
        }
        _ => {}
    }
    let (group, version, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
        ("", "v1", rest)
    } else if let Some(rest) = path.strip_prefix("/apis/") {
        let mut it = rest.splitn(3, '/');
        let (g, v, r) = (it.next().unwrap_or(""), it.next(), it.next());
        match (v, r) {
            (None, _) | (Some(""), None) if req.method() == Method::GET && resources::groups().contains(&g) => {
                let mut gj = group_json(resources::groups().into_iter().find(|x| *x == g).unwrap_or(""));
                gj["kind"] = json!("APIGroup");
                gj["apiVersion"] = json!("v1");
                return json_response(200, &gj);
            }
            (Some(v), None)
                if req.method() == Method::GET && RESOURCES.iter().any(|r| r.group == g && r.version == v) =>
            {
                return json_response(200, &resource_list(g, v));
            }
            (Some(v), Some(r)) => (g, v, r),
            _ => return not_found_path(&path),
        }
    } else {
        return not_found_path(&path);
    };
    let segs: Vec<&str> = rest.split('/').collect();
    if segs.iter().any(|s| s.is_empty()) {
        return not_found_path(&path);
    }
    // (resource, namespace, name, status subresource)
    let target = match segs.as_slice() {
        ["namespaces", ns, plural] if *plural != "status" && *plural != "finalize" => {
            resources::find(group, version, plural).filter(|r| r.namespaced).map(|r| (r, Some(*ns), None, false))
        }
        ["namespaces", ns, plural, name] => {
            resources::find(group, version, plural).filter(|r| r.namespaced).map(|r| (r, Some(*ns), Some(*name), false))
        }
        ["namespaces", ns, plural, name, "status"] => resources::find(group, version, plural)
            .filter(|r| r.namespaced && r.status)
            .map(|r| (r, Some(*ns), Some(*name), true)),
        [plural] => resources::find(group, version, plural).map(|r| (r, None, None, false)),
        [plural, name] => {
            resources::find(group, version, plural).filter(|r| !r.namespaced).map(|r| (r, None, Some(*name), false))
        }
        [plural, name, "status"] => resources::find(group, version, plural)
            .filter(|r| !r.namespaced && r.status)
            .map(|r| (r, None, Some(*name), true)),
        _ => None,
    };
    let Some((res, ns, name, status)) = target else {
        return not_found_path(&path);
    };
    let wopts = WriteOpts {
        dry_run: q.get("dryRun").is_some_and(|v| v == "All"),
        strict: q.get("fieldValidation").is_some_and(|v| v == "Strict"),
    };
    let method = req.method().clone();
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
    let accept = req.headers().get(header::ACCEPT).and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
    let ns_str = ns.unwrap_or("");
    // Protobuf, CBOR and YAML bodies cannot be decoded here; 415 makes client-go fall back to JSON.
    if matches!(method, Method::POST | Method::PUT)
        && ["protobuf", "cbor", "yaml"].iter().any(|f| content_type.contains(f))
    {
        return fail(
            415,
            "UnsupportedMediaType",
            &format!(
                "the body of the request was in an unknown format - accepted media types include: application/json (got {content_type:?})"
            ),
        );
    }
    match (name, method) {
        (None, Method::GET) => {
            if truthy(&q, "watch") {
                watch(sh, res, ns, &q, accept.contains("as=Table"))
            } else {
                list(&sh, res, ns, &q, &accept)
            }
        }
        (None, Method::POST) if ns.is_some() || !res.namespaced => match read_json(&sh, req).await {
            Ok(body) => match sh.store.create(res, ns_str, body, wopts) {
                Ok(o) => json_response(201, &o),
                Err(e) => error(&e),
            },
            Err(r) => r,
        },
        (Some(name), Method::GET) => match sh.store.get(res, ns_str, name) {
            Ok(o) => json_response(200, &o),
            Err(e) => error(&e),
        },
        (Some(name), Method::PUT) => match read_json(&sh, req).await {
            Ok(body) => match sh.store.update(res, ns_str, name, body, status, wopts) {
                Ok(o) => json_response(200, &o),
                Err(e) => error(&e),
            },
            Err(r) => r,
        },
        (Some(name), Method::PATCH) => {
            let Some(ty) = PatchType::from_content_type(&content_type) else {
                return fail(
                    415,
                    "UnsupportedMediaType",
                    &format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"
                    ),
                );
            };
            match read_json(&sh, req).await {
                Ok(body) => match sh.store.patch(res, ns_str, name, ty, &body, status, wopts) {
                    Ok(o) => json_response(200, &o),
                    Err(e) => error(&e),
                },
                Err(r) => r,
            }
        }
        (Some(name), Method::DELETE) if !status => {
            let body = read_body(&sh, req).await;
            let opts = match &body {
                Ok(b) if b.iter().all(u8::is_ascii_whitespace) => None,
                Ok(b) => match serde_json::from_slice::<Value>(b) {
                    Ok(v) => Some(v),
                    Err(e) => return fail(400, "BadRequest", &format!("DeleteOptions in body: {e}")),
                },
                Err(r) => return json_response(413, &status_value(413, "RequestEntityTooLarge", r)),
            };
            match sh.store.delete(res, ns_str, name, opts.as_ref(), wopts.dry_run) {
                Ok(o) => json_response(200, &o),
                Err(e) => error(&e),
            }
        }
        (_, m) => fail(
            405,
            "MethodNotAllowed",
            &format!("the server does not allow this method on the requested resource ({m})"),
        ),
    }
}

fn group_json(g: &str) -> Value {
    let versions: Vec<Value> = {
        let mut v: Vec<&str> = RESOURCES.iter().filter(|r| r.group == g).map(|r| r.version).collect();
        v.dedup();
        v.into_iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect()
    };
    let preferred = versions.first().cloned().unwrap_or(Value::Null);
    json!({"name": g, "versions": versions, "preferredVersion": preferred})
}

fn resource_list(group: &str, version: &str) -> Value {
    let mut out = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
        out.push(json!({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": r.short_names}));
        if r.status {
            out.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out})
}

fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<(&str, &str)> = RESOURCES.iter().map(|r| (r.group, r.version)).collect();
    v.dedup();
    v
}

fn gv_path(g: &str, v: &str) -> String {
    if g.is_empty() { format!("api/{v}") } else { format!("apis/{g}/{v}") }
}

/// The OpenAPI v3 index: kubectl reads it to learn that the server validates fields itself
/// (`fieldValidation`), and then skips client-side schema validation.
fn openapi_root() -> Value {
    let paths: serde_json::Map<String, Value> = group_versions()
        .into_iter()
        .map(|(g, v)| (gv_path(g, v), json!({"serverRelativeURL": format!("/openapi/v3/{}?hash=weft", gv_path(g, v))})))
        .collect();
    json!({"paths": paths})
}

/// A minimal OpenAPI v3 document of one group-version: the PATCH operation of each
/// resource with its group-version-kind and the `fieldValidation` parameter (no schemas).
fn openapi_gv(gv: &str) -> Option<Value> {
    let (g, v) = group_versions().into_iter().find(|(g, v)| gv_path(g, v) == gv)?;
    let mut paths = serde_json::Map::new();
    for r in RESOURCES.iter().filter(|r| r.group == g && r.version == v) {
        let base = if r.namespaced {
            format!("/{}/namespaces/{{namespace}}/{}/{{name}}", gv_path(g, v), r.plural)
        } else {
            format!("/{}/{}/{{name}}", gv_path(g, v), r.plural)
        };
        let op = json!({"patch": {
            "operationId": format!("patch{}", r.kind),
            "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}}
            ],
            "responses": {"200": {"description": "OK"}},
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind}
        }});
        paths.insert(base, op);
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0"}, "paths": paths, "components": {"schemas": {}}}),
    )
}

async fn read_body(sh: &Shared, req: Request<hyper::body::Incoming>) -> Result<Vec<u8>, &'static str> {
    const TOO_LARGE: &str = "the request body is too large";
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|h| h.to_str().ok()?.parse::<usize>().ok());
    let mut stream = Body::new(req.into_body()).into_data_stream();
    // A refused body is still read (and thrown away, up to a bound) before the 413 goes
    // out: a server that closes with unread bytes resets the connection, and the client,
    // still sending, loses the answer.
    let drain_limit = sh.max_body.saturating_mul(16);
    let read = async {
        let mut out = Vec::new();
        let mut refused = declared.is_some_and(|n| n > sh.max_body);
        let mut seen = 0usize;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| "the request body could not be read")?;
            seen += chunk.len();
            if refused || out.len() + chunk.len() > sh.max_body {
                refused = true;
                if seen > drain_limit {
                    break;
                }
                continue;
            }
            out.extend_from_slice(&chunk);
        }
        if refused { Err(TOO_LARGE) } else { Ok(out) }
    };
    // A client that trickles its body does not hold a request forever.
    tokio::time::timeout(sh.body_timeout, read).await.unwrap_or(Err("timed out reading the request body"))
}

async fn read_json(sh: &Shared, req: Request<hyper::body::Incoming>) -> Result<Value, Resp> {
    let body = read_body(sh, req).await.map_err(|m| {
        let code = if m.contains("too large") { 413 } else { 400 };
        json_response(code, &status_value(code, if code == 413 { "RequestEntityTooLarge" } else { "BadRequest" }, m))
    })?;
    serde_json::from_slice(&body).map_err(|e| fail(400, "BadRequest", &format!("the body is not JSON: {e}")))
}

struct Selectors {
    label: LabelSelector,
    field: FieldSelector,
}

impl Selectors {
    fn parse(res: &Resource, q: &HashMap<String, String>) -> Result<Self, ApiError> {
        let label = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::BadRequest)?;
        let field = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""), res)
            .map_err(ApiError::BadRequest)?;
        Ok(Self { label, field })
    }

    fn matches(&self, o: &Value) -> bool {
        self.label.matches(o) && self.field.matches(o)
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

fn obj_key(o: &Value) -> String {
    let m = o.get("metadata");
    let f = |k: &str| m.and_then(|m| m.get(k)).and_then(Value::as_str).unwrap_or("").to_string();
    format!("{}/{}", f("namespace"), f("name"))
}

fn list(sh: &Shared, res: &'static Resource, ns: Option<&str>, q: &HashMap<String, String>, accept: &str) -> Resp {
    let sel = match Selectors::parse(res, q) {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let limit = match q.get("limit").filter(|s| !s.is_empty()).map(|s| s.parse::<usize>()) {
        None => None,
        Some(Ok(0)) => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return fail(400, "BadRequest", "limit must be a non-negative integer"),
    };
    let rv_param = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    // The real server answers resourceVersion=0 from its watch cache, which ignores limit.
    let limit = if rv_param == "0" { None } else { limit };
    let (at, after) = match q.get("continue").filter(|s| !s.is_empty()) {
        Some(tok) => {
            let Some((rv, after)) = unhex(tok).and_then(|t| {
                let (rv, after) = t.split_once(':')?;
                Some((rv.parse::<u64>().ok()?, after.to_string()))
            }) else {
                return fail(400, "BadRequest", "continue key is not valid");
            };
            (Some(rv), Some(after))
        }
        None if q.get("resourceVersionMatch").is_some_and(|m| m == "Exact") => match Store::parse_rv(rv_param) {
            // The state exactly at that version (410 when the history no longer has it).
            Ok(rv) if rv <= sh.store.resource_version() => (Some(rv), None),
            Ok(rv) => {
                return fail(
                    504,
                    "Timeout",
                    &format!("Too large resource version: {rv}, current: {}", sh.store.resource_version()),
                );
            }
            Err(e) => return error(&e),
        },
        None => {
            if !rv_param.is_empty() && rv_param != "0" {
                match Store::parse_rv(rv_param) {
                    Ok(want) if want > sh.store.resource_version() => {
                        return fail(
                            504,
                            "Timeout",
                            &format!("Too large resource version: {want}, current: {}", sh.store.resource_version()),
                        );
                    }
                    Ok(_) => {}
                    Err(e) => return error(&e),
                }
            }
            (None, None)
        }
    };
    let snap = match sh.store.list(res, ns, at) {
        Ok(s) => s,
        Err(ApiError::Gone { .. }) if after.is_some() => {
            return fail(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            );
        }
        Err(e) => return error(&e),
    };
    let mut items: Vec<&Value> = Vec::new();
    let mut cont = None;
    let mut remaining = 0usize;
    for o in snap.items.iter().map(|o| o.as_ref()) {
        if after.as_ref().is_some_and(|a| obj_key(o) <= *a) || !sel.matches(o) {
            continue;
        }
        if limit.is_some_and(|l| items.len() >= l) {
            remaining += 1;
            continue;
        }
        items.push(o);
    }
    if remaining > 0
        && let Some(last) = items.last()
    {
        cont = Some(hex(&format!("{}:{}", snap.rv, obj_key(last))));
    }
    if accept.contains("as=Table") {
        return json_response(200, &table(res, &items, snap.rv));
    }
    let mut meta = json!({"resourceVersion": snap.rv.to_string()});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
        meta["remainingItemCount"] = json!(remaining);
    }
    let list = ListBody {
        kind: format!("{}List", res.kind),
        api_version: res.api_version(),
        metadata: meta,
        items: items.into_iter().map(Untyped).collect(),
    };
    let body = serde_json::to_vec(&list).unwrap_or_default();
    Response::builder().header(header::CONTENT_TYPE, "application/json").body(Body::from(body)).unwrap_or_default()
}

/// A list response, serialized straight from the stored objects (no copies).
#[derive(serde::Serialize)]
struct ListBody<'a> {
    kind: String,
    #[serde(rename = "apiVersion")]
    api_version: String,
    metadata: Value,
    items: Vec<Untyped<'a>>,
}

/// An object without `kind` and `apiVersion`, as list items are sent.
struct Untyped<'a>(&'a Value);

impl serde::Serialize for Untyped<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Some(m) = self.0.as_object() else { return self.0.serialize(s) };
        let mut out = s.serialize_map(None)?;
        for (k, v) in m.iter().filter(|(k, _)| *k != "kind" && *k != "apiVersion") {
            out.serialize_entry(k, v)?;
        }
        out.end()
    }
}

/// A `meta.k8s.io/v1` Table, which `kubectl get` asks for: name and age, plus the
/// node columns kubectl users know.
fn table(res: &Resource, items: &[&Value], rv: u64) -> Value {
    let mut cols =
        vec![json!({"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0})];
    if res.plural == "nodes" {
        cols.push(json!({"name": "Status", "type": "string", "format": "", "description": "", "priority": 0}));
    }
    cols.push(json!({"name": "Age", "type": "string", "format": "", "description": "", "priority": 0}));
    let now = k8s_openapi::jiff::Timestamp::now();
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let m = o.get("metadata");
            let name = m.and_then(|m| m.get("name")).cloned().unwrap_or(json!(""));
            let age = m
                .and_then(|m| m.get("creationTimestamp"))
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                .map(|t| {
                    let s = now.as_second().saturating_sub(t.as_second()).max(0);
                    if s < 120 {
                        format!("{s}s")
                    } else if s < 7200 {
                        format!("{}m", s / 60)
                    } else {
                        format!("{}h", s / 3600)
                    }
                })
                .unwrap_or_else(|| "<unknown>".into());
            let mut cells = vec![name];
            if res.plural == "nodes" {
                let ready = o
                    .pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .and_then(|c| c.iter().find(|c| c.get("type").and_then(Value::as_str) == Some("Ready")))
                    .and_then(|c| c.get("status").and_then(Value::as_str))
                    .map(|s| if s == "True" { "Ready" } else { "NotReady" })
                    .unwrap_or("Unknown");
                cells.push(json!(ready));
            }
            cells.push(json!(age));
            let mut partial = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1"});
            partial["metadata"] = m.cloned().unwrap_or(json!({}));
            json!({"cells": cells, "object": partial})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()},
           "columnDefinitions": cols, "rows": rows})
}

#[derive(serde::Serialize)]
struct WatchEvent<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    object: &'a Value,
}

fn line(ty: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&WatchEvent { ty, object }).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn event_line(ty: &str, obj: &Value, res: &Resource, as_table: bool) -> Bytes {
    if as_table {
        let rv =
            obj.pointer("/metadata/resourceVersion").and_then(Value::as_str).and_then(|r| r.parse().ok()).unwrap_or(0);
        line(ty, &table(res, &[obj], rv))
    } else {
        line(ty, obj)
    }
}

fn bookmark(res: &Resource, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line("BOOKMARK", &json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": meta}))
}

/// A watch stream; with `as_table` (what `kubectl get -w` asks for) each event carries a
/// one-row Table, as the real server sends.
fn watch(
    sh: Arc<Shared>,
    res: &'static Resource,
    ns: Option<&str>,
    q: &HashMap<String, String>,
    as_table: bool,
) -> Resp {
    let sel = match Selectors::parse(res, q) {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let rv_param = q.get("resourceVersion").cloned().unwrap_or_default();
    let start = if rv_param.is_empty() || rv_param == "0" {
        None
    } else {
        match Store::parse_rv(&rv_param) {
            Ok(r) => Some(r),
            Err(e) => return error(&e),
        }
    };
    let bookmarks = truthy(q, "allowWatchBookmarks");
    let initial = truthy(q, "sendInitialEvents");
    let timeout = match q.get("timeoutSeconds").filter(|s| !s.is_empty()).map(|s| s.parse::<u64>()) {
        None => Duration::from_secs(1800),
        Some(Ok(s)) => Duration::from_secs(s.clamp(1, 86_400)),
        Some(Err(_)) => return fail(400, "BadRequest", "timeoutSeconds must be a non-negative integer"),
    };
    let ns = ns.map(str::to_string);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let store = sh.store.clone();
        let mut notify = store.subscribe();
        notify.borrow_and_update();
        let deadline = tokio::time::Instant::now() + timeout;
        let in_scope =
            |e_res: &Resource, e_ns: &str| std::ptr::eq(e_res, res) && ns.as_deref().is_none_or(|n| n == e_ns);
        let mut last = match (start, initial) {
            (Some(rv), false) if rv > store.resource_version() => {
                // A version this server never had (its state was wiped or replaced): the
                // client must re-list, or it would wait for versions that mean other things.
                let msg = format!(
                    "too new resource version: {rv} (the server is at {}); list again",
                    store.resource_version()
                );
                let _ = tx.send(line("ERROR", &status_value(410, "Expired", &msg))).await;
                return;
            }
            (Some(rv), false) => rv,
            _ => {
                let snap = match store.list(res, ns.as_deref(), None) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(line("ERROR", &e.status())).await;
                        return;
                    }
                };
                for o in snap.items.iter().filter(|o| sel.matches(o)) {
                    if tx.send(event_line("ADDED", o, res, as_table)).await.is_err() {
                        return;
                    }
                }
                if initial && bookmarks && tx.send(bookmark(res, snap.rv, true)).await.is_err() {
                    return;
                }
                snap.rv
            }
        };
        let mut next_bookmark = tokio::time::Instant::now() + sh.bookmark_interval;
        loop {
            notify.borrow_and_update();
            let batch = match store.events_after(last, 256) {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.send(line("ERROR", &e.status())).await;
                    return;
                }
            };
            let full = batch.len() == 256;
            for e in batch {
                last = e.rv;
                if !in_scope(e.res, &e.ns) {
                    continue;
                }
                let now_match = sel.matches(&e.obj);
                let was_match = e.prev.as_ref().is_some_and(|p| sel.matches(p));
                let ty = match e.ty {
                    EventType::Added if now_match => "ADDED",
                    EventType::Deleted if now_match => "DELETED",
                    EventType::Modified if now_match && was_match => "MODIFIED",
                    EventType::Modified if now_match => "ADDED",
                    EventType::Modified if was_match => "DELETED",
                    _ => continue,
                };
                if tx.send(event_line(ty, &e.obj, res, as_table)).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                changed = notify.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep_until(next_bookmark), if bookmarks => {
                    next_bookmark = tokio::time::Instant::now() + sh.bookmark_interval;
                    if tx.send(bookmark(res, last, false)).await.is_err() { return }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if bookmarks { let _ = tx.send(bookmark(res, last, false)).await; }
                    return;
                }
                _ = tx.closed() => return,
            }
        }
    });
    let stream =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|b| (Ok::<Bytes, std::io::Error>(b), rx)) },
        );
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_as_go_does() {
        let q = query(Some("labelSelector=app%3Dweb%2Ctier+in+%28a%2Cb%29&watch=1&x&bad=%zz&end=%4"));
        assert_eq!(q["labelSelector"], "app=web,tier in (a,b)");
        assert_eq!(q["watch"], "1");
        assert_eq!(q["x"], "");
        assert_eq!(q["bad"], "%zz");
        assert_eq!(q["end"], "%4");
    }

    #[test]
    fn continue_tokens_roundtrip_and_garbage_is_rejected() {
        assert_eq!(unhex(&hex("12:ns/name")).as_deref(), Some("12:ns/name"));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }
}
