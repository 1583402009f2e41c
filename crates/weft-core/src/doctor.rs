//! `weft doctor`: the checks, as pure functions of facts gathered from the host (sysctls,
//! links, firewall listings, subnet.env, the store, the daemon's health port). Each check
//! says ok, warning or problem, and for anything not ok the fix in one line.

use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but a setup could trip over it.
    Warning,
    /// Breaks traffic or the daemon.
    Problem,
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable name (`forwarding`, `mtu`, …).
    pub name: &'static str,
    /// Outcome.
    pub status: Status,
    /// What was found.
    pub message: String,
    /// The fix, in one line (empty when ok).
    pub fix: String,
}

/// A device's name and MTU.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dev {
    /// Name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
}

/// What the kernel holds against what the leases want (see `plan::diff`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataPlaneDiff {
    /// Entries that should be there and are not (each described).
    pub missing: Vec<String>,
    /// Entries of weft's that no lease wants.
    pub extra: Vec<String>,
    /// Neighbours or FDB entries carrying another MAC than the peer's lease.
    pub wrong_mac: Vec<String>,
}

/// What `subnet.env` says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubnetEnvFacts {
    /// Its path.
    pub path: String,
    /// `FLANNEL_NETWORK`.
    pub network: Option<String>,
    /// `FLANNEL_SUBNET`, in network form (`10.5.1.0/24`).
    pub subnet: Option<String>,
    /// `FLANNEL_MTU`.
    pub mtu: Option<u32>,
}

/// A test case: check name, expected status, how to break the facts, what it must say.
#[cfg(test)]
type Case = (&'static str, Status, Box<dyn Fn(&mut Facts)>, &'static str);

/// The daemon as its health port shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// `--healthz-port` is 0: nothing to ask.
    Off,
    /// Nothing answered on the port.
    Unreachable(String),
    /// The answers.
    Answered {
        /// `/healthz` was 200; else its body.
        healthz: Result<(), String>,
        /// `/readyz` was 200.
        ready: bool,
        /// Time since the main loop last ran (from `/metrics`).
        main_loop_age: Option<Duration>,
        /// `weft_reconciles`.
        reconciles: Option<u64>,
    },
}

/// Everything the checks look at. `None` means "could not be read" (the check says so).
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Backend type from the network config (`vxlan`, `host-gw`, `udp`, `alloc`).
    pub backend: Option<String>,
    /// The config has an IPv6 network.
    pub ipv6: bool,
    /// `net.ipv4.ip_forward`.
    pub ip_forward: Option<bool>,
    /// `net.ipv6.conf.all.forwarding`.
    pub ip6_forward: Option<bool>,
    /// Effective `rp_filter` (max of `all` and the device's) per device that matters.
    pub rp_filter: Vec<(String, u8)>,
    /// `net.bridge.bridge-nf-call-iptables`; `None`: br_netfilter not loaded.
    pub bridge_nf_call_iptables: Option<bool>,
    /// The external interface.
    pub external: Option<Dev>,
    /// The overlay device (`flannel.<VNI>`, `flannel0`), when the backend has one.
    pub overlay: Option<Dev>,
    /// The backend's encapsulation overhead (vxlan 50, udp 28, others 0).
    pub overhead: u32,
    /// The CNI bridge, when present.
    pub bridge: Option<Dev>,
    /// Pod veths attached to the bridge.
    pub pod_veths: Vec<Dev>,
    /// Transmit checksum offload on the vxlan device.
    pub vxlan_tx_checksum: Option<bool>,
    /// Kernel version (major, minor).
    pub kernel: Option<(u32, u32)>,
    /// weft/flannel chains seen through iptables-legacy; `None`: binary missing.
    pub legacy_chains: Option<Vec<String>>,
    /// weft/flannel chains seen through iptables-nft; `None`: binary missing.
    pub nft_chains: Option<Vec<String>>,
    /// Kernel against leases; `None` when it could not be computed (see `dataplane_error`).
    pub dataplane: Option<DataPlaneDiff>,
    /// Why the data plane could not be compared.
    pub dataplane_error: Option<String>,
    /// What subnet.env says; `None`: no file.
    pub subnet_env: Option<SubnetEnvFacts>,
    /// The config's Network.
    pub network: Option<String>,
    /// The MTU the daemon would write.
    pub expected_mtu: Option<u32>,
    /// The store: `Err` when it did not answer.
    pub store: Option<Result<(), String>>,
    /// Our lease (subnet text) and its remaining time (`None`: no expiry, a reservation).
    pub own_lease: Option<(String, Option<Duration>)>,
    /// `--subnet-lease-renew-margin`.
    pub renew_margin: Duration,
    /// The daemon's health port.
    pub health: Option<Health>,
    /// Whether NetworkPolicy is enforced here (the daemon's `weft_netpol_enabled`, or
    /// doctor's own `--network-policy`); `None`: the daemon could not be asked.
    pub policy_enforced: Option<bool>,
    /// Whether the policy table (`inet weft-netpol`) exists; `None`: `nft` cannot tell.
    pub policy_table: Option<bool>,
}

