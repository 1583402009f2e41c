//! The health server: flanneld's `/healthz` and `/readyz`, plus `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::any;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::metrics::Metrics;

#[derive(Clone)]
struct Shared {
    ready: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

async fn healthz() -> &'static str {
    "flanneld is running"
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
    let listener = TcpListener::bind(addr).await?;
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
