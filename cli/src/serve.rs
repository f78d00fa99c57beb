//! The HTTP side of long-running commands: `/metrics` (Prometheus), `/healthz` (the process
//! runs) and `/readyz` (it can do its work), plus logging setup and signal handling.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Logs to stderr; `RUST_LOG` filters (default `info`), `RESYNC_LOG_FORMAT=json` for JSON lines.
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("RESYNC_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Cancelled on SIGINT or SIGTERM.
pub(crate) fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                let _ = ctrl_c.await;
                trigger.cancel();
                return;
            }
        };
        #[cfg(unix)]
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested; finishing work in flight");
        trigger.cancel();
    });
    token
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listen` until `shutdown`. `ready` says
/// whether the process can do its work right now.
pub(crate) async fn serve_health(
    listen: SocketAddr,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = install_metrics()?;
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(metrics.render())))
        .route("/healthz", get(|| std::future::ready("ok")))
        .route(
            "/readyz",
            get(move || {
                let ready = ready();
                std::future::ready(if ready {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                })
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for /metrics and health checks (--listen)"))?;
    tracing::info!(%listen, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(err) = served {
            tracing::error!(error = %err, "health server failed");
        }
    });
    Ok(())
}

fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new().install_recorder().context("installing the Prometheus metrics recorder")
}
