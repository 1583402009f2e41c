//! Control-plane figures: time from `weft daemon` start to a written subnet.env against a
//! local etcd, and the daemon's memory while it watches many leases.
//!
//! Runs entirely in network namespaces it creates (a LAN with etcd on its bridge, one host).
//! `sudo cargo run --release --example control_plane_bench [-- LEASES]` (default 5000).

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use weft::lab::etcd::Etcd;
use weft::lab::netns::{Lan, Netns};
use weft::registry::etcd::{EtcdOptions, EtcdRegistry};
use weft::registry::{LEASE_TTL, Registry};
use weft_core::lease::{LeaseAttrs, SubnetKey};

const PREFIX: &str = "/coreos.com/network";

fn weft_bin() -> String {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("weft").display().to_string()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn metric(host: &Netns, name: &str) -> Option<i64> {
    let body = host.exec("curl", &["-s", "-m", "2", "http://127.0.0.1:8081/metrics"]).ok()?;
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

fn main() {
    let leases: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5000);
    let dir = tempfile::tempdir().unwrap();
    let prefix = "wtbench-";
    weft::lab::netns::remove_prefixed(prefix);
    let lan = Lan::new(prefix, "192.0.2").unwrap();
    let host = lan.add_host(1).unwrap();
    let etcd = Etcd::start(Some(&lan.ns), &lan.gateway(), 2379, 2380, &dir.path().join("etcd"), None).unwrap();
    etcd.etcdctl(&["put", &format!("{PREFIX}/config"), r#"{"Network":"10.64.0.0/10","Backend":{"Type":"alloc"}}"#])
        .unwrap();
    let env_file = dir.path().join("subnet.env");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            "daemon".to_string(),
            format!("--etcd-endpoints={}", etcd.url()),
            format!("--subnet-file={}", env_file.display()),
            "--healthz-port=8081".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    // 1. Start to subnet.env: a fresh lease each time (key and file removed), then restarts
    //    that find their lease.
    let mut fresh = Vec::new();
    let mut restart = Vec::new();
    for round in 0..20 {
        let is_fresh = round < 10;
        if is_fresh {
            let _ = std::fs::remove_file(&env_file);
            etcd.etcdctl(&["del", "--prefix", &format!("{PREFIX}/subnets/")]).unwrap();
        } else {
            let _ = std::fs::remove_file(&env_file);
        }
        let start = Instant::now();
        let mut child = host.command(&weft_bin()).args(args(&[])).stderr(Stdio::null()).spawn().unwrap();
        while !env_file.exists() {
            std::thread::sleep(Duration::from_micros(500));
            assert!(start.elapsed() < Duration::from_secs(10), "daemon did not write subnet.env");
        }
        let took = start.elapsed();
        if is_fresh {
            fresh.push(took)
        } else {
            restart.push(took)
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    fresh.sort();
    restart.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "start -> subnet.env, fresh lease:     median {:.1} ms  (min {:.1}, max {:.1}, n=10)",
        ms(fresh[5]),
        ms(fresh[0]),
        ms(fresh[9])
    );
    println!(
        "start -> subnet.env, existing lease:  median {:.1} ms  (min {:.1}, max {:.1}, n=10)",
        ms(restart[5]),
        ms(restart[0]),
        ms(restart[9])
    );

    // 2. Memory at rest and while watching `leases` peer leases.
    let child = host.command(&weft_bin()).args(args(&[])).stderr(Stdio::null()).spawn().unwrap();
    let pid = child.id();
    let mut child = child;
    while metric(&host, "weft_ready ") != Some(1) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss_kib(pid);
    let writer_ns = std::fs::File::open(format!("/run/netns/{}", lan.ns.name)).unwrap();
    let url = etcd.url();
    let write_start = Instant::now();
    // The writer enters the LAN namespace on a thread of its own: the process stays in the
    // root namespace, so removing the LAN later does not kill it.
    std::thread::spawn(move || {
        nix::sched::setns(writer_ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let reg = EtcdRegistry::connect(&EtcdOptions {
                endpoints: vec![url],
                prefix: PREFIX.into(),
                ..Default::default()
            })
            .await
            .unwrap();
            let mut pending = futures::stream::FuturesUnordered::new();
            use futures::StreamExt;
            for i in 0..leases {
                let reg = reg.clone();
                // Skip 10.64.0.0 (outside SubnetMin) and stay clear of the daemon's own lease.
                let n = i + 1000;
                let key = SubnetKey::v4(format!("10.{}.{}.0/24", 64 + n / 256, n % 256).parse().unwrap());
                let ip = Ipv4Addr::from(0xC633_0000u32 + i);
                pending.push(async move { reg.create(&key, &LeaseAttrs::new(ip), LEASE_TTL).await });
                if pending.len() >= 64 {
                    pending.next().await.unwrap().unwrap();
                }
            }
            while let Some(r) = pending.next().await {
                r.unwrap();
            }
        });
    })
    .join()
    .unwrap();
    let written = write_start.elapsed();
    let seen_start = Instant::now();
    while metric(&host, "weft_peers ") != Some(i64::from(leases)) {
        std::thread::sleep(Duration::from_millis(20));
        assert!(seen_start.elapsed() < Duration::from_secs(120), "daemon did not see every lease");
    }
    let caught_up = seen_start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let watching = rss_kib(pid);
    // And a fresh start that lists them all at once.
    let _ = child.kill();
    let _ = child.wait();
    let start = Instant::now();
    let mut child = host.command(&weft_bin()).args(args(&[])).stderr(Stdio::null()).spawn().unwrap();
    while metric(&host, "weft_peers ") != Some(i64::from(leases)) {
        std::thread::sleep(Duration::from_millis(10));
        assert!(start.elapsed() < Duration::from_secs(60));
    }
    let listed = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let listed_rss = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "{leases} leases written by a client in {:.2} s; the daemon's watch had all of them {:.0} ms after the last write",
        written.as_secs_f64(),
        ms(caught_up)
    );
    println!("fresh start with {leases} leases: ready and all peers known after {:.0} ms", ms(listed));
    println!(
        "daemon RSS: {:.1} MiB idle, {:.1} MiB after watching {leases} leases arrive, {:.1} MiB after listing {leases} at start",
        idle as f64 / 1024.0,
        watching as f64 / 1024.0,
        listed_rss as f64 / 1024.0
    );
}
