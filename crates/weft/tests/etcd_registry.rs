//! The etcd registry against a real etcd server on a loopback address of its own.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::scenarios::{self, collect, describe, start_watch};
use weft::lab::etcd::{Etcd, TlsFiles};
use weft::registry::acquire::acquire;
use weft::registry::etcd::{EtcdOptions, EtcdRegistry};
use weft::registry::{LEASE_TTL, Registry};
use weft_core::lease::{LeaseAttrs, SubnetKey};

const PREFIX: &str = "/coreos.com/network";

/// etcd's client and peer ports, on every test's own address.
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// A client port the restart test moves etcd to, out of the client's reach.
const OTHER_PORT: u16 = 2479;

/// A loopback address (127/8 all reaches `lo`, nothing to configure) of this test alone:
/// from the process id and a count, so no other test here or in a concurrent run binds it.
/// A port picked by binding 127.0.0.1:0 and dropping it could be taken by another test's
/// etcd before ours binds it, and a health check could then pass against the wrong server.
fn own_address() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    assert!(n < 255, "out of loopback addresses");
    let pid = std::process::id();
    format!("127.{}.{}.{n}", 10 + pid % 200, (pid / 200) % 256)
}

/// An endpoint on this test's own address where nothing listens (checked: it refuses).
fn refusing_endpoint(e: &Etcd) -> String {
    let host = e.url().trim_start_matches("http://").rsplit_once(':').unwrap().0.to_string();
    let addr = format!("{host}:2381");
    let err = std::net::TcpStream::connect(&addr).expect_err("nothing listens on the refusing endpoint");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{addr}: {err}");
    format!("http://{addr}")
}

fn start(dir: &Path) -> Etcd {
    common::require_root();
    Etcd::start(None, &own_address(), CLIENT_PORT, PEER_PORT, &dir.join("etcd"), None).unwrap()
}

fn opts(e: &Etcd) -> EtcdOptions {
    EtcdOptions { endpoints: vec![e.url()], prefix: PREFIX.into(), ..Default::default() }
}

