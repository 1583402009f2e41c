//! The udp backend's kernel fast path: two tc programs (`crates/weft/bpf/udp_fastpath.c`)
//! that encapsulate packets routed to `flannel0` and decapsulate datagrams from known peers
//! in the kernel, in flannel's wire format, so a round trip between pods does not wake the
//! user-space engine four times. The engine stays the slow path for everything the programs
//! hand on (unknown destinations, malformed or unexpected packets, GRO-merged datagrams)
//! and the whole path when the kernel cannot run them.
//!
//! The programs are attached with tcx links (kernel ≥ 6.6) held by this process: they go
//! away with it, so a crash leaves nothing on the external interface, and the engine, which
//! reads what the programs pass on, is what runs when they are gone.
//!
//! A peer's TCP super-packet (a whole TSO packet that crossed a veth) is received through a
//! VXLAN device of ours, `weft-udp-rx` (see the C source for why): the ingress program
//! rewrites it into a VXLAN packet to that device's port, and a third program on the
//! device hands what the kernel's VXLAN receive path decapsulated to `flannel0`. If the
//! rewritten packets stop arriving there (a firewall's INPUT chain dropping the device's
//! port, say), [`FastPath::check_detour`] turns the detour off and super-packets are
//! decapsulated in place, whole but split by the bridge.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use ipnet::Ipv4Net;
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};
use weft_core::packet::PeerTable;

/// The compiled programs (built by `build.rs` from `bpf/udp_fastpath.c`).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/udp_fastpath.o"));

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// Why the fast path could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    /// The embedded object could not be read (a build problem).
    #[error("the udp fast path object is unreadable: {0}")]
    Object(String),
    /// A bpf(2) call failed.
    #[error("bpf {op}: {source}{log}")]
    Bpf {
        /// What was attempted.
        op: String,
        /// The kernel's answer.
        source: io::Error,
        /// The verifier's log, when a program was refused.
        log: String,
    },
}

fn bpf_err(op: impl Into<String>) -> FastPathError {
    FastPathError::Bpf { op: op.into(), source: io::Error::last_os_error(), log: String::new() }
}

