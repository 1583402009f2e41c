//! Scale figures of the daemon, measured in network namespaces this program creates (a LAN
//! with etcd on its bridge, one host running `weft daemon`):
//!
//! - control plane (backend alloc): start to subnet.env, and memory while watching N leases;
//! - data plane (backend vxlan), per N: time until the kernel holds the routes, neighbours
//!   and FDB entries for N peers once their leases are known, a no-op resync pass, the
//!   latency of one peer change (one lease written at N peers → its entries in the kernel),
//!   RSS; and the kernel's own floor for the same operations, measured with `ip -batch` /
//!   `bridge -batch` in a fresh namespace in the same run.
//!
//! `sudo cargo run --release --example scale_bench [-- N...]` (default: 1000 5000).
//! `--data-plane-only` skips the control-plane part; `WEFT_BIN=<path>` runs another weft
//! binary as the daemon (to compare two builds in one run); `WEFT_NEXTHOPS=off` is passed on;
//! `WEFT_BENCH_HOLD=<s>` keeps the converged daemon running for a profiler.
//! Peer leases use addresses of 198.18.0.0/15 (benchmarking range); no packet is sent to them.

#[path = "support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use support::{rss_mib, weft_bin};
use weft::lab::etcd::Etcd;
use weft::lab::netns::{Lan, Netns};
use weft::registry::etcd::{EtcdOptions, EtcdRegistry};
use weft::registry::{LEASE_TTL, Registry};
use weft_core::backend::vxlan_backend_data;
use weft_core::lease::{LeaseAttrs, SubnetKey};

const PREFIX: &str = "/coreos.com/network";

struct Bench {
    _dir: tempfile::TempDir,
    env_file: PathBuf,
    etcd: Etcd,
    host: Netns,
    lan: Lan,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Bench {
    fn new(tag: &str, config: &str) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("wtbench{tag}-");
        weft::lab::netns::remove_prefixed(&prefix);
        let lan = Lan::new(&prefix, "192.0.2").unwrap();
        let host = lan.add_host(1).unwrap();
        let etcd = Etcd::start(Some(&lan.ns), &lan.gateway(), 2379, 2380, &dir.path().join("etcd"), None).unwrap();
        etcd.etcdctl(&["put", &format!("{PREFIX}/config"), config]).unwrap();
        Bench { env_file: dir.path().join("subnet.env"), _dir: dir, etcd, host, lan }
    }

    fn daemon(&self) -> Child {
        self.host
            .command(&weft_bin())
            .args([
                "daemon",
                &format!("--etcd-endpoints={}", self.etcd.url()),
                &format!("--subnet-file={}", self.env_file.display()),
            ])
            .arg("--healthz-port=8081")
            // WEFT_LOG=debug shows the daemon's own log (per-phase netlink timings).
            .stderr(if std::env::var_os("WEFT_LOG").is_some() { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .unwrap()
    }

    fn metric(&self, name: &str) -> Option<i64> {
        let body = self.host.exec("curl", &["-s", "-m", "2", "http://127.0.0.1:8081/metrics"]).ok()?;
        body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
    }

    fn wait(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < limit, "timed out waiting for {what}");
            // Polling with `ip -j` costs CPU the daemon needs on a 2-core machine: not too often.
            std::thread::sleep(Duration::from_millis(25));
        }
        start.elapsed()
    }

