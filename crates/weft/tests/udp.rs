//! The udp backend on the wire, with bytes this test builds and parses itself: a
//! hand-made datagram from a peer reaches a pod, the answer is exactly one IPv4 packet per
//! datagram with the TTL decremented, and datagrams from strangers, with spoofed sources or
//! garbage are dropped and counted; once with the kernel fast path (tc programs) carrying
//! the good packets, once with the user-space engine alone.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::process::Stdio;
use std::time::Duration;

use common::cluster::{PREFIX, cluster};
use common::wait_for;
use weft::lab::netns::in_netns;

const UDP: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#;

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 ICMP echo request with 16 bytes of payload.
fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, id: u16) -> Vec<u8> {
    let mut p = vec![0u8; 20 + 8 + 16];
    p[0] = 0x45;
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = ttl;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20] = 8;
    p[24..26].copy_from_slice(&id.to_be_bytes());
    p[28..].copy_from_slice(b"weft-udp-interop");
    let c = checksum(&p[20..]);
    p[22..24].copy_from_slice(&c.to_be_bytes());
    p
}

fn drops(c: &common::cluster::Cluster, reason: &str) -> i64 {
    c.metric(0, &format!("weft_udp_drops_total{{reason=\"{reason}\"}} ")).unwrap_or(0)
}

/// The processes started as the daemon writing `subnet_file` (the daemon, and any wrapper
/// that started it).
fn daemon_pids(subnet_file: &std::path::Path) -> Vec<u32> {
    let want = format!("--subnet-file={}", subnet_file.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.contains(&&b"daemon"[..]) && args.contains(&want.as_bytes())
        })
        .collect()
}

/// The tcx links (kernel-side program attachments) a process holds: (ifindex, attach type).
fn tcx_links(pid: u32) -> Vec<(u32, String)> {
    let mut links = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        let field = |k: &str| info.lines().find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()));
        if field("link_type:").as_deref() == Some("tcx") {
            let ifindex = field("ifindex:").and_then(|v| v.parse().ok()).unwrap_or(0);
            // "47 (egress)"
            let kind = field("attach_type:").unwrap_or_default();
            links.push((
                ifindex,
                kind.split_once('(').map(|(_, k)| k.trim_end_matches(')')).unwrap_or(&kind).to_string(),
            ));
        }
    }
    links.sort();
    links
}

fn ifindex(c: &common::cluster::Cluster, name: &str) -> u32 {
    let link: serde_json::Value =
        serde_json::from_str(&c.hosts[0].exec("ip", &["-j", "link", "show", name]).unwrap()).unwrap();
    link[0]["ifindex"].as_u64().unwrap() as u32
}

#[test]
fn flannel_wire_format_both_ways_and_untrusted_datagrams_are_dropped_with_the_fast_path() {
    wire_format(true);
}

#[test]
fn flannel_wire_format_both_ways_and_untrusted_datagrams_are_dropped_by_the_engine_alone() {
    wire_format(false);
}

