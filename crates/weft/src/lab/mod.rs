//! `weft lab`: a whole multi-host cluster in network namespaces on one machine, and the
//! building blocks the integration tests share. Everything happens inside namespaces
//! created here; the machine's own network namespace is never changed.

pub mod bench;
pub mod chaos;
pub mod check;
pub mod error;
pub mod etcd;
pub mod kube;
pub mod netns;
pub mod pids;
pub mod pods;
pub mod policy_check;
pub mod probe;
pub mod responder;
pub mod state;
pub mod topology;

use weft_core::flags::{self, Kind, Parsed, Spec};

use self::topology::{LabError, UpOptions};

const fn spec(name: &'static str, kind: Kind, default: &'static str, help: &'static str) -> Spec {
    Spec { name, kind, default, help }
}

const NAME: Spec = spec("name", Kind::Str, "weft", "lab name: prefix of its namespaces, lower-case letters and digits");
const JSON: Spec = spec("json", Kind::Bool, "false", "print JSON");

/// Usage of `weft lab`.
pub fn usage() -> String {
    "Usage: weft lab <command> [flags]\n\n\
     Commands:\n  \
     up          build a cluster: LAN, outside host, store, one daemon per host, pods via CNI\n              \
     [--hosts 3] [--pods-per-host 2] [--backend vxlan|host-gw|udp|wireguard] [--store local|etcd|kube] [--name weft]\n              \
     [--etcd-members 1] [--etcd-tls] (a real etcd cluster, members in their own namespaces)\n              \
     [--network-policy] (with --store kube: daemons enforce NetworkPolicy; pods are Pod objects)\n              \
     [--ipv6] (dual-stack: IPv6 on the LAN and on every pod; vxlan and host-gw)\n  \
     pod add     --host N --namespace NS --pod NAME [--labels k=v,...]: one more pod (--store kube)\n  \
     pod del     --namespace NS --pod NAME\n  \
     policy-check  the upstream NetworkPolicy e2e model (namespaces x, y, z, pods a, b, c) against\n              \
     the daemons, every case probed over TCP, UDP and SCTP on ports 80 and 81 [--json]\n  \
     status      hosts, subnets, daemons and pods [--json]\n  \
     check       ping every pod from every pod, and the outside host (masqueraded) [--json]\n  \
     bench       iperf3 and ping between pods on two hosts: of the running lab, or of fresh\n              \
     labs with [--backend B | --all] [--seconds 5] [--json]; --policies N: with and without\n              \
     N NetworkPolicies selecting the destination pod (a --network-policy lab)\n  \
     restart N   kill host N's daemon (as a crash) and start it again\n  \
     chaos       inject random faults while every pod pings every pod; report repair times\n              \
     [--seconds 60] [--seed S] [--faults kind,...] [--json]\n  \
     add-host    add a host with its pods\n  \
     remove-host N  take host N out of the cluster (its lease is deleted)\n  \
     down        remove every namespace, process and file of the lab\n\n\
     Every command takes --name (default weft). Run as root.\n"
        .into()
}

fn parse(specs: &[Spec], args: &[String]) -> Result<Option<flags::Values>, LabError> {
    match flags::parse(specs, args, &|_| None) {
        Ok(Parsed::Values(v)) => Ok(Some(v)),
        Ok(_) => Ok(None),
        Err(e) => Err(LabError::Usage(e.0)),
    }
}

/// Usage of one lab command: its flags. `weft lab` reads no FLANNELD_* variables: that
/// note of the daemon's is left out.
fn command_usage(cmd: &str, specs: &[Spec]) -> String {
    flags::usage(&format!("weft lab {cmd}"), specs).replace("; every flag can be set by FLANNELD_<NAME>", "")
}

/// Prints the usage of a lab command (for `--help`); its exit status is 0.
fn help(cmd: &str, specs: &[Spec]) -> Result<u8, LabError> {
    print!("{}", command_usage(cmd, specs));
    Ok(0)
}

