//! The udp backend's forwarding engine: TUN `flannel0` ⇄ UDP port 8285, one raw inner IPv4
//! packet per datagram (flannel's wire format), with batched system calls and offloads:
//! TSO super-packets from the TUN device are split in userspace and sent with UDP GSO;
//! datagrams received with UDP GRO are coalesced into TCP super-packets for the TUN device.
//! Each offload falls back to a plain batched path when the kernel lacks it.

pub mod fastpath;
pub mod socket;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;

use bytes::BytesMut;
use ipnet::Ipv4Net;
use prometheus_client::metrics::counter::Counter;
use tun_rs::{
    DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_LEN, VirtioNetHdr,
};
use weft_core::packet::{
    DropReason, Outbound, PeerTable, SuperPacket, icmp_net_unreachable, inbound, outbound, tcp_super_packet,
};

use self::fastpath::{Attachment, FastPath};
use self::socket::{MAX_GSO_SEGMENTS, Socket};
use crate::metrics::Metrics;
use weft_core::cache::{LeaseCache, LeaseEvent};

/// The TUN device's name, as flannel's (`flannel%d` → `flannel0`).
pub const DEVICE: &str = "flannel0";
/// Room for one receive: the largest TUN read or GRO-coalesced datagram batch.
const BIG: usize = 65_536 + VIRTIO_NET_HDR_LEN;
/// virtio_net_hdr's "checksum from csum_start" flag (not exported by tun-rs).
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// Largest inner packet handled (the device MTU is far below).
const PACKET: usize = 16 * 1024;
/// ICMP "net unreachable" messages per second, at most.
const ICMP_PER_SECOND: u32 = 10;

/// Counters the engine updates without locks (handles created once).
struct Stats {
    tx: Counter,
    rx: Counter,
    icmp: Counter,
    drops: Vec<(DropReason, Counter)>,
}

impl Stats {
    fn new(m: &Metrics) -> Stats {
        // One statement per handle: `get_or_create` returns a lock guard, and a second call
        // while it is alive would wait for it forever.
        let counter = |family: &prometheus_client::metrics::family::Family<crate::metrics::Labels, Counter>, label| {
            family.get_or_create(&label).clone()
        };
        let tx = counter(&m.udp_packets, vec![("direction", "tx")]);
        let rx = counter(&m.udp_packets, vec![("direction", "rx")]);
        let icmp = counter(&m.udp_packets, vec![("direction", "icmp_unreachable")]);
        let mut drops = Vec::with_capacity(DropReason::ALL.len());
        for r in DropReason::ALL {
            drops.push((r, counter(&m.udp_drops, vec![("reason", r.label())])));
        }
        Stats { tx, rx, icmp, drops }
    }

    fn drop(&self, r: DropReason) {
        if let Some((_, c)) = self.drops.iter().find(|(x, _)| *x == r) {
            c.inc();
        }
    }
}

/// The shared peer table, changed in place one peer at a time on lease events. A
/// forwarding thread holds the read lock for one batch (never across a wait), so an update
/// waits at most for the batches in flight and a batch never sees half an update; no table
/// is copied or rebuilt per event.
#[derive(Clone, Default)]
pub struct Peers(Arc<RwLock<PeerTable>>);

