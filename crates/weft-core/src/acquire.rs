//! Which subnet a host takes: flannel's order (our public IP's lease, then the previous
//! subnet from the old subnet file, then a random one of the first free ones), with
//! reservations honoured and never handed to another host.

use std::net::Ipv4Addr;

use crate::config::NetworkConfig;
use crate::ipam::{self, FREE_CANDIDATES, overlaps_v4, overlaps_v6};
use crate::lease::{Expiry, Lease, SubnetKey};

/// How the chosen subnet came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// A lease with our public IP exists and fits the config: renew it in place.
    Reuse {
        /// The existing key.
        key: SubnetKey,
        /// It is a reservation: keep it without an expiry.
        reservation: bool,
    },
    /// The subnet from the previous subnet file is free and fits: create it.
    Previous(SubnetKey),
    /// A fresh subnet, chosen at random among the first free ones: create it.
    Fresh(SubnetKey),
    /// The subnet the store assigned to us (Kubernetes: our node's podCIDRs).
    Assigned(SubnetKey),
}

impl Choice {
    /// The subnet(s) chosen.
    pub fn key(&self) -> SubnetKey {
        match *self {
            Choice::Reuse { key, .. } | Choice::Previous(key) | Choice::Fresh(key) | Choice::Assigned(key) => key,
        }
    }
}

/// The decision, with the stale leases of ours to delete first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Leases with our public IP that no longer fit the config.
    pub delete: Vec<SubnetKey>,
    /// What to take.
    pub choice: Choice,
}

/// No subnet can be given to this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    /// Every subnet of the range is leased or reserved.
    #[error(
        "out of subnets: every {family} subnet between SubnetMin and SubnetMax is leased or reserved; widen the Network or SubnetMin/SubnetMax, or delete stale leases (weft leases lists them)"
    )]
    OutOfSubnets {
        /// "IPv4" or "IPv6".
        family: &'static str,
    },
}

/// Whether a lease's subnets fit the config: right families, right lengths, inside the range.
pub fn fits_config(cfg: &NetworkConfig, key: &SubnetKey) -> bool {
    let v4_ok = match (&cfg.v4, &key.v4) {
        (Some(r), Some(n)) => {
            n.prefix_len() == r.subnet_len && n.network() >= r.subnet_min && n.network() <= r.subnet_max
        }
        (None, None) => true,
        _ => false,
    };
    let v6_ok = match (&cfg.v6, &key.v6) {
        (Some(r), Some(n)) => {
            n.prefix_len() == r.subnet_len && n.network() >= r.subnet_min && n.network() <= r.subnet_max
        }
        (None, None) => true,
        _ => false,
    };
    v4_ok && v6_ok
}

fn overlaps(a: &SubnetKey, b: &SubnetKey) -> bool {
    let v4 = matches!((&a.v4, &b.v4), (Some(x), Some(y)) if overlaps_v4(x, y));
    let v6 = matches!((&a.v6, &b.v6), (Some(x), Some(y)) if overlaps_v6(x, y));
    v4 || v6
}

