//! The CNI plugin (the binary run with `CNI_COMMAND` set, installed as `flannel` or
//! `weft`): reads `subnet.env`, renders the delegate config, saves it under
//! `<dataDir>/<containerID>` and runs the delegate (`bridge` + `host-local` by default).
//!
//! Versions: the delegate is asked which CNI versions it supports and is handed the highest
//! one not newer than the config's with the same result format (a 1.1.0 config runs
//! today's `bridge` at 1.0.0); its result is converted back to the config's version. A
//! config no version of the delegate can serve fails with code 1 before anything is saved.
//!
//! DEL never leaks and is idempotent. When the delegate's DEL fails, the failure is sorted:
//! - **permanent** (retrying cannot help; the saved state is removed, what can be released
//!   has been, and DEL succeeds): the delegate binary is missing from `CNI_PATH`; no
//!   delegate version can serve the saved config (code 1); the delegate rejects the saved
//!   config or environment (codes 2, 3, 4, 6, 7); the saved config is unreadable. A
//!   network namespace that is gone is not a failure: the delegate is run without
//!   `CNI_NETNS` so the IPAM release still happens; IPAM state that is already gone makes
//!   `host-local`'s DEL succeed anyway.
//! - **transient** (the saved state is kept for the runtime's retry, DEL fails): the
//!   delegate could not be started or was killed, an I/O error (code 5), "try again later"
//!   (code 11), and any other delegate error (e.g. 999, an iptables lock held).
//!
//! A DEL for a container never seen succeeds; a failed ADD runs the delegate's DEL and
//! removes the saved state, so it leaves nothing behind.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
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

/// Writes `data` to `dir/name` with mode 0600 (a missing dir is created 0700; an existing
/// one keeps its mode) via [`crate::fsutil::write_atomic`].
fn save(dir: &Path, name: &str, data: &[u8]) -> Result<(), CniError> {
    crate::fsutil::write_atomic(&dir.join(name), data, 0o600, 0o700)
        .map_err(|e| io_err("cannot save the delegate config in", dir, e))
}

/// The side file that remembers an attachment's interface name, for GC (host-local
/// releases by container ID and interface). A leading dot: never a container ID.
fn ifname_file(conf: &NetConf, id: &str) -> PathBuf {
    Path::new(&conf.data_dir).join(format!(".{id}.ifname"))
}

/// Removes the saved state of container `id`.
fn forget(conf: &NetConf, id: &str) {
    let _ = std::fs::remove_file(Path::new(&conf.data_dir).join(id));
    let _ = std::fs::remove_file(ifname_file(conf, id));
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

/// Runs the delegate with `conf` on stdin and the `CNI_*` variables of `env` (with
/// `CNI_COMMAND` set to `command`; an empty `CNI_NETNS` is left unset); returns its stdout.
fn run_delegate(command: &str, conf: &[u8], env: &CniEnv) -> Result<String, CniError> {
    let d: Value = serde_json::from_slice(conf)
        .map_err(|e| CniError::new(6, format!("saved delegate config is not JSON: {e}")))?;
    let name = delegate_type(&d);
    let plugin = find_plugin(&name, &env.path)?;
    let mut cmd = Command::new(&plugin);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_IFNAME", &env.ifname)
        .env("CNI_PATH", &env.path);
    if env.netns.is_empty() {
        cmd.env_remove("CNI_NETNS");
    } else {
        cmd.env("CNI_NETNS", &env.netns);
    }
    let mut child = cmd
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

/// The delegate's plugin name (`bridge` when unset).
fn delegate_type(d: &Value) -> String {
    d.get("type").and_then(Value::as_str).unwrap_or("bridge").to_string()
}

/// Sets the delegate config's `cniVersion` to one the delegate supports (see
/// [`cni::delegate_version`]); a config without `cniVersion` is left as it is. A delegate
/// that does not answer VERSION is handed the config's version unchanged.
fn negotiate(d: &mut Value, env: &CniEnv) -> Result<(), CniError> {
    let Some(want) = d.get("cniVersion").and_then(Value::as_str).map(String::from) else { return Ok(()) };
    let name = delegate_type(d);
    let plugin = find_plugin(&name, &env.path)?;
    let answer = Command::new(&plugin)
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            if let Some(mut pipe) = c.stdin.take() {
                let _ = pipe.write_all(json!({"cniVersion": want}).to_string().as_bytes());
            }
            c.wait_with_output()
        });
    let supported = match answer {
        Ok(o) if o.status.success() => cni::parse_supported_versions(&String::from_utf8_lossy(&o.stdout)),
        _ => None,
    };
    let Some(supported) = supported else {
        tracing::warn!(delegate = %name, "the delegate does not answer VERSION; handing it the config's version");
        return Ok(());
    };
    let chosen = cni::delegate_version(&want, &name, &supported)?;
    d["cniVersion"] = Value::from(chosen);
    Ok(())
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
    cni::validate_container_id(&env.container_id)?;
    let sn = load_subnet(conf)?;
    let mut delegate = cni::render_delegate(conf, &sn)?;
    // Before anything is saved: a version the chain cannot honour fails here.
    negotiate(&mut delegate, env)?;
    let bytes = serde_json::to_vec(&delegate).map_err(|e| CniError::new(5, e.to_string()))?;
    // Saved before the delegate runs, so a DEL can always undo what ADD started.
    save(Path::new(&conf.data_dir), &env.container_id, &bytes)?;
    let _ = crate::fsutil::write_atomic(&ifname_file(conf, &env.container_id), env.ifname.as_bytes(), 0o600, 0o700);
    let out = match run_delegate("ADD", &bytes, env) {
        Ok(out) => out,
        Err(e) => {
            // A failed ADD leaves nothing behind: undo what the delegate may have done.
            if let Err(del) = run_delegate("DEL", &bytes, env) {
                tracing::warn!(container = %env.container_id, error = %del, "DEL after a failed ADD failed");
            }
            forget(conf, &env.container_id);
            return Err(e);
        }
    };
    if delegate.get("cniVersion").and_then(Value::as_str) == Some(conf.cni_version.as_str()) {
        return Ok(out);
    }
    cni::convert_result(&out, &conf.cni_version)
}

