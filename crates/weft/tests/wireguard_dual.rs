//! The wireguard backend with IPv6: dual-stack networks in flannel's `separate` mode (two
//! devices, `flannel-wg` over IPv4 and `flannel-wg-v6` over IPv6) and its single-device
//! `ipv6` mode (one `flannel-wg` carrying both families over IPv6, to weft and to Debian's
//! `wireguard-go` set up as flanneld sets up its device); the devices deleted on shutdown
//! as flanneld deletes them, and by `weft cleanup`; `auto` mode listening on both families,
//! keepalives and cookie replies under load on the wire.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Daemon, PREFIX, cluster};
use common::{wait_for, weft_bin};
use weft::lab::netns::Netns;

const PSK: &str = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";

fn config(extra: &str) -> String {
    format!(
        r#"{{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56","Backend":{{"Type":"wireguard","PSK":"{PSK}"{extra}}}}}"#
    )
}

/// Gives the LAN and each host an IPv6 address (`fd00:192::1<i>`).
fn ipv6_lan(c: &Cluster) {
    c.lan.ns.ip(&["addr", "add", "fd00:192::1/64", "dev", "br0", "nodad"]).unwrap();
    for (i, h) in c.hosts.iter().enumerate() {
        h.ip(&["addr", "add", &format!("fd00:192::1{}/64", i + 1), "dev", "eth0", "nodad"]).unwrap();
        h.ip(&["-6", "route", "add", "default", "via", "fd00:192::1"]).unwrap();
    }
}

fn start(c: &Cluster, i: usize) -> Daemon {
    let endpoints = format!("--etcd-endpoints={}", c.etcd.url());
    let subnet_file = format!("--subnet-file={}", c.env_file(i).display());
    let key = c.dir.join(format!("h{}.wgkey", i + 1)).display().to_string();
    Daemon::start_with_env(
        &c.hosts[i],
        &c.dir,
        &[&endpoints, &subnet_file, "-healthz-port", "8081"],
        &[("WIREGUARD_KEY_FILE", &key), ("WEFT_WIREGUARD", "userspace")],
    )
}

fn json(ns: &Netns, args: &[&str]) -> serde_json::Value {
    let out = ns.exec("ip", args).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip {args:?} printed {out}: {e}"))
}

