//! Reads the policy table back from `nft -j list table inet weft-netpol` into the compiler's
//! structure, so the applier can tell whether the kernel holds exactly what was compiled
//! (drift: an element, set, chain or rule removed or changed by someone else).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;

use super::compile::{Fam, FamilySets, Group, PortElem, Ruleset, num};
use super::model::Protocol;
use super::render::{TABLE, comment, forward_rules, group_rules};

/// The table as the kernel lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelTable {
    /// The table's comment (nft 1.0.6 leaves it out of its JSON; later versions print it).
    pub comment: Option<String>,
    /// Maps and sets, read back into the compiler's structure (node left empty).
    pub ruleset: Ruleset,
    /// Chain name → its rules, each summarised as the list of its statement kinds
    /// (`match`, `vmap`, `return`, `drop`, `accept`, …).
    pub chains: BTreeMap<String, Vec<Vec<String>>>,
}

/// Why a listing could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read nft's JSON listing of the policy table: {0}")]
pub struct ListingError(pub String);

fn bad(what: impl Into<String>) -> ListingError {
    ListingError(what.into())
}

fn parse_ip(v: &Value) -> Result<IpAddr, ListingError> {
    v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| bad(format!("not an address: {v}")))
}

/// An address element: `"a"`, `{"prefix":{"addr","len"}}` or `{"range":[a,b]}`.
fn addr_elem(v: &Value) -> Result<(Fam, u128, u128), ListingError> {
    if let Some(p) = v.get("prefix") {
        let (f, n) = num(parse_ip(&p["addr"])?);
        let bits = if f == Fam::V4 { 32 } else { 128 };
        let len = p["len"].as_u64().filter(|l| *l <= bits).ok_or_else(|| bad(format!("bad prefix {p}")))? as u32;
        let host = if len == 0 { f.max() } else { f.max() >> len };
        return Ok((f, n, n | host));
    }
    if let Some(r) = v.get("range") {
        let (f, a) = num(parse_ip(&r[0])?);
        let (_, z) = num(parse_ip(&r[1])?);
        return Ok((f, a, z));
    }
    let (f, n) = num(parse_ip(v)?);
    Ok((f, n, n))
}

fn port_elem(v: &Value) -> Result<(u16, u16), ListingError> {
    let one = |v: &Value| v.as_u64().and_then(|n| u16::try_from(n).ok()).ok_or_else(|| bad(format!("bad port {v}")));
    match v.get("range") {
        Some(r) => Ok((one(&r[0])?, one(&r[1])?)),
        None => {
            let p = one(v)?;
            Ok((p, p))
        }
    }
}

fn proto_elem(v: &Value) -> Result<Protocol, ListingError> {
    match v.as_str() {
        Some("tcp") => Ok(Protocol::Tcp),
        Some("udp") => Ok(Protocol::Udp),
        Some("sctp") => Ok(Protocol::Sctp),
        _ => Err(bad(format!("bad protocol {v}"))),
    }
}

/// An element may be wrapped as `{"elem":{"val":…}}` when it carries options.
fn unwrap_elem(v: &Value) -> &Value {
    v.get("elem").and_then(|e| e.get("val")).unwrap_or(v)
}

fn statement_kinds(rule: &Value) -> Vec<String> {
    rule["expr"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_object()?.keys().next().cloned()).collect())
        .unwrap_or_default()
}

fn dir_of(name: &str) -> Option<(bool, &str)> {
    name.strip_prefix("in-").map(|r| (true, r)).or_else(|| name.strip_prefix("out-").map(|r| (false, r)))
}

fn group_mut(rs: &mut Ruleset, ingress: bool, g: usize) -> &mut Group {
    let d = if ingress { &mut rs.ingress } else { &mut rs.egress };
    if d.groups.len() <= g {
        d.groups.resize(g + 1, Group::default());
    }
    &mut d.groups[g]
}