    /// Writes `n` peer leases (vxlan attributes when `vxlan`) from a thread that enters the
    /// LAN namespace, 64 requests in flight.
    fn write_peers(&self, n: u32, vxlan: bool) -> Duration {
        let url = self.etcd.url();
        let start = Instant::now();
        weft::lab::netns::in_netns(&self.lan.ns.name, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                use futures::StreamExt;
                let opts = EtcdOptions { endpoints: vec![url], prefix: PREFIX.into(), ..Default::default() };
                let reg = EtcdRegistry::connect(&opts).await.unwrap();
                let mut pending = futures::stream::FuturesUnordered::new();
                for i in 0..n {
                    let reg = reg.clone();
                    // Subnets from 10.67.232.0 up (Network 10.0.0.0/8): clear of the daemon's own (among the first 100).
                    let s = i + 1000;
                    let key = SubnetKey::v4(format!("10.{}.{}.0/24", 64 + s / 256, s % 256).parse().unwrap());
                    let mut attrs = LeaseAttrs::new(Ipv4Addr::from(0xC612_0000u32 + i + 1));
                    if vxlan {
                        let mac = [0x0e, 0x77, (i >> 16) as u8, (i >> 8) as u8, i as u8, 1];
                        attrs.backend_type = "vxlan".into();
                        attrs.backend_data = RawValue::from_string(vxlan_backend_data(1, &mac)).ok();
                    }
                    pending.push(async move { reg.create(&key, &attrs, LEASE_TTL).await });
                    if pending.len() >= 64 {
                        pending.next().await.unwrap().unwrap();
                    }
                }
                while let Some(r) = pending.next().await {
                    r.unwrap();
                }
            });
        })
        .unwrap();
        start.elapsed()
    }

    fn count(&self, args: &[&str], program: &str) -> usize {
        let v: serde_json::Value =
            serde_json::from_str(&self.host.exec(program, args).unwrap_or_else(|_| "[]".into())).unwrap_or_default();
        v.as_array().map_or(0, Vec::len)
    }

    /// Writes the lease of peer `i` and returns how long until its route is in the kernel
    /// (seen by `ip monitor`, started before the write).
    fn one_peer(&self, i: u32) -> Duration {
        use std::io::BufRead;
        let subnet = format!("{}/24", peer_subnet(i));
        let mut mon = self.host.command("ip").args(["monitor", "route"]).stdout(Stdio::piped()).spawn().unwrap();
        let out = mon.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let want = subnet.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.starts_with(&want) {
                    let _ = tx.send(Instant::now());
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        let url = self.etcd.url();
        let key = SubnetKey::v4(subnet.parse().unwrap());
        let mut attrs = LeaseAttrs::new(Ipv4Addr::from(0xC612_0000u32 + i + 1));
        let mac = [0x0e, 0x77, (i >> 16) as u8, (i >> 8) as u8, i as u8, 1];
        attrs.backend_type = "vxlan".into();
        attrs.backend_data = RawValue::from_string(vxlan_backend_data(1, &mac)).ok();
        // Timed from just before the write (the connection is made first).
        let start = weft::lab::netns::in_netns(&self.lan.ns.name, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let opts = EtcdOptions { endpoints: vec![url], prefix: PREFIX.into(), ..Default::default() };
                let reg = EtcdRegistry::connect(&opts).await.unwrap();
                reg.list().await.unwrap();
                let start = Instant::now();
                reg.create(&key, &attrs, LEASE_TTL).await.unwrap();
                start
            })
        })
        .unwrap();
        let seen = rx.recv_timeout(Duration::from_secs(30)).expect("the new peer's route");
        let _ = mon.kill();
        let _ = mon.wait();
        seen.saturating_duration_since(start)
    }

    fn kernel_entries(&self) -> (usize, usize, usize) {
        (
            self.count(&["-j", "route", "show", "dev", "flannel.1"], "ip"),
            self.count(&["-j", "neigh", "show", "dev", "flannel.1"], "ip"),
            self.count(&["-j", "fdb", "show", "dev", "flannel.1"], "bridge"),
        )
    }
}

fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn control_plane(n: u32) {
    let b = Bench::new("c", r#"{"Network":"10.0.0.0/8","Backend":{"Type":"alloc"}}"#);
    let mut fresh = Vec::new();
    let mut again = Vec::new();
    for round in 0..20 {
        if round < 10 {
            b.etcd.etcdctl(&["del", "--prefix", &format!("{PREFIX}/subnets/")]).unwrap();
        }
        let _ = std::fs::remove_file(&b.env_file);
        let start = Instant::now();
        let d = b.daemon();
        b.wait("subnet.env", Duration::from_secs(10), || b.env_file.exists());
        if round < 10 {
            fresh.push(start.elapsed())
        } else {
            again.push(start.elapsed())
        }
        stop(d);
    }
    fresh.sort();
    again.sort();
    println!(
        "control plane: start -> subnet.env, fresh lease:    median {:.1} ms (min {:.1}, max {:.1}, n=10)",
        ms(fresh[5]),
        ms(fresh[0]),
        ms(fresh[9])
    );
    println!(
        "control plane: start -> subnet.env, existing lease: median {:.1} ms (min {:.1}, max {:.1}, n=10)",
        ms(again[5]),
        ms(again[0]),
        ms(again[9])
    );
    let d = b.daemon();
    b.wait("readiness", Duration::from_secs(10), || b.metric("weft_ready ") == Some(1));
    std::thread::sleep(Duration::from_millis(300));
    let idle = rss_mib(d.id());
    let wrote = b.write_peers(n, false);
    let caught_up = b.wait("all peers", Duration::from_secs(120), || b.metric("weft_peers ") == Some(i64::from(n)));
    std::thread::sleep(Duration::from_millis(300));
    let watching = rss_mib(d.id());
    stop(d);
    let start = Instant::now();
    let d = b.daemon();
    b.wait("all peers after a restart", Duration::from_secs(60), || b.metric("weft_peers ") == Some(i64::from(n)));
    let listed = start.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let listed_rss = rss_mib(d.id());
    stop(d);
    println!(
        "control plane: {n} leases written in {:.2} s; the watch had them all {:.0} ms after the last write",
        wrote.as_secs_f64(),
        ms(caught_up)
    );
    println!("control plane: start with {n} leases in the store -> all peers known: {:.0} ms", ms(listed));
    println!(
        "control plane: RSS {idle:.1} MiB idle, {watching:.1} MiB after watching {n} arrive, {listed_rss:.1} MiB after listing {n} at start"
    );
}

/// The subnet of peer `i` (as `write_peers` writes them).
fn peer_subnet(i: u32) -> String {
    let s = i + 1000;
    format!("10.{}.{}.0", 64 + s / 256, s % 256)
}

fn data_plane(n: u32) -> Row {
    let b = Bench::new("d", r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#);
    // Leases known before the daemon starts: the first pass programs all of them.
    b.write_peers(n, true);
    let start = Instant::now();
    let d = b.daemon();
    b.wait("readiness", Duration::from_secs(30), || b.metric("weft_ready ") == Some(1));
    let ready = start.elapsed();
    let known = b.wait("peers known", Duration::from_secs(60), || b.metric("weft_peers ") == Some(i64::from(n)));
    // The first pass ends with everything programmed; the metric is cheap to poll, `ip -j`
    // (which would steal the daemon's CPU) checks the result once.
    let converged = b.wait("a converged kernel", Duration::from_secs(180), || {
        b.metric("weft_reconciles_total ").unwrap_or(0) >= 1
            && b.metric("weft_kernel_changes_total ").unwrap_or(0) >= 3 * i64::from(n)
    });
    let n_us = n as usize;
    assert_eq!(b.kernel_entries(), (n_us, n_us, n_us), "routes, neighbours and FDB entries on flannel.1");
    let nexthops = b.count(&["-j", "nexthop", "show", "protocol", "87"], "ip");
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_mib(d.id());
    // A resync pass over a converged kernel: read, diff, nothing to do.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let passes = b.metric("weft_reconciles_total ").unwrap_or(0);
        b.wait("a periodic pass", Duration::from_secs(15), || b.metric("weft_reconciles_total ").unwrap_or(0) > passes);
        idle.push(b.metric("weft_reconcile_milliseconds ").unwrap_or(-1));
    }
    // WEFT_BENCH_HOLD=<s>: keep the converged daemon running that long (to profile its
    // resync passes, e.g. `perf record -g -p <pid>`).
    if let Some(s) = std::env::var("WEFT_BENCH_HOLD").ok().and_then(|s| s.parse().ok()) {
        eprintln!("holding the daemon (pid {}) for {s} s", d.id());
        std::thread::sleep(Duration::from_secs(s));
    }
    // Memory once the first pass's leftovers are gone (its delayed trim ran).
    let rss_steady = rss_mib(d.id());
    // One peer change: a lease written now → its route in the kernel (the route goes in last).
    let mut one = Vec::new();
    for k in 0..3 {
        one.push(b.one_peer(n + k));
    }
    one.sort();
    stop(d);
    let floor = kernel_floor(n);
    println!(
        "data plane (vxlan), {n} peers: ready {:.0} ms after start, peers known +{:.0} ms, kernel converged +{:.0} ms ({n} routes, neighbours, FDB entries; {nexthops} nexthops)",
        ms(ready),
        ms(known),
        ms(converged),
    );
    println!(
        "data plane (vxlan), {n} peers: no-op resync {idle:?} ms; one peer change {:.1} ms (median of 3, {:.1}..{:.1}); RSS {rss:.1} MiB ({rss_steady:.1} MiB after the resync passes)",
        ms(one[1]),
        ms(one[0]),
        ms(one[2]),
    );
    println!(
        "kernel floor, {n} peers: ip -batch nexthops+routes {:.0} ms (plain routes {:.0} ms), neigh+fdb {:.0} ms; dump all {:.0} ms; one peer's 4 entries {:.1} ms",
        ms(floor.nh_routes),
        ms(floor.plain_routes),
        ms(floor.neigh_fdb),
        ms(floor.dump),
        ms(floor.one),
    );
    Row { n, converged, idle_ms: idle.iter().copied().min().unwrap_or(-1), one: one[1], rss, floor }
}

struct Floor {
    nh_routes: Duration,
    plain_routes: Duration,
    neigh_fdb: Duration,
    dump: Duration,
    one: Duration,
}

struct Row {
    n: u32,
    converged: Duration,
    idle_ms: i64,
    one: Duration,
    rss: f64,
    floor: Floor,
}

fn batch(ns: &Netns, program: &str, lines: &str) -> Duration {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!("wtbench-{}-{program}.batch", std::process::id()));
    std::fs::File::create(&path).unwrap().write_all(lines.as_bytes()).unwrap();
    let start = Instant::now();
    ns.exec(program, &["-batch", &path.display().to_string()]).unwrap();
    let took = start.elapsed();
    let _ = std::fs::remove_file(&path);
    took
}

