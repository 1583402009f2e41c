//! `weft lab chaos`: while every pod pings every other pod, faults are injected at random
//! (seeded) into a running lab, one at a time: daemons killed, the store killed, devices
//! deleted or set down, peer routes, neighbours and FDB entries deleted, host links
//! flapped, invalid leases written, and with a multi-member etcd cluster, members killed, cut
//! off from their peers, the leader killed. After each fault the harness measures how long the lab
//! took to be whole again (every pod pair answering, every host's kernel state as the
//! backend needs it) and how many pings were lost, and it checks rules that must never break
//! (the LAN's connected route stays the only LAN route, an invalid lease never reaches the
//! kernel, no daemon exits or spins on its own). Everything happens inside the lab's
//! namespaces and its store.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sockopt};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::etcd::{Etcd, EtcdCluster};
use super::netns::Netns;
use super::state::Lab;
use super::topology::{self, LAN, LabError, NETWORK, health};

/// How long one fault may take to be repaired before the run counts it as not repaired:
/// generous against the 10 s resync that repairs what a notification missed.
const REPAIR_LIMIT: Duration = Duration::from_secs(30);
/// Interval between two pings of one pod pair.
const PING_INTERVAL: Duration = Duration::from_millis(100);
/// A ping not answered within this time is lost.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// A ping unanswered for this long breaks a pair's run of answers (lab round trips take
/// well under a millisecond; this leaves room for a loaded machine).
const OVERDUE: Duration = Duration::from_millis(300);
/// Answered pings in a row (sent after a fault was undone) that make a pair whole again.
const PINGS_TO_CONVERGE: usize = 3;
/// How often kernel state and daemons are inspected while a fault runs.
const INSPECT_EVERY: Duration = Duration::from_millis(250);
/// How often right after a fault (an inspection itself takes a few tens of ms).
const INSPECT_SOON: Duration = Duration::from_millis(20);
/// A daemon using more than this share of a core while the lab is idle is spinning.
const IDLE_CPU_LIMIT: f64 = 0.5;

/// The kinds of fault. A new kind adds a variant here, a line in [`Fault::ALL`], its reason
/// in [`Fault::not_applicable`], its injection in [`inject`] (with its [`Undo`] and
/// [`pause`] if it lasts) and, if it takes the store or part of it away, a line in
/// [`Fault::hits_store`]; nothing else changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// SIGKILL a host's daemon, start it again.
    DaemonKill,
    /// SIGKILL the store server, start it again (etcd only: the local store is a file).
    StoreKill,
    /// `ip link del` the overlay device.
    DeviceDelete,
    /// `ip link set <device> down`.
    DeviceDown,
    /// Delete a peer route (udp: the network's route into flannel0).
    RouteDelete,
    /// Delete a peer's VTEP neighbour entry (vxlan).
    NeighDelete,
    /// Delete a peer's FDB entry (vxlan).
    FdbDelete,
    /// `ip link set eth0 down`, a pause, up again.
    LinkFlap,
    /// A lease covering the LAN, `192.0.2.0-24` with PublicIP 192.0.2.99.
    LeaseLan,
    /// A lease outside the Network.
    LeaseOutsideNetwork,
    /// A lease with a loopback PublicIP.
    LeaseLoopback,
    /// A lease whose value is not JSON.
    LeaseGarbage,
    /// SIGKILL one member of a multi-member etcd cluster (at random), a pause, start it again.
    MemberKill,
    /// Cut one member off from its peers (its peer link down), a pause, heal it; clients
    /// still reach it, and it has no leader while cut off.
    MemberPartition,
    /// SIGKILL the cluster's current leader, a pause, start it again.
    LeaderKill,
}

impl Fault {
    /// Every kind, in table order.
    pub const ALL: [Fault; 15] = [
        Fault::DaemonKill,
        Fault::StoreKill,
        Fault::DeviceDelete,
        Fault::DeviceDown,
        Fault::RouteDelete,
        Fault::NeighDelete,
        Fault::FdbDelete,
        Fault::LinkFlap,
        Fault::LeaseLan,
        Fault::LeaseOutsideNetwork,
        Fault::LeaseLoopback,
        Fault::LeaseGarbage,
        Fault::MemberKill,
        Fault::MemberPartition,
        Fault::LeaderKill,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Fault::DaemonKill => "daemon-kill",
            Fault::StoreKill => "store-kill",
            Fault::DeviceDelete => "device-delete",
            Fault::DeviceDown => "device-down",
            Fault::RouteDelete => "route-delete",
            Fault::NeighDelete => "neigh-delete",
            Fault::FdbDelete => "fdb-delete",
            Fault::LinkFlap => "link-flap",
            Fault::LeaseLan => "lease-lan",
            Fault::LeaseOutsideNetwork => "lease-outside-network",
            Fault::LeaseLoopback => "lease-loopback",
            Fault::LeaseGarbage => "lease-garbage",
            Fault::MemberKill => "member-kill",
            Fault::MemberPartition => "member-partition",
            Fault::LeaderKill => "leader-kill",
        }
    }

    /// Whether this kind takes the store (or part of it) away: its repair includes every
    /// daemon hearing of a lease written, and deleted, after it.
    fn hits_store(self) -> bool {
        matches!(self, Fault::StoreKill | Fault::MemberKill | Fault::MemberPartition | Fault::LeaderKill)
    }

    /// Why this kind cannot be injected into `lab`, if it cannot.
    pub fn not_applicable(self, lab: &Lab) -> Option<&'static str> {
        match self {
            Fault::StoreKill if lab.store != "etcd" => Some("the local store is a file: no server to kill"),
            Fault::MemberKill | Fault::MemberPartition | Fault::LeaderKill
                if topology::etcd_cluster(lab).is_none_or(|c| c.len() < 2) =>
            {
                Some("needs a multi-member etcd cluster (weft lab up --store etcd --etcd-members 3)")
            }
            Fault::DeviceDelete | Fault::DeviceDown if device(lab).is_none() => Some("host-gw has no overlay device"),
            Fault::NeighDelete | Fault::FdbDelete if lab.backend != "vxlan" => {
                Some("only vxlan programs neighbour and FDB entries")
            }
            Fault::DaemonKill | Fault::LinkFlap | Fault::DeviceDelete | Fault::DeviceDown if lab.hosts.is_empty() => {
                Some("the lab has no hosts")
            }
            _ => None,
        }
    }
}

/// The overlay device of the lab's backend.
fn device(lab: &Lab) -> Option<&'static str> {
    match lab.backend.as_str() {
        "vxlan" => Some("flannel.1"),
        "udp" => Some("flannel0"),
        _ => None,
    }
}

/// Options of `weft lab chaos`.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Lab name.
    pub name: String,
    /// New faults are started during this many seconds.
    pub seconds: u64,
    /// RNG seed: the same seed on the same lab injects the same faults in the same order.
    pub seed: u64,
    /// Only these kinds (all applicable ones when empty).
    pub faults: Vec<Fault>,
}

