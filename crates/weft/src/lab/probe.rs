//! Connection probes between lab pods, many at a time: TCP (connect, read the responder's
//! answer), UDP (a datagram the responder echoes, retried) and SCTP (a raw INIT packet,
//! seen or not by a raw socket in the destination pod: this kernel has no SCTP sockets).
//! Every probe is a new connection (a new source port), as upstream's `agnhost connect`.

use std::collections::HashSet;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_core::netpol::model::Protocol;

use super::netns::in_netns;

/// One probe: from pod namespace `src`, to `dst_ip:port` of the pod whose namespace is
/// `dst` (the SCTP watcher listens there).
#[derive(Debug, Clone)]
pub struct Job {
    /// Source pod namespace.
    pub src: String,
    /// Destination pod namespace.
    pub dst: String,
    /// Destination address.
    pub dst_ip: IpAddr,
    /// Protocol.
    pub proto: Protocol,
    /// Destination port.
    pub port: u16,
}

/// How many probes run at once: most of a denied probe's time is waiting.
pub const WORKERS: usize = 48;

/// Runs `jobs`, [`WORKERS`] at a time; each waits at most `timeout` for an answer. Returns
/// whether each connected, in the order of `jobs`.
pub fn run(jobs: &[Job], timeout: Duration) -> Vec<bool> {
    let sctp_dsts: Vec<String> = {
        let mut d: Vec<String> = jobs.iter().filter(|j| j.proto == Protocol::Sctp).map(|j| j.dst.clone()).collect();
        d.sort();
        d.dedup();
        d
    };
    let watch = SctpWatch::start(&sctp_dsts);
    let results: Vec<AtomicBool> = jobs.iter().map(|_| AtomicBool::new(false)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..WORKERS.min(jobs.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(j) = jobs.get(i) else { break };
                    let ok = match j.proto {
                        Protocol::Tcp => tcp(&j.src, SocketAddr::new(j.dst_ip, j.port), timeout),
                        Protocol::Udp => udp(&j.src, SocketAddr::new(j.dst_ip, j.port), timeout),
                        Protocol::Sctp => watch.as_ref().is_some_and(|w| w.probe(j, timeout)),
                    };
                    results[i].store(ok, Ordering::Relaxed);
                }
            });
        }
    });
    results.into_iter().map(AtomicBool::into_inner).collect()
}

/// A TCP connection from namespace `ns` that gets the responder's answer.
pub fn tcp(ns: &str, to: SocketAddr, timeout: Duration) -> bool {
    in_netns(ns, move || {
        TcpStream::connect_timeout(&to, timeout)
            .and_then(|mut s| {
                s.set_read_timeout(Some(timeout))?;
                let mut b = [0u8; 2];
                s.read_exact(&mut b)?;
                Ok(b == *super::responder::REPLY)
            })
            .unwrap_or(false)
    })
    .unwrap_or(false)
}

/// A UDP datagram from namespace `ns` that comes back; sent up to three times within
/// `timeout` (a datagram can be lost where a TCP SYN would be retransmitted).
pub fn udp(ns: &str, to: SocketAddr, timeout: Duration) -> bool {
    in_netns(ns, move || {
        let bind: SocketAddr =
            if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
        let Ok(u) = UdpSocket::bind(bind) else { return false };
        let _ = u.set_read_timeout(Some(timeout / 3));
        let mut b = [0u8; 16];
        (0..3).any(|_| u.send_to(b"weft", to).is_ok() && matches!(u.recv_from(&mut b), Ok((4, from)) if from == to))
    })
    .unwrap_or(false)
}

/// CRC32c (Castagnoli), SCTP's checksum.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// An SCTP packet carrying one INIT chunk (what opens an association).
pub fn sctp_init(src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend(src_port.to_be_bytes());
    p.extend(dst_port.to_be_bytes());
    p.extend([0u8; 8]); // verification tag 0 (INIT), checksum filled in below
    p.extend([1u8, 0]); // chunk type INIT, flags
    p.extend(20u16.to_be_bytes());
    p.extend(0x5eed_f00du32.to_be_bytes()); // initiate tag
    p.extend(65535u32.to_be_bytes()); // a_rwnd
    p.extend(1u16.to_be_bytes()); // outbound streams
    p.extend(1u16.to_be_bytes()); // inbound streams
    p.extend(1u32.to_be_bytes()); // initial TSN
    let c = crc32c(&p);
    p[8..12].copy_from_slice(&c.to_le_bytes());
    p
}

/// A raw IP socket for protocol SCTP (132) in the calling thread's namespace, with a short
/// receive timeout.
fn raw_sctp(v6: bool) -> std::io::Result<OwnedFd> {
    let fam = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right below.
    let fd = unsafe { libc::socket(fam, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_SCTP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    // SAFETY: fd is valid; tv lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}

fn raw_send(fd: &OwnedFd, dst: IpAddr, buf: &[u8]) -> bool {
    let rc = match dst {
        IpAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: buf and sa outlive the call; their sizes are passed.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    0,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        IpAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: buf and sa outlive the call; their sizes are passed.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    0,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    rc >= 0
}

/// Raw SCTP sockets in destination pods, each read by a thread that records the INITs
/// that arrived: (destination namespace, source port, destination port).
struct SctpWatch {
    seen: Arc<Mutex<HashSet<(String, u16, u16)>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(20000);

impl SctpWatch {
    fn start(dsts: &[String]) -> Option<SctpWatch> {
        if dsts.is_empty() {
            return None;
        }
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for ns in dsts {
            for v6 in [false, true] {
                let Ok(Ok(fd)) = in_netns(ns, move || raw_sctp(v6)) else { continue };
                let (seen, stop, ns) = (seen.clone(), stop.clone(), ns.clone());
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        // SAFETY: buf is valid for its length; fd is an open socket.
                        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                        let Ok(n) = usize::try_from(n) else { continue };
                        let pkt = &buf[..n];
                        // IPv4 raw sockets deliver the IP header too; IPv6 ones do not.
                        let sctp = if v6 {
                            pkt
                        } else {
                            pkt.get(usize::from(pkt.first().copied().unwrap_or(0) & 0x0f) * 4..).unwrap_or_default()
                        };
                        if sctp.len() >= 4 {
                            let key = (
                                ns.clone(),
                                u16::from_be_bytes([sctp[0], sctp[1]]),
                                u16::from_be_bytes([sctp[2], sctp[3]]),
                            );
                            seen.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
                        }
                    }
                }));
            }
        }
        Some(SctpWatch { seen, stop, threads })
    }

    /// Sends INITs from the job's source until the destination saw one, or `timeout`.
    fn probe(&self, j: &Job, timeout: Duration) -> bool {
        let src_port = loop {
            let p = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
            if p >= 20000 {
                break p;
            }
        };
        let v6 = j.dst_ip.is_ipv6();
        let Ok(Ok(tx)) = in_netns(&j.src, move || raw_sctp(v6)) else { return false };
        let key = (j.dst.clone(), src_port, j.port);
        let packet = sctp_init(src_port, j.port);
        let start = Instant::now();
        let mut sent = 0;
        while start.elapsed() < timeout {
            if sent < 3 && start.elapsed() >= timeout / 3 * sent {
                raw_send(&tx, j.dst_ip, &packet);
                sent += 1;
            }
            if self.seen.lock().unwrap_or_else(|p| p.into_inner()).remove(&key) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

impl Drop for SctpWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