fn check(name: &'static str, status: Status, message: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name, status, message: message.into(), fix: fix.into() }
}

fn ok(name: &'static str, message: impl Into<String>) -> Check {
    check(name, Status::Ok, message, "")
}

/// Every check, in a fixed order.
pub fn checks(f: &Facts) -> Vec<Check> {
    let mut out = vec![forwarding(f)];
    out.push(rp_filter(f));
    out.push(br_netfilter(f));
    out.push(mtu(f));
    out.push(vxlan_checksum(f));
    out.push(iptables_backends(f));
    out.push(dataplane(f));
    out.push(subnet_env(f));
    out.push(store(f));
    out.push(daemon(f));
    out.push(network_policy(f));
    out
}

fn network_policy(f: &Facts) -> Check {
    const NAME: &str = "network_policy";
    let table = "the policy table inet weft-netpol";
    match (f.policy_enforced, f.policy_table) {
        (Some(true), Some(true)) => ok(NAME, format!("NetworkPolicy is enforced; {table} is in place")),
        (Some(true), Some(false)) => check(
            NAME,
            Status::Problem,
            format!("NetworkPolicy is enforced but {table} is missing: pods selected by a policy are not isolated"),
            "see the daemon's log for nft errors and whether something flushes the ruleset (nft flush ruleset, a firewall service); the daemon puts the table back on its next resync, a restart does at once",
        ),
        (Some(true), None) => check(
            NAME,
            Status::Problem,
            "NetworkPolicy is enforced but nft cannot tell whether the policy table exists",
            "run doctor as root, and install nftables if nft is missing (the daemon needs it to enforce NetworkPolicy)",
        ),
        (Some(false), Some(true)) => check(
            NAME,
            Status::Warning,
            format!(
                "{table} is present but the daemon does not enforce NetworkPolicy: its rules are a leftover that still filters pod traffic"
            ),
            "restart the daemon (it removes a leftover table at start), or run weft cleanup, or enforce policy with --network-policy",
        ),
        (None, Some(true)) => ok(
            NAME,
            format!("{table} is present; whether the daemon enforces NetworkPolicy is unknown (see the daemon check)"),
        ),
        (_, _) => ok(NAME, "NetworkPolicy is not enforced here, and there is no policy table"),
    }
}

fn forwarding(f: &Facts) -> Check {
    match (f.ip_forward, f.ipv6 && f.ip6_forward != Some(true)) {
        (Some(false), _) => check(
            "forwarding",
            Status::Problem,
            "IPv4 forwarding is off: pods cannot reach other hosts",
            "sysctl -w net.ipv4.ip_forward=1 (and persist it in /etc/sysctl.d/)",
        ),
        (_, true) => check(
            "forwarding",
            Status::Problem,
            "IPv6 forwarding is off but the network has an IPv6Network",
            "sysctl -w net.ipv6.conf.all.forwarding=1 (and persist it in /etc/sysctl.d/)",
        ),
        (None, _) => check("forwarding", Status::Warning, "cannot read net.ipv4.ip_forward", "run doctor as root"),
        (Some(true), false) => ok("forwarding", "IP forwarding is on"),
    }
}

