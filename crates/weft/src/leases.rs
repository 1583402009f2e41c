//! `weft leases`: the leases of a store as a table or JSON.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;
use std::collections::BTreeMap;
use weft_core::flags::{self, Kind, Parsed, Spec};

use weft_core::cache::LeaseCache;
use weft_core::config::NetworkConfig;
use weft_core::lease::{Expiry, Lease, SubnetKey};
use weft_core::validate::{Reject, Rules};

use crate::cli::{STORE_FLAGS, StoreChoice, store_choice};
use crate::registry::etcd::EtcdRegistry;
use crate::registry::local::LocalRegistry;
use crate::registry::{Registry, RegistryError};

fn specs() -> Vec<Spec> {
    let mut v: Vec<Spec> = STORE_FLAGS.to_vec();
    v.push(Spec { name: "json", kind: Kind::Bool, default: "false", help: "print JSON instead of a table" });
    v
}

/// Usage of `weft leases`.
pub fn usage() -> String {
    flags::usage("weft leases", &specs())
}

/// What the user asked for.
pub enum Request {
    /// List leases.
    List {
        /// The store.
        store: StoreChoice,
        /// JSON output.
        json: bool,
    },
    /// Print usage.
    Help,
}

/// Parses `weft leases` arguments.
pub fn parse(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Request, flags::FlagError> {
    match flags::parse(&specs(), args, env)? {
        Parsed::Values(v) => Ok(Request::List { store: store_choice(&v)?, json: v.bool("json") }),
        Parsed::Help | Parsed::Version => Ok(Request::Help),
    }
}

/// The leases of a store, and those every host ignores, with why.
#[derive(Debug, Default)]
pub struct Listed {
    /// Every lease.
    pub leases: Vec<Lease>,
    /// Leases that break a rule of the network config or lose a conflict to an older lease.
    pub rejected: BTreeMap<SubnetKey, Reject>,
}

impl Listed {
    /// Judges `leases` as every host does (without the rules about a host's own lease).
    pub fn judge(leases: Vec<Lease>, cfg: Option<&NetworkConfig>) -> Listed {
        let rejected = match cfg {
            Some(cfg) => {
                let mut v = LeaseCache::new(Rules::from_config(cfg));
                v.replace_all(leases.iter().cloned());
                v.rejected().clone()
            }
            None => BTreeMap::new(),
        };
        Listed { leases, rejected }
    }
}

async fn list<R: Registry>(reg: &R) -> Result<Listed, RegistryError> {
    let mut leases = reg.list().await?.leases;
    reg.resolve_expiry(&mut leases).await?;
    let cfg = match reg.network_config().await.map(|t| NetworkConfig::parse(&t)) {
        Ok(Ok(cfg)) => Some(cfg),
        Ok(Err(e)) => {
            tracing::warn!("the network config is invalid ({e}); leases are shown without validation");
            None
        }
        Err(e) => {
            tracing::warn!("cannot read the network config ({e}); leases are shown without validation");
            None
        }
    };
    Ok(Listed::judge(leases, cfg.as_ref()))
}

/// Lists the leases of `store`.
pub async fn run(store: &StoreChoice) -> Result<Listed, RegistryError> {
    match store {
        StoreChoice::Etcd(e) => list(&EtcdRegistry::connect(e).await?).await,
        StoreChoice::Local { path, prefix, config } => list(&LocalRegistry::open(path, prefix, config)?).await,
        StoreChoice::Kube(k) => list(&crate::registry::kube::KubeRegistry::connect(k).await?).await,
    }
}

fn remaining(expiry: &Expiry, now: SystemTime) -> String {
    match expiry {
        Expiry::Reservation => "reservation".into(),
        Expiry::Unknown => "unknown".into(),
        Expiry::At(t) => match t.duration_since(now) {
            Ok(d) => {
                let s = d.as_secs();
                format!("in {}h{:02}m", s / 3600, (s % 3600) / 60)
            }
            Err(_) => "expired".into(),
        },
    }
}

/// The leases as an aligned text table; a rejected lease says why in its last column.
pub fn table(listed: &Listed, now: SystemTime) -> String {
    let mut rows =
        vec![["SUBNET".to_string(), "PUBLIC IP".into(), "BACKEND".into(), "EXPIRES".into(), "STATUS".into()]];
    for l in &listed.leases {
        let subnet = match (l.key.v4, l.key.v6) {
            (Some(a), Some(b)) => format!("{a},{b}"),
            (Some(a), None) => a.to_string(),
            (None, Some(b)) => b.to_string(),
            (None, None) => "-".into(),
        };
        let ip = match l.attrs.public_ipv6 {
            Some(v6) => format!("{},{v6}", l.attrs.public_ip),
            None => l.attrs.public_ip.to_string(),
        };
        let backend =
            if l.attrs.backend_type.is_empty() { "udp/alloc".to_string() } else { l.attrs.backend_type.clone() };
        let status = match listed.rejected.get(&l.key) {
            Some(why) => format!("rejected ({}): {why}", why.label()),
            None => "ok".into(),
        };
        rows.push([subnet, ip, backend, remaining(&l.expiry, now), status]);
    }
    let widths: Vec<usize> = (0..5).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The leases as JSON; `rejected` is the reason a lease is ignored, or null.
pub fn to_json(listed: &Listed) -> serde_json::Value {
    serde_json::Value::Array(
        listed
            .leases
            .iter()
            .map(|l| {
                let (expires_at, reservation) = match l.expiry {
                    Expiry::At(t) => (t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs()), false),
                    Expiry::Reservation => (None, true),
                    Expiry::Unknown => (None, false),
                };
                json!({
                    "key": l.key.to_string(),
                    "subnet": l.key.v4.map(|n| n.to_string()),
                    "ipv6_subnet": l.key.v6.map(|n| n.to_string()),
                    "public_ip": l.attrs.public_ip.to_string(),
                    "public_ipv6": l.attrs.public_ipv6.map(|a| a.to_string()),
                    "backend_type": l.attrs.backend_type,
                    "backend_data": l.attrs.backend_data.as_ref().and_then(|r| serde_json::from_str::<serde_json::Value>(r.get()).ok()),
                    "expires_at": expires_at,
                    "reservation": reservation,
                    "rejected": listed.rejected.get(&l.key).map(|r| r.to_string()),
                    "rejected_reason": listed.rejected.get(&l.key).map(|r| r.label()),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use weft_core::lease::LeaseAttrs;

    use super::*;

    #[test]
    fn table_shows_reservations_and_remaining_time() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let mut hg = LeaseAttrs::new([192, 0, 2, 12].into());
        hg.backend_type = "host-gw".into();
        let leases = vec![
            Lease {
                key: "10.5.52.0-24".parse().unwrap(),
                attrs: LeaseAttrs::new([192, 0, 2, 11].into()),
                expiry: Expiry::At(now + Duration::from_secs(86340)),
                revision: 0,
            },
            Lease { key: "10.5.53.0-24".parse().unwrap(), attrs: hg, expiry: Expiry::Reservation, revision: 0 },
            Lease {
                key: "192.0.2.0-24".parse().unwrap(),
                attrs: LeaseAttrs::new([192, 0, 2, 99].into()),
                expiry: Expiry::Reservation,
                revision: 7,
            },
        ];
        let cfg = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        let listed = Listed::judge(leases, Some(&cfg));
        assert_eq!(
            table(&listed, now),
            "SUBNET        PUBLIC IP   BACKEND    EXPIRES      STATUS\n\
             10.5.52.0/24  192.0.2.11  udp/alloc  in 23h59m    ok\n\
             10.5.53.0/24  192.0.2.12  host-gw    reservation  ok\n\
             192.0.2.0/24  192.0.2.99  udp/alloc  reservation  rejected (outside_network): subnet 192.0.2.0/24 is not inside Network 10.5.0.0/16\n"
        );
        let j = to_json(&listed);
        assert_eq!(j[1]["reservation"], true);
        assert_eq!(j[0]["expires_at"], 87340);
        assert_eq!(j[0]["rejected"], serde_json::Value::Null);
        assert_eq!(j[2]["rejected_reason"], "outside_network");
    }
}