fn wire_format(fast: bool) {
    let c = cluster(if fast { "udp" } else { "udq" }, 3, UDP);
    let env: &[(&str, &str)] = if fast { &[] } else { &[("WEFT_UDP_DISABLE", "tc_bpf")] };
    let _d = c.daemon_with_env(0, &[], env);
    let env = c.wait_env(0);
    assert!(env.contains("FLANNEL_MTU=1472\n"), "{env}");
    let sub = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).unwrap().to_string();
    let third: u8 = sub.split('.').nth(2).unwrap().parse().unwrap();
    // The lease as flannel's udp backend writes it: no BackendType.
    let key = format!("{PREFIX}/subnets/10.5.{third}.0-24");
    assert_eq!(
        c.etcd.etcdctl(&["get", "--print-value-only", &key]).unwrap().trim(),
        r#"{"PublicIP":"192.0.2.11","PublicIPv6":null}"#
    );
    // flannel0 as flannel makes it.
    let link: serde_json::Value =
        serde_json::from_str(&c.hosts[0].exec("ip", &["-j", "-d", "link", "show", "flannel0"]).unwrap()).unwrap();
    assert_eq!(link[0]["mtu"], 1472);
    assert_eq!(link[0]["linkinfo"]["info_kind"], "tun");
    let routes = c.hosts[0].exec("ip", &["route", "show", "dev", "flannel0"]).unwrap();
    assert!(routes.contains("10.5.0.0/16 scope link"), "{routes}");

    // A pod on host 1: a namespace on host 1's cni0 bridge.
    let h1 = &c.hosts[0];
    h1.ip(&["link", "add", "cni0", "type", "bridge"]).unwrap();
    h1.ip(&["addr", "add", &sub, "dev", "cni0"]).unwrap();
    h1.ip(&["link", "set", "cni0", "up"]).unwrap();
    h1.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
    let pod = weft::lab::netns::Netns::add(&format!("{}pod", c.hosts[0].name.trim_end_matches("h1"))).unwrap();
    pod.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "vpod", "netns", &h1.name]).unwrap();
    h1.ip(&["link", "set", "vpod", "master", "cni0", "up"]).unwrap();
    let pod_ip = Ipv4Addr::new(10, 5, third, 5);
    pod.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"]).unwrap();
    pod.ip(&["link", "set", "eth0", "up"]).unwrap();
    pod.ip(&["route", "add", "default", "via", &format!("10.5.{third}.1")]).unwrap();

    // Host 2 is a flannel peer made by hand: a lease, and a plain UDP socket on port 8285.
    let peer_third = if third == 200 { 201 } else { 200 };
    c.etcd
        .etcdctl(&[
            "put",
            &format!("{PREFIX}/subnets/10.5.{peer_third}.0-24"),
            r#"{"PublicIP":"192.0.2.12","PublicIPv6":null}"#,
        ])
        .unwrap();
    wait_for(Duration::from_secs(5), "the peer to be known", || (c.metric(0, "weft_peers ") == Some(1)).then_some(()));
    let peer_src = Ipv4Addr::new(10, 5, peer_third, 7);
    let request = echo_request(peer_src, pod_ip, 64, 0x77);
    let reply = in_netns(&c.hosts[1].name, move || {
        let s = UdpSocket::bind("192.0.2.12:8285").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(&request, "192.0.2.11:8285").unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf).expect("the pod's reply comes back as a datagram");
        (buf[..n].to_vec(), from)
    })
    .unwrap();
    let (dgram, from) = reply;
    assert_eq!(from.to_string(), "192.0.2.11:8285");
    // Exactly one raw IPv4 packet, no header of ours around it.
    assert_eq!(dgram[0] >> 4, 4);
    assert_eq!(usize::from(u16::from_be_bytes([dgram[2], dgram[3]])), dgram.len(), "one packet fills the datagram");
    assert_eq!(dgram[9], 1, "ICMP");
    assert_eq!(dgram[20], 0, "echo reply");
    assert_eq!(&dgram[12..16], &pod_ip.octets());
    assert_eq!(&dgram[16..20], &peer_src.octets());
    assert_eq!(dgram[8], 62, "the pod sent TTL 64, host 1 routed it (63), the engine decremented it once more");
    assert_eq!(checksum(&dgram[..20]), 0, "header checksum still valid after the TTL change");
    assert_eq!(&dgram[28..], b"weft-udp-interop");

    // Strangers, spoofed sources and garbage are dropped and counted; the engine keeps going.
    let stranger = echo_request(Ipv4Addr::new(10, 5, peer_third, 8), pod_ip, 64, 1);
    in_netns(&c.hosts[2].name, move || {
        let s = UdpSocket::bind("192.0.2.13:8285").unwrap();
        s.send_to(&stranger, "192.0.2.11:8285").unwrap();
    })
    .unwrap();
    wait_for(Duration::from_secs(3), "an unknown_peer drop", || (drops(&c, "unknown_peer") == 1).then_some(()));
    let spoofed = echo_request(Ipv4Addr::new(10, 5, 99, 1), pod_ip, 64, 2);
    let elsewhere = echo_request(peer_src, Ipv4Addr::new(10, 5, 98, 1), 64, 3);
    in_netns(&c.hosts[1].name, move || {
        let s = UdpSocket::bind("192.0.2.12:8285").unwrap();
        for d in [&spoofed[..], &elsewhere[..], &[0x45, 0, 0][..], &[0x60; 40][..], &[][..]] {
            s.send_to(d, "192.0.2.11:8285").unwrap();
        }
    })
    .unwrap();
    wait_for(Duration::from_secs(3), "the drops to be counted", || {
        (drops(&c, "spoofed_source") == 1
            && drops(&c, "not_for_us") == 1
            && drops(&c, "truncated") >= 2
            && drops(&c, "malformed") >= 1)
            .then_some(())
    });
    assert_eq!(c.metric(0, "weft_udp_offload{feature=\"udp_gso\"} "), Some(1), "the path in use is in /metrics");
    // Which path carried the good packets, by the kernel's own account of the programs the
    // daemon holds attached, and by the counters.
    let pids = daemon_pids(&c.env_file(0));
    assert!(!pids.is_empty(), "the daemon's process");
    let links: Vec<(u32, String)> = pids.iter().flat_map(|p| tcx_links(*p)).collect();
    let fast_rx = c.metric(0, "weft_udp_fast_path_packets_total{direction=\"rx\"} ").unwrap_or(0);
    let fast_tx = c.metric(0, "weft_udp_fast_path_packets_total{direction=\"tx\"} ").unwrap_or(0);
    let engine_rx = c.metric(0, "weft_udp_packets_total{direction=\"rx\"} ").unwrap_or(0);
    if fast {
        let mut want = vec![
            (ifindex(&c, "flannel0"), "egress".to_string()),
            (ifindex(&c, "eth0"), "ingress".to_string()),
            (ifindex(&c, "weft-udp-rx"), "ingress".to_string()),
        ];
        want.sort();
        assert_eq!(
            links, want,
            "the fast path's three programs: flannel0's egress, the LAN interface's and weft-udp-rx's ingress"
        );
        assert_eq!(c.metric(0, "weft_udp_offload{feature=\"tc_bpf\"} "), Some(1));
        assert!(fast_rx >= 1 && fast_tx >= 1, "the request and its reply went through the kernel: {fast_rx} {fast_tx}");
        assert_eq!(engine_rx, 0, "nothing good was left to the engine");
        // Strangers and garbage were handed on to the engine, which dropped them: counted
        // above. UDP GRO is off, so a NIC does not merge datagrams past the fast path.
        assert_eq!(c.metric(0, "weft_udp_offload{feature=\"udp_gro\"} "), Some(0));
    } else {
        assert!(links.is_empty(), "no programs attached: {links:?}");
        assert_eq!(c.metric(0, "weft_udp_offload{feature=\"tc_bpf\"} "), Some(0));
        assert_eq!(fast_rx + fast_tx, 0);
        assert!(engine_rx >= 1, "the engine carried the request");
    }
    // Still forwarding after all that.
    let again = echo_request(peer_src, pod_ip, 64, 9);
    let ok = in_netns(&c.hosts[1].name, move || {
        let s = UdpSocket::bind("192.0.2.12:8285").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(&again, "192.0.2.11:8285").unwrap();
        let mut buf = [0u8; 2048];
        s.recv_from(&mut buf).is_ok()
    })
    .unwrap();
    assert!(ok);
}