impl Peers {
    /// The table for one batch: drop it before waiting for more packets.
    fn snapshot(&self) -> RwLockReadGuard<'_, PeerTable> {
        // A writer that panicked left a table whose maps are whole: forwarding goes on.
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the table in place (one peer per lease event).
    pub fn update<R>(&self, f: impl FnOnce(&mut PeerTable) -> R) -> R {
        f(&mut self.0.write().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the table (a rebuild from the whole peer set).
    pub fn set(&self, t: PeerTable) {
        self.update(|w| *w = t);
    }
}

/// The TUN device in use, with a generation number: replaced whole when `flannel0` is
/// re-created, and picked up by the forwarding threads after their next I/O error.
#[derive(Clone)]
struct DevSlot(Arc<Mutex<(u64, Arc<SyncDevice>)>>);

impl DevSlot {
    fn get(&self) -> (u64, Arc<SyncDevice>) {
        match self.0.lock() {
            Ok(g) => (g.0, g.1.clone()),
            Err(p) => {
                let g = p.into_inner();
                (g.0, g.1.clone())
            }
        }
    }

    fn set(&self, d: SyncDevice) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *g = (g.0 + 1, Arc::new(d));
    }
}

/// First pause after an I/O error on the TUN device; doubled per error up to the maximum.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between attempts: the device is repaired within moments by the reconciler.
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// A forwarding thread's hold on the TUN device: on an I/O error it pauses (never a busy
/// loop: the deleted device of issue 9 made reads fail at once, forever), then takes the
/// re-opened device if there is one.
struct DevHandle {
    slot: DevSlot,
    generation: u64,
    dev: Arc<SyncDevice>,
    backoff: Duration,
    errors: u64,
}

impl DevHandle {
    fn new(slot: DevSlot) -> DevHandle {
        let (generation, dev) = slot.get();
        DevHandle { slot, generation, dev, backoff: BACKOFF_MIN, errors: 0 }
    }

    fn ok(&mut self) {
        self.backoff = BACKOFF_MIN;
        self.errors = 0;
    }

    fn failed(&mut self, what: &str, e: &dyn std::fmt::Display) {
        self.errors += 1;
        if self.errors == 1 {
            tracing::warn!("{what} on {DEVICE} failed ({e}); pausing until the device is repaired");
        }
        std::thread::sleep(self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        let (generation, dev) = self.slot.get();
        if generation != self.generation {
            tracing::info!("{DEVICE} was re-opened; forwarding on the new device");
            self.generation = generation;
            self.dev = dev;
            self.ok();
        }
    }
}

/// Opens `flannel0`. Non-blocking: the reader waits in `poll` beside the stop event only
/// when there is nothing to read, so a busy path costs no extra system call.
fn open_tun(offload: bool) -> io::Result<SyncDevice> {
    let d = DeviceBuilder::new().name(DEVICE).offload(offload).build_sync()?;
    d.set_nonblocking(true)?;
    Ok(d)
}

/// How the forwarding threads are told to end: a flag, and an eventfd that wakes a thread
/// waiting for the TUN device.
struct Stop {
    flag: AtomicBool,
    event: EventFd,
}

impl Stop {
    fn new() -> io::Result<Stop> {
        Ok(Stop { flag: AtomicBool::new(false), event: EventFd::new().map_err(io::Error::from)? })
    }

