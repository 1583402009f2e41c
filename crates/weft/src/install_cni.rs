//! `weft install-cni`: the init step of the DaemonSet, flannel's two install steps in one
//! command. It installs the CNI plugin binary (weft itself, which acts as the `flannel` CNI
//! plugin) and then the conflist, each atomically (temp file, fsync, rename, fsync of the
//! directory), so the container runtime never sees a half-written plugin or config, and
//! never a config whose plugin is not there yet.

use std::path::{Path, PathBuf};

/// Where to install from and to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    /// The plugin binary to copy (default: this executable).
    pub plugin_src: PathBuf,
    /// Where the plugin goes; `None`: skip.
    pub plugin_dest: Option<PathBuf>,
    /// The CNI conflist to copy (the ConfigMap's `cni-conf.json`).
    pub conf_src: PathBuf,
    /// Where the conflist goes; `None`: skip.
    pub conf_dest: Option<PathBuf>,
}

/// Why an install failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A bad flag.
    #[error("{0}")]
    Usage(String),
    /// The source could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The source is not what it must be.
    #[error("{path}: {msg}")]
    BadSource {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The destination could not be written.
    #[error("cannot install {path}: {source} (is the host directory mounted and writable?)")]
    Write {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Usage of `weft install-cni`.
pub fn usage() -> &'static str {
    "Usage: weft install-cni [--plugin-src PATH] [--plugin-dest PATH] [--conf-src PATH] [--conf-dest PATH]\n\n\
     Installs the CNI plugin binary and then the CNI conflist, each atomically (the DaemonSet's init step).\n\
     \x20 --plugin-src   plugin binary to install (default: this weft executable)\n\
     \x20 --plugin-dest  where to install it (default /opt/cni/bin/flannel; empty: skip)\n\
     \x20 --conf-src     conflist to install (default /etc/kube-flannel/cni-conf.json)\n\
     \x20 --conf-dest    where to install it (default /etc/cni/net.d/10-flannel.conflist; empty: skip)\n"
}

/// Parses the flags (`--name value` or `--name=value`, one or two dashes); `Ok(None)`: help.
pub fn parse(args: &[String]) -> Result<Option<InstallOptions>, InstallError> {
    let mut o = InstallOptions {
        plugin_src: PathBuf::from("/proc/self/exe"),
        plugin_dest: Some(PathBuf::from("/opt/cni/bin/flannel")),
        conf_src: PathBuf::from("/etc/kube-flannel/cni-conf.json"),
        conf_dest: Some(PathBuf::from("/etc/cni/net.d/10-flannel.conflist")),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(flag) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
            return Err(InstallError::Usage(format!("unexpected argument {a:?}")));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        if matches!(name, "h" | "help") {
            return Ok(None);
        }
        if !matches!(name, "plugin-src" | "plugin-dest" | "conf-src" | "conf-dest") {
            return Err(InstallError::Usage(format!("unknown flag --{name}")));
        }
        let value = match inline {
            Some(v) => v,
            None => it.next().cloned().ok_or_else(|| InstallError::Usage(format!("--{name} needs a value")))?,
        };
        let path = PathBuf::from(&value);
        if !value.is_empty() && !path.is_absolute() {
            return Err(InstallError::Usage(format!("--{name} {value:?}: use an absolute path")));
        }
        if value.contains('\0') || value.ends_with('/') {
            return Err(InstallError::Usage(format!("--{name} {value:?}: not a file path")));
        }
        let dest = (!value.is_empty()).then_some(path.clone());
        match name {
            "plugin-src" if dest.is_some() => o.plugin_src = path,
            "conf-src" if dest.is_some() => o.conf_src = path,
            "plugin-dest" => o.plugin_dest = dest,
            "conf-dest" => o.conf_dest = dest,
            _ => return Err(InstallError::Usage(format!("--{name} must not be empty"))),
        }
    }
    Ok(Some(o))
}

/// The largest conflist accepted.
const MAX_CONF: u64 = 1024 * 1024;

fn read_regular(path: &Path, max: Option<u64>) -> Result<Vec<u8>, InstallError> {
    let meta = std::fs::metadata(path).map_err(|source| InstallError::Read { path: path.into(), source })?;
    if !meta.is_file() {
        return Err(InstallError::BadSource { path: path.into(), msg: "not a regular file".into() });
    }
    if let Some(max) = max
        && meta.len() > max
    {
        return Err(InstallError::BadSource { path: path.into(), msg: format!("larger than {max} bytes") });
    }
    std::fs::read(path).map_err(|source| InstallError::Read { path: path.into(), source })
}

/// Checks that `data` is a CNI network configuration list (or a single configuration).
fn check_conf(path: &Path, data: &[u8]) -> Result<(), InstallError> {
    let bad = |msg: String| InstallError::BadSource { path: path.into(), msg };
    let v: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| bad(format!("not JSON ({e}); fix cni-conf.json in the ConfigMap")))?;
    let obj = v.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
    match (obj.get("plugins"), obj.get("type")) {
        (Some(serde_json::Value::Array(p)), _) if !p.is_empty() => {
            if let Some(i) = p.iter().position(|p| p.get("type").and_then(|t| t.as_str()).is_none_or(str::is_empty)) {
                return Err(bad(format!("plugins[{i}] has no \"type\"")));
            }
            Ok(())
        }
        (Some(_), _) => Err(bad("\"plugins\" must be a non-empty list".into())),
        (None, Some(serde_json::Value::String(t))) if !t.is_empty() => Ok(()),
        _ => Err(bad("neither a conflist (\"plugins\") nor a CNI config (\"type\")".into())),
    }
}

