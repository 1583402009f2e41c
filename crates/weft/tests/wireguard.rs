//! The wireguard backend against the reference implementation: host 1 runs `weft daemon`
//! (userspace WireGuard: these kernels have no wireguard link type), host 2 runs Debian's
//! `wireguard-go`, configured with `wg` exactly as flanneld configures its device from a
//! lease (key, port, peer, PSK, allowed IPs, endpoint), its lease written to etcd by the
//! test. Pings and TCP both ways; the LAN sees only ciphertext; a deleted lease ends the
//! traffic.

mod common;

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::cluster::{Cluster, Daemon, PREFIX, cluster};
use common::wait_for;

const PSK: &str = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";

fn config() -> String {
    format!(r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"wireguard","PSK":"{PSK}"}}}}"#)
}

/// The reference tools, installed by scripts/install-deps.sh.
fn require_tools() {
    for t in ["wireguard-go", "wg", "iperf3"] {
        let found =
            std::process::Command::new("sh").args(["-c", &format!("command -v {t}")]).stdout(Stdio::null()).status();
        assert!(
            found.map(|s| s.success()).unwrap_or(false),
            "{t} is missing: run scripts/install-deps.sh (packages wireguard-go, wireguard-tools, iperf3)"
        );
    }
}

/// wireguard-go's control socket (`/var/run/wireguard/flannel-wg.sock`) is one file for
/// every namespace: the tests that run it take turns.
static WIREGUARD_GO: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_weft(c: &Cluster, key_file: &std::path::Path) -> Daemon {
    let endpoints = format!("--etcd-endpoints={}", c.etcd.url());
    let subnet_file = format!("--subnet-file={}", c.env_file(0).display());
    let key = key_file.display().to_string();
    Daemon::start_with_env(
        &c.hosts[0],
        &c.dir,
        &[&endpoints, &subnet_file, "-healthz-port", "8081"],
        &[("WIREGUARD_KEY_FILE", &key)],
    )
}

fn subnet_base(env: &str) -> String {
    let sub = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).unwrap();
    let third: u8 = sub.split('.').nth(2).unwrap().parse().unwrap();
    format!("10.5.{third}.0")
}

fn ping(ns: &weft::lab::netns::Netns, dst: &str, count: &str, extra: &[&str]) -> bool {
    let mut args = vec!["-c", count, "-W", "1", "-i", "0.2"];
    args.extend_from_slice(extra);
    args.push(dst);
    ns.command("ping").args(&args).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success()
}

