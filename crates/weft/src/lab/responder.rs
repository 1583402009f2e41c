//! `weft lab responder` (hidden): what runs in every lab pod of a kube-store lab. TCP on
//! ports 80 and 81 answers `ok` and closes; UDP on the same ports echoes each datagram. Its
//! sockets are dual-stack (`[::]`), so one responder serves IPv4 and IPv6. SCTP has no
//! responder: this kernel has SCTP in netfilter and conntrack but no SCTP sockets, so the
//! probe sends a raw INIT and watches for it with a raw socket in the destination pod.
//! [`start`] launches it in a pod's namespace.

use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::error::LabError;
use super::netns::in_netns;
use super::pids::{alive, kill};
use super::state::Lab;

/// The ports every lab pod serves, and the upstream model's container port names
/// (`serve-<port>-<proto>`).
pub const PORTS: [u16; 2] = [80, 81];

/// The TCP answer.
pub const REPLY: &[u8] = b"ok";

/// Serves until killed; returns an exit status only when a socket cannot be bound.
pub fn run() -> u8 {
    let mut threads = Vec::new();
    for port in PORTS {
        let tcp = match TcpListener::bind(("::", port)) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("weft lab responder: cannot listen on TCP port {port}: {e}");
                return 1;
            }
        };
        let udp = match UdpSocket::bind(("::", port)) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("weft lab responder: cannot bind UDP port {port}: {e}");
                return 1;
            }
        };
        threads.push(std::thread::spawn(move || {
            for mut s in tcp.incoming().flatten() {
                let _ = s.write_all(REPLY);
            }
        }));
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            loop {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    0
}

/// Starts the responder (`weft lab responder`) in pod namespace `pod_ns`, detached, and
/// waits until it answers; returns its pid.
pub fn start(lab: &Lab, pod_ns: &str) -> Result<u32, LabError> {
    let exe = std::env::current_exe().map_err(|e| LabError::Step(format!("locating the weft binary: {e}")))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(lab.dir().join("responders.log"))
        .map_err(|e| LabError::Step(format!("opening the responders' log: {e}")))?;
    let err = log.try_clone().map_err(|e| LabError::Step(e.to_string()))?;
    let child = Command::new("ip")
        .args(["netns", "exec", pod_ns])
        .arg(exe)
        .args(["lab", "responder"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| LabError::Step(format!("starting the responder in {pod_ns}: {e}")))?;
    let pid = child.id();
    // Not waited for: it outlives this command; `lab down` kills it.
    drop(child);
    let start = Instant::now();
    loop {
        let ok = in_netns(pod_ns, || {
            std::net::TcpStream::connect_timeout(&"127.0.0.1:81".parse().expect("literal"), Duration::from_millis(200))
                .is_ok()
        })
        .unwrap_or(false);
        if ok {
            return Ok(pid);
        }
        if !alive(pid) || start.elapsed() > Duration::from_secs(10) {
            kill(pid, libc::SIGKILL);
            let log = std::fs::read_to_string(lab.dir().join("responders.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(LabError::Step(format!(
                "the responder in {pod_ns} did not answer on port 81; its log ends with:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