fn host_number(args: &[String]) -> Result<(u8, Vec<String>), LabError> {
    let (n, rest): (Vec<&String>, Vec<&String>) = args.iter().partition(|a| a.parse::<u8>().is_ok());
    match n.as_slice() {
        [one] => Ok((one.parse().unwrap_or(0), rest.into_iter().cloned().collect())),
        _ => Err(LabError::Usage("name one host by its number, e.g. `weft lab restart 2`".into())),
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Runs `weft lab <args>`; returns the exit status.
pub fn run(args: &[String]) -> u8 {
    match dispatch(args) {
        Ok(code) => code,
        Err(LabError::Usage(m)) => {
            eprintln!("weft lab: {m}\n\n{}", usage());
            2
        }
        Err(e) => {
            eprintln!("weft lab: {e}");
            1
        }
    }
}

fn dispatch(args: &[String]) -> Result<u8, LabError> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(LabError::Usage("which command?".into()));
    };
    let rest = rest.to_vec();
    match cmd.as_str() {
        "up" => {
            let specs = [
                NAME,
                spec("hosts", Kind::Uint, "3", "number of hosts"),
                spec("pods-per-host", Kind::Uint, "2", "pods per host"),
                spec("backend", Kind::Str, "vxlan", "vxlan, host-gw, udp or wireguard"),
                spec(
                    "store",
                    Kind::Str,
                    "local",
                    "local (embedded), etcd (a real etcd server) or kube (Kubernetes nodes on a test API server)",
                ),
                spec("etcd-members", Kind::Uint, "1", "etcd cluster members (--store etcd), each in its own namespace"),
                spec("etcd-tls", Kind::Bool, "false", "etcd with TLS, each member with its own certificate"),
                spec("network-policy", Kind::Bool, "false", "daemons enforce NetworkPolicy (needs --store kube)"),
                spec(
                    "ipv6",
                    Kind::Bool,
                    "false",
                    "dual-stack: IPv6 on the LAN, in the network config and on every pod",
                ),
            ];
            let Some(v) = parse(&specs, &rest)? else { return help("up", &specs) };
            let small = |n: &str| u8::try_from(v.uint(n)).map_err(|_| LabError::Usage(format!("--{n} is too large")));
            let o = UpOptions {
                name: v.str("name").into(),
                hosts: small("hosts")?,
                pods_per_host: small("pods-per-host")?,
                backend: v.str("backend").into(),
                store: v.str("store").into(),
                etcd_members: small("etcd-members")?,
                etcd_tls: v.bool("etcd-tls"),
                network_policy: v.bool("network-policy"),
                ipv6: v.bool("ipv6"),
            };
            let lab = topology::up(&o)?;
            print!("{}", check::status_table(&lab));
            println!(
                "\nNext: weft lab check --name {0}    weft lab status --name {0}    weft lab down --name {0}",
                lab.name
            );
            Ok(0)
        }
        "status" => {
            let Some(v) = parse(&[NAME, JSON], &rest)? else { return help("status", &[NAME, JSON]) };
            let lab = topology::load(v.str("name"))?;
            if v.bool("json") {
                print_json(&check::status_json(&lab));
            } else {
                print!("{}", check::status_table(&lab));
            }
            Ok(0)
        }
        "check" => {
            let Some(v) = parse(&[NAME, JSON], &rest)? else { return help("check", &[NAME, JSON]) };
            let lab = topology::load(v.str("name"))?;
            let probes = check::check(&lab);
            let failed = probes.iter().filter(|p| !p.ok).count();
            if v.bool("json") {
                print_json(&serde_json::json!({
                    "ok": failed == 0,
                    "probes": probes.iter().map(|p| serde_json::json!({"from": p.from, "to": p.to, "ip": p.ip, "ok": p.ok})).collect::<Vec<_>>(),
                }));
            } else {
                print!("{}", check::matrix(&lab, &probes));
                println!(
                    "\n{} of {} pings answered{}",
                    probes.len() - failed,
                    probes.len(),
                    if failed == 0 { " (outside: masqueraded, it has no route to the pod network)" } else { "" }
                );
            }
            Ok(if failed == 0 { 0 } else { 1 })
        }
        "bench" => {
            let specs = [
                NAME,
                JSON,
                spec("all", Kind::Bool, "false", "measure every backend in one run"),
                spec("backend", Kind::Str, "", "measure this backend in a lab of its own (default: the running lab)"),
                spec("seconds", Kind::Uint, "5", "iperf3 duration"),
                spec(
                    "policies",
                    Kind::Uint,
                    "0",
                    "with N NetworkPolicies selecting the destination pod vs none (running lab)",
                ),
                spec("repeat", Kind::Uint, "1", "with --all or --backend: K runs, printed as medians and ranges"),
            ];
            let Some(v) = parse(&specs, &rest)? else { return help("bench", &specs) };
            let seconds = v.uint("seconds").clamp(1, 60) as u32;
            let repeat = v.uint("repeat").clamp(1, 20) as u32;
            if v.uint("policies") > 0 {
                let n = usize::try_from(v.uint("policies").min(20_000)).unwrap_or(20_000);
                let r = bench::with_policies(&topology::load(v.str("name"))?, n, seconds)?;
                if v.bool("json") {
                    print_json(&bench::policies_json(&r));
                } else {
                    print!("{}", bench::policies_render(&r));
                }
                return Ok(0);
            }
            if repeat > 1 && (v.bool("all") || !v.str("backend").is_empty()) {
                let chosen: Vec<(&str, &str)> = if v.bool("all") {
                    bench::BACKENDS.to_vec()
                } else {
                    bench::BACKENDS.iter().copied().filter(|(b, _)| *b == v.str("backend")).collect()
                };
                if chosen.is_empty() {
                    return Err(LabError::Usage(format!(
                        "unknown --backend {:?}: use vxlan, host-gw, udp or wireguard",
                        v.str("backend")
                    )));
                }
                let runs = bench::repeated(v.str("name"), &chosen, seconds, repeat);
                if v.bool("json") {
                    print_json(&bench::to_json_repeated(&runs));
                } else {
                    print!("{}", bench::render_repeated(&runs));
                }
                return Ok(0);
            }
            let results = if v.bool("all") {
                bench::fresh(v.str("name"), &bench::BACKENDS, seconds)
            } else if !v.str("backend").is_empty() {
                let Some(one) = bench::BACKENDS.iter().find(|(b, _)| *b == v.str("backend")) else {
                    return Err(LabError::Usage(format!(
                        "unknown --backend {:?}: use vxlan, host-gw, udp or wireguard",
                        v.str("backend")
                    )));
                };
                bench::fresh(v.str("name"), std::slice::from_ref(one), seconds)
            } else {
                vec![bench::measure(&topology::load(v.str("name"))?, seconds)?]
            };
            if v.bool("json") {
                print_json(&bench::to_json(&results));
            } else {
                print!("{}", bench::render(&results));
            }
            Ok(0)
        }
        "restart" | "remove-host" => {
            if rest.iter().any(|a| matches!(a.trim_start_matches('-'), "h" | "help")) {
                return help(&format!("{cmd} N"), &[NAME]);
            }
            let (n, rest) = host_number(&rest)?;
            let Some(v) = parse(&[NAME], &rest)? else { return help(&format!("{cmd} N"), &[NAME]) };
            let lab = if cmd == "restart" {
                topology::restart(v.str("name"), n)?
            } else {
                topology::remove_host(v.str("name"), n)?
            };
            print!("{}", check::status_table(&lab));
            Ok(0)
        }
        "chaos" => {
            let specs = [
                NAME,
                JSON,
                spec("seconds", Kind::Uint, "60", "start new faults during this many seconds"),
                spec("seed", Kind::Str, "", "RNG seed (default: from the clock; printed)"),
                spec("faults", Kind::Str, "", "only these fault kinds, comma-separated (default: all)"),
            ];
            let Some(v) = parse(&specs, &rest)? else {
                print!("{}", command_usage("chaos", &specs));
                let kinds: Vec<&str> = chaos::Fault::ALL.iter().map(|k| k.name()).collect();
                println!("\nFault kinds: {}", kinds.join(", "));
                return Ok(0);
            };
            let seed = match v.str("seed") {
                "" => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() % 1_000_000)
                    .unwrap_or(1),
                s => s.parse().map_err(|_| LabError::Usage(format!("--seed {s:?} is not a number")))?,
            };
            let o = chaos::ChaosOptions {
                name: v.str("name").into(),
                seconds: v.uint("seconds").clamp(1, 3600),
                seed,
                faults: chaos::parse_faults(v.str("faults"))?,
            };
            let report = chaos::run(&o)?;
            if v.bool("json") {
                print_json(&chaos::to_json(&report));
            } else {
                print!("{}", chaos::render(&report));
            }
            Ok(if report.ok() { 0 } else { 1 })
        }
        "add-host" => {
            let Some(v) = parse(&[NAME], &rest)? else { return help("add-host", &[NAME]) };
            let lab = topology::add_host(v.str("name"))?;
            print!("{}", check::status_table(&lab));
            Ok(0)
        }
        "down" => {
            let Some(v) = parse(&[NAME], &rest)? else { return help("down", &[NAME]) };
            topology::check_name(v.str("name"))?;
            let (processes, namespaces) = topology::down(v.str("name"));
            println!(
                "lab {}: stopped {processes} processes, removed {namespaces} namespaces and {}",
                v.str("name"),
                state::dir(v.str("name")).display()
            );
            Ok(0)
        }
        "pod" => {
            let Some((sub, rest)) = rest.split_first() else {
                return Err(LabError::Usage("which pod command? `weft lab pod add` or `weft lab pod del`".into()));
            };
            let ns = spec("namespace", Kind::Str, "", "the pod's Kubernetes namespace");
            let pod = spec("pod", Kind::Str, "", "the pod's name");
            match sub.as_str() {
                "add" => {
                    let specs = [
                        NAME,
                        spec("host", Kind::Uint, "0", "the host (number) the pod runs on"),
                        ns,
                        pod,
                        spec("labels", Kind::Str, "", "the pod's labels: key=value,key2=value2"),
                    ];
                    let Some(v) = parse(&specs, rest)? else { return help("pod add", &specs) };
                    if v.uint("host") == 0 || v.str("namespace").is_empty() || v.str("pod").is_empty() {
                        return Err(LabError::Usage("pod add needs --host N, --namespace NS and --pod NAME".into()));
                    }
                    let host = u8::try_from(v.uint("host"))
                        .map_err(|_| LabError::Usage(format!("--host {} is not a host of the lab", v.uint("host"))))?;
                    let lab = pods::add(v.str("name"), host, v.str("namespace"), v.str("pod"), v.str("labels"))?;
                    print!("{}", check::status_table(&lab));
                    Ok(0)
                }
                "del" => {
                    let specs = [NAME, ns, pod];
                    let Some(v) = parse(&specs, rest)? else { return help("pod del", &specs) };
                    if v.str("namespace").is_empty() || v.str("pod").is_empty() {
                        return Err(LabError::Usage("pod del needs --namespace NS and --pod NAME".into()));
                    }
                    let lab = pods::del(v.str("name"), v.str("namespace"), v.str("pod"))?;
                    print!("{}", check::status_table(&lab));
                    Ok(0)
                }
                other => Err(LabError::Usage(format!("unknown pod command {other:?}: use add or del"))),
            }
        }
        "policy-check" => {
            let specs = [
                NAME,
                JSON,
                spec("cases", Kind::Str, "", "only the cases whose names contain one of these words, comma-separated"),
                spec("wait", Kind::Uint, "20", "seconds to wait for a change to be enforced"),
            ];
            let Some(v) = parse(&specs, &rest)? else { return help("policy-check", &specs) };
            let o = policy_check::Options {
                name: v.str("name").into(),
                only: v.str("cases").split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
                wait: std::time::Duration::from_secs(v.uint("wait").clamp(1, 600)),
                probe_timeout: std::time::Duration::from_secs(1),
            };
            let results = policy_check::run(&o)?;
            if v.bool("json") {
                print_json(&policy_check::to_json(&results));
            } else {
                print!("{}", policy_check::render(&results));
            }
            Ok(if results.iter().all(policy_check::CaseResult::ok) { 0 } else { 1 })
        }
        // Hidden: the responder the lab starts in every pod of a kube-store lab.
        "responder" => Ok(responder::run()),
        "help" | "-h" | "--help" => {
            print!("{}", usage());
            Ok(0)
        }
        other => Err(LabError::Usage(format!("unknown lab command {other:?}"))),
    }
}