fn saved(conf: &NetConf, id: &str) -> Result<Option<Vec<u8>>, CniError> {
    let p = Path::new(&conf.data_dir).join(id);
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot read", &p, e)),
    }
}

/// Whether a failed delegate DEL can never succeed on retry (see the module docs).
fn permanent(e: &CniError) -> bool {
    matches!(e.code, 1 | 2 | 3 | 4 | 6 | 7)
}

fn del(conf: &NetConf, env: &CniEnv) -> Result<String, CniError> {
    env.require(&[("CNI_CONTAINERID", &env.container_id)])?;
    cni::validate_container_id(&env.container_id)?;
    release(conf, env).map(|_| String::new())
}

/// Undoes the attachment of `env.container_id` with its saved delegate config and removes
/// the saved state, unless the failure is transient.
fn release(conf: &NetConf, env: &CniEnv) -> Result<(), CniError> {
    let id = &env.container_id;
    // Nothing saved: nothing to delete (a repeated DEL, or an ADD that never got this far).
    let Some(bytes) = saved(conf, id)? else {
        forget(conf, id);
        return Ok(());
    };
    let Ok(mut d) = serde_json::from_slice::<Value>(&bytes) else {
        tracing::warn!(container = %id, "saved delegate config is unreadable; nothing to undo");
        forget(conf, id);
        return Ok(());
    };
    let mut env = env.clone();
    // The namespace is gone (the container died): the delegate still releases the IPs.
    if !env.netns.is_empty() && !Path::new(&env.netns).exists() {
        env.netns.clear();
    }
    let result = negotiate(&mut d, &env).and_then(|_| {
        let bytes = serde_json::to_vec(&d).map_err(|e| CniError::new(5, e.to_string()))?;
        run_delegate("DEL", &bytes, &env)
    });
    match result {
        Ok(_) => {
            forget(conf, id);
            Ok(())
        }
        Err(e) if permanent(&e) => {
            tracing::warn!(container = %id, error = %e, "the delegate's DEL cannot succeed; removing the saved state");
            forget(conf, id);
            Ok(())
        }
        // Transient: kept, so the runtime's retried DEL can finish.
        Err(e) => Err(e),
    }
}

/// GC (CNI 1.1): releases every attachment saved in `dataDir` whose container ID is not in
/// `cni.dev/valid-attachments` (state is kept per container ID, as flannel keeps it, so an
/// ID listed with any interface is kept).
fn gc(conf: &NetConf, env: &CniEnv) -> Result<String, CniError> {
    env.require(&[("CNI_PATH", &env.path)])?;
    let valid = cni::valid_attachments(conf)?;
    let dir = Path::new(&conf.data_dir);
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(io_err("cannot list", dir, e)),
    };
    crate::fsutil::remove_all_stale_temps(dir);
    let mut first_err = None;
    for e in entries.flatten() {
        let Some(id) = e.file_name().to_str().map(String::from) else { continue };
        // Dot files (temp files, interface names) are never container IDs.
        if cni::validate_container_id(&id).is_err() || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        if valid.iter().any(|(c, _)| *c == id) {
            continue;
        }
        let ifname = std::fs::read_to_string(ifname_file(conf, &id))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "eth0".into());
        let genv = CniEnv {
            command: "DEL".into(),
            container_id: id.clone(),
            netns: String::new(),
            ifname,
            path: env.path.clone(),
        };
        tracing::info!(container = %id, "GC: releasing an attachment the runtime no longer has");
        if let Err(err) = release(conf, &genv) {
            first_err.get_or_insert(err);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(String::new()),
    }
}