/// Decides which subnet to take. `pick(n)` returns an index below `n` (randomness is the
/// caller's, so this stays deterministic under test).
pub fn plan(
    cfg: &NetworkConfig,
    leases: &[Lease],
    public_ip: Ipv4Addr,
    previous: Option<SubnetKey>,
    pick: &mut dyn FnMut(usize) -> usize,
) -> Result<Plan, AcquireError> {
    let mut delete = Vec::new();
    // Only a real address identifies a host: IPv6-only hosts all have 0.0.0.0.
    if !public_ip.is_unspecified() {
        let mut mine: Vec<&Lease> = leases.iter().filter(|l| l.attrs.public_ip == public_ip).collect();
        // A reservation for our address is the operator's explicit wish: prefer it.
        mine.sort_by_key(|l| l.expiry != Expiry::Reservation);
        for l in mine {
            let reservation = l.expiry == Expiry::Reservation;
            if fits_config(cfg, &l.key) {
                return Ok(Plan { delete, choice: Choice::Reuse { key: l.key, reservation } });
            }
            // A reservation is never deleted by a daemon, even when it no longer fits.
            if !reservation {
                delete.push(l.key);
            }
        }
    }
    let live = |l: &&Lease| !delete.contains(&l.key);
    if let Some(prev) = previous
        && fits_config(cfg, &prev)
        && !leases.iter().filter(live).any(|l| overlaps(&l.key, &prev))
    {
        return Ok(Plan { delete, choice: Choice::Previous(prev) });
    }
    let v4 = match &cfg.v4 {
        None => None,
        Some(r) => {
            let free = ipam::free_v4(r, leases.iter().filter(live).filter_map(|l| l.key.v4), FREE_CANDIDATES);
            if free.is_empty() {
                return Err(AcquireError::OutOfSubnets { family: "IPv4" });
            }
            Some(free[pick(free.len()).min(free.len() - 1)])
        }
    };
    let v6 = match &cfg.v6 {
        None => None,
        Some(r) => {
            let free = ipam::free_v6(r, leases.iter().filter(live).filter_map(|l| l.key.v6), FREE_CANDIDATES);
            if free.is_empty() {
                return Err(AcquireError::OutOfSubnets { family: "IPv6" });
            }
            Some(free[pick(free.len()).min(free.len() - 1)])
        }
    };
    Ok(Plan { delete, choice: Choice::Fresh(SubnetKey { v4, v6 }) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.25.0"}"#).unwrap()
    }

    fn lease(key: &str, ip: [u8; 4], expiry: Expiry) -> Lease {
        Lease { key: key.parse().unwrap(), attrs: LeaseAttrs::new(ip.into()), expiry, revision: 0 }
    }

    fn vector9_leases() -> Vec<Lease> {
        ["10.3.1.0-24", "10.3.2.0-24", "10.3.4.0-24", "10.3.5.0-24", "10.3.31.0-24"]
            .iter()
            .map(|k| lease(k, [1, 1, 1, 1], Expiry::Unknown))
            .collect()
    }

    const ME: Ipv4Addr = Ipv4Addr::new(1, 2, 3, 4);

    #[test]
    fn vector9_fresh_allocation_is_among_the_free_ones() {
        let leases = vector9_leases();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..21 {
            let p = plan(&cfg(), &leases, ME, None, &mut |n| {
                assert_eq!(n, 21, "10.3.3.0 and 10.3.6.0..=10.3.25.0 are free");
                i
            })
            .unwrap();
            let Choice::Fresh(k) = p.choice else { panic!("{p:?}") };
            seen.insert(k.to_string());
        }
        assert!(seen.contains("10.3.3.0-24") && seen.contains("10.3.25.0-24") && !seen.contains("10.3.4.0-24"));
    }

    #[test]
    fn vector9_acquiring_again_reuses_our_lease() {
        let mut leases = vector9_leases();
        leases.push(lease("10.3.9.0-24", [1, 2, 3, 4], Expiry::Unknown));
        let p = plan(&cfg(), &leases, ME, None, &mut |_| unreachable!()).unwrap();
        assert_eq!(p.choice, Choice::Reuse { key: "10.3.9.0-24".parse().unwrap(), reservation: false });
    }

    #[test]
    fn vector9_previous_subnet_is_reused_when_free_and_in_range() {
        let leases = vector9_leases();
        let prev = "10.3.6.0-24".parse().unwrap();
        let p = plan(&cfg(), &leases, ME, Some(prev), &mut |_| unreachable!()).unwrap();
        assert_eq!(p.choice, Choice::Previous(prev));
        let p = plan(&cfg(), &leases, ME, Some("10.4.1.0-24".parse().unwrap()), &mut |_| 0).unwrap();
        assert_eq!(p.choice, Choice::Fresh("10.3.3.0-24".parse().unwrap()));
        // A previous subnet someone else holds now is not taken.
        let p = plan(&cfg(), &leases, ME, Some("10.3.2.0-24".parse().unwrap()), &mut |_| 0).unwrap();
        assert_eq!(p.choice, Choice::Fresh("10.3.3.0-24".parse().unwrap()));
    }

    #[test]
    fn our_lease_that_no_longer_fits_is_replaced() {
        let leases = vec![lease("10.3.200.0-24", [1, 2, 3, 4], Expiry::Unknown)];
        let p = plan(&cfg(), &leases, ME, None, &mut |_| 0).unwrap();
        assert_eq!(p.delete, vec!["10.3.200.0-24".parse().unwrap()]);
        assert_eq!(p.choice, Choice::Fresh("10.3.1.0-24".parse().unwrap()));
    }

    #[test]
    fn reservations_are_honoured_and_never_given_away() {
        let mine = lease("10.3.7.0-24", [1, 2, 3, 4], Expiry::Reservation);
        let p = plan(&cfg(), std::slice::from_ref(&mine), ME, None, &mut |_| 0).unwrap();
        assert_eq!(p.choice, Choice::Reuse { key: mine.key, reservation: true });

        let theirs = lease("10.3.1.0-24", [9, 9, 9, 9], Expiry::Reservation);
        let p = plan(&cfg(), std::slice::from_ref(&theirs), ME, Some(theirs.key), &mut |_| 0).unwrap();
        assert_eq!(p.choice, Choice::Fresh("10.3.2.0-24".parse().unwrap()));

        // Our reservation outside the range is left alone, not deleted.
        let odd = lease("10.3.99.0-24", [1, 2, 3, 4], Expiry::Reservation);
        let p = plan(&cfg(), &[odd], ME, None, &mut |_| 0).unwrap();
        assert!(p.delete.is_empty());
    }

    #[test]
    fn a_full_range_is_an_error_that_says_what_to_do() {
        let c = NetworkConfig::parse(r#"{"Network":"10.0.0.0/28"}"#).unwrap();
        let leases: Vec<Lease> = ["10.0.0.4-30", "10.0.0.8-30", "10.0.0.12-30"]
            .iter()
            .map(|k| lease(k, [1, 1, 1, 1], Expiry::Unknown))
            .collect();
        let e = plan(&c, &leases, ME, None, &mut |_| 0).unwrap_err();
        assert!(e.to_string().contains("out of subnets"));
    }

    #[test]
    fn dual_stack_allocates_both_families() {
        let c =
            NetworkConfig::parse(r#"{"Network":"10.3.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:1::/56"}"#).unwrap();
        let p = plan(&c, &[], ME, None, &mut |_| 0).unwrap();
        assert_eq!(p.choice.key().to_string(), "10.3.1.0-24&fd00:1:0:1::-64");
    }
}
