//! Go-style command-line flags, as flanneld's `flag` package reads them: `-name` and
//! `--name`, `-name=value` or `-name value`, booleans as `-name` or `-name=false`, repeatable
//! flags, and `FLANNELD_<NAME>` environment variables for flags not given.
//!
//! Unlike flanneld, a bad flag is an error (the caller exits 2 with usage), not exit 0.

use std::collections::BTreeMap;
use std::fmt::Write;

/// The kind of value a flag takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text.
    Str,
    /// `true`/`false`; the bare flag means true.
    Bool,
    /// A non-negative integer.
    Uint,
    /// Text, repeatable; each occurrence adds one value.
    List,
}

/// One flag of a command.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Name without dashes.
    pub name: &'static str,
    /// Value kind.
    pub kind: Kind,
    /// Default value as text ("" for none).
    pub default: &'static str,
    /// One-line help.
    pub help: &'static str,
}

/// A flag problem; the message says which flag and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FlagError(pub String);

/// The outcome of parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Flags parsed: values by name (every flag has an entry; lists may be empty).
    Values(Values),
    /// `-h` / `--help` was given.
    Help,
    /// `--version` was given.
    Version,
}

/// Flag values by name, defaults filled in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Values {
    values: BTreeMap<&'static str, Vec<String>>,
    given: Vec<&'static str>,
}

impl Values {
    /// The last value of a flag (its default when not given).
    pub fn str(&self, name: &str) -> &str {
        self.values.get(name).and_then(|v| v.last()).map(String::as_str).unwrap_or("")
    }