/// Reads what CHECK needs (links, addresses, main-table routes) over netlink in the
/// network namespace at `netns_path`, or in ours when `None`.
fn ns_view(netns_path: Option<&str>) -> Result<cni::NsView, String> {
    // The view is read on a runtime of its own, so on a thread of its own either way.
    let work = || -> Result<cni::NsView, String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(read_view())
    };
    let Some(path) = netns_path else {
        return std::thread::spawn(work).join().map_err(|_| "checking the namespace failed".to_string())?;
    };
    crate::nsenter::run_in(std::path::Path::new(path), work).map_err(|e| match e {
        crate::nsenter::NsError::Open { source, .. } => format!("cannot open CNI_NETNS {path}: {source}"),
        crate::nsenter::NsError::Enter { source, .. } => format!("cannot enter CNI_NETNS {path}: {source}"),
        other => format!("checking the namespace failed: {other}"),
    })?
}

async fn read_view() -> Result<cni::NsView, String> {
    use futures::TryStreamExt;
    use netlink_packet_route::address::AddressAttribute;
    use netlink_packet_route::link::{LinkAttribute, LinkFlags};
    use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
    use rtnetlink::RouteMessageBuilder;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    let h = crate::host::connect().map_err(|e| e.to_string())?;
    let links: Vec<_> = h.link().get().execute().try_collect().await.map_err(|e| format!("reading links: {e}"))?;
    let addrs: Vec<_> =
        h.address().get().execute().try_collect().await.map_err(|e| format!("reading addresses: {e}"))?;
    let mut view = cni::NsView::default();
    for l in &links {
        let mut lv =
            cni::LinkView { index: l.header.index, up: l.header.flags.contains(LinkFlags::Up), ..Default::default() };
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => lv.name = n.clone(),
                LinkAttribute::Controller(m) => lv.master = Some(*m),
                LinkAttribute::Link(p) => lv.peer = Some(*p),
                _ => {}
            }
        }
        view.links.push(lv);
    }
    for a in &addrs {
        let ip = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let ip = ip.or_else(|| {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        let (Some(ip), Some(l)) = (ip, view.links.iter_mut().find(|l| l.index == a.header.index)) else { continue };
        if let Ok(n) = ipnet::IpNet::new(ip, a.header.prefix_len) {
            l.addrs.push(n);
        }
    }
    let to_ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    };
    for (msg, unspecified) in [
        (RouteMessageBuilder::<Ipv4Addr>::new().build(), IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        (RouteMessageBuilder::<Ipv6Addr>::new().build(), IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    ] {
        let routes: Vec<RouteMessage> =
            h.route().get(msg).execute().try_collect().await.map_err(|e| format!("reading routes: {e}"))?;
        for r in routes.iter().filter(|r| r.header.table == 254) {
            let mut dst = unspecified;
            let mut gw = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = to_ip(d).unwrap_or(dst),
                    RouteAttribute::Gateway(g) => gw = to_ip(g),
                    _ => {}
                }
            }
            if let Ok(n) = ipnet::IpNet::new(dst, r.header.destination_prefix_length) {
                view.routes.push((n, gw));
            }
        }
    }
    Ok(view)
}

/// CHECK: our state exists; the container interface carries the addresses and routes of
/// `prevResult`; with a `bridge` delegate, the host-side veth is present, up and attached to
/// the bridge, and the bridge is up with the gateway address. (Delegating to `bridge` would
/// fail on the routes flannel's IPAM config produces, which carry no gateway, with the
/// plugins shipped today.)
fn check(conf: &NetConf, env: &CniEnv) -> Result<String, CniError> {
    if !cni::supports_check(&conf.cni_version) {
        return Err(CniError::new(1, format!("CHECK is not defined for CNI version {}", conf.cni_version)));
    }
    env.require(&[("CNI_CONTAINERID", &env.container_id), ("CNI_NETNS", &env.netns), ("CNI_IFNAME", &env.ifname)])?;
    cni::validate_container_id(&env.container_id)?;
    let Some(bytes) = saved(conf, &env.container_id)? else {
        return Err(CniError::new(
            3,
            format!("no saved state for container {}: it was never added on this node", env.container_id),
        ));
    };
    let Some(prev) = conf.raw.get("prevResult") else {
        return Err(CniError::new(7, "CHECK needs prevResult in the network configuration"));
    };
    let delegate: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let container = ns_view(Some(&env.netns)).map_err(|e| CniError::new(5, e))?;
    let host = if delegate_type(&delegate) == "bridge" {
        let bridge = delegate.get("bridge").and_then(Value::as_str).unwrap_or("cni0").to_string();
        Some((ns_view(None).map_err(|e| CniError::new(5, e))?, bridge))
    } else {
        None
    };
    cni::check_attachment(prev, &env.ifname, &container, host.as_ref().map(|(v, b)| (v, b.as_str())))?;
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
            "GC" => gc(&conf, env),
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
