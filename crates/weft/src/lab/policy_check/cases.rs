//! The cases of `weft lab policy-check`: the upstream e2e model's pods and namespaces, the
//! policies of each case, and its truth tables written by hand as upstream's
//! `Reachability` (checked against the reference evaluator by the runner).

use serde_json::{Value, json};
use weft_core::netpol::model::Protocol;

use crate::lab::state::Pod;
use crate::lab::topology;

/// The model's namespaces.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// The model's pods in each namespace.
pub const PODS: [&str; 3] = ["a", "b", "c"];
pub(super) const N: usize = 9;

/// One cell of a matrix: from pod index, to pod index.
pub(super) type Cells = [[bool; N]; N];

/// `ns/pod` of model pod `i`.
pub fn key(i: usize) -> String {
    format!("{}/{}", NAMESPACES[i / 3], PODS[i % 3])
}

fn matches(pattern: &str, i: usize) -> bool {
    let (pn, pp) = pattern.split_once('/').unwrap_or((pattern, "*"));
    (pn == "*" || pn == NAMESPACES[i / 3]) && (pp == "*" || pp == PODS[i % 3])
}

/// An expected matrix, built as upstream's `Reachability`: start from everything allowed
/// (or denied) and mark cells by patterns (`x/a`, `x/*`, `*/b`, `*`). The diagonal is
/// always allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truth(pub Cells);

impl Truth {
    /// Everything reachable.
    pub fn all() -> Truth {
        Truth([[true; N]; N])
    }

    /// Sets the cells from `from` to `to`.
    pub fn set(mut self, from: &str, to: &str, v: bool) -> Truth {
        for f in 0..N {
            for t in 0..N {
                if matches(from, f) && matches(to, t) {
                    self.0[f][t] = v;
                }
            }
        }
        self
    }

    /// Nothing reaches `to` (its column) except from `except`.
    pub fn deny_to(self, to: &str, except: &[&str]) -> Truth {
        let mut t = self.set("*", to, false);
        for e in except {
            t = t.set(e, to, true);
        }
        t
    }

    /// `from` reaches nothing (its row) except `except`.
    pub fn deny_from(self, from: &str, except: &[&str]) -> Truth {
        let mut t = self.set(from, "*", false);
        for e in except {
            t = t.set(from, e, true);
        }
        t
    }

    pub(super) fn with_self(mut self) -> Truth {
        for i in 0..N {
            self.0[i][i] = true;
        }
        self
    }
}

/// One (protocol, port, family) of a probe matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Combo {
    /// Protocol.
    pub proto: Protocol,
    /// Port.
    pub port: u16,
    /// IPv6 (else IPv4).
    pub v6: bool,
}

pub(super) fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

pub(super) type Expect = Box<dyn Fn(Combo) -> Truth>;

