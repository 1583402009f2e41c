//! The embedded local store: flannel's lease semantics (TTL, create-if-absent, revisions,
//! watch with compaction) in one SQLite file that several daemons on one machine share.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::mpsc;
use weft_core::lease::{Expiry, Lease, LeaseAttrs, SubnetKey};

use super::{Change, Listing, Registry, RegistryError, WatchItem, parse_entry, same_holder};

/// Change rows kept for watchers; older ones are compacted away (watchers then re-list).
const HISTORY: i64 = 10_000;
/// How often a watcher looks for new revisions.
const POLL: Duration = Duration::from_millis(100);

/// A local store file, with the network config read from a file beside it.
#[derive(Clone)]
pub struct LocalRegistry {
    conn: Arc<Mutex<Connection>>,
    prefix: String,
    config_path: PathBuf,
    path: PathBuf,
}

fn err(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable { store: "local store", detail: e.to_string() }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compacted', 0);
CREATE TABLE IF NOT EXISTS leases (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires_ms INTEGER,            -- NULL: a reservation, never expires
    mod_revision INTEGER NOT NULL,
    create_revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    value TEXT,                    -- NULL: deleted
    create_revision INTEGER        -- of the key, for a put
);
";

/// Adds `create_revision` to a file written before it existed (in one write transaction, so
/// daemons opening the file together migrate it once). Older rows get their last revision
/// as their create revision: the best the file knows.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let has = |table: &str| -> rusqlite::Result<bool> {
        let n: i64 = tx.query_row(
            &format!("SELECT count(*) FROM pragma_table_info('{table}') WHERE name = 'create_revision'"),
            [],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    };
    if !has("leases")? {
        tx.execute_batch(
            "ALTER TABLE leases ADD COLUMN create_revision INTEGER NOT NULL DEFAULT 0;
             UPDATE leases SET create_revision = mod_revision;",
        )?;
    }
    if !has("changes")? {
        tx.execute_batch(
            "ALTER TABLE changes ADD COLUMN create_revision INTEGER;
             UPDATE changes SET create_revision = revision WHERE value IS NOT NULL;",
        )?;
    }
    tx.commit()
}

/// Runs inside a write transaction: bumps the revision and records one change. A put
/// carries the key's create revision (`None`: the key is new, created by this change).
fn record(
    tx: &rusqlite::Transaction<'_>,
    key: &str,
    value: Option<&str>,
    created: Option<i64>,
) -> rusqlite::Result<i64> {
    let rev: i64 =
        tx.query_row("UPDATE meta SET value = value + 1 WHERE name = 'revision' RETURNING value", [], |r| r.get(0))?;
    let created = value.map(|_| created.unwrap_or(rev));
    tx.execute(
        "INSERT INTO changes (revision, key, value, create_revision) VALUES (?1, ?2, ?3, ?4)",
        params![rev, key, value, created],
    )?;
    if rev % 1000 == 0 {
        tx.execute("DELETE FROM changes WHERE revision <= ?1", [rev - HISTORY])?;
        tx.execute("UPDATE meta SET value = max(value, ?1) WHERE name = 'compacted'", [rev - HISTORY])?;
    }
    Ok(rev)
}

/// Writes `key` (recording the change) with an expiry, or none for a reservation. An
/// existing key keeps its create revision, as in etcd.
fn upsert(tx: &rusqlite::Transaction<'_>, key: &str, value: &str, expires_ms: Option<i64>) -> rusqlite::Result<()> {
    let created: Option<i64> =
        tx.query_row("SELECT create_revision FROM leases WHERE key = ?1", [key], |r| r.get(0)).optional()?;
    let rev = record(tx, key, Some(value), created)?;
    tx.execute(
        "INSERT INTO leases (key, value, expires_ms, mod_revision, create_revision) VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT(key) DO UPDATE SET value = ?2, expires_ms = ?3, mod_revision = ?4",
        params![key, value, expires_ms, rev],
    )?;
    Ok(())
}

