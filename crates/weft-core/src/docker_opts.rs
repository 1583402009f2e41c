//! `weft docker-opts`: flannel's `mk-docker-opts.sh`, which turns `subnet.env` into Docker
//! daemon options (a systemd `EnvironmentFile` for dockerd), with the same flags and
//! byte-identical output. The script's `-m` (documented, but rejected by its `getopts`
//! string) is honoured here.

use std::collections::BTreeMap;

/// The script's defaults.
pub const DEFAULT_FLANNEL_ENV: &str = "/run/flannel/subnet.env";
/// Where the Docker options go by default.
pub const DEFAULT_DOCKER_ENV: &str = "/run/docker_opts.env";
/// The combined variable's default name.
pub const DEFAULT_KEY: &str = "DOCKER_OPTS";

/// What the flags ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `-f`: the flannel env file to read.
    pub flannel_env: String,
    /// `-d`: the Docker env file to write.
    pub docker_env: String,
    /// `-i`: one variable per option (`DOCKER_OPT_*`).
    pub individual: bool,
    /// `-c`: the combined variable.
    pub combined: bool,
    /// Not `-m`: output `--ip-masq=false` when flannel masquerades.
    pub ip_masq: bool,
    /// `-k`: the combined variable's name.
    pub key: String,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Write the options.
    Run(Options),
    /// `--help`: usage on stdout, success.
    Help,
}

/// A command line the script would reject (it prints usage and exits 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The script's usage text (`prog` stands for its `$0`).
pub fn usage(prog: &str) -> String {
    format!(
        "{prog} [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate Docker daemon options based on flannel env file
OPTIONS:
\t-f\tPath to flannel env file. Defaults to {DEFAULT_FLANNEL_ENV}
\t-d\tPath to Docker env file to write to. Defaults to {DEFAULT_DOCKER_ENV}
\t-i\tOutput each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500
\t-c\tOutput combined Docker options into DOCKER_OPTS var
\t-k\tSet the combined options key to this value (default DOCKER_OPTS=)
\t-m\tDo not output --ip-masq (useful for older Docker version)
"
    )
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Parses the arguments as bash's `getopts "f:d:icmk:"` does: clustered flags (`-ic`),
/// option values attached (`-fFILE`) or separate (`-f FILE`), `--` or the first
/// non-option argument ends the options. `-i` and `-c` both absent means both.
pub fn parse(args: &[String]) -> Result<Request, UsageError> {
    let mut o = Options {
        flannel_env: DEFAULT_FLANNEL_ENV.into(),
        docker_env: DEFAULT_DOCKER_ENV.into(),
        individual: false,
        combined: false,
        ip_masq: true,
        key: DEFAULT_KEY.into(),
    };
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--help" {
            return Ok(Request::Help);
        }
        if a == "--" {
            break;
        }
        let Some(cluster) = a.strip_prefix('-').filter(|c| !c.is_empty()) else { break };
        for (pos, c) in cluster.char_indices() {
            match c {
                'i' => o.individual = true,
                'c' => o.combined = true,
                'm' => o.ip_masq = false,
                'f' | 'd' | 'k' => {
                    let rest = &cluster[pos + 1..];
                    let value = if !rest.is_empty() {
                        rest.to_string()
                    } else {
                        i += 1;
                        args.get(i).cloned().ok_or_else(|| UsageError(format!("option requires an argument -- {c}")))?
                    };
                    match c {
                        'f' => o.flannel_env = value,
                        'd' => o.docker_env = value,
                        _ => {
                            if !is_name(&value) {
                                return Err(UsageError(format!(
                                    "invalid -k {value:?}: the combined key must be a shell variable name (letters, digits, _)"
                                )));
                            }
                            o.key = value
                        }
                    }
                    break;
                }
                'h' => return Ok(Request::Help),
                other => return Err(UsageError(format!("illegal option -- {other}"))),
            }
        }
        i += 1;
    }
    if !o.individual && !o.combined {
        o.individual = true;
        o.combined = true;
    }
    Ok(Request::Run(o))
}

/// The assignments of an env file as bash's `source` of a flannel `subnet.env` sees them:
/// `NAME=value` lines (optionally `export`ed, the value optionally in matching quotes);
/// comments, blank lines and anything else are skipped.
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let line = line.strip_prefix("export ").map(str::trim_start).unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else { continue };
        if !is_name(name) {
            continue;
        }
        let v = value.trim_end();
        let v = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(a, b)| v.strip_prefix(*a).and_then(|x| x.strip_suffix(*b)))
            .unwrap_or(v);
        out.push((name.to_string(), v.to_string()));
    }
    out
}

