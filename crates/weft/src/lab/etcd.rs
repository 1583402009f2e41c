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
        // In a namespace of its own, loopback is private to this server; in the machine's
        // namespace it is shared, so peer traffic stays on the server's own address (a
        // caller that gives each server its own loopback address gets ports nobody else uses).
        let peer_ip = if self.ns.is_some() { "127.0.0.1" } else { self.ip.as_str() };
        let peer = format!("http://{peer_ip}:{}", self.peer_port);
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

    /// The id of the etcd lease `key` is attached to (0: none), as `etcdctl get -w fields`
    /// reports it.
    pub fn lease_of(&self, key: &str) -> io::Result<i64> {
        let fields = self.etcdctl(&["get", key, "-w", "fields"])?;
        fields
            .lines()
            .find(|l| l.starts_with("\"Lease\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no lease field for {key} in: {fields}")))
    }

    fn wait_healthy(&mut self, limit: Duration) -> io::Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(io::Error::other(format!("etcd exited at startup: {status}")));
            }
            if self.etcdctl(&["endpoint", "health", "--command-timeout=1s"]).is_ok() {
                // Healthy, and it is ours: a server that failed to bind exits, and the answer
                // would have come from whoever holds the address.
                if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                    return Err(io::Error::other(format!("etcd exited at startup: {status}")));
                }
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

/// The client-side TLS files of a cluster whose members each have their own certificate.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// The CA that signed every member's and the client's certificate.
    pub ca: PathBuf,
    /// A client certificate (for daemons and etcdctl).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// A multi-member etcd cluster for the lab and the tests. Member `i` (0-based, named
/// `m<i+1>`) runs in namespace `<prefix>e<i+1>` with two links: `eth0` on the lab LAN
/// (`<net>.<201+i>`, the client URL) and `peer0` on a separate peer network (a bridge in
/// namespace `<prefix>peer`, `198.18.0.<11+i>`), which carries raft traffic only. So a member
/// can be cut off from its peers ([`EtcdCluster::partition`]) while clients still reach it,
/// or killed ([`EtcdCluster::kill`]) and restarted ([`EtcdCluster::restart`]) with its data.
///
/// Every function works from the layout alone (namespace names, addresses, data directory),
/// so `weft lab chaos` can drive a cluster that an earlier `weft lab up` started
/// ([`EtcdCluster::attach`]).
#[derive(Debug)]
pub struct EtcdCluster {
    prefix: String,
    lan_ns: String,
    net: String,
    dir: PathBuf,
    members: usize,
    tls: Option<ClusterTls>,
    /// Namespaces this value created (deleted on drop, with their processes, unless persisted).
    owned: Vec<Netns>,
}

/// The peer network's first three octets (a benchmarking range, never routed).
const PEER_NET: &str = "198.18.0";

impl EtcdCluster {
    /// Creates the namespaces and links of `members` members plugged into the LAN bridge of
    /// namespace `lan_ns` (addresses on `<net>.0/24`), with per-member certificates when `tls`,
    /// starts every member and waits until the cluster answers through each of them.
    pub fn create(
        prefix: &str,
        lan_ns: &Netns,
        net: &str,
        members: usize,
        dir: &Path,
        tls: bool,
    ) -> io::Result<EtcdCluster> {
        if members == 0 || members > 9 {
            return Err(io::Error::other(format!("an etcd cluster has 1 to 9 members, not {members}")));
        }
        std::fs::create_dir_all(dir)?;
        let mut c = EtcdCluster {
            prefix: prefix.to_string(),
            lan_ns: lan_ns.name.clone(),
            net: net.to_string(),
            dir: dir.to_path_buf(),
            members,
            tls: None,
            owned: Vec::new(),
        };
        let peer = Netns::add(&format!("{prefix}peer"))?;
        peer.ip(&["link", "add", "br0", "type", "bridge"])?;
        peer.ip(&["link", "set", "br0", "up"])?;
        for i in 0..members {
            let ns = Netns::add(&c.member_ns(i))?;
            super::netns::plug(lan_ns, &ns, &format!("e{}", i + 1), &c.client_ip(i), None)?;
            let port = format!("p{}", i + 1);
            ns.ip(&["link", "add", "peer0", "type", "veth", "peer", "name", &port, "netns", &peer.name])?;
            peer.ip(&["link", "set", &port, "master", "br0", "up"])?;
            ns.ip(&["addr", "add", &format!("{}/24", c.peer_ip(i)), "dev", "peer0"])?;
            ns.ip(&["link", "set", "peer0", "up"])?;
            c.owned.push(ns);
        }
        c.owned.push(peer);
        if tls {
            c.tls = Some(make_cluster_certs(dir, &(0..members).map(|i| c.client_ip(i)).collect::<Vec<_>>())?);
        }
        for i in 0..members {
            c.spawn(i, true)?;
        }
        for i in 0..members {
            c.wait_member(i, Duration::from_secs(30))?;
        }
        Ok(c)
    }