/// Deletes expired leases, recording each deletion like etcd does when a lease runs out.
fn expire(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let now = now_ms();
    let expired: Vec<String> = tx
        .prepare("SELECT key FROM leases WHERE expires_ms IS NOT NULL AND expires_ms <= ?1")?
        .query_map([now], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for key in expired {
        tx.execute("DELETE FROM leases WHERE key = ?1", [&key])?;
        record(tx, &key, None, None)?;
    }
    Ok(())
}

impl LocalRegistry {
    /// Opens (creating if needed) the store file at `path`.
    pub fn open(path: &Path, prefix: &str, config_path: &Path) -> Result<Self, RegistryError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                RegistryError::Setup(format!("cannot create local store directory {}: {e}", dir.display()))
            })?;
        }
        // Daemons starting together race to create the file, switch it to WAL and migrate
        // it; SQLite answers some of those races with "busy" at once, without waiting. That
        // is contention, not a broken file: try again for a while before calling it one.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let conn = loop {
            match Self::prepare(path) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(RegistryError::Setup(format!("local store {} is not usable: {e}", path.display())));
                }
                Ok(conn) => break conn,
            }
        };
        Ok(LocalRegistry {
            conn: Arc::new(Mutex::new(conn)),
            prefix: prefix.trim_end_matches('/').to_string(),
            config_path: config_path.to_path_buf(),
            path: path.to_path_buf(),
        })
    }

    /// Opens the file, switches it to WAL and brings its schema up to date.
    fn prepare(path: &Path) -> rusqlite::Result<Connection> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // WAL lets watchers read while another daemon writes.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&mut conn)?;
        Ok(conn)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn key(&self, k: &SubnetKey) -> String {
        format!("{}/subnets/{k}", self.prefix)
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    /// Runs `f` in an immediate write transaction on a blocking thread.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, RegistryError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().map_err(|_| err("local store lock poisoned"))?;
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
            expire(&tx).map_err(err)?;
            let out = f(&tx).map_err(err)?;
            tx.commit().map_err(err)?;
            Ok(out)
        })
        .await
        .map_err(err)?
    }

    fn parse_row(&self, key: &str, value: &str, expires_ms: Option<i64>, revision: i64) -> Option<Lease> {
        let suffix = key.strip_prefix(&self.subnets_prefix())?;
        let (key, attrs) = parse_entry("local", suffix, value)?;
        let expiry = match expires_ms {
            None => Expiry::Reservation,
            Some(ms) => Expiry::At(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)),
        };
        Some(Lease { key, attrs, expiry, revision })
    }

    /// Writes a reservation (a lease without expiry) for `key`: what an operator does with
    /// `etcdctl put` in etcd mode.
    pub async fn reserve(&self, key: &SubnetKey, attrs: &LeaseAttrs) -> Result<(), RegistryError> {
        let (k, v) = (self.key(key), attrs.to_json());
        self.write(move |tx| upsert(tx, &k, &v, None)).await
    }

    /// Writes an arbitrary value under `<prefix>/subnets/<suffix>` with a 24 h expiry, as any
    /// other writer of the store could (repairs; tests of garbage from other hosts).
    pub async fn put_raw(&self, suffix: &str, value: &str) -> Result<(), RegistryError> {
        let (k, v) = (format!("{}{suffix}", self.subnets_prefix()), value.to_string());
        let expires = now_ms() + super::LEASE_TTL.as_millis() as i64;
        self.write(move |tx| upsert(tx, &k, &v, Some(expires))).await
    }

    /// Drops the change history up to and including `revision`, like `etcdctl compact`:
    /// watchers that are behind it must re-list.
    pub async fn compact(&self, revision: i64) -> Result<(), RegistryError> {
        self.write(move |tx| {
            tx.execute("DELETE FROM changes WHERE revision <= ?1", [revision])?;
            tx.execute("UPDATE meta SET value = max(value, ?1) WHERE name = 'compacted'", [revision])?;
            Ok(())
        })
        .await
    }

    fn poll(&self, after: i64) -> Result<WatchItem, RegistryError> {
        let c = self.conn.lock().map_err(|_| err("local store lock poisoned"))?;
        let compacted: i64 =
            c.query_row("SELECT value FROM meta WHERE name = 'compacted'", [], |r| r.get(0)).map_err(err)?;
        if after < compacted {
            return Ok(WatchItem::Compacted);
        }
        let mut stmt = c
            .prepare_cached(
                "SELECT revision, key, value, create_revision FROM changes WHERE revision > ?1 ORDER BY revision LIMIT 5000",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([after], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                ))
            })
            .map_err(err)?;
        let mut revision = after;
        let mut changes = Vec::new();
        for row in rows {
            let (rev, key, value, created) = row.map_err(err)?;
            revision = rev;
            let Some(suffix) = key.strip_prefix(&self.subnets_prefix()) else { continue };
            match value {
                Some(v) => changes.extend(self.parse_row(&key, &v, Some(0), created.unwrap_or(rev)).map(|mut l| {
                    // The expiry of a watched put is not needed by watchers; mark it unknown.
                    l.expiry = Expiry::Unknown;
                    Change::Put(l)
                })),
                None => match suffix.parse::<SubnetKey>() {
                    Ok(k) => changes.push(Change::Delete(k)),
                    Err(e) => tracing::warn!("ignoring deletion of an unreadable subnet key: {e}"),
                },
            }
        }
        Ok(WatchItem::Changes { revision, changes })
    }
}