impl KernelTable {
    /// Parses `nft -j list table inet weft-netpol`.
    pub fn parse(json: &str) -> Result<KernelTable, ListingError> {
        let doc: Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let items = doc["nftables"].as_array().ok_or_else(|| bad("no \"nftables\" list"))?;
        let mut t = KernelTable::default();
        for item in items {
            if let Some(table) = item.get("table") {
                if table["name"] == TABLE {
                    t.comment = table["comment"].as_str().map(String::from);
                }
            } else if let Some(map) = item.get("map") {
                let name = map["name"].as_str().unwrap_or_default();
                let Some((ingress, rest)) = dir_of(name) else { return Err(bad(format!("unknown map {name}"))) };
                if !rest.starts_with("pods") {
                    return Err(bad(format!("unknown map {name}")));
                }
                for e in map["elem"].as_array().map(Vec::as_slice).unwrap_or_default() {
                    let ip = parse_ip(unwrap_elem(&e[0]))?;
                    let target = e[1]["jump"]["target"].as_str().ok_or_else(|| bad(format!("not a jump: {e}")))?;
                    let g = dir_of(target)
                        .and_then(|(i, n)| (i == ingress).then_some(n))
                        .and_then(|n| n.parse::<usize>().ok())
                        .ok_or_else(|| bad(format!("jump to unknown chain {target}")))?;
                    group_mut(&mut t.ruleset, ingress, g);
                    let d = if ingress { &mut t.ruleset.ingress } else { &mut t.ruleset.egress };
                    d.dispatch.insert(ip, g);
                }
            } else if let Some(set) = item.get("set") {
                let name = set["name"].as_str().unwrap_or_default();
                let parsed = dir_of(name).and_then(|(ingress, rest)| {
                    let (g, kind) = rest.split_once('-')?;
                    Some((ingress, g.parse::<usize>().ok()?, kind.to_string()))
                });
                let Some((ingress, g, kind)) = parsed else { return Err(bad(format!("unknown set {name}"))) };
                let group = group_mut(&mut t.ruleset, ingress, g);
                let (fam, sets): (Fam, &mut FamilySets) = match kind.chars().last() {
                    Some('4') => (Fam::V4, &mut group.v4),
                    Some('6') => (Fam::V6, &mut group.v6),
                    _ => return Err(bad(format!("unknown set {name}"))),
                };
                for e in set["elem"].as_array().map(Vec::as_slice).unwrap_or_default() {
                    let e = unwrap_elem(e);
                    if kind.starts_with("all") {
                        let (f, a, z) = addr_elem(e)?;
                        if f != fam {
                            return Err(bad(format!("{name} holds {e}")));
                        }
                        sets.all.push((a, z));
                    } else if kind.starts_with("ports") {
                        let c = e["concat"].as_array().filter(|c| c.len() == 3).ok_or_else(|| bad(format!("{e}")))?;
                        let (f, lo, hi) = addr_elem(&c[0])?;
                        if f != fam {
                            return Err(bad(format!("{name} holds {e}")));
                        }
                        let proto = proto_elem(&c[1])?;
                        let (port_lo, port_hi) = port_elem(&c[2])?;
                        sets.ports.push(PortElem { lo, hi, proto, port_lo, port_hi });
                    } else {
                        return Err(bad(format!("unknown set {name}")));
                    }
                }
                sets.all.sort();
                sets.ports.sort();
            } else if let Some(chain) = item.get("chain") {
                let name = chain["name"].as_str().unwrap_or_default().to_string();
                t.chains.entry(name).or_default();
            } else if let Some(rule) = item.get("rule") {
                let chain = rule["chain"].as_str().unwrap_or_default().to_string();
                t.chains.entry(chain).or_default().push(statement_kinds(rule));
            }
        }
        Ok(t)
    }

    /// Whether the kernel holds exactly `desired`: same comment (when listed), same elements in every map
    /// and set, the same chains with the same number of rules, each group chain ending in
    /// `drop`. (Rule text is owned by [`super::render`]; a rule someone edited in place
    /// with the same statement kinds is not detected.)
    pub fn matches(&self, desired: &Ruleset) -> bool {
        if self.comment.as_ref().is_some_and(|c| *c != comment(desired)) {
            return false;
        }
        if self.ruleset.ingress != desired.ingress || self.ruleset.egress != desired.egress {
            return false;
        }
        let mut want: BTreeMap<String, usize> = BTreeMap::new();
        want.insert("forward".into(), forward_rules().len());
        for (ingress, d) in [(true, &desired.ingress), (false, &desired.egress)] {
            for (g, group) in d.groups.iter().enumerate() {
                let name = format!("{}-{g}", if ingress { "in" } else { "out" });
                want.insert(name, group_rules(ingress, g, [(Fam::V4, &group.v4), (Fam::V6, &group.v6)]).len());
            }
        }
        if want.len() != self.chains.len() {
            return false;
        }
        want.iter().all(|(name, n)| {
            self.chains.get(name).is_some_and(|rules| {
                rules.len() == *n
                    && (name == "forward" || rules.last().is_some_and(|r| r.last().map(String::as_str) == Some("drop")))
            })
        })
    }
}