/// One injected fault and what followed.
#[derive(Debug, Clone)]
pub struct Event {
    /// Its kind.
    pub fault: Fault,
    /// What exactly was done.
    pub detail: String,
    /// When it started, since the run started.
    pub at: Duration,
    /// Time from the end of the fault (its injection, for an instant one; its undo, for one
    /// that lasts) until the lab was whole again; `None`: not within the limit.
    pub repair: Option<Duration>,
    /// Pings lost from its start until the next fault started (or the run ended).
    pub lost: u64,
    /// Pings sent in that window.
    pub sent: u64,
    /// What was still wrong when the limit ran out.
    pub unrepaired: Vec<String>,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// Lab name, backend and store.
    pub lab: (String, String, String),
    /// The seed used.
    pub seed: u64,
    /// The `--seconds` asked for.
    pub seconds: u64,
    /// Every fault, in order.
    pub events: Vec<Event>,
    /// Kinds that could not be injected here, with why.
    pub skipped: Vec<(Fault, &'static str)>,
    /// Rules broken (each once), with the fault that was running.
    pub broken: Vec<String>,
    /// Whether the lab was whole at the end.
    pub converged: bool,
    /// What was wrong at the end, when it was not.
    pub final_problems: Vec<String>,
    /// Pings lost and sent before the first fault.
    pub baseline: (u64, u64),
    /// Pod pairs pinging.
    pub pairs: usize,
}

impl Report {
    /// Whether the run passed: converged, every fault repaired, no rule broken.
    pub fn ok(&self) -> bool {
        self.converged && self.broken.is_empty() && self.events.iter().all(|e| e.repair.is_some())
    }
}

fn median(sorted: &[Duration]) -> Option<Duration> {
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2),
    }
}

struct KindSummary {
    count: usize,
    repaired: usize,
    times: Vec<Duration>,
    lost: u64,
    sent: u64,
}

fn summarize(events: &[Event]) -> BTreeMap<Fault, KindSummary> {
    let mut out: BTreeMap<Fault, KindSummary> = BTreeMap::new();
    for e in events {
        let s =
            out.entry(e.fault).or_insert(KindSummary { count: 0, repaired: 0, times: Vec::new(), lost: 0, sent: 0 });
        s.count += 1;
        s.lost += e.lost;
        s.sent += e.sent;
        if let Some(t) = e.repair {
            s.repaired += 1;
            s.times.push(t);
        }
    }
    for s in out.values_mut() {
        s.times.sort();
    }
    out
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or_else(|| "-".into())
}

/// The report as a table per fault kind.
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "chaos on lab {} ({}, {} store), seed {}, {} s: {} faults, {} pod pairs pinging every {} ms\n\n",
        r.lab.0,
        r.lab.1,
        r.lab.2,
        r.seed,
        r.seconds,
        r.events.len(),
        r.pairs,
        PING_INTERVAL.as_millis()
    );
    let mut rows =
        vec![["FAULT", "COUNT", "REPAIRED", "MEDIAN REPAIR", "MAX REPAIR", "PINGS LOST"].map(String::from).to_vec()];
    for (kind, s) in summarize(&r.events) {
        rows.push(vec![
            kind.name().into(),
            s.count.to_string(),
            s.repaired.to_string(),
            secs(median(&s.times)),
            secs(s.times.last().copied()),
            format!("{} of {}", s.lost, s.sent),
        ]);
    }
    for (kind, why) in &r.skipped {
        rows.push(vec![kind.name().into(), "n/a".into(), why.to_string()]);
    }
    out.push_str(&super::check::table(&rows));
    out.push_str(&format!("\nbefore the first fault: {} of {} pings lost\n", r.baseline.0, r.baseline.1));
    for e in r.events.iter().filter(|e| e.repair.is_none()) {
        out.push_str(&format!(
            "NOT REPAIRED within {} s: {} ({}): {}\n",
            REPAIR_LIMIT.as_secs(),
            e.fault.name(),
            e.detail,
            e.unrepaired.join("; ")
        ));
    }
    if r.broken.is_empty() {
        out.push_str("rules broken: none\n");
    } else {
        for b in &r.broken {
            out.push_str(&format!("RULE BROKEN: {b}\n"));
        }
    }
    if r.converged {
        out.push_str("end: converged (every pod pair answers, kernel state as expected on every host)\n");
    } else {
        out.push_str(&format!("end: NOT converged: {}\n", r.final_problems.join("; ")));
    }
    out
}

