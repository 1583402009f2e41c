//! flanneld's command line (every flag of flanneld, Go style, `FLANNELD_*` environment) plus
//! weft's own store flags, turned into typed options.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use weft_core::flags::{self, FlagError, Kind, Parsed, Spec, Values};

use crate::registry::etcd::EtcdOptions;
use crate::registry::kube::KubeOptions;

const fn s(name: &'static str, kind: Kind, default: &'static str, help: &'static str) -> Spec {
    Spec { name, kind, default, help }
}

/// Flags that say where the store is; shared by `weft daemon` and `weft leases`.
pub const STORE_FLAGS: &[Spec] = &[
    s("store", Kind::Str, "etcd", "lease store: etcd, or local (an embedded file store for one machine)"),
    s("local-store", Kind::Str, "/var/lib/weft/leases.db", "file of the local store (--store=local)"),
    s(
        "etcd-endpoints",
        Kind::Str,
        "http://127.0.0.1:4001,http://127.0.0.1:2379",
        "a comma-delimited list of etcd endpoints",
    ),
    s("etcd-prefix", Kind::Str, "/coreos.com/network", "etcd prefix"),
    s("etcd-keyfile", Kind::Str, "", "SSL key file used to secure etcd communication"),
    s("etcd-certfile", Kind::Str, "", "SSL certification file used to secure etcd communication"),
    s("etcd-cafile", Kind::Str, "", "SSL Certificate Authority file used to secure etcd communication"),
    s("etcd-username", Kind::Str, "", "username for BasicAuth to etcd"),
    s("etcd-password", Kind::Str, "", "password for BasicAuth to etcd"),
    s(
        "net-config-path",
        Kind::Str,
        "/etc/kube-flannel/net-conf.json",
        "path to the network configuration file (local store and kube mode)",
    ),
];

/// The flags of `weft daemon` besides the store flags.
pub const DAEMON_FLAGS: &[Spec] = &[
    s("kube-subnet-mgr", Kind::Bool, "false", "contact the Kubernetes API for subnet assignment instead of etcd"),
    s("kube-api-url", Kind::Str, "", "Kubernetes API server URL"),
    s("kubeconfig-file", Kind::Str, "", "kubeconfig file location"),
    s("kube-annotation-prefix", Kind::Str, "flannel.alpha.coreos.com", "Kubernetes annotation prefix"),
    s("iface", Kind::List, "", "interface to use (IP or name) for inter-host communication; repeatable"),
    s("iface-regex", Kind::List, "", "regex of the IP or name of the interface to use; repeatable"),
    s("iface-can-reach", Kind::Str, "", "use the interface of the route to this address"),
    s("public-ip", Kind::Str, "", "IP accessible by other nodes for inter-host communication"),
    s("public-ipv6", Kind::Str, "", "IPv6 accessible by other nodes for inter-host communication"),
    s(
        "subnet-file",
        Kind::Str,
        "/run/flannel/subnet.env",
        "filename where env variables (subnet, MTU, ...) will be written to",
    ),
    s("subnet-lease-renew-margin", Kind::Uint, "60", "subnet lease renewal margin, in minutes, ranging from 1 to 1439"),
    s("ip-masq", Kind::Bool, "false", "setup IP masquerade rule for traffic destined outside of overlay network"),
    s("ip-masq-fully-random-disable", Kind::Bool, "false", "don't use --random-fully in the MASQUERADE rule"),
    s("iptables-resync", Kind::Uint, "5", "resync period for iptables rules, in seconds"),
    s("iptables-forward-rules", Kind::Bool, "true", "add default accept rules to the FORWARD chain"),
    s("ip-blackhole-route", Kind::Bool, "false", "keep a blackhole route for the own subnet"),
    s("healthz-ip", Kind::Str, "0.0.0.0", "the IP address for the health server to listen on"),
    s("healthz-port", Kind::Uint, "0", "the port for the health server (/healthz, /readyz, /metrics); 0 disables it"),
    s("set-node-network-unavailable", Kind::Bool, "true", "kube: set the NetworkUnavailable condition"),
    s(
        "network-policy",
        Kind::Bool,
        "false",
        "enforce Kubernetes NetworkPolicy on this node's pods (needs --kube-subnet-mgr; also net-conf \"NetworkPolicy\": true)",
    ),
    s("v", Kind::Uint, "0", "log verbosity (0 info, 2 debug, 4 trace)"),
    s("log-format", Kind::Str, "text", "log format: text, or json (one JSON object per line)"),
    s("vmodule", Kind::Str, "", "accepted for flanneld compatibility; ignored"),
    s("log_backtrace_at", Kind::Str, "", "accepted for flanneld compatibility; ignored"),
];

