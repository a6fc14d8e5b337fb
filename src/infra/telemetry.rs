//! Logs and spans: JSON logs in production, human-readable logs in a terminal, and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over OTLP/HTTP (the standard
//! `OTEL_*` variables configure the exporter; `OTEL_SERVICE_NAME` overrides the binary's name).
//!
//! Writes log lines to stdout (levels from `RUST_LOG`, default `info`) and spans to the OTLP
//! endpoint. Guarantees: without an endpoint, no span is built for export and calls carry
//! a new span id of the event's trace ([`TraceContext::child`]); with one, the spans of a
//! request, a processor run and a delivery are children of the producer's span, and the
//! `traceparent` sent on names them, so the back end shows one tree.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TracerProvider};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::wire::TraceContext;

/// Whether spans are exported (set once, at start-up).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Flushes the exported spans when dropped: keep it until `main` returns.
#[must_use = "dropping it stops the span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("cannot flush the exported spans: {error}");
        }
    }
}

/// Installs the global subscriber. Call once, from a binary's `main`; `service` names the
/// process in the exported spans.
pub fn init(format: &str, service: &str) -> Telemetry {
    let json = match format {
        "json" => true,
        "pretty" => false,
        _ => !std::io::stdout().is_terminal(),
    };
    let logs = tracing_subscriber::fmt::layer().with_target(false);
    let logs = if json { logs.json().flatten_event(true).boxed() } else { logs.boxed() };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").and_then(|_| exporter(service));
    let spans = provider.as_ref().map(|provider| {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing_opentelemetry::layer().with_tracer(provider.tracer("event-service"))
    });
    tracing_subscriber::registry().with(filter).with(logs).with(spans).init();
    Telemetry { provider }
}

/// The OTLP/HTTP exporter, or `None` (said on stderr) when it cannot be built.
fn exporter(service: &str) -> Option<SdkTracerProvider> {
    // The exporter's HTTP client is the callbacks' (rustls, with the provider chosen there).
    super::callback::install_crypto_provider();
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("OTEL_EXPORTER_OTLP_ENDPOINT is set but the exporter cannot be built: {error}");
            return None;
        }
    };
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let resource = Resource::builder().with_service_name(name).build();
    Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// Makes `span` a child of `parent` (when spans are exported) and returns the context that
/// calls made within it carry. Call it right after creating the span.
pub fn within(span: &Span, parent: &TraceContext) -> TraceContext {
    if !EXPORTING.load(Ordering::Relaxed) {
        return parent.child();
    }
    // A span filtered out by RUST_LOG has no context of its own; the parent's child stands in.
    if span.set_parent(opentelemetry::Context::new().with_remote_span_context(span_context(parent))).is_err() {
        return parent.child();
    }
    own_context(span, parent)
}

/// The context calls made now carry: the current span's, when spans are exported and it was
/// made a child of `parent` with [`within`]; else a new span of `parent`'s trace.
pub fn in_current_span(parent: &TraceContext) -> TraceContext {
    if !EXPORTING.load(Ordering::Relaxed) {
        return parent.child();
    }
    own_context(&Span::current(), parent)
}

fn own_context(span: &Span, parent: &TraceContext) -> TraceContext {
    let context = span.context();
    let own = context.span().span_context().clone();
    if !own.is_valid() || own.trace_id().to_bytes() != parent.trace_id {
        return parent.child();
    }
    TraceContext {
        trace_id: own.trace_id().to_bytes(),
        span_id: own.span_id().to_bytes(),
        flags: own.trace_flags().to_u8(),
        state: parent.state.clone(),
    }
}

fn span_context(trace: &TraceContext) -> SpanContext {
    let state = trace.state.as_deref().and_then(|state| state.parse().ok()).unwrap_or_default();
    SpanContext::new(
        TraceId::from_bytes(trace.trace_id),
        SpanId::from_bytes(trace.span_id),
        TraceFlags::new(trace.flags),
        true,
        state,
    )
}