/// The engine's threads in this process, by name.
fn engine_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            matches!(comm.trim_end(), "udp-tun-to-net" | "udp-net-to-tun")
        })
        .count()
}

/// Stopping the engine (what SIGTERM and a restart do) ends and joins both forwarding
/// threads, idle or not; a restarted engine forwards with two threads again, and dropping
/// it leaves none behind.
#[test]
fn the_udp_engine_stops_and_restarts_without_leaving_threads() {
    let prefix = common::prefix("uen");
    let ns = weft::lab::netns::Netns::add(&format!("{prefix}e")).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    let own: ipnet::Ipv4Net = "10.5.1.0/24".parse().unwrap();
    in_netns(&ns.name, move || {
        let metrics = weft::metrics::Metrics::new();
        let mut engine = weft::udp::Udp::open(Ipv4Addr::LOCALHOST, 8285).unwrap();
        assert_eq!(engine_threads(), 0);
        for round in 0..3 {
            engine.start(own, own.network(), 1472, &metrics).unwrap();
            wait_for(Duration::from_secs(5), "two engine threads", || (engine_threads() == 2).then_some(()));
            if round == 1 {
                // Busy: a datagram in flight while it stops.
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.send_to(&[0x45; 40], "127.0.0.1:8285").unwrap();
            }
            let started = std::time::Instant::now();
            engine.stop();
            assert!(started.elapsed() < Duration::from_secs(5), "stop took {:?}", started.elapsed());
            assert_eq!(engine_threads(), 0, "threads left after stop {round}");
            assert!(!engine.is_running());
        }
        engine.start(own, own.network(), 1472, &metrics).unwrap();
        // A restart without a stop in between replaces the threads, never adds to them.
        engine.start(own, own.network(), 1472, &metrics).unwrap();
        wait_for(Duration::from_secs(5), "two engine threads after a restart", || {
            (engine_threads() == 2).then_some(())
        });
        // Named threads appear when they run: give a third one time to show up.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(engine_threads(), 2);
        drop(engine);
        assert_eq!(engine_threads(), 0, "threads left after drop");
    })
    .unwrap();
}

