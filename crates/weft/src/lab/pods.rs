//! `weft lab pod add` / `pod del` (labs with `--store kube`): single pods added and removed,
//! each with its Pod object (see [`super::kube::register`]) and a responder of ours
//! answering TCP and UDP on ports 80 and 81 inside it ([`super::responder`]); names and
//! labels checked as Kubernetes checks them.

use std::collections::BTreeMap;

use super::error::LabError;
use super::kube;
use super::state::Lab;
use super::topology::{self, load};

/// Whether `s` is a DNS-1123 label (a namespace or pod name): 1 to 63 lower-case letters,
/// digits and '-', starting and ending with a letter or digit.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn valid_label_part(s: &str, may_be_empty: bool) -> bool {
    if s.is_empty() {
        return may_be_empty;
    }
    let b = s.as_bytes();
    s.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Parses `k=v,k2=v2` into labels, with Kubernetes' rules for keys (optional DNS prefix
/// and '/', then a name) and values.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, LabError> {
    let mut out = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(LabError::Usage(format!("label {item:?} has no '=': write --labels key=value,key2=value2")));
        };
        let (prefix, name) = match k.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k),
        };
        let prefix_ok = prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253 && p.split('.').all(valid_name));
        if !prefix_ok || !valid_label_part(name, false) {
            return Err(LabError::Usage(format!(
                "invalid label key {k:?}: a name of up to 63 letters, digits, '-', '_' and '.' (starting and ending with a letter or digit), optionally prefixed by a DNS subdomain and '/'"
            )));
        }
        if !valid_label_part(v, true) {
            return Err(LabError::Usage(format!(
                "invalid value {v:?} of label {k:?}: up to 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
            )));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(LabError::Usage(format!("label {k:?} is given twice")));
        }
    }
    Ok(out)
}

/// The namespace name of a pod added with `weft lab pod add`.
pub fn netns_name(lab: &Lab, kube_ns: &str, name: &str) -> String {
    format!("{}-pod-{kube_ns}-{name}", lab.name)
}

fn need_kube(lab: &Lab) -> Result<(), LabError> {
    if lab.store != "kube" {
        return Err(LabError::Usage(format!(
            "lab {} has store {}: pods with namespaces, names and labels need a lab with --store kube",
            lab.name, lab.store
        )));
    }
    Ok(())
}

/// `weft lab pod add --host N --namespace NS --pod NAME [--labels k=v,…]`.
pub fn add(lab_name: &str, host: u8, kube_ns: &str, name: &str, labels: &str) -> Result<Lab, LabError> {
    let mut lab = load(lab_name)?;
    need_kube(&lab)?;
    for (what, v) in [("--namespace", kube_ns), ("--pod", name)] {
        if !valid_name(v) {
            return Err(LabError::Usage(format!(
                "invalid {what} {v:?}: use 1 to 63 lower-case letters, digits and '-', starting and ending with a letter or digit"
            )));
        }
    }
    let labels = parse_labels(labels)?;
    let Some(pos) = lab.hosts.iter().position(|h| h.index == host) else {
        let have: Vec<String> = lab.hosts.iter().map(|h| h.index.to_string()).collect();
        return Err(LabError::Usage(format!("lab {} has no host {host}; its hosts are {}", lab.name, have.join(", "))));
    };
    if lab.pods().any(|p| p.kube_ns == kube_ns && p.name == name) {
        return Err(LabError::Usage(format!(
            "pod {kube_ns}/{name} already exists in lab {}; remove it with `weft lab pod del --name {} --namespace {kube_ns} --pod {name}`",
            lab.name, lab.name
        )));
    }
    let pod_ns = netns_name(&lab, kube_ns, name);
    let pod = topology::create_pod(&lab, host, &pod_ns, kube_ns, name, labels)?;
    if let Err(e) = kube::register(&lab, &[(host, pod.clone())]) {
        topology::destroy_pod(&lab, host, &pod);
        let _ = kube::delete_object(&lab, &pod);
        return Err(e);
    }
    lab.hosts[pos].pods.push(pod);
    lab.save().map_err(|e| LabError::Step(format!("saving the lab state: {e}")))?;
    Ok(lab)
}

/// `weft lab pod del --namespace NS --pod NAME`.
pub fn del(lab_name: &str, kube_ns: &str, name: &str) -> Result<Lab, LabError> {
    let mut lab = load(lab_name)?;
    need_kube(&lab)?;
    let found =
        lab.hosts.iter().enumerate().find_map(|(h, host)| {
            host.pods.iter().position(|p| p.kube_ns == kube_ns && p.name == name).map(|p| (h, p))
        });
    let Some((h, p)) = found else {
        return Err(LabError::Usage(format!("lab {} has no pod {kube_ns}/{name}; see `weft lab status`", lab.name)));
    };
    let pod = lab.hosts[h].pods[p].clone();
    kube::delete_object(&lab, &pod)?;
    topology::destroy_pod(&lab, lab.hosts[h].index, &pod);
    lab.hosts[h].pods.remove(p);
    lab.save().map_err(|e| LabError::Step(format!("saving the lab state: {e}")))?;
    Ok(lab)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_kubernetes_rules() {
        let l = parse_labels("app=web, example.com/tier=1,empty=").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l["example.com/tier"], "1");
        assert_eq!(l["empty"], "");
        assert!(parse_labels("").unwrap().is_empty());
        for (bad, says) in [
            ("app", "has no '='"),
            ("bad key=v", "invalid label key"),
            ("=v", "invalid label key"),
            ("-a=v", "invalid label key"),
            ("Example.com/a=v", "invalid label key"),
            ("/a=v", "invalid label key"),
            ("a=-v", "invalid value"),
            ("a=v w", "invalid value"),
            (&format!("a={}", "v".repeat(64)), "invalid value"),
            ("a=1,a=2", "given twice"),
        ] {
            let e = parse_labels(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(valid_name("x") && valid_name("a-1"));
        for bad in ["", "A", "-a", "a-", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
