//! The udp backend's packet logic, without I/O: which peer an inner IPv4 packet goes to,
//! which datagrams to accept, TTL handling with an incremental checksum fix, and the ICMP
//! "network unreachable" flannel answers with. Every function takes untrusted bytes and
//! never panics.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::cache::{LeaseCache, LeaseEvent};
use crate::lease::{Lease, SubnetKey};

/// Why a packet was dropped (also the `reason` label of the drop counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than an IPv4 header, or than its own total length.
    Truncated,
    /// Not IPv4, or a header that does not parse.
    Malformed,
    /// A datagram from an address that holds no lease.
    UnknownPeer,
    /// The inner source is outside the sending peer's subnet.
    SpoofedSource,
    /// The inner destination is not in our subnet.
    NotForUs,
    /// TTL would reach zero.
    TtlExpired,
}

impl DropReason {
    /// Every reason, for pre-registering counters.
    pub const ALL: [DropReason; 6] = [
        DropReason::Truncated,
        DropReason::Malformed,
        DropReason::UnknownPeer,
        DropReason::SpoofedSource,
        DropReason::NotForUs,
        DropReason::TtlExpired,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Malformed => "malformed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NotForUs => "not_for_us",
            DropReason::TtlExpired => "ttl_expired",
        }
    }
}

/// The peers: O(1) lookups both ways, since every lease of a network has the same length.
/// Built whole at start, then changed one peer at a time ([`PeerTable::apply`]): a lease
/// event touches only its own peer's two entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTable {
    /// Lease prefix length (all peers share it).
    prefix: u8,
    /// Masked subnet → the peer's public address.
    by_subnet: HashMap<u32, Ipv4Addr>,
    /// Public address → the peer's subnet.
    by_public: HashMap<Ipv4Addr, Ipv4Net>,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) }
}

/// The table entry of a peer lease for the udp backend: its IPv4 subnet and public address.
/// `None` for leases of other backends (udp leases carry no `BackendType`) and IPv6-only ones.
pub fn udp_entry(l: &Lease) -> Option<(Ipv4Net, Ipv4Addr)> {
    if !l.attrs.backend_type.is_empty() {
        return None;
    }
    l.key.v4.map(|n| (n, l.attrs.public_ip))
}

impl PeerTable {
    /// Builds the table from (subnet, public IP) pairs; subnets of another length than
    /// `prefix` and unset (`0.0.0.0`) addresses are ignored (they cannot come from a valid
    /// lease).
    pub fn new(prefix: u8, peers: impl IntoIterator<Item = (Ipv4Net, Ipv4Addr)>) -> Self {
        let mut t = PeerTable { prefix, ..Default::default() };
        for (net, ip) in peers {
            t.insert(net, ip);
        }
        t
    }