/// One step of a case.
pub(super) enum Step {
    /// Create these NetworkPolicies.
    Create(Vec<Value>),
    /// Replace a NetworkPolicy (same namespace and name).
    Replace(Value),
    /// Delete NetworkPolicy namespace/name.
    Delete(&'static str, &'static str),
    /// Set (Some) or remove (None) a label of pod `ns/pod`.
    LabelPod(&'static str, &'static str, Option<&'static str>),
    /// Set (Some) or remove (None) a label of a namespace.
    LabelNs(&'static str, &'static str, Option<&'static str>),
    /// Delete pod `ns/pod` and create it again on the same host with the same labels: its
    /// old address goes, a new one (or the same, reused) comes.
    Recreate(&'static str),
    /// Probe every cell against this truth table.
    Expect(Expect),
}

/// A case: a name, the upstream test it follows, its steps.
pub struct Case {
    /// Name.
    pub name: &'static str,
    pub(super) steps: Vec<Step>,
}

/// The model pods as they are in the lab.
#[derive(Debug, Clone)]
pub struct ModelPod {
    /// Lab pod.
    pub pod: Pod,
    /// Host index.
    pub host: u8,
}

pub(super) fn np(
    ns: &str,
    name: &str,
    pod_selector: Value,
    types: &[&str],
    ingress: Option<Value>,
    egress: Option<Value>,
) -> Value {
    let mut spec = json!({"podSelector": pod_selector, "policyTypes": types});
    if let Some(i) = ingress {
        spec["ingress"] = i;
    }
    if let Some(e) = egress {
        spec["egress"] = e;
    }
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn labels(pairs: &[(&str, &str)]) -> Value {
    json!({"matchLabels": pairs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()})
}

pub(super) fn all() -> Value {
    json!({})
}

fn only(protos: &[Protocol], ports: &[u16], c: Combo) -> bool {
    protos.contains(&c.proto) && ports.contains(&c.port)
}

/// Every case, built for the lab's pods (ipBlock needs their addresses).
pub fn cases(model: &[ModelPod], ipv6: bool) -> Vec<Case> {
    use Protocol::{Sctp, Tcp, Udp};
    let xa = || labels(&[("pod", "a")]);
    let xb = &model[1].pod;
    let mut blocks = vec![json!({"ipBlock": {"cidr": topology::NETWORK, "except": [format!("{}/32", xb.ip)]}})];
    if ipv6 && let Some(v6) = &xb.ip6 {
        blocks.push(json!({"ipBlock": {"cidr": crate::lab::state::NETWORK6, "except": [format!("{v6}/128")]}}));
    }
    let e = |f: fn(Combo) -> Truth| Step::Expect(Box::new(f));
    vec![
        Case { name: "no policy: everything reachable", steps: vec![e(|_| Truth::all())] },
        Case {
            name: "default-deny ingress",
            steps: vec![
                Step::Create(vec![np("x", "deny-in", all(), &["Ingress"], None, None)]),
                e(|_| Truth::all().deny_to("x/*", &[])),
            ],
        },
        Case {
            name: "default-deny egress",
            steps: vec![
                Step::Create(vec![np("x", "deny-out", all(), &["Egress"], None, None)]),
                e(|_| Truth::all().deny_from("x/*", &[])),
            ],
        },
        Case {
            name: "allow-all ingress beside a default-deny (union)",
            steps: vec![
                Step::Create(vec![
                    np("x", "deny-in", all(), &["Ingress"], None, None),
                    np("x", "allow-all", all(), &["Ingress"], Some(json!([{}])), None),
                ]),
                e(|_| Truth::all()),
            ],
        },
        Case {
            name: "same namespace only",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "same-ns",
                    all(),
                    &["Ingress"],
                    Some(json!([{"from": [{"podSelector": {}}]}])),
                    None,
                )]),
                e(|_| Truth::all().deny_to("x/*", &["x/*"])),
            ],
        },
        Case {
            name: "namespace selector",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "from-y",
                    xa(),
                    &["Ingress"],
                    Some(json!([{"from": [{"namespaceSelector": labels(&[("ns", "y")])}]}])),
                    None,
                )]),
                e(|_| Truth::all().deny_to("x/a", &["y/*"])),
            ],
        },
        Case {
            name: "pod selector",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "from-b",
                    xa(),
                    &["Ingress"],
                    Some(json!([{"from": [{"podSelector": labels(&[("pod", "b")])}]}])),
                    None,
                )]),
                e(|_| Truth::all().deny_to("x/a", &["x/b"])),
            ],
        },
        Case {
            name: "pod AND namespace selector in one peer",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "b-not-in-x",
                    xa(),
                    &["Ingress"],
                    Some(json!([{"from": [{
                        "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                        "podSelector": labels(&[("pod", "b")]),
                    }]}])),
                    None,
                )]),
                e(|_| Truth::all().deny_to("x/a", &["y/b", "z/b"])),
            ],
        },
        Case {
            name: "pod OR namespace selector as two peers",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "b-or-not-x",
                    xa(),
                    &["Ingress"],
                    Some(json!([{"from": [
                        {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}},
                        {"podSelector": labels(&[("pod", "b")])},
                    ]}])),
                    None,
                )]),
                e(|_| Truth::all().deny_to("x/a", &["x/b", "y/*", "z/*"])),
            ],
        },
        Case {
            name: "matchExpressions (In, NotIn, Exists, DoesNotExist)",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "expressions",
                    json!({"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a"]}]}),
                    &["Ingress"],
                    Some(json!([{"from": [{
                        "namespaceSelector": {"matchExpressions": [
                            {"key": "ns", "operator": "In", "values": ["y", "z"]},
                            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["z"]},
                        ]},
                        "podSelector": {"matchExpressions": [
                            {"key": "pod", "operator": "In", "values": ["b", "c"]},
                            {"key": "pod", "operator": "Exists"},
                            {"key": "pod2", "operator": "DoesNotExist"},
                        ]},
                    }]}])),
                    None,
                )]),
                e(|_| Truth::all().deny_to("x/a", &["y/b", "y/c"])),
            ],
        },
        Case {
            name: "ipBlock with except (egress)",
            steps: vec![
                Step::Create(vec![np("x", "cidr-except", xa(), &["Egress"], None, Some(json!([{"to": blocks}])))]),
                e(|_| Truth::all().set("x/a", "x/b", false)),
            ],
        },
        Case {
            name: "port 80 only",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "y-on-80",
                    xa(),
                    &["Ingress"],
                    Some(
                        json!([{"from": [{"namespaceSelector": labels(&[("ns", "y")])}], "ports": [{"protocol": "TCP", "port": 80}]}]),
                    ),
                    None,
                )]),
                e(|c| {
                    if only(&[Tcp], &[80], c) {
                        Truth::all().deny_to("x/a", &["y/*"])
                    } else {
                        Truth::all().deny_to("x/a", &[])
                    }
                }),
            ],
        },
        Case {
            name: "named port",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "named-udp-81",
                    all(),
                    &["Ingress"],
                    Some(json!([{"ports": [{"protocol": "UDP", "port": "serve-81-udp"}]}])),
                    None,
                )]),
                e(|c| if only(&[Udp], &[81], c) { Truth::all() } else { Truth::all().deny_to("x/*", &[]) }),
            ],
        },
        Case {
            name: "endPort range",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "ranges",
                    xa(),
                    &["Ingress"],
                    Some(json!([{"ports": [
                        {"protocol": "TCP", "port": 79, "endPort": 80},
                        {"protocol": "UDP", "port": 81, "endPort": 90},
                        {"protocol": "SCTP", "port": 60, "endPort": 81},
                    ]}])),
                    None,
                )]),
                e(|c| {
                    if only(&[Tcp], &[80], c) || only(&[Udp], &[81], c) || c.proto == Sctp {
                        Truth::all()
                    } else {
                        Truth::all().deny_to("x/a", &[])
                    }
                }),
            ],
        },
        Case {
            name: "egress to one namespace, DNS-like UDP allowed",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "to-y-and-dns",
                    all(),
                    &["Egress"],
                    None,
                    Some(json!([
                        {"to": [{"namespaceSelector": labels(&[("ns", "y")])}]},
                        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                    ])),
                )]),
                e(|_| Truth::all().deny_from("x/*", &["y/*"])),
            ],
        },
        Case {
            name: "two policies whose union applies",
            steps: vec![
                Step::Create(vec![
                    np(
                        "x",
                        "y-on-tcp-81",
                        xa(),
                        &["Ingress"],
                        Some(
                            json!([{"from": [{"namespaceSelector": labels(&[("ns", "y")])}], "ports": [{"port": 81}]}]),
                        ),
                        None,
                    ),
                    np(
                        "x",
                        "z-on-80",
                        xa(),
                        &["Ingress"],
                        Some(
                            json!([{"from": [{"namespaceSelector": labels(&[("ns", "z")])}], "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "SCTP", "port": 80}]}]),
                        ),
                        None,
                    ),
                ]),
                e(|c| {
                    if only(&[Tcp], &[81], c) {
                        Truth::all().deny_to("x/a", &["y/*"])
                    } else if only(&[Tcp, Sctp], &[80], c) {
                        Truth::all().deny_to("x/a", &["z/*"])
                    } else {
                        Truth::all().deny_to("x/a", &[])
                    }
                }),
            ],
        },
        Case {
            name: "policy update",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "updated",
                    all(),
                    &["Ingress"],
                    Some(json!([{"from": [{"namespaceSelector": labels(&[("ns", "y")])}]}])),
                    None,
                )]),
                e(|_| Truth::all().deny_to("x/*", &["y/*"])),
                Step::Replace(np(
                    "x",
                    "updated",
                    all(),
                    &["Ingress"],
                    Some(json!([{"from": [{"namespaceSelector": labels(&[("ns", "z")])}]}])),
                    None,
                )),
                e(|_| Truth::all().deny_to("x/*", &["z/*"])),
            ],
        },
        Case {
            name: "policy delete",
            steps: vec![
                Step::Create(vec![np("x", "deny-all", all(), &["Ingress", "Egress"], None, None)]),
                e(|_| Truth::all().deny_to("x/*", &[]).deny_from("x/*", &[])),
                Step::Delete("x", "deny-all"),
                e(|_| Truth::all()),
            ],
        },
        Case {
            name: "pod label change",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "from-updated-pod",
                    xa(),
                    &["Ingress"],
                    Some(json!([{"from": [{"podSelector": labels(&[("pod", "b"), ("pod2", "updated")])}]}])),
                    None,
                )]),
                e(|_| Truth::all().deny_to("x/a", &[])),
                Step::LabelPod("x/b", "pod2", Some("updated")),
                e(|_| Truth::all().deny_to("x/a", &["x/b"])),
                Step::LabelPod("x/b", "pod2", None),
                e(|_| Truth::all().deny_to("x/a", &[])),
            ],
        },
        Case {
            name: "namespace label change",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "from-updated-ns",
                    xa(),
                    &["Ingress"],
                    Some(json!([{"from": [{"namespaceSelector": labels(&[("ns2", "updated")])}]}])),
                    None,
                )]),
                e(|_| Truth::all().deny_to("x/a", &[])),
                Step::LabelNs("y", "ns2", Some("updated")),
                e(|_| Truth::all().deny_to("x/a", &["y/*"])),
            ],
        },
        Case {
            name: "pod deleted and added again (new address)",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "from-c",
                    xa(),
                    &["Ingress"],
                    Some(json!([{"from": [{"podSelector": labels(&[("pod", "c")])}]}])),
                    None,
                )]),
                e(|_| Truth::all().deny_to("x/a", &["x/c"])),
                Step::Recreate("x/c"),
                e(|_| Truth::all().deny_to("x/a", &["x/c"])),
            ],
        },
        Case {
            name: "ingress and egress in one policy",
            steps: vec![
                Step::Create(vec![np(
                    "x",
                    "both",
                    xa(),
                    &["Ingress", "Egress"],
                    Some(json!([{"from": [{"podSelector": labels(&[("pod", "b")])}]}])),
                    Some(json!([{"ports": [{"protocol": "TCP", "port": 80}]}])),
                )]),
                e(|c| {
                    let t = Truth::all().deny_to("x/a", &["x/b"]);
                    if only(&[Tcp], &[80], c) { t } else { t.deny_from("x/a", &[]) }
                }),
            ],
        },
        Case {
            name: "egress denied at the client although the server allows",
            steps: vec![
                Step::Create(vec![
                    np(
                        "x",
                        "to-y-a",
                        xa(),
                        &["Egress"],
                        None,
                        Some(
                            json!([{"to": [{"namespaceSelector": labels(&[("ns", "y")]), "podSelector": labels(&[("pod", "a")])}]}]),
                        ),
                    ),
                    np(
                        "y",
                        "from-x-a",
                        json!({"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]}),
                        &["Ingress"],
                        Some(
                            json!([{"from": [{"namespaceSelector": labels(&[("ns", "x")]), "podSelector": labels(&[("pod", "a")])}]}]),
                        ),
                        None,
                    ),
                ]),
                e(|_| Truth::all().deny_from("x/a", &["y/a"]).deny_to("y/a", &["x/a"]).deny_to("y/b", &[])),
            ],
        },
    ]
}