fn rp_filter(f: &Facts) -> Check {
    // Strict reverse-path filtering drops overlay traffic whose return path is another
    // device (the pods' bridge vs the overlay device); loose (2) or off (0) is fine.
    let strict: Vec<&str> = f.rp_filter.iter().filter(|(_, v)| *v == 1).map(|(d, _)| d.as_str()).collect();
    if strict.is_empty() {
        return ok("rp_filter", "no strict reverse-path filter on the devices weft uses");
    }
    check(
        "rp_filter",
        Status::Warning,
        format!("strict rp_filter (1) on {}: asymmetric overlay traffic is dropped", strict.join(", ")),
        format!(
            "sysctl -w net.ipv4.conf.all.rp_filter=2 {}",
            strict.iter().map(|d| format!("net.ipv4.conf.{d}.rp_filter=2")).collect::<Vec<_>>().join(" ")
        ),
    )
}

fn br_netfilter(f: &Facts) -> Check {
    match f.bridge_nf_call_iptables {
        Some(true) => ok("br_netfilter", "br_netfilter is loaded and bridge-nf-call-iptables is on"),
        Some(false) => check(
            "br_netfilter",
            Status::Warning,
            "bridge-nf-call-iptables is off: bridged pod traffic skips iptables (Kubernetes Services and NetworkPolicy need it; plain setups do not)",
            "sysctl -w net.bridge.bridge-nf-call-iptables=1",
        ),
        None => check(
            "br_netfilter",
            Status::Warning,
            "br_netfilter is not loaded: bridged pod traffic skips iptables (Kubernetes needs it; rootless and non-Kubernetes setups do not)",
            "modprobe br_netfilter && sysctl -w net.bridge.bridge-nf-call-iptables=1",
        ),
    }
}

fn mtu(f: &Facts) -> Check {
    let Some(ext) = &f.external else {
        return check("mtu", Status::Problem, "no external interface found", "check --iface / the default route");
    };
    let mut problems = Vec::new();
    let limit = ext.mtu.saturating_sub(f.overhead);
    if let Some(o) = &f.overlay
        && o.mtu > limit
    {
        problems.push(format!("{} has MTU {} but {} ({}) leaves room for {limit}", o.name, o.mtu, ext.name, ext.mtu));
    }
    let pod_limit = f.overlay.as_ref().map_or(limit, |o| o.mtu.min(limit));
    let env_mtu = f.subnet_env.as_ref().and_then(|s| s.mtu);
    if let Some(m) = env_mtu
        && m > pod_limit
    {
        problems.push(format!("FLANNEL_MTU={m} is larger than the overlay's {pod_limit}"));
    }
    let pod_limit = env_mtu.map_or(pod_limit, |m| m.min(pod_limit));
    for d in f.bridge.iter().chain(&f.pod_veths) {
        if d.mtu > pod_limit {
            problems.push(format!("{} has MTU {} > {pod_limit}", d.name, d.mtu));
        }
    }
    let chain = format!(
        "{} {}{}{}{}",
        ext.name,
        ext.mtu,
        f.overlay.as_ref().map(|o| format!(" → {} {}", o.name, o.mtu)).unwrap_or_default(),
        env_mtu.map(|m| format!(" → FLANNEL_MTU {m}")).unwrap_or_default(),
        f.bridge.as_ref().map(|b| format!(" → {} {}", b.name, b.mtu)).unwrap_or_default(),
    );
    if problems.is_empty() {
        return ok("mtu", format!("MTU chain {chain}"));
    }
    check(
        "mtu",
        Status::Problem,
        format!("MTU chain {chain}: {}; large packets are dropped", problems.join("; ")),
        format!(
            "set the MTU of the listed devices to at most {pod_limit} (pods: recreate them after fixing FLANNEL_MTU)"
        ),
    )
}

