//! The three patch types of the API server: JSON merge patch (RFC 7386), JSON patch
//! (RFC 6902) and Kubernetes' strategic merge patch (lists merged by their merge key, `$patch`,
//! `$setElementOrder`, `$retainKeys` and `$deleteFromPrimitiveList` directives).

use serde_json::{Map, Value};

/// A patch body's type, from the request's `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/json-patch+json`.
    Json,
}

impl PatchType {
    /// The patch type of a content type, `None` when the server does not support it.
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/json-patch+json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// Applies `patch` of type `ty` to `doc`; on an error `doc` is unchanged.
pub fn apply(ty: PatchType, doc: &mut Value, patch: &Value) -> Result<(), String> {
    match ty {
        PatchType::Merge => {
            if !patch.is_object() {
                return Err("a merge patch must be a JSON object".into());
            }
            json_patch::merge(doc, patch);
            Ok(())
        }
        PatchType::Json => {
            let ops: json_patch::Patch =
                serde_json::from_value(patch.clone()).map_err(|e| format!("invalid JSON patch: {e}"))?;
            json_patch::patch(doc, &ops).map_err(|e| format!("the JSON patch does not apply: {e}"))
        }
        PatchType::Strategic => {
            let (Some(d), Some(p)) = (doc.as_object(), patch.as_object()) else {
                return Err("a strategic merge patch must be a JSON object".into());
            };
            // On a copy: a patch that fails half-way changes nothing.
            let mut work = d.clone();
            merge_map(&mut work, p)?;
            *doc = Value::Object(work);
            Ok(())
        }
    }
}

/// How a list field is patched, by the field's name (the merge keys of the built-in types
/// the server serves: pods, nodes, namespaces, configmaps, networkpolicies).
enum ListStrategy {
    ByKey(&'static str),
    Primitive,
    Replace,
}

fn list_strategy(field: &str) -> ListStrategy {
    match field {
        "conditions" | "addresses" => ListStrategy::ByKey("type"),
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims" => ListStrategy::ByKey("name"),
        "volumeMounts" => ListStrategy::ByKey("mountPath"),
        "volumeDevices" => ListStrategy::ByKey("devicePath"),
        "ports" => ListStrategy::ByKey("containerPort"),
        "taints" => ListStrategy::ByKey("key"),
        "ownerReferences" => ListStrategy::ByKey("uid"),
        "hostIPs" | "podIPs" | "hostAliases" => ListStrategy::ByKey("ip"),
        "topologySpreadConstraints" => ListStrategy::ByKey("topologyKey"),
        "finalizers" | "podCIDRs" => ListStrategy::Primitive,
        _ => ListStrategy::Replace,
    }
}

fn directive(v: &Value) -> Option<&str> {
    v.as_object().and_then(|m| m.get("$patch")).and_then(Value::as_str)
}

/// Strips directives and nulls from new content (what the patch adds where there was nothing).
fn clean(v: &Value) -> Result<Value, String> {
    match v {
        Value::Object(p) => {
            let mut m = Map::new();
            merge_map(&mut m, p)?;
            Ok(Value::Object(m))
        }
        Value::Array(a) => {
            Ok(Value::Array(a.iter().filter(|e| directive(e).is_none()).map(clean).collect::<Result<_, _>>()?))
        }
        other => Ok(other.clone()),
    }
}

fn merge_map(doc: &mut Map<String, Value>, patch: &Map<String, Value>) -> Result<(), String> {
    match patch.get("$patch").map(|v| v.as_str()) {
        None => {}
        Some(Some("replace")) => {
            let mut rest = patch.clone();
            rest.remove("$patch");
            *doc = clean(&Value::Object(rest))?.as_object().cloned().unwrap_or_default();
            return Ok(());
        }
        Some(Some("merge")) => {}
        Some(other) => return Err(format!("unknown patch directive in a map: {other:?}")),
    }
    let mut orders = Vec::new();
    let mut deletions = Vec::new();
    for (k, pv) in patch {
        if k == "$patch" || k == "$retainKeys" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            orders.push((field.to_string(), pv));
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            deletions.push((field.to_string(), pv));
            continue;
        }
        if k.starts_with('$') {
            return Err(format!("unknown patch directive {k:?}"));
        }
        match pv {
            Value::Null => {
                doc.remove(k);
            }
            Value::Object(pm) => {
                if directive(pv) == Some("delete") {
                    doc.remove(k);
                } else if let Some(Value::Object(dm)) = doc.get_mut(k) {
                    merge_map(dm, pm)?;
                } else {
                    doc.insert(k.clone(), clean(pv)?);
                }
            }
            Value::Array(pa) => {
                let merged = match (list_strategy(k), doc.remove(k)) {
                    (_, _) if pa.iter().any(|e| directive(e) == Some("replace")) => clean(pv)?,
                    (ListStrategy::ByKey(key), Some(Value::Array(mut da))) => {
                        merge_by_key(&mut da, pa, key)?;
                        Value::Array(da)
                    }
                    (ListStrategy::Primitive, Some(Value::Array(mut da))) => {
                        for e in pa {
                            if !da.contains(e) {
                                da.push(e.clone());
                            }
                        }
                        Value::Array(da)
                    }
                    _ => clean(pv)?,
                };
                doc.insert(k.clone(), merged);
            }
            scalar => {
                doc.insert(k.clone(), scalar.clone());
            }
        }
    }
    for (field, vals) in deletions {
        let vals = vals.as_array().ok_or("$deleteFromPrimitiveList wants a list")?;
        if let Some(Value::Array(da)) = doc.get_mut(&field) {
            da.retain(|e| !vals.contains(e));
        }
    }
    for (field, order) in orders {
        let order = order.as_array().ok_or("$setElementOrder wants a list")?;
        if let Some(Value::Array(da)) = doc.get_mut(&field) {
            let key = match list_strategy(&field) {
                ListStrategy::ByKey(k) => Some(k),
                _ => None,
            };
            let rank = |e: &Value| {
                let id = key.map_or(Some(e), |k| e.get(k));
                order.iter().position(|o| key.map_or(Some(o), |k| o.get(k)) == id).unwrap_or(usize::MAX)
            };
            da.sort_by_key(rank);
        }
    }
    if let Some(keep) = patch.get("$retainKeys") {
        let keep = keep.as_array().ok_or("$retainKeys wants a list")?;
        doc.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    Ok(())
}

fn merge_by_key(doc: &mut Vec<Value>, patch: &[Value], key: &str) -> Result<(), String> {
    for pe in patch {
        let Some(pm) = pe.as_object() else {
            return Err(format!("a list merged by {key:?} holds objects, found {pe}"));
        };
        let id = pm.get(key).ok_or_else(|| format!("a list element has no merge key {key:?}: {pe}"))?;
        let pos = doc.iter().position(|d| d.get(key) == Some(id));
        match (directive(pe), pos) {
            (Some("delete"), Some(i)) => {
                doc.remove(i);
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => match &mut doc[i] {
                Value::Object(dm) => merge_map(dm, pm)?,
                other => *other = clean(pe)?,
            },
            (_, None) => doc.push(clean(pe)?),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(doc: Value, patch: Value) -> Value {
        let mut d = doc;
        apply(PatchType::Strategic, &mut d, &patch).unwrap();
        d
    }

    #[test]
    fn conditions_merge_by_type_and_annotations_merge_with_null_deleting() {
        let doc = json!({
            "metadata": {"annotations": {"a": "1", "b": "2"}},
            "status": {"conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "True", "reason": "NoRoute"}
            ]}
        });
        let out = smp(
            doc,
            json!({
                "metadata": {"annotations": {"b": null, "c": "3"}},
                "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}]}
            }),
        );
        assert_eq!(out["metadata"]["annotations"], json!({"a": "1", "c": "3"}));
        assert_eq!(
            out["status"]["conditions"],
            json!([
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}
            ])
        );
    }

    #[test]
    fn directives_delete_replace_order_and_primitive_lists() {
        let doc = json!({"spec": {"podCIDRs": ["10.0.0.0/24"], "taints": [{"key": "a"}, {"key": "b"}]}});
        let out = smp(
            doc.clone(),
            json!({"spec": {"podCIDRs": ["fd00::/64"], "taints": [{"key": "a", "$patch": "delete"}]}}),
        );
        assert_eq!(out["spec"], json!({"podCIDRs": ["10.0.0.0/24", "fd00::/64"], "taints": [{"key": "b"}]}));
        let out = smp(doc.clone(), json!({"spec": {"$patch": "replace", "unschedulable": true}}));
        assert_eq!(out["spec"], json!({"unschedulable": true}));
        let out = smp(
            doc.clone(),
            json!({"spec": {"$setElementOrder/taints": [{"key": "b"}, {"key": "a"}], "taints": [{"key": "a", "effect": "NoSchedule"}]}}),
        );
        assert_eq!(out["spec"]["taints"], json!([{"key": "b"}, {"key": "a", "effect": "NoSchedule"}]));
        let out = smp(doc, json!({"spec": {"$deleteFromPrimitiveList/podCIDRs": ["10.0.0.0/24"]}}));
        assert_eq!(out["spec"]["podCIDRs"], json!([]));
    }

    #[test]
    fn hostile_patches_are_errors_not_panics() {
        let mut d = json!({"status": {"conditions": [{"type": "Ready"}]}});
        for p in [
            json!({"status": {"conditions": ["not an object"]}}),
            json!({"status": {"conditions": [{"no": "type"}]}}),
            json!({"$bogus": 1}),
            json!({"$patch": "explode"}),
            json!([1, 2]),
        ] {
            assert!(apply(PatchType::Strategic, &mut d, &p).is_err(), "{p}");
        }
        assert!(apply(PatchType::Json, &mut d, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        assert!(apply(PatchType::Json, &mut d, &json!({"op": "add"})).is_err());
        assert!(apply(PatchType::Merge, &mut d, &json!("x")).is_err());
        assert_eq!(d, json!({"status": {"conditions": [{"type": "Ready"}]}}), "failed patches change nothing");
        apply(PatchType::Json, &mut d, &json!([{"op": "add", "path": "/spec", "value": {"x": 1}}])).unwrap();
        assert_eq!(d["spec"]["x"], 1);
    }
}