    /// Refers to a running cluster (started by [`EtcdCluster::create`] in an earlier process)
    /// by its layout; never deletes anything on drop.
    pub fn attach(prefix: &str, lan_ns: &str, net: &str, members: usize, dir: &Path, tls: bool) -> EtcdCluster {
        let tls = tls.then(|| ClusterTls {
            ca: dir.join("ca.pem"),
            cert: dir.join("client.pem"),
            key: dir.join("client.key"),
        });
        EtcdCluster {
            prefix: prefix.to_string(),
            lan_ns: lan_ns.to_string(),
            net: net.to_string(),
            dir: dir.to_path_buf(),
            members,
            tls,
            owned: Vec::new(),
        }
    }

    /// Keeps the namespaces (and members) after this value is gone; returns their names.
    pub fn persist(mut self) -> Vec<String> {
        std::mem::take(&mut self.owned).into_iter().map(Netns::persist).collect()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members
    }

    /// Always false: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members == 0
    }

    /// The namespace of member `i`.
    pub fn member_ns(&self, i: usize) -> String {
        format!("{}e{}", self.prefix, i + 1)
    }

    /// The namespace of the LAN the members' clients are on.
    pub fn lan_ns(&self) -> &str {
        &self.lan_ns
    }

    /// Member `i`'s address on the LAN.
    pub fn client_ip(&self, i: usize) -> String {
        format!("{}.{}", self.net, 201 + i)
    }

    fn peer_ip(&self, i: usize) -> String {
        format!("{PEER_NET}.{}", 11 + i)
    }

    /// The TLS client files, when the cluster runs TLS.
    pub fn tls(&self) -> Option<&ClusterTls> {
        self.tls.as_ref()
    }

    /// Member `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:2379", self.client_ip(i))
    }

    /// Every client URL, comma-separated (for `--etcd-endpoints`).
    pub fn endpoints(&self) -> String {
        (0..self.members).map(|i| self.url(i)).collect::<Vec<_>>().join(",")
    }

    /// The daemon flags that reach this cluster (endpoints, and TLS files when on).
    pub fn daemon_args(&self) -> Vec<String> {
        let mut v = vec![format!("--etcd-endpoints={}", self.endpoints())];
        if let Some(t) = &self.tls {
            v.push(format!("--etcd-cafile={}", t.ca.display()));
            v.push(format!("--etcd-certfile={}", t.cert.display()));
            v.push(format!("--etcd-keyfile={}", t.key.display()));
        }
        v
    }

    fn spawn(&self, i: usize, new: bool) -> io::Result<()> {
        let name = format!("m{}", i + 1);
        let url = self.url(i);
        let peer = format!("http://{}:2380", self.peer_ip(i));
        let initial: Vec<String> =
            (0..self.members).map(|j| format!("m{}=http://{}:2380", j + 1, self.peer_ip(j))).collect();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{name}.log")))?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.member_ns(i), "etcd", "--name", &name, "--data-dir"])
            .arg(self.dir.join(format!("data-{name}")))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", if new { "new" } else { "existing" }])
            .args(["--initial-cluster-token", &self.prefix])
            .args(["--log-level", "warn", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        if self.tls.is_some() {
            let d = &self.dir;
            c.arg("--cert-file")
                .arg(d.join(format!("{name}.pem")))
                .arg("--key-file")
                .arg(d.join(format!("{name}.key")))
                .arg("--trusted-ca-file")
                .arg(d.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child =
            c.spawn().map_err(|e| io::Error::other(format!("cannot start etcd (is etcd-server installed?): {e}")))?;
        // The member outlives this value (the lab); it is reaped when its namespace goes.
        std::mem::forget(child);
        Ok(())
    }

    /// etcdctl against the given members (all when empty), from the LAN namespace.
    pub fn etcdctl_on(&self, members: &[usize], args: &[&str]) -> io::Result<String> {
        let eps: Vec<String> = if members.is_empty() {
            (0..self.members).map(|i| self.url(i)).collect()
        } else {
            members.iter().map(|i| self.url(*i)).collect()
        };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.lan_ns, "etcdctl"])
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", eps.join(",")));
        if let Some(t) = &self.tls {
            c.arg("--cacert").arg(&t.ca).arg("--cert").arg(&t.cert).arg("--key").arg(&t.key);
        }
        super::netns::run(c.args(args))
    }

    /// etcdctl against every member (it picks one that answers).
    pub fn etcdctl(&self, args: &[&str]) -> io::Result<String> {
        self.etcdctl_on(&[], args)
    }

    /// Waits until member `i` answers a linearizable read (so it is up and has a leader).
    pub fn wait_member(&self, i: usize, limit: Duration) -> io::Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.etcdctl_on(&[i], &["get", "--command-timeout=1s", "/weft-health"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(io::Error::other(format!(
            "etcd member m{} did not answer within {limit:?} (see {})",
            i + 1,
            self.dir.display()
        )))
    }

    /// Whether member `i`'s etcd process is running.
    pub fn is_running(&self, i: usize) -> bool {
        super::netns::ip(&["netns", "pids", &self.member_ns(i)]).is_ok_and(|p| !p.trim().is_empty())
    }

    /// Kills member `i` (SIGKILL, data kept) and waits until it is gone.
    pub fn kill(&self, i: usize) -> io::Result<()> {
        let pids = super::netns::ip(&["netns", "pids", &self.member_ns(i)])?;
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill(2) with a pid read from `ip netns pids` of the member's own
            // namespace (only its etcd runs there); no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let start = Instant::now();
        while self.is_running(i) {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(io::Error::other(format!("etcd member m{} did not die", i + 1)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts a killed member `i` again with its data; returns without waiting for it
    /// (a lone member has no quorum to answer with).
    pub fn restart(&self, i: usize) -> io::Result<()> {
        if self.is_running(i) {
            return Ok(());
        }
        self.spawn(i, false)
    }

    /// Freezes member `i` (SIGSTOP): its connections stay open but nothing answers, the way a
    /// hung machine behaves. Only deadlines get a client past it.
    pub fn freeze(&self, i: usize) -> io::Result<()> {
        self.signal(i, libc::SIGSTOP)
    }

    /// Undoes [`EtcdCluster::freeze`] (SIGCONT).
    pub fn thaw(&self, i: usize) -> io::Result<()> {
        self.signal(i, libc::SIGCONT)
    }

    fn signal(&self, i: usize, sig: i32) -> io::Result<()> {
        let pids = super::netns::ip(&["netns", "pids", &self.member_ns(i)])?;
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill(2) with a pid read from `ip netns pids` of the member's own
            // namespace (only its etcd runs there); no memory is involved.
            unsafe { libc::kill(pid, sig) };
        }
        Ok(())
    }

    /// Cuts member `i` off from its peers (its peer link goes down); clients still reach it.
    pub fn partition(&self, i: usize) -> io::Result<()> {
        super::netns::ip(&["-n", &self.member_ns(i), "link", "set", "peer0", "down"]).map(|_| ())
    }

    /// Undoes [`EtcdCluster::partition`].
    pub fn heal(&self, i: usize) -> io::Result<()> {
        super::netns::ip(&["-n", &self.member_ns(i), "link", "set", "peer0", "up"]).map(|_| ())
    }

    /// The index of the member that is leader now, asked of every member that answers.
    pub fn leader(&self) -> Option<usize> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json", "--command-timeout=2s"]).ok().or_else(|| {
            // Some member is down: etcdctl fails the whole command; ask one by one.
            let parts: Vec<String> = (0..self.members)
                .filter_map(|i| {
                    self.etcdctl_on(&[i], &["endpoint", "status", "-w", "json", "--command-timeout=2s"]).ok()
                })
                .map(|s| s.trim().trim_start_matches('[').trim_end_matches(']').to_string())
                .collect();
            Some(format!("[{}]", parts.join(",")))
        })?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        for st in v.as_array()? {
            let ep = st["Endpoint"].as_str()?;
            let s = &st["Status"];
            if s["header"]["member_id"].as_u64().is_some() && s["header"]["member_id"] == s["leader"] {
                return (0..self.members).find(|i| self.url(*i) == ep);
            }
        }
        None
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // Owned namespaces go with their processes (Netns's drop); nothing else to do.
        self.owned.clear();
    }
}

fn openssl(dir: &Path, args: &[&str]) -> io::Result<()> {
    super::netns::run(Command::new("openssl").current_dir(dir).args(args)).map(|_| ())
}

/// A CA, one server certificate per member (`m<i>.pem`/`.key`, for its LAN address) and a
/// client certificate (`client.pem`/`.key`), all ECDSA P-256, valid for 30 days.
pub fn make_cluster_certs(dir: &Path, member_ips: &[String]) -> io::Result<ClusterTls> {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", "/CN=weft-lab-etcd-ca"]);
    openssl(dir, &args)?;
    let sign = |name: &str, ext: &str| -> io::Result<()> {
        std::fs::write(dir.join(format!("{name}.cnf")), ext)?;
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        let subj = format!("/CN={name}");
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &a)?;
        let ext_file = format!("{name}.cnf");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "30",
                "-extfile",
                &ext_file,
            ],
        )
    };
    for (i, ip) in member_ips.iter().enumerate() {
        sign(&format!("m{}", i + 1), &format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth,clientAuth\n"))?;
    }
    sign("client", "extendedKeyUsage=clientAuth\n")?;
    Ok(ClusterTls { ca: dir.join("ca.pem"), cert: dir.join("client.pem"), key: dir.join("client.key") })
}