    /// The table of the udp peers among `leases` (the accepted set): the full rebuild.
    pub fn of_leases<'a>(prefix: u8, leases: impl IntoIterator<Item = &'a Lease>) -> Self {
        PeerTable::new(prefix, leases.into_iter().filter_map(udp_entry))
    }

    /// Makes `net`'s peer the one at `ip`, replacing what `net` had (its old address no
    /// longer maps to it). An entry that cannot be used (another prefix length: left alone;
    /// `0.0.0.0`: `net`'s entry removed) is refused with `false`. A public address held by
    /// another subnet moves to `net` (a transient state while events are applied one by
    /// one: the cache never accepts two leases with one address); removing that other
    /// subnet later leaves `net`'s mapping alone.
    pub fn insert(&mut self, net: Ipv4Net, ip: Ipv4Addr) -> bool {
        if net.prefix_len() != self.prefix {
            return false;
        }
        if ip.is_unspecified() {
            self.remove(net);
            return false;
        }
        let net = net.trunc();
        if let Some(old) = self.by_subnet.insert(u32::from(net.network()), ip)
            && old != ip
            && self.by_public.get(&old) == Some(&net)
        {
            self.by_public.remove(&old);
        }
        self.by_public.insert(ip, net);
        true
    }

    /// Removes `net`'s peer, and its public address's mapping when that still names `net`;
    /// returns the address it had. A subnet of another prefix length names no entry (a
    /// `/16` must not remove the `/24` that shares its first address).
    pub fn remove(&mut self, net: Ipv4Net) -> Option<Ipv4Addr> {
        if net.prefix_len() != self.prefix {
            return None;
        }
        let net = net.trunc();
        let ip = self.by_subnet.remove(&u32::from(net.network()))?;
        if self.by_public.get(&ip) == Some(&net) {
            self.by_public.remove(&ip);
        }
        Some(ip)
    }

    /// Brings lease `key`'s entry to `lease`, what is in use for it now (`None`: nothing, or
    /// a lease that is no udp peer): one peer's entries, nothing else.
    pub fn update(&mut self, key: &SubnetKey, lease: Option<&Lease>) {
        let Some(net) = key.v4 else { return };
        match lease.filter(|l| l.key == *key).and_then(udp_entry) {
            Some((n, ip)) => {
                self.insert(n, ip);
            }
            None => {
                self.remove(net);
            }
        }
    }

    /// Applies `events` (already applied to `cache`): each event's peer is brought to what
    /// the cache has in use for it now, so a rejected lease never enters and a lease that
    /// becomes rejected or accepted leaves or enters. O(events).
    pub fn apply(&mut self, events: &[LeaseEvent], cache: &LeaseCache) {
        for (key, lease) in cache.current(events) {
            self.update(&key, lease);
        }
    }

    /// The peer owning `dst`.
    pub fn route(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        self.by_subnet.get(&(u32::from(dst) & mask(self.prefix))).copied()
    }

    /// The subnet of the peer at `public`.
    pub fn subnet_of(&self, public: Ipv4Addr) -> Option<Ipv4Net> {
        self.by_public.get(&public).copied()
    }

    /// The prefix length every peer subnet has.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Every peer: (subnet base address, public address).
    pub fn iter(&self) -> impl Iterator<Item = (Ipv4Addr, Ipv4Addr)> + '_ {
        self.by_subnet.iter().map(|(net, ip)| (Ipv4Addr::from(*net), *ip))
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.by_subnet.len()
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.by_subnet.is_empty()
    }
}

/// The fields of an IPv4 header we use, after checking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Header {
    /// Source.
    pub src: Ipv4Addr,
    /// Destination.
    pub dst: Ipv4Addr,
    /// Header length in bytes.
    pub header_len: usize,
    /// Total length in bytes.
    pub total_len: usize,
    /// Protocol number.
    pub protocol: u8,
    /// Whether this is a non-first fragment.
    pub later_fragment: bool,
}

