//! A batched netlink sender: many requests per `sendmsg`, every request acknowledged, each
//! answer mapped back to the request that caused it; and dumps of what the netlink crates do
//! not know (nexthop objects). A blocking socket with a receive timeout, used from
//! `spawn_blocking`, so a slow kernel never stalls the async runtime and nothing waits forever.

use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::Emitable;
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::route::RouteMessage;
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `NLM_F_ACK_TLVS` in an error reply: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
/// Most requests in one `sendmsg`: their acks must fit the receive buffer.
const CHUNK_MSGS: usize = 1024;
/// Most bytes in one `sendmsg` (the kernel refuses more than its send buffer).
const CHUNK_BYTES: usize = 128 * 1024;
/// How long one answer may take before the batch fails.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A request's header flags for creating: exclusive (`NLM_F_CREATE | NLM_F_EXCL`).
pub const CREATE_EXCL: u16 = 0x400 | 0x200;
/// A request's header flags for create-or-replace (`NLM_F_CREATE | NLM_F_REPLACE`).
pub const CREATE_REPLACE: u16 = 0x400 | 0x100;

/// Requests laid out back to back, ready to send.
#[derive(Debug, Default)]
pub struct Requests {
    buf: Vec<u8>,
    /// Start offset of each request in `buf`.
    starts: Vec<usize>,
}

impl Requests {
    /// Adds a request of `kind` with `flags` (besides request and ack) and a payload written
    /// by `emit` into `len` bytes; returns its index.
    fn push(&mut self, kind: u16, flags: u16, len: usize, emit: impl FnOnce(&mut [u8])) -> usize {
        let start = self.buf.len();
        let total = NLMSG_HDRLEN + len;
        self.buf.resize(start + ((total + 3) & !3), 0);
        let h = &mut self.buf[start..start + NLMSG_HDRLEN];
        h[0..4].copy_from_slice(&(total as u32).to_ne_bytes());
        h[4..6].copy_from_slice(&kind.to_ne_bytes());
        h[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        emit(&mut self.buf[start + NLMSG_HDRLEN..start + total]);
        self.starts.push(start);
        self.starts.len() - 1
    }

    /// A route request (`RTM_NEWROUTE` / `RTM_DELROUTE`).
    pub fn route(&mut self, kind: u16, flags: u16, msg: &RouteMessage) -> usize {
        self.push(kind, flags, msg.buffer_len(), |b| msg.emit(b))
    }

    /// A neighbour or FDB request (`RTM_NEWNEIGH` / `RTM_DELNEIGH`).
    pub fn neighbour(&mut self, kind: u16, flags: u16, msg: &NeighbourMessage) -> usize {
        self.push(kind, flags, msg.buffer_len(), |b| msg.emit(b))
    }

    /// A request with a payload built by hand (nexthop objects).
    pub fn raw(&mut self, kind: u16, flags: u16, payload: &[u8]) -> usize {
        self.push(kind, flags, payload.len(), |b| b.copy_from_slice(payload))
    }

    /// How many requests.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    fn end(&self, i: usize) -> usize {
        self.starts.get(i + 1).copied().unwrap_or(self.buf.len())
    }
}

/// The kernel's refusal of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The errno (positive).
    pub errno: i32,
    /// The kernel's extended-ack message, if it gave one.
    pub message: Option<String>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = std::io::Error::from_raw_os_error(self.errno);
        match &self.message {
            Some(m) => write!(f, "{e} ({m})"),
            None => write!(f, "{e}"),
        }
    }
}

/// A netlink socket for batches and raw dumps.
pub struct Batcher {
    sock: Socket,
    seq: u32,
    rx: Vec<u8>,
}

fn set_timeout(sock: &Socket, t: Duration) -> std::io::Result<()> {
    let tv = libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: t.subsec_micros() as libc::suseconds_t };
    // SAFETY: `tv` is a valid timeval that outlives the call, and its size is passed; the
    // descriptor is the socket's own, open for the call's duration.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn force_rcvbuf(sock: &Socket, bytes: libc::c_int) {
    // SAFETY: `bytes` outlives the call and its size is passed; the descriptor is open.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        // Without CAP_NET_ADMIN: as large as the system allows (the chunks stay small).
        let _ = sock.set_rx_buf_sz(bytes as usize);
    }
}

/// One netlink message in a received buffer: (type, flags, seq, payload).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u16, u32, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let flags = u16::from_ne_bytes([rest[6], rest[7]]);
        let seq = u32::from_ne_bytes(rest[8..12].try_into().ok()?);
        let payload = &rest[NLMSG_HDRLEN..len];
        rest = &rest[((len + 3) & !3).min(rest.len())..];
        Some((kind, flags, seq, payload))
    })
}

/// Reads an `NLMSG_ERROR` payload: `None` for an ack, the refusal otherwise.
pub fn parse_error(flags: u16, payload: &[u8]) -> Option<Refusal> {
    let code = i32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?);
    if code == 0 {
        return None;
    }
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 && payload.len() >= 4 + NLMSG_HDRLEN {
        // With NETLINK_CAP_ACK the original request is not echoed, only its header.
        let mut tlvs = &payload[4 + NLMSG_HDRLEN..];
        while tlvs.len() >= 4 {
            let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
            let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]);
            if len < 4 || len > tlvs.len() {
                break;
            }
            if kind == NLMSGERR_ATTR_MSG {
                let text = &tlvs[4..len];
                let text = text.split(|b| *b == 0).next().unwrap_or_default();
                message = Some(String::from_utf8_lossy(text).into_owned());
            }
            tlvs = &tlvs[((len + 3) & !3).min(tlvs.len())..];
        }
    }
    Some(Refusal { errno: -code, message })
}

