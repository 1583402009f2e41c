// SPDX-License-Identifier: MIT OR GPL-2.0
//
// The udp backend's kernel fast path: flannel's wire format (one raw inner IPv4 packet per
// UDP datagram, port 8285 both ends) encapsulated and decapsulated by two tc programs, so a
// packet between pods on two hosts never leaves the kernel's softirq, as with vxlan.
//
// weft_udp_egress  (tcx egress of flannel0): a packet routed to flannel0 whose destination
//                  subnet is a known peer gets an outer IPv4/UDP header and is redirected to
//                  the external interface (the kernel's FIB and neighbour table pick the
//                  next hop). TCP super-packets stay whole: the outer header is marked as a
//                  UDP tunnel, so the kernel segments them like vxlan's.
// weft_udp_ingress (tcx ingress of the external interface): a datagram to our address and
//                  port, from a known peer, whose inner source lies in that peer's subnet and
//                  whose inner destination lies in ours, loses its outer header and enters
//                  flannel0 as if read from it. GRO-merged datagrams go to the engine.
//                  A peer's TCP super-packet (one that crossed a veth whole) takes a detour
//                  instead: rewritten into a VXLAN packet to our own receive device.
// weft_udp_rx      (tcx ingress of that device, weft-udp-rx): what the kernel's VXLAN
//                  receive path hands on enters flannel0 as if read from it.
//
// Why the detour: a super-packet decapsulated here keeps the kernel's tunnel marks
// (skb->encapsulation, SKB_GSO_UDP_TUNNEL), which no BPF helper clears, and a bridge on
// the way to the pod (cni0) has no tunnel offloads, so it splits the packet in software
// and the pod receives it one segment at a time: a third of vxlan's throughput, measured.
// The VXLAN receive path (iptunnel_pull_header) clears the marks, so the packet stays
// whole to the pod, as vxlan's own do.
//
// Everything else is left to the user-space engine, which applies the same checks, counts
// drops and answers unroutable packets with ICMP: egress returns TC_ACT_OK (the packet goes
// on into flannel0's queue, where the engine reads it) and ingress TC_ACT_UNSPEC (the next
// program, then the stack, then the engine's socket). The checks mirror weft-core's
// packet::outbound and packet::inbound, including the TTL decrement flannel's proxy does.
//
// Built by crates/weft/build.rs with `clang -O2 -target bpf`; the maps are created by
// crates/weft/src/udp/fastpath.rs (sized at run time), which patches their descriptors
// into the map references of the programs by symbol name.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>

#define SEC(name) __attribute__((section(name), used))
#define INLINE static inline __attribute__((always_inline))

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) =
    (void *)BPF_FUNC_skb_load_bytes;
static long (*bpf_skb_store_bytes)(void *skb, __u32 offset, const void *from, __u32 len, __u64 flags) =
    (void *)BPF_FUNC_skb_store_bytes;
static long (*bpf_l3_csum_replace)(void *skb, __u32 offset, __u64 from, __u64 to, __u64 size) =
    (void *)BPF_FUNC_l3_csum_replace;
static long (*bpf_skb_adjust_room)(void *skb, __s32 len_diff, __u32 mode, __u64 flags) =
    (void *)BPF_FUNC_skb_adjust_room;
