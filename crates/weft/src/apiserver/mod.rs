//! A small, faithful Kubernetes API server for tests and the lab (no real API server is
//! installable here): nodes, pods, namespaces, configmaps, serviceaccounts and
//! networking.k8s.io/v1 networkpolicies in memory, persisted to a directory; list with
//! resourceVersion, limit/continue and selectors; watch with bookmarks and `410 Gone`;
//! merge, strategic-merge and JSON patches, also on the `status` subresource; bearer-token
//! auth over TLS; the discovery endpoints kubectl reads. Not part of the daemon.
//!
//! Files in the state directory: `ca.crt` (clients trust it), `ca.key`, `server.crt`,
//! `server.key`, `token` (the bearer token), `kubeconfig` (server URL, CA, token; read by
//! kubectl and kube-rs), `state.json` + `state.log` (the objects: a snapshot and the changes
//! since, so a restarted server keeps every object and the resourceVersion).
//!
//! Forcing `410 Gone`: keep few events (`--history N`: a watch or continue from a version
//! older than the last N changes gets 410), or compact now: `POST /weft-test/compact` (with
//! the token), `kill -USR1 <pid>` for the process, or [`ApiServer::compact`] in-process.

pub mod certs;
pub mod http;
pub mod patch;
pub mod resources;
pub mod select;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
pub use store::{ApiError, Store};

/// How to run a server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// State directory (credentials, kubeconfig, objects).
    pub dir: PathBuf,
    /// Events kept for watches.
    pub history: usize,
    /// How often a watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
    /// The largest request body accepted (the real server's limit is 3 MiB).
    pub max_body: usize,
}

impl Options {
    /// Defaults for `listen` and `dir`.
    pub fn new(listen: SocketAddr, dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            dir: dir.into(),
            history: store::DEFAULT_HISTORY,
            bookmark_interval: Duration::from_secs(60),
            max_body: 3 * 1024 * 1024,
        }
    }
}

/// A running server (in its own thread and runtime); dropping it stops it and closes every
/// connection, as a killed API server does.
pub struct ApiServer {
    addr: SocketAddr,
    dir: PathBuf,
    token: String,
    store: Arc<Store>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A bound, ready server, before it serves.
struct Prepared {
    listener: std::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    shared: Arc<http::Shared>,
    addr: SocketAddr,
}

fn prepare(opts: &Options) -> Result<Prepared, String> {
    let listener =
        std::net::TcpListener::bind(opts.listen).map_err(|e| format!("listening on {}: {e}", opts.listen))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let client_ip = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    let creds = certs::ensure(&opts.dir, &client_ip)?;
    let tls = tokio_rustls::TlsAcceptor::from(certs::server_config(&creds)?);
    let store = Arc::new(Store::open(&opts.dir, opts.history)?);
    let host = if client_ip.contains(':') { format!("[{client_ip}]") } else { client_ip };
    let server = format!("https://{host}:{}", addr.port());
    crate::fsutil::write_atomic(
        &opts.dir.join("kubeconfig"),
        certs::kubeconfig(&server, &creds).as_bytes(),
        0o600,
        0o700,
    )
    .map_err(|e| format!("writing {}: {e}", opts.dir.join("kubeconfig").display()))?;
    let shared = Arc::new(http::Shared {
        store,
        token: creds.token,
        bookmark_interval: opts.bookmark_interval,
        max_body: opts.max_body,
        address: format!("{host}:{}", addr.port()),
    });
    Ok(Prepared { listener, tls, shared, addr })
}

/// Accepts connections until `stop` turns true; then every connection is dropped.
async fn serve(p: Prepared, mut stop: tokio::sync::watch::Receiver<bool>) {
    let listener = match tokio::net::TcpListener::from_std(p.listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("test API server: {e}");
            return;
        }
    };
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let tls = p.tls.clone();
                let shared = p.shared.clone();
                conns.spawn(async move {
                    let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, std::convert::Infallible>(http::handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(30))
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
    conns.shutdown().await;
}

impl ApiServer {
    /// Starts a server: credentials and kubeconfig written, listening when this returns.
    pub fn start(opts: Options) -> Result<Self, String> {
        let p = prepare(&opts)?;
        let (addr, token, store) = (p.addr, p.shared.token.clone(), p.shared.store.clone());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-apiserver")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let thread = std::thread::Builder::new()
            .name("test-apiserver".into())
            .spawn(move || {
                rt.block_on(serve(p, stop_rx));
                // Watch tasks end with their connections; do not wait for stragglers.
                rt.shutdown_background();
            })
            .map_err(|e| e.to_string())?;
        Ok(Self { addr, dir: opts.dir, token, store, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://ip:port`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The kubeconfig file for clients.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The CA certificate file.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The bearer token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store, for tests that create, change or delete objects directly (changes are
    /// seen by watches and persisted exactly as changes through HTTP).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Forgets the watch history: watches and continues from older versions get `410 Gone`.
    pub fn compact(&self) -> u64 {
        self.store.compact()
    }

    /// Stops the server and closes every connection.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Usage of `weft test-apiserver`.
pub fn usage() -> &'static str {
    "Usage: weft test-apiserver --listen IP:PORT --dir DIR [--history N] [--bookmark-interval SECONDS]\n\n\
     A small Kubernetes API server for tests and the lab (not for production).\n\
     Writes DIR/ca.crt, DIR/token and DIR/kubeconfig; keeps its objects in DIR/state.json and\n\
     DIR/state.log across restarts. --history N keeps the last N changes for watches (older\n\
     versions get 410 Gone); SIGUSR1 or POST /weft-test/compact forgets them all now.\n"
}

/// Parses the flags of `weft test-apiserver`.
pub fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut listen = None;
    let mut dir = None;
    let mut history = store::DEFAULT_HISTORY;
    let mut bookmark = 60u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.trim_start_matches('-');
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (a, None),
        };
        if matches!(name, "h" | "help") {
            return Ok(None);
        }
        let mut value = || inline.clone().or_else(|| it.next().cloned()).ok_or(format!("--{name} needs a value"));
        match name {
            "listen" => {
                let v = value()?;
                listen = Some(v.parse::<SocketAddr>().map_err(|e| format!("--listen {v:?}: {e} (want IP:PORT)"))?);
            }
            "dir" => dir = Some(PathBuf::from(value()?)),
            "history" => {
                let v = value()?;
                history =
                    v.parse().ok().filter(|n| *n > 0).ok_or(format!("--history {v:?}: want a positive number"))?;
            }
            "bookmark-interval" => {
                let v = value()?;
                bookmark =
                    v.parse().ok().filter(|n| *n > 0).ok_or(format!("--bookmark-interval {v:?}: want seconds > 0"))?;
            }
            other => return Err(format!("unknown flag --{other}")),
        }
    }
    let listen = listen.ok_or("--listen IP:PORT is required")?;
    let dir = dir.ok_or("--dir DIR is required")?;
    let mut o = Options::new(listen, dir);
    o.history = history;
    o.bookmark_interval = Duration::from_secs(bookmark);
    Ok(Some(o))
}

/// Runs `weft test-apiserver` until SIGTERM or SIGINT; SIGUSR1 compacts the history.
pub async fn run(opts: Options) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let p = prepare(&opts)?;
    let store = p.shared.store.clone();
    eprintln!(
        "weft test-apiserver: serving https://{} (kubeconfig {}, resourceVersion {})",
        p.addr,
        opts.dir.join("kubeconfig").display(),
        store.resource_version()
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve(p, stop_rx));
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => {
                let rv = store.compact();
                eprintln!("weft test-apiserver: history compacted at resourceVersion {rv}");
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(())
}
