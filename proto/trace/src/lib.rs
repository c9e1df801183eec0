//! Distributed tracing for Ferrule's proxies and controller.
//!
//! [`context`] reads and writes trace context on the wire (W3C `traceparent`/`tracestate`,
//! B3 single and multi header); [`tracer`] starts spans under a parent with parent-based,
//! ratio sampling that can change live; [`export`] sends finished spans in batches to an
//! OTLP collector (gRPC or HTTP) through a bounded queue whose drops are counted in
//! [`metrics`]; [`receiver`] is a small OTLP receiver keeping the last traces in memory (the
//! dev mesh's and the tests'). The OTLP wire types are those of the `opentelemetry-proto`
//! crate.

pub mod context;
pub mod export;
pub mod metrics;
pub mod receiver;
pub mod tracer;

pub use context::{Extracted, SpanContext, SpanId, TraceId};
pub use export::{ExportConfig, Protocol};
pub use metrics::TraceMetrics;
pub use tracer::{Span, SpanKind, Tracer};

/// The proto module of OTLP, for receivers (the dev mesh keeps the traces it is sent).
pub use opentelemetry_proto::tonic as otlp;
