//! A LAN of host namespaces with a real etcd on the bridge, and `weft daemon` processes.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use weft::lab::etcd::Etcd;
use weft::lab::netns::{Lan, Netns};

use super::{wait_for, weft_bin};

/// The etcd prefix flannel uses.
pub const PREFIX: &str = "/coreos.com/network";

/// A daemon process in a host namespace, killed on drop.
pub struct Daemon {
    /// The process.
    pub child: Child,
    log: PathBuf,
}

impl Daemon {
    pub fn start(host: &Netns, dir: &Path, args: &[&str]) -> Daemon {
        Self::start_with_env(host, dir, args, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_with_env(host: &Netns, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let log = dir.join(format!("{}.log", host.name));
        let err = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = host
            .command(weft_bin())
            .arg("daemon")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        wait_for(limit, "the daemon to exit", || self.child.try_wait().unwrap())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A LAN with etcd on its bridge address and `n` hosts.
pub struct Cluster {
    _dir: tempfile::TempDir,
    /// Scratch directory (subnet files, logs).
    pub dir: PathBuf,
    /// The etcd server.
    pub etcd: Etcd,
    /// Host namespaces, `h1` first.
    pub hosts: Vec<Netns>,
    /// The LAN.
    pub lan: Lan,
}

pub fn cluster(tag: &str, n: u8, config: &str) -> Cluster {
    let prefix = super::prefix(tag);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let lan = Lan::new(&prefix, "192.0.2").unwrap();
    let hosts = (1..=n).map(|i| lan.add_host(i).unwrap()).collect();
    let etcd = Etcd::start(Some(&lan.ns), &lan.gateway(), 2379, 2380, &dir.join("etcd"), None).unwrap();
    etcd.etcdctl(&["put", &format!("{PREFIX}/config"), config]).unwrap();
    Cluster { _dir: tmp, dir, etcd, hosts, lan }
}

impl Cluster {
    pub fn env_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("h{}.env", i + 1))
    }

    pub fn daemon(&self, i: usize, extra: &[&str]) -> Daemon {
        self.daemon_with_env(i, extra, &[])
    }

    /// [`Cluster::daemon`] with extra environment variables.
    pub fn daemon_with_env(&self, i: usize, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let endpoints = format!("--etcd-endpoints={}", self.etcd.url());
        let subnet_file = format!("--subnet-file={}", self.env_file(i).display());
        let mut args = vec![endpoints.as_str(), subnet_file.as_str(), "-healthz-port", "8081"];
        args.extend_from_slice(extra);
        Daemon::start_with_env(&self.hosts[i], &self.dir, &args, env)
    }

    pub fn wait_env(&self, i: usize) -> String {
        let p = self.env_file(i);
        wait_for(Duration::from_secs(20), "the subnet file", || std::fs::read_to_string(&p).ok())
    }

    pub fn http(&self, i: usize, path: &str) -> (String, String) {
        let out = self.hosts[i]
            .exec("curl", &["-s", "-m", "2", "-w", "\n%{http_code}", &format!("http://127.0.0.1:8081{path}")])
            .unwrap_or_default();
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), body.to_string())
    }

    pub fn metric(&self, i: usize, name: &str) -> Option<i64> {
        let (_, body) = self.http(i, "/metrics");
        body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
    }
}