static long (*bpf_skb_change_head)(void *skb, __u32 len, __u64 flags) = (void *)BPF_FUNC_skb_change_head;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)BPF_FUNC_redirect;
static long (*bpf_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
    (void *)BPF_FUNC_redirect_neigh;

// Map shapes are set by the loader; these definitions only name the maps for relocation.
struct map_def {
    __u32 type;
    __u32 key_size;
    __u32 value_size;
    __u32 max_entries;
    __u32 map_flags;
};

// Key 0: struct config.
struct map_def weft_config SEC("maps") = {BPF_MAP_TYPE_ARRAY, 4, sizeof(__u32) * 13, 1, 0};
// Masked peer subnet (network order) -> the peer's public address (network order).
struct map_def weft_by_subnet SEC("maps") = {BPF_MAP_TYPE_HASH, 4, 4, 1, 0};
// A peer's public address -> struct peer_subnet.
struct map_def weft_by_public SEC("maps") = {BPF_MAP_TYPE_HASH, 4, 8, 1, 0};
// Per-CPU packet counters, indexed by enum stat.
struct map_def weft_stats SEC("maps") = {BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 4, 0};

// All addresses and masks in network byte order; the layout is shared with fastpath.rs.
struct config {
    __u32 own_net;      // our subnet
    __u32 own_mask;
    __u32 subnet_mask;  // the mask of every lease's subnet
    __u32 local_ip;     // the address the engine's socket is bound to
    __u32 ext_ifindex;  // the external interface
    __u32 tun_ifindex;  // flannel0
    __u32 port;         // UDP port, network order in the low 16 bits
    __u32 l2_len;       // link-layer header length on the external interface (14 or 0)
    __u32 rx_port;      // the receive device's UDP port, network order; 0: no device
    __u32 rx_vni;       // its VNI as the second word of the VXLAN header (network order)
    __u32 rx_on;        // super-packets take the detour (turned off when it is blocked)
    __u8 rx_mac[8];     // its MAC (6 bytes, 2 of padding)
};

struct peer_subnet {
    __u32 net;
    __u32 mask;
};

enum stat { STAT_TX = 0, STAT_RX = 1, STAT_DETOUR = 2, STAT_RX_DETOURED = 3 };

struct ipv4 {
    __u8 ver_ihl;
    __u8 tos;
    __u16 tot_len;
    __u16 id;
    __u16 frag_off;
    __u8 ttl;
    __u8 protocol;
    __u16 check;
    __u32 saddr;
    __u32 daddr;
};

// The outer headers: IPv4 (no options) and UDP.
struct outer {
    struct ipv4 ip;
    __u16 sport;
    __u16 dport;
    __u16 ulen;
    __u16 ucheck;
};
_Static_assert(sizeof(struct outer) == 28, "no padding: the struct is the bytes on the wire");

// The detour's headers: the outer IPv4 and UDP (to the receive device's port), VXLAN, and
// an Ethernet header to the receive device.
struct __attribute__((packed)) detour {
    struct outer o;
    __u32 vx_flags; // 0x08000000: a VNI is present
    __u32 vx_vni;
    __u8 dst[6];
    __u8 src[6];
    __u16 proto;
};
_Static_assert(sizeof(struct detour) == 50, "no padding: the struct is the bytes on the wire");
#define DETOUR_GROWTH (sizeof(struct detour) - sizeof(struct outer))

INLINE void count(enum stat s) {
    __u32 k = s;
    __u64 *c = bpf_map_lookup_elem(&weft_stats, &k);
    if (c)
        *c += 1;
}

INLINE __u16 ip_checksum(const struct ipv4 *o) {
    const __u16 *w = (const __u16 *)o;
    __u32 sum = 0;
#pragma unroll
    for (int i = 0; i < 10; i++)
        sum += w[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (__u16)~sum;
}

// The TTL of the inner header at `off` goes down by one, its checksum follows.
INLINE int decrement_ttl(struct __sk_buff *skb, __u32 off, __u8 ttl) {
    __u8 next = ttl - 1;
    // The TTL is the high byte of the 16-bit word at offset 8 (the protocol the low one,
    // unchanged): replacing the byte as a 2-byte value with a zero partner is exact.
    if (bpf_l3_csum_replace(skb, off + 10, __builtin_bswap16((__u16)ttl << 8), __builtin_bswap16((__u16)next << 8), 2))
        return -1;
    return bpf_skb_store_bytes(skb, off + 8, &next, 1, 0) ? -1 : 0;
}

SEC("tc/egress")
int weft_udp_egress(struct __sk_buff *skb) {
    __u32 zero = 0;
    struct config *cfg = bpf_map_lookup_elem(&weft_config, &zero);
    if (!cfg || skb->protocol != __builtin_bswap16(ETH_P_IP))
        return TC_ACT_OK;
    struct ipv4 ip;
    if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
        return TC_ACT_OK;
    if ((ip.ver_ihl >> 4) != 4 || (ip.ver_ihl & 0xf) < 5 || ip.ttl <= 1)
        return TC_ACT_OK;
    __u32 subnet = ip.daddr & cfg->subnet_mask;
    __u32 *peer = bpf_map_lookup_elem(&weft_by_subnet, &subnet);
    if (!peer)
        return TC_ACT_OK; // the engine answers with ICMP net unreachable
    __u32 len = skb->len;
    if (len + sizeof(struct outer) > 0xffff)
        return TC_ACT_OK; // the outer length field cannot hold it: the engine splits it
    struct outer o = {
        .ip =
            {
                .ver_ihl = 0x45,
                .tot_len = __builtin_bswap16((__u16)(len + sizeof(struct outer))),
                .frag_off = __builtin_bswap16(0x4000), // DF, as a UDP socket sends
                .ttl = 64,
                .protocol = IPPROTO_UDP,
                .saddr = cfg->local_ip,
                .daddr = *peer,
            },
        .sport = (__u16)cfg->port,
        .dport = (__u16)cfg->port,
        .ulen = __builtin_bswap16((__u16)(len + 8)),
        .ucheck = 0, // no UDP checksum (IPv4), as the kernel's tunnels default to
    };
    o.ip.check = ip_checksum(&o.ip);
    // The inner packets already fit flannel0's MTU (the external one less these 28 bytes):
    // segments keep their size.
    __u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP;
    if (bpf_skb_adjust_room(skb, sizeof(struct outer), BPF_ADJ_ROOM_MAC, flags))
        return TC_ACT_OK; // e.g. a UDP GSO packet: the engine splits it
    if (bpf_skb_store_bytes(skb, 0, &o, sizeof(o), 0) || decrement_ttl(skb, sizeof(o), ip.ttl))
        return TC_ACT_SHOT; // the packet is half rewritten: it cannot go on
    // bpf_redirect_neigh replaces a link-layer header with the next hop's: flannel0 has
    // none, so a blank one (unicast, IPv4) goes in front first.
    if (bpf_skb_change_head(skb, ETH_HLEN, 0))
        return TC_ACT_SHOT;
    struct ethhdr eth = {.h_proto = __builtin_bswap16(ETH_P_IP)};
    if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0))
        return TC_ACT_SHOT;
    count(STAT_TX);
    return bpf_redirect_neigh(cfg->ext_ifindex, 0, 0, 0);
}