async fn connect(e: &Etcd) -> EtcdRegistry {
    EtcdRegistry::connect(&opts(e)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_acquisitions_get_fifty_distinct_subnets() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = start(dir.path());
    let mut regs = Vec::new();
    for _ in 0..50 {
        regs.push(connect(&etcd).await);
    }
    scenarios::concurrent_acquisitions(regs, &connect(&etcd).await).await;
    // Every lease is attached to an etcd lease of 24 h, as flanneld's are.
    let out = etcd.etcdctl(&["get", "--prefix", &format!("{PREFIX}/subnets/"), "-w", "fields"]).unwrap();
    let ids: Vec<&str> =
        out.lines().filter(|l| l.starts_with("\"Lease\"")).map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(ids.len(), 50);
    let ttl = etcd.etcdctl(&["lease", "timetolive", &format!("{:x}", ids[0].parse::<i64>().unwrap())]).unwrap();
    assert!(ttl.contains("granted with TTL(86400s)"), "{ttl}");
}

#[tokio::test]
async fn a_reservation_is_honoured_and_never_re_leased() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = start(dir.path());
    let reg = connect(&etcd).await;
    scenarios::reservation_is_honoured(&reg, async |key: &SubnetKey, attrs: &LeaseAttrs| {
        // An operator's reservation: a key without an etcd lease.
        etcd.etcdctl(&["put", &format!("{PREFIX}/subnets/{key}"), &attrs.to_json()]).unwrap();
    })
    .await;
    let fields = etcd.etcdctl(&["get", &format!("{PREFIX}/subnets/10.9.0.4-30"), "-w", "fields"]).unwrap();
    assert!(fields.contains("\"Lease\" : 0"), "the reservation still has no etcd lease: {fields}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_follows_changes_and_skips_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = start(dir.path());
    let reg = Arc::new(connect(&etcd).await);
    scenarios::watch_follows_changes(reg, async || {
        etcd.etcdctl(&["put", &format!("{PREFIX}/subnets/not-a-subnet"), "{}"]).unwrap();
        etcd.etcdctl(&["put", &format!("{PREFIX}/subnets/10.5.77.0-24"), "garbage"]).unwrap();
        etcd.etcdctl(&["put", &format!("{PREFIX}/subnets/10.5.78.0-24"), "{\"PublicIP\":42}"]).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_sees_every_change_across_an_etcd_restart_and_a_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = start(dir.path());
    let port = etcd.port;
    assert_ne!(port, OTHER_PORT);
    let reg = Arc::new(connect(&etcd).await);
    let cfg = scenarios::wide_config();
    let me =
        acquire(&*reg, &cfg, &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 1)), None, LEASE_TTL).await.unwrap().lease.key;
    let (mut rx, metrics) = start_watch(reg.clone(), &cfg, me);
    let peer = |n: u8| -> (String, String) {
        (format!("{PREFIX}/subnets/10.5.{n}.0-24"), LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, n)).to_json())
    };
    let (k, v) = peer(101);
    etcd.etcdctl(&["put", &k, &v]).unwrap();
    assert_eq!(describe(&collect(&mut rx, 1).await.0), ["+10.5.101.0-24"]);

    // etcd goes away; while the daemon cannot reach it (other port), the cluster changes.
    etcd.restart_on(OTHER_PORT).unwrap();
    let (k2, v2) = peer(102);
    etcd.etcdctl(&["put", &k2, &v2]).unwrap();
    etcd.etcdctl(&["del", &k]).unwrap();
    etcd.restart_on(port).unwrap();
    assert_eq!(
        describe(&collect(&mut rx, 2).await.0),
        ["+10.5.102.0-24", "-10.5.101.0-24"],
        "resumed from the last revision"
    );
    assert!(metrics.store_reconnects.get() > 0);
    assert_eq!(metrics.store_relists.get(), 0);

    // Again, but this time the history is compacted: the watch must re-list and diff.
    etcd.restart_on(OTHER_PORT).unwrap();
    let (k3, v3) = peer(103);
    etcd.etcdctl(&["put", &k3, &v3]).unwrap();
    etcd.etcdctl(&["del", &k2]).unwrap();
    let status = etcd.etcdctl(&["endpoint", "status", "-w", "fields"]).unwrap();
    let rev =
        status.lines().find(|l| l.starts_with("\"Revision\"")).and_then(|l| l.rsplit(' ').next()).unwrap().to_string();
    etcd.etcdctl(&["compact", &rev]).unwrap();
    etcd.restart_on(port).unwrap();
    let mut got = describe(&collect(&mut rx, 2).await.0);
    got.sort();
    assert_eq!(got, ["+10.5.103.0-24", "-10.5.102.0-24"]);
    assert_eq!(metrics.store_relists.get(), 1, "the compaction was noticed and answered with a re-list");
}

/// The error a client with `opts` gets: at connect, or at its first request.
async fn refusal(opts: &EtcdOptions) -> String {
    match EtcdRegistry::connect(opts).await {
        Ok(r) => r.list().await.unwrap_err().to_string(),
        Err(e) => e.to_string(),
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
    assert!(st.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&st.stderr));
}

/// A CA and a certificate (for `ip`) it signed, usable as etcd's server and as our client.
fn make_certs(dir: &Path, ip: &str) -> TlsFiles {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=weft-test-ca",
        ],
    );
    std::fs::write(dir.join("ext.cnf"), format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth,clientAuth\n"))
        .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "node.key",
            "-out",
            "node.csr",
            "-subj",
            "/CN=weft-node",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "node.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "node.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    TlsFiles { ca: dir.join("ca.pem"), cert: dir.join("node.pem"), key: dir.join("node.key") }
}