/// The Docker env file's text. `vars` are the shell's variables after sourcing the flannel
/// env file: the process environment overlaid with the file's assignments. As the script
/// does, every variable named `DOCKER_OPT_*` (computed or inherited) is output, in byte
/// order of the names; the combined value starts with the current value of the key.
pub fn render(o: &Options, vars: &BTreeMap<String, String>) -> String {
    let mut vars = vars.clone();
    let get = |vars: &BTreeMap<String, String>, k: &str| vars.get(k).cloned().unwrap_or_default();
    let subnet = get(&vars, "FLANNEL_SUBNET");
    if !subnet.is_empty() {
        vars.insert("DOCKER_OPT_BIP".into(), format!("--bip={subnet}"));
    }
    let mtu = get(&vars, "FLANNEL_MTU");
    if !mtu.is_empty() {
        vars.insert("DOCKER_OPT_MTU".into(), format!("--mtu={mtu}"));
    }
    if get(&vars, "FLANNEL_IPMASQ") == "true" && o.ip_masq {
        vars.insert("DOCKER_OPT_IPMASQ".into(), "--ip-masq=false".into());
    }
    let mut combined = get(&vars, &o.key);
    combined.push(' ');
    let mut out = String::new();
    for (name, val) in vars.range("DOCKER_OPT_".to_string()..).take_while(|(k, _)| k.starts_with("DOCKER_OPT_")) {
        if o.individual {
            out.push_str(&format!("{name}=\"{val}\"\n"));
        }
        combined.push_str(val);
        combined.push(' ');
    }
    if o.combined {
        out.push_str(&format!("{}=\"{combined}\"\n", o.key));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> Options {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match parse(&args).unwrap() {
            Request::Run(o) => o,
            Request::Help => panic!("help"),
        }
    }

    fn vars(file: &str) -> BTreeMap<String, String> {
        parse_env_file(file).into_iter().collect()
    }

    const VECTOR: &str =
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.15.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn flannel_vector_no_flags() {
        assert_eq!(
            render(&opts(&[]), &vars(VECTOR)),
            "DOCKER_OPT_BIP=\"--bip=10.1.15.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=10.1.15.1/24 --ip-masq=false --mtu=1472 \"\n"
        );
    }

    #[test]
    fn flannel_vector_combined_with_key() {
        assert_eq!(
            render(&opts(&["-c", "-k", "DOCKER_NETWORK_OPTIONS"]), &vars(VECTOR)),
            "DOCKER_NETWORK_OPTIONS=\" --bip=10.1.15.1/24 --ip-masq=false --mtu=1472 \"\n"
        );
        // getopts forms: clustered, value attached.
        assert_eq!(opts(&["-ckDOCKER_NETWORK_OPTIONS"]), opts(&["-c", "-k", "DOCKER_NETWORK_OPTIONS"]));
    }

    #[test]
    fn flannel_vector_no_masq_individual() {
        let v = vars(&VECTOR.replace("IPMASQ=true", "IPMASQ=false"));
        assert_eq!(
            render(&opts(&["-i"]), &v),
            "DOCKER_OPT_BIP=\"--bip=10.1.15.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n"
        );
    }

    #[test]
    fn m_drops_ip_masq() {
        assert_eq!(
            render(&opts(&["-m"]), &vars(VECTOR)),
            "DOCKER_OPT_BIP=\"--bip=10.1.15.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=10.1.15.1/24 --mtu=1472 \"\n"
        );
    }

    #[test]
    fn missing_file_gives_only_the_key_with_a_space() {
        assert_eq!(render(&opts(&[]), &BTreeMap::new()), "DOCKER_OPTS=\" \"\n");
        assert_eq!(render(&opts(&["-i"]), &BTreeMap::new()), "");
    }

    #[test]
    fn key_value_and_inherited_options_are_kept() {
        let mut v = vars(VECTOR);
        v.insert("DOCKER_OPTS".into(), "--debug".into());
        v.insert("DOCKER_OPT_AAA".into(), "--x".into());
        assert_eq!(
            render(&opts(&[]), &v),
            "DOCKER_OPT_AAA=\"--x\"\nDOCKER_OPT_BIP=\"--bip=10.1.15.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug --x --bip=10.1.15.1/24 --ip-masq=false --mtu=1472 \"\n"
        );
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        let p = |a: &[&str]| parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(p(&["-x"]).unwrap_err().0, "illegal option -- x");
        assert_eq!(p(&["-f"]).unwrap_err().0, "option requires an argument -- f");
        assert!(p(&["-k", "A B"]).unwrap_err().0.contains("shell variable name"));
        assert_eq!(p(&["--help"]).unwrap(), Request::Help);
        // The first non-option argument ends the options, as in getopts.
        assert!(opts(&["stray", "-x"]).individual);
        let o = opts(&["-f", "/a", "-d/b", "-i"]);
        assert_eq!(
            (o.flannel_env.as_str(), o.docker_env.as_str(), o.individual, o.combined),
            ("/a", "/b", true, false)
        );
    }

    #[test]
    fn env_file_quotes_and_exports() {
        let v =
            parse_env_file("# c\nexport FLANNEL_MTU=\"1450\"\nFLANNEL_SUBNET='10.0.0.1/24'\nnot an assignment\n1X=2\n");
        assert_eq!(v, [("FLANNEL_MTU".into(), "1450".into()), ("FLANNEL_SUBNET".into(), "10.0.0.1/24".into())]);
    }
}