/// Parses and checks an IPv4 header at the start of `pkt`.
pub fn parse_ipv4(pkt: &[u8]) -> Result<Ipv4Header, DropReason> {
    if pkt.len() < 20 {
        return Err(DropReason::Truncated);
    }
    if pkt[0] >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let header_len = usize::from(pkt[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if header_len < 20 || total_len < header_len {
        return Err(DropReason::Malformed);
    }
    if pkt.len() < total_len || pkt.len() < header_len {
        return Err(DropReason::Truncated);
    }
    let frag = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff;
    Ok(Ipv4Header {
        src: Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
        dst: Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
        header_len,
        total_len,
        protocol: pkt[9],
        later_fragment: frag != 0,
    })
}

/// Decrements the TTL and patches the header checksum incrementally (RFC 1624).
/// `Err(TtlExpired)` when the TTL is 0 or 1: the packet must not be forwarded.
pub fn decrement_ttl(pkt: &mut [u8]) -> Result<(), DropReason> {
    if pkt.len() < 20 {
        return Err(DropReason::Truncated);
    }
    if pkt[8] <= 1 {
        return Err(DropReason::TtlExpired);
    }
    pkt[8] -= 1;
    // The TTL is the high byte of the 16-bit word at offset 8: the word dropped by 0x0100,
    // so the one's-complement checksum goes up by 0x0100, with end-around carry.
    let sum = u32::from(u16::from_be_bytes([pkt[10], pkt[11]])) + 0x0100;
    let sum = (sum & 0xffff) + (sum >> 16);
    pkt[10..12].copy_from_slice(&(sum as u16).to_be_bytes());
    Ok(())
}

/// The one's-complement checksum of `data` (IPv4 header, ICMP).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What to do with a packet read from the TUN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Send it (TTL already decremented) to this peer.
    Send(Ipv4Addr),
    /// No peer owns the destination: answer with ICMP net unreachable (if allowed).
    NoRoute(Ipv4Header),
    /// Drop it.
    Drop(DropReason),
}

/// Decides where a packet from the TUN device goes; decrements its TTL when it is sent.
pub fn outbound(pkt: &mut [u8], peers: &PeerTable) -> Outbound {
    let h = match parse_ipv4(pkt) {
        Ok(h) => h,
        Err(r) => return Outbound::Drop(r),
    };
    let Some(peer) = peers.route(h.dst) else { return Outbound::NoRoute(h) };
    match decrement_ttl(pkt) {
        Ok(()) => Outbound::Send(peer),
        Err(r) => Outbound::Drop(r),
    }
}

/// Checks a datagram's payload from `from` before it enters the TUN device: the sender
/// must hold a lease, the inner source must be inside its subnet, the destination inside
/// `own`. Decrements the TTL. Returns the inner packet's length (trailing bytes beyond
/// the IPv4 total length are not forwarded).
pub fn inbound(pkt: &mut [u8], from: Ipv4Addr, peers: &PeerTable, own: Ipv4Net) -> Result<usize, DropReason> {
    let h = parse_ipv4(pkt)?;
    let Some(subnet) = peers.subnet_of(from) else { return Err(DropReason::UnknownPeer) };
    if !subnet.contains(&h.src) {
        return Err(DropReason::SpoofedSource);
    }
    if !own.contains(&h.dst) {
        return Err(DropReason::NotForUs);
    }
    decrement_ttl(pkt)?;
    Ok(h.total_len)
}

/// A datagram that carries one whole TCP super-packet, longer than the device MTU: a
/// peer's kernel fast path on the same machine hands its unsegmented TCP packets over as
/// one datagram (the outer header marked as a UDP tunnel, so the socket reports no segment
/// size); IP fragments reassembled into one datagram look the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuperPacket {
    /// IPv4 header length.
    pub ip_len: usize,
    /// IPv4 + TCP header length.
    pub headers: usize,
    /// Payload bytes per segment, so that each segment fits `mtu`.
    pub seg: usize,
}

/// Whether `pkt` is exactly one IPv4 TCP packet too long for `mtu` (the device's), with
/// well-formed headers: then it can be handed to the kernel as one TSO packet, cut into
/// segments of at most `mtu` bytes. `None` for anything else.
pub fn tcp_super_packet(pkt: &[u8], mtu: usize) -> Option<SuperPacket> {
    let h = parse_ipv4(pkt).ok()?;
    if h.protocol != 6 || h.later_fragment || h.total_len != pkt.len() || pkt.len() <= mtu {
        return None;
    }
    let tcp = pkt.get(h.header_len..h.header_len + 20)?;
    let tcp_len = usize::from(tcp[12] >> 4) * 4;
    let headers = h.header_len + tcp_len;
    let seg = mtu.checked_sub(headers)?;
    (tcp_len >= 20 && headers < pkt.len() && seg > 0 && seg <= usize::from(u16::MAX)).then_some(SuperPacket {
        ip_len: h.header_len,
        headers,
        seg,
    })
}