#[tokio::test]
async fn tls_with_client_certificates() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let ip = own_address();
    let tls = make_certs(dir.path(), &ip);
    let etcd = Etcd::start(None, &ip, CLIENT_PORT, PEER_PORT, &dir.path().join("etcd"), Some(tls.clone())).unwrap();
    let secure = EtcdOptions {
        // Written as http:// the way flannel users often do; TLS upgrades it.
        endpoints: vec![format!("http://{ip}:{}", etcd.port)],
        prefix: PREFIX.into(),
        cafile: tls.ca.display().to_string(),
        certfile: tls.cert.display().to_string(),
        keyfile: tls.key.display().to_string(),
        ..Default::default()
    };
    let reg = EtcdRegistry::connect(&secure).await.unwrap();
    let got = acquire(&reg, &scenarios::wide_config(), &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 9)), None, LEASE_TTL)
        .await
        .unwrap();
    let listed = etcd.etcdctl(&["get", "--print-value-only", &format!("{PREFIX}/subnets/{}", got.lease.key)]).unwrap();
    assert_eq!(listed.trim(), r#"{"PublicIP":"192.0.2.9","PublicIPv6":null}"#);

    // Without a client certificate the server refuses us, and the error says where to look.
    let plain = EtcdOptions {
        endpoints: vec![format!("https://{ip}:{}", etcd.port)],
        cafile: tls.ca.display().to_string(),
        prefix: PREFIX.into(),
        ..Default::default()
    };
    let err = refusal(&plain).await;
    assert!(err.contains("etcd"), "{err}");
    let missing = EtcdOptions { certfile: "/nonexistent.pem".into(), keyfile: "/nonexistent.key".into(), ..secure };
    let err = EtcdRegistry::connect(&missing).await.err().expect("missing certificate files are an error").to_string();
    assert!(err.contains("cannot read --etcd-certfile /nonexistent.pem"), "{err}");
}

#[tokio::test]
async fn a_missing_config_says_how_to_create_it() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = start(dir.path());
    let reg = connect(&etcd).await;
    let err = reg.network_config().await.unwrap_err().to_string();
    assert!(
        err.contains("Did you create your config using etcdv3 API?")
            && err.contains("etcdctl put /coreos.com/network/config"),
        "{err}"
    );
}

#[tokio::test]
async fn basic_auth_with_username_and_password() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = start(dir.path());
    etcd.etcdctl(&["put", &format!("{PREFIX}/config"), r#"{"Network":"10.5.0.0/16"}"#]).unwrap();
    etcd.etcdctl(&["user", "add", "root:s3cret"]).unwrap();
    etcd.etcdctl(&["auth", "enable"]).unwrap();
    let good = EtcdOptions { username: "root".into(), password: "s3cret".into(), ..opts(&etcd) };
    let reg = EtcdRegistry::connect(&good).await.unwrap();
    assert!(reg.network_config().await.unwrap().contains("10.5.0.0/16"));
    acquire(&reg, &scenarios::wide_config(), &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 7)), None, LEASE_TTL)
        .await
        .unwrap();
    assert!(!format!("{good:?}").contains("s3cret"), "the password never reaches a log");
    let bad = EtcdOptions { password: "wrong".into(), ..good };
    let err = refusal(&bad).await;
    assert!(err.contains("authentication failed") || err.contains("invalid"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_larger_than_a_grpc_message_is_listed_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = start(dir.path());
    let reg = Arc::new(connect(&etcd).await);
    let cfg = scenarios::wide_config();
    let me =
        acquire(&*reg, &cfg, &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 1)), None, LEASE_TTL).await.unwrap().lease.key;
    // Junk under the subnets prefix: 14 values of 1.4 MB (etcd takes up to 1.5 MiB per
    // request), about 19.6 MB in all, more than four times gRPC's default 4 MiB message and
    // more than our own 16 MiB limit, so one unpaged answer cannot carry them.
    let mut raw = etcd_client::Client::connect([etcd.url()], None).await.unwrap();
    let junk = "x".repeat(1_400_000);
    for i in 0..14 {
        raw.put(format!("{PREFIX}/subnets/junk-{i:02}"), junk.clone(), None).await.unwrap();
    }
    // Real leases among and after the junk.
    let other = LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 2));
    assert!(reg.create(&"10.5.250.0-24".parse().unwrap(), &other, LEASE_TTL).await.unwrap());
    let listing = reg.list().await.unwrap();
    let mut keys: Vec<String> = listing.leases.iter().map(|l| l.key.to_string()).collect();
    keys.sort();
    let mut want = vec![me.to_string(), "10.5.250.0-24".to_string()];
    want.sort();
    assert_eq!(keys, want, "every real lease is listed; the junk is skipped");
    // A host still acquires, and the watch (which lists first) follows peers.
    let third =
        acquire(&*reg, &cfg, &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 3)), None, LEASE_TTL).await.unwrap().lease.key;
    assert!(![me, "10.5.250.0-24".parse().unwrap()].contains(&third));
    let (mut rx, _metrics) = start_watch(reg.clone(), &cfg, me);
    let mut got = describe(&collect(&mut rx, 2).await.0);
    got.sort();
    let mut want = vec!["+10.5.250.0-24".to_string(), format!("+{third}")];
    want.sort();
    assert_eq!(got, want);
    etcd.etcdctl(&[
        "put",
        &format!("{PREFIX}/subnets/10.5.251.0-24"),
        &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 4)).to_json(),
    ])
    .unwrap();
    assert_eq!(describe(&collect(&mut rx, 1).await.0), ["+10.5.251.0-24"]);
}

