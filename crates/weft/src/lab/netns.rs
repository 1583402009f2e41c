//! Named network namespaces (as `ip netns` makes them) and a LAN of hosts on one bridge.

use std::io;
use std::process::{Command, Output, Stdio};

/// Runs a command and returns its stdout, or an error carrying its stderr.
pub fn run(cmd: &mut Command) -> io::Result<String> {
    let out: Output = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip` with `args`.
pub fn ip(args: &[&str]) -> io::Result<String> {
    run(Command::new("ip").args(args))
}

/// A named network namespace. One made by [`Netns::add`] is deleted (with every process in
/// it) on drop, unless [`Netns::persist`] hands it over; one from [`Netns::existing`] only
/// refers to it.
#[derive(Debug)]
pub struct Netns {
    /// The name under /run/netns.
    pub name: String,
    owned: bool,
}

impl Netns {
    /// Creates the namespace with loopback up. A leftover of the same name is removed first.
    pub fn add(name: &str) -> io::Result<Netns> {
        remove(name);
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.to_string(), owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Refers to a namespace that already exists and belongs to someone else: never
    /// removed on drop.
    pub fn existing(name: &str) -> Netns {
        Netns { name: name.to_string(), owned: false }
    }

    /// Keeps the namespace after this value is gone (the lab outlives the command that
    /// built it); returns its name.
    pub fn persist(mut self) -> String {
        self.owned = false;
        std::mem::take(&mut self.name)
    }

    /// Runs `ip -n <ns> args`.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args` inside the namespace and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<String> {
        run(self.command(program).args(args))
    }
}

/// Runs `f` on a thread that has entered namespace `name` (namespace membership is per
/// thread), and returns its result.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    crate::nsenter::run_in(std::path::Path::new(&format!("/run/netns/{name}")), f).map_err(io::Error::other)
}

/// A plain HTTP GET to `127.0.0.1:port` inside namespace `ns`: status code and body.
pub fn http_get(ns: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    in_netns(ns, move || -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let code = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((code, body))
    })
    .ok()
    .flatten()
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            remove(&self.name);
        }
    }
}

/// Kills every process in namespace `name` and deletes it; quiet when it does not exist.
pub fn remove(name: &str) {
    if let Ok(pids) = ip(&["netns", "pids", name]) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill(2) with a pid read from `ip netns pids`; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
}

/// Removes every namespace whose name starts with `prefix` (leftovers of a crashed run).
pub fn remove_prefixed(prefix: &str) {
    if let Ok(list) = ip(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(prefix) {
                remove(name);
            }
        }
    }
}

/// Plugs host namespace `host` into the bridge of namespace `lan` through a veth pair
/// (`eth0` in the host, `port` on the bridge), with address `ip/24` and a default route via
/// `gateway`, MTU 1500.
pub fn plug(lan: &Netns, host: &Netns, port: &str, ip: &str, gateway: Option<&str>) -> io::Result<()> {
    // Both ends are created inside namespaces: nothing appears in the root namespace.
    host.ip(&["link", "add", "eth0", "mtu", "1500", "type", "veth", "peer", "name", port, "netns", &lan.name])?;
    lan.ip(&["link", "set", port, "master", "br0", "up"])?;
    host.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    host.ip(&["link", "set", "eth0", "up"])?;
    if let Some(gw) = gateway {
        host.ip(&["route", "add", "default", "via", gw])?;
    }
    Ok(())
}

/// A LAN: one namespace holding a bridge (`br0`, `<net>.1/24`) that hosts plug into.
#[derive(Debug)]
pub struct Lan {
    /// The namespace of the bridge; it can also host services (etcd).
    pub ns: Netns,
    /// Namespace-name prefix of this LAN's hosts.
    pub prefix: String,
    /// First three octets of the LAN's /24, e.g. "192.0.2".
    pub net: String,
}

impl Lan {
    /// Creates `<prefix>lan` with the bridge, on `<net>.0/24` (e.g. net = "192.0.2").
    pub fn new(prefix: &str, net: &str) -> io::Result<Lan> {
        let ns = Netns::add(&format!("{prefix}lan"))?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["addr", "add", &format!("{net}.1/24"), "dev", "br0"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Lan { ns, prefix: prefix.to_string(), net: net.to_string() })
    }

    /// The bridge's address, `<net>.1`.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.net)
    }

    /// The address host number `n` gets, `<net>.(10+n)`.
    pub fn host_ip(&self, n: u8) -> String {
        format!("{}.{}", self.net, 10 + u16::from(n))
    }

    /// Creates host namespace `<prefix>h<n>` with `eth0` on the LAN (MTU 1500), its address
    /// and a default route via the bridge.
    pub fn add_host(&self, n: u8) -> io::Result<Netns> {
        let host = Netns::add(&format!("{}h{n}", self.prefix))?;
        let port = format!("h{n}");
        // Both ends are created inside namespaces: nothing appears in the root namespace.
        host.ip(&[
            "link",
            "add",
            "eth0",
            "mtu",
            "1500",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.ns.name,
        ])?;
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"])?;
        host.ip(&["addr", "add", &format!("{}/24", self.host_ip(n)), "dev", "eth0"])?;
        host.ip(&["link", "set", "eth0", "up"])?;
        host.ip(&["route", "add", "default", "via", &self.gateway()])?;
        Ok(host)
    }
}