impl Registry for LocalRegistry {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn network_config(&self) -> Result<String, RegistryError> {
        std::fs::read_to_string(&self.config_path).map_err(|e| {
            RegistryError::ConfigMissing(format!(
                "cannot read the network config {} ({e}); write one there, e.g. {{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}, or pass --net-config-path",
                self.config_path.display()
            ))
        })
    }

    async fn list(&self) -> Result<Listing, RegistryError> {
        let prefix = self.subnets_prefix();
        let rows = self
            .write(move |tx| {
                let revision: i64 = tx.query_row("SELECT value FROM meta WHERE name = 'revision'", [], |r| r.get(0))?;
                let rows = tx
                    .prepare(
                        "SELECT key, value, expires_ms, create_revision FROM leases
                         WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key",
                    )?
                    .query_map([&prefix], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, Option<i64>>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((revision, rows))
            })
            .await?;
        let (revision, rows) = rows;
        let leases = rows.iter().filter_map(|(k, v, e, c)| self.parse_row(k, v, *e, *c)).collect();
        Ok(Listing { leases, revision })
    }

    async fn create(&self, key: &SubnetKey, attrs: &LeaseAttrs, ttl: Duration) -> Result<bool, RegistryError> {
        let (k, v) = (self.key(key), attrs.to_json());
        let expires = now_ms() + ttl.as_millis() as i64;
        self.write(move |tx| {
            let exists = tx.query_row("SELECT 1 FROM leases WHERE key = ?1", [&k], |_| Ok(())).optional()?.is_some();
            if exists {
                return Ok(false);
            }
            let rev = record(tx, &k, Some(&v), None)?;
            tx.execute(
                "INSERT INTO leases (key, value, expires_ms, mod_revision, create_revision) VALUES (?1, ?2, ?3, ?4, ?4)",
                params![k, v, expires, rev],
            )?;
            Ok(true)
        })
        .await
    }

    async fn renew(&self, key: &SubnetKey, attrs: &LeaseAttrs, ttl: Option<Duration>) -> Result<(), RegistryError> {
        let (k, v) = (self.key(key), attrs.to_json());
        let expires = ttl.map(|t| now_ms() + t.as_millis() as i64);
        let ours = attrs.clone();
        let held_by_us = self
            .write(move |tx| {
                let current: Option<String> =
                    tx.query_row("SELECT value FROM leases WHERE key = ?1", [&k], |r| r.get(0)).optional()?;
                if let Some(cur) = current
                    && !LeaseAttrs::from_json(&cur).is_ok_and(|a| same_holder(&ours, &a))
                {
                    return Ok(false);
                }
                upsert(tx, &k, &v, expires)?;
                Ok(true)
            })
            .await?;
        if held_by_us { Ok(()) } else { Err(RegistryError::Lost(*key)) }
    }

    async fn delete(&self, key: &SubnetKey) -> Result<(), RegistryError> {
        let k = self.key(key);
        self.write(move |tx| {
            if tx.execute("DELETE FROM leases WHERE key = ?1", [&k])? > 0 {
                record(tx, &k, None, None)?;
            }
            Ok(())
        })
        .await
    }

    async fn watch(&self, from_revision: i64) -> Result<mpsc::Receiver<WatchItem>, RegistryError> {
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let mut after = from_revision - 1;
            let mut ticks = 0u32;
            loop {
                // Expiry happens lazily in write transactions; sweep once a second so a
                // lease that ran out is seen even when nobody writes.
                ticks += 1;
                if ticks.is_multiple_of(10) {
                    // A broken store is reported by the poll below.
                    let _ = this.write(|_| Ok(())).await;
                }
                let me = this.clone();
                let item = match tokio::task::spawn_blocking(move || me.poll(after)).await {
                    Ok(Ok(item)) => item,
                    Ok(Err(e)) => WatchItem::Broken(e.to_string()),
                    Err(e) => WatchItem::Broken(e.to_string()),
                };
                match item {
                    WatchItem::Changes { revision, changes } if changes.is_empty() => {
                        after = revision;
                        // The store answered: progress (advisory, skipped when the reader is busy).
                        if ticks.is_multiple_of(10) && tx.try_send(WatchItem::Progress).is_err() && tx.is_closed() {
                            return;
                        }
                    }
                    WatchItem::Changes { revision, changes } => {
                        after = revision;
                        if tx.send(WatchItem::Changes { revision, changes }).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    other => {
                        let _ = tx.send(other).await;
                        return;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }

    async fn resolve_expiry(&self, _leases: &mut [Lease]) -> Result<(), RegistryError> {
        // A local list already carries exact expiry times.
        Ok(())
    }
}
