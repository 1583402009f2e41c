//! The udp backend's packet logic, without I/O: which peer an inner IPv4 packet goes to,
//! which datagrams to accept, TTL handling with an incremental checksum fix, and the ICMP
//! "network unreachable" flannel answers with. Every function takes untrusted bytes and
//! never panics.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

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
#[derive(Debug, Clone, Default)]
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

impl PeerTable {
    /// Builds the table from (subnet, public IP) pairs; subnets of another length than
    /// `prefix` are ignored (they cannot come from a valid config).
    pub fn new(prefix: u8, peers: impl IntoIterator<Item = (Ipv4Net, Ipv4Addr)>) -> Self {
        let mut t = PeerTable { prefix, ..Default::default() };
        for (net, ip) in peers {
            if net.prefix_len() == prefix && !ip.is_unspecified() {
                t.by_subnet.insert(u32::from(net.network()), ip);
                t.by_public.insert(ip, net);
            }
        }
        t
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
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
