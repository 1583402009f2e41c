//! The engines' UDP socket, for either address family: batched sends and receives with UDP
//! GSO (many equal-sized datagrams in one `sendmsg`) and GRO (many datagrams coalesced into
//! one `recvmsg`), with a plain `sendmmsg`/`recvmsg` path when the kernel lacks them. The
//! udp engine uses it over IPv4 (on the wire every datagram is still exactly one inner IPv4
//! packet, as flannel's peers expect); the WireGuard engine with IPv4 or IPv6 peers, so that
//! `flannel-wg-v6` and the single-device modes' IPv6 endpoints take the same fast path.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

use nix::sys::socket::{setsockopt, sockopt};

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Most segments one GSO send may carry (the kernel's UDP_MAX_SEGMENTS).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// A bound UDP socket of one family and what it can do.
pub struct Socket {
    sock: UdpSocket,
    /// UDP GSO works on this socket.
    pub gso: bool,
    /// UDP GRO is on.
    pub gro: bool,
    /// It is an IPv6 socket.
    pub v6: bool,
}

/// A socket address in the kernel's form, and its length.
fn raw(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut s: libc::sockaddr_storage = unsafe { zeroed() };
    match a {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            (s, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            (s, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// The address the kernel filled in, if it is one of ours to read.
fn from_raw(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            // A v4-mapped sender on a dual-stack socket is an IPv4 peer.
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, sin6.sin6_flowinfo, sin6.sin6_scope_id)),
            })
        }
        _ => None,
    }
}

impl Socket {
    /// Binds `addr` and probes GSO and GRO.
    pub fn bind(addr: SocketAddr, use_offload: bool) -> io::Result<Socket> {
        let sock = UdpSocket::bind(addr)?;
        // Bursts of 64 KiB super-packets need room; failures only cost throughput.
        let _ = setsockopt(&sock, sockopt::RcvBuf, &(4 << 20));
        let _ = setsockopt(&sock, sockopt::SndBuf, &(4 << 20));
        let gro = use_offload && setsockopt(&sock, sockopt::UdpGroSegment, &true).is_ok();
        // GSO is per send (a cmsg); setting a default segment size of 0 tells whether the
        // kernel knows the option at all.
        let gso = use_offload && setsockopt(&sock, sockopt::UdpGsoSegment, &0).is_ok();
        Ok(Socket { sock, gso, gro, v6: addr.is_ipv6() })
    }

    /// Turns UDP GRO off again.
    pub fn disable_gro(&mut self) -> io::Result<()> {
        if self.gro {
            setsockopt(&self.sock, sockopt::UdpGroSegment, &false).map_err(io::Error::from)?;
            self.gro = false;
        }
        Ok(())
    }

    /// A second handle on the same socket (one thread sends, another receives).
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(Socket { sock: self.sock.try_clone()?, gso: self.gso, gro: self.gro, v6: self.v6 })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Whether the socket speaks to `to`'s family.
    pub fn reaches(&self, to: &SocketAddr) -> bool {
        self.v6 == to.is_ipv6()
    }

