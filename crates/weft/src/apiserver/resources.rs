//! The resources the test API server serves, and what is special about each (scope, status
//! subresource, which k8s-openapi type checks a body, what the server resets on create and
//! update). Adding a resource is one entry here and one arm in [`typed_roundtrip`].

use serde_json::{Map, Value};

/// One served resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    /// API group ("" for the core group).
    pub group: &'static str,
    /// API version.
    pub version: &'static str,
    /// Plural name, the path segment.
    pub plural: &'static str,
    /// Singular name.
    pub singular: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether the resource has a `status` subresource.
    pub status: bool,
    /// kubectl short names.
    pub short_names: &'static [&'static str],
}

impl Resource {
    /// `apiVersion` of the objects: `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }
}

const fn r(
    group: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
    short_names: &'static [&'static str],
) -> Resource {
    Resource { group, version: "v1", plural, singular, kind, namespaced, status, short_names }
}

/// Every served resource.
pub const RESOURCES: &[Resource] = &[
    r("", "namespaces", "namespace", "Namespace", false, true, &["ns"]),
    r("", "nodes", "node", "Node", false, true, &["no"]),
    r("", "pods", "pod", "Pod", true, true, &["po"]),
    r("", "configmaps", "configmap", "ConfigMap", true, false, &["cm"]),
    r("", "serviceaccounts", "serviceaccount", "ServiceAccount", true, false, &["sa"]),
    r("networking.k8s.io", "networkpolicies", "networkpolicy", "NetworkPolicy", true, false, &["netpol"]),
];

/// The resource served at `group/version/plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The groups besides the core group, in discovery order.
pub fn groups() -> Vec<&'static str> {
    let mut g: Vec<&'static str> = RESOURCES.iter().map(|r| r.group).filter(|g| !g.is_empty()).collect();
    g.dedup();
    g
}

/// Decodes `obj` into the k8s-openapi type of `res` and encodes it again, as the real API
/// server decodes into its Go types: fields the type does not know are dropped, a field of
/// the wrong type is an error (the message names it).
pub fn typed_roundtrip(res: &Resource, obj: Value) -> Result<Value, String> {
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::networking::v1 as net;
    fn rt<T: serde::de::DeserializeOwned + serde::Serialize>(v: Value) -> Result<Value, String> {
        let t: T = serde_json::from_value(v).map_err(|e| e.to_string())?;
        serde_json::to_value(&t).map_err(|e| e.to_string())
    }
    match res.plural {
        "namespaces" => rt::<core::Namespace>(obj),
        "nodes" => rt::<core::Node>(obj),
        "pods" => rt::<core::Pod>(obj),
        "configmaps" => rt::<core::ConfigMap>(obj),
        "serviceaccounts" => rt::<core::ServiceAccount>(obj),
        "networkpolicies" => rt::<net::NetworkPolicy>(obj),
        other => Err(format!("no type for resource {other}")),
    }
}

/// The JSON paths of keys in `original` that `roundtrip` lost: the fields a typed decode
/// did not know. `null` values are not counted (the typed form omits them too).
pub fn unknown_fields(original: &Value, roundtrip: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(original, roundtrip, String::new(), &mut out);
    out
}

fn walk(a: &Value, b: &Value, path: String, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match b.get(k) {
                    Some(w) => walk(v, w, p, out),
                    None if v.is_null() => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b.iter()).enumerate() {
                walk(v, w, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// What the server does to a new object of `res` besides metadata: pods start `Pending`
/// with no other status; a namespace is `Active`; nodes keep what the client sent (the
/// real server allows a node's status on create).
pub fn prepare_create(res: &Resource, obj: &mut Map<String, Value>) {
    match res.plural {
        "pods" => {
            obj.insert("status".into(), serde_json::json!({"phase": "Pending"}));
        }
        "namespaces" => {
            obj.insert("status".into(), serde_json::json!({"phase": "Active"}));
            let spec = obj.entry("spec").or_insert_with(|| serde_json::json!({}));
            if let Some(s) = spec.as_object_mut() {
                s.entry("finalizers").or_insert_with(|| serde_json::json!(["kubernetes"]));
            }
            let name = obj.get("metadata").and_then(|m| m.get("name")).cloned();
            if let (Some(name), Some(meta)) = (name, obj.get_mut("metadata").and_then(Value::as_object_mut)) {
                let labels = meta.entry("labels").or_insert_with(|| serde_json::json!({}));
                if let Some(l) = labels.as_object_mut() {
                    l.insert("kubernetes.io/metadata.name".into(), name);
                }
            }
        }
        _ => {}
    }
}

/// Whether a write to the `status` subresource may change labels and annotations: the
/// real server allows it for nodes (flannel writes its annotations that way) and resets
/// metadata for the others.
pub fn status_keeps_metadata(res: &Resource) -> bool {
    res.plural == "nodes"
}