/// `bpf(cmd, attr, size)`: `attr` is one of the `#[repr(C)]` attribute structs below, each
/// laid out without implicit padding (the kernel refuses attributes with stray bytes).
fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` struct of the layout the kernel
    // expects for `cmd`, zero-padded; the kernel reads at most `size_of::<T>()` bytes of it
    // and writes only into buffers whose pointers and lengths it carries.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as libc::c_uint) }
}

fn fd_result(r: libc::c_long, op: impl Into<String>) -> Result<OwnedFd, FastPathError> {
    if r < 0 {
        return Err(bpf_err(op));
    }
    // SAFETY: a non-negative result of these bpf commands is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    // u32s, not u64s: no hidden alignment padding, whose bytes the kernel would read as
    // map_ifindex and refuse.
    pad: [u32; 17],
}

#[repr(C)]
struct MapElem {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    pad: [u64; 12],
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    pad0: u32,
    expected_revision: u64,
    pad: [u64; 6],
}

// Every attribute struct is its fields and nothing else (no padding bytes left unset).
const _: () = assert!(size_of::<MapCreate>() == 7 * 4 + 16 + 17 * 4);
const _: () = assert!(size_of::<MapElem>() == 32);
const _: () = assert!(size_of::<ProgLoad>() == 72 + 12 * 8);
const _: () = assert!(size_of::<LinkCreate>() == 32 + 6 * 8);

fn name16(s: &str) -> [u8; 16] {
    let mut n = [0u8; 16];
    for (d, b) in n.iter_mut().zip(s.bytes().take(15)) {
        *d = b;
    }
    n
}

/// A BPF map we created.
struct Map {
    fd: OwnedFd,
    value_size: usize,
}

impl Map {
    fn create(name: &str, map_type: u32, key: u32, value: u32, entries: u32, flags: u32) -> Result<Map, FastPathError> {
        let mut a = MapCreate {
            map_type,
            key_size: key,
            value_size: value,
            max_entries: entries,
            map_flags: flags,
            map_name: name16(name),
            ..Default::default()
        };
        let fd = fd_result(sys_bpf(BPF_MAP_CREATE, &mut a), format!("create map {name}"))?;
        Ok(Map { fd, value_size: value as usize })
    }

    fn update<K, V>(&self, key: &K, value: &V) -> Result<(), FastPathError> {
        let mut a = MapElem {
            map_fd: self.fd.as_raw_fd() as u32,
            pad: 0,
            key: key as *const K as u64,
            value: value as *const V as u64,
            flags: 0,
        };
        if sys_bpf(BPF_MAP_UPDATE_ELEM, &mut a) < 0 {
            return Err(bpf_err("update a map entry"));
        }
        Ok(())
    }

    fn delete<K>(&self, key: &K) -> Result<(), FastPathError> {
        let mut a =
            MapElem { map_fd: self.fd.as_raw_fd() as u32, pad: 0, key: key as *const K as u64, value: 0, flags: 0 };
        if sys_bpf(BPF_MAP_DELETE_ELEM, &mut a) < 0 {
            let e = io::Error::last_os_error();
            // Already gone is what we wanted.
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(FastPathError::Bpf { op: "delete a map entry".into(), source: e, log: String::new() });
            }
        }
        Ok(())
    }

    /// The per-CPU values of a per-CPU array entry, summed.
    fn percpu_sum(&self, key: u32, cpus: usize) -> Result<u64, FastPathError> {
        let stride = self.value_size.div_ceil(8) * 8;
        let mut buf = vec![0u8; stride * cpus];
        let mut a = MapElem {
            map_fd: self.fd.as_raw_fd() as u32,
            pad: 0,
            key: &key as *const u32 as u64,
            value: buf.as_mut_ptr() as u64,
            flags: 0,
        };
        if sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut a) < 0 {
            return Err(bpf_err("read the counters"));
        }
        Ok(buf.chunks_exact(stride).map(|c| u64::from_ne_bytes(c[..8].try_into().unwrap_or_default())).sum())
    }
}

/// The number of possible CPUs (the size of a per-CPU value array).
fn possible_cpus() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    // "0-3" or "0,2-5": the highest index + 1.
    let last = text.trim().rsplit([',', '-']).next().and_then(|s| s.parse::<usize>().ok());
    last.map(|n| n + 1).unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// What the programs are told at attach time (must match `struct config` in the C source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Config {
    own_net: u32,
    own_mask: u32,
    subnet_mask: u32,
    local_ip: u32,
    ext_ifindex: u32,
    tun_ifindex: u32,
    port: u32,
    l2_len: u32,
    rx_port: u32,
    rx_vni: u32,
    rx_on: u32,
    rx_mac: [u8; 8],
}
const _: () = assert!(size_of::<Config>() == 13 * 4);

/// The per-CPU counters (`enum stat` in the C source).
const STAT_TX: u32 = 0;
const STAT_RX: u32 = 1;
const STAT_DETOUR: u32 = 2;
const STAT_RX_DETOURED: u32 = 3;
const STATS: u32 = 4;

/// The receive device super-packets take their detour through (`weft-udp-rx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxDevice {
    /// Its index.
    pub index: u32,
    /// Its MAC (the rewritten packets' destination).
    pub mac: [u8; 6],
    /// Its UDP port.
    pub port: u16,
    /// Its VNI.
    pub vni: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PeerSubnet {
    net: u32,
    mask: u32,
}

/// Where the fast path runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Our subnet.
    pub own: Ipv4Net,
    /// The prefix length of every lease.
    pub subnet_len: u8,
    /// The engine's bind address (the external interface's).
    pub local: Ipv4Addr,
    /// The UDP port.
    pub port: u16,
    /// The external interface's index.
    pub ext_index: u32,
    /// Whether the external interface carries Ethernet headers.
    pub ext_ethernet: bool,
    /// `flannel0`'s index.
    pub tun_index: u32,
    /// The receive device for super-packets, when there is one.
    pub rx: Option<RxDevice>,
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
}