/// Why NetworkPolicy cannot be enabled outside kube mode, and what to do.
pub const NETPOL_NEEDS_KUBE: &str = "--network-policy (or \"NetworkPolicy\": true in the network config) needs the Kubernetes store: pods, namespaces and policies come from the API server; add --kube-subnet-mgr, or drop --network-policy / the NetworkPolicy key with --store etcd or local";

/// Which store to use.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    /// etcd v3.
    Etcd(EtcdOptions),
    /// The embedded local store.
    Local {
        /// Store file.
        path: PathBuf,
        /// Key prefix.
        prefix: String,
        /// Network config file.
        config: PathBuf,
    },
    /// Kubernetes nodes (`--kube-subnet-mgr`).
    Kube(KubeOptions),
}

/// Typed `weft daemon` options.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Where leases live.
    pub store: StoreChoice,
    /// `--iface`.
    pub iface: Vec<String>,
    /// `--iface-regex`.
    pub iface_regex: Vec<String>,
    /// `--iface-can-reach`.
    pub iface_can_reach: Option<std::net::IpAddr>,
    /// `--public-ip`.
    pub public_ip: Option<Ipv4Addr>,
    /// `--public-ipv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// `--subnet-file`.
    pub subnet_file: PathBuf,
    /// `--subnet-lease-renew-margin`, in minutes.
    pub renew_margin_minutes: u64,
    /// `--ip-masq`.
    pub ip_masq: bool,
    /// `--ip-masq-fully-random-disable`.
    pub ip_masq_fully_random_disable: bool,
    /// `--iptables-resync`, in seconds.
    pub iptables_resync_secs: u64,
    /// `--iptables-forward-rules`.
    pub iptables_forward_rules: bool,
    /// `--ip-blackhole-route`.
    pub ip_blackhole_route: bool,
    /// `--healthz-ip`.
    pub healthz_ip: std::net::IpAddr,
    /// `--healthz-port` (0: off).
    pub healthz_port: u16,
    /// `-v`.
    pub verbosity: u64,
    /// `--log-format=json`: one JSON object per log line.
    pub log_json: bool,
    /// `--network-policy`: enforce NetworkPolicy (kube mode only; the net-conf key
    /// `"NetworkPolicy": true` enables it too).
    pub network_policy: bool,
}

fn bad(msg: String) -> FlagError {
    FlagError(msg)
}

fn opt_parse<T: std::str::FromStr>(v: &Values, name: &str, what: &str) -> Result<Option<T>, FlagError> {
    let raw = v.str(name);
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse().map(Some).map_err(|_| bad(format!("invalid value {raw:?} for flag -{name}: expected {what}")))
}

/// The store options from parsed flags.
pub fn store_choice(v: &Values) -> Result<StoreChoice, FlagError> {
    let prefix = v.str("etcd-prefix").to_string();
    match v.str("store") {
        "etcd" => Ok(StoreChoice::Etcd(EtcdOptions {
            endpoints: v
                .str("etcd-endpoints")
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect(),
            prefix,
            keyfile: v.str("etcd-keyfile").into(),
            certfile: v.str("etcd-certfile").into(),
            cafile: v.str("etcd-cafile").into(),
            username: v.str("etcd-username").into(),
            password: v.str("etcd-password").into(),
        })),
        "local" => Ok(StoreChoice::Local {
            path: v.str("local-store").into(),
            prefix,
            config: v.str("net-config-path").into(),
        }),
        other => Err(bad(format!("invalid value {other:?} for flag -store: use etcd or local"))),
    }
}

