//! UDP datagrams seen on a LAN namespace's bridge ports, read with an AF_PACKET socket
//! inside that namespace: what an attacker on the wire sees (the wireguard tests look for
//! clear text and time keepalives with it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// One UDP datagram on the LAN, either family.
#[derive(Debug, Clone)]
pub struct Datagram {
    /// Outer IP version: 4 or 6.
    pub family: u8,
    /// Outer source address.
    pub src: IpAddr,
    /// Outer destination address.
    pub dst: IpAddr,
    /// UDP source port.
    pub sport: u16,
    /// UDP destination port.
    pub dport: u16,
    /// The UDP payload.
    pub payload: Vec<u8>,
    /// Seconds since the capture started.
    pub at: f64,
}

/// Every UDP datagram crossing namespace `lan` for `secs` seconds (the LAN bridge sees each
/// frame once per bridge port it crosses).
pub fn udp_on(lan: String, secs: u64) -> std::thread::JoinHandle<Vec<Datagram>> {
    std::thread::spawn(move || {
        weft::lab::netns::in_netns(&lan, move || {
            // SAFETY: socket(2) with constant arguments; the result is checked and owned.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from((libc::ETH_P_ALL as u16).to_be())) };
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            // SAFETY: fd is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
            // SAFETY: setsockopt with a pointer to a live timeval of the right size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            let mut out = Vec::new();
            let mut buf = vec![0u8; 65_536];
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(secs) {
                // SAFETY: recv into a live buffer of the given length.
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                let Ok(n) = usize::try_from(n) else { continue };
                if let Some(d) = parse(&buf[..n], start.elapsed().as_secs_f64()) {
                    out.push(d);
                }
            }
            out
        })
        .unwrap()
    })
}

/// An Ethernet frame carrying UDP over IPv4 or IPv6 (no extension headers), else `None`.
fn parse(f: &[u8], at: f64) -> Option<Datagram> {
    let ip = f.get(14..)?;
    let (family, src, dst, udp) = match (f.get(12)?, f.get(13)?) {
        (0x08, 0x00) if ip.len() >= 20 && ip[9] == 17 => {
            let a = |o: usize| IpAddr::V4(Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]));
            (4, a(12), a(16), ip.get(usize::from(ip[0] & 0x0f) * 4..)?)
        }
        (0x86, 0xdd) if ip.len() >= 40 && ip[6] == 17 => {
            let a = |o: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).unwrap()));
            (6, a(8), a(24), &ip[40..])
        }
        _ => return None,
    };
    if udp.len() < 8 {
        return None;
    }
    Some(Datagram {
        family,
        src,
        dst,
        sport: u16::from_be_bytes([udp[0], udp[1]]),
        dport: u16::from_be_bytes([udp[2], udp[3]]),
        payload: udp[8..].to_vec(),
        at,
    })
}
