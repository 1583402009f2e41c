//! WireGuard in userspace, for kernels without the `wireguard` link type: the TUN device
//! `flannel-wg` ⇄ UDP, with WireGuard's protocol (handshakes, cookies, timers, rekeying,
//! transport encryption) from `boringtun`'s sans-I/O [`Tunn`], one per peer. The socket and
//! TUN machinery is the udp engine's: batched reads with TSO super-packets split in
//! userspace, UDP GSO sends of equal-sized encrypted datagrams, UDP GRO receives, and TCP
//! coalescing on the way back into the TUN device.
//!
//! Three threads: TUN → network (encrypt), network → TUN (decrypt), and a timer thread
//! that calls [`Tunn::update_timers`] every 250 ms (handshake retries, rekeying,
//! keepalives). The peer table is swapped whole on lease events: a removed peer's
//! sessions go with it, so it can neither send nor receive from the next datagram on.

pub mod key;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use bytes::BytesMut;
use ipnet::{IpNet, Ipv4Net};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;
use prometheus_client::metrics::counter::Counter;
use tun_rs::{DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};
use weft_core::wireguard::{DEVICE, Key, Peer};

use crate::metrics::Metrics;
use crate::udp::socket::{MAX_GSO_SEGMENTS, Socket};

/// Room for one receive: the largest TUN read or GRO-coalesced datagram batch.
const BIG: usize = 65_536 + VIRTIO_NET_HDR_LEN;
/// Largest inner packet handled (the device MTU is far below).
const PACKET: usize = 16 * 1024;
/// WireGuard's data message overhead (type, index, counter, tag).
const DATA_OVERHEAD: usize = 32;
/// A handshake initiation, the largest message `encapsulate` may write besides data.
const HANDSHAKE_INIT: usize = 148;
/// How often the timers run (boringtun's own device uses 250 ms).
const TICK: Duration = Duration::from_millis(250);
/// Handshake messages per second before the cookie mechanism starts (each is counted twice:
/// once by the lookup of its peer, once by the peer's tunnel).
const HANDSHAKE_RATE_LIMIT: u64 = 200;

/// Why a datagram or packet was dropped (the `reason` label of `weft_wireguard_drops`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A MAC or an AEAD tag did not verify: forged, corrupted, or for another key.
    AuthFailure,
    /// A counter or handshake timestamp seen before, or too old.
    Replay,
    /// A handshake from a key that is no peer's, or a datagram for an index no peer has.
    UnknownKey,
    /// An outgoing packet to an address no peer's allowed IPs cover.
    NoPeer,
    /// A decrypted packet whose source is outside the sending peer's allowed IPs.
    SpoofedSource,
    /// Data for a session that does not exist (yet, or any more).
    NoSession,
    /// Handshakes refused while under load (a cookie was asked for instead).
    UnderLoad,
    /// Not a WireGuard message, or not an IPv4 packet.
    Malformed,
}

impl DropReason {
    const ALL: [DropReason; 8] = [
        DropReason::AuthFailure,
        DropReason::Replay,
        DropReason::UnknownKey,
        DropReason::NoPeer,
        DropReason::SpoofedSource,
        DropReason::NoSession,
        DropReason::UnderLoad,
        DropReason::Malformed,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::AuthFailure => "auth_failure",
            DropReason::Replay => "replay",
            DropReason::UnknownKey => "unknown_key",
            DropReason::NoPeer => "no_peer",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NoSession => "no_session",
            DropReason::UnderLoad => "under_load",
            DropReason::Malformed => "malformed",
        }
    }

    fn of(e: &WireGuardError) -> DropReason {
        match e {
            WireGuardError::InvalidMac | WireGuardError::InvalidAeadTag | WireGuardError::WrongKey => {
                DropReason::AuthFailure
            }
            WireGuardError::DuplicateCounter
            | WireGuardError::InvalidCounter
            | WireGuardError::WrongTai64nTimestamp
            | WireGuardError::InvalidTai64nTimestamp => DropReason::Replay,
            WireGuardError::WrongIndex | WireGuardError::NoCurrentSession | WireGuardError::ConnectionExpired => {
                DropReason::NoSession
            }
            WireGuardError::UnderLoad => DropReason::UnderLoad,
            _ => DropReason::Malformed,
        }
    }
}

