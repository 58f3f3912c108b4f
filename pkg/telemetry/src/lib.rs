//! What every barrage role shares for being operated: logging setup, the
//! HTTP server for `/metrics`, `/healthz` and `/readyz`, and readiness.
//!
//! Metrics are registered on a [`prometheus::Registry`] each role creates and
//! passes in, never on global statics, so tests read exactly what one
//! server exported.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

pub mod trace;
pub use trace::{inject, server_span};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected text or json"
            )),
        }
    }
}

/// Keeps trace export running; flushes pending spans when dropped.
#[must_use = "traces stop being exported when the guard is dropped"]
pub struct TelemetryGuard(Option<opentelemetry_sdk::trace::SdkTracerProvider>);

impl TelemetryGuard {
    /// Flushes pending spans and stops export. The flush blocks until the
    /// exporter has sent them, so it runs on a blocking thread: on a
    /// current-thread runtime the caller's thread keeps driving the
    /// exporter's connection meanwhile (dropping the guard there instead
    /// would wait on a connection nobody drives).
    pub async fn shutdown(mut self) {
        if let Some(p) = self.0.take() {
            let _ = tokio::task::spawn_blocking(move || flush(p)).await;
        }
    }
}

fn flush(p: opentelemetry_sdk::trace::SdkTracerProvider) {
    let _ = p.force_flush();
    let _ = p.shutdown();
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            flush(p);
        }
    }
}

/// Installs the global `tracing` subscriber: `RUST_LOG` filter (default
/// `info`), text or JSON lines on stderr, and OTLP trace export when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`service` names the process unless
/// `OTEL_SERVICE_NAME` does). Must run inside the Tokio runtime.
pub fn init_telemetry(format: LogFormat, service: &str) -> Result<TelemetryGuard, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let provider = if trace::otlp_configured() {
        trace::set_exporting();
        Some(trace::provider(service)?)
    } else {
        None
    };
    // RUST_LOG governs log lines only; traces always carry barrage's own
    // spans (sampling decides what is kept).
    let spans =
        tracing_subscriber::filter::Targets::new().with_target("barrage", tracing::Level::INFO);
    let otel = provider
        .as_ref()
        .map(|p| trace::layer(p).with_filter(spans));
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    Ok(TelemetryGuard(provider))
}

/// Installs logging only (no trace export). Safe to call more than once.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Whether a role is ready to take traffic (`/readyz`). Starts not ready.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A new flag, not ready.
    pub fn new() -> Self {
        Self::default()
    }
    /// Marks the role ready or not.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    /// Whether the role is ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A new metrics registry with process metrics (RSS, fds, CPU) on Linux.
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        let _ = registry.register(Box::new(pc));
    }
    registry
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Routes `/metrics`, `/healthz` and `/readyz`; roles merge their own routes.
pub fn ops_router(registry: Registry, readiness: Readiness) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = render(&registry);
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = readiness.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
                    }
                }
            }),
        )
}

/// Routes `/stats`: a JSON snapshot of what the role holds, for operators.
pub fn stats_route(
    stats: impl Fn() -> serde_json::Value + Clone + Send + Sync + 'static,
) -> Router {
    Router::new().route(
        "/stats",
        get(move || {
            let body = stats();
            async move { axum::Json(body) }
        }),
    )
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!(
            "xml"
                .parse::<LogFormat>()
                .unwrap_err()
                .contains("text or json")
        );
    }

    #[test]
    fn registry_renders_registered_metrics() {
        let r = new_registry();
        let c = prometheus::IntCounter::new("things_total", "things").unwrap();
        r.register(Box::new(c.clone())).unwrap();
        c.inc();
        assert!(render(&r).contains("things_total 1"));
    }
}
