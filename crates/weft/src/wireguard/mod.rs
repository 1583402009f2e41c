//! WireGuard in userspace, for kernels without the `wireguard` link type: the TUN device
//! `flannel-wg` ⇄ UDP, with WireGuard's protocol (handshakes, cookies, timers, rekeying,
//! transport encryption) from `boringtun`'s sans-I/O [`Tunn`], one per peer. The socket and
//! TUN machinery is the udp engine's: batched reads with TSO super-packets split in
//! userspace, UDP GSO sends of equal-sized encrypted datagrams, UDP GRO receives, and TCP
//! coalescing on the way back into the TUN device.
//!
//! Threads: TUN → network (encrypt), network → TUN (decrypt; one per socket: the
//! single-device `auto` mode speaks IPv4 and IPv6), and a timer thread that calls
//! [`Tunn::update_timers`] every 250 ms (handshake retries, rekeying, keepalives). One
//! engine per device: `separate` mode with IPv6 runs `flannel-wg` and `flannel-wg-v6`. The peer table is changed in place, one peer per lease event: a
//! removed peer's sessions go with it, so it can neither send nor receive from the next
//! datagram on.

pub mod kernel;
pub mod key;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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
use ipnet::IpNet;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;
use prometheus_client::metrics::counter::Counter;
use tun_rs::{DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};
use weft_core::lease::SubnetKey;
use weft_core::wireguard::{Key, Peer};

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
    /// Not a WireGuard message, or not an IP packet (of a family the device carries).
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
    /// The lease that configured it (the one whose removal takes it away).
    lease: SubnetKey,
    tunn: Tunn,
    /// Where datagrams go: the lease's endpoint, or where the peer last spoke from.
    endpoint: SocketAddr,
    /// The endpoint the lease gave (a new one replaces a roamed endpoint).
    configured: SocketAddr,
}

impl PeerState {
    fn lock(&self) -> std::sync::MutexGuard<'_, PeerInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The peers, by allowed subnet, public key, session index and lease.
#[derive(Default)]
struct Table {
    /// IPv4 lease prefix length (every subnet of a network has it).
    prefix: u8,
    /// IPv6 lease prefix length.
    prefix6: u8,
    by_subnet: HashMap<u32, Arc<PeerState>>,
    by_subnet6: HashMap<u128, Arc<PeerState>>,
    by_key: HashMap<[u8; 32], Arc<PeerState>>,
    by_index: HashMap<u32, Arc<PeerState>>,
    /// The peer each lease configured: where a lease event finds its peer.
    by_lease: HashMap<SubnetKey, Arc<PeerState>>,
}

/// Whether `m[k]` is `s` itself.
fn holds<K: std::hash::Hash + Eq>(m: &HashMap<K, Arc<PeerState>>, k: &K, s: &Arc<PeerState>) -> bool {
    m.get(k).is_some_and(|x| Arc::ptr_eq(x, s))
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) }
}

fn mask6(prefix: u8) -> u128 {
    if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix.min(128))) }
}

impl Table {
    /// Takes lease `lease`'s peer out: its subnets, and its key and index unless another
    /// lease took the peer over (its key moved there while events are applied one by one).
    fn remove_lease(&mut self, lease: &SubnetKey) {
        let Some(s) = self.by_lease.remove(lease) else { return };
        if let Some(n) = lease.v4.filter(|n| n.prefix_len() == self.prefix) {
            let k = u32::from(n.network());
            if holds(&self.by_subnet, &k, &s) {
                self.by_subnet.remove(&k);
            }
        }
        if let Some(n) = lease.v6.filter(|n| n.prefix_len() == self.prefix6) {
            let k = u128::from(n.network());
            if holds(&self.by_subnet6, &k, &s) {
                self.by_subnet6.remove(&k);
            }
        }
        if s.lock().lease == *lease {
            if holds(&self.by_key, &s.key.0, &s) {
                self.by_key.remove(&s.key.0);
            }
            if holds(&self.by_index, &s.index, &s) {
                self.by_index.remove(&s.index);
            }
        }
    }