/// Counter handles, created once.
#[derive(Clone)]
struct Stats {
    tx: Counter,
    rx: Counter,
    handshakes_sent: Counter,
    handshakes_received: Counter,
    keepalives: Counter,
    cookies: Counter,
    drops: Vec<(DropReason, Counter)>,
}

impl Stats {
    fn new(m: &Metrics) -> Stats {
        // One statement per handle: `get_or_create` holds a lock while its guard lives.
        let c = |label| m.wg_packets.get_or_create(&vec![("kind", label)]).clone();
        let tx = c("tx");
        let rx = c("rx");
        let handshakes_sent = c("handshake_sent");
        let handshakes_received = c("handshake_received");
        let keepalives = c("keepalive_sent");
        let cookies = c("cookie_sent");
        let mut drops = Vec::new();
        for d in DropReason::ALL {
            let counter = m.wg_drops.get_or_create(&vec![("reason", d.label())]).clone();
            drops.push((d, counter));
        }
        Stats { tx, rx, handshakes_sent, handshakes_received, keepalives, cookies, drops }
    }

    fn drop(&self, d: DropReason) {
        if let Some((_, c)) = self.drops.iter().find(|(x, _)| *x == d) {
            c.inc();
        }
    }
}

/// One peer: its tunnel (sessions, handshake, timers) and where to send.
struct PeerState {
    key: Key,
    psk: Option<Key>,
    keepalive: u16,
    index: u32,
    inner: Mutex<PeerInner>,
}

struct PeerInner {
    tunn: Tunn,
    /// Where datagrams go: the lease's endpoint, or where the peer last spoke from.
    endpoint: SocketAddrV4,
    /// The endpoint the lease gave (a new one replaces a roamed endpoint).
    configured: SocketAddrV4,
}

impl PeerState {
    fn lock(&self) -> std::sync::MutexGuard<'_, PeerInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The peers, by allowed subnet, public key and session index.
#[derive(Default)]
struct Table {
    /// Lease prefix length (every subnet of a network has it).
    prefix: u8,
    by_subnet: HashMap<u32, Arc<PeerState>>,
    by_key: HashMap<[u8; 32], Arc<PeerState>>,
    by_index: HashMap<u32, Arc<PeerState>>,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) }
}

impl Table {
    fn route(&self, dst: Ipv4Addr) -> Option<&Arc<PeerState>> {
        self.by_subnet.get(&(u32::from(dst) & mask(self.prefix)))
    }
}

/// What the threads share: the current table, swapped whole.
#[derive(Clone, Default)]
struct Peers(Arc<RwLock<Arc<Table>>>);

impl Peers {
    fn snapshot(&self) -> Arc<Table> {
        self.0.read().map(|t| t.clone()).unwrap_or_default()
    }

    fn set(&self, t: Table) {
        let mut w = self.0.write().unwrap_or_else(|p| p.into_inner());
        *w = Arc::new(t);
    }
}

/// Our static key pair and the rate limiter every tunnel shares.
struct Identity {
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
}

/// The ends of the engine's threads: a flag and an eventfd that wakes waiters.
struct Stop {
    flag: AtomicBool,
    event: EventFd,
}