fn mask_be(prefix: u8) -> u32 {
    (if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) }).to_be()
}

/// The loaded programs, their maps and the tcx links that attach them.
pub struct FastPath {
    /// Where the programs run.
    pub at: Attachment,
    by_subnet: Map,
    by_public: Map,
    stats: Map,
    cpus: usize,
    /// What the peer maps hold: subnet (network order) → public address (network order).
    loaded: HashMap<u32, u32>,
    /// Held for their lifetime: closing a link detaches its program.
    _links: Vec<OwnedFd>,
    config: Map,
    cfg: Config,
    /// The detour counters (sent, arrived) at the last two [`FastPath::check_detour`]s,
    /// the latest last.
    detour_seen: [(u64, u64); 2],
}

impl FastPath {
    /// Loads the programs and attaches them; `max_peers` sizes the peer maps. Fails when
    /// the kernel lacks BPF, tcx (6.6) or a helper: the caller runs the engine alone.
    pub fn attach(at: Attachment, max_peers: u32) -> Result<FastPath, FastPathError> {
        let config = Map::create("weft_config", BPF_MAP_TYPE_ARRAY, 4, size_of::<Config>() as u32, 1, 0)?;
        let entries = max_peers.max(16);
        let by_subnet = Map::create("weft_by_subnet", BPF_MAP_TYPE_HASH, 4, 4, entries, BPF_F_NO_PREALLOC)?;
        let by_public = Map::create(
            "weft_by_public",
            BPF_MAP_TYPE_HASH,
            4,
            size_of::<PeerSubnet>() as u32,
            entries,
            BPF_F_NO_PREALLOC,
        )?;
        let stats = Map::create("weft_stats", BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, STATS, 0)?;
        let cfg = Config {
            own_net: be(at.own.network()),
            own_mask: mask_be(at.own.prefix_len()),
            subnet_mask: mask_be(at.subnet_len),
            local_ip: be(at.local),
            ext_ifindex: at.ext_index,
            tun_ifindex: at.tun_index,
            port: u32::from(at.port.to_be()),
            l2_len: if at.ext_ethernet { 14 } else { 0 },
            rx_port: at.rx.map_or(0, |r| u32::from(r.port.to_be())),
            // The VXLAN header's second word: the VNI in its top 24 bits.
            rx_vni: at.rx.map_or(0, |r| (r.vni << 8).to_be()),
            rx_on: u32::from(at.rx.is_some()),
            rx_mac: at.rx.map_or([0; 8], |r| {
                let mut m = [0u8; 8];
                m[..6].copy_from_slice(&r.mac);
                m
            }),
        };
        config.update(&0u32, &cfg)?;
        let maps: [(&str, &Map); 4] = [
            ("weft_config", &config),
            ("weft_by_subnet", &by_subnet),
            ("weft_by_public", &by_public),
            ("weft_stats", &stats),
        ];
        let egress = load_program("tc/egress", "weft_udp_egress", &maps)?;
        let ingress = load_program("tc/ingress", "weft_udp_ingress", &maps)?;
        let mut links = Vec::with_capacity(3);
        // The receive device's program first: the ingress program detours to it at once.
        if let Some(rx) = at.rx {
            let prog = load_program("tc/rx", "weft_udp_rx", &maps)?;
            links.push(link(&prog, rx.index, BPF_TCX_INGRESS, "attach to weft-udp-rx's ingress")?);
        }
        links.push(link(&egress, at.tun_index, BPF_TCX_EGRESS, "attach to flannel0's egress")?);
        links.push(link(&ingress, at.ext_index, BPF_TCX_INGRESS, "attach to the external interface's ingress")?);
        Ok(FastPath {
            at,
            by_subnet,
            by_public,
            stats,
            cpus: possible_cpus(),
            loaded: HashMap::new(),
            _links: links,
            config,
            cfg,
            detour_seen: [(0, 0); 2],
        })
    }