/// The report as JSON.
pub fn to_json(r: &Report) -> Value {
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    json!({
        "lab": r.lab.0, "backend": r.lab.1, "store": r.lab.2,
        "seed": r.seed, "seconds": r.seconds, "pairs": r.pairs,
        "ok": r.ok(),
        "converged": r.converged,
        "final_problems": r.final_problems,
        "rules_broken": r.broken,
        "baseline": {"lost": r.baseline.0, "sent": r.baseline.1},
        "kinds": summarize(&r.events).iter().map(|(k, s)| json!({
            "fault": k.name(), "count": s.count, "repaired": s.repaired,
            "median_repair_ms": ms(median(&s.times)), "max_repair_ms": ms(s.times.last().copied()),
            "pings_lost": s.lost, "pings_sent": s.sent,
        })).collect::<Vec<_>>(),
        "not_applicable": r.skipped.iter().map(|(k, why)| json!({"fault": k.name(), "why": why})).collect::<Vec<_>>(),
        "events": r.events.iter().map(|e| json!({
            "fault": e.fault.name(), "detail": e.detail, "at_ms": e.at.as_secs_f64() * 1000.0,
            "repair_ms": ms(e.repair), "pings_lost": e.lost, "pings_sent": e.sent, "unrepaired": e.unrepaired,
        })).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------------------
// Pings: one thread per source pod, in the pod's namespace, with a raw ICMP socket, one
// echo request to every other pod per interval; each probe is recorded with its send time.

#[derive(Debug, Clone, Copy)]
struct Probe {
    sent: Instant,
    answered: bool,
    /// Answered, or timed out.
    done: bool,
}

type Log = Arc<Mutex<Vec<Vec<Probe>>>>;

struct Pinger {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    log: Log,
    pairs: usize,
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn echo_request(id: u16, seq: u16) -> [u8; 24] {
    let mut p = [0u8; 24];
    p[0] = 8;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..].copy_from_slice(b"weft lab chaos!!");
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// An echo reply in a raw IPv4 packet: (source, id, seq).
fn parse_reply(buf: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let ihl = usize::from(*buf.first()? & 0x0f) * 4;
    let icmp = buf.get(ihl..ihl + 8)?;
    if icmp[0] != 0 {
        return None;
    }
    let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
    Some((src, u16::from_be_bytes([icmp[4], icmp[5]]), u16::from_be_bytes([icmp[6], icmp[7]])))
}

/// Pings `dests` (pair index, address) from inside namespace `ns` until `stop`.
fn ping_loop(ns: String, id: u16, dests: Vec<(usize, Ipv4Addr)>, stop: Arc<AtomicBool>, log: Log) {
    let fail = |e: String| eprintln!("weft lab chaos: pings from {ns} stopped: {e}");
    let Ok(file) = std::fs::File::open(format!("/run/netns/{ns}")) else {
        return fail("namespace not found".into());
    };
    if let Err(e) = nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET) {
        return fail(e.to_string());
    }
    let sock = match socket::socket(AddressFamily::Inet, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::Icmp) {
        Ok(s) => s,
        Err(e) => return fail(format!("raw ICMP socket: {e}")),
    };
    let tick = nix::sys::time::TimeVal::new(0, 10_000);
    if let Err(e) = socket::setsockopt(&sock, sockopt::ReceiveTimeout, &tick) {
        return fail(e.to_string());
    }
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let mut seq: u16 = 0;
    // seq -> (pair, index in the pair's log, destination)
    let mut outstanding: HashMap<u16, (usize, usize, Ipv4Addr)> = HashMap::new();
    let mut next = Instant::now();
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            next += PING_INTERVAL;
            if next < now {
                next = now + PING_INTERVAL;
            }
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            // Time out what was not answered.
            outstanding.retain(|_, (pair, i, _)| {
                let p = &mut log[*pair][*i];
                if now.duration_since(p.sent) >= PING_TIMEOUT {
                    p.done = true;
                    false
                } else {
                    true
                }
            });
            for (pair, ip) in &dests {
                seq = seq.wrapping_add(1);
                let addr = SockaddrIn::from(std::net::SocketAddrV4::new(*ip, 0));
                let sent = Instant::now();
                // A send error (no route while a fault lasts) is a lost ping like any other.
                let _ = socket::sendto(fd, &echo_request(id, seq), &addr, MsgFlags::MSG_DONTWAIT);
                log[*pair].push(Probe { sent, answered: false, done: false });
                outstanding.insert(seq, (*pair, log[*pair].len() - 1, *ip));
            }
        }
        match socket::recv(fd, &mut buf, MsgFlags::empty()) {
            Ok(n) => {
                if let Some((src, rid, rseq)) = parse_reply(&buf[..n])
                    && rid == id
                    && let Some((pair, i, ip)) = outstanding.get(&rseq).copied()
                    && ip == src
                {
                    outstanding.remove(&rseq);
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    log[pair][i].answered = true;
                    log[pair][i].done = true;
                }
            }
            Err(_) => continue,
        }
    }
    // Whatever is still out after the grace period the caller gave is lost.
    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
    for (pair, i, _) in outstanding.values() {
        log[*pair][*i].done = true;
    }
}

impl Pinger {
    fn start(lab: &Lab) -> Result<Pinger, LabError> {
        let pods: Vec<(String, Ipv4Addr)> = lab
            .hosts
            .iter()
            .flat_map(|h| h.pods.iter())
            .filter_map(|p| Some((p.ns.clone(), p.ip.parse().ok()?)))
            .collect();
        if pods.len() < 2 {
            return Err(LabError::Usage(
                "chaos needs at least two pods; start the lab with --pods-per-host 1 or more".into(),
            ));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut pairs = 0;
        let mut plan = Vec::new();
        for (i, (ns, _)) in pods.iter().enumerate() {
            let mut dests = Vec::new();
            for (j, (_, ip)) in pods.iter().enumerate() {
                if i != j {
                    dests.push((pairs, *ip));
                    pairs += 1;
                }
            }
            plan.push((ns.clone(), i, dests));
        }
        let log: Log = Arc::new(Mutex::new(vec![Vec::new(); pairs]));
        let base = (std::process::id() as u16).wrapping_mul(31);
        let threads = plan
            .into_iter()
            .map(|(ns, i, dests)| {
                let (stop, log) = (stop.clone(), log.clone());
                std::thread::spawn(move || ping_loop(ns, base.wrapping_add(i as u16), dests, stop, log))
            })
            .collect();
        Ok(Pinger { stop, threads, log, pairs })
    }

    /// Lost and sent pings among those sent in `[from, to)`.
    fn lost_between(&self, from: Instant, to: Instant) -> (u64, u64) {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut lost = 0;
        let mut sent = 0;
        for pair in log.iter() {
            for p in pair.iter().filter(|p| p.sent >= from && p.sent < to) {
                sent += 1;
                if p.done && !p.answered {
                    lost += 1;
                }
            }
        }
        (lost, sent)
    }

    /// When every pair has answered [`PINGS_TO_CONVERGE`] pings in a row, sent after
    /// `after`, with nothing lost since: the earliest send time from which every pair has
    /// answered without a loss (at least `since`). `None` while some pair is not there.
    fn whole_since(&self, after: Instant, since: Instant) -> Option<Instant> {
        let now = Instant::now();
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut latest_start = since;
        for pair in log.iter() {
            let mut run = 0;
            let mut fresh = 0;
            let mut start = None;
            for p in pair.iter().rev() {
                // A ping still out may be answered yet; one out for longer than any lab
                // round trip takes is as good as lost.
                if !p.done && now.duration_since(p.sent) < OVERDUE {
                    continue;
                }
                if !p.answered {
                    break;
                }
                run += 1;
                if p.sent >= after {
                    fresh += 1;
                }
                start = Some(p.sent);
            }
            if run == 0 || fresh < PINGS_TO_CONVERGE {
                return None;
            }
            latest_start = latest_start.max(start.unwrap_or(since));
        }
        Some(latest_start)
    }

    /// Stops the pings, after giving the last ones their full time to be answered.
    fn stop(&mut self) {
        std::thread::sleep(PING_TIMEOUT);
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Kernel state and daemons.

/// What an inspection of the whole lab found.
#[derive(Debug, Default)]
struct Inspection {
    /// Why the lab is not whole (yet).
    problems: Vec<String>,
    /// Rules broken (never allowed, whatever the fault).
    broken: Vec<String>,
    /// Hosts whose daemon is not running.
    down: Vec<u8>,
}

fn json_of(text: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(text).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

fn dst_net(route: &Value) -> Option<Ipv4Net> {
    let dst = route["dst"].as_str()?;
    if dst == "default" {
        return None;
    }
    if dst.contains('/') { dst.parse().ok() } else { Some(Ipv4Net::new(dst.parse().ok()?, 32).ok()?) }
}

/// Whether a route to `dst` takes traffic for some address of `net` (it is as specific as
/// `net` or more): a route that only covers `net` does not win over one to `net` itself.
fn takes_from(dst: &Ipv4Net, net: &Ipv4Net) -> bool {
    net.contains(dst)
}

/// Inspects every host: its daemon ready; its routes, devices, neighbours and FDB entries
/// as the backend needs them for every peer; no route to a subnet of an invalid lease; the
/// LAN reached only through the connected route.
fn inspect(lab: &Lab, forbidden: &[Ipv4Net]) -> Inspection {
    let mut out = Inspection::default();
    let network: Ipv4Net = NETWORK.parse().expect("lab network");
    let lan: Ipv4Net = format!("{LAN}.0/24").parse().expect("lab LAN");
    let dev = device(lab);
    // The MAC of every host's VTEP, for the neighbour entries its peers must hold.
    let mut macs: HashMap<u8, String> = HashMap::new();
    if lab.backend == "vxlan" {
        for h in &lab.hosts {
            let links = json_of(&Netns::existing(&h.ns).ip(&["-j", "link", "show", "flannel.1"]).unwrap_or_default());
            if let Some(mac) = links.first().and_then(|l| l["address"].as_str()) {
                macs.insert(h.index, mac.to_string());
            }
        }
    }
    for h in &lab.hosts {
        let ns = Netns::existing(&h.ns);
        let hn = format!("h{}", h.index);
        match health(h) {
            "ready" => {}
            "down" => {
                out.down.push(h.index);
                out.problems.push(format!("{hn}: daemon not running"));
            }
            other => out.problems.push(format!("{hn}: daemon {other}")),
        }
        let routes = json_of(&ns.ip(&["-j", "route"]).unwrap_or_default());
        let own: Option<Ipv4Net> = h.subnet.parse().ok();
        let peers: Vec<(&super::state::Host, Ipv4Net)> = lab
            .hosts
            .iter()
            .filter(|p| p.index != h.index)
            .filter_map(|p| Some((p, p.subnet.parse::<Ipv4Net>().ok()?)))
            .collect();
        // The LAN: only the connected route, and it must be there.
        let mut connected = false;
        for r in &routes {
            let Some(dst) = dst_net(r) else { continue };
            if takes_from(&dst, &lan) {
                let is_connected = dst == lan && r["dev"] == "eth0" && r["gateway"].is_null() && r["scope"] == "link";
                if is_connected {
                    connected = true;
                } else {
                    out.broken.push(format!("{hn}: a route to the LAN other than the connected one: {r}"));
                }
            }
            for f in forbidden.iter().filter(|f| **f != lan) {
                if takes_from(&dst, f) && own.is_none_or(|o| o != dst) && !peers.iter().any(|(_, s)| *s == dst) {
                    out.broken.push(format!("{hn}: an invalid lease ({f}) reached the kernel: {r}"));
                }
            }
        }
        if !connected {
            out.problems.push(format!("{hn}: no connected route to the LAN"));
        }
        let find = |dst: &Ipv4Net| routes.iter().find(|r| dst_net(r).as_ref() == Some(dst));
        if let Some(o) = own
            && lab.pods_per_host > 0
            && find(&o).is_none_or(|r| r["dev"] != "cni0")
        {
            out.problems.push(format!("{hn}: no route to its own subnet {o} on cni0"));
        }
        // What the backend needs per peer.
        let mut expected: Vec<Ipv4Net> = own.into_iter().collect();
        match lab.backend.as_str() {
            "udp" => {
                expected.push(network);
                if find(&network).is_none_or(|r| r["dev"] != "flannel0") {
                    out.problems.push(format!("{hn}: no route to {network} on flannel0"));
                }
            }
            backend => {
                for (p, s) in &peers {
                    expected.push(*s);
                    let ok = find(s).is_some_and(|r| {
                        if backend == "vxlan" {
                            r["dev"] == "flannel.1" && r["gateway"].as_str() == Some(&s.network().to_string())
                        } else {
                            r["dev"] == "eth0" && r["gateway"].as_str() == Some(p.ip.as_str())
                        }
                    });
                    if !ok {
                        out.problems.push(format!("{hn}: no {backend} route to h{}'s subnet {s}", p.index));
                    }
                }
            }
        }
        for r in &routes {
            if let Some(dst) = dst_net(r)
                && takes_from(&dst, &network)
                && !expected.contains(&dst)
            {
                out.problems.push(format!("{hn}: unexpected route {r}"));
            }
        }
        if let Some(dev) = dev {
            let links = json_of(&ns.ip(&["-j", "link", "show", dev]).unwrap_or_default());
            match links.first() {
                None => out.problems.push(format!("{hn}: {dev} missing")),
                Some(l) if !l["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "UP")) => {
                    out.problems.push(format!("{hn}: {dev} is down"))
                }
                _ => {}
            }
        }
        if lab.backend == "vxlan" {
            let neigh = json_of(&ns.ip(&["-j", "neigh", "show", "dev", "flannel.1"]).unwrap_or_default());
            let fdb = json_of(
                &ns.command("bridge")
                    .args(["-j", "fdb", "show", "dev", "flannel.1"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default(),
            );
            for (p, s) in &peers {
                let Some(mac) = macs.get(&p.index) else { continue };
                let gw = s.network().to_string();
                if !neigh.iter().any(|n| n["dst"] == gw.as_str() && n["lladdr"] == mac.as_str()) {
                    out.problems.push(format!("{hn}: no neighbour entry {gw} -> {mac} (h{})", p.index));
                }
                if !fdb.iter().any(|f| f["mac"] == mac.as_str() && f["dst"] == p.ip.as_str()) {
                    out.problems.push(format!("{hn}: no FDB entry {mac} -> {} (h{})", p.ip, p.index));
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Faults.

/// What a fault needs undone after its pause, if anything.
enum Undo {
    Nothing,
    LinkUp(String),
    DeleteLease(String),
    StartStore,
    /// Start etcd member `i` again.
    RestartMember(usize),
    /// Bring etcd member `i`'s peer link up again.
    HealMember(usize),
}

fn lab_err(what: &str, e: impl std::fmt::Display) -> LabError {
    LabError::Step(format!("{what}: {e}"))
}

fn unused_subnet(lab: &Lab, third_octet_from: u8) -> Ipv4Net {
    (third_octet_from..=255)
        .map(|o| Ipv4Net::new(Ipv4Addr::new(10, 244, o, 0), 24).expect("valid /24"))
        .find(|n| !lab.hosts.iter().any(|h| h.subnet == n.to_string()))
        .unwrap_or_else(|| Ipv4Net::new(Ipv4Addr::new(10, 244, 255, 0), 24).expect("valid /24"))
}

/// The key (subnet) and value of an invalid lease of `kind`.
fn invalid_lease(lab: &Lab, kind: Fault) -> (Ipv4Net, String) {
    let attrs = |ip: &str| {
        let data =
            if lab.backend == "vxlan" { r#","BackendData":{"VNI":1,"VtepMAC":"02:00:00:c4:a0:99"}"# } else { "" };
        format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"{}"{data}}}"#, lab.backend)
    };
    match kind {
        Fault::LeaseLan => (format!("{LAN}.0/24").parse().expect("LAN"), attrs(&format!("{LAN}.99"))),
        Fault::LeaseOutsideNetwork => ("10.99.0.0/24".parse().expect("subnet"), attrs(&format!("{LAN}.98"))),
        Fault::LeaseLoopback => (unused_subnet(lab, 250), attrs("127.0.0.1")),
        _ => (unused_subnet(lab, 240), r#"{"PublicIP": 12, "garbage"#.to_string()),
    }
}

/// etcdctl through every member of the lab's cluster, retried for a while: right after a
/// member fault the cluster may still be electing a leader (each retry writes the same
/// value, so a retry never applies anything twice).
fn cluster_etcdctl(c: &EtcdCluster, args: &[&str], what: &str) -> Result<(), LabError> {
    let mut full = vec!["--command-timeout=5s"];
    full.extend_from_slice(args);
    let limit = Instant::now() + Duration::from_secs(15);
    loop {
        match c.etcdctl(&full) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > limit => return Err(lab_err(what, e)),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn store_put(lab: &Lab, suffix: &str, value: &str) -> Result<(), LabError> {
    if let Some(c) = topology::etcd_cluster(lab) {
        let key = format!("/coreos.com/network/subnets/{suffix}");
        cluster_etcdctl(&c, &["put", &key, value], "writing a lease with etcdctl")
    } else if lab.store == "etcd" {
        let key = format!("/coreos.com/network/subnets/{suffix}");
        Netns::existing(&lab.lan_ns())
            .exec("etcdctl", &[&format!("--endpoints=http://{LAN}.1:2379"), "--command-timeout=5s", "put", &key, value])
            .map(|_| ())
            .map_err(|e| lab_err("writing a lease with etcdctl", e))
    } else {
        let (suffix, value) = (suffix.to_string(), value.to_string());
        local_store(lab, move |reg| Box::pin(async move { reg.put_raw(&suffix, &value).await }))
    }
}

fn store_delete(lab: &Lab, suffix: &str) -> Result<(), LabError> {
    if let Some(c) = topology::etcd_cluster(lab) {
        let key = format!("/coreos.com/network/subnets/{suffix}");
        cluster_etcdctl(&c, &["del", &key], "deleting a lease with etcdctl")
    } else if lab.store == "etcd" {
        let key = format!("/coreos.com/network/subnets/{suffix}");
        Netns::existing(&lab.lan_ns())
            .exec("etcdctl", &[&format!("--endpoints=http://{LAN}.1:2379"), "--command-timeout=5s", "del", &key])
            .map(|_| ())
            .map_err(|e| lab_err("deleting a lease with etcdctl", e))
    } else {
        let key: weft_core::lease::SubnetKey = suffix.parse().map_err(|e| lab_err("a lease key", e))?;
        local_store(lab, move |reg| {
            Box::pin(async move {
                use crate::registry::Registry;
                reg.delete(&key).await
            })
        })
    }
}

type StoreFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), crate::registry::RegistryError>>>>;

fn local_store(
    lab: &Lab,
    f: impl FnOnce(crate::registry::local::LocalRegistry) -> StoreFuture,
) -> Result<(), LabError> {
    let reg = crate::registry::local::LocalRegistry::open(
        &lab.dir().join("leases.db"),
        "/coreos.com/network",
        Path::new("/dev/null"),
    )
    .map_err(|e| lab_err("opening the local store", e))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| lab_err("starting a runtime", e))?;
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), f(reg)).await })
        .map_err(|_| lab_err("the local store", "no answer within 10 s"))?
        .map_err(|e| lab_err("the local store", e))
}

fn process_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let mut status = 0;
    // SAFETY: waitpid(2) with WNOHANG on a pid; `status` is a valid out-pointer. Reaps the
    // process if it is our exited child.
    if unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) } == pid as i32 {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()).map(|st| st != "Z"))
        .unwrap_or(false)
}

fn kill_store(lab: &mut Lab) -> Result<String, LabError> {
    if let Some(c) = topology::etcd_cluster(lab) {
        // The whole store: every member at once.
        for i in 0..c.len() {
            c.kill(i).map_err(|e| lab_err("killing an etcd member", e))?;
        }
        return Ok(format!("every member of the {}-member etcd cluster SIGKILLed", c.len()));
    }
    let pid = lab.etcd_pid.ok_or_else(|| LabError::Step("the lab's etcd is not running".into()))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| lab_err("killing etcd", e))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(format!("etcd (pid {pid}) SIGKILLed"))
}

fn start_store(lab: &mut Lab) -> Result<(), LabError> {
    if let Some(c) = topology::etcd_cluster(lab) {
        for i in 0..c.len() {
            c.restart(i).map_err(|e| lab_err("restarting an etcd member", e))?;
        }
        for i in 0..c.len() {
            c.wait_member(i, REPAIR_LIMIT).map_err(|e| lab_err("restarting the etcd cluster", e))?;
        }
        return Ok(());
    }
    let lan = Netns::existing(&lab.lan_ns());
    let etcd = Etcd::start(Some(&lan), &format!("{LAN}.1"), 2379, 2380, &lab.dir().join("etcd"), None)
        .map_err(|e| lab_err("restarting etcd", e))?;
    lab.etcd_pid = etcd.detach();
    lab.save().map_err(|e| lab_err("saving the lab state", e))
}

/// The lab daemons' --healthz-port (health and metrics).
const METRICS_PORT: u16 = 8081;

fn peers_known(h: &super::state::Host) -> Option<u64> {
    let (_, body) = super::netns::http_get(&h.ns, METRICS_PORT, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix("weft_peers ").and_then(|v| v.trim().parse::<f64>().ok()))
        .map(|v| v as u64)
}

/// Writes a valid lease of a host that does not exist and waits until every daemon counts
/// it as a peer, then deletes it and waits until every daemon has forgotten it: proof that
/// every daemon hears from the store. Returns when all had seen it.
fn store_probe(lab: &Lab) -> Result<Instant, String> {
    let subnet = unused_subnet(lab, 230);
    let suffix = subnet.to_string().replace('/', "-");
    let data = if lab.backend == "vxlan" { r#","BackendData":{"VNI":1,"VtepMAC":"02:00:00:c4:a0:96"}"# } else { "" };
    let value = format!(r#"{{"PublicIP":"{LAN}.96","PublicIPv6":null,"BackendType":"{}"{data}}}"#, lab.backend);
    let peers = lab.hosts.len().saturating_sub(1) as u64;
    let wait = |want: u64, what: &str| -> Result<Instant, String> {
        let limit = Instant::now() + REPAIR_LIMIT;
        loop {
            let counts: Vec<Option<u64>> = lab.hosts.iter().map(peers_known).collect();
            if counts.iter().all(|c| *c == Some(want)) {
                return Ok(Instant::now());
            }
            if Instant::now() > limit {
                return Err(format!(
                    "a probe lease {suffix} {what} within {} s: peers known per host {counts:?}, want {want}",
                    REPAIR_LIMIT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    store_put(lab, &suffix, &value).map_err(|e| e.to_string())?;
    let seen = wait(peers + 1, "was not seen by every daemon");
    store_delete(lab, &suffix).map_err(|e| e.to_string())?;
    let seen = seen?;
    wait(peers, "was not forgotten by every daemon after its deletion")?;
    Ok(seen)
}

fn ip_in(ns: &str, args: &[&str]) -> Result<String, LabError> {
    Netns::existing(ns).ip(args).map_err(|e| lab_err("ip", e))
}

/// Injects one fault; returns what was done and what to undo after the pause.
fn inject(lab: &mut Lab, kind: Fault, rng: &mut StdRng) -> Result<(String, Undo), LabError> {
    let host = lab.hosts[rng.random_range(0..lab.hosts.len())].clone();
    let hn = format!("h{}", host.index);
    let ns = host.ns.as_str();
    let pick = |items: Vec<Value>, rng: &mut StdRng| -> Option<Value> {
        (!items.is_empty()).then(|| items[rng.random_range(0..items.len())].clone())
    };
    match kind {
        Fault::DaemonKill => {
            let old = host.pid;
            match topology::restart(&lab.name, host.index) {
                Ok(l) => *lab = l,
                // Killed, and not back: a fault like any other, for the watch to judge.
                Err(e) => {
                    *lab = topology::load(&lab.name)?;
                    return Ok((
                        format!("{hn}'s daemon (pid {old}) SIGKILLed; starting it failed: {e}"),
                        Undo::Nothing,
                    ));
                }
            }
            Ok((format!("{hn}'s daemon (pid {old}) SIGKILLed and started again"), Undo::Nothing))
        }
        Fault::StoreKill => Ok((kill_store(lab)?, Undo::StartStore)),
        Fault::DeviceDelete => {
            let dev = device(lab).unwrap_or_default();
            ip_in(ns, &["link", "del", dev])?;
            Ok((format!("{hn}: ip link del {dev}"), Undo::Nothing))
        }
        Fault::DeviceDown => {
            let dev = device(lab).unwrap_or_default();
            ip_in(ns, &["link", "set", dev, "down"])?;
            Ok((format!("{hn}: ip link set {dev} down"), Undo::Nothing))
        }
        Fault::RouteDelete => {
            let network: Ipv4Net = NETWORK.parse().expect("lab network");
            let own: Option<Ipv4Net> = host.subnet.parse().ok();
            let routes = json_of(&ip_in(ns, &["-j", "route"])?);
            let ours: Vec<Value> = routes
                .into_iter()
                .filter(|r| dst_net(r).is_some_and(|d| network.contains(&d.network()) && Some(d) != own))
                .collect();
            let r = pick(ours, rng).ok_or_else(|| LabError::Step(format!("{hn} has no peer route to delete")))?;
            let dst = r["dst"].as_str().unwrap_or_default().to_string();
            ip_in(ns, &["route", "del", &dst])?;
            Ok((format!("{hn}: ip route del {dst}"), Undo::Nothing))
        }
        Fault::NeighDelete => {
            let neigh = json_of(&ip_in(ns, &["-j", "neigh", "show", "dev", "flannel.1"])?);
            let n = pick(neigh, rng).ok_or_else(|| LabError::Step(format!("{hn} has no neighbour to delete")))?;
            let dst = n["dst"].as_str().unwrap_or_default().to_string();
            ip_in(ns, &["neigh", "del", &dst, "dev", "flannel.1"])?;
            Ok((format!("{hn}: ip neigh del {dst} dev flannel.1"), Undo::Nothing))
        }
        Fault::FdbDelete => {
            let out = Netns::existing(ns)
                .exec("bridge", &["-j", "fdb", "show", "dev", "flannel.1"])
                .map_err(|e| lab_err("bridge fdb", e))?;
            let entries: Vec<Value> = json_of(&out).into_iter().filter(|f| f["dst"].is_string()).collect();
            let f = pick(entries, rng).ok_or_else(|| LabError::Step(format!("{hn} has no FDB entry to delete")))?;
            let (mac, dst) = (f["mac"].as_str().unwrap_or_default(), f["dst"].as_str().unwrap_or_default());
            Netns::existing(ns)
                .exec("bridge", &["fdb", "del", mac, "dev", "flannel.1", "dst", dst])
                .map_err(|e| lab_err("bridge fdb del", e))?;
            Ok((format!("{hn}: bridge fdb del {mac} dev flannel.1 dst {dst}"), Undo::Nothing))
        }
        Fault::LinkFlap => {
            ip_in(ns, &["link", "set", "eth0", "down"])?;
            Ok((format!("{hn}: ip link set eth0 down, then up"), Undo::LinkUp(ns.to_string())))
        }
        Fault::LeaseLan | Fault::LeaseOutsideNetwork | Fault::LeaseLoopback | Fault::LeaseGarbage => {
            let (subnet, value) = invalid_lease(lab, kind);
            let suffix = subnet.to_string().replace('/', "-");
            store_put(lab, &suffix, &value)?;
            Ok((format!("lease {suffix} = {value}, then deleted"), Undo::DeleteLease(suffix)))
        }
        Fault::MemberKill | Fault::MemberPartition | Fault::LeaderKill => {
            let c = topology::etcd_cluster(lab).ok_or_else(|| LabError::Step("the lab has no etcd cluster".into()))?;
            let leader = c.leader();
            let i = match kind {
                Fault::LeaderKill => leader.ok_or_else(|| LabError::Step("the etcd cluster has no leader".into()))?,
                _ => rng.random_range(0..c.len()),
            };
            let role = if leader == Some(i) { "leader" } else { "follower" };
            let m = format!("etcd member m{} ({role})", i + 1);
            if kind == Fault::MemberPartition {
                c.partition(i).map_err(|e| lab_err("cutting an etcd member off", e))?;
                Ok((format!("{m} cut off from its peers, then healed"), Undo::HealMember(i)))
            } else {
                c.kill(i).map_err(|e| lab_err("killing an etcd member", e))?;
                Ok((format!("{m} SIGKILLed, then started again"), Undo::RestartMember(i)))
            }
        }
    }
}

fn undo(lab: &mut Lab, u: &Undo) -> Result<(), LabError> {
    match u {
        Undo::Nothing => Ok(()),
        Undo::LinkUp(ns) => {
            ip_in(ns, &["link", "set", "eth0", "up"])?;
            // The default route is the lab's own (not weft's): put it back like the lab built it.
            ip_in(ns, &["route", "replace", "default", "via", &format!("{LAN}.1")]).map(|_| ())
        }
        Undo::DeleteLease(suffix) => store_delete(lab, suffix),
        Undo::StartStore => start_store(lab),
        Undo::RestartMember(i) | Undo::HealMember(i) => {
            let c = topology::etcd_cluster(lab).ok_or_else(|| LabError::Step("the lab has no etcd cluster".into()))?;
            let r = if matches!(u, Undo::HealMember(_)) { c.heal(*i) } else { c.restart(*i) };
            r.map_err(|e| lab_err("undoing an etcd member fault", e))?;
            // Etcd's own recovery (a member catching up, an election) is not weft's to
            // measure: the next fault finds a whole cluster.
            c.wait_member(*i, REPAIR_LIMIT).map_err(|e| lab_err("waiting for the etcd member", e))
        }
    }
}

/// How long a fault lasts before it is undone.
fn pause(kind: Fault, rng: &mut StdRng) -> Duration {
    match kind {
        Fault::LinkFlap => Duration::from_millis(rng.random_range(500..=2000)),
        Fault::StoreKill | Fault::MemberKill | Fault::MemberPartition | Fault::LeaderKill => {
            Duration::from_millis(rng.random_range(1000..=3000))
        }
        Fault::LeaseLan | Fault::LeaseOutsideNetwork | Fault::LeaseLoopback | Fault::LeaseGarbage => {
            Duration::from_millis(rng.random_range(1000..=3000))
        }
        _ => Duration::ZERO,
    }
}

fn progress(msg: &str) {
    eprint!("{msg}");
    let _ = std::io::stderr().flush();
}

/// The harness's watch over the lab: inspections that record broken rules (each once) and
/// restart daemons that exited on their own (a broken rule too).
struct Watch<'a> {
    pinger: &'a Pinger,
    forbidden: Vec<Ipv4Net>,
    broken: Vec<String>,
    last_problems: Vec<String>,
    /// Whether the progress line on stderr is unfinished.
    midline: bool,
    /// Since when every inspection found the kernel state and daemons whole (the start of
    /// the first of them); reset when a fault starts.
    ok_since: Option<Instant>,
    /// Each host's subnet when the run started: no fault may make a host change it.
    subnets: HashMap<u8, String>,
}

impl Watch<'_> {
    fn note_broken(&mut self, during: &str, rules: Vec<String>) {
        for r in rules {
            let line = format!("{r} (during {during})");
            if !self.broken.iter().any(|b| b.split(" (during ").next() == Some(r.as_str())) {
                eprintln!("{}  RULE BROKEN: {line}", if self.midline { "\n" } else { "" });
                self.midline = false;
                self.broken.push(line);
            }
        }
    }

    /// One inspection; restarts daemons that exited on their own. True when the kernel
    /// state and the daemons are whole.
    fn once(&mut self, lab: &mut Lab, during: &str) -> bool {
        let started = Instant::now();
        let mut found = inspect(lab, &self.forbidden);
        for h in &lab.hosts {
            let Some(first) = self.subnets.get(&h.index) else { continue };
            let env = std::fs::read_to_string(lab.dir().join(format!("h{}/subnet.env", h.index))).unwrap_or_default();
            let written = weft_core::subnet_env::parse(&env).previous_subnet().map(|s| s.to_string());
            for now in [Some(h.subnet.clone()), written].into_iter().flatten() {
                if now != *first {
                    found.broken.push(format!("h{} changed subnet from {first} to {now}", h.index));
                }
            }
        }
        self.note_broken(during, found.broken.clone());
        for index in &found.down {
            let tail = std::fs::read_to_string(lab.dir().join(format!("h{index}/daemon.log"))).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(3).collect();
            self.note_broken(
                during,
                vec![format!(
                    "h{index}'s daemon exited on its own; log ends: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )],
            );
            if let Ok(l) = topology::restart(&lab.name, *index) {
                *lab = l;
            }
        }
        let whole = found.problems.is_empty() && found.broken.is_empty();
        if !whole {
            self.ok_since = None;
        } else if self.ok_since.is_none() {
            self.ok_since = Some(started);
        }
        self.last_problems = found.problems;
        self.last_problems.extend(found.broken);
        whole
    }

    /// Inspects until `deadline` (rules only).
    fn hold(&mut self, lab: &mut Lab, during: &str, deadline: Instant) {
        while Instant::now() < deadline {
            let next = Instant::now() + INSPECT_EVERY;
            self.once(lab, during);
            std::thread::sleep(
                next.saturating_duration_since(Instant::now()).min(deadline.saturating_duration_since(Instant::now())),
            );
        }
    }

    /// Waits until the lab is whole: kernel state and daemons, and every pod pair answering
    /// pings sent after `after`. Returns the instant since which it has been whole (not
    /// before `since`), or `None` after [`REPAIR_LIMIT`].
    fn until_whole(&mut self, lab: &mut Lab, during: &str, since: Instant, after: Instant) -> Option<Instant> {
        let limit = after + REPAIR_LIMIT;
        loop {
            let started = Instant::now();
            self.once(lab, during);
            if let Some(k) = self.ok_since
                && let Some(p) = self.pinger.whole_since(after, since)
            {
                return Some(k.max(p).max(since));
            }
            if Instant::now() > limit {
                if self.ok_since.is_some() {
                    self.last_problems.push("some pod pairs do not answer pings".into());
                }
                return None;
            }
            // Close watch right after the fault (repair times to a few tens of ms), then
            // at the usual pace.
            let pace = if started < after + Duration::from_secs(2) { INSPECT_SOON } else { INSPECT_EVERY };
            std::thread::sleep(pace.saturating_sub(started.elapsed()));
        }
    }
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3 of stat; utime and stime are fields 14 and 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Daemons that use more than [`IDLE_CPU_LIMIT`] of a core over two quiet seconds.
fn spinning_daemons(lab: &Lab) -> Vec<String> {
    let before: Vec<Option<u64>> = lab.hosts.iter().map(|h| cpu_ticks(h.pid)).collect();
    let window = Duration::from_secs(2);
    std::thread::sleep(window);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut out = Vec::new();
    for (h, b) in lab.hosts.iter().zip(before) {
        if let (Some(b), Some(a)) = (b, cpu_ticks(h.pid)) {
            let share = (a.saturating_sub(b)) as f64 / hz / window.as_secs_f64();
            if share > IDLE_CPU_LIMIT {
                out.push(format!(
                    "h{}'s daemon uses {:.0} % of a core while the lab is quiet (a busy loop)",
                    h.index,
                    share * 100.0
                ));
            }
        }
    }
    out
}

/// Runs `weft lab chaos`.
pub fn run(o: &ChaosOptions) -> Result<Report, LabError> {
    let mut lab = topology::load(&o.name)?;
    let mut rng = StdRng::seed_from_u64(o.seed);
    let wanted: Vec<Fault> = if o.faults.is_empty() { Fault::ALL.to_vec() } else { o.faults.clone() };
    let skipped: Vec<(Fault, &'static str)> =
        wanted.iter().filter_map(|k| k.not_applicable(&lab).map(|why| (*k, why))).collect();
    let kinds: Vec<Fault> = wanted.into_iter().filter(|k| k.not_applicable(&lab).is_none()).collect();
    if kinds.is_empty() {
        return Err(LabError::Usage("none of the chosen faults applies to this lab".into()));
    }
    let forbidden: Vec<Ipv4Net> =
        [Fault::LeaseLan, Fault::LeaseOutsideNetwork, Fault::LeaseLoopback, Fault::LeaseGarbage]
            .iter()
            .map(|k| invalid_lease(&lab, *k).0)
            .collect();
    eprintln!(
        "weft lab chaos {}: backend {}, store {}, seed {}, {} s; faults: {}",
        lab.name,
        lab.backend,
        lab.store,
        o.seed,
        o.seconds,
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
    );
    let pinger = Pinger::start(&lab)?;
    let mut watch = Watch {
        pinger: &pinger,
        forbidden,
        broken: Vec::new(),
        last_problems: Vec::new(),
        midline: false,
        ok_since: None,
        subnets: lab.hosts.iter().map(|h| (h.index, h.subnet.clone())).collect(),
    };
    let start = Instant::now();
    progress("  waiting for the lab to be whole before the first fault ... ");
    watch.midline = true;
    // A rule broken before any fault is not ours to measure: stop at once.
    watch.once(&mut lab, "the start");
    if !watch.broken.is_empty() || watch.until_whole(&mut lab, "the start", start, start).is_none() {
        let problems = watch.last_problems.join("; ");
        let mut pinger = pinger;
        pinger.stop();
        return Err(LabError::Step(format!(
            "the lab is not whole before any fault was injected ({problems}); check it with `weft lab check --name {}`",
            lab.name
        )));
    }
    eprintln!("ok");
    let first_fault = Instant::now();
    let baseline = pinger.lost_between(start, first_fault);
    let mut events: Vec<(Event, Instant)> = Vec::new();
    let mut order: Vec<Fault> = Vec::new();
    let budget = Duration::from_secs(o.seconds);
    while first_fault.elapsed() < budget {
        if order.is_empty() {
            // Every kind once per round, in a seeded random order: short runs still see them all.
            order = kinds.clone();
            order.shuffle(&mut rng);
        }
        let kind = order.pop().expect("refilled");
        let pause = pause(kind, &mut rng);
        let t0 = Instant::now();
        progress(&format!("  {:6.1} s  {:<22}", (t0 - first_fault).as_secs_f64(), kind.name()));
        watch.midline = true;
        watch.ok_since = None;
        let (detail, to_undo) = match inject(&mut lab, kind, &mut rng) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("could not be injected: {e}");
                // Not counted: nothing was done. Refresh the view of the lab and go on.
                lab = topology::load(&o.name)?;
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        watch.hold(&mut lab, kind.name(), t0 + pause);
        if let Err(e) = undo(&mut lab, &to_undo) {
            watch.note_broken(kind.name(), vec![format!("the harness could not undo {}: {e}", kind.name())]);
        }
        let undone = Instant::now();
        // Repair is timed from the end of the fault: the injection for an instant one, the
        // undo (link up, store answering again, lease deleted) for one that lasts.
        let from = if pause.is_zero() { t0 } else { undone };
        let mut whole = watch.until_whole(&mut lab, kind.name(), from, undone);
        if whole.is_some() && kind.hits_store() {
            // Whole kernels only show that nothing was lost while the store (or a member)
            // was away; the daemons must also hear from it again.
            whole = match store_probe(&lab) {
                Ok(seen) => whole.max(Some(seen)),
                Err(e) => {
                    watch.last_problems = vec![e];
                    None
                }
            };
        }
        let repair = whole.map(|w| w.saturating_duration_since(from));
        match repair {
            Some(r) => eprintln!("repaired in {:.2} s   {detail}", r.as_secs_f64()),
            None => {
                eprintln!("NOT repaired in {} s   {detail}: {}", REPAIR_LIMIT.as_secs(), watch.last_problems.join("; "))
            }
        }
        let unrepaired = if repair.is_none() { watch.last_problems.clone() } else { Vec::new() };
        events.push((Event { fault: kind, detail, at: t0 - first_fault, repair, lost: 0, sent: 0, unrepaired }, t0));
        if repair.is_none() {
            eprintln!("  the lab stays broken: no more faults");
            break;
        }
        // A quiet moment between faults, still watching the rules.
        let quiet = Duration::from_millis(rng.random_range(300..=1000));
        watch.hold(&mut lab, "a quiet moment", Instant::now() + quiet);
    }
    progress("  waiting for the lab to be whole at the end ... ");
    let end_mark = Instant::now();
    let converged = watch.until_whole(&mut lab, "the end", end_mark, end_mark).is_some();
    eprintln!("{}", if converged { "ok" } else { "NOT whole" });
    let final_problems = if converged { Vec::new() } else { watch.last_problems.clone() };
    let end = Instant::now();
    let spinning = if converged { spinning_daemons(&lab) } else { Vec::new() };
    watch.note_broken("the end", spinning);
    let broken = watch.broken;
    let mut pinger = pinger;
    pinger.stop();
    // Each fault's pings: from its start until the next one's start (the last: the end).
    let starts: Vec<Instant> = events.iter().map(|(_, t)| *t).collect();
    for (i, (e, t0)) in events.iter_mut().enumerate() {
        (e.lost, e.sent) = pinger.lost_between(*t0, starts.get(i + 1).copied().unwrap_or(end));
    }
    Ok(Report {
        lab: (lab.name.clone(), lab.backend.clone(), lab.store.clone()),
        seed: o.seed,
        seconds: o.seconds,
        events: events.into_iter().map(|(e, _)| e).collect(),
        skipped,
        broken,
        converged,
        final_problems,
        baseline,
        pairs: pinger.pairs,
    })
}

/// Parses `--faults a,b,c`.
pub fn parse_faults(text: &str) -> Result<Vec<Fault>, LabError> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            Fault::ALL.iter().copied().find(|k| k.name() == s).ok_or_else(|| {
                LabError::Usage(format!(
                    "unknown fault {s:?}; the kinds are: {}",
                    Fault::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_carry_a_valid_checksum() {
        let p = echo_request(0x1234, 7);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn replies_are_parsed_and_requests_are_not() {
        let mut pkt = vec![0x45, 0, 0, 44, 0, 0, 0, 0, 64, 1, 0, 0, 10, 244, 1, 2, 10, 244, 2, 3];
        let mut icmp = echo_request(9, 300).to_vec();
        assert_eq!(parse_reply(&[pkt.clone(), icmp.clone()].concat()), None, "an echo request is not a reply");
        icmp[0] = 0;
        pkt.extend(icmp);
        assert_eq!(parse_reply(&pkt), Some((Ipv4Addr::new(10, 244, 1, 2), 9, 300)));
        assert_eq!(parse_reply(&pkt[..24]), None, "a truncated packet is not a reply");
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        let d = |ms| Duration::from_millis(ms);
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[d(1), d(5), d(9)]), Some(d(5)));
        assert_eq!(median(&[d(2), d(4)]), Some(d(3)));
    }

    #[test]
    fn fault_names_round_trip_and_unknown_ones_are_refused() {
        let all = Fault::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(",");
        assert_eq!(parse_faults(&all).unwrap(), Fault::ALL.to_vec());
        let err = parse_faults("daemon-kill,reboot").unwrap_err().to_string();
        assert!(err.contains("\"reboot\"") && err.contains("link-flap"), "{err}");
    }
}