/// What the kernel itself needs for the same entries: one `ip -batch` / `bridge -batch` run
/// each into a fresh namespace with a vxlan device.
fn kernel_floor(n: u32) -> Floor {
    let prefix = "wtbenchk-";
    weft::lab::netns::remove_prefixed(prefix);
    let setup = |name: &str| {
        let ns = Netns::add(&format!("{prefix}{name}")).unwrap();
        ns.ip(&["link", "set", "lo", "up"]).unwrap();
        ns.ip(&[
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "8472",
            "nolearning",
            "local",
            "192.0.2.1",
        ])
        .unwrap();
        ns.ip(&["link", "set", "flannel.1", "up"]).unwrap();
        ns
    };
    let mac = |i: u32| format!("0e:77:{:02x}:{:02x}:{:02x}:01", (i >> 16) as u8, (i >> 8) as u8, i as u8);
    let public = |i: u32| Ipv4Addr::from(0xC612_0000u32 + i + 1);
    let nh = setup("nh");
    let mut lines = String::new();
    for i in 0..n {
        lines += &format!("nexthop add id {} via {} dev flannel.1 onlink proto 87\n", 87_000_000 + i, peer_subnet(i));
    }
    for i in 0..n {
        lines += &format!("route add {}/24 nhid {} proto 87\n", peer_subnet(i), 87_000_000 + i);
    }
    let nh_routes = batch(&nh, "ip", &lines);
    let mut neigh = String::new();
    let mut fdb = String::new();
    for i in 0..n {
        neigh += &format!("neigh add {} lladdr {} dev flannel.1 nud permanent\n", peer_subnet(i), mac(i));
        fdb += &format!("fdb append {} dev flannel.1 dst {} self permanent\n", mac(i), public(i));
    }
    let neigh_fdb = batch(&nh, "ip", &neigh) + batch(&nh, "bridge", &fdb);
    let start = Instant::now();
    for (program, args) in [
        ("ip", &["-j", "nexthop", "show"][..]),
        ("ip", &["-j", "route", "show"][..]),
        ("ip", &["-j", "neigh", "show", "dev", "flannel.1"][..]),
        ("bridge", &["-j", "fdb", "show", "dev", "flannel.1"][..]),
    ] {
        nh.exec(program, args).unwrap();
    }
    let dump = start.elapsed();
    let i = n + 1;
    let one_line = format!(
        "neigh add {} lladdr {} dev flannel.1 nud permanent\nnexthop add id {} via {} dev flannel.1 onlink proto 87\nroute add {}/24 nhid {} proto 87\n",
        peer_subnet(i),
        mac(i),
        87_000_000 + i,
        peer_subnet(i),
        peer_subnet(i),
        87_000_000 + i
    );
    let one = batch(&nh, "ip", &one_line)
        + batch(&nh, "bridge", &format!("fdb append {} dev flannel.1 dst {} self permanent\n", mac(i), public(i)));
    drop(nh);
    let plain = setup("plain");
    let mut lines = String::new();
    for i in 0..n {
        lines += &format!("route add {}/24 via {} dev flannel.1 onlink proto 87\n", peer_subnet(i), peer_subnet(i));
    }
    let plain_routes = batch(&plain, "ip", &lines);
    drop(plain);
    weft::lab::netns::remove_prefixed(prefix);
    Floor { nh_routes, plain_routes, neigh_fdb, dump, one }
}

fn main() {
    let data_only = std::env::args().any(|a| a == "--data-plane-only");
    let sizes: Vec<u32> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![1000, 5000] } else { sizes };
    let largest = *sizes.iter().max().unwrap();
    if !data_only {
        control_plane(largest);
    }
    let rows: Vec<Row> = sizes.into_iter().map(data_plane).collect();
    println!();
    println!(
        "| peers | converged | no-op resync | one peer change | RSS | kernel floor: program all (nexthops / plain routes) | dump all | one peer |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.0} ms | {} ms | {:.1} ms | {:.1} MiB | {:.0} / {:.0} ms | {:.0} ms | {:.1} ms |",
            r.n,
            ms(r.converged),
            r.idle_ms,
            ms(r.one),
            r.rss,
            ms(r.floor.nh_routes + r.floor.neigh_fdb),
            ms(r.floor.plain_routes + r.floor.neigh_fdb),
            ms(r.floor.dump),
            ms(r.floor.one),
        );
    }
}