fn vxlan_checksum(f: &Facts) -> Check {
    if f.backend.as_deref() != Some("vxlan") {
        return ok("vxlan_checksum", "not a vxlan backend");
    }
    // flannel #1279: kernels before 5.7 corrupt the UDP checksum of vxlan packets that are
    // NATed (Services) when the device offloads it: connections stall for ~63 s.
    match (f.vxlan_tx_checksum, f.kernel) {
        (Some(true), Some(k)) if k < (5, 7) => check(
            "vxlan_checksum",
            Status::Warning,
            format!(
                "tx checksum offload is on for the vxlan device on kernel {}.{} (flannel #1279: NATed vxlan traffic stalls)",
                k.0, k.1
            ),
            format!(
                "ethtool -K {} tx-checksum-ip-generic off, or a kernel >= 5.7",
                f.overlay.as_ref().map_or("flannel.1", |o| o.name.as_str())
            ),
        ),
        (None, _) if f.overlay.is_some() => {
            check("vxlan_checksum", Status::Warning, "cannot read the vxlan device's offloads", "run doctor as root")
        }
        _ => ok("vxlan_checksum", "the vxlan checksum-offload bug does not apply here"),
    }
}

fn iptables_backends(f: &Facts) -> Check {
    match (&f.legacy_chains, &f.nft_chains) {
        (Some(l), Some(n)) if !l.is_empty() && !n.is_empty() => check(
            "iptables_backends",
            Status::Problem,
            format!(
                "flannel rules in both iptables-legacy ({}) and iptables-nft ({}): one set is stale and both run",
                l.join(", "),
                n.join(", ")
            ),
            "stop weft, remove the set of the backend not in use (e.g. iptables-legacy -t nat -F FLANNEL-POSTRTG; -X), start weft",
        ),
        (Some(l), Some(n)) if !l.is_empty() || !n.is_empty() => ok(
            "iptables_backends",
            format!("flannel rules in {} only", if l.is_empty() { "iptables-nft" } else { "iptables-legacy" }),
        ),
        _ => ok("iptables_backends", "no flannel rules in two iptables backends"),
    }
}

fn dataplane(f: &Facts) -> Check {
    let Some(d) = &f.dataplane else {
        return check(
            "dataplane",
            Status::Warning,
            format!("cannot compare the kernel with the leases: {}", f.dataplane_error.as_deref().unwrap_or("unknown")),
            "make the store reachable and start the daemon",
        );
    };
    let mut parts = Vec::new();
    if !d.missing.is_empty() {
        parts.push(format!("missing: {}", d.missing.join(", ")));
    }
    if !d.wrong_mac.is_empty() {
        parts.push(format!("wrong VTEP MAC: {}", d.wrong_mac.join(", ")));
    }
    if !d.extra.is_empty() {
        parts.push(format!("stale: {}", d.extra.join(", ")));
    }
    if parts.is_empty() {
        return ok("dataplane", "routes, neighbours and FDB entries match the peers' leases");
    }
    check(
        "dataplane",
        Status::Problem,
        parts.join("; "),
        "check the daemon's log; it repairs this within a resync unless it is stopped or stuck (restart it)",
    )
}

fn subnet_env(f: &Facts) -> Check {
    let Some(SubnetEnvFacts { path, network, subnet, mtu }) = &f.subnet_env else {
        return check(
            "subnet_env",
            Status::Problem,
            "no subnet file: the CNI plugin cannot configure pods",
            "start the daemon (it writes the file once it holds a lease); check --subnet-file",
        );
    };
    let mut wrong = Vec::new();
    if let (Some(want), Some(have)) = (&f.own_lease, subnet)
        && want.0 != *have
    {
        wrong.push(format!("FLANNEL_SUBNET is {have} but our lease is {}", want.0));
    }
    if f.own_lease.is_none() && f.store == Some(Ok(())) {
        wrong.push(format!(
            "the store has no lease for this host, yet {path} names {}",
            subnet.as_deref().unwrap_or("none")
        ));
    }
    if let (Some(want), Some(have)) = (&f.network, network)
        && want != have
    {
        wrong.push(format!("FLANNEL_NETWORK is {have} but the network config says {want}"));
    }
    if let (Some(want), Some(have)) = (f.expected_mtu, mtu)
        && want != *have
    {
        wrong.push(format!("FLANNEL_MTU is {have} but this host's backend gives {want}"));
    }
    if wrong.is_empty() {
        return ok("subnet_env", format!("{path} matches our lease"));
    }
    check(
        "subnet_env",
        Status::Problem,
        format!("{path}: {}", wrong.join("; ")),
        "restart the daemon (it rewrites the file from its lease); pods created since need recreating",
    )
}