    /// Whether super-packets take the detour through the receive device.
    pub fn detour_on(&self) -> bool {
        self.cfg.rx_on != 0
    }

    /// Turns the detour off when super-packets were sent to the receive device between
    /// the two calls before this one but none arrived there since the first of them:
    /// something between the two (a firewall's INPUT chain, the device down or gone) drops
    /// them, and in-place decapsulation carries them instead. One lost packet is enough:
    /// a TCP stream whose packets are dropped sends few. Returns true when it turned the
    /// detour off just now. Meant to be called every fraction of a second: about twice
    /// that long is the most the drop lasts.
    pub fn check_detour(&mut self) -> Result<bool, FastPathError> {
        if !self.detour_on() {
            return Ok(false);
        }
        let sent = self.stats.percpu_sum(STAT_DETOUR, self.cpus)?;
        let arrived = self.stats.percpu_sum(STAT_RX_DETOURED, self.cpus)?;
        let [(sent0, arrived0), (sent1, _)] = self.detour_seen;
        self.detour_seen = [self.detour_seen[1], (sent, arrived)];
        if !detour_is_lost(sent1.saturating_sub(sent0), arrived.saturating_sub(arrived0)) {
            return Ok(false);
        }
        // The port stays closed to strangers (`rx_port` is kept): only the detour goes.
        let mut cfg = self.cfg;
        cfg.rx_on = 0;
        self.config.update(&0u32, &cfg)?;
        self.cfg = cfg;
        Ok(true)
    }

    /// Makes the peer maps hold exactly `table`'s peers: every subnet loaded or wanted goes
    /// through [`FastPath::sync_subnet`], which writes only what differs; returns how many
    /// subnets changed.
    pub fn set_peers(&mut self, table: &PeerTable) -> Result<usize, FastPathError> {
        let prefix = table.prefix();
        let mut nets: HashSet<Ipv4Addr> = self.loaded.keys().map(|k| Ipv4Addr::from(u32::from_be(*k))).collect();
        nets.extend(table.iter().map(|(net, _)| net));
        let mut changes = 0;
        for net in nets {
            let Ok(net) = Ipv4Net::new(net, prefix) else { continue };
            changes += usize::from(self.sync_subnet(net, table)?);
        }
        Ok(changes)
    }

    /// Makes the maps' entries for `net` (and for the public addresses it had and has) what
    /// `table` says now: the per-event path, O(1). Returns whether anything changed.
    pub fn sync_subnet(&mut self, net: Ipv4Net, table: &PeerTable) -> Result<bool, FastPathError> {
        if net.prefix_len() != table.prefix() {
            return Ok(false);
        }
        let key = be(net.network());
        let want = table.route(net.network()).map(be);
        let had = self.loaded.get(&key).copied();
        if want == had {
            return Ok(false);
        }
        match want {
            Some(ip) => {
                self.by_subnet.update(&key, &ip)?;
                self.loaded.insert(key, ip);
            }
            None => {
                self.by_subnet.delete(&key)?;
                self.loaded.remove(&key);
            }
        }
        // The public entries of the old and the new address follow the table's.
        for ip in [had, want].into_iter().flatten() {
            match table.subnet_of(Ipv4Addr::from(u32::from_be(ip))) {
                Some(owner) => self
                    .by_public
                    .update(&ip, &PeerSubnet { net: be(owner.network()), mask: mask_be(owner.prefix_len()) })?,
                None => self.by_public.delete(&ip)?,
            }
        }
        Ok(true)
    }

    /// Packets the programs carried: (sent, received).
    pub fn counts(&self) -> (u64, u64) {
        let get = |k| self.stats.percpu_sum(k, self.cpus).unwrap_or(0);
        (get(STAT_TX), get(STAT_RX) + get(STAT_RX_DETOURED))
    }
}