/// (rx bytes, rx packets) of `dev` in namespace `ns`, by the kernel's counters.
fn rx_counts(ns: &weft::lab::netns::Netns, dev: &str) -> (u64, u64) {
    let out = ns.ip(&["-j", "-s", "link", "show", dev]).unwrap_or_else(|e| panic!("{dev} in {}: {e}", ns.name));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rx = &v[0]["stats64"]["rx"];
    (rx["bytes"].as_u64().unwrap(), rx["packets"].as_u64().unwrap())
}

/// One TCP stream for 2 s from `client` to `server_ip:5301` (server in `server`): bytes
/// the server received.
fn tcp_stream(server: &weft::lab::netns::Netns, client: &weft::lab::netns::Netns, server_ip: &str) -> u64 {
    let mut srv = server.command("iperf3").args(["-s", "-1", "-p", "5301"]).stdout(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = client.exec("iperf3", &["-c", server_ip, "-p", "5301", "-t", "2", "-J"]);
    let _ = srv.kill();
    let _ = srv.wait();
    let out = out.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("iperf3 printed {out}: {e}"));
    v["end"]["sum_received"]["bytes"].as_u64().unwrap_or_else(|| panic!("no received bytes in {out}"))
}

/// A peer's TCP super-packets reach the pod whole (as vxlan's do) through the receive
/// device `weft-udp-rx`, which is sealed; a firewall that drops its port costs a moment,
/// not the traffic; the device deleted comes back; its port cannot be reached from outside.
#[test]
fn super_packets_reach_pods_whole_through_the_sealed_receive_device() {
    use common::lab::{ok, status};
    common::require_root();
    weft::lab::netns::remove_prefixed("wtlrx");
    let name = format!("wtlrx{}", std::process::id() % 100_000);
    struct Down(String);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = common::lab::lab(&["down", "--name", &self.0]);
        }
    }
    ok(&["up", "--name", &name, "--backend", "udp", "--hosts", "2", "--pods-per-host", "1"]);
    let _down = Down(name.clone());
    let st = status(&name);
    let h2 = weft::lab::netns::Netns::existing(st["hosts"][1]["namespace"].as_str().unwrap());
    let h2_ip = st["hosts"][1]["ip"].as_str().unwrap().to_string();
    let pod1 = weft::lab::netns::Netns::existing(st["hosts"][0]["pods"][0]["netns"].as_str().unwrap());
    let pod2 = weft::lab::netns::Netns::existing(st["hosts"][1]["pods"][0]["netns"].as_str().unwrap());
    let pod2_ip = st["hosts"][1]["pods"][0]["ip"].as_str().unwrap().to_string();
    let log = weft::lab::state::dir(&name).join("h2/daemon.log");
    let metric = |m: &str| -> Option<i64> {
        let (_, body) = weft::lab::netns::http_get(&h2.name, 8081, "/metrics")?;
        body.lines().find_map(|l| l.strip_prefix(m).and_then(|v| v.trim().parse().ok()))
    };
    let detour = || metric("weft_udp_offload{feature=\"rx_vxlan\"} ");

    // The device as made: VXLAN on the port after flannel's, no learning, and sealed.
    let link: serde_json::Value =
        serde_json::from_str(&h2.ip(&["-j", "-d", "link", "show", "weft-udp-rx"]).unwrap()).unwrap();
    let info = &link[0]["linkinfo"]["info_data"];
    assert_eq!(link[0]["linkinfo"]["info_kind"], "vxlan", "{link}");
    assert_eq!(info["port"], 8286, "{link}");
    assert_eq!(info["learning"], false, "{link}");
    let sysctl = |k: &str| h2.exec("sysctl", &["-n", k]).unwrap().trim().to_string();
    assert_eq!(sysctl("net.ipv4.conf.weft-udp-rx.forwarding"), "0", "nothing is forwarded from it");
    assert_eq!(sysctl("net.ipv4.conf.weft-udp-rx.rp_filter"), "1");
    assert_eq!(detour(), Some(1));

    // A stream: the pod's interface receives packets far larger than the MTU (whole
    // super-packets), and the receive device carried them.
    let whole = |what: &str| {
        let (b0, p0) = rx_counts(&pod2, "eth0");
        let (_, rx0) = rx_counts(&h2, "weft-udp-rx");
        let got = tcp_stream(&pod2, &pod1, &pod2_ip);
        let (b1, p1) = rx_counts(&pod2, "eth0");
        let (_, rx1) = rx_counts(&h2, "weft-udp-rx");
        assert!(got > 1_000_000, "{what}: the stream moved {got} bytes");
        ((b1 - b0) / (p1 - p0).max(1), rx1 - rx0)
    };
    let (avg, through_rx) = whole("first stream");
    assert!(avg > 3000, "the pod received {avg} bytes per packet: super-packets were split on the way");
    assert!(through_rx > 0, "the receive device carried none");

    // Deleted: it comes back, and the detour with it.
    h2.ip(&["link", "del", "weft-udp-rx"]).unwrap();
    wait_for(Duration::from_secs(10), "weft-udp-rx back", || h2.ip(&["link", "show", "weft-udp-rx"]).ok());
    wait_for(Duration::from_secs(10), "the detour back on", || (detour() == Some(1)).then_some(()));
    let (avg, through_rx) = whole("after the device came back");
    assert!(avg > 3000 && through_rx > 0, "{avg} bytes per packet, {through_rx} through the device");

    // From outside, a VXLAN packet to the device's port (right VNI, an inner packet from
    // host 1's pod to host 2's) is dropped before it: the device's counter stays.
    let vni = link[0]["linkinfo"]["info_data"]["id"].as_u64().unwrap() as u32;
    let link: serde_json::Value =
        serde_json::from_str(&h2.ip(&["-j", "-d", "link", "show", "weft-udp-rx"]).unwrap()).unwrap();
    let mac: Vec<u8> =
        link[0]["address"].as_str().unwrap().split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
    let pod1_ip: Ipv4Addr = st["hosts"][0]["pods"][0]["ip"].as_str().unwrap().parse().unwrap();
    let mut pkt = vec![0x08, 0, 0, 0];
    pkt.extend_from_slice(&(vni << 8).to_be_bytes());
    pkt.extend_from_slice(&mac);
    pkt.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    pkt.extend_from_slice(&echo_request(pod1_ip, pod2_ip.parse().unwrap(), 64, 5));
    let h1_ns = st["hosts"][0]["namespace"].as_str().unwrap().to_string();
    let to = format!("{h2_ip}:8286");
    let stranger = |what: &str| {
        let (_, before) = rx_counts(&h2, "weft-udp-rx");
        let (pkt, to) = (pkt.clone(), to.clone());
        in_netns(&h1_ns, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            for _ in 0..5 {
                s.send_to(&pkt, &to).unwrap();
            }
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(rx_counts(&h2, "weft-udp-rx").1, before, "{what}: a stranger's packet reached the device");
    };
    stranger("detour on");

    // A firewall drops the device's port: the stream goes on (the detour turns off).
    h2.exec("iptables", &["-I", "INPUT", "-p", "udp", "--dport", "8286", "-j", "DROP"]).unwrap();
    let (_, through_rx) = whole("with the port dropped");
    assert_eq!(through_rx, 0);
    assert_eq!(detour(), Some(0), "the detour is off");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("stopped arriving") && text.contains("UDP port 8286"), "the log says why: {text}");
    h2.exec("iptables", &["-D", "INPUT", "-p", "udp", "--dport", "8286", "-j", "DROP"]).unwrap();

    stranger("detour off");
}