fn store(f: &Facts) -> Check {
    match (&f.store, &f.own_lease) {
        (None, _) => check("store", Status::Problem, "the store was not asked", "check the store flags"),
        (Some(Err(e)), _) => check(
            "store",
            Status::Problem,
            format!("the store does not answer: {e}"),
            "start the store or fix --etcd-endpoints / --store / TLS flags",
        ),
        (Some(Ok(())), None) => check(
            "store",
            Status::Problem,
            "the store answers but holds no lease for this host",
            "start the daemon; if it runs, see its log for why it has no lease",
        ),
        (Some(Ok(())), Some((subnet, None))) => {
            ok("store", format!("the store answers; lease {subnet} is a reservation (no expiry)"))
        }
        (Some(Ok(())), Some((subnet, Some(left)))) => {
            let hours = left.as_secs() / 3600;
            let mins = (left.as_secs() % 3600) / 60;
            if left.is_zero() {
                check(
                    "store",
                    Status::Problem,
                    format!("lease {subnet} has expired"),
                    "restart the daemon to take a lease again",
                )
            } else if *left + Duration::from_secs(300) < f.renew_margin {
                check(
                    "store",
                    Status::Warning,
                    format!("lease {subnet} expires in {hours}h{mins:02}m: the daemon should have renewed it by now"),
                    "check that the daemon runs and reaches the store (its log names the renewal errors)",
                )
            } else {
                ok("store", format!("the store answers; lease {subnet} expires in {hours}h{mins:02}m"))
            }
        }
    }
}

fn daemon(f: &Facts) -> Check {
    match &f.health {
        None | Some(Health::Off) => check(
            "daemon",
            Status::Warning,
            "the health port is off (--healthz-port=0): the daemon cannot be asked",
            "run the daemon and doctor with --healthz-port=<port>",
        ),
        Some(Health::Unreachable(e)) => check(
            "daemon",
            Status::Problem,
            format!("the daemon does not answer on its health port: {e}"),
            "start the daemon (systemctl start weft) or pass doctor the daemon's --healthz-ip/--healthz-port",
        ),
        Some(Health::Answered { healthz, ready, main_loop_age, reconciles }) => {
            let last = match main_loop_age {
                Some(a) => format!("main loop ran {}s ago", a.as_secs()),
                None => "main loop never ran".into(),
            };
            let passes = reconciles.map(|r| format!(", {r} reconcile passes")).unwrap_or_default();
            match (healthz, ready) {
                (Err(why), _) => check(
                    "daemon",
                    Status::Problem,
                    format!("the daemon is unhealthy: {why} ({last})"),
                    "see the daemon's log; restart it if it is stuck",
                ),
                (Ok(()), false) => check(
                    "daemon",
                    Status::Problem,
                    format!("the daemon runs but is not ready (no lease or subnet file yet; {last})"),
                    "see the daemon's log: usually the store is unreachable",
                ),
                (Ok(()), true) => ok("daemon", format!("healthy and ready; {last}{passes}")),
            }
        }
    }
}

/// The exit status: 0 all ok, 1 warnings, 2 problems.
pub fn exit_code(checks: &[Check]) -> u8 {
    match checks.iter().map(|c| c.status).max() {
        Some(Status::Problem) => 2,
        Some(Status::Warning) => 1,
        _ => 0,
    }
}