/// The Kubernetes store's options: flanneld's flags, and our node from `NODE_NAME`, else
/// from our pod (`POD_NAMESPACE`/`POD_NAME`).
fn kube_options(v: &Values, env: &dyn Fn(&str) -> Option<String>) -> Result<KubeOptions, FlagError> {
    let prefix = v.str("kube-annotation-prefix");
    weft_core::kube::AnnotationNames::new(prefix).map_err(|e| bad(e.to_string()))?;
    let var = |k: &str| env(k).filter(|s| !s.is_empty());
    Ok(KubeOptions {
        api_url: v.str("kube-api-url").into(),
        kubeconfig: v.str("kubeconfig-file").into(),
        annotation_prefix: prefix.into(),
        set_node_network_unavailable: v.bool("set-node-network-unavailable"),
        net_config_path: v.str("net-config-path").into(),
        node_name: var("NODE_NAME"),
        pod: var("POD_NAMESPACE").zip(var("POD_NAME")),
    })
}

/// All flags of `weft daemon`.
pub fn daemon_specs() -> Vec<Spec> {
    STORE_FLAGS.iter().chain(DAEMON_FLAGS).copied().collect()
}

/// Parses `weft daemon` arguments.
pub fn parse_daemon(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Option<DaemonOptions>, FlagError> {
    let v = match flags::parse(&daemon_specs(), args, env)? {
        Parsed::Values(v) => v,
        Parsed::Help | Parsed::Version => return Ok(None),
    };
    let margin = v.uint("subnet-lease-renew-margin");
    if !(1..=1439).contains(&margin) {
        return Err(bad(format!(
            "invalid value {margin} for flag -subnet-lease-renew-margin: it must be between 1 and 1439 minutes"
        )));
    }
    let store = if v.bool("kube-subnet-mgr") { StoreChoice::Kube(kube_options(&v, env)?) } else { store_choice(&v)? };
    let network_policy = v.bool("network-policy");
    if network_policy && !matches!(store, StoreChoice::Kube(_)) {
        return Err(bad(NETPOL_NEEDS_KUBE.to_string()));
    }
    let port = v.uint("healthz-port");
    let healthz_port =
        u16::try_from(port).map_err(|_| bad(format!("invalid value {port} for flag -healthz-port: use 0 to 65535")))?;
    Ok(Some(DaemonOptions {
        store,
        iface: v.list("iface").to_vec(),
        iface_regex: v.list("iface-regex").to_vec(),
        iface_can_reach: opt_parse(&v, "iface-can-reach", "an IP address")?,
        public_ip: opt_parse(&v, "public-ip", "an IPv4 address")?,
        public_ipv6: opt_parse(&v, "public-ipv6", "an IPv6 address")?,
        subnet_file: v.str("subnet-file").into(),
        renew_margin_minutes: margin,
        ip_masq: v.bool("ip-masq"),
        ip_masq_fully_random_disable: v.bool("ip-masq-fully-random-disable"),
        iptables_resync_secs: v.uint("iptables-resync").max(1),
        iptables_forward_rules: v.bool("iptables-forward-rules"),
        ip_blackhole_route: v.bool("ip-blackhole-route"),
        healthz_ip: opt_parse(&v, "healthz-ip", "an IP address")?
            .unwrap_or(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        healthz_port,
        verbosity: v.uint("v"),
        log_json: match v.str("log-format") {
            "text" => false,
            "json" => true,
            other => return Err(bad(format!("invalid value {other:?} for flag -log-format: use text or json"))),
        },
        network_policy,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<DaemonOptions>, FlagError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse_daemon(&args, &|_| None)
    }

    #[test]
    fn defaults_match_flanneld() {
        let o = parse(&[]).unwrap().unwrap();
        let StoreChoice::Etcd(e) = &o.store else { panic!() };
        assert_eq!(e.endpoints, ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]);
        assert_eq!(e.prefix, "/coreos.com/network");
        assert_eq!(o.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!((o.renew_margin_minutes, o.iptables_resync_secs, o.healthz_port), (60, 5, 0));
        assert!(o.iptables_forward_rules && !o.ip_masq);
    }

    #[test]
    fn typed_values_are_checked() {
        assert!(parse(&["-subnet-lease-renew-margin=0"]).unwrap_err().0.contains("between 1 and 1439"));
        assert!(parse(&["-public-ip=nope"]).unwrap_err().0.contains("expected an IPv4 address"));
        assert!(parse(&["-healthz-port=70000"]).unwrap_err().0.contains("0 to 65535"));
        assert!(parse(&["-store=zookeeper"]).unwrap_err().0.contains("etcd or local"));
        assert!(parse(&["-log-format=yaml"]).unwrap_err().0.contains("text or json"));
        assert!(parse(&["--log-format", "json"]).unwrap().unwrap().log_json);
        let o = parse(&["-store", "local", "-local-store=/tmp/x.db", "-iface", "eth1", "-public-ip=192.0.2.1"])
            .unwrap()
            .unwrap();
        assert!(matches!(o.store, StoreChoice::Local { .. }));
        assert_eq!(o.public_ip, Some(Ipv4Addr::new(192, 0, 2, 1)));
    }

    #[test]
    fn network_policy_is_opt_in_and_kube_only() {
        assert!(!parse(&[]).unwrap().unwrap().network_policy);
        for store in [
            &["--network-policy"][..],
            &["--network-policy", "--store=local"],
            &["-network-policy=true", "--store", "etcd"],
        ] {
            let e = parse(store).unwrap_err();
            assert!(e.0.contains("needs the Kubernetes store") && e.0.contains("--kube-subnet-mgr"), "{}", e.0);
        }
        let args: Vec<String> = ["--kube-subnet-mgr", "--network-policy"].iter().map(|s| s.to_string()).collect();
        let o = parse_daemon(&args, &|k| (k == "NODE_NAME").then(|| "n1".to_string())).unwrap().unwrap();
        assert!(o.network_policy && matches!(o.store, StoreChoice::Kube(_)));
        let env = |k: &str| match k {
            "FLANNELD_NETWORK_POLICY" => Some("true".to_string()),
            "FLANNELD_KUBE_SUBNET_MGR" => Some("true".to_string()),
            _ => None,
        };
        assert!(parse_daemon(&[], &env).unwrap().unwrap().network_policy, "FLANNELD_* environment too");
    }

    #[test]
    fn kube_flags_and_environment_are_flanneld_s() {
        let args: Vec<String> =
            ["--kube-subnet-mgr", "--kubeconfig-file=/k", "--kube-annotation-prefix=example.com/net"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let env = |k: &str| match k {
            "POD_NAME" => Some("kube-flannel-ds-x".to_string()),
            "POD_NAMESPACE" => Some("kube-flannel".to_string()),
            "NODE_NAME" => Some(String::new()),
            _ => None,
        };
        let o = parse_daemon(&args, &env).unwrap().unwrap();
        let StoreChoice::Kube(k) = &o.store else { panic!("{:?}", o.store) };
        assert_eq!((k.kubeconfig.as_str(), k.api_url.as_str()), ("/k", ""));
        assert_eq!(k.node_name, None, "an empty NODE_NAME is not a name");
        assert_eq!(k.pod, Some(("kube-flannel".into(), "kube-flannel-ds-x".into())));
        assert!(k.set_node_network_unavailable);
        assert_eq!(k.net_config_path, PathBuf::from("/etc/kube-flannel/net-conf.json"));
        let env = |k: &str| (k == "FLANNELD_KUBE_ANNOTATION_PREFIX").then(|| "Example.com".to_string());
        let e = parse_daemon(&["--kube-subnet-mgr".to_string()], &env).unwrap_err();
        assert!(e.0.contains("invalid --kube-annotation-prefix \"Example.com\""), "{}", e.0);
    }
}
