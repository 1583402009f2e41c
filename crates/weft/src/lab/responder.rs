//! `weft lab responder` (hidden): what runs in every lab pod of a kube-store lab. TCP on
//! ports 80 and 81 answers `ok` and closes; UDP on the same ports echoes each datagram. Its
//! sockets are dual-stack (`[::]`), so one responder serves IPv4 and IPv6. SCTP has no
//! responder: this kernel has SCTP in netfilter and conntrack but no SCTP sockets, so the
//! probe sends a raw INIT and watches for it with a raw socket in the destination pod.

use std::io::Write;
use std::net::{TcpListener, UdpSocket};

use super::pods::PORTS;

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
