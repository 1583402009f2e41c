//! The health server: flanneld's `/healthz` and `/readyz`, plus `/metrics`.
//!
//! `/healthz` is a liveness check: it fails when the daemon's main loop has not run, or the
//! store has not answered the lease list or watch, for longer than [`stale_limit`], so a
//! wedged daemon can be restarted by a probe. The server itself cannot be starved by its
//! clients: at most [`MAX_CONNECTIONS`] at once, each closed after [`CONNECTION_LIFETIME`]
//! (a client that sends its headers slowly cannot hold a connection).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::any;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::metrics::Metrics;

pub use crate::metrics::{STALE_ENV, stale_limit};

#[derive(Clone)]
struct Shared {
    ready: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// How long one connection may stay open (headers, request and response included).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);

/// Why the daemon is not healthy, or `None`.
pub fn unhealthy(m: &Metrics, limit: Duration) -> Option<String> {
    if let Some(age) = m.main_loop_age().filter(|a| *a > limit) {
        return Some(format!("the main loop has not run for {}s", age.as_secs()));
    }
    if let Some(age) = m.store_progress_age().filter(|a| *a > limit) {
        return Some(format!("the store has not answered the lease watch for {}s", age.as_secs()));
    }
    None
}

async fn healthz(State(s): State<Shared>) -> impl IntoResponse {
    match unhealthy(&s.metrics, stale_limit()) {
        None => (StatusCode::OK, "flanneld is running".to_string()),
        Some(why) => (StatusCode::INTERNAL_SERVER_ERROR, format!("flanneld is not healthy: {why}")),
    }
}

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    if *s.ready.borrow() {
        (StatusCode::OK, "flanneld is ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "flanneld is not ready yet")
    }
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render())
}

/// Binds the server (a bind failure is returned, not a panic as in flanneld) and serves it
/// until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    ready: watch::Receiver<bool>,
    metrics_src: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = Bounded { inner: TcpListener::bind(addr).await?, slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)) };
    let app = Router::new()
        .route("/healthz", any(healthz))
        .route("/readyz", any(readyz))
        .route("/metrics", any(metrics))
        .with_state(Shared { ready, metrics: metrics_src });
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!("health server stopped: {e}");
        }
    }))
}

/// A listener that admits at most [`MAX_CONNECTIONS`] connections and gives each a lifetime.
struct Bounded {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for Bounded {
    type Io = Limited;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed, so acquiring only waits.
        let permit = loop {
            if let Ok(p) = self.slots.clone().acquire_owned().await {
                break p;
            }
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let deadline = Box::pin(tokio::time::sleep(CONNECTION_LIFETIME));
                    return (Limited { stream, deadline, _permit: permit }, addr);
                }
                Err(e) => {
                    // Out of descriptors and the like: pause instead of spinning.
                    tracing::warn!("health server accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that fails every read and write once its lifetime is over.
struct Limited {
    stream: TcpStream,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Limited {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "health connection lifetime over")
}

impl AsyncRead for Limited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn a_stale_main_loop_or_store_makes_the_daemon_unhealthy() {
        let m = Metrics::new();
        assert_eq!(unhealthy(&m, Duration::from_secs(1)), None, "nothing started yet");
        m.main_loop_progress();
        m.store_progress();
        assert_eq!(unhealthy(&m, Duration::from_secs(1)), None);
        m.store_progress_ms.set(m.store_progress_ms.get() - 5_000);
        assert!(unhealthy(&m, Duration::from_secs(1)).unwrap().contains("store"));
        m.main_loop_ms.set(m.main_loop_ms.get() - 5_000);
        assert!(unhealthy(&m, Duration::from_secs(1)).unwrap().contains("main loop"));
    }

    #[tokio::test]
    async fn slow_clients_cannot_hold_the_server() {
        let (_tx, rx) = watch::channel(true);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        serve(addr, rx, Arc::new(Metrics::new()), async move {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
        // Fill every slot with a client that never finishes its headers.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /healthz HTTP/1.1\r\nHo").await.unwrap();
            idle.push(c);
        }
        // One more client waits, and is served once the slow ones are cut off.
        let started = std::time::Instant::now();
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(CONNECTION_LIFETIME * 3, c.read_to_string(&mut out)).await.unwrap().unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(started.elapsed() >= CONNECTION_LIFETIME / 2, "it had to wait for a slot");
        // The slow ones were closed.
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0);
        let _ = stop_tx.send(());
    }
}