SEC("tc/ingress")
int weft_udp_ingress(struct __sk_buff *skb) {
    __u32 zero = 0;
    struct config *cfg = bpf_map_lookup_elem(&weft_config, &zero);
    if (!cfg || skb->protocol != __builtin_bswap16(ETH_P_IP))
        return TC_ACT_UNSPEC;
    __u32 l2 = cfg->l2_len & 0xff;
    struct outer o;
    if (bpf_skb_load_bytes(skb, l2, &o, sizeof(o)))
        return TC_ACT_UNSPEC;
    // Only a plain 20-byte header, unfragmented, UDP to our address and port.
    if (o.ip.ver_ihl != 0x45 || o.ip.protocol != IPPROTO_UDP || (o.ip.frag_off & __builtin_bswap16(0x3fff)))
        return TC_ACT_UNSPEC;
    // The receive device's port is ours alone: only the detour below may reach it.
    if (cfg->rx_port && o.dport == (__u16)cfg->rx_port)
        return TC_ACT_SHOT;
    if (o.ip.daddr != cfg->local_ip || o.dport != (__u16)cfg->port)
        return TC_ACT_UNSPEC;
    struct peer_subnet *peer = bpf_map_lookup_elem(&weft_by_public, &o.ip.saddr);
    if (!peer)
        return TC_ACT_UNSPEC; // the engine counts it as from an unknown peer
    struct ipv4 ip;
    __u32 inner = l2 + sizeof(struct outer);
    if (bpf_skb_load_bytes(skb, inner, &ip, sizeof(ip)))
        return TC_ACT_UNSPEC;
    if ((ip.ver_ihl >> 4) != 4 || (ip.ver_ihl & 0xf) < 5 || ip.ttl <= 1 ||
        (ip.saddr & peer->mask) != peer->net || (ip.daddr & cfg->own_mask) != cfg->own_net)
        return TC_ACT_UNSPEC;
    // The datagram must hold exactly its inner packet: one datagram (the engine trims
    // trailing bytes, we do not), or a peer's TCP super-packet that crossed a veth whole.
    // GRO-merged datagrams (several packets) fail this and go to the engine, which splits
    // them.
    if (__builtin_bswap16(ip.tot_len) != skb->len - inner)
        return TC_ACT_UNSPEC;
    __u32 tot = __builtin_bswap16(o.ip.tot_len);
    if (skb->gso_size && cfg->rx_on && cfg->rx_port && tot + DETOUR_GROWTH <= 0xffff) {
        // A super-packet: to the receive device as VXLAN (see the top of this file). The
        // room goes in front of the outer header, which is then written whole, longer.
        if (bpf_skb_adjust_room(skb, DETOUR_GROWTH, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
            return TC_ACT_UNSPEC;
        struct outer out = o;
        out.ip.tot_len = __builtin_bswap16((__u16)(tot + DETOUR_GROWTH));
        out.ip.check = 0;
        out.ip.check = ip_checksum(&out.ip);
        out.dport = (__u16)cfg->rx_port;
        out.ulen = __builtin_bswap16((__u16)(__builtin_bswap16(o.ulen) + DETOUR_GROWTH));
        out.ucheck = 0;
        struct detour d = {
            .o = out,
            .vx_flags = __builtin_bswap32(0x08000000),
            .vx_vni = cfg->rx_vni,
            .proto = __builtin_bswap16(ETH_P_IP),
        };
        __builtin_memcpy(d.dst, cfg->rx_mac, 6);
        // Any source but the device's own address (VXLAN drops those as loops).
        __builtin_memcpy(d.src, cfg->rx_mac, 6);
        d.src[5] ^= 1;
        if (bpf_skb_store_bytes(skb, l2, &d, sizeof(d), 0) || decrement_ttl(skb, l2 + sizeof(d), ip.ttl))
            return TC_ACT_SHOT; // half rewritten: it cannot go on
        count(STAT_DETOUR);
        return TC_ACT_OK;
    }
    // A single packet, or a super-packet without the detour: the outer header goes. (A
    // super-packet keeps its segment size, its segments already fit flannel0, and the
    // tunnel marks, so a bridge splits it in software.)
    if (bpf_skb_adjust_room(skb, -(__s32)sizeof(struct outer), BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
        return TC_ACT_UNSPEC;
    if (decrement_ttl(skb, l2, ip.ttl))
        return TC_ACT_SHOT;
    count(STAT_RX);
    return bpf_redirect(cfg->tun_ifindex, BPF_F_INGRESS);
}

SEC("tc/rx")
int weft_udp_rx(struct __sk_buff *skb) {
    __u32 zero = 0;
    struct config *cfg = bpf_map_lookup_elem(&weft_config, &zero);
    // With the detour off nothing of ours comes this way.
    if (!cfg || !cfg->rx_on)
        return TC_ACT_SHOT;
    // Counted on arrival, before the checks: the watchdog in fastpath.rs compares it with
    // what was sent here to see whether the way is open.
    count(STAT_RX_DETOURED);
    if (skb->protocol != __builtin_bswap16(ETH_P_IP))
        return TC_ACT_SHOT;
    // Only the detour reaches the device's port (the ingress program drops the port's
    // datagrams from outside on the external interface, and a random VNI guards it on any
    // other): the checks were made there; what is left is that the packet is still one
    // between a known peer's subnet and ours.
    struct ipv4 ip;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
        return TC_ACT_SHOT;
    __u32 subnet = ip.saddr & cfg->subnet_mask;
    if ((ip.ver_ihl >> 4) != 4 || !bpf_map_lookup_elem(&weft_by_subnet, &subnet) ||
        (ip.daddr & cfg->own_mask) != cfg->own_net)
        return TC_ACT_SHOT;
    return bpf_redirect(cfg->tun_ifindex, BPF_F_INGRESS);
}

char _license[] SEC("license") = "Dual MIT/GPL";