    /// Sends `buf` to `to` as datagrams of `seg` bytes each (the last may be shorter), in
    /// one system call with GSO; `seg` = `buf.len()` (or no GSO) sends one datagram.
    pub fn send_gso(&self, buf: &[u8], seg: usize, to: SocketAddr) -> io::Result<()> {
        let (addr, addr_len) = raw(to);
        let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
        // Room for one cmsg carrying a u16.
        let mut control = [0u64; 4];
        let segmented = seg < buf.len();
        // SAFETY: msghdr is plain old data; every pointer set below refers to a local that
        // outlives the sendmsg call, and the lengths are those of those locals.
        unsafe {
            let mut msg: libc::msghdr = zeroed();
            msg.msg_name = (&addr as *const libc::sockaddr_storage as *mut libc::sockaddr_storage).cast();
            msg.msg_namelen = addr_len;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if segmented {
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = SOL_UDP;
                (*cmsg).cmsg_type = UDP_SEGMENT;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), seg as u16);
            }
            if libc::sendmsg(self.sock.as_raw_fd(), &msg, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Sends one datagram.
    pub fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<()> {
        self.sock.send_to(buf, to).map(|_| ())
    }

    /// Sends each of `packets` as its own datagram, up to 64 per `sendmmsg`.
    pub fn send_each(&self, packets: &[(&[u8], SocketAddr)]) -> io::Result<()> {
        for chunk in packets.chunks(64) {
            let addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> = chunk.iter().map(|(_, a)| raw(*a)).collect();
            let mut iovs: Vec<libc::iovec> = chunk
                .iter()
                .map(|(p, _)| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
                .collect();
            // SAFETY: mmsghdr is plain old data; zeroed is valid and the fields are set below.
            let mut msgs: Vec<libc::mmsghdr> = (0..chunk.len()).map(|_| unsafe { zeroed() }).collect();
            for (i, m) in msgs.iter_mut().enumerate() {
                m.msg_hdr.msg_name =
                    (&addrs[i].0 as *const libc::sockaddr_storage as *mut libc::sockaddr_storage).cast();
                m.msg_hdr.msg_namelen = addrs[i].1;
                m.msg_hdr.msg_iov = &mut iovs[i];
                m.msg_hdr.msg_iovlen = 1;
            }
            let mut sent = 0;
            while sent < msgs.len() {
                // SAFETY: `msgs[sent..]` points into live vectors (addresses, iovecs, packet
                // slices) that outlive the call; the count matches the slice.
                let r = unsafe {
                    libc::sendmmsg(self.sock.as_raw_fd(), msgs[sent..].as_mut_ptr(), (msgs.len() - sent) as u32, 0)
                };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                sent += r as usize;
            }
        }
        Ok(())
    }

    /// As [`Socket::recv_from`], on an IPv4 socket: the sender's address alone (flannel's
    /// udp peers are told apart by it).
    pub fn recv(&self, buf: &mut [u8], wait: bool) -> io::Result<(usize, usize, Ipv4Addr)> {
        match self.recv_from(buf, wait)? {
            (n, seg, SocketAddr::V4(from)) => Ok((n, seg, *from.ip())),
            (_, _, from) => Err(io::Error::other(format!("a datagram from {from} on an IPv4 socket"))),
        }
    }

    /// Receives into `buf`: the bytes, the segment size when GRO coalesced several
    /// datagrams (0 for one), and the sender. `wait = false` returns `WouldBlock` at once
    /// when nothing is queued.
    pub fn recv_from(&self, buf: &mut [u8], wait: bool) -> io::Result<(usize, usize, SocketAddr)> {
        // SAFETY: sockaddr_storage is plain old data.
        let mut from: libc::sockaddr_storage = unsafe { zeroed() };
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let mut control = [0u64; 8];
        // SAFETY: msghdr is plain old data; its pointers refer to locals (`from`, `iov`,
        // `control`) and `buf`, all of which outlive the recvmsg call.
        let (n, seg) = unsafe {
            let mut msg: libc::msghdr = zeroed();
            msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = size_of::<[u64; 8]>();
            let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
            let n = libc::recvmsg(self.sock.as_raw_fd(), &mut msg, flags);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut seg = 0usize;
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                    seg = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>()).max(0) as usize;
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            (n as usize, seg)
        };
        let addr = from_raw(&from).ok_or_else(|| io::Error::other("a datagram from an address of no known family"))?;
        Ok((n, if seg >= n { 0 } else { seg }, addr))
    }

    /// Sets how long a waiting receive blocks.
    pub fn set_read_timeout(&self, d: std::time::Duration) -> io::Result<()> {
        self.sock.set_read_timeout(Some(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_kernel_form() {
        for a in ["192.0.2.7:51820", "[fd00:192::12]:51821", "[2001:db8::1%3]:1"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(from_raw(&raw(a).0), Some(a));
        }
        // A v4-mapped sender reads as the IPv4 peer it is.
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:5".parse().unwrap();
        assert_eq!(from_raw(&raw(mapped).0), Some("192.0.2.7:5".parse().unwrap()));
    }
}
