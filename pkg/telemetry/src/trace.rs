//! OpenTelemetry traces over OTLP, and W3C trace context on every gRPC hop.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; then spans are exported
//! over OTLP/gRPC with the standard variables honoured (`OTEL_SERVICE_NAME`,
//! `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`). The
//! `traceparent` of an incoming call becomes the parent of its server span,
//! and every outgoing call carries the current span's context, so one push
//! is one trace across push-manager, controller and connect-nodes.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Whether the environment asks for trace export.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()))
}

/// Builds the OTLP tracer provider; `service` names the process unless
/// `OTEL_SERVICE_NAME` does.
pub(crate) fn provider(service: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The tracing layer that feeds `provider`.
pub(crate) fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing_opentelemetry::layer().with_tracer(provider.tracer("barrage"))
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Puts the current span's trace context into an outgoing request.
pub fn inject<T>(req: &mut tonic::Request<T>) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(req.metadata_mut()))
    });
}

/// Whether this process exports traces (set once by `init_telemetry`).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Marks this process as exporting traces: calls get `info` spans.
pub(crate) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// A server span for an incoming call, child of the caller's trace context
/// when the call carries one. Handlers record `message_id` on it, so log
/// lines and spans of one push carry its id. Without trace export the span
/// is only log context, and a span per call is a measurable share of a
/// push's CPU (BENCHMARKS.md): it is then a `debug` span, opened only when
/// `RUST_LOG` asks for debug.
pub fn server_span(method: &'static str, metadata: &MetadataMap) -> tracing::Span {
    if !EXPORTING.load(Ordering::Relaxed) {
        return tracing::debug_span!(
            "rpc",
            rpc.method = method,
            message_id = tracing::field::Empty
        );
    }
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    let span = tracing::info_span!(
        "rpc",
        otel.name = method,
        rpc.method = method,
        message_id = tracing::field::Empty
    );
    let _ = span.set_parent(parent);
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;

    fn span_at(level: tracing::Level) -> bool {
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::sink)
                .with_filter(tracing_subscriber::filter::LevelFilter::from_level(level)),
        );
        tracing::subscriber::with_default(subscriber, || {
            !server_span("Resolve", &MetadataMap::new()).is_disabled()
        })
    }

    // One test: EXPORTING is process-wide, and the second half sets it.
    #[test]
    fn calls_get_a_span_when_traces_are_exported_or_debug_is_logged() {
        assert!(!span_at(tracing::Level::INFO), "no span per call at info");
        assert!(span_at(tracing::Level::DEBUG), "log context at debug");
        set_exporting();
        assert!(span_at(tracing::Level::INFO), "exported calls have spans");
    }
}
