//! Taking a subnet lease from any registry: flannel's order of preference, and on a lost
//! create race a retry with another subnet (flannel exits instead).

use std::time::Duration;

use rand::Rng;
use weft_core::acquire::{self, AcquireError, Choice};
use weft_core::config::NetworkConfig;
use weft_core::lease::{Expiry, Lease, LeaseAttrs, SubnetKey};

use super::{Registry, RegistryError};

/// How many times to re-plan after losing a race before giving up.
const ATTEMPTS: usize = 50;

/// Why no lease could be taken.
#[derive(Debug, thiserror::Error)]
pub enum AcquireFailed {
    /// The store failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// No subnet is free.
    #[error(transparent)]
    Plan(#[from] AcquireError),
    /// Other hosts kept winning the races for free subnets.
    #[error("lost the race for a free subnet {0} times in a row; too many hosts are starting at once, try again")]
    Contended(usize),
}

/// Our lease as taken.
#[derive(Debug, Clone)]
pub struct Acquired {
    /// The lease (our attributes, our key).
    pub lease: Lease,
    /// How it was chosen.
    pub choice: Choice,
}

/// Takes a lease for `attrs`, preferring our existing lease, then `previous`.
pub async fn acquire<R: Registry>(
    reg: &R,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<SubnetKey>,
    ttl: Duration,
) -> Result<Acquired, AcquireFailed> {
    if let Some(key) = reg.assigned(cfg).await? {
        // The store's subnet is ours; writing our attributes to it is all there is to take.
        reg.renew(&key, attrs, None).await?;
        let lease = Lease { key, attrs: attrs.clone(), expiry: Expiry::Reservation, revision: 0 };
        return Ok(Acquired { lease, choice: Choice::Assigned(key) });
    }
    let mut previous = previous;
    for attempt in 0..ATTEMPTS {
        let listing = reg.list().await?;
        let p =
            acquire::plan(cfg, &listing.leases, attrs.public_ip, previous, &mut |n| rand::rng().random_range(0..n))?;
        for stale in &p.delete {
            tracing::info!(subnet = %stale, "deleting our old lease, which no longer fits the network config");
            reg.delete(stale).await?;
        }
        let key = p.choice.key();
        let taken = match p.choice {
            Choice::Reuse { reservation, .. } => match reg.renew(&key, attrs, (!reservation).then_some(ttl)).await {
                Ok(()) => true,
                Err(RegistryError::Lost(_)) => false,
                Err(e) => return Err(e.into()),
            },
            Choice::Previous(_) | Choice::Fresh(_) | Choice::Assigned(_) => reg.create(&key, attrs, ttl).await?,
        };
        if taken {
            let expiry = match p.choice {
                Choice::Reuse { reservation: true, .. } => Expiry::Reservation,
                _ => Expiry::At(std::time::SystemTime::now() + ttl),
            };
            return Ok(Acquired { lease: Lease { key, attrs: attrs.clone(), expiry, revision: 0 }, choice: p.choice });
        }
        tracing::info!(subnet = %key, attempt, "another host took this subnet first; choosing again");
        if matches!(p.choice, Choice::Previous(_)) {
            previous = None;
        }
        // Spread the retries of hosts that collided so they do not collide again.
        let jitter = rand::rng().random_range(0..20u64 * (attempt as u64 + 1));
        tokio::time::sleep(Duration::from_millis(jitter)).await;
    }
    Err(AcquireFailed::Contended(ATTEMPTS))
}
