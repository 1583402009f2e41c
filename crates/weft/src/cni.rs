//! The CNI plugin (the binary run with `CNI_COMMAND` set, installed as `flannel` or
//! `weft`): reads `subnet.env`, renders the delegate config, saves it under
//! `<dataDir>/<containerID>` and runs the delegate (`bridge` + `host-local` by default).

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use weft_core::cni::{self, CniError, NetConf, SubnetInfo};

/// The CNI environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_PATH`.
    pub path: String,
}

impl CniEnv {
    /// Reads the `CNI_*` variables.
    pub fn from_env(get: &dyn Fn(&str) -> Option<String>) -> Self {
        let v = |k: &str| get(k).unwrap_or_default();
        CniEnv {
            command: v("CNI_COMMAND"),
            container_id: v("CNI_CONTAINERID"),
            netns: v("CNI_NETNS"),
            ifname: v("CNI_IFNAME"),
            path: v("CNI_PATH"),
        }
    }

    fn require(&self, names: &[(&str, &str)]) -> Result<(), CniError> {
        let missing: Vec<&str> = names.iter().filter(|(_, v)| v.is_empty()).map(|(n, _)| *n).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                4,
                format!(
                    "required environment variables are not set: {}; the container runtime must set them",
                    missing.join(", ")
                ),
            ))
        }
    }
}

/// What the plugin writes to stdout, and whether it succeeded.
pub struct Outcome {
    /// Result or error JSON.
    pub stdout: String,
    /// Exit status.
    pub success: bool,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> CniError {
    CniError::new(5, format!("{what} {}: {e}", path.display()))
}

/// Writes `data` to `dir/name` with mode 0600 (dir 0700), synced, via a temp file and a
/// rename: a crash never leaves a half-written state file.
fn save(dir: &Path, name: &str, data: &[u8]) -> Result<(), CniError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create the data directory", dir, e))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let tmp = dir.join(format!(".{name}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err("cannot save the delegate config in", dir, e)
    })
}

/// Finds plugin `name` on the colon-separated `CNI_PATH`.
fn find_plugin(name: &str, cni_path: &str) -> Result<PathBuf, CniError> {
    if name.contains('/') || name.is_empty() {
        return Err(CniError::new(7, format!("delegate type {name:?} is not a plugin name")));
    }
    cni_path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                7,
                format!("failed to find plugin {name:?} in CNI_PATH {cni_path:?}; install the standard CNI plugins (e.g. the containernetworking-plugins package) there"),
            )
        })
}

/// Runs the delegate with `conf` on stdin and the same environment (with `CNI_COMMAND` set
/// to `command`); returns its stdout.
fn run_delegate(command: &str, conf: &[u8], env: &CniEnv) -> Result<String, CniError> {
    let d: Value = serde_json::from_slice(conf)
        .map_err(|e| CniError::new(6, format!("saved delegate config is not JSON: {e}")))?;
    let name = d.get("type").and_then(Value::as_str).unwrap_or("bridge");
    let plugin = find_plugin(name, &env.path)?;
    let mut child = Command::new(&plugin)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| io_err("cannot run delegate", &plugin, e))?;
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(conf);
    }
    let out = child.wait_with_output().map_err(|e| io_err("cannot run delegate", &plugin, e))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    // Pass the delegate's own CNI error through when it wrote one.
    match serde_json::from_str::<Value>(&stdout) {
        Ok(v) if v.get("code").is_some() => Err(CniError {
            code: v["code"].as_u64().unwrap_or(999) as u32,
            msg: format!("delegate {name} failed: {}", v.get("msg").and_then(Value::as_str).unwrap_or("")),
            details: v.get("details").and_then(Value::as_str).unwrap_or("").to_string(),
        }),
        _ => Err(CniError::new(999, format!("delegate {name} failed ({}): {}", out.status, stdout.trim()))),
    }
}

fn load_subnet(conf: &NetConf) -> Result<SubnetInfo, CniError> {
    let text = std::fs::read_to_string(&conf.subnet_file).map_err(|e| {
        CniError::new(
            11,
            format!("failed to load flannel 'subnet.env' file: open {}: {e}. Check the flannel pod log for this node (is weft daemon / flanneld running?)", conf.subnet_file),
        )
    })?;
    SubnetInfo::from_env(&weft_core::subnet_env::parse(&text), &conf.subnet_file)
}

fn add(conf: &NetConf, env: &CniEnv) -> Result<String, CniError> {
    env.require(&[
        ("CNI_CONTAINERID", &env.container_id),
        ("CNI_NETNS", &env.netns),
        ("CNI_IFNAME", &env.ifname),
        ("CNI_PATH", &env.path),
    ])?;
    let sn = load_subnet(conf)?;
    let delegate = cni::render_delegate(conf, &sn)?;
    let bytes = serde_json::to_vec(&delegate).map_err(|e| CniError::new(5, e.to_string()))?;
    // Saved before the delegate runs, so a DEL can always undo what ADD started.
    save(Path::new(&conf.data_dir), &env.container_id, &bytes)?;
    run_delegate("ADD", &bytes, env)
}

fn saved(conf: &NetConf, env: &CniEnv) -> Result<Option<Vec<u8>>, CniError> {
    let p = Path::new(&conf.data_dir).join(&env.container_id);
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot read", &p, e)),
    }
}

