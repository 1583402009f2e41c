//! Where leases live: the `Registry` trait in store terms, its two implementations (etcd v3
//! and the embedded local store), and the store-independent logic on top of them
//! (acquisition with retries, the resumable lease watch).

pub mod acquire;
pub mod etcd;
pub mod kube;
pub mod local;
pub mod watch;

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use weft_core::lease::{Lease, LeaseAttrs, SubnetKey};

/// flannel's lease lifetime: 24 hours.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The environment variable that shortens the lease lifetime, in seconds, for tests of
/// expiry and partitions only (never set it in production: a host whose lease runs out while
/// it cannot reach the store shuts down).
pub const TEST_LEASE_TTL_ENV: &str = "WEFT_TEST_LEASE_TTL_SECS";

/// The lease lifetime: [`LEASE_TTL`], or the test-only [`TEST_LEASE_TTL_ENV`] (at least 2 s).
pub fn lease_ttl() -> Duration {
    std::env::var(TEST_LEASE_TTL_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.max(2)))
        .unwrap_or(LEASE_TTL)
}

/// Whether a stored lease's attributes `theirs` name the same host as `ours`: the same
/// PublicIP and, when we have one, the same PublicIPv6 (in an IPv6-only network every host's
/// PublicIP may be the same placeholder, so PublicIPv6 is what tells hosts apart).
pub fn same_holder(ours: &LeaseAttrs, theirs: &LeaseAttrs) -> bool {
    ours.public_ip == theirs.public_ip && (ours.public_ipv6.is_none() || ours.public_ipv6 == theirs.public_ipv6)
}

/// A store problem, with what the operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The store could not be reached or answered with an error.
    #[error(
        "{store} request failed: {detail}; check that the store is running and reachable (--etcd-endpoints, TLS and credentials)"
    )]
    Unavailable {
        /// "etcd" or "local store".
        store: &'static str,
        /// The underlying error.
        detail: String,
    },
    /// There is no network config.
    #[error("{0}")]
    ConfigMissing(String),
    /// The client could not be set up (bad endpoint, bad certificate files).
    #[error("{0}")]
    Setup(String),
    /// Our lease is now held by another host or was deleted; we must not use it.
    #[error("lease {0} is held by another host now")]
    Lost(SubnetKey),
    /// The Kubernetes API server could not be reached or answered with an error.
    #[error(
        "Kubernetes API request failed: {0}; check that the API server is reachable (--kube-api-url, --kubeconfig-file or the in-cluster service account) and that weft may get, list and watch nodes and patch nodes/status"
    )]
    Kube(String),
    /// The store has no subnet for us yet (Kubernetes: no podCIDR); wait for it.
    #[error("{0}")]
    NotAssigned(String),
}

impl RegistryError {
    /// Whether waiting and trying again can help (the store is down, or has not assigned our
    /// subnet yet), as opposed to a setup or config problem.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unavailable { .. } | RegistryError::Kube(_) | RegistryError::NotAssigned(_))
    }
}

/// A lease list at one store revision. Entries that do not parse are skipped with a warning.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The parsed leases (reservations included).
    pub leases: Vec<Lease>,
    /// The store revision of this view; a watch resumes after it.
    pub revision: i64,
}

/// One change under the subnets prefix.
#[derive(Debug, Clone)]
pub enum Change {
    /// A lease was written.
    Put(Lease),
    /// A lease was deleted or expired.
    Delete(SubnetKey),
}

/// What a watch delivers.
#[derive(Debug)]
pub enum WatchItem {
    /// Changes up to and including `revision`.
    Changes {
        /// The store revision of the last change.
        revision: i64,
        /// The changes, in order.
        changes: Vec<Change>,
    },
    /// The requested start revision was compacted away: re-list.
    Compacted,
    /// The watch broke (connection lost); reconnect from the last revision.
    Broken(String),
    /// The store answered (no change): the watch is alive and following.
    Progress,
}

/// The store operations weft needs, in lease terms.
pub trait Registry: Send + Sync + 'static {
    /// A short name for logs ("etcd", "local").
    fn name(&self) -> &'static str;

    /// The network config text (`<prefix>/config`).
    fn network_config(&self) -> impl Future<Output = Result<String, RegistryError>> + Send;

    /// All leases and the revision of that view.
    fn list(&self) -> impl Future<Output = Result<Listing, RegistryError>> + Send;

    /// Creates `key` only if absent, with a lease of `ttl`. `Ok(false)` when it exists.
    fn create(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;

    /// Writes our attributes to `key` with a fresh lease of `ttl` (`None`: keep it a
    /// reservation, without expiry), provided the key is absent or still carries our public
    /// IP. Otherwise `Err(Lost)`: the subnet went to another host and must not be taken back.
    fn renew(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Deletes `key`.
    fn delete(&self, key: &SubnetKey) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Watches the subnets from `from_revision` (inclusive).
    fn watch(
        &self,
        from_revision: i64,
    ) -> impl Future<Output = Result<mpsc::Receiver<WatchItem>, RegistryError>> + Send;

    /// Fills in expiry times that a list left `Unknown` (for display).
    fn resolve_expiry(&self, leases: &mut [Lease]) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// The subnet the store assigns to us, for stores that assign it (Kubernetes: our node's
    /// podCIDRs; `Err(NotAssigned)` while there is none), or `None` where we take one from the
    /// network config ourselves (etcd, local). An assigned lease never expires; `renew`
    /// writes our attributes to it.
    fn assigned(
        &self,
        _cfg: &weft_core::config::NetworkConfig,
    ) -> impl Future<Output = Result<Option<SubnetKey>, RegistryError>> + Send {
        async { Ok(None) }
    }

    /// Public addresses the store sets for us, overriding `--public-ip` / `--public-ipv6`
    /// (Kubernetes: our node's `node-public-ip` / `node-public-ipv6` annotations).
    fn public_ip_overrides(
        &self,
    ) -> impl Future<Output = Result<(Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>), RegistryError>> + Send
    {
        async { Ok((None, None)) }
    }

    /// Tells the store the daemon is up (flanneld's CompleteLease; Kubernetes: the node's
    /// NetworkUnavailable=False condition). Never blocks the daemon.
    fn up(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Parses one stored entry, logging (not failing) when another host wrote garbage.
pub(crate) fn parse_entry(store: &str, key_suffix: &str, value: &str) -> Option<(SubnetKey, LeaseAttrs)> {
    let key = match key_suffix.parse::<SubnetKey>() {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(store, "skipping lease: {e}");
            return None;
        }
    };
    match LeaseAttrs::from_json(value) {
        Ok(a) => Some((key, a)),
        Err(e) => {
            tracing::warn!(store, key = %key, "skipping lease with unreadable value: {e}");
            None
        }
    }
}