/// Writes into `out` the ICMP "destination net unreachable" (type 3, code 0) flannel sends
/// back into the TUN device for `orig` (an unroutable packet), from `src` (our TUN address),
/// TTL 8. Returns its length, or `None` when no ICMP must be sent (for ICMP itself, for
/// later fragments) or `out` is too small.
pub fn icmp_net_unreachable(orig: &[u8], h: &Ipv4Header, src: Ipv4Addr, out: &mut [u8]) -> Option<usize> {
    if h.protocol == 1 || h.later_fragment {
        return None;
    }
    // The original header and the first 8 bytes of its payload.
    let quoted = (h.header_len + 8).min(orig.len());
    let len = 20 + 8 + quoted;
    if out.len() < len {
        return None;
    }
    let o = &mut out[..len];
    o.fill(0);
    o[0] = 0x45;
    o[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    o[8] = 8;
    o[9] = 1;
    o[12..16].copy_from_slice(&src.octets());
    o[16..20].copy_from_slice(&h.src.octets());
    let c = checksum(&o[..20]);
    o[10..12].copy_from_slice(&c.to_be_bytes());
    o[20] = 3;
    o[21] = 0;
    o[28..28 + quoted].copy_from_slice(&orig[..quoted]);
    let c = checksum(&o[20..]);
    o[22..24].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A minimal valid IPv4/UDP packet.
    fn packet(src: [u8; 4], dst: [u8; 4], ttl: u8) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = ttl;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn table() -> PeerTable {
        PeerTable::new(
            24,
            [
                ("10.5.2.0/24".parse().unwrap(), Ipv4Addr::new(192, 0, 2, 12)),
                ("10.5.3.0/24".parse().unwrap(), Ipv4Addr::new(192, 0, 2, 13)),
            ],
        )
    }

    /// An IPv4 TCP packet of `total` bytes with a 20-byte TCP header (data offset `doff`).
    fn tcp_packet(total: usize, doff: u8) -> Vec<u8> {
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 5, 1, 2]);
        p[16..20].copy_from_slice(&[10, 5, 2, 3]);
        if total >= 33 {
            p[32] = doff << 4;
        }
        p
    }

    #[test]
    fn tcp_super_packet_is_one_whole_tcp_packet_longer_than_the_mtu() {
        // Hostile and ordinary datagrams first: none of them is a super-packet.
        assert_eq!(tcp_super_packet(&[], 1472), None, "empty");
        assert_eq!(tcp_super_packet(&[0x45; 19], 1472), None, "shorter than a header");
        assert_eq!(tcp_super_packet(&tcp_packet(1472, 5), 1472), None, "fits the MTU");
        assert_eq!(tcp_super_packet(&tcp_packet(3000, 4), 1472), None, "TCP data offset below 5");
        assert_eq!(tcp_super_packet(&tcp_packet(3000, 15)[..2000], 1472), None, "length field beyond the datagram");
        let mut two = tcp_packet(1400, 5);
        two.extend(tcp_packet(1400, 5));
        assert_eq!(tcp_super_packet(&two, 1472), None, "two packets in one datagram");
        let mut udp = tcp_packet(3000, 5);
        udp[9] = 17;
        assert_eq!(tcp_super_packet(&udp, 1472), None, "not TCP");
        let mut frag = tcp_packet(3000, 5);
        frag[7] = 1;
        assert_eq!(tcp_super_packet(&frag, 1472), None, "a later fragment");
        assert_eq!(tcp_super_packet(&tcp_packet(3000, 15), 60), None, "headers leave no room in the MTU");
        assert_eq!(tcp_super_packet(&tcp_packet(3000, 5), 0), None, "no MTU");
        // The real thing: 20 + 32 bytes of headers, segments that fit 1472.
        assert_eq!(
            tcp_super_packet(&tcp_packet(52 + 3 * 1420, 8), 1472),
            Some(SuperPacket { ip_len: 20, headers: 52, seg: 1420 })
        );
    }

    #[test]
    fn outbound_routes_by_subnet_and_decrements_ttl_with_a_valid_checksum() {
        let mut p = packet([10, 5, 1, 2], [10, 5, 3, 9], 64);
        assert_eq!(outbound(&mut p, &table()), Outbound::Send(Ipv4Addr::new(192, 0, 2, 13)));
        assert_eq!(p[8], 63);
        assert_eq!(checksum(&p[..20]), 0, "the patched header checksum verifies");
        let mut q = packet([10, 5, 1, 2], [10, 5, 9, 9], 64);
        assert!(matches!(outbound(&mut q, &table()), Outbound::NoRoute(_)));
        let mut r = packet([10, 5, 1, 2], [10, 5, 3, 9], 1);
        assert_eq!(outbound(&mut r, &table()), Outbound::Drop(DropReason::TtlExpired));
    }

    #[test]
    fn inbound_accepts_only_known_peers_with_their_own_sources() {
        let own: Ipv4Net = "10.5.1.0/24".parse().unwrap();
        let peer = Ipv4Addr::new(192, 0, 2, 12);
        let mut ok = packet([10, 5, 2, 7], [10, 5, 1, 2], 64);
        assert_eq!(inbound(&mut ok, peer, &table(), own), Ok(28));
        assert_eq!((ok[8], checksum(&ok[..20])), (63, 0));
        let mut spoofed = packet([10, 5, 3, 7], [10, 5, 1, 2], 64);
        assert_eq!(inbound(&mut spoofed, peer, &table(), own), Err(DropReason::SpoofedSource));
        let mut stranger = packet([10, 5, 2, 7], [10, 5, 1, 2], 64);
        assert_eq!(inbound(&mut stranger, Ipv4Addr::new(203, 0, 113, 1), &table(), own), Err(DropReason::UnknownPeer));
        let mut elsewhere = packet([10, 5, 2, 7], [10, 5, 3, 2], 64);
        assert_eq!(inbound(&mut elsewhere, peer, &table(), own), Err(DropReason::NotForUs));
        assert_eq!(inbound(&mut ok[..10].to_vec(), peer, &table(), own), Err(DropReason::Truncated));
        let mut v6 = ok.clone();
        v6[0] = 0x60;
        assert_eq!(inbound(&mut v6, peer, &table(), own), Err(DropReason::Malformed));
        let mut long = packet([10, 5, 2, 7], [10, 5, 1, 2], 64);
        long[2..4].copy_from_slice(&200u16.to_be_bytes());
        assert_eq!(inbound(&mut long, peer, &table(), own), Err(DropReason::Truncated));
    }

    #[test]
    fn ttl_checksum_carries_around() {
        let mut p = packet([10, 5, 1, 2], [10, 5, 3, 9], 64);
        p[10] = 0xff;
        p[11] = 0x00;
        decrement_ttl(&mut p).unwrap();
        assert_eq!(&p[10..12], &[0x00, 0x01]);
    }

    #[test]
    fn icmp_net_unreachable_as_flannel_sends_it() {
        let orig = packet([10, 5, 1, 2], [10, 5, 9, 9], 64);
        let h = parse_ipv4(&orig).unwrap();
        let mut out = [0u8; 128];
        let n = icmp_net_unreachable(&orig, &h, Ipv4Addr::new(10, 5, 1, 0), &mut out).unwrap();
        assert_eq!(n, 20 + 8 + 28);
        let r = parse_ipv4(&out[..n]).unwrap();
        assert_eq!((r.src, r.dst, r.protocol, out[8]), (Ipv4Addr::new(10, 5, 1, 0), Ipv4Addr::new(10, 5, 1, 2), 1, 8));
        assert_eq!((out[20], out[21]), (3, 0));
        assert_eq!(checksum(&out[..20]), 0);
        assert_eq!(checksum(&out[20..n]), 0);
        let mut icmp = orig.clone();
        icmp[9] = 1;
        assert_eq!(
            icmp_net_unreachable(&icmp, &parse_ipv4(&icmp).unwrap(), Ipv4Addr::new(10, 5, 1, 0), &mut out),
            None
        );
    }

    fn udp(key: &str, ip: &str, rev: i64) -> Lease {
        let mut l = crate::validate::tests::lease(key, ip, rev);
        l.attrs.backend_type.clear();
        l
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn entries_that_cannot_come_from_a_valid_lease_change_nothing_else() {
        let mut t = table();
        let before = t.clone();
        // A /23 or /25 shares its first address with the /24 peer 10.5.2.0: it names no entry.
        for other in ["10.5.2.0/23", "10.5.2.0/25", "10.5.2.0/16", "0.0.0.0/0"] {
            assert!(!t.insert(net(other), ip("192.0.2.99")), "{other}");
            assert_eq!(t.remove(net(other)), None, "{other}");
            t.update(&SubnetKey { v4: Some(net(other)), v6: None }, None);
        }
        assert_eq!(t, before, "nothing but the named subnet's entries may change");
        // An unset public address is no peer: the subnet's entry goes, nothing enters.
        assert!(!t.insert(net("10.5.2.0/24"), Ipv4Addr::UNSPECIFIED));
        assert_eq!((t.route(ip("10.5.2.1")), t.subnet_of(ip("192.0.2.12"))), (None, None));
        assert_eq!(t.subnet_of(Ipv4Addr::UNSPECIFIED), None);
        assert_eq!(t.route(ip("10.5.3.1")), Some(ip("192.0.2.13")), "the other peer is untouched");
        // Host bits in a subnet are cut off, as the kernel would.
        assert!(t.insert(net("10.5.2.7/24"), ip("192.0.2.12")));
        assert_eq!(t.subnet_of(ip("192.0.2.12")), Some(net("10.5.2.0/24")));
        assert_eq!(t, before);
        // An IPv6-only key or a lease of another backend names no udp entry.
        t.update(&"10.5.2.0-24".parse().unwrap(), Some(&crate::validate::tests::lease("10.5.2.0-24", "192.0.2.12", 1)));
        assert_eq!(t.route(ip("10.5.2.1")), None, "a host-gw lease is no udp peer");
        let mut v6only = udp("10.5.2.0-24", "192.0.2.12", 1);
        v6only.key = SubnetKey { v4: None, v6: Some("fd00::/64".parse().unwrap()) };
        t.update(&v6only.key, Some(&v6only));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn one_peer_is_inserted_moved_and_removed_without_touching_the_others() {
        let mut t = table();
        assert!(t.insert(net("10.5.4.0/24"), ip("192.0.2.14")));
        assert_eq!(
            (t.len(), t.route(ip("10.5.4.9")), t.subnet_of(ip("192.0.2.14"))),
            (3, Some(ip("192.0.2.14")), Some(net("10.5.4.0/24")))
        );
        // A new public address: the old one no longer maps to the peer.
        assert!(t.insert(net("10.5.4.0/24"), ip("192.0.2.44")));
        assert_eq!(
            (t.len(), t.subnet_of(ip("192.0.2.14")), t.subnet_of(ip("192.0.2.44"))),
            (3, None, Some(net("10.5.4.0/24")))
        );
        assert_eq!(t.remove(net("10.5.4.0/24")), Some(ip("192.0.2.44")));
        assert_eq!(t.remove(net("10.5.4.0/24")), None);
        assert_eq!(t, table());
        // An address taken over by another subnet (events applied one by one): removing or
        // moving the old holder leaves the new holder's mapping alone.
        assert!(t.insert(net("10.5.4.0/24"), ip("192.0.2.12")));
        assert_eq!(t.subnet_of(ip("192.0.2.12")), Some(net("10.5.4.0/24")));
        assert_eq!(t.remove(net("10.5.2.0/24")), Some(ip("192.0.2.12")));
        assert_eq!(t.subnet_of(ip("192.0.2.12")), Some(net("10.5.4.0/24")));
        assert!(t.insert(net("10.5.3.0/24"), ip("192.0.2.33")));
        assert_eq!(
            t,
            PeerTable::new(24, [(net("10.5.3.0/24"), ip("192.0.2.33")), (net("10.5.4.0/24"), ip("192.0.2.12"))])
        );
    }

    #[test]
    fn a_lease_event_changes_only_its_peer_as_the_cache_decides() {
        use crate::cache::LeaseCache;
        use crate::validate::tests::rules;
        let mut c = LeaseCache::new(rules());
        let a = udp("10.5.4.0-24", "192.0.2.12", 1);
        let b = udp("10.5.5.0-24", "192.0.2.13", 2);
        let out = c.replace_all([a.clone(), b.clone()]);
        let mut t = PeerTable::new(24, []);
        t.apply(&out.events, &c);
        assert_eq!(t, PeerTable::of_leases(24, c.accepted()));
        assert_eq!(t.len(), 2);
        // A younger lease wanting a's address is rejected: it never enters.
        let thief = udp("10.5.3.0-24", "192.0.2.12", 5);
        let out = c.put(thief.clone());
        assert!(out.events.is_empty() && out.rejected.len() == 1);
        t.apply(&out.events, &c);
        // Even a stray event for it finds nothing in use.
        t.apply(&[crate::cache::LeaseEvent::Added(thief.clone())], &c);
        assert_eq!(t.subnet_of(ip("192.0.2.12")), Some(net("10.5.4.0/24")));
        assert_eq!(t.route(ip("10.5.3.1")), None);
        // Hostile leases: another prefix length, an unset address. Rejected by the cache;
        // the table is untouched.
        let before = t.clone();
        for bad in [udp("10.5.0.0-16", "192.0.2.20", 6), udp("10.5.6.0-24", "0.0.0.0", 7)] {
            let out = c.put(bad.clone());
            assert!(out.events.is_empty(), "{bad:?}");
            t.apply(&[crate::cache::LeaseEvent::Added(bad)], &c);
        }
        assert_eq!(t, before);
        // b moves to a new address: only b's entries change.
        let b2 = udp("10.5.5.0-24", "192.0.2.33", 2);
        let out = c.put(b2.clone());
        assert_eq!(out.events.len(), 1);
        t.apply(&out.events, &c);
        assert_eq!((t.subnet_of(ip("192.0.2.13")), t.subnet_of(ip("192.0.2.33"))), (None, Some(net("10.5.5.0/24"))));
        assert_eq!(t.route(ip("10.5.4.1")), Some(ip("192.0.2.12")));
        // a moves away from its address: the rejected thief (settled first, by key) takes it.
        let a2 = udp("10.5.4.0-24", "192.0.2.44", 1);
        let out = c.put(a2.clone());
        assert_eq!(out.events.len(), 2, "{:?}", out.events);
        t.apply(&out.events, &c);
        assert_eq!(t.subnet_of(ip("192.0.2.12")), Some(net("10.5.3.0/24")));
        assert_eq!(t.subnet_of(ip("192.0.2.44")), Some(net("10.5.4.0/24")));
        assert_eq!(t, PeerTable::of_leases(24, c.accepted()));
        // An older lease takes the address of a younger one; settled first (by key), it
        // enters before the younger leaves: the removal keeps the new holder's mapping.
        let young = udp("10.5.7.0-24", "192.0.2.50", 9);
        let out = c.put(young.clone());
        t.apply(&out.events, &c);
        assert_eq!(t.subnet_of(ip("192.0.2.50")), Some(net("10.5.7.0/24")));
        let old = udp("10.5.6.0-24", "192.0.2.50", 0);
        let out = c.put(old.clone());
        assert_eq!(
            out.events,
            vec![crate::cache::LeaseEvent::Added(old.clone()), crate::cache::LeaseEvent::Removed(young.clone())]
        );
        t.apply(&out.events, &c);
        assert_eq!(t.subnet_of(ip("192.0.2.50")), Some(net("10.5.6.0/24")));
        assert_eq!(t.route(ip("10.5.7.1")), None);
        assert_eq!(t, PeerTable::of_leases(24, c.accepted()));
        assert_eq!(t.len(), 4);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        /// Applying each change's events one peer at a time gives the table a full rebuild
        /// from the accepted leases gives, whatever the order of puts and deletes (shared,
        /// moved and re-used addresses, leases of another backend).
        #[test]
        fn events_applied_one_by_one_equal_a_rebuild(
            ops in proptest::collection::vec((0u8..6, 0u8..4, any::<bool>(), 0i64..30, any::<bool>()), 0..40)
        ) {
            use crate::cache::LeaseCache;
            let mut c = LeaseCache::new(crate::validate::tests::rules());
            let mut t = PeerTable::new(24, []);
            for (sub, addr, udp_type, rev, del) in ops {
                let key = format!("10.5.{}.0-24", sub + 2);
                let out = if del {
                    c.delete(&key.parse().unwrap())
                } else {
                    let l = if udp_type { udp(&key, &format!("192.0.2.{}", 20 + addr), rev) } else {
                        crate::validate::tests::lease(&key, &format!("192.0.2.{}", 20 + addr), rev)
                    };
                    c.put(l)
                };
                t.apply(&out.events, &c);
                prop_assert_eq!(&t, &PeerTable::of_leases(24, c.accepted()));
            }
        }

        /// The receive path never panics on arbitrary bytes from arbitrary senders.
        #[test]
        fn inbound_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..80), from in any::<u32>(), pick in any::<bool>()) {
            let from = if pick { Ipv4Addr::new(192, 0, 2, 12) } else { Ipv4Addr::from(from) };
            if let Ok(n) = inbound(&mut bytes, from, &table(), "10.5.1.0/24".parse().unwrap()) {
                prop_assert!(n <= bytes.len());
            }
            let mut copy = bytes.clone();
            let _ = outbound(&mut copy, &table());
            if let Ok(h) = parse_ipv4(&bytes) {
                let mut out = [0u8; 128];
                let _ = icmp_net_unreachable(&bytes, &h, Ipv4Addr::new(10, 5, 1, 0), &mut out);
            }
        }
    }
}