/// Loads the program in `section`, its map references patched to our maps.
fn load_program(section: &str, name: &str, maps: &[(&str, &Map)]) -> Result<OwnedFd, FastPathError> {
    let file = object::File::parse(OBJECT).map_err(|e| FastPathError::Object(e.to_string()))?;
    let sec = file.section_by_name(section).ok_or_else(|| FastPathError::Object(format!("no section {section}")))?;
    let mut insns = sec.data().map_err(|e| FastPathError::Object(e.to_string()))?.to_vec();
    for (offset, reloc) in sec.relocations() {
        let RelocationTarget::Symbol(idx) = reloc.target() else {
            return Err(FastPathError::Object(format!("{section}: a relocation without a symbol")));
        };
        let sym = file.symbol_by_index(idx).map_err(|e| FastPathError::Object(e.to_string()))?;
        let sym_name = sym.name().map_err(|e| FastPathError::Object(e.to_string()))?;
        let map = maps
            .iter()
            .find(|(n, _)| *n == sym_name)
            .ok_or_else(|| FastPathError::Object(format!("{section}: unknown map {sym_name}")))?
            .1;
        let at = offset as usize;
        // A map reference is a 16-byte `ld_imm64`: opcode 0x18, source register set to
        // BPF_PSEUDO_MAP_FD, the descriptor in the first immediate.
        if insns.get(at) != Some(&0x18) || insns.len() < at + 16 {
            return Err(FastPathError::Object(format!("{section}: relocation at {at} is not a map load")));
        }
        insns[at + 1] = (insns[at + 1] & 0x0f) | (BPF_PSEUDO_MAP_FD << 4);
        insns[at + 4..at + 8].copy_from_slice(&(map.fd.as_raw_fd() as u32).to_ne_bytes());
    }
    let license = CString::new("Dual MIT/GPL").expect("no NUL");
    let load = |log: &mut [u8]| {
        let mut a = ProgLoad {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: (insns.len() / 8) as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: log.len() as u32,
            log_buf: if log.is_empty() { 0 } else { log.as_mut_ptr() as u64 },
            prog_name: name16(name),
            ..Default::default()
        };
        sys_bpf(BPF_PROG_LOAD, &mut a)
    };
    let r = load(&mut []);
    if r >= 0 {
        return fd_result(r, "");
    }
    let source = io::Error::last_os_error();
    // Once more with the verifier's log, to say why.
    let mut log = vec![0u8; 64 * 1024];
    let _ = load(&mut log);
    let text = String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)]).into_owned();
    let tail: String = text.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" / ");
    Err(FastPathError::Bpf {
        op: format!("load {name}"),
        source,
        log: if tail.is_empty() { String::new() } else { format!(" (verifier: {tail})") },
    })
}

fn link(prog: &OwnedFd, ifindex: u32, attach_type: u32, op: &str) -> Result<OwnedFd, FastPathError> {
    let mut a =
        LinkCreate { prog_fd: prog.as_raw_fd() as u32, target_ifindex: ifindex, attach_type, ..Default::default() };
    fd_result(sys_bpf(BPF_LINK_CREATE, &mut a), op)
}

/// Whether the way to the receive device is blocked: super-packets were sent in one
/// interval (`sent`) and none arrived in it or the next (`arrived`). In flight takes
/// microseconds; the device counts what reaches it, before its own checks, so a packet it
/// refuses does not count as lost.
fn detour_is_lost(sent: u64, arrived: u64) -> bool {
    sent > 0 && arrived == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_detour_is_told_from_a_quiet_or_busy_one() {
        assert!(!detour_is_lost(0, 0), "no traffic");
        assert!(!detour_is_lost(1000, 1), "some arrive: the way is open");
        assert!(!detour_is_lost(0, 5), "arrivals of what was sent before");
        assert!(detour_is_lost(1, 0), "a blocked TCP stream sends little: one lost is enough");
        assert!(detour_is_lost(100_000, 0));
    }
}