    fn stopped(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    fn trigger(&self) {
        self.flag.store(true, Ordering::Release);
        // The counter stays non-zero, so every waiter wakes, now and later.
        let _ = self.event.write(1);
    }

    /// Waits until `fd` is readable (or in error) or the engine is stopped.
    fn wait_readable(&self, fd: BorrowedFd<'_>) {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN), PollFd::new(self.event.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::NONE);
    }
}

/// The forwarding threads of a started engine.
struct Running {
    stop: Arc<Stop>,
    threads: Vec<JoinHandle<()>>,
}

/// The device and socket, created before the lease is taken.
pub struct Udp {
    dev: DevSlot,
    sock: Socket,
    /// TUN offloads (IFF_VNET_HDR with TSO) are on.
    pub tun_offload: bool,
    port: u16,
    /// The peer table.
    pub peers: Peers,
    running: Option<Running>,
    /// The kernel fast path, when attached (shared with the metrics' refresher).
    fast: Arc<Mutex<Option<FastPath>>>,
    /// The fast path is turned off (`WEFT_UDP_DISABLE=tc_bpf`).
    fast_disabled: bool,
    /// The attachment the last attempt failed for (not retried until it changes).
    fast_failed: Option<Attachment>,
    /// Watches the fast path's detour while it runs.
    watchdog: Option<Watchdog>,
}

/// A thread that checks, twice a second, that super-packets sent through the receive
/// device arrive there ([`FastPath::check_detour`]). Stopped and joined on drop.
struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(fast: Arc<Mutex<Option<FastPath>>>) -> io::Result<Watchdog> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("weft-udp-watch".into()).spawn(move || {
            while !flag.load(Ordering::Acquire) {
                std::thread::park_timeout(Duration::from_millis(500));
                let mut fast = fast.lock().unwrap_or_else(|p| p.into_inner());
                let Some(f) = fast.as_mut() else { continue };
                match f.check_detour() {
                    Ok(false) => {}
                    Ok(true) => {
                        let port = f.at.rx.map_or(0, |r| r.port);
                        tracing::warn!(
                            "super-packets sent to weft-udp-rx (UDP port {port}, inside this host) stopped arriving \
                             there: a firewall INPUT rule dropping that port? They are decapsulated in place now, \
                             which is slower (the bridge splits them); allow UDP port {port} to this host's address \
                             and restart weft to have the detour back"
                        )
                    }
                    Err(e) => tracing::warn!("checking the udp fast path's detour failed: {e}"),
                }
            }
        })?;
        Ok(Watchdog { stop, thread: Some(thread) })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Udp {
    /// Opens `flannel0` (IFF_TUN|IFF_NO_PI, with offloads when the kernel allows) and binds
    /// the UDP socket on the interface address and `port`.
    pub fn open(bind: Ipv4Addr, port: u16) -> io::Result<Udp> {
        // WEFT_UDP_DISABLE=tun_tso,udp_gso,udp_gro,tc_bpf turns offloads (and the kernel fast
        // path) off, to measure the plain paths or to work around a kernel that misbehaves
        // with one of them.
        let disabled = std::env::var("WEFT_UDP_DISABLE").unwrap_or_default();
        let off = |f: &str| disabled.split(',').any(|d| d.trim() == f);
        let open = open_tun;
        let (dev, tun_offload) = match open(!off("tun_tso")) {
            Ok(d) if d.tcp_gso() && !off("tun_tso") => (d, true),
            Ok(d) => (d, false),
            Err(e) => {
                tracing::warn!("TUN offloads unavailable ({e}); using plain reads and writes");
                (open(false)?, false)
            }
        };
        let mut sock = Socket::bind(SocketAddrV4::new(bind, port).into(), true)?;
        sock.gso &= !off("udp_gso");
        if off("udp_gro") {
            sock.disable_gro()?;
        }
        Ok(Udp {
            dev: DevSlot(Arc::new(Mutex::new((0, Arc::new(dev))))),
            sock,
            tun_offload,
            port,
            peers: Peers::default(),
            running: None,
            fast: Arc::new(Mutex::new(None)),
            fast_disabled: off("tc_bpf"),
            fast_failed: None,
            watchdog: None,
        })
    }

    /// Applies lease events to the peer tables of the engine and of the fast path: each
    /// event touches its own peer's entries only.
    pub fn apply(&self, events: &[LeaseEvent], cache: &LeaseCache) {
        let mut fast = self.fast.lock().unwrap_or_else(|p| p.into_inner());
        self.peers.update(|t| {
            t.apply(events, cache);
            let Some(f) = fast.as_mut() else { return };
            for e in events {
                let (LeaseEvent::Added(l) | LeaseEvent::Removed(l)) = e;
                if let Some(net) = l.key.v4
                    && let Err(e) = f.sync_subnet(net, t)
                {
                    tracing::warn!("updating the udp fast path's peer {net} failed ({e}); the engine carries it");
                }
            }
        });
    }

    /// Replaces the peer table of the engine and of the fast path.
    pub fn set_peers(&self, table: PeerTable) {
        if let Some(f) = self.fast.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
            && let Err(e) = f.set_peers(&table)
        {
            // The programs hand unknown peers to the engine, which has the whole table.
            tracing::warn!("updating the udp fast path's peers failed ({e}); the engine carries the rest");
        }
        self.peers.set(table);
    }

    /// Runs the kernel fast path at `at` (re-attached when it changed: flannel0 or the
    /// external interface re-created). A failure is logged once per attachment and leaves
    /// the engine to carry everything. Returns whether the fast path runs.
    pub fn ensure_fast_path(&mut self, at: Attachment, max_peers: u32) -> bool {
        if self.fast_disabled {
            return false;
        }
        let mut fast = self.fast.lock().unwrap_or_else(|p| p.into_inner());
        if fast.as_ref().is_some_and(|f| f.at == at) {
            return true;
        }
        if self.fast_failed == Some(at) {
            return false;
        }
        match FastPath::attach(at, max_peers) {
            Ok(mut f) => {
                // With UDP GRO on the socket a NIC merges our datagrams for it, and the
                // merged ones would reach pods through the engine behind single ones the
                // fast path carried: reordered. Off, every datagram takes the fast path.
                if let Err(e) = self.sock.disable_gro() {
                    tracing::warn!("turning UDP GRO off for the fast path failed ({e})");
                }
                let table = self.peers.snapshot();
                if let Err(e) = f.set_peers(&table) {
                    tracing::warn!("loading the udp fast path's peers failed ({e}); the engine carries the rest");
                }
                // The old programs, if any, go only now: no moment without one.
                *fast = Some(f);
                drop(fast);
                self.fast_failed = None;
                tracing::info!(?at, "udp kernel fast path attached");
                if self.watchdog.is_none() {
                    match Watchdog::start(self.fast.clone()) {
                        Ok(w) => self.watchdog = Some(w),
                        Err(e) => tracing::warn!("cannot start the udp fast path's watchdog thread: {e}"),
                    }
                }
                true
            }
            Err(e) => {
                *fast = None;
                self.fast_failed = Some(at);
                tracing::warn!(
                    "the udp kernel fast path is unavailable ({e}); the user-space engine carries all traffic"
                );
                false
            }
        }
    }

    /// Reads the packets the fast path carried so far, (sent, received), whenever called;
    /// `None` while it is not attached. Re-attached programs count from zero again.
    pub fn fast_path_counter(&self) -> impl Fn() -> Option<(u64, u64)> + Send + Sync + 'static {
        let fast = self.fast.clone();
        move || fast.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|f| f.counts())
    }