/// The etcd lease ids `etcdctl lease list` shows.
fn lease_ids(etcd: &Etcd) -> Vec<String> {
    let out = etcd.etcdctl(&["lease", "list"]).unwrap();
    out.lines().skip(1).map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

#[tokio::test]
async fn renewal_keeps_one_etcd_lease_per_subnet() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = start(dir.path());
    let reg = connect(&etcd).await;
    let me = LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 1));
    let key = acquire(&reg, &scenarios::wide_config(), &me, None, LEASE_TTL).await.unwrap().lease.key;
    assert_eq!(lease_ids(&etcd).len(), 1);
    for _ in 0..5 {
        reg.renew(&key, &me, Some(LEASE_TTL)).await.unwrap();
    }
    let ids = lease_ids(&etcd);
    assert_eq!(ids.len(), 1, "no orphan etcd lease per renewal: {ids:?}");
    let id = etcd.lease_of(&format!("{PREFIX}/subnets/{key}")).unwrap();
    // etcdctl prints ids as hex, zero-padded to 16 digits: compare numbers, not text.
    assert_eq!(i64::from_str_radix(&ids[0], 16).unwrap(), id, "the one etcd lease is the key's ({ids:?})");
    // A create that finds our own key (our identity) is ours, without a second etcd lease.
    assert!(reg.create(&key, &me, LEASE_TTL).await.unwrap());
    assert_eq!(lease_ids(&etcd).len(), 1);
    assert!(!reg.create(&key, &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 9)), LEASE_TTL).await.unwrap());
    assert_eq!(lease_ids(&etcd).len(), 1, "a lost race gives its grant back");
}

#[tokio::test]
async fn requests_go_to_a_member_that_answers() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = start(dir.path());
    etcd.etcdctl(&["put", &format!("{PREFIX}/config"), r#"{"Network":"10.5.0.0/16"}"#]).unwrap();
    // The first endpoint refuses connections, the second hangs (accepts, never answers).
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let opts = EtcdOptions {
        endpoints: vec![refusing_endpoint(&etcd), format!("http://{}", hang.local_addr().unwrap()), etcd.url()],
        prefix: PREFIX.into(),
        ..Default::default()
    };
    let metrics = Arc::new(weft::metrics::Metrics::new());
    let reg = EtcdRegistry::connect(&opts).await.unwrap().with_metrics(metrics.clone());
    for _ in 0..20 {
        assert!(reg.network_config().await.unwrap().contains("10.5.0.0/16"));
    }
    acquire(&reg, &scenarios::wide_config(), &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 7)), None, LEASE_TTL)
        .await
        .unwrap();
    let text = metrics.render();
    assert!(text.contains("weft_store_retries_total{op=\"config\"}"), "{text}");
    assert!(text.contains(&format!("weft_store_endpoint_up{{endpoint=\"{}\"}} 1", etcd.url())), "{text}");
    // With no member answering the error names the endpoints tried.
    let dead_endpoint = refusing_endpoint(&etcd);
    let dead = EtcdOptions { endpoints: vec![dead_endpoint.clone()], ..opts };
    let err = EtcdRegistry::connect(&dead).await.unwrap().list().await.unwrap_err().to_string();
    assert!(err.contains(&format!("no member answered (tried {dead_endpoint}")), "{err}");
}