/// One TCP stream for `secs` from `client` to `server_ip` (server in `server`): bytes received.
fn tcp_stream(server: &weft::lab::netns::Netns, client: &weft::lab::netns::Netns, server_ip: &str) -> u64 {
    let _srv = Proc(server.command("iperf3").args(["-s", "-1", "-p", "5299"]).stdout(Stdio::null()).spawn().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    let out = client.exec("iperf3", &["-c", server_ip, "-p", "5299", "-t", "2", "-J"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("iperf3 printed {out}: {e}"));
    v["end"]["sum_received"]["bytes"].as_u64().unwrap_or_else(|| panic!("no received bytes in {out}"))
}

/// UDP payloads to or from port 51820 seen on the LAN's bridge ports for `secs`, with
/// their destination address.
fn capture(lan: String, secs: u64) -> std::thread::JoinHandle<Vec<(IpAddr, Vec<u8>)>> {
    std::thread::spawn(move || {
        let all = common::capture::udp_on(lan, secs).join().unwrap();
        all.into_iter()
            .filter(|d| d.family == 4 && (d.sport == 51820 || d.dport == 51820))
            .map(|d| (d.dst, d.payload))
            .collect()
    })
}

/// Host 2 as flanneld would set it up from its lease, on wireguard-go: the device, key,
/// port, weft's host as the peer (PSK, endpoint, allowed IPs), address and route; its lease
/// written to etcd. Returns the process, host 2's overlay address and its lease key.
fn wireguard_go(c: &Cluster, a_ip: &str, a_pub: &str) -> (Proc, String, String) {
    let h2 = &c.hosts[1];
    let b_third = if a_ip == "10.5.200.0" { 201 } else { 200 };
    let b_ip = format!("10.5.{b_third}.0");
    let b_priv = h2.exec("wg", &["genkey"]).unwrap().trim().to_string();
    let b_pub = h2.exec("sh", &["-c", &format!("echo {b_priv} | wg pubkey")]).unwrap().trim().to_string();
    std::fs::write(c.dir.join("b.key"), &b_priv).unwrap();
    std::fs::write(c.dir.join("psk"), PSK).unwrap();
    let wg = Proc(
        h2.command("wireguard-go")
            .args(["-f", "flannel-wg"])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(Duration::from_secs(10), "wireguard-go's flannel-wg", || {
        common::links(h2).contains(&"flannel-wg".to_string()).then_some(())
    });
    let b_key_path = c.dir.join("b.key").display().to_string();
    let psk_path = c.dir.join("psk").display().to_string();
    let a_subnet = format!("{a_ip}/24");
    wait_for(Duration::from_secs(10), "wg set to succeed", || {
        h2.exec(
            "wg",
            &[
                "set",
                "flannel-wg",
                "private-key",
                &b_key_path,
                "listen-port",
                "51820",
                "peer",
                a_pub,
                "preshared-key",
                &psk_path,
                "endpoint",
                "192.0.2.11:51820",
                "allowed-ips",
                &a_subnet,
            ],
        )
        .ok()
    });
    h2.ip(&["addr", "add", &format!("{b_ip}/32"), "dev", "flannel-wg"]).unwrap();
    h2.ip(&["link", "set", "flannel-wg", "mtu", "1420", "up"]).unwrap();
    h2.ip(&["route", "replace", "10.5.0.0/16", "dev", "flannel-wg", "scope", "link"]).unwrap();
    let b_key = format!("{PREFIX}/subnets/10.5.{b_third}.0-24");
    let b_lease = format!(
        r#"{{"PublicIP":"192.0.2.12","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{b_pub}","Port":51820}}}}"#
    );
    c.etcd.etcdctl(&["put", &b_key, &b_lease]).unwrap();

    (wg, b_ip, b_key)
}

fn metric(c: &Cluster, name: &str) -> i64 {
    c.metric(0, &format!("{name} ")).unwrap_or(0)
}

#[test]
fn interop_with_wireguard_go_encrypted_both_ways_and_a_deleted_lease_ends_it() {
    require_tools();
    let _turn = WIREGUARD_GO.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster("wgi", 2, &config());
    let key_file = c.dir.join("a.wgkey");
    let _a = start_weft(&c, &key_file);
    let env = c.wait_env(0);
    assert!(env.contains("FLANNEL_MTU=1420\n"), "{env}");
    let a_ip = subnet_base(&env);

    // The key: generated, 0400, and A's lease carries its public key byte for byte as
    // flanneld writes it.
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o400);
    let a_pub = c.hosts[0].exec("sh", &["-c", &format!("wg pubkey < {}", key_file.display())]).unwrap();
    let a_pub = a_pub.trim();
    let a_key = format!("{PREFIX}/subnets/{}-24", a_ip);
    assert_eq!(
        c.etcd.etcdctl(&["get", "--print-value-only", &a_key]).unwrap().trim(),
        format!(
            r#"{{"PublicIP":"192.0.2.11","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{a_pub}","Port":51820}}}}"#
        )
    );
    let log = std::fs::read_to_string(c.dir.join(format!("{}.log", c.hosts[0].name))).unwrap_or_default();
    let private = std::fs::read_to_string(&key_file).unwrap();
    assert!(!log.contains(private.trim()), "the private key reached the log");
    assert!(log.contains("wireguard path: userspace"), "{log}");

    // flannel-wg as flanneld makes it: MTU, address, the network's route.
    let h1 = &c.hosts[0];
    let link: serde_json::Value =
        serde_json::from_str(&h1.exec("ip", &["-j", "-d", "addr", "show", "flannel-wg"]).unwrap()).unwrap();
    assert_eq!(link[0]["mtu"], 1420);
    assert_eq!(link[0]["addr_info"][0]["local"], a_ip.as_str(), "{link}");
    let routes = h1.exec("ip", &["route", "show", "dev", "flannel-wg"]).unwrap();
    assert!(routes.contains("10.5.0.0/16 scope link"), "{routes}");

    // Host 2: wireguard-go, set up from its lease as flanneld would.
    let h2 = &c.hosts[1];
    let (_wg, b_ip, b_key) = wireguard_go(&c, &a_ip, a_pub);

    // Pings both ways (the first from weft starts the handshake).
    wait_for(Duration::from_secs(20), "a first ping from weft to wireguard-go", || {
        ping(h1, &b_ip, "1", &[]).then_some(())
    });
    assert!(ping(h1, &b_ip, "5", &[]), "weft → wireguard-go");
    assert!(ping(h2, &a_ip, "5", &[]), "wireguard-go → weft");
    let shown = h2.exec("wg", &["show", "flannel-wg", "latest-handshakes"]).unwrap();
    assert!(shown.contains(a_pub) && !shown.contains("\t0\n"), "wireguard-go saw a handshake: {shown}");

    // TCP both ways.
    let to_b = tcp_stream(h2, h1, &b_ip);
    let to_a = tcp_stream(h1, h2, &a_ip);
    assert!(to_b > 1_000_000 && to_a > 1_000_000, "TCP bytes: weft→go {to_b}, go→weft {to_a}");

    // The LAN carries only ciphertext: pings with a recognisable payload both ways, and not
    // one datagram on port 51820 contains it.
    let pattern = b"weft plain!";
    let hex: String = pattern.iter().map(|b| format!("{b:02x}")).collect();
    let cap = capture(c.lan.ns.name.clone(), 4);
    std::thread::sleep(Duration::from_millis(300));
    assert!(ping(h1, &b_ip, "5", &["-s", "200", "-p", &hex]));
    assert!(ping(h2, &a_ip, "5", &["-s", "200", "-p", &hex]));
    let seen = cap.join().unwrap();
    let data: Vec<&Vec<u8>> = seen.iter().map(|(_, p)| p).filter(|p| p.first() == Some(&4) && p.len() >= 200).collect();
    assert!(data.len() >= 10, "captured {} WireGuard data datagrams of {} on port 51820", data.len(), seen.len());
    assert!(
        !seen.iter().any(|(_, p)| p.windows(pattern.len()).any(|w| w == pattern)),
        "a ping payload crossed the LAN in clear"
    );

    // An attacker on the LAN replays one of wireguard-go's datagrams to weft, and sends a
    // forged one (a fresh counter, so only the tag can give it away): both dropped, by
    // reason, and the peer's endpoint is not hijacked.
    let to_a: Vec<u8> = seen
        .iter()
        .find(|(dst, p)| *dst == IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11)) && p.first() == Some(&4) && p.len() >= 200)
        .map(|(_, p)| p.clone())
        .expect("a data datagram from wireguard-go to weft");
    let mut forged = to_a.clone();
    let counter = u64::from_le_bytes(forged[8..16].try_into().unwrap()) + 1_000;
    forged[8..16].copy_from_slice(&counter.to_le_bytes());
    let (replay0, auth0) = (
        metric(&c, r#"weft_wireguard_drops_total{reason="replay"}"#),
        metric(&c, r#"weft_wireguard_drops_total{reason="auth_failure"}"#),
    );
    weft::lab::netns::in_netns(&c.lan.ns.name, move || {
        let s = UdpSocket::bind("192.0.2.1:0").unwrap();
        s.send_to(&to_a, "192.0.2.11:51820").unwrap();
        s.send_to(&forged, "192.0.2.11:51820").unwrap();
    })
    .unwrap();
    wait_for(Duration::from_secs(5), "the replay and the forgery to be counted", || {
        (metric(&c, r#"weft_wireguard_drops_total{reason="replay"}"#) > replay0
            && metric(&c, r#"weft_wireguard_drops_total{reason="auth_failure"}"#) > auth0)
            .then_some(())
    });
    assert!(ping(h1, &b_ip, "3", &[]), "the peer's endpoint survived the attacker's datagrams");
    assert_eq!(metric(&c, r#"weft_wireguard_path{path="userspace"}"#), 1);
    assert!(metric(&c, r#"weft_wireguard_packets_total{kind="rx"}"#) > 0);

    // flannel-wg deleted behind weft's back: re-created, re-addressed, routed, and the
    // sessions carry on.
    h1.ip(&["link", "del", "flannel-wg"]).unwrap();
    wait_for(Duration::from_secs(20), "traffic after flannel-wg was re-created", || {
        ping(h1, &b_ip, "1", &[]).then_some(())
    });
    assert!(ping(h2, &a_ip, "3", &[]), "wireguard-go → weft after the repair");
    let routes = h1.exec("ip", &["route", "show", "dev", "flannel-wg"]).unwrap();
    assert!(routes.contains("10.5.0.0/16 scope link"), "{routes}");

    // The peer's lease deleted: neither side gets through any more.
    let unknown_before = metric(&c, r#"weft_wireguard_drops_total{reason="unknown_key"}"#);
    c.etcd.etcdctl(&["del", &b_key]).unwrap();
    wait_for(Duration::from_secs(10), "weft to drop the peer", || (!ping(h1, &b_ip, "1", &[])).then_some(()));
    assert!(!ping(h1, &b_ip, "3", &[]), "weft still reaches a peer whose lease is gone");
    assert!(!ping(h2, &a_ip, "3", &[]), "a peer whose lease is gone still reaches weft");
    assert!(metric(&c, r#"weft_wireguard_drops_total{reason="no_peer"}"#) > 0);
    assert!(
        metric(&c, r#"weft_wireguard_drops_total{reason="unknown_key"}"#) > unknown_before,
        "wireguard-go's datagrams were dropped as from an unknown key"
    );
}

#[test]
fn a_malformed_key_file_stops_the_daemon_and_is_left_alone() {
    let c = cluster("wgx", 1, &config());
    let key_file = c.dir.join("bad.wgkey");
    std::fs::write(&key_file, "this is not a key\n").unwrap();
    let mut d = start_weft(&c, &key_file);
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    let log = d.log();
    assert!(log.contains("is not a key") && log.contains("delete it"), "{log}");
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), "this is not a key\n", "never overwritten");
    assert!(!common::links(&c.hosts[0]).contains(&"flannel-wg".to_string()));
}

#[test]
fn traffic_flows_across_a_rekey() {
    require_tools();
    let _turn = WIREGUARD_GO.lock().unwrap_or_else(|p| p.into_inner());
    let c = cluster("wgl", 2, &config());
    let key_file = c.dir.join("a.wgkey");
    let _a = start_weft(&c, &key_file);
    let a_ip = subnet_base(&c.wait_env(0));
    let a_pub = c.hosts[0].exec("sh", &["-c", &format!("wg pubkey < {}", key_file.display())]).unwrap();
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    let (_wg, b_ip, _) = wireguard_go(&c, &a_ip, a_pub.trim());
    wait_for(Duration::from_secs(20), "a first ping from weft to wireguard-go", || {
        ping(h1, &b_ip, "1", &[]).then_some(())
    });
    let handshakes = |ns: &weft::lab::netns::Netns| -> u64 {
        let out = ns.exec("wg", &["show", "flannel-wg", "latest-handshakes"]).unwrap();
        out.split_whitespace().nth(1).and_then(|t| t.parse().ok()).unwrap_or(0)
    };
    let first = handshakes(h2);
    assert!(first > 0, "no handshake yet");
    let sent_before = metric(&c, r#"weft_wireguard_packets_total{kind="handshake_sent"}"#)
        + metric(&c, r#"weft_wireguard_packets_total{kind="handshake_received"}"#);
    // WireGuard rekeys a session after 120 s of use: ping both ways for 135 s.
    let back = h2.command("ping").args(["-q", "-c", "270", "-i", "0.5", &a_ip]).stdout(Stdio::piped()).spawn().unwrap();
    let out = h1.exec("ping", &["-q", "-c", "270", "-i", "0.5", &b_ip]).unwrap_or_else(|e| e.to_string());
    let back = String::from_utf8_lossy(&back.wait_with_output().unwrap().stdout).to_string();
    let received = |s: &str| -> u64 {
        s.split(',').find_map(|p| p.trim().strip_suffix(" received").and_then(|n| n.parse().ok())).unwrap_or(0)
    };
    assert!(received(&out) >= 265, "weft → wireguard-go across the rekey: {out}");
    assert!(received(&back) >= 265, "wireguard-go → weft across the rekey: {back}");
    assert!(handshakes(h2) > first, "no new handshake in 135 s: no rekey happened");
    let sent_after = metric(&c, r#"weft_wireguard_packets_total{kind="handshake_sent"}"#)
        + metric(&c, r#"weft_wireguard_packets_total{kind="handshake_received"}"#);
    assert!(sent_after > sent_before, "weft took part in no new handshake");
}