/// The text report: one line per check, the fix indented below it.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let tag = match c.status {
            Status::Ok => "ok     ",
            Status::Warning => "WARNING",
            Status::Problem => "PROBLEM",
        };
        let _ = writeln!(s, "{tag} {:<18} {}", c.name, c.message);
        if !c.fix.is_empty() {
            let _ = writeln!(s, "        {:<18} fix: {}", "", c.fix);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Facts {
        Facts {
            backend: Some("vxlan".into()),
            ip_forward: Some(true),
            rp_filter: vec![("eth0".into(), 0), ("flannel.1".into(), 2)],
            bridge_nf_call_iptables: Some(true),
            external: Some(Dev { name: "eth0".into(), mtu: 1500 }),
            overlay: Some(Dev { name: "flannel.1".into(), mtu: 1450 }),
            overhead: 50,
            bridge: Some(Dev { name: "cni0".into(), mtu: 1450 }),
            pod_veths: vec![Dev { name: "veth1".into(), mtu: 1450 }],
            vxlan_tx_checksum: Some(true),
            kernel: Some((6, 1)),
            legacy_chains: Some(vec![]),
            nft_chains: Some(vec!["FLANNEL-POSTRTG".into()]),
            dataplane: Some(DataPlaneDiff::default()),
            subnet_env: Some(SubnetEnvFacts {
                path: "/run/flannel/subnet.env".into(),
                network: Some("10.5.0.0/16".into()),
                subnet: Some("10.5.1.0/24".into()),
                mtu: Some(1450),
            }),
            network: Some("10.5.0.0/16".into()),
            expected_mtu: Some(1450),
            store: Some(Ok(())),
            own_lease: Some(("10.5.1.0/24".into(), Some(Duration::from_secs(20 * 3600)))),
            renew_margin: Duration::from_secs(3600),
            health: Some(Health::Answered {
                healthz: Ok(()),
                ready: true,
                main_loop_age: Some(Duration::from_secs(1)),
                reconciles: Some(3),
            }),
            ..Facts::default()
        }
    }

    fn status_of(f: &Facts, name: &str) -> (Status, String) {
        let c = checks(f).into_iter().find(|c| c.name == name).unwrap();
        (c.status, format!("{} | {}", c.message, c.fix))
    }

    #[test]
    fn a_healthy_host_is_all_ok_and_exits_0() {
        let c = checks(&healthy());
        assert!(c.iter().all(|c| c.status == Status::Ok), "{}", render(&c));
        assert_eq!(exit_code(&c), 0);
    }

    #[test]
    fn each_broken_fact_is_named_with_a_fix() {
        let cases: Vec<Case> = vec![
            ("forwarding", Status::Problem, Box::new(|f| f.ip_forward = Some(false)), "ip_forward=1"),
            ("forwarding", Status::Problem, Box::new(|f| f.ipv6 = true), "ipv6.conf.all.forwarding=1"),
            ("rp_filter", Status::Warning, Box::new(|f| f.rp_filter[1].1 = 1), "net.ipv4.conf.flannel.1.rp_filter=2"),
            ("br_netfilter", Status::Warning, Box::new(|f| f.bridge_nf_call_iptables = None), "modprobe br_netfilter"),
            ("br_netfilter", Status::Warning, Box::new(|f| f.bridge_nf_call_iptables = Some(false)), "=1"),
            ("mtu", Status::Problem, Box::new(|f| f.pod_veths[0].mtu = 1500), "veth1 has MTU 1500 > 1450"),
            ("mtu", Status::Problem, Box::new(|f| f.overlay.as_mut().unwrap().mtu = 1500), "flannel.1 has MTU 1500"),
            ("mtu", Status::Problem, Box::new(|f| f.subnet_env.as_mut().unwrap().mtu = Some(1500)), "FLANNEL_MTU=1500"),
            ("vxlan_checksum", Status::Warning, Box::new(|f| f.kernel = Some((5, 4))), "tx-checksum-ip-generic off"),
            (
                "iptables_backends",
                Status::Problem,
                Box::new(|f| f.legacy_chains = Some(vec!["FLANNEL-FWD".into()])),
                "iptables-legacy (FLANNEL-FWD)",
            ),
            (
                "dataplane",
                Status::Problem,
                Box::new(|f| f.dataplane.as_mut().unwrap().missing.push("route 10.5.2.0/24".into())),
                "missing: route 10.5.2.0/24",
            ),
            (
                "dataplane",
                Status::Problem,
                Box::new(|f| f.dataplane.as_mut().unwrap().wrong_mac.push("neighbour 10.5.2.0".into())),
                "wrong VTEP MAC",
            ),
            (
                "dataplane",
                Status::Problem,
                Box::new(|f| f.dataplane.as_mut().unwrap().extra.push("route 10.5.9.0/24".into())),
                "stale: route 10.5.9.0/24",
            ),
            ("subnet_env", Status::Problem, Box::new(|f| f.subnet_env = None), "no subnet file"),
            (
                "subnet_env",
                Status::Problem,
                Box::new(|f| f.subnet_env.as_mut().unwrap().subnet = Some("10.5.7.0/24".into())),
                "our lease is 10.5.1.0/24",
            ),
            ("store", Status::Problem, Box::new(|f| f.store = Some(Err("refused".into()))), "does not answer: refused"),
            ("store", Status::Problem, Box::new(|f| f.own_lease = None), "no lease for this host"),
            (
                "store",
                Status::Warning,
                Box::new(|f| f.own_lease.as_mut().unwrap().1 = Some(Duration::from_secs(600))),
                "expires in 0h10m",
            ),
            (
                "daemon",
                Status::Problem,
                Box::new(|f| f.health = Some(Health::Unreachable("refused".into()))),
                "does not answer",
            ),
            ("daemon", Status::Warning, Box::new(|f| f.health = Some(Health::Off)), "--healthz-port"),
            (
                "network_policy",
                Status::Problem,
                Box::new(|f| (f.policy_enforced, f.policy_table) = (Some(true), Some(false))),
                "inet weft-netpol is missing",
            ),
            (
                "network_policy",
                Status::Problem,
                Box::new(|f| (f.policy_enforced, f.policy_table) = (Some(true), None)),
                "install nftables",
            ),
            (
                "network_policy",
                Status::Warning,
                Box::new(|f| (f.policy_enforced, f.policy_table) = (Some(false), Some(true))),
                "a leftover",
            ),
            (
                "daemon",
                Status::Problem,
                Box::new(|f| {
                    f.health = Some(Health::Answered {
                        healthz: Err("the main loop has not run for 90s".into()),
                        ready: true,
                        main_loop_age: Some(Duration::from_secs(90)),
                        reconciles: None,
                    })
                }),
                "unhealthy",
            ),
        ];
        for (name, status, breaks, says) in cases {
            let mut f = healthy();
            breaks(&mut f);
            let (s, text) = status_of(&f, name);
            assert_eq!(s, status, "{name}: {text}");
            assert!(text.contains(says), "{name}: {text:?} should say {says:?}");
            assert!(!text.ends_with("| "), "{name} has a fix");
            let all = checks(&f);
            assert_eq!(exit_code(&all), if status == Status::Problem { 2 } else { 1 }, "{}", render(&all));
        }
    }

    #[test]
    fn policy_enforced_with_its_table_or_off_without_one_is_ok() {
        for (enforced, table) in [
            (Some(true), Some(true)),
            (Some(false), Some(false)),
            (Some(false), None),
            (None, None),
            (None, Some(true)),
        ] {
            let mut f = healthy();
            (f.policy_enforced, f.policy_table) = (enforced, table);
            assert_eq!(status_of(&f, "network_policy").0, Status::Ok, "{enforced:?} {table:?}");
        }
    }

    #[test]
    fn the_checksum_bug_needs_an_old_kernel_and_offload_on() {
        let mut f = healthy();
        f.kernel = Some((5, 4));
        f.vxlan_tx_checksum = Some(false);
        assert_eq!(status_of(&f, "vxlan_checksum").0, Status::Ok);
        f.backend = Some("host-gw".into());
        f.vxlan_tx_checksum = Some(true);
        assert_eq!(status_of(&f, "vxlan_checksum").0, Status::Ok);
    }
}
