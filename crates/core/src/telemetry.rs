//! Logs and traces. Logs are human-readable by default, JSON with
//! `SWITCHBOARD_LOG_FORMAT=json`. Every process also keeps OpenTelemetry span ids for
//! its `tracing` spans, so a log line can name its trace even when nothing is exported;
//! spans are exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! One trace follows a run from the API request that created it to the worker that
//! executes it: the run keeps the request's W3C `traceparent` in Postgres (not in the
//! Redis job), so a run delivered again after a Redis loss still joins its trace.

use std::collections::HashMap;

use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

/// The default filter: our own crates at info, chatty dependencies at warn.
const DEFAULT_FILTER: &str = "info,sqlx=warn,apalis=warn,apalis_core=warn,apalis_redis=warn,h2=warn,tonic=warn";

/// Keeps the tracer provider alive; `shutdown` flushes the spans not yet exported.
#[must_use = "dropping the guard does not flush; call shutdown at exit"]
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Exports what is still buffered (bounded by the exporter's own timeout). The
    /// flush blocks its thread while the gRPC client, on the runtime, sends.
    pub async fn shutdown(self) {
        if !self.exporting {
            return;
        }
        let provider = self.provider;
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || provider.shutdown()).await {
            eprintln!("could not flush the last spans: {e}");
        }
    }
}

/// Installs the global subscriber for the process playing `role` (`api`, `worker`,
/// …); `format` is `text` or `json`; `RUST_LOG` filters. Must run inside the Tokio
/// runtime: the OTLP exporter's gRPC client lives on it.
pub fn init(format: &str, role: &str) -> Telemetry {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|e| !e.trim().is_empty());
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| format!("switchboard-{role}"));
    let mut builder =
        SdkTracerProvider::builder().with_resource(Resource::builder().with_service_name(service).build());
    let mut problem = None;
    if endpoint.is_some() {
        // The builder reads the endpoint, headers and timeout from the OTEL_EXPORTER_OTLP_* variables.
        match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => problem = Some(e.to_string()),
        }
    }
    let provider = builder.build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel =
        tracing_opentelemetry::layer().with_tracer(provider.tracer("switchboard")).with_tracked_inactivity(false);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let logs = if format.eq_ignore_ascii_case("json") {
        fmt::layer().with_writer(std::io::stderr).json().flatten_event(true).boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).boxed()
    };
    // A second init (tests, `dev` calling in twice) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(filter).with(logs).with(otel).try_init();
    if let Some(problem) = &problem {
        tracing::error!(error = %problem, "OTEL_EXPORTER_OTLP_ENDPOINT is set but the exporter could not be built; spans are not exported");
    } else if let Some(endpoint) = &endpoint {
        tracing::info!(endpoint = %endpoint, "exporting traces over OTLP/gRPC");
    }
    Telemetry { provider, exporting: endpoint.is_some() && problem.is_none() }
}

/// The current span's W3C `traceparent`, to store with a run; `None` outside a trace.
pub fn traceparent() -> Option<String> {
    let cx = Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` (not yet entered) a child of the trace in `traceparent` (a run's, or
/// a request header's) and records the trace id on it, so its log lines carry it.
/// A missing or unreadable parent leaves `span` the root of a trace of its own.
pub fn adopt(span: &Span, traceparent: Option<&str>) {
    if let Some(parent) = traceparent {
        let carrier = HashMap::from([("traceparent".to_string(), parent.to_string())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }
    record_trace_id(span);
}

/// Records `span`'s trace id in its `trace_id` field (declared `Empty`).
pub fn record_trace_id(span: &Span) {
    let cx = span.context();
    let context = cx.span().span_context().clone();
    if context.is_valid() {
        span.record("trace_id", tracing::field::display(context.trace_id()));
    }
}