impl Stop {
    fn stopped(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    fn trigger(&self) {
        self.flag.store(true, Ordering::Release);
        let _ = self.event.write(1);
    }

    /// Waits until `fd` is readable, the engine stops, or `timeout` passes.
    fn wait(&self, fd: Option<std::os::fd::BorrowedFd<'_>>, timeout: PollTimeout) {
        let mut fds = vec![PollFd::new(self.event.as_fd(), PollFlags::POLLIN)];
        if let Some(fd) = fd {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        let _ = poll(&mut fds, timeout);
    }
}

struct Running {
    stop: Arc<Stop>,
    threads: Vec<JoinHandle<()>>,
}

/// The userspace WireGuard device.
pub struct Engine {
    dev: Arc<SyncDevice>,
    sock: Socket,
    /// TUN offloads (IFF_VNET_HDR with TSO) are on.
    pub tun_offload: bool,
    id: Arc<Identity>,
    peers: Peers,
    /// Serialises table updates (readers never wait for it).
    update: Mutex<()>,
    next_index: AtomicU32,
    running: Option<Running>,
    /// The counters and the peer gauge, once started (kept for a restart after a reopen).
    stats: Option<(Stats, prometheus_client::metrics::gauge::Gauge)>,
    own: Option<Ipv4Net>,
}

fn open_tun(offload: bool) -> io::Result<SyncDevice> {
    let d = DeviceBuilder::new().name(DEVICE).offload(offload).build_sync()?;
    d.set_nonblocking(true)?;
    Ok(d)
}

impl Engine {
    /// Opens `flannel-wg` (with offloads when the kernel allows) and binds the UDP socket
    /// on `bind`:`port`, for the private key `private`.
    pub fn open(bind: Ipv4Addr, port: u16, private: &Key) -> io::Result<Engine> {
        // WEFT_UDP_DISABLE turns offloads off here too (tun_tso, udp_gso, udp_gro).
        let disabled = std::env::var("WEFT_UDP_DISABLE").unwrap_or_default();
        let off = |f: &str| disabled.split(',').any(|d| d.trim() == f);
        let (dev, tun_offload) = match open_tun(!off("tun_tso")) {
            Ok(d) if d.tcp_gso() && !off("tun_tso") => (d, true),
            Ok(d) => (d, false),
            Err(e) => {
                tracing::warn!("TUN offloads unavailable ({e}); using plain reads and writes");
                (open_tun(false)?, false)
            }
        };
        let mut sock = Socket::bind(SocketAddrV4::new(bind, port), true)?;
        sock.gso &= !off("udp_gso");
        if off("udp_gro") {
            sock.disable_gro()?;
        }
        let secret = StaticSecret::from(private.0);
        let public = PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Ok(Engine {
            dev: Arc::new(dev),
            sock,
            tun_offload,
            id: Arc::new(Identity { secret, public, limiter }),
            peers: Peers::default(),
            update: Mutex::new(()),
            next_index: AtomicU32::new(rand::random::<u32>() & 0x00ff_ffff),
            running: None,
            stats: None,
            own: None,
        })
    }

    /// Which paths run, for the log and `/metrics`.
    pub fn paths(&self) -> [(&'static str, bool); 3] {
        [("tun_tso", self.tun_offload), ("udp_gso", self.sock.gso), ("udp_gro", self.sock.gro)]
    }

    /// The number of peers configured.
    pub fn peer_count(&self) -> usize {
        self.peers.snapshot().by_key.len()
    }

    /// Replaces the peer set: peers whose key, PSK and keepalive are unchanged keep their
    /// sessions (a new endpoint from the lease replaces the old one); others are created;
    /// the rest are gone with their sessions.
    pub fn set_peers(&self, prefix: u8, wanted: &[Peer], psk: Option<Key>, keepalive: u16) {
        let _g = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.peers.snapshot();
        let mut t = Table { prefix, ..Table::default() };
        for p in wanted {
            let SocketAddr::V4(endpoint) = p.endpoint else { continue };
            let state = match old.by_key.get(&p.public_key.0).or_else(|| t.by_key.get(&p.public_key.0)) {
                Some(s) if s.psk == psk && s.keepalive == keepalive => {
                    let mut i = s.lock();
                    if i.configured != endpoint {
                        i.configured = endpoint;
                        i.endpoint = endpoint;
                    }
                    drop(i);
                    s.clone()
                }
                _ => self.new_peer(p.public_key, endpoint, psk, keepalive, &old),
            };
            for net in &p.allowed_ips {
                if let IpNet::V4(n) = net
                    && n.prefix_len() == prefix
                {
                    t.by_subnet.insert(u32::from(n.network()), state.clone());
                }
            }
            t.by_index.insert(state.index, state.clone());
            t.by_key.insert(state.key.0, state);
        }
        let n = t.by_key.len();
        self.peers.set(t);
        if let Some((_, g)) = &self.stats {
            g.set(n as i64);
        }
    }

    fn new_peer(
        &self,
        key: Key,
        endpoint: SocketAddrV4,
        psk: Option<Key>,
        keepalive: u16,
        old: &Table,
    ) -> Arc<PeerState> {
        // 24-bit indices (boringtun keeps the low 8 bits per session), none in use.
        let mut index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        while old.by_index.contains_key(&index) {
            index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        }
        let tunn = Tunn::new(
            self.id.secret.clone(),
            PublicKey::from(key.0),
            psk.map(|k| k.0),
            (keepalive > 0).then_some(keepalive),
            index,
            Some(self.id.limiter.clone()),
        );
        Arc::new(PeerState {
            key,
            psk,
            keepalive,
            index,
            inner: Mutex::new(PeerInner { tunn, endpoint, configured: endpoint }),
        })
    }

    /// Whether the threads run.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Opens `flannel-wg` again (it was deleted): the threads are restarted on the new
    /// device; peers keep their sessions.
    pub fn reopen(&mut self) -> io::Result<()> {
        let was_running = self.running.is_some();
        self.stop();
        let d = open_tun(self.tun_offload)?;
        if self.tun_offload && !d.tcp_gso() {
            return Err(io::Error::other("the re-opened TUN device lacks the offloads the engine runs with"));
        }
        self.dev = Arc::new(d);
        if was_running && let Some(own) = self.own {
            self.run(own)?;
        }
        Ok(())
    }

    /// Stops the threads and waits for them (about a second at most).
    pub fn stop(&mut self) {
        let Some(r) = self.running.take() else { return };
        r.stop.trigger();
        if let Ok(SocketAddr::V4(me)) = self.sock.local_addr() {
            let _ = self.sock.send_each(&[(&[][..], me)]);
        }
        for t in r.threads {
            if t.join().is_err() {
                tracing::error!("a wireguard engine thread panicked");
            }
        }
        tracing::info!("wireguard engine stopped");
    }

    /// Starts the threads for our subnet `own`; a running engine is restarted.
    pub fn start(&mut self, own: Ipv4Net, metrics: &Metrics) -> io::Result<()> {
        for (feature, on) in self.paths() {
            metrics.udp_offload.get_or_create(&vec![("feature", feature)]).set(i64::from(on));
        }
        metrics.wg_peers.set(self.peer_count() as i64);
        self.stats = Some((Stats::new(metrics), metrics.wg_peers.clone()));
        self.run(own)
    }

    fn run(&mut self, own: Ipv4Net) -> io::Result<()> {
        self.stop();
        self.own = Some(own);
        let Some((stats, _)) = self.stats.clone() else {
            return Err(io::Error::other("the wireguard engine was never started"));
        };
        tracing::info!(
            tun_tso = self.tun_offload,
            udp_gso = self.sock.gso,
            udp_gro = self.sock.gro,
            "wireguard userspace engine paths"
        );
        let stop = Arc::new(Stop { flag: AtomicBool::new(false), event: EventFd::new().map_err(io::Error::from)? });
        let mut running = Running { stop: stop.clone(), threads: Vec::with_capacity(3) };
        let out = TunToNet {
            dev: self.dev.clone(),
            sock: self.sock.try_clone()?,
            peers: self.peers.clone(),
            stats: stats.clone(),
            offload: self.tun_offload,
            stop: stop.clone(),
        };
        let inb = NetToTun {
            dev: self.dev.clone(),
            sock: self.sock.try_clone()?,
            peers: self.peers.clone(),
            id: self.id.clone(),
            stats: stats.clone(),
            offload: self.tun_offload,
            own,
            stop: stop.clone(),
        };
        let timers =
            Timers { sock: self.sock.try_clone()?, peers: self.peers.clone(), id: self.id.clone(), stats, stop };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| std::thread::Builder::new().name(name.into()).spawn(f);
        let r = spawn("wg-tun-to-net", Box::new(move || out.run()))
            .map(|t| running.threads.push(t))
            .and_then(|()| spawn("wg-net-to-tun", Box::new(move || inb.run())).map(|t| running.threads.push(t)))
            .and_then(|()| spawn("wg-timers", Box::new(move || timers.run())).map(|t| running.threads.push(t)));
        self.running = Some(running);
        if let Err(e) = r {
            self.stop();
            return Err(e);
        }
        Ok(())
    }
}

impl std::ops::Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `buf` to `to`, ignoring errors (a lost datagram is WireGuard's to recover).
fn send_one(sock: &Socket, buf: &[u8], to: SocketAddrV4) {
    if let Err(e) = sock.send_each(&[(buf, to)]) {
        tracing::debug!("wireguard send to {to}: {e}");
    }
}

/// TUN → network: encrypt and send.
struct TunToNet {
    dev: Arc<SyncDevice>,
    sock: Socket,
    peers: Peers,
    stats: Stats,
    offload: bool,
    stop: Arc<Stop>,
}

/// Encrypted datagrams of one size for one endpoint (the last may be shorter): one GSO
/// send.
struct Group {
    buf: Vec<u8>,
    to: Option<SocketAddrV4>,
    seg: usize,
    count: usize,
    closed: bool,
}

impl TunToNet {
    fn run(self) {
        let mut orig = vec![0u8; BIG];
        let mut bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE).map(|_| vec![0u8; PACKET]).collect();
        let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
        let mut g = Group { buf: Vec::with_capacity(BIG + PACKET), to: None, seg: 0, count: 0, closed: false };
        let mut errors = 0u64;
        while !self.stop.stopped() {
            let r = if self.offload {
                self.dev.recv_multiple(&mut orig, &mut bufs, &mut sizes, 0)
            } else {
                self.dev.recv(&mut bufs[0]).map(|n| {
                    sizes[0] = n;
                    if n == 0 { 0 } else { 1 }
                })
            };
            let n = match r {
                Ok(n) if n > 0 => {
                    errors = 0;
                    n
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stop.wait(Some(self.dev.as_fd()), PollTimeout::NONE);
                    continue;
                }
                other => {
                    // The device is gone: the reconciler re-opens it and restarts us.
                    errors += 1;
                    if errors == 1 {
                        tracing::warn!("reading {DEVICE} failed ({other:?}); pausing until the device is repaired");
                    }
                    self.stop.wait(None, PollTimeout::from(100u16));
                    continue;
                }
            };
            let table = self.peers.snapshot();
            for i in 0..n {
                self.encrypt(&table, &bufs[i][..sizes[i]], &mut g);
            }
            let end = g.buf.len();
            self.flush(&mut g, end);
        }
    }

    /// Encrypts `pkt` for its peer into the group (sending the group first when the new
    /// datagram cannot join it).
    fn encrypt(&self, table: &Table, pkt: &[u8], g: &mut Group) {
        if pkt.len() < 20 || pkt[0] >> 4 != 4 {
            self.stats.drop(DropReason::Malformed);
            return;
        }
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        let Some(peer) = table.route(dst) else {
            self.stats.drop(DropReason::NoPeer);
            return;
        };
        let start = g.buf.len();
        g.buf.resize(start + (pkt.len() + DATA_OVERHEAD).max(HANDSHAKE_INIT), 0);
        let mut inner = peer.lock();
        let to = inner.endpoint;
        let (len, data) = match inner.tunn.encapsulate(pkt, &mut g.buf[start..]) {
            TunnResult::WriteToNetwork(b) => (b.len(), b.first() == Some(&4)),
            TunnResult::Err(e) => {
                drop(inner);
                g.buf.truncate(start);
                tracing::debug!("wireguard encapsulate: {e:?}");
                self.stats.drop(DropReason::of(&e));
                return;
            }
            // Queued until the handshake completes.
            _ => (0, false),
        };
        drop(inner);
        if len == 0 {
            g.buf.truncate(start);
            return;
        }
        g.buf.truncate(start + len);
        if !data {
            // A handshake initiation: on its own, now.
            self.stats.handshakes_sent.inc();
            send_one(&self.sock, &g.buf[start..], to);
            g.buf.truncate(start);
            return;
        }
        self.stats.tx.inc();
        let fits = g.to == Some(to)
            && !g.closed
            && len <= g.seg
            && g.count < MAX_GSO_SEGMENTS
            && start + len <= 65_000
            && self.sock.gso;
        if !fits && g.count > 0 {
            self.flush(g, start);
            // The new datagram moves to the front of the emptied group.
            g.buf.copy_within(start..start + len, 0);
            g.buf.truncate(len);
        }
        if g.count == 0 {
            g.to = Some(to);
            g.seg = len;
        }
        g.count += 1;
        // A shorter datagram can only be the last of a GSO batch.
        if len < g.seg {
            g.closed = true;
        }
    }

    /// Sends the group's first `upto` bytes and empties it (the bytes after `upto` stay).
    fn flush(&self, g: &mut Group, upto: usize) {
        if let Some(to) = g.to.take()
            && g.count > 0
        {
            let r = if g.count == 1 {
                self.sock.send_each(&[(&g.buf[..upto], to)])
            } else {
                self.sock.send_gso(&g.buf[..upto], g.seg, to)
            };
            if let Err(e) = r {
                tracing::debug!("wireguard send to {to}: {e}");
            }
        }
        if upto == g.buf.len() {
            g.buf.clear();
        }
        g.count = 0;
        g.seg = 0;
        g.closed = false;
    }
}

/// Network → TUN: find the peer, decrypt, check the source, write.
struct NetToTun {
    dev: Arc<SyncDevice>,
    sock: Socket,
    peers: Peers,
    id: Arc<Identity>,
    stats: Stats,
    offload: bool,
    own: Ipv4Net,
    stop: Arc<Stop>,
}

impl NetToTun {
    fn run(self) {
        let off = if self.offload { VIRTIO_NET_HDR_LEN } else { 0 };
        let mut recv = vec![0u8; BIG];
        let mut bufs: Vec<BytesMut> = (0..IDEAL_BATCH_SIZE).map(|_| BytesMut::with_capacity(BIG)).collect();
        let mut scratch = vec![0u8; PACKET + HANDSHAKE_INIT];
        let mut gro = GROTable::default();
        let _ = self.sock.set_read_timeout(Duration::from_secs(1));
        let mut errors = 0u64;
        while !self.stop.stopped() {
            let mut staged = 0;
            let mut wait = true;
            while staged + MAX_GSO_SEGMENTS <= IDEAL_BATCH_SIZE {
                let (n, seg, from) = match self.sock.recv_from(&mut recv, wait) {
                    Ok(r) => r,
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
                    Err(e) => {
                        tracing::debug!("wireguard receive: {e}");
                        break;
                    }
                };
                wait = false;
                if self.stop.stopped() {
                    return;
                }
                if n == 0 {
                    continue;
                }
                let table = self.peers.snapshot();
                let seg = if seg == 0 { n } else { seg };
                for d in recv[..n].chunks(seg.max(1)) {
                    let b = &mut bufs[staged];
                    b.clear();
                    // Plaintext is never longer than its datagram (a handshake answer is shorter
                    // than an initiation).
                    b.resize(off + d.len().max(HANDSHAKE_INIT), 0);
                    if let Some(len) = self.datagram(&table, d, from, &mut b[off..], &mut scratch) {
                        b.truncate(off + len);
                        staged += 1;
                    }
                }
            }
            if staged == 0 {
                continue;
            }
            let r = if self.offload {
                self.dev.send_multiple(&mut gro, &mut bufs[..staged], off).map(|_| ())
            } else {
                bufs[..staged].iter().try_for_each(|b| self.dev.send(b).map(|_| ()))
            };
            match r {
                Ok(()) => errors = 0,
                Err(e) => {
                    errors += 1;
                    if errors == 1 {
                        tracing::warn!("writing to {DEVICE} failed ({e}); pausing until the device is repaired");
                    }
                    self.stop.wait(None, PollTimeout::from(100u16));
                }
            }
        }
    }

    /// Handles one datagram; `Some(len)` when `out[..len]` is a packet for the TUN device.
    fn datagram(
        &self,
        table: &Table,
        d: &[u8],
        from: SocketAddrV4,
        out: &mut [u8],
        scratch: &mut [u8],
    ) -> Option<usize> {
        let src = IpAddr::V4(*from.ip());
        let kind = d.first().copied().unwrap_or(0);
        let index = |at: usize| d.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 8);
        let peer = match kind {
            1 => {
                // The sender's key is inside the (MAC-checked) initiation; cookie replies
                // under load are sent from here.
                let packet = match self.id.limiter.verify_packet(Some(src), d, scratch) {
                    Ok(p) => p,
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        self.stats.cookies.inc();
                        send_one(&self.sock, cookie, from);
                        return None;
                    }
                    Err(TunnResult::Err(e)) => {
                        self.stats.drop(DropReason::of(&e));
                        return None;
                    }
                    Err(_) => return None,
                };
                let Packet::HandshakeInit(init) = packet else {
                    self.stats.drop(DropReason::Malformed);
                    return None;
                };
                match parse_handshake_anon(&self.id.secret, &self.id.public, &init) {
                    Ok(half) => table.by_key.get(&half.peer_static_public),
                    Err(_) => None,
                }
            }
            2 => index(8).and_then(|i| table.by_index.get(&i)),
            3 | 4 => index(4).and_then(|i| table.by_index.get(&i)),
            _ => {
                self.stats.drop(DropReason::Malformed);
                return None;
            }
        };
        let Some(peer) = peer else {
            self.stats.drop(DropReason::UnknownKey);
            return None;
        };
        let mut inner = peer.lock();
        let (result, reply) = match inner.tunn.decapsulate(Some(src), d, out) {
            TunnResult::WriteToTunnelV4(p, inner_src) => (Some((p.len(), inner_src)), false),
            TunnResult::WriteToTunnelV6(..) => {
                self.stats.drop(DropReason::Malformed);
                return None;
            }
            TunnResult::WriteToNetwork(b) => {
                if kind == 1 {
                    self.stats.handshakes_received.inc();
                }
                send_one(&self.sock, b, from);
                (None, true)
            }
            TunnResult::Done => (None, false),
            TunnResult::Err(e) => {
                self.stats.drop(DropReason::of(&e));
                return None;
            }
        };
        // Authenticated: the peer is where it spoke from (WireGuard's roaming).
        inner.endpoint = from;
        if reply {
            // Packets queued while the handshake ran go now.
            while let TunnResult::WriteToNetwork(b) = inner.tunn.decapsulate(None, &[], scratch) {
                self.stats.tx.inc();
                send_one(&self.sock, b, from);
            }
        }
        drop(inner);
        let (len, inner_src) = result?;
        // The inner source must be one of the peer's allowed IPs (cryptokey routing).
        match table.route(inner_src) {
            Some(owner) if Arc::ptr_eq(owner, peer) => {}
            _ => {
                self.stats.drop(DropReason::SpoofedSource);
                return None;
            }
        }
        if len < 20 || !self.own.contains(&Ipv4Addr::new(out[16], out[17], out[18], out[19])) {
            // Only traffic for our subnet enters; anything else would be routed onwards.
            self.stats.drop(DropReason::NoPeer);
            return None;
        }
        self.stats.rx.inc();
        Some(len)
    }
}

/// The protocol's timers: handshake retries, rekeying, keepalives, expiry.
struct Timers {
    sock: Socket,
    peers: Peers,
    id: Arc<Identity>,
    stats: Stats,
    stop: Arc<Stop>,
}

impl Timers {
    fn run(self) {
        let mut buf = vec![0u8; PACKET];
        let mut last_reset = Instant::now();
        while !self.stop.stopped() {
            self.stop.wait(None, PollTimeout::from(TICK.as_millis() as u16));
            if self.stop.stopped() {
                return;
            }
            if last_reset.elapsed() >= Duration::from_secs(1) {
                self.id.limiter.reset_count();
                last_reset = Instant::now();
            }
            let table = self.peers.snapshot();
            for peer in table.by_key.values() {
                let mut inner = peer.lock();
                let to = inner.endpoint;
                if let TunnResult::WriteToNetwork(b) = inner.tunn.update_timers(&mut buf) {
                    if b.first() == Some(&1) {
                        self.stats.handshakes_sent.inc();
                    } else {
                        self.stats.keepalives.inc();
                    }
                    send_one(&self.sock, b, to);
                }
            }
        }
    }
}