    /// Whether the kernel fast path may be used (not turned off by `WEFT_UDP_DISABLE`).
    pub fn fast_path_enabled(&self) -> bool {
        !self.fast_disabled
    }

    /// Whether super-packets take the receive device's detour, whenever called.
    pub fn detour_reader(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let fast = self.fast.clone();
        move || fast.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|f| f.detour_on())
    }

    /// Opens `flannel0` again (it was deleted) with the same offloads; the forwarding
    /// threads switch to it after their next I/O error on the old one.
    pub fn reopen(&self) -> io::Result<()> {
        let d = open_tun(self.tun_offload)?;
        if self.tun_offload && !d.tcp_gso() {
            return Err(io::Error::other("the re-opened TUN device lacks the offloads the engine runs with"));
        }
        self.dev.set(d);
        Ok(())
    }

    /// Which paths run, for the log and `/metrics`.
    pub fn paths(&self) -> [(&'static str, bool); 3] {
        [("tun_tso", self.tun_offload), ("udp_gso", self.sock.gso), ("udp_gro", self.sock.gro)]
    }

    /// Whether the forwarding threads run.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Stops the forwarding threads and waits for them to end (at most about a second: the
    /// receiver's timeout when the wake-up datagram cannot be sent).
    pub fn stop(&mut self) {
        let Some(r) = self.running.take() else { return };
        r.stop.trigger();
        // Wake the receiver with an empty datagram to ourselves (it checks the flag first).
        if let Ok(me) = self.sock.local_addr() {
            let _ = self.sock.send_to(&[], me);
        }
        for t in r.threads {
            if t.join().is_err() {
                tracing::error!("a udp forwarding thread panicked");
            }
        }
        tracing::info!("udp engine stopped");
    }

    /// Starts the two forwarding threads for our subnet `own`, TUN address `tun_ip`, TUN
    /// MTU `mtu`; a running engine is stopped first (a restart).
    pub fn start(&mut self, own: Ipv4Net, tun_ip: Ipv4Addr, mtu: u32, metrics: &Metrics) -> io::Result<()> {
        self.stop();
        let stop = Arc::new(Stop::new()?);
        for (feature, on) in self.paths() {
            metrics.udp_offload.get_or_create(&vec![("feature", feature)]).set(i64::from(on));
        }
        tracing::info!(
            tun_tso = self.tun_offload,
            udp_gso = self.sock.gso,
            udp_gro = self.sock.gro,
            "udp engine paths"
        );
        let out = TunToNet {
            dev: DevHandle::new(self.dev.clone()),
            sock: self.sock.try_clone()?,
            peers: self.peers.clone(),
            stats: Stats::new(metrics),
            offload: self.tun_offload,
            port: self.port,
            tun_ip,
            stop: stop.clone(),
        };
        let inb = NetToTun {
            dev: DevHandle::new(self.dev.clone()),
            sock: self.sock.try_clone()?,
            peers: self.peers.clone(),
            stats: Stats::new(metrics),
            offload: self.tun_offload,
            own,
            mtu: mtu as usize,
            stop: stop.clone(),
        };
        let mut running = Running { stop, threads: Vec::with_capacity(2) };
        let spawned = std::thread::Builder::new()
            .name("udp-tun-to-net".into())
            .spawn(move || out.run())
            .and_then(|t| {
                running.threads.push(t);
                std::thread::Builder::new().name("udp-net-to-tun".into()).spawn(move || inb.run())
            })
            .map(|t| running.threads.push(t));
        // Kept also when the second spawn failed, so the first thread is stopped and joined.
        self.running = Some(running);
        if let Err(e) = spawned {
            self.stop();
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for Udp {
    fn drop(&mut self) {
        self.watchdog = None;
        self.stop();
    }
}

/// TUN → UDP.
struct TunToNet {
    dev: DevHandle,
    sock: Socket,
    peers: Peers,
    stats: Stats,
    offload: bool,
    port: u16,
    tun_ip: Ipv4Addr,
    stop: Arc<Stop>,
}

/// Consecutive packets for one peer, of one size (the last may be shorter): one GSO send.
struct Group {
    buf: Vec<u8>,
    peer: Option<Ipv4Addr>,
    seg: usize,
    count: usize,
    closed: bool,
}

impl TunToNet {
    fn run(mut self) {
        let mut orig = vec![0u8; BIG];
        let mut bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE).map(|_| vec![0u8; PACKET]).collect();
        let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
        let mut group = Group { buf: Vec::with_capacity(BIG), peer: None, seg: 0, count: 0, closed: false };
        let mut plain: Vec<(usize, Ipv4Addr)> = Vec::with_capacity(IDEAL_BATCH_SIZE);
        let mut icmp_budget = (Instant::now(), ICMP_PER_SECOND);
        while !self.stop.stopped() {
            let n = if self.offload {
                match self.dev.dev.recv_multiple(&mut orig, &mut bufs, &mut sizes, 0) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.wait();
                        continue;
                    }
                    Err(e) => {
                        self.dev.failed("reading", &e);
                        continue;
                    }
                }
            } else {
                match self.dev.dev.recv(&mut bufs[0]) {
                    // A detached device reads as end of file.
                    Ok(0) => {
                        self.dev.failed("reading", &"end of file");
                        continue;
                    }
                    Ok(len) => {
                        sizes[0] = len;
                        1
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.wait();
                        continue;
                    }
                    Err(e) => {
                        self.dev.failed("reading", &e);
                        continue;
                    }
                }
            };
            self.dev.ok();
            let table = self.peers.snapshot();
            plain.clear();
            for i in 0..n {
                let pkt = &mut bufs[i][..sizes[i]];
                match outbound(pkt, &table) {
                    Outbound::Send(peer) => {
                        self.stats.tx.inc();
                        if self.sock.gso {
                            self.add(&mut group, pkt, peer);
                        } else {
                            plain.push((i, peer));
                        }
                    }
                    Outbound::NoRoute(h) => {
                        if icmp_budget.0.elapsed() >= Duration::from_secs(1) {
                            icmp_budget = (Instant::now(), ICMP_PER_SECOND);
                        }
                        if icmp_budget.1 > 0 {
                            icmp_budget.1 -= 1;
                            self.send_icmp(pkt, &h);
                        }
                    }
                    Outbound::Drop(r) => self.stats.drop(r),
                }
            }
            self.flush(&mut group);
            if !plain.is_empty() {
                let batch: Vec<(&[u8], SocketAddr)> = plain
                    .iter()
                    .map(|(i, p)| (&bufs[*i][..sizes[*i]], SocketAddrV4::new(*p, self.port).into()))
                    .collect();
                if let Err(e) = self.sock.send_each(&batch) {
                    tracing::debug!("udp send: {e}");
                }
            }
        }
    }

    /// Nothing to read: sleeps until there is, or until the engine stops.
    fn wait(&self) {
        self.stop.wait_readable(self.dev.dev.as_fd());
    }

    fn add(&self, g: &mut Group, pkt: &[u8], peer: Ipv4Addr) {
        let fits = g.peer == Some(peer)
            && !g.closed
            && pkt.len() <= g.seg
            && g.count < MAX_GSO_SEGMENTS
            && g.buf.len() + pkt.len() <= 65_000;
        if !fits {
            self.flush(g);
            g.peer = Some(peer);
            g.seg = pkt.len();
        }
        g.buf.extend_from_slice(pkt);
        g.count += 1;
        // A shorter packet can only be the last of a GSO batch.
        if pkt.len() < g.seg {
            g.closed = true;
        }
    }

    fn flush(&self, g: &mut Group) {
        if let Some(peer) = g.peer.take() {
            let to = SocketAddr::V4(SocketAddrV4::new(peer, self.port));
            let r = if g.count == 1 {
                self.sock.send_each(&[(&g.buf[..], to)])
            } else {
                self.sock.send_gso(&g.buf, g.seg, to)
            };
            if let Err(e) = r {
                tracing::debug!("udp send: {e}");
            }
        }
        g.buf.clear();
        g.count = 0;
        g.seg = 0;
        g.closed = false;
    }

    fn send_icmp(&self, pkt: &[u8], h: &weft_core::packet::Ipv4Header) {
        let mut out = [0u8; 128];
        let off = if self.offload { VIRTIO_NET_HDR_LEN } else { 0 };
        if let Some(len) = icmp_net_unreachable(pkt, h, self.tun_ip, &mut out[off..]) {
            // With IFF_VNET_HDR every write starts with a header; all zero means "no offload".
            if self.dev.dev.send(&out[..off + len]).is_ok() {
                self.stats.icmp.inc();
            }
        }
    }
}

/// UDP → TUN.
struct NetToTun {
    dev: DevHandle,
    sock: Socket,
    peers: Peers,
    stats: Stats,
    offload: bool,
    own: Ipv4Net,
    /// flannel0's MTU: what a TCP super-packet is cut to.
    mtu: usize,
    stop: Arc<Stop>,
}

impl NetToTun {
    fn run(mut self) {
        let off = if self.offload { VIRTIO_NET_HDR_LEN } else { 0 };
        let mut recv = vec![0u8; BIG];
        let mut bufs: Vec<BytesMut> = (0..IDEAL_BATCH_SIZE).map(|_| BytesMut::with_capacity(BIG)).collect();
        let mut gro = GROTable::default();
        // A handle of its own: the table's read guard must not borrow `self`.
        let peers = self.peers.clone();
        let _ = self.sock.set_read_timeout(Duration::from_secs(1));
        while !self.stop.stopped() {
            let mut staged = 0;
            let mut wait = true;
            // One blocking receive, then whatever else is queued, until the batch is full.
            while staged + MAX_GSO_SEGMENTS <= IDEAL_BATCH_SIZE {
                // Received behind room for a virtio header: a super-packet is written whole.
                let (n, seg, from) = match self.sock.recv(&mut recv[off..], wait) {
                    Ok(r) => r,
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
                    Err(e) => {
                        tracing::debug!("udp receive: {e}");
                        break;
                    }
                };
                wait = false;
                if self.stop.stopped() {
                    return;
                }
                if n == 0 {
                    self.stats.drop(DropReason::Truncated);
                    continue;
                }
                let table = peers.snapshot();
                if self.offload
                    && seg == 0
                    && let Some(sp) = tcp_super_packet(&recv[off..off + n], self.mtu)
                {
                    // Order: what is staged goes first.
                    self.write_staged(&mut gro, &mut bufs[..staged], off);
                    staged = 0;
                    self.write_super(&mut recv, n, sp, from, &table);
                    continue;
                }
                let seg = if seg == 0 { n } else { seg };
                for chunk in recv[off..off + n].chunks(seg.max(1)) {
                    let b = &mut bufs[staged];
                    b.clear();
                    b.resize(off, 0);
                    b.extend_from_slice(chunk);
                    match inbound(&mut b[off..], from, &table, self.own) {
                        Ok(len) => {
                            b.truncate(off + len);
                            staged += 1;
                            self.stats.rx.inc();
                        }
                        Err(r) => self.stats.drop(r),
                    }
                }
            }
            self.write_staged(&mut gro, &mut bufs[..staged], off);
        }
    }