/// What an install did with one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Written.
    Installed,
    /// Already identical: left alone.
    Unchanged,
    /// Not asked for.
    Skipped,
}

fn install(dest: &Path, data: &[u8], mode: u32) -> Result<Step, InstallError> {
    use std::os::unix::fs::PermissionsExt;
    // An identical regular file with the right mode stays (no needless rename under a runtime).
    if let Ok(m) = std::fs::symlink_metadata(dest)
        && m.is_file()
        && m.permissions().mode() & 0o7777 == mode
        && std::fs::read(dest).is_ok_and(|d| d == data)
    {
        return Ok(Step::Unchanged);
    }
    if std::fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) {
        return Err(InstallError::Write { path: dest.into(), source: std::io::Error::other("it is a directory") });
    }
    crate::fsutil::write_atomic(dest, data, mode, 0o755)
        .map_err(|source| InstallError::Write { path: dest.into(), source })?;
    Ok(Step::Installed)
}

/// Installs the plugin, then the conflist; both sources are checked before anything is
/// written, so a bad ConfigMap installs nothing.
pub fn run(o: &InstallOptions) -> Result<(Step, Step), InstallError> {
    let plugin = match &o.plugin_dest {
        Some(_) => Some(read_regular(&o.plugin_src, None)?),
        None => None,
    };
    let conf = match &o.conf_dest {
        Some(_) => {
            let c = read_regular(&o.conf_src, Some(MAX_CONF))?;
            check_conf(&o.conf_src, &c)?;
            Some(c)
        }
        None => None,
    };
    if let Some(p) = &plugin
        && p.is_empty()
    {
        return Err(InstallError::BadSource { path: o.plugin_src.clone(), msg: "empty file".into() });
    }
    let a = match (&o.plugin_dest, &plugin) {
        (Some(d), Some(p)) => install(d, p, 0o755)?,
        _ => Step::Skipped,
    };
    let b = match (&o.conf_dest, &conf) {
        (Some(d), Some(c)) => install(d, c, 0o644)?,
        _ => Step::Skipped,
    };
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Option<InstallOptions>, InstallError> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_have_flannels_defaults_and_bad_ones_are_refused() {
        let o = p(&[]).unwrap().unwrap();
        assert_eq!(o.plugin_dest.as_deref(), Some(Path::new("/opt/cni/bin/flannel")));
        assert_eq!(o.conf_dest.as_deref(), Some(Path::new("/etc/cni/net.d/10-flannel.conflist")));
        let o = p(&["--plugin-dest=", "-conf-src", "/x/c.json"]).unwrap().unwrap();
        assert_eq!((o.plugin_dest, o.conf_src), (None, PathBuf::from("/x/c.json")));
        for bad in [
            &["--conf-dest", "relative/x"][..],
            &["--nope=1"],
            &["stray"],
            &["--conf-src"],
            &["--plugin-src="],
            &["--conf-dest=/etc/cni/"],
        ] {
            assert!(matches!(p(bad), Err(InstallError::Usage(_))), "{bad:?}");
        }
        assert!(p(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn conflists_are_checked() {
        let ok = br#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel"},{"type":"portmap"}]}"#;
        assert!(check_conf(Path::new("c"), ok).is_ok());
        assert!(check_conf(Path::new("c"), br#"{"type":"flannel"}"#).is_ok());
        for bad in [&b"nope"[..], b"[]", br#"{"plugins":[]}"#, br#"{"plugins":[{"x":1}]}"#, br#"{"name":"x"}"#] {
            assert!(check_conf(Path::new("c"), bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
