//! systemd's notify protocol, with a `NOTIFY_SOCKET` the test binds: `READY=1` comes once
//! subnet.env is written and the data plane is programmed, with `STATUS=` naming the lease;
//! `WATCHDOG=1` keeps coming when `WATCHDOG_USEC` is set for us (never for another pid);
//! SIGTERM brings `STOPPING=1`. `--log-format=json` logs one JSON object per line. The unit files pass `systemd-analyze verify` when it exists.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::Daemon;
use common::weft_bin;
use weft::lab::netns::Lan;

/// The messages that arrive within `limit` (each datagram split into its lines).
fn receive(sock: &UnixDatagram, limit: Duration, mut until: impl FnMut(&[String]) -> bool) -> Vec<String> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    while start.elapsed() < limit && !until(&got) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.extend(String::from_utf8_lossy(&buf[..n]).lines().map(String::from));
        }
    }
    got
}

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

#[test]
fn ready_status_watchdog_and_stopping_reach_the_notify_socket() {
    let prefix = common::prefix("ntf");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("net-conf.json"), CONFIG).unwrap();
    let lan = Lan::new(&prefix, "192.0.2").unwrap();
    let hosts: Vec<_> = (1..=2).map(|i| lan.add_host(i).unwrap()).collect();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let other_path = dir.join("other.sock");
    let other = UnixDatagram::bind(&other_path).unwrap();
    let args = |i: usize| -> Vec<String> {
        vec![
            "--store=local".into(),
            format!("--local-store={}", dir.join("leases.db").display()),
            format!("--net-config-path={}", dir.join("net-conf.json").display()),
            format!("--subnet-file={}", dir.join(format!("h{i}.env")).display()),
            "--ip-masq".into(),
        ]
    };
    let a1 = args(1);
    let a1: Vec<&str> = a1.iter().map(String::as_str).collect();
    let sock_env = sock_path.to_str().unwrap();
    let mut d1 = Daemon::start_with_env(
        &hosts[0],
        dir,
        &a1,
        &[("NOTIFY_SOCKET", sock_env), ("WATCHDOG_USEC", "1000000"), ("WEFT_LOG", "info")],
    );

    // READY=1 only once the work is done: checked the moment it arrives.
    let got = receive(&sock, Duration::from_secs(30), |m| m.iter().any(|l| l == "READY=1"));
    assert!(got.iter().any(|l| l == "READY=1"), "no READY=1 within 30 s: {got:?}\n{}", d1.log());
    let env = std::fs::read_to_string(dir.join("h1.env")).expect("subnet.env is written before READY=1");
    let subnet = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).unwrap().to_string();
    let link = hosts[0].ip(&["-j", "link", "show", "flannel.1"]).expect("flannel.1 exists at READY=1");
    assert!(link.contains("\"UP\""), "flannel.1 is up at READY=1: {link}");
    let masq = hosts[0].exec("iptables", &["-w", "-t", "nat", "-S", "FLANNEL-POSTRTG"]).unwrap();
    assert!(masq.contains("MASQUERADE"), "masquerade rules are in at READY=1: {masq}");
    // STATUS names the lease (key form 10.244.N.0-24 of FLANNEL_SUBNET 10.244.N.1/24).
    let base = subnet.split('/').next().unwrap().rsplit_once('.').unwrap().0.to_string();
    let status = got.iter().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or_default().to_string();
    assert!(status.contains(&format!("lease {base}.0-24")) && status.contains("vxlan"), "{status:?}");

    // The watchdog: WATCHDOG=1 every half interval (0.5 s); generous margin.
    let w = receive(&sock, Duration::from_secs(10), |m| m.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3);
    assert!(w.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3, "watchdog pings: {w:?}");

    // Another process's watchdog (WATCHDOG_PID not ours) is not fed; READY still comes.
    let mut a2 = args(2);
    a2.push("--log-format=json".into());
    let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
    let mut d2 = Daemon::start_with_env(
        &hosts[1],
        dir,
        &a2,
        &[("NOTIFY_SOCKET", other_path.to_str().unwrap()), ("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "1")],
    );
    let got2 = receive(&other, Duration::from_secs(30), |m| m.iter().any(|l| l == "READY=1"));
    assert!(got2.iter().any(|l| l == "READY=1"), "{got2:?}\n{}", d2.log());
    let more = receive(&other, Duration::from_secs(2), |_| false);
    assert!(!got2.iter().chain(&more).any(|l| l == "WATCHDOG=1"), "{got2:?} {more:?}");

    // SIGTERM: STOPPING=1, and the daemon exits 0.
    d1.signal(libc::SIGTERM);
    let s = receive(&sock, Duration::from_secs(15), |m| m.iter().any(|l| l == "STOPPING=1"));
    assert!(s.iter().any(|l| l == "STOPPING=1"), "{s:?}");
    assert!(d1.wait_exit(Duration::from_secs(15)).success());
    d2.signal(libc::SIGTERM);
    assert!(d2.wait_exit(Duration::from_secs(15)).success());
    // --log-format=json: every line of h2's log is one JSON object with level and message.
    let log = d2.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{l}");
    }
    assert!(lines.iter().any(|l| l.contains("acquired lease")), "{log}");
}

fn verify(dir: &Path) -> Option<std::process::Output> {
    let o = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.join("weft.service"))
        .arg(dir.join("docker.service"))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .output();
    match o {
        Ok(o) => Some(o),
        Err(e) => {
            println!("systemd-analyze not available ({e}): the unit files are not verified");
            None
        }
    }
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd");
    let unit = std::fs::read_to_string(root.join("weft.service")).unwrap();
    let dropin = std::fs::read_to_string(root.join("docker.service.d/10-weft.conf")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    assert!(unit.contains("weft docker-opts -k DOCKER_NETWORK_OPTIONS -d /run/flannel/docker"));
    assert!(dropin.contains("EnvironmentFile=/run/flannel/docker") && dropin.contains("$DOCKER_NETWORK_OPTIONS"));
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // The binaries the units name must exist for verify: the weft under test, and a stand-in
    // for dockerd.
    std::fs::write(d.join("weft.service"), unit.replace("/usr/local/bin/weft", weft_bin())).unwrap();
    std::fs::create_dir(d.join("docker.service.d")).unwrap();
    std::fs::write(d.join("docker.service.d/10-weft.conf"), dropin.replace("/usr/bin/dockerd", "/bin/true")).unwrap();
    std::fs::write(d.join("docker.service"), "[Unit]\nDescription=Docker\n[Service]\nExecStart=/bin/true\n").unwrap();
    let Some(o) = verify(d) else { return };
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.trim().is_empty(), "systemd-analyze verify: {o:?}");
    // The check itself catches a broken file (it warns and still exits 0).
    std::fs::write(d.join("docker.service.d/10-weft.conf"), format!("{dropin}\nBogusKey=1\n")).unwrap();
    let o = verify(d).unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("BogusKey"), "{o:?}");
}