fn del(conf: &NetConf, env: &CniEnv) -> Result<String, CniError> {
    env.require(&[("CNI_CONTAINERID", &env.container_id)])?;
    if env.container_id.contains('/') {
        return Err(CniError::new(4, "CNI_CONTAINERID must not contain '/'"));
    }
    // Nothing saved: nothing to delete (a repeated DEL, or an ADD that never got this far).
    let Some(bytes) = saved(conf, env)? else { return Ok(String::new()) };
    if serde_json::from_slice::<Value>(&bytes).is_err() {
        tracing::warn!(container = %env.container_id, "saved delegate config is unreadable; nothing to undo");
        let _ = std::fs::remove_file(Path::new(&conf.data_dir).join(&env.container_id));
        return Ok(String::new());
    }
    let result = run_delegate("DEL", &bytes, env);
    if result.is_ok() {
        // Unlike flannel, the file stays when the delegate failed, so a retried DEL can finish.
        let _ = std::fs::remove_file(Path::new(&conf.data_dir).join(&env.container_id));
    }
    result.map(|_| String::new())
}

/// The addresses of interface `ifname` inside the network namespace at `netns_path`.
fn addresses_in(netns_path: &str, ifname: &str) -> Result<Option<Vec<String>>, String> {
    let (path, ifname) = (netns_path.to_string(), ifname.to_string());
    // Namespace membership is per thread: enter it on a thread of our own.
    std::thread::spawn(move || -> Result<Option<Vec<String>>, String> {
        let f = std::fs::File::open(&path).map_err(|e| format!("cannot open CNI_NETNS {path}: {e}"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("cannot enter CNI_NETNS {path}: {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(async {
            let h = crate::host::connect().map_err(|e| e.to_string())?;
            let snap = crate::host::snapshot(&h, None).await.map_err(|e| e.to_string())?;
            Ok(snap
                .interfaces
                .into_iter()
                .find(|i| i.name == ifname)
                .map(|i| i.addrs.iter().map(|a| format!("{}/{}", a.ip, a.prefix)).collect()))
        })
    })
    .join()
    .map_err(|_| "checking the namespace failed".to_string())?
}

/// CHECK: our state exists, and the container's interface carries the addresses of
/// `prevResult`. (Delegating to `bridge` would fail on the routes flannel's IPAM config
/// produces, which carry no gateway, with the plugins shipped today.)
fn check(conf: &NetConf, env: &CniEnv) -> Result<String, CniError> {
    if !cni::supports_check(&conf.cni_version) {
        return Err(CniError::new(1, format!("CHECK is not defined for CNI version {}", conf.cni_version)));
    }
    env.require(&[("CNI_CONTAINERID", &env.container_id), ("CNI_NETNS", &env.netns), ("CNI_IFNAME", &env.ifname)])?;
    if saved(conf, env)?.is_none() {
        return Err(CniError::new(
            3,
            format!("no saved state for container {}: it was never added on this node", env.container_id),
        ));
    }
    let Some(prev) = conf.raw.get("prevResult") else {
        return Err(CniError::new(7, "CHECK needs prevResult in the network configuration"));
    };
    let want: Vec<String> = prev
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| ips.iter().filter_map(|ip| ip.get("address")?.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let have = addresses_in(&env.netns, &env.ifname).map_err(|e| CniError::new(5, e))?;
    let Some(have) = have else {
        return Err(CniError::new(100, format!("interface {} is missing in {}", env.ifname, env.netns)));
    };
    for w in want {
        if !have.contains(&w) {
            return Err(CniError::new(100, format!("address {w} is missing on {} in {}", env.ifname, env.netns)));
        }
    }
    Ok(String::new())
}

/// Runs one CNI command; never panics, always answers with JSON on failure.
pub fn run(env: &CniEnv, stdin: &mut dyn Read) -> Outcome {
    let mut input = Vec::new();
    let _ = stdin.read_to_end(&mut input);
    let version_hint = serde_json::from_slice::<Value>(&input)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(String::from))
        .unwrap_or_else(|| "1.1.0".into());
    let result = (|| -> Result<String, CniError> {
        if env.command == "VERSION" {
            return Ok(cni::version_json(&version_hint));
        }
        let conf = cni::parse_netconf(&input)?;
        match env.command.as_str() {
            "ADD" => add(&conf, env),
            "DEL" => del(&conf, env),
            "CHECK" => check(&conf, env),
            // 1.1.0: the plugin is ready when the daemon has written the subnet file.
            "STATUS" => load_subnet(&conf).map(|_| String::new()).map_err(|e| CniError::new(50, e.msg)),
            // 1.1.0: nothing is kept per attachment beyond the saved config, which DEL removes.
            "GC" => Ok(String::new()),
            "" => Err(CniError::new(4, "CNI_COMMAND is empty; set it to ADD, DEL, CHECK, STATUS, GC or VERSION")),
            other => Err(CniError::new(
                4,
                format!("unknown CNI_COMMAND {other:?}; use ADD, DEL, CHECK, STATUS, GC or VERSION"),
            )),
        }
    })();
    match result {
        Ok(stdout) => Outcome { stdout, success: true },
        Err(e) => Outcome { stdout: e.to_json(&version_hint), success: false },
    }
}