fn link_names(ns: &Netns) -> Vec<String> {
    json(ns, &["-j", "link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

fn env_value(env: &str, key: &str) -> String {
    env.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in {env}")).to_string()
}

/// A bridge `cni0` holding the first address of each of our subnets (as the CNI plugin
/// makes it): the pods' side of the host.
fn cni0(h: &Netns, env: &str) {
    h.ip(&["link", "add", "cni0", "type", "bridge"]).unwrap();
    h.ip(&["link", "set", "cni0", "up"]).unwrap();
    h.ip(&["addr", "add", &env_value(env, "FLANNEL_SUBNET="), "dev", "cni0"]).unwrap();
    h.ip(&["addr", "add", &env_value(env, "FLANNEL_IPV6_SUBNET="), "dev", "cni0", "nodad"]).unwrap();
}

fn first(env: &str, key: &str) -> String {
    env_value(env, key).split('/').next().unwrap().to_string()
}

fn ping(ns: &Netns, src: &str, dst: &str, count: &str, extra: &[&str]) -> bool {
    let mut args = vec!["-c", count, "-W", "1", "-i", "0.2", "-I", src];
    args.extend_from_slice(extra);
    args.push(dst);
    ns.command("ping").args(&args).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success()
}

/// One TCP stream for 2 s from `client` to `[server_ip]` (server in `server`): bytes received.
fn tcp_stream(server: &Netns, client: &Netns, server_ip: &str) -> u64 {
    let mut srv = server.command("iperf3").args(["-s", "-1", "-p", "5299"]).stdout(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = client.exec("iperf3", &["-c", server_ip, "-p", "5299", "-t", "2", "-J"]).unwrap_or_default();
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("iperf3 printed {out}: {e}"));
    v["end"]["sum_received"]["bytes"].as_u64().unwrap_or_else(|| panic!("no received bytes in {out}"))
}

/// A UDP datagram seen on the LAN: outer family (6 or 4), destination port, payload.
type Seen = (u8, u16, Vec<u8>);

/// UDP datagrams on the LAN for `secs`, either family.
fn capture(lan: String, secs: u64) -> std::thread::JoinHandle<Vec<Seen>> {
    std::thread::spawn(move || {
        common::capture::udp_on(lan, secs).join().unwrap().into_iter().map(|d| (d.family, d.dport, d.payload)).collect()
    })
}

#[test]
fn dual_stack_separate_mode_two_devices_both_families_encrypted_and_deleted_on_shutdown() {
    let c = cluster("wga", 2, &config(""));
    ipv6_lan(&c);
    let mut d: Vec<Daemon> = (0..2).map(|i| start(&c, i)).collect();
    let envs: Vec<String> = (0..2).map(|i| c.wait_env(i)).collect();
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    assert!(envs[0].contains("FLANNEL_MTU=1420\n"), "{}", envs[0]);

    // The lease: both data, one key (flanneld's devices share the key file), each family's
    // port.
    let leases = c.etcd.etcdctl(&["get", "--prefix", &format!("{PREFIX}/subnets/")]).unwrap();
    let pub1 = h1.exec("sh", &["-c", &format!("wg pubkey < {}", c.dir.join("h1.wgkey").display())]).unwrap();
    let pub1 = pub1.trim();
    assert!(
        leases.contains(&format!(
            r#""BackendData":{{"PublicKey":"{pub1}","Port":51820}},"BackendV6Data":{{"PublicKey":"{pub1}","Port":51821}}"#
        )),
        "{leases}"
    );
    assert!(leases.contains(r#""PublicIPv6":"fd00:192::11""#) && leases.contains("&fd00:5:0:"), "{leases}");

    // Two devices as flanneld makes them: MTU, base address /32 and /128, network routes.
    for (h, env) in [(h1, &envs[0]), (h2, &envs[1])] {
        let v4 = json(h, &["-j", "addr", "show", "flannel-wg"]);
        let v6 = json(h, &["-j", "addr", "show", "flannel-wg-v6"]);
        assert_eq!((v4[0]["mtu"].as_u64(), v6[0]["mtu"].as_u64()), (Some(1420), Some(1420)), "{v4} {v6}");
        let base4 = first(env, "FLANNEL_SUBNET=").rsplit_once('.').map(|(a, _)| format!("{a}.0")).unwrap();
        let v4_addrs: Vec<(String, u64)> = v4[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["family"] == "inet")
            .map(|a| (a["local"].as_str().unwrap().to_string(), a["prefixlen"].as_u64().unwrap()))
            .collect();
        assert_eq!(v4_addrs, [(base4, 32)]);
        let base6 = first(env, "FLANNEL_IPV6_SUBNET=").trim_end_matches('1').to_string();
        let has6 = v6[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["local"] == base6.as_str() && a["prefixlen"] == 128 && a["family"] == "inet6");
        assert!(has6, "{base6}/128 on flannel-wg-v6: {v6}");
        let r4 = json(h, &["-j", "-4", "route", "show", "dev", "flannel-wg"]);
        assert!(r4.as_array().unwrap().iter().any(|r| r["dst"] == "10.5.0.0/16"), "{r4}");
        let r6 = json(h, &["-j", "-6", "route", "show", "dev", "flannel-wg-v6"]);
        assert!(r6.as_array().unwrap().iter().any(|r| r["dst"] == "fd00:5::/56"), "{r6}");
        cni0(h, env);
    }

    // Pods' addresses ping each other in both families, and TCP runs over IPv6 (TSO and
    // GSO on the IPv6 path); the LAN sees IPv4 datagrams on 51820 and IPv6 ones on 51821,
    // and not one carries the payload in clear.
    let (a4, b4) = (first(&envs[0], "FLANNEL_SUBNET="), first(&envs[1], "FLANNEL_SUBNET="));
    let (a6, b6) = (first(&envs[0], "FLANNEL_IPV6_SUBNET="), first(&envs[1], "FLANNEL_IPV6_SUBNET="));
    wait_for(Duration::from_secs(20), "a first IPv6 ping over flannel-wg-v6", || {
        ping(h1, &a6, &b6, "1", &[]).then_some(())
    });
    wait_for(Duration::from_secs(20), "a first IPv4 ping over flannel-wg", || {
        ping(h1, &a4, &b4, "1", &[]).then_some(())
    });
    let pattern = b"weft plain six!";
    let hex: String = pattern.iter().map(|b| format!("{b:02x}")).collect();
    let cap = capture(c.lan.ns.name.clone(), 4);
    std::thread::sleep(Duration::from_millis(300));
    assert!(ping(h1, &a6, &b6, "5", &["-s", "200", "-p", &hex]), "h1 → h2 over IPv6");
    assert!(ping(h2, &b6, &a6, "5", &["-s", "200", "-p", &hex]), "h2 → h1 over IPv6");
    assert!(ping(h1, &a4, &b4, "5", &["-s", "200", "-p", &hex]), "h1 → h2 over IPv4");
    let seen = cap.join().unwrap();
    let data = |family: u8, port: u16| {
        seen.iter().filter(|(f, p, d)| *f == family && *p == port && d.first() == Some(&4) && d.len() >= 200).count()
    };
    assert!(data(6, 51821) >= 10, "IPv6 pod traffic in WireGuard data messages over IPv6 to 51821");
    assert!(data(4, 51820) >= 5, "IPv4 pod traffic over IPv4 to 51820");
    assert_eq!(data(4, 51821) + data(6, 51820), 0, "each family on its own device and port");
    assert!(!seen.iter().any(|(_, _, d)| d.windows(pattern.len()).any(|w| w == pattern)), "payload in clear");
    let bytes = tcp_stream(h2, h1, &b6);
    assert!(bytes > 1_000_000, "TCP over flannel-wg-v6: {bytes} bytes");
    assert!(c.metric(0, "weft_wireguard_peers ").unwrap_or(0) == 2, "one peer on each device");

    // Shutdown: flanneld deletes its WireGuard devices; so does weft.
    assert!(link_names(h1).iter().any(|l| l == "flannel-wg-v6"));
    d[0].signal(libc::SIGTERM);
    let status = d[0].wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}: {}", d[0].log());
    let left = link_names(h1);
    assert!(!left.iter().any(|l| l.starts_with("flannel-wg")), "devices left after shutdown: {left:?}");
    assert!(d[0].log().contains("wireguard devices deleted"), "{}", d[0].log());
    // The other host is untouched.
    assert!(link_names(h2).iter().any(|l| l == "flannel-wg-v6"));
}

#[test]
fn ipv6_mode_one_device_carries_both_families_over_ipv6_to_weft_and_to_wireguard_go() {
    let c = cluster("wgb", 2, &config(r#","Mode":"ipv6","ListenPort":6000"#));
    ipv6_lan(&c);
    if !std::path::Path::new("/sys/module/wireguard").exists() {
        // The kernel path demanded where the kernel has no WireGuard: a clear error, not a
        // silent fallback.
        let endpoints = format!("--etcd-endpoints={}", c.etcd.url());
        let subnet_file = format!("--subnet-file={}", c.env_file(0).display());
        let key = c.dir.join("h1.wgkey").display().to_string();
        let mut k = Daemon::start_with_env(
            &c.hosts[0],
            &c.dir,
            &[&endpoints, &subnet_file, "-healthz-port", "8081"],
            &[("WIREGUARD_KEY_FILE", &key), ("WEFT_WIREGUARD", "kernel")],
        );
        assert!(!k.wait_exit(Duration::from_secs(20)).success());
        assert!(k.log().contains("cannot create a wireguard link") && k.log().contains("unset WEFT_WIREGUARD"));
    }
    let mut d: Vec<Daemon> = (0..2).map(|i| start(&c, i)).collect();
    let envs: Vec<String> = (0..2).map(|i| c.wait_env(i)).collect();
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    let names = link_names(h1);
    assert!(names.contains(&"flannel-wg".to_string()), "{names:?}");
    assert!(!names.contains(&"flannel-wg-v6".to_string()), "one device in ipv6 mode: {names:?}");
    let leases = c.etcd.etcdctl(&["get", "--prefix", "--print-value-only", &format!("{PREFIX}/subnets/")]).unwrap();
    assert!(leases.contains(r#""Port":6000},"BackendV6Data":{"PublicKey":"#), "{leases}");
    assert!(!leases.contains("51821"), "the one device listens on ListenPort: {leases}");
    let r6 = json(h1, &["-j", "-6", "route", "show", "dev", "flannel-wg"]);
    assert!(r6.as_array().unwrap().iter().any(|r| r["dst"] == "fd00:5::/56"), "{r6}");
    for (h, env) in [(h1, &envs[0]), (h2, &envs[1])] {
        cni0(h, env);
    }
    let (a4, b4) = (first(&envs[0], "FLANNEL_SUBNET="), first(&envs[1], "FLANNEL_SUBNET="));
    let (a6, b6) = (first(&envs[0], "FLANNEL_IPV6_SUBNET="), first(&envs[1], "FLANNEL_IPV6_SUBNET="));
    wait_for(Duration::from_secs(20), "a first IPv4 ping over IPv6", || ping(h1, &a4, &b4, "1", &[]).then_some(()));
    let cap = capture(c.lan.ns.name.clone(), 3);
    std::thread::sleep(Duration::from_millis(300));
    assert!(ping(h1, &a4, &b4, "5", &["-s", "200"]), "IPv4 pods over IPv6");
    assert!(ping(h2, &b6, &a6, "5", &["-s", "200"]), "IPv6 pods over IPv6");
    let seen = cap.join().unwrap();
    let v6_data = seen.iter().filter(|(f, p, d)| *f == 6 && *p == 6000 && d.first() == Some(&4)).count();
    let v4_data = seen.iter().filter(|(f, _, d)| *f == 4 && d.first() == Some(&4)).count();
    assert!(v6_data >= 10 && v4_data == 0, "ipv6 mode: {v6_data} data messages over IPv6, {v4_data} over IPv4");
    let bytes = tcp_stream(h1, h2, &a4);
    assert!(bytes > 1_000_000, "TCP (IPv4 inside IPv6): {bytes} bytes");

    // The reference implementation over IPv6: h2 now runs Debian's wireguard-go, set up with
    // `wg` as flanneld sets up its ipv6-mode device (key, ListenPort, weft as the peer at
    // [PublicIPv6]:Port with both subnets, PSK), and a lease with its key.
    d[1].signal(libc::SIGTERM);
    d[1].wait_exit(Duration::from_secs(20));
    let b_priv = h2.exec("wg", &["genkey"]).unwrap().trim().to_string();
    let b_pub = h2.exec("sh", &["-c", &format!("echo {b_priv} | wg pubkey")]).unwrap().trim().to_string();
    let a_pub = h1.exec("sh", &["-c", &format!("wg pubkey < {}", c.dir.join("h1.wgkey").display())]).unwrap();
    std::fs::write(c.dir.join("b.key"), &b_priv).unwrap();
    std::fs::write(c.dir.join("psk"), PSK).unwrap();
    let mut wg = h2
        .command("wireguard-go")
        .args(["-f", "flannel-wg"])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(10), "wireguard-go's flannel-wg", || {
        link_names(h2).contains(&"flannel-wg".to_string()).then_some(())
    });
    let sub = |env: &str, key: &str| env_value(env, key).replace("::1/", "::/").replace(".1/", ".0/");
    let allowed = format!("{},{}", sub(&envs[0], "FLANNEL_SUBNET="), sub(&envs[0], "FLANNEL_IPV6_SUBNET="));
    let (key_path, psk_path) = (c.dir.join("b.key").display().to_string(), c.dir.join("psk").display().to_string());
    wait_for(Duration::from_secs(10), "wg set to succeed", || {
        h2.exec(
            "wg",
            &[
                "set",
                "flannel-wg",
                "private-key",
                &key_path,
                "listen-port",
                "6000",
                "peer",
                a_pub.trim(),
                "preshared-key",
                &psk_path,
                "endpoint",
                "[fd00:192::11]:6000",
                "allowed-ips",
                &allowed,
            ],
        )
        .ok()
    });
    h2.ip(&["link", "set", "flannel-wg", "mtu", "1420", "up"]).unwrap();
    h2.ip(&["route", "replace", "10.5.0.0/16", "dev", "flannel-wg", "scope", "link"]).unwrap();
    h2.ip(&["-6", "route", "replace", "fd00:5::/56", "dev", "flannel-wg"]).unwrap();
    let b_key = format!(
        "{PREFIX}/subnets/{}&{}",
        sub(&envs[1], "FLANNEL_SUBNET=").replace('/', "-"),
        sub(&envs[1], "FLANNEL_IPV6_SUBNET=").replace('/', "-")
    );
    let data = format!(r#"{{"PublicKey":"{b_pub}","Port":6000}}"#);
    let lease = format!(
        r#"{{"PublicIP":"192.0.2.12","PublicIPv6":"fd00:192::12","BackendType":"wireguard","BackendData":{data},"BackendV6Data":{data}}}"#
    );
    c.etcd.etcdctl(&["put", &b_key, &lease]).unwrap();
    wait_for(Duration::from_secs(20), "weft → wireguard-go over IPv6", || ping(h1, &a6, &b6, "1", &[]).then_some(()));
    assert!(ping(h1, &a4, &b4, "3", &[]), "IPv4 pods, weft → wireguard-go, over IPv6");
    assert!(ping(h2, &b6, &a6, "3", &[]), "IPv6 pods, wireguard-go → weft");
    assert!(ping(h2, &b4, &a4, "3", &[]), "IPv4 pods, wireguard-go → weft");
    let ends = h2.exec("wg", &["show", "flannel-wg", "endpoints"]).unwrap();
    assert!(ends.contains("[fd00:192::11]:6000"), "wireguard-go speaks to weft over IPv6: {ends}");
    let _ = wg.kill();
    let _ = wg.wait();

    // After shutdown, `weft cleanup` deletes a WireGuard device someone left (a persistent
    // TUN called flannel-wg, as wireguard-go or an engine with a persistent device leaves
    // it) and leaves a bridge that only shares flannel-wg-v6's name.
    d[0].signal(libc::SIGTERM);
    d[0].wait_exit(Duration::from_secs(20));
    h1.ip(&["tuntap", "add", "dev", "flannel-wg", "mode", "tun"]).unwrap();
    h1.ip(&["link", "add", "flannel-wg-v6", "type", "bridge"]).unwrap();
    let sf = format!("--subnet-file={}", c.dir.join("none.env").display());
    let cni = format!("--cni-data-dir={}", c.dir.join("cni").display());
    let o = h1.command(weft_bin()).args(["cleanup", &sf, &cni]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("device flannel-wg "), "cleanup reports what it removed: {out}");
    let names = link_names(h1);
    assert!(!names.contains(&"flannel-wg".to_string()), "{names:?}");
    assert!(names.contains(&"flannel-wg-v6".to_string()), "someone's bridge survives: {names:?}");
}

fn v4_config() -> String {
    format!(
        r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"wireguard","PSK":"{PSK}","PersistentKeepaliveInterval":2,"Mode":"auto"}}}}"#
    )
}

fn base(env: &str) -> String {
    first(env, "FLANNEL_SUBNET=").rsplit_once('.').map(|(a, _)| format!("{a}.0")).unwrap()
}

fn host_ping(ns: &Netns, dst: &str, count: &str) -> bool {
    let args = ["-c", count, "-W", "1", "-i", "0.2", dst];
    ns.command("ping").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success()
}

#[test]
fn keepalives_every_interval_and_cookie_replies_under_load() {
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};

    // `auto` mode on hosts with both families: one device listening on both (the peers'
    // IPv4 addresses are public, so IPv4 is used).
    let c = cluster("wgc", 2, &v4_config());
    ipv6_lan(&c);
    let mut d: Vec<Daemon> = (0..2).map(|i| start(&c, i)).collect();
    let envs: Vec<String> = (0..2).map(|i| c.wait_env(i)).collect();
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    let (a, b) = (base(&envs[0]), base(&envs[1]));
    wait_for(Duration::from_secs(20), "a first ping h1 → h2", || host_ping(h1, &b, "1").then_some(()));
    let listening = h1.exec("ss", &["-Hnul"]).unwrap();
    assert!(
        listening.contains("192.0.2.11:51820") && listening.contains("[fd00:192::11]:51820"),
        "auto mode listens on both families: {listening}"
    );

    // Idle: with PersistentKeepaliveInterval 2, each side sends a keepalive (an empty data
    // message: 32 bytes) about every 2 s, and nothing else.
    std::thread::sleep(Duration::from_secs(1));
    let idle = common::capture::udp_on(c.lan.ns.name.clone(), 9).join().unwrap();
    for host in
        [std::net::Ipv4Addr::new(192, 0, 2, 11), std::net::Ipv4Addr::new(192, 0, 2, 12)].map(std::net::IpAddr::V4)
    {
        let times: Vec<f64> = idle
            .iter()
            .filter(|d| d.src == host && d.dport == 51820 && d.payload.first() == Some(&4))
            .filter(|d| d.payload.len() == 32)
            .map(|d| d.at)
            .fold(Vec::new(), |mut v: Vec<f64>, t| {
                // The LAN namespace sees each frame on both bridge ports: one keepalive.
                if v.last().is_none_or(|l| t - l > 0.1) {
                    v.push(t);
                }
                v
            });
        assert!(times.len() >= 3, "{host}: keepalives at {times:?} in 9 idle seconds");
        for w in times.windows(2) {
            let gap = w[1] - w[0];
            assert!((1.2..=3.5).contains(&gap), "{host}: keepalives {gap:.2} s apart (want about 2): {times:?}");
        }
    }
    assert!(c.metric(0, r#"weft_wireguard_packets_total{kind="keepalive_sent"} "#).unwrap_or(0) >= 3);

    // Under load: a LAN attacker floods h1 with handshake initiations (valid MAC1 for h1's
    // public key, from a key no lease has). h1 answers with cookie replies (type 3) and
    // counts them; a legitimate peer (h2, restarted, so it must handshake again) still gets
    // through by proving its address with the cookie.
    let pub_a = h1.exec("sh", &["-c", &format!("wg pubkey < {}", c.dir.join("h1.wgkey").display())]).unwrap();
    let pub_a: [u8; 32] = base64_decode(pub_a.trim());
    let under_load = || c.metric(0, r#"weft_wireguard_drops_total{reason="under_load"} "#).unwrap_or(0);
    let before = under_load();
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = flooding.clone();
    let lan = c.lan.ns.name.clone();
    let flood = std::thread::spawn(move || {
        weft::lab::netns::in_netns(&lan, move || {
            let s = std::net::UdpSocket::bind("192.0.2.1:0").unwrap();
            s.set_nonblocking(true).unwrap();
            let mut tunn =
                Tunn::new(StaticSecret::from(rand::random::<[u8; 32]>()), PublicKey::from(pub_a), None, None, 7, None);
            let (mut sent, mut cookies, mut other) = (0u64, 0u64, 0u64);
            let mut buf = vec![0u8; 256];
            let mut rx = vec![0u8; 2048];
            let start = Instant::now();
            // Until told to stop, and at least 3000 initiations (a loaded machine may have let
            // the real peer through sooner than two seconds of flood).
            while (flag.load(std::sync::atomic::Ordering::Relaxed) || sent <= 3000)
                && start.elapsed() < Duration::from_secs(60)
            {
                // About 1500 initiations a second, well above the limit of 200.
                if (sent as f64) < start.elapsed().as_secs_f64() * 1500.0
                    && let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut buf, true)
                {
                    s.send_to(p, "192.0.2.11:51820").unwrap();
                    sent += 1;
                }
                while let Ok(n) = s.recv(&mut rx) {
                    if n == 64 && rx[0] == 3 { cookies += 1 } else { other += 1 }
                }
            }
            (sent, cookies, other)
        })
        .unwrap()
    });
    std::thread::sleep(Duration::from_secs(2));
    d[1].signal(libc::SIGTERM);
    d[1].wait_exit(Duration::from_secs(20));
    d[1] = start(&c, 1);
    wait_for(Duration::from_secs(40), "h2 to reach h1 again while h1 is under load", || {
        host_ping(h2, &a, "1").then_some(())
    });
    let during = under_load();
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let (sent, cookies, other) = flood.join().unwrap();
    assert!(sent > 3000, "the flood sent {sent} initiations");
    assert!(cookies > 100, "{cookies} cookie replies for {sent} initiations");
    assert_eq!(other, 0, "an unknown key got something other than cookie replies");
    assert!(during > before + 100, "under_load drops counted: {before} → {during}");
    assert!(c.metric(0, r#"weft_wireguard_packets_total{kind="cookie_sent"} "#).unwrap_or(0) >= cookies as i64);
    assert!(host_ping(h1, &b, "3"), "h1 → h2 after the flood");
}

fn base64_decode(s: &str) -> [u8; 32] {
    weft_core::wireguard::Key::parse(s).unwrap().0
}