    /// Makes `p` the peer of its lease. A peer of the same key and settings (this lease's,
    /// or one another lease had) keeps its sessions, with the lease's endpoint; otherwise
    /// `make` creates one (the lease's previous peer goes).
    fn upsert(&mut self, p: &Peer, psk: Option<Key>, keepalive: u16, make: impl FnOnce(&Table) -> Arc<PeerState>) {
        let reuse = self.by_key.get(&p.public_key.0).filter(|s| s.psk == psk && s.keepalive == keepalive).cloned();
        if let Some(old) = self.by_lease.get(&p.lease)
            && !reuse.as_ref().is_some_and(|r| Arc::ptr_eq(r, old))
        {
            self.remove_lease(&p.lease);
        }
        let state = match reuse {
            Some(s) => {
                let mut i = s.lock();
                i.lease = p.lease;
                if i.configured != p.endpoint {
                    i.configured = p.endpoint;
                    i.endpoint = p.endpoint;
                }
                drop(i);
                s
            }
            None => {
                // Another peer with this key but other settings is replaced.
                if let Some(stale) = self.by_key.remove(&p.public_key.0)
                    && holds(&self.by_index, &stale.index, &stale)
                {
                    self.by_index.remove(&stale.index);
                }
                make(self)
            }
        };
        for net in &p.allowed_ips {
            match net {
                IpNet::V4(n) if n.prefix_len() == self.prefix => {
                    self.by_subnet.insert(u32::from(n.network()), state.clone());
                }
                IpNet::V6(n) if n.prefix_len() == self.prefix6 => {
                    self.by_subnet6.insert(u128::from(n.network()), state.clone());
                }
                _ => {}
            }
        }
        self.by_index.insert(state.index, state.clone());
        self.by_key.insert(state.key.0, state.clone());
        self.by_lease.insert(p.lease, state);
    }

    fn route(&self, dst: IpAddr) -> Option<&Arc<PeerState>> {
        match dst {
            IpAddr::V4(a) => self.by_subnet.get(&(u32::from(a) & mask(self.prefix))),
            IpAddr::V6(a) => self.by_subnet6.get(&(u128::from(a) & mask6(self.prefix6))),
        }
    }
}

