//! Subnet arithmetic: which subnets of a range are free, family-independent on `u128`.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::config::{V4Range, V6Range};

/// flannel picks uniformly among at most this many free subnets, lowest first.
pub const FREE_CANDIDATES: usize = 100;

/// A block of addresses `[start, end]` in integer form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Block {
    start: u128,
    end: u128,
}

fn block(bits: u8, base: u128, prefix: u8) -> Block {
    let host_bits = u32::from(bits - prefix);
    let host = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
    let start = base & !host;
    Block { start, end: start | host }
}

/// Walks `[min, max]` in steps of `2^(bits-len)` and returns up to `limit` subnet bases that
/// overlap none of `taken`. Jumps over taken blocks, so the cost is bounded by
/// `taken.len() + limit`, not by the size of the range.
fn free_bases(bits: u8, len: u8, min: u128, max: u128, taken: &mut [Block], limit: usize) -> Vec<u128> {
    taken.sort_unstable();
    let size_mask = block(bits, 0, len).end;
    let mut out = Vec::new();
    let mut next = 0usize;
    let mut cand = min;
    while cand <= max && out.len() < limit {
        let cand_end = cand | size_mask;
        while next < taken.len() && taken[next].end < cand {
            next += 1;
        }
        // Several taken blocks may start before cand_end; the one reaching furthest decides.
        let mut blocked_until: Option<u128> = None;
        let mut i = next;
        while i < taken.len() && taken[i].start <= cand_end {
            if taken[i].end >= cand {
                blocked_until = Some(blocked_until.map_or(taken[i].end, |b| b.max(taken[i].end)));
            }
            i += 1;
        }
        match blocked_until {
            None => {
                out.push(cand);
                match cand_end.checked_add(1) {
                    Some(n) => cand = n,
                    None => break,
                }
            }
            Some(end) => match end.checked_add(1).and_then(|n| n.checked_add(size_mask)) {
                // Round up to the next subnet boundary after the taken block.
                Some(n) => cand = n & !size_mask,
                None => break,
            },
        }
    }
    out
}

/// Up to `limit` free IPv4 subnets of the configured range, lowest first.
pub fn free_v4(range: &V4Range, taken: impl IntoIterator<Item = Ipv4Net>, limit: usize) -> Vec<Ipv4Net> {
    let mut blocks: Vec<Block> =
        taken.into_iter().map(|n| block(32, u128::from(u32::from(n.network())), n.prefix_len())).collect();
    free_bases(
        32,
        range.subnet_len,
        u128::from(u32::from(range.subnet_min)),
        u128::from(u32::from(range.subnet_max)),
        &mut blocks,
        limit,
    )
    .into_iter()
    .map(|b| Ipv4Net::new(Ipv4Addr::from(b as u32), range.subnet_len).expect("length validated by config"))
    .collect()
}

/// Up to `limit` free IPv6 subnets of the configured range, lowest first.
pub fn free_v6(range: &V6Range, taken: impl IntoIterator<Item = Ipv6Net>, limit: usize) -> Vec<Ipv6Net> {
    let mut blocks: Vec<Block> =
        taken.into_iter().map(|n| block(128, u128::from(n.network()), n.prefix_len())).collect();
    free_bases(128, range.subnet_len, u128::from(range.subnet_min), u128::from(range.subnet_max), &mut blocks, limit)
        .into_iter()
        .map(|b| Ipv6Net::new(Ipv6Addr::from(b), range.subnet_len).expect("length validated by config"))
        .collect()
}

/// Whether two IPv4 networks share an address.
pub fn overlaps_v4(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Whether two IPv6 networks share an address.
pub fn overlaps_v6(a: &Ipv6Net, b: &Ipv6Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::config::NetworkConfig;

    fn range(text: &str) -> V4Range {
        NetworkConfig::parse(text).unwrap().v4.unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn skips_taken_subnets_and_stays_in_range() {
        let r = range(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.25.0"}"#);
        let taken = ["10.3.1.0/24", "10.3.2.0/24", "10.3.4.0/24", "10.3.5.0/24", "10.3.31.0/24"].map(net);
        let free = free_v4(&r, taken, 100);
        let mut want = vec![net("10.3.3.0/24")];
        want.extend((6..=25).map(|i| Ipv4Net::new(Ipv4Addr::new(10, 3, i, 0), 24).unwrap()));
        assert_eq!(free, want);
    }

    #[test]
    fn a_larger_taken_block_is_jumped_over() {
        let r = range(r#"{"Network":"10.0.0.0/8"}"#);
        let free = free_v4(&r, [net("10.0.0.0/9")], 2);
        assert_eq!(free, vec![net("10.128.0.0/24"), net("10.128.1.0/24")]);
        let v6 = NetworkConfig::parse(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/16"}"#)
            .unwrap()
            .v6
            .unwrap();
        let free = free_v6(&v6, ["fc00::/17".parse().unwrap()], 1);
        assert_eq!(free, vec!["fc00:8000::/64".parse::<Ipv6Net>().unwrap()]);
    }

    #[test]
    fn a_full_range_has_nothing_free() {
        let r = range(r#"{"Network":"10.0.0.0/28"}"#);
        let taken = ["10.0.0.4/30", "10.0.0.8/30", "10.0.0.12/30"].map(net);
        assert!(free_v4(&r, taken, 100).is_empty());
        let r = range(r#"{"Network":"255.255.255.0/24"}"#);
        // The top of the address space ends the walk without overflow: /26s .64, .128, .192.
        assert_eq!(free_v4(&r, [], 100).len(), 3);
    }

    proptest! {
        /// The allocator never offers a subnet outside [SubnetMin, SubnetMax], of the wrong
        /// length, misaligned, or overlapping anything already taken.
        #[test]
        fn free_subnets_are_in_range_and_disjoint(
            prefix in 8u8..=20,
            extra in 2u8..=8,
            taken in proptest::collection::vec((any::<u32>(), 8u8..=30), 0..60),
            limit in 1usize..150,
        ) {
            let len = prefix + extra;
            let cfg = format!(r#"{{"Network":"10.0.0.0/{prefix}","SubnetLen":{len}}}"#);
            let r = range(&cfg);
            let taken: Vec<Ipv4Net> = taken
                .into_iter()
                .map(|(bits, l)| Ipv4Net::new(Ipv4Addr::from(0x0A00_0000 | (bits >> 8)), l).unwrap().trunc())
                .collect();
            let free = free_v4(&r, taken.clone(), limit);
            prop_assert!(free.len() <= limit);
            for (i, f) in free.iter().enumerate() {
                prop_assert_eq!(f.prefix_len(), len);
                prop_assert_eq!(f.network(), f.trunc().network());
                prop_assert!(f.network() >= r.subnet_min && f.network() <= r.subnet_max);
                for t in &taken {
                    prop_assert!(!overlaps_v4(f, t), "{} overlaps taken {}", f, t);
                }
                if i > 0 {
                    prop_assert!(free[i - 1].network() < f.network());
                }
            }
            // Completeness: if fewer than `limit` were returned, no other candidate is free.
            if free.len() < limit {
                let step = 1u32 << (32 - len);
                let mut c = u32::from(r.subnet_min);
                let mut count = 0;
                while c <= u32::from(r.subnet_max) {
                    let n = Ipv4Net::new(Ipv4Addr::from(c), len).unwrap();
                    if !taken.iter().any(|t| overlaps_v4(&n, t)) { count += 1; }
                    c = match c.checked_add(step) { Some(c) => c, None => break };
                }
                prop_assert_eq!(count, free.len());
            }
        }
    }
}