impl Batcher {
    /// Opens the socket (receive buffer forced large, capped acks, extended acks, timeout).
    pub fn open() -> std::io::Result<Batcher> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_ext_ack(true);
        force_rcvbuf(&sock, 8 << 20);
        set_timeout(&sock, TIMEOUT)?;
        Ok(Batcher { sock, seq: 1, rx: vec![0; 1 << 20] })
    }

    fn recv(&mut self) -> std::io::Result<usize> {
        let mut buf = &mut self.rx[..];
        let n = self.sock.recv(&mut buf, 0)?;
        Ok(n)
    }

    /// Sends `reqs` in chunks, in order, and returns each request's outcome (`None`:
    /// done). An I/O failure of the socket fails the whole batch.
    pub fn send(&mut self, reqs: &mut Requests) -> std::io::Result<Vec<Option<Refusal>>> {
        let mut out = vec![None; reqs.len()];
        let kernel = SocketAddr::new(0, 0);
        let mut first = 0;
        while first < reqs.len() {
            let mut last = first;
            while last + 1 < reqs.len()
                && last + 1 - first < CHUNK_MSGS
                && reqs.end(last + 1) - reqs.starts[first] <= CHUNK_BYTES
            {
                last += 1;
            }
            let base = self.seq;
            for i in first..=last {
                let s = reqs.starts[i];
                let seq = base.wrapping_add((i - first) as u32);
                reqs.buf[s + 8..s + 12].copy_from_slice(&seq.to_ne_bytes());
            }
            self.seq = base.wrapping_add((last - first + 1) as u32);
            let bytes = &reqs.buf[reqs.starts[first]..reqs.end(last)];
            self.sock.send_to(bytes, &kernel, 0)?;
            let mut pending = last - first + 1;
            while pending > 0 {
                let n = self.recv()?;
                for (kind, flags, seq, payload) in messages(&self.rx[..n]) {
                    let i = seq.wrapping_sub(base) as usize;
                    if kind != NLMSG_ERROR || i > last - first {
                        continue;
                    }
                    out[first + i] = parse_error(flags, payload);
                    pending -= 1;
                }
            }
            first = last + 1;
        }
        Ok(out)
    }

    /// Dumps messages of `kind` (a `RTM_GET*` with `payload`) and hands each answer's type
    /// and payload to `f`. A refusal of the dump itself is an error (`EOPNOTSUPP` where the
    /// kernel lacks the object).
    pub fn dump(&mut self, kind: u16, payload: &[u8], mut f: impl FnMut(u16, &[u8])) -> std::io::Result<()> {
        let mut req = Requests::default();
        req.push(kind, NLM_F_DUMP, payload.len(), |b| b.copy_from_slice(payload));
        let flags = u16::from_ne_bytes([req.buf[6], req.buf[7]]) & !NLM_F_ACK;
        req.buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        let seq = self.seq;
        self.seq = seq.wrapping_add(1);
        req.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.sock.send_to(&req.buf, &SocketAddr::new(0, 0), 0)?;
        loop {
            let n = self.recv()?;
            for (t, flags, s, p) in messages(&self.rx[..n]) {
                if s != seq {
                    continue;
                }
                match t {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        return match parse_error(flags, p) {
                            Some(r) => Err(std::io::Error::from_raw_os_error(r.errno)),
                            None => Ok(()),
                        };
                    }
                    _ => f(t, p),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_laid_out_aligned_with_request_and_ack_flags() {
        let mut r = Requests::default();
        let a = r.raw(104, CREATE_EXCL, &[1, 2, 3, 4, 5]);
        let b = r.raw(105, 0, &[9; 8]);
        assert_eq!((a, b, r.len()), (0, 1, 2));
        let got: Vec<_> = messages(&r.buf).map(|(k, f, _, p)| (k, f, p.to_vec())).collect();
        assert_eq!(
            got,
            vec![
                (104, CREATE_EXCL | NLM_F_REQUEST | NLM_F_ACK, vec![1, 2, 3, 4, 5]),
                (105, NLM_F_REQUEST | NLM_F_ACK, vec![9; 8]),
            ]
        );
        assert_eq!(r.starts, vec![0, 24], "the second request starts on a 4-byte boundary");
    }

    #[test]
    fn error_replies_map_to_refusals_with_the_kernels_message() {
        assert_eq!(parse_error(0, &0i32.to_ne_bytes()), None, "an ack");
        let mut p = (-libc::EEXIST).to_ne_bytes().to_vec();
        p.extend_from_slice(&[0; NLMSG_HDRLEN]);
        let text = b"Nexthop id already exists\0";
        p.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        p.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        p.extend_from_slice(text);
        let r = parse_error(NLM_F_ACK_TLVS, &p).unwrap();
        assert_eq!(r.errno, libc::EEXIST);
        assert_eq!(r.message.as_deref(), Some("Nexthop id already exists"));
        assert!(r.to_string().contains("File exists"), "{r}");
        assert_eq!(parse_error(0, &p).unwrap().message, None, "no TLVs without the flag");
        // Truncated garbage is not a panic.
        assert_eq!(parse_error(0, &[1, 2]), None);
    }
}