    /// Writes the staged packets into the TUN device (coalesced into TCP super-packets
    /// where the offloads allow).
    fn write_staged(&mut self, gro: &mut GROTable, bufs: &mut [BytesMut], off: usize) {
        if bufs.is_empty() {
            return;
        }
        let r = if self.offload {
            self.dev.dev.send_multiple(gro, bufs, off).map(|_| ())
        } else {
            bufs.iter().try_for_each(|b| self.dev.dev.send(b).map(|_| ()))
        };
        match r {
            Ok(()) => self.dev.ok(),
            Err(e) => self.dev.failed("writing", &e),
        }
    }

    /// Writes one TCP super-packet (`buf[off..off + n]`, as [`tcp_super_packet`] found it)
    /// into the TUN device as one TSO packet, after the same checks as any datagram: the
    /// kernel cuts it into segments that fit the MTU, or hands it whole to a pod here.
    fn write_super(&mut self, buf: &mut [u8], n: usize, sp: SuperPacket, from: Ipv4Addr, table: &PeerTable) {
        let off = VIRTIO_NET_HDR_LEN;
        let len = match inbound(&mut buf[off..off + n], from, table, self.own) {
            Ok(len) => len,
            Err(r) => {
                self.stats.drop(r);
                return;
            }
        };
        let hdr = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: sp.headers as u16,
            gso_size: sp.seg as u16,
            csum_start: sp.ip_len as u16,
            // The TCP checksum field, 16 bytes into the TCP header.
            csum_offset: 16,
        };
        if hdr.encode(&mut buf[..off]).is_err() {
            return;
        }
        self.stats.rx.inc_by(len.saturating_sub(sp.headers).div_ceil(sp.seg) as u64);
        match self.dev.dev.send(&buf[..off + len]) {
            Ok(_) => self.dev.ok(),
            Err(e) => self.dev.failed("writing", &e),
        }
    }
}
