//! The etcd v3 store, in flannel's layout: `<prefix>/config` and `<prefix>/subnets/<key>`,
//! each lease key attached to an etcd lease.

use std::time::{Duration, SystemTime};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use weft_core::lease::{Expiry, Lease, LeaseAttrs, SubnetKey};

use super::{Change, Listing, Registry, RegistryError, WatchItem, parse_entry};

/// How to reach etcd (flanneld's `--etcd-*` flags).
#[derive(Clone, Default)]
pub struct EtcdOptions {
    /// Endpoint URLs.
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/coreos.com/network`.
    pub prefix: String,
    /// Client key file (TLS needs both key and cert).
    pub keyfile: String,
    /// Client certificate file.
    pub certfile: String,
    /// CA certificate file.
    pub cafile: String,
    /// Basic-auth user.
    pub username: String,
    /// Basic-auth password.
    pub password: String,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password must never reach a log.
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("keyfile", &self.keyfile)
            .field("certfile", &self.certfile)
            .field("cafile", &self.cafile)
            .field("username", &self.username)
            .field("password", &if self.password.is_empty() { "" } else { "<redacted>" })
            .finish()
    }
}

/// A connected etcd registry.
#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    prefix: String,
}

fn unavailable(e: etcd_client::Error) -> RegistryError {
    RegistryError::Unavailable { store: "etcd", detail: e.to_string() }
}

fn read_file(path: &str, what: &str) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|e| RegistryError::Setup(format!("cannot read {what} {path}: {e}")))
}

impl EtcdRegistry {
    /// Builds a client. The connection itself is made lazily; an unreachable etcd shows up
    /// as `Unavailable` on the first request (callers retry).
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, RegistryError> {
        let mut co = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(15))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        let tls = !opts.certfile.is_empty() && !opts.keyfile.is_empty();
        if tls {
            let mut t = TlsOptions::new().identity(Identity::from_pem(
                read_file(&opts.certfile, "--etcd-certfile")?,
                read_file(&opts.keyfile, "--etcd-keyfile")?,
            ));
            if !opts.cafile.is_empty() {
                t = t.ca_certificate(Certificate::from_pem(read_file(&opts.cafile, "--etcd-cafile")?));
            }
            co = co.with_tls(t);
        } else if !opts.cafile.is_empty() || !opts.certfile.is_empty() || !opts.keyfile.is_empty() {
            tracing::warn!("TLS needs both --etcd-certfile and --etcd-keyfile; connecting to etcd without TLS");
        }
        if !opts.username.is_empty() {
            co = co.with_user(opts.username.clone(), opts.password.clone());
        }
        let endpoints: Vec<String> = opts
            .endpoints
            .iter()
            .map(|e| {
                // etcd-client insists on https:// URLs with TLS; flannel users often write http://.
                if tls { e.replacen("http://", "https://", 1) } else { e.clone() }
            })
            .collect();
        let client = Client::connect(&endpoints, Some(co)).await.map_err(|e| match e {
            etcd_client::Error::InvalidArgs(m) => {
                RegistryError::Setup(format!("bad --etcd-endpoints {:?}: {m}", opts.endpoints))
            }
            etcd_client::Error::InvalidUri(e) => {
                RegistryError::Setup(format!("bad --etcd-endpoints {:?}: {e}", opts.endpoints))
            }
            other => unavailable(other),
        })?;
        Ok(EtcdRegistry { client, prefix: opts.prefix.trim_end_matches('/').to_string() })
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn key(&self, k: &SubnetKey) -> String {
        format!("{}/subnets/{k}", self.prefix)
    }

    fn lease_from_kv(&self, kv: &etcd_client::KeyValue) -> Option<Lease> {
        let key = kv.key_str().ok()?;
        let suffix = key.strip_prefix(&self.subnets_prefix())?;
        let value = match kv.value_str() {
            Ok(v) => v,
            Err(_) => {
                tracing::warn!(key, "skipping lease whose value is not UTF-8");
                return None;
            }
        };
        let (key, attrs) = parse_entry("etcd", suffix, value)?;
        let expiry = if kv.lease() == 0 { Expiry::Reservation } else { Expiry::Unknown };
        Some(Lease { key, attrs, expiry, revision: kv.create_revision() })
    }
}

impl Registry for EtcdRegistry {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn network_config(&self) -> Result<String, RegistryError> {
        let key = format!("{}/config", self.prefix);
        let resp = self.client.clone().get(key.clone(), None).await.map_err(unavailable)?;
        match resp.kvs().first() {
            Some(kv) => kv
                .value_str()
                .map(str::to_string)
                .map_err(|_| RegistryError::ConfigMissing(format!("{key} is not UTF-8 text"))),
            None => Err(RegistryError::ConfigMissing(format!(
                "flannel config not found in etcd store at {key}. Did you create your config using etcdv3 API? e.g. ETCDCTL_API=3 etcdctl put {key} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}'"
            ))),
        }
    }

    async fn list(&self) -> Result<Listing, RegistryError> {
        let resp = self
            .client
            .clone()
            .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(unavailable)?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let leases = resp.kvs().iter().filter_map(|kv| self.lease_from_kv(kv)).collect();
        Ok(Listing { leases, revision })
    }

    async fn create(&self, key: &SubnetKey, attrs: &LeaseAttrs, ttl: Duration) -> Result<bool, RegistryError> {
        let mut c = self.client.clone();
        let grant = c.lease_grant(ttl.as_secs() as i64, None).await.map_err(unavailable)?;
        let k = self.key(key);
        let txn = Txn::new().when([Compare::version(k.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            k,
            attrs.to_json(),
            Some(PutOptions::new().with_lease(grant.id())),
        )]);
        let resp = c.txn(txn).await.map_err(unavailable)?;
        if !resp.succeeded() {
            // Lost the race: give the grant back rather than leave it to expire.
            let _ = c.lease_revoke(grant.id()).await;
        }
        Ok(resp.succeeded())
    }

    async fn renew(&self, key: &SubnetKey, attrs: &LeaseAttrs, ttl: Option<Duration>) -> Result<(), RegistryError> {
        let mut c = self.client.clone();
        let k = self.key(key);
        // A few rounds only matter when something else writes the key at the same moment.
        for _ in 0..5 {
            let current = c.get(k.clone(), None).await.map_err(unavailable)?;
            let guard = match current.kvs().first() {
                None => Compare::version(k.clone(), CompareOp::Equal, 0),
                Some(kv) => {
                    let holder = kv.value_str().ok().and_then(|v| LeaseAttrs::from_json(v).ok());
                    if holder.is_none_or(|h| h.public_ip != attrs.public_ip) {
                        return Err(RegistryError::Lost(*key));
                    }
                    Compare::mod_revision(k.clone(), CompareOp::Equal, kv.mod_revision())
                }
            };
            let put_opts = match ttl {
                Some(ttl) => {
                    let grant = c.lease_grant(ttl.as_secs() as i64, None).await.map_err(unavailable)?;
                    Some(PutOptions::new().with_lease(grant.id()))
                }
                None => None,
            };
            let txn = Txn::new().when([guard]).and_then([TxnOp::put(k.clone(), attrs.to_json(), put_opts)]);
            if c.txn(txn).await.map_err(unavailable)?.succeeded() {
                return Ok(());
            }
        }
        Err(RegistryError::Unavailable { store: "etcd", detail: format!("{k} kept changing while renewing it") })
    }

    async fn delete(&self, key: &SubnetKey) -> Result<(), RegistryError> {
        self.client.clone().delete(self.key(key), None).await.map_err(unavailable)?;
        Ok(())
    }

    async fn watch(&self, from_revision: i64) -> Result<mpsc::Receiver<WatchItem>, RegistryError> {
        let mut stream = self
            .client
            .clone()
            .watch(self.subnets_prefix(), Some(WatchOptions::new().with_prefix().with_start_revision(from_revision)))
            .await
            .map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let item = match stream.next().await {
                    None => WatchItem::Broken("watch stream ended".into()),
                    Some(Err(e)) => WatchItem::Broken(e.to_string()),
                    Some(Ok(resp)) => {
                        if resp.compact_revision() > 0 {
                            WatchItem::Compacted
                        } else if resp.canceled() {
                            WatchItem::Broken(format!("watch canceled by etcd: {}", resp.cancel_reason()))
                        } else if resp.events().is_empty() {
                            continue;
                        } else {
                            let mut revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                            let mut changes = Vec::with_capacity(resp.events().len());
                            for ev in resp.events() {
                                let Some(kv) = ev.kv() else { continue };
                                revision = revision.max(kv.mod_revision());
                                match ev.event_type() {
                                    EventType::Put => changes.extend(this.lease_from_kv(kv).map(Change::Put)),
                                    EventType::Delete => {
                                        let key =
                                            kv.key_str().ok().and_then(|k| k.strip_prefix(&this.subnets_prefix()));
                                        match key.map(str::parse::<SubnetKey>) {
                                            Some(Ok(k)) => changes.push(Change::Delete(k)),
                                            _ => {
                                                tracing::warn!(key = ?kv.key_str(), "ignoring deletion of an unreadable subnet key")
                                            }
                                        }
                                    }
                                }
                            }
                            WatchItem::Changes { revision, changes }
                        }
                    }
                };
                let end = !matches!(item, WatchItem::Changes { .. });
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn resolve_expiry(&self, leases: &mut [Lease]) -> Result<(), RegistryError> {
        let mut c = self.client.clone();
        for l in leases.iter_mut().filter(|l| l.expiry == Expiry::Unknown) {
            let resp = c.get(self.key(&l.key), None).await.map_err(unavailable)?;
            let Some(id) = resp.kvs().first().map(|kv| kv.lease()) else { continue };
            if id == 0 {
                l.expiry = Expiry::Reservation;
                continue;
            }
            let ttl = c.lease_time_to_live(id, None).await.map_err(unavailable)?;
            if ttl.ttl() >= 0 {
                l.expiry = Expiry::At(SystemTime::now() + Duration::from_secs(ttl.ttl() as u64));
            }
        }
        Ok(())
    }
}