    /// All values of a repeatable flag.
    pub fn list(&self, name: &str) -> &[String] {
        self.values.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// A boolean flag (already validated while parsing).
    pub fn bool(&self, name: &str) -> bool {
        parse_bool(self.str(name)).unwrap_or(false)
    }

    /// An integer flag (already validated while parsing).
    pub fn uint(&self, name: &str) -> u64 {
        self.str(name).parse().unwrap_or(0)
    }

    /// Whether the flag was set on the command line or through the environment.
    pub fn was_given(&self, name: &str) -> bool {
        self.given.contains(&name)
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn env_name(flag: &str) -> String {
    format!("FLANNELD_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

fn check(spec: &Spec, value: &str, from: &str) -> Result<(), FlagError> {
    match spec.kind {
        Kind::Bool if parse_bool(value).is_none() => {
            Err(FlagError(format!("invalid boolean value {value:?} for {from}: use true or false")))
        }
        Kind::Uint if value.parse::<u64>().is_err() => {
            Err(FlagError(format!("invalid value {value:?} for {from}: expected a whole number")))
        }
        _ => Ok(()),
    }
}

/// Parses `args` (without the program and command names) against `specs`, then fills flags
/// not given from `env` (`FLANNELD_<NAME>`; empty values ignored), then from defaults.
pub fn parse(specs: &[Spec], args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Parsed, FlagError> {
    let mut set: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            if i < args.len() {
                return Err(FlagError(format!("unexpected argument {:?}: this command takes only flags", args[i])));
            }
            break;
        }
        let Some(body) =
            arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')).filter(|b| !b.is_empty() && !b.starts_with('-'))
        else {
            return Err(FlagError(format!(
                "unexpected argument {arg:?}: this command takes only flags (e.g. --iface=eth0)"
            )));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        if name == "h" || name == "help" {
            return Ok(Parsed::Help);
        }
        if name == "version" {
            return Ok(Parsed::Version);
        }
        let Some(spec) = specs.iter().find(|s| s.name == name) else {
            return Err(FlagError(format!("flag provided but not defined: -{name}")));
        };
        let value = match (spec.kind, inline) {
            (_, Some(v)) => v,
            (Kind::Bool, None) => "true".to_string(),
            (_, None) => {
                let Some(v) = args.get(i) else {
                    return Err(FlagError(format!("flag needs an argument: -{name}")));
                };
                i += 1;
                v.clone()
            }
        };
        check(spec, &value, &format!("flag -{name}"))?;
        let entry = set.entry(spec.name).or_default();
        if spec.kind != Kind::List {
            entry.clear();
        }
        entry.push(value);
    }
    let mut values = Values::default();
    for spec in specs {
        if let Some(v) = set.remove(spec.name) {
            values.given.push(spec.name);
            values.values.insert(spec.name, v);
            continue;
        }
        let var = env_name(spec.name);
        if let Some(v) = env(&var).filter(|v| !v.is_empty()) {
            check(spec, &v, &format!("environment variable {var}"))?;
            values.given.push(spec.name);
            values.values.insert(spec.name, vec![v]);
            continue;
        }
        let default =
            if spec.default.is_empty() && spec.kind == Kind::List { vec![] } else { vec![spec.default.to_string()] };
        values.values.insert(spec.name, default);
    }
    Ok(Parsed::Values(values))
}

/// Usage text listing every flag with its default and environment variable.
pub fn usage(command: &str, specs: &[Spec]) -> String {
    let mut s = format!(
        "Usage: {command} [flags]\n\nFlags (also -flag, -flag=value; every flag can be set by FLANNELD_<NAME>):\n"
    );
    for spec in specs {
        let arg = match spec.kind {
            Kind::Bool => "",
            Kind::Uint => " N",
            Kind::Str | Kind::List => " VALUE",
        };
        let _ = write!(s, "  --{}{}\n        {}", spec.name, arg, spec.help);
        if !spec.default.is_empty() {
            let _ = write!(s, " (default {})", spec.default);
        }
        let _ = writeln!(s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[Spec] = &[
        Spec { name: "iface", kind: Kind::List, default: "", help: "" },
        Spec { name: "ip-masq", kind: Kind::Bool, default: "false", help: "" },
        Spec { name: "iptables-forward-rules", kind: Kind::Bool, default: "true", help: "" },
        Spec { name: "etcd-prefix", kind: Kind::Str, default: "/coreos.com/network", help: "" },
        Spec { name: "healthz-port", kind: Kind::Uint, default: "0", help: "" },
    ];

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Parsed, FlagError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        parse(SPECS, &args, &|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    fn values(args: &[&str], env: &[(&str, &str)]) -> Values {
        match run(args, env).unwrap() {
            Parsed::Values(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn go_style_and_gnu_style_are_both_accepted() {
        let v = values(
            &["-iface", "eth0", "--iface=eth1", "-ip-masq", "--iptables-forward-rules=false", "-healthz-port=8081"],
            &[],
        );
        assert_eq!(v.list("iface"), ["eth0", "eth1"]);
        assert!(v.bool("ip-masq"));
        assert!(!v.bool("iptables-forward-rules"));
        assert_eq!(v.uint("healthz-port"), 8081);
        assert_eq!(v.str("etcd-prefix"), "/coreos.com/network");
        assert!(!v.was_given("etcd-prefix"));
    }

    #[test]
    fn environment_fills_flags_not_given() {
        let v = values(
            &["--etcd-prefix=/a"],
            &[
                ("FLANNELD_ETCD_PREFIX", "/b"),
                ("FLANNELD_IP_MASQ", "true"),
                ("FLANNELD_IFACE", "eth9"),
                ("FLANNELD_HEALTHZ_PORT", ""),
            ],
        );
        assert_eq!(v.str("etcd-prefix"), "/a");
        assert!(v.bool("ip-masq"));
        assert_eq!(v.list("iface"), ["eth9"]);
        assert_eq!(v.uint("healthz-port"), 0);
    }

    #[test]
    fn bad_flags_are_errors_that_name_the_flag() {
        assert_eq!(run(&["-nope"], &[]).unwrap_err().0, "flag provided but not defined: -nope");
        assert_eq!(run(&["--iface"], &[]).unwrap_err().0, "flag needs an argument: -iface");
        assert!(
            run(&["-ip-masq=maybe"], &[]).unwrap_err().0.contains("invalid boolean value \"maybe\" for flag -ip-masq")
        );
        assert!(run(&["-healthz-port=-1"], &[]).unwrap_err().0.contains("expected a whole number"));
        assert!(run(&["stray"], &[]).unwrap_err().0.contains("unexpected argument"));
        assert!(run(&[], &[("FLANNELD_HEALTHZ_PORT", "x")]).unwrap_err().0.contains("FLANNELD_HEALTHZ_PORT"));
        assert_eq!(run(&["-h"], &[]).unwrap(), Parsed::Help);
        assert_eq!(run(&["--version"], &[]).unwrap(), Parsed::Version);
    }
}