/// An IP packet's version and destination (`None`: too short or not IP).
fn destination(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => Some(IpAddr::V4(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]))),
        6 if pkt.len() >= 40 => {
            let b: [u8; 16] = pkt[24..40].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// What the threads share: the table, changed in place one peer per lease event. A thread
/// holds the read lock for one batch (never across a wait); an update waits for the
/// batches in flight.
#[derive(Clone, Default)]
struct Peers(Arc<RwLock<Table>>);

impl Peers {
    fn snapshot(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
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

/// A userspace WireGuard device (`flannel-wg` or `flannel-wg-v6`).
pub struct Engine {
    name: &'static str,
    dev: Arc<SyncDevice>,
    /// One socket per outer family the device speaks (the single-device `auto` mode: two).
    socks: Vec<Socket>,
    /// TUN offloads (IFF_VNET_HDR with TSO) are on.
    pub tun_offload: bool,
    id: Arc<Identity>,
    peers: Peers,
    next_index: AtomicU32,
    running: Option<Running>,
    /// The counters, once started (kept for a restart after a reopen).
    stats: Option<Stats>,
    /// Our subnets the device delivers to (set by `start`).
    own: Vec<IpNet>,
}

fn open_tun(name: &str, offload: bool) -> io::Result<SyncDevice> {
    let d = DeviceBuilder::new().name(name).offload(offload).build_sync()?;
    d.set_nonblocking(true)?;
    Ok(d)
}

impl Engine {
    /// Opens the TUN device `name` (with offloads when the kernel allows) and binds a UDP
    /// socket on each of `binds` (one per outer family), for the private key `private`.
    pub fn open(name: &'static str, binds: &[SocketAddr], private: &Key) -> io::Result<Engine> {
        // WEFT_UDP_DISABLE turns offloads off here too (tun_tso, udp_gso, udp_gro).
        let disabled = std::env::var("WEFT_UDP_DISABLE").unwrap_or_default();
        let off = |f: &str| disabled.split(',').any(|d| d.trim() == f);
        let (dev, tun_offload) = match open_tun(name, !off("tun_tso")) {
            Ok(d) if d.tcp_gso() && !off("tun_tso") => (d, true),
            Ok(d) => (d, false),
            Err(e) => {
                tracing::warn!("TUN offloads unavailable ({e}); using plain reads and writes");
                (open_tun(name, false)?, false)
            }
        };
        let mut socks = Vec::new();
        for b in binds {
            let mut sock = Socket::bind(*b, true)?;
            sock.gso &= !off("udp_gso");
            if off("udp_gro") {
                sock.disable_gro()?;
            }
            socks.push(sock);
        }
        if socks.is_empty() {
            return Err(io::Error::other("no address to bind the WireGuard socket to"));
        }
        let secret = StaticSecret::from(private.0);
        let public = PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Ok(Engine {
            name,
            dev: Arc::new(dev),
            socks,
            tun_offload,
            id: Arc::new(Identity { secret, public, limiter }),
            peers: Peers::default(),
            next_index: AtomicU32::new(rand::random::<u32>() & 0x00ff_ffff),
            running: None,
            stats: None,
            own: Vec::new(),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Which paths run, for the log and `/metrics`.
    pub fn paths(&self) -> [(&'static str, bool); 3] {
        [
            ("tun_tso", self.tun_offload),
            ("udp_gso", self.socks.iter().all(|s| s.gso)),
            ("udp_gro", self.socks.iter().all(|s| s.gro)),
        ]
    }

    /// The number of peers configured.
    pub fn peer_count(&self) -> usize {
        self.peers.snapshot().by_key.len()
    }

    /// Replaces the peer set (`prefix`/`prefix6`: the lease prefix lengths): peers whose
    /// key, PSK and keepalive are unchanged keep their sessions (a new endpoint from the
    /// lease replaces the old one); others are created; the rest are gone with their
    /// sessions. Returns the peers left out because the device has no socket of their
    /// endpoint's family.
    pub fn set_peers(&self, prefix: u8, prefix6: u8, wanted: &[Peer], psk: Option<Key>, keepalive: u16) -> Vec<Peer> {
        let mut t = self.peers.write();
        let keep: std::collections::HashSet<SubnetKey> = wanted.iter().map(|p| p.lease).collect();
        let gone: Vec<SubnetKey> = t.by_lease.keys().filter(|k| !keep.contains(k)).copied().collect();
        let changes = gone.into_iter().map(|k| (k, None)).chain(wanted.iter().map(|p| (p.lease, Some(p))));
        self.change(&mut t, prefix, prefix6, changes, psk, keepalive)
    }

    /// Sets the peer of each lease in `changes` (`None`: it has none on this device now);
    /// other peers are untouched. Returns the peers left out because the device has no
    /// socket of their endpoint's family.
    pub fn update_peers<'a>(
        &self,
        prefix: u8,
        prefix6: u8,
        changes: impl IntoIterator<Item = (SubnetKey, Option<&'a Peer>)>,
        psk: Option<Key>,
        keepalive: u16,
    ) -> Vec<Peer> {
        let mut t = self.peers.write();
        self.change(&mut t, prefix, prefix6, changes, psk, keepalive)
    }

    fn change<'a>(
        &self,
        t: &mut Table,
        prefix: u8,
        prefix6: u8,
        changes: impl IntoIterator<Item = (SubnetKey, Option<&'a Peer>)>,
        psk: Option<Key>,
        keepalive: u16,
    ) -> Vec<Peer> {
        if (t.prefix, t.prefix6) != (prefix, prefix6) {
            // Entries are keyed by the prefix: a new one (never, within a network) starts over.
            *t = Table { prefix, prefix6, ..Table::default() };
        }
        let mut unreachable = Vec::new();
        for (lease, p) in changes {
            match p {
                Some(p) if p.lease == lease && self.socks.iter().any(|s| s.reaches(&p.endpoint)) => {
                    t.upsert(p, psk, keepalive, |t| self.new_peer(p.lease, p.public_key, p.endpoint, psk, keepalive, t))
                }
                Some(p) => {
                    unreachable.push(p.clone());
                    t.remove_lease(&lease);
                }
                None => t.remove_lease(&lease),
            }
        }
        unreachable
    }

    fn new_peer(
        &self,
        lease: SubnetKey,
        key: Key,
        endpoint: SocketAddr,
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
            inner: Mutex::new(PeerInner { lease, tunn, endpoint, configured: endpoint }),
        })
    }

    /// Whether the threads run.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Opens the device again (it was deleted): the threads are restarted on the new
    /// device; peers keep their sessions.
    pub fn reopen(&mut self) -> io::Result<()> {
        let was_running = self.running.is_some();
        self.stop();
        let d = open_tun(self.name, self.tun_offload)?;
        if self.tun_offload && !d.tcp_gso() {
            return Err(io::Error::other("the re-opened TUN device lacks the offloads the engine runs with"));
        }
        self.dev = Arc::new(d);
        if was_running {
            self.run()?;
        }
        Ok(())
    }

    /// Stops the threads and waits for them (about a second at most).
    pub fn stop(&mut self) {
        let Some(r) = self.running.take() else { return };
        r.stop.trigger();
        // Wake the receivers blocked on their sockets.
        for s in &self.socks {
            if let Ok(me) = s.local_addr() {
                let _ = s.send_to(&[], me);
            }
        }
        for t in r.threads {
            if t.join().is_err() {
                tracing::error!("a wireguard engine thread panicked");
            }
        }
        tracing::info!(device = self.name, "wireguard engine stopped");
    }

    /// Starts the threads for our subnets `own` (what the device delivers to); a running
    /// engine is restarted.
    pub fn start(&mut self, own: Vec<IpNet>, metrics: &Metrics) -> io::Result<()> {
        for (feature, on) in self.paths() {
            metrics.udp_offload.get_or_create(&vec![("feature", feature)]).set(i64::from(on));
        }
        self.stats = Some(Stats::new(metrics));
        self.own = own;
        self.run()
    }

    fn run(&mut self) -> io::Result<()> {
        self.stop();
        let own = self.own.clone();
        let Some(stats) = self.stats.clone() else {
            return Err(io::Error::other("the wireguard engine was never started"));
        };
        let [(_, tso), (_, gso), (_, gro)] = self.paths();
        tracing::info!(
            device = self.name,
            tun_tso = tso,
            udp_gso = gso,
            udp_gro = gro,
            "wireguard userspace engine paths"
        );
        let stop = Arc::new(Stop { flag: AtomicBool::new(false), event: EventFd::new().map_err(io::Error::from)? });
        let mut running = Running { stop: stop.clone(), threads: Vec::with_capacity(4) };
        let clones = || self.socks.iter().map(Socket::try_clone).collect::<io::Result<Vec<_>>>();
        let out = TunToNet {
            name: self.name,
            dev: self.dev.clone(),
            socks: clones()?,
            peers: self.peers.clone(),
            stats: stats.clone(),
            offload: self.tun_offload,
            stop: stop.clone(),
        };
        let mut inbound = Vec::new();
        for sock in clones()? {
            inbound.push(NetToTun {
                name: self.name,
                dev: self.dev.clone(),
                sock,
                peers: self.peers.clone(),
                id: self.id.clone(),
                stats: stats.clone(),
                offload: self.tun_offload,
                own: own.clone(),
                stop: stop.clone(),
            });
        }
        let timers = Timers { socks: clones()?, peers: self.peers.clone(), id: self.id.clone(), stats, stop };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| std::thread::Builder::new().name(name.into()).spawn(f);
        let mut r = spawn("wg-tun-to-net", Box::new(move || out.run()))
            .map(|t| running.threads.push(t))
            .and_then(|()| spawn("wg-timers", Box::new(move || timers.run())).map(|t| running.threads.push(t)));
        for inb in inbound {
            if r.is_ok() {
                r = spawn("wg-net-to-tun", Box::new(move || inb.run())).map(|t| running.threads.push(t));
            }
        }
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
fn send_one(sock: &Socket, buf: &[u8], to: SocketAddr) {
    if let Err(e) = sock.send_to(buf, to) {
        tracing::debug!("wireguard send to {to}: {e}");
    }
}

/// The socket of `to`'s family among `socks`.
fn sock_for(socks: &[Socket], to: &SocketAddr) -> Option<usize> {
    socks.iter().position(|s| s.reaches(to))
}

/// TUN → network: encrypt and send.
struct TunToNet {
    name: &'static str,
    dev: Arc<SyncDevice>,
    socks: Vec<Socket>,
    peers: Peers,
    stats: Stats,
    offload: bool,
    stop: Arc<Stop>,
}

/// Encrypted datagrams of one size for one endpoint (the last may be shorter): one GSO
/// send. `buf` keeps its full size (no zeroing per packet); `len` is what is filled.
struct Group {
    buf: Vec<u8>,
    len: usize,
    to: Option<(usize, SocketAddr)>,
    seg: usize,
    count: usize,
    closed: bool,
}

impl TunToNet {
    fn run(self) {
        let mut orig = vec![0u8; BIG];
        let mut bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE).map(|_| vec![0u8; PACKET]).collect();
        let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
        let mut g = Group { buf: vec![0u8; BIG + PACKET], len: 0, to: None, seg: 0, count: 0, closed: false };
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
                        tracing::warn!(
                            "reading {} failed ({other:?}); pausing until the device is repaired",
                            self.name
                        );
                    }
                    self.stop.wait(None, PollTimeout::from(100u16));
                    continue;
                }
            };
            let table = self.peers.snapshot();
            for i in 0..n {
                self.encrypt(&table, &bufs[i][..sizes[i]], &mut g);
            }
            let end = g.len;
            self.flush(&mut g, end);
        }
    }

    /// Encrypts `pkt` for its peer into the group (sending the group first when the new
    /// datagram cannot join it).
    fn encrypt(&self, table: &Table, pkt: &[u8], g: &mut Group) {
        let Some(dst) = destination(pkt) else {
            self.stats.drop(DropReason::Malformed);
            return;
        };
        let Some(peer) = table.route(dst) else {
            self.stats.drop(DropReason::NoPeer);
            return;
        };
        let start = g.len;
        let need = start + (pkt.len() + DATA_OVERHEAD).max(HANDSHAKE_INIT);
        if need > g.buf.len() {
            g.buf.resize(need, 0);
        }
        let mut inner = peer.lock();
        let Some(si) = sock_for(&self.socks, &inner.endpoint) else {
            drop(inner);
            self.stats.drop(DropReason::NoPeer);
            return;
        };
        let to = (si, inner.endpoint);
        let (len, data) = match inner.tunn.encapsulate(pkt, &mut g.buf[start..]) {
            TunnResult::WriteToNetwork(b) => (b.len(), b.first() == Some(&4)),
            TunnResult::Err(e) => {
                drop(inner);
                tracing::debug!("wireguard encapsulate: {e:?}");
                self.stats.drop(DropReason::of(&e));
                return;
            }
            // Queued until the handshake completes.
            _ => (0, false),
        };
        drop(inner);
        if len == 0 {
            return;
        }
        if !data {
            // A handshake initiation: on its own, now.
            self.stats.handshakes_sent.inc();
            send_one(&self.socks[to.0], &g.buf[start..start + len], to.1);
            return;
        }
        g.len = start + len;
        self.stats.tx.inc();
        let fits = g.to == Some(to)
            && !g.closed
            && len <= g.seg
            && g.count < MAX_GSO_SEGMENTS
            && start + len <= 65_000
            && self.socks[to.0].gso;
        if !fits && g.count > 0 {
            self.flush(g, start);
            // The new datagram moves to the front of the emptied group.
            g.buf.copy_within(start..start + len, 0);
            g.len = len;
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
        if let Some((si, to)) = g.to.take()
            && g.count > 0
        {
            let sock = &self.socks[si];
            let r =
                if g.count == 1 { sock.send_to(&g.buf[..upto], to) } else { sock.send_gso(&g.buf[..upto], g.seg, to) };
            if let Err(e) = r {
                tracing::debug!("wireguard send to {to}: {e}");
            }
        }
        if upto == g.len {
            g.len = 0;
        }
        g.count = 0;
        g.seg = 0;
        g.closed = false;
    }
}

/// Network → TUN: find the peer, decrypt, check the source, write (one per socket).
struct NetToTun {
    name: &'static str,
    dev: Arc<SyncDevice>,
    sock: Socket,
    peers: Peers,
    id: Arc<Identity>,
    stats: Stats,
    offload: bool,
    own: Vec<IpNet>,
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
                    // Plaintext is never longer than its datagram (a handshake answer is shorter
                    // than an initiation). Only growth is zeroed: the bytes are overwritten.
                    let need = off + d.len().max(HANDSHAKE_INIT);
                    if b.len() < need {
                        b.resize(need, 0);
                    } else {
                        b.truncate(need);
                    }
                    // A packet written alone needs a zero virtio header (tun-rs writes one
                    // only for coalesced packets); the last batch may have left one here.
                    b[..off].fill(0);
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
                        tracing::warn!("writing to {} failed ({e}); pausing until the device is repaired", self.name);
                    }
                    self.stop.wait(None, PollTimeout::from(100u16));
                }
            }
        }
    }

    /// Handles one datagram; `Some(len)` when `out[..len]` is a packet for the TUN device.
    fn datagram(&self, table: &Table, d: &[u8], from: SocketAddr, out: &mut [u8], scratch: &mut [u8]) -> Option<usize> {
        let src = from.ip();
        let kind = d.first().copied().unwrap_or(0);
        let index = |at: usize| d.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 8);
        let peer = match kind {
            1 => {
                // The sender's key is inside the (MAC-checked) initiation; cookie replies
                // under load are sent from here.
                let packet = match self.id.limiter.verify_packet(Some(src), d, scratch) {
                    Ok(p) => p,
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        // Refused until the sender proves its address with the cookie.
                        self.stats.cookies.inc();
                        self.stats.drop(DropReason::UnderLoad);
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
            TunnResult::WriteToTunnelV4(p, inner_src) => (Some((p.len(), IpAddr::V4(inner_src))), false),
            TunnResult::WriteToTunnelV6(p, inner_src) => (Some((p.len(), IpAddr::V6(inner_src))), false),
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
        if !destination(&out[..len]).is_some_and(|d| self.own.iter().any(|n| n.contains(&d))) {
            // Only traffic for our subnets enters; anything else would be routed onwards.
            self.stats.drop(DropReason::NoPeer);
            return None;
        }
        self.stats.rx.inc();
        Some(len)
    }
}

/// The protocol's timers: handshake retries, rekeying, keepalives, expiry.
struct Timers {
    socks: Vec<Socket>,
    peers: Peers,
    id: Arc<Identity>,
    stats: Stats,
    stop: Arc<Stop>,
}

impl Timers {
    fn run(self) {
        let mut buf = vec![0u8; PACKET];
        let mut all: Vec<Arc<PeerState>> = Vec::new();
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
            // The peers' handles, then the lock released: a lease event never waits for a
            // pass over every peer's timers.
            all.clear();
            all.extend(self.peers.snapshot().by_key.values().cloned());
            for peer in &all {
                let mut inner = peer.lock();
                let to = inner.endpoint;
                if let TunnResult::WriteToNetwork(b) = inner.tunn.update_timers(&mut buf) {
                    if b.first() == Some(&1) {
                        self.stats.handshakes_sent.inc();
                    } else {
                        self.stats.keepalives.inc();
                    }
                    if let Some(si) = sock_for(&self.socks, &to) {
                        send_one(&self.socks[si], b, to);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(lease: &str, key: u8, index: u32) -> Arc<PeerState> {
        let id = StaticSecret::from([7u8; 32]);
        let endpoint: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let tunn = Tunn::new(id, PublicKey::from([key; 32]), None, None, index, None);
        Arc::new(PeerState {
            key: Key([key; 32]),
            psk: None,
            keepalive: 0,
            index,
            inner: Mutex::new(PeerInner { lease: lease.parse().unwrap(), tunn, endpoint, configured: endpoint }),
        })
    }

    fn peer(lease: &str, key: u8, endpoint: &str) -> Peer {
        let l: SubnetKey = lease.parse().unwrap();
        Peer {
            lease: l,
            public_key: Key([key; 32]),
            endpoint: endpoint.parse().unwrap(),
            allowed_ips: l.v4.map(IpNet::V4).into_iter().chain(l.v6.map(IpNet::V6)).collect(),
        }
    }

    fn table() -> Table {
        Table { prefix: 24, prefix6: 64, ..Table::default() }
    }

    /// `t.upsert` with new peers numbered from `next`.
    fn put(t: &mut Table, p: &Peer, next: &mut u32) {
        *next += 1;
        let (lease, key, index) = (p.lease.to_string(), p.public_key.0[0], *next);
        t.upsert(p, None, 0, |_| state(&lease, key, index));
    }

    fn consistent(t: &Table) {
        for (lease, s) in &t.by_lease {
            assert!(holds(&t.by_key, &s.key.0, s), "{lease}: key");
            assert!(holds(&t.by_index, &s.index, s), "{lease}: index");
            assert!(holds(&t.by_subnet, &u32::from(lease.v4.unwrap().network()), s), "{lease}: subnet");
            assert_eq!(s.lock().lease, *lease);
        }
        assert_eq!(
            (t.by_key.len(), t.by_index.len(), t.by_subnet.len()),
            (t.by_lease.len(), t.by_lease.len(), t.by_lease.len())
        );
    }

    #[test]
    fn one_lease_changes_only_its_peer_and_keeps_sessions_where_it_can() {
        let (mut t, mut next) = (table(), 0);
        put(&mut t, &peer("10.5.2.0-24", 2, "192.0.2.12:51820"), &mut next);
        put(&mut t, &peer("10.5.3.0-24", 3, "192.0.2.13:51820"), &mut next);
        let b = t.by_lease[&"10.5.3.0-24".parse().unwrap()].clone();
        let a = t.by_lease[&"10.5.2.0-24".parse().unwrap()].clone();
        // A new endpoint for a: the same peer (its sessions), the new endpoint; b untouched.
        put(&mut t, &peer("10.5.2.0-24", 2, "192.0.2.22:51820"), &mut next);
        let a2 = t.route("10.5.2.9".parse().unwrap()).unwrap().clone();
        assert!(Arc::ptr_eq(&a, &a2));
        assert_eq!(a2.lock().endpoint, "192.0.2.22:51820".parse().unwrap());
        assert!(Arc::ptr_eq(t.route("10.5.3.9".parse().unwrap()).unwrap(), &b));
        consistent(&t);
        // A new key: a new peer; the old key and index are gone.
        put(&mut t, &peer("10.5.2.0-24", 4, "192.0.2.22:51820"), &mut next);
        assert!(!t.by_key.contains_key(&[2; 32]) && !t.by_index.contains_key(&a.index));
        assert_eq!(t.route("10.5.2.9".parse().unwrap()).unwrap().key, Key([4; 32]));
        consistent(&t);
        // Removal takes every entry of that lease's peer, nothing else.
        t.remove_lease(&"10.5.2.0-24".parse().unwrap());
        assert!(t.route("10.5.2.9".parse().unwrap()).is_none());
        assert!(Arc::ptr_eq(t.route("10.5.3.9".parse().unwrap()).unwrap(), &b));
        consistent(&t);
        assert_eq!(t.by_lease.len(), 1);
        // A lease not in the table, or of another prefix length, changes nothing.
        t.remove_lease(&"10.5.9.0-24".parse().unwrap());
        t.remove_lease(&"10.5.0.0-16".parse().unwrap());
        put(&mut t, &peer("10.5.0.0-16", 9, "192.0.2.99:51820"), &mut next);
        assert!(t.route("10.5.3.9".parse().unwrap()).is_some_and(|s| Arc::ptr_eq(s, &b)));
        assert!(t.route("10.5.0.1".parse().unwrap()).is_none(), "a /16 is no subnet of this network's peers");
        t.remove_lease(&"10.5.0.0-16".parse().unwrap());
        consistent(&t);
    }

    #[test]
    fn a_key_that_moves_to_another_lease_keeps_its_peer_when_the_old_lease_goes() {
        let (mut t, mut next) = (table(), 0);
        put(&mut t, &peer("10.5.2.0-24", 2, "192.0.2.12:51820"), &mut next);
        let s = t.by_key[&[2; 32]].clone();
        // The host got a new subnet (events: the new lease first, by key order, then the old).
        put(&mut t, &peer("10.5.1.0-24", 2, "192.0.2.12:51820"), &mut next);
        assert!(Arc::ptr_eq(&t.by_key[&[2; 32]], &s), "the sessions move with the key");
        t.remove_lease(&"10.5.2.0-24".parse().unwrap());
        assert!(Arc::ptr_eq(&t.by_key[&[2; 32]], &s));
        assert!(t.by_index.contains_key(&s.index));
        assert!(t.route("10.5.2.9".parse().unwrap()).is_none());
        assert!(Arc::ptr_eq(t.route("10.5.1.9".parse().unwrap()).unwrap(), &s));
        consistent(&t);
    }
}
