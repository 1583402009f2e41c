//! A real etcd server for the lab and the tests, started from Debian's `etcd` binary.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::netns::Netns;

/// TLS files for a server (and the client certificate tests use).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate.
    pub ca: PathBuf,
    /// Server certificate.
    pub cert: PathBuf,
    /// Server key.
    pub key: PathBuf,
}

/// A running etcd; killed on drop.
pub struct Etcd {
    child: Option<Child>,
    ns: Option<String>,
    data_dir: PathBuf,
    ip: String,
    tls: Option<TlsFiles>,
    /// Client port.
    pub port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts etcd listening on `ip:port` (peer traffic on loopback `peer_port`), inside `ns`
    /// when given, and waits until it answers.
    pub fn start(
        ns: Option<&Netns>,
        ip: &str,
        port: u16,
        peer_port: u16,
        data_dir: &Path,
        tls: Option<TlsFiles>,
    ) -> io::Result<Etcd> {
        let mut e = Etcd {
            child: None,
            ns: ns.map(|n| n.name.clone()),
            data_dir: data_dir.to_path_buf(),
            ip: ip.to_string(),
            tls,
            port,
            peer_port,
        };
        e.spawn()?;
        Ok(e)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("{}://{}:{}", self.scheme(), self.ip, self.port)
    }

    fn command(&self, program: &str) -> Command {
        match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    fn spawn(&mut self) -> io::Result<()> {
        let url = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut c = self.command("etcd");
        c.args(["--name", "lab", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("lab={peer}")])
            .args(["--log-level", "error", "--logger", "zap"])
            .stdin(Stdio::null())
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(t) = &self.tls {
            c.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        self.child = Some(
            c.spawn().map_err(|e| io::Error::other(format!("cannot start etcd (is etcd-server installed?): {e}")))?,
        );
        self.wait_healthy(Duration::from_secs(20))
    }

    /// etcdctl against this server, with the TLS client files when TLS is on.
    pub fn etcdctl(&self, args: &[&str]) -> io::Result<String> {
        let mut c = self.command("etcdctl");
        c.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", self.url()));
        if let Some(t) = &self.tls {
            c.arg("--cacert").arg(&t.ca).arg("--cert").arg(&t.cert).arg("--key").arg(&t.key);
        }
        super::netns::run(c.args(args))
    }

    fn wait_healthy(&mut self, limit: Duration) -> io::Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(io::Error::other(format!("etcd exited at startup: {status}")));
            }
            if self.etcdctl(&["endpoint", "health", "--command-timeout=1s"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(io::Error::other("etcd did not become healthy in time"))
    }

    /// Leaves the server running after this value is gone; returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }

    /// Kills the server (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the killed server again with the same data, on client port `port`.
    pub fn restart_on(&mut self, port: u16) -> io::Result<()> {
        self.kill();
        self.port = port;
        self.spawn()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(23790)
}
