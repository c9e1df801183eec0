//! Spans: started by a [`Tracer`] under a parent (or as the root of a new trace), given
//! attributes while the request runs, and queued for export when they end (or are dropped).
//!
//! Sampling is parent-based: a span with a parent follows the parent's decision, a new trace
//! is sampled with the tracer's ratio (decided on the trace id, as OpenTelemetry's
//! `TraceIdRatioBased` does, so every hop that starts from the same id agrees). The ratio can
//! be changed while the process runs ([`Tracer::set_sample_ratio`]). An unsampled span still
//! has ids, which are passed on so the next hop knows not to sample, but records nothing.
//! A disabled tracer (`Tracer::default()`) costs one branch per call.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use tokio::sync::mpsc;

use crate::context::{SpanContext, SpanId, TraceId};
use crate::metrics::TraceMetrics;

/// What a span stands for (OpenTelemetry's `SpanKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal,
    Server,
    Client,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<u16> for Value {
    fn from(n: u16) -> Self {
        Value::Int(n.into())
    }
}

impl From<u32> for Value {
    fn from(n: u32) -> Self {
        Value::Int(n.into())
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

/// A span's outcome (OpenTelemetry's status: unset means "no error seen").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Status {
    #[default]
    Unset,
    Error(String),
}

/// A finished span, as the exporter receives it.
#[derive(Debug, Clone)]
pub struct SpanData {
    pub context: SpanContext,
    pub parent_span_id: Option<SpanId>,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    pub status: Status,
}

pub(crate) struct Shared {
    /// The ratio for new traces, as `f64` bits.
    ratio: AtomicU64,
    queue: mpsc::Sender<SpanData>,
    pub(crate) metrics: TraceMetrics,
}

impl Shared {
    pub(crate) fn new(ratio: f64, queue: mpsc::Sender<SpanData>, metrics: TraceMetrics) -> Self {
        Self {
            ratio: AtomicU64::new(clamp(ratio).to_bits()),
            queue,
            metrics,
        }
    }
}

fn clamp(ratio: f64) -> f64 {
    if ratio.is_nan() {
        0.0
    } else {
        ratio.clamp(0.0, 1.0)
    }
}

/// Starts spans. Cheap to clone; `Tracer::default()` is off.
#[derive(Clone, Default)]
pub struct Tracer(pub(crate) Option<Arc<Shared>>);

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("enabled", &self.is_enabled())
            .field("sample_ratio", &self.sample_ratio())
            .finish()
    }
}

impl Tracer {
    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// The share of new traces sampled (0 when tracing is off).
    pub fn sample_ratio(&self) -> f64 {
        self.0
            .as_ref()
            .map_or(0.0, |s| f64::from_bits(s.ratio.load(Ordering::Relaxed)))
    }

    /// Changes the share of new traces sampled, for spans started from now on.
    pub fn set_sample_ratio(&self, ratio: f64) {
        if let Some(shared) = &self.0 {
            shared
                .ratio
                .store(clamp(ratio).to_bits(), Ordering::Relaxed);
        }
    }

    /// Counts a request whose trace header `header` could not be read.
    pub fn malformed(&self, header: &'static str) {
        if let Some(shared) = &self.0 {
            shared.metrics.malformed(header);
        }
    }

    /// Starts a span under `parent`, or as the root of a new trace.
    pub fn start(
        &self,
        name: impl Into<String>,
        kind: SpanKind,
        parent: Option<&SpanContext>,
    ) -> Span {
        let Some(shared) = &self.0 else {
            return Span::disabled();
        };
        let trace_id = parent.map_or_else(TraceId::random, |p| p.trace_id);
        let sampled = match parent {
            Some(p) => p.sampled,
            None => sample(trace_id, self.sample_ratio()),
        };
        let context = SpanContext {
            trace_id,
            span_id: SpanId::random(),
            sampled,
        };
        let record = sampled.then(|| {
            Box::new(Record {
                parent_span_id: parent.map(|p| p.span_id),
                name: name.into(),
                kind,
                start: SystemTime::now(),
                attributes: Vec::with_capacity(16),
                status: Status::Unset,
                shared: shared.clone(),
            })
        });
        Span {
            context: Some(context),
            record,
        }
    }
}

/// The ratio decision on the trace id's low 8 bytes, the same on every hop.
fn sample(trace_id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let low = u64::from_be_bytes(trace_id.0[8..].try_into().expect("8 bytes")) >> 1;
    // Compared in the 63-bit space, as OpenTelemetry's TraceIdRatioBased does.
    (low as f64) < ratio * (1u64 << 63) as f64
}

struct Record {
    parent_span_id: Option<SpanId>,
    name: String,
    kind: SpanKind,
    start: SystemTime,
    attributes: Vec<(&'static str, Value)>,
    status: Status,
    shared: Arc<Shared>,
}

/// One span in progress. It ends when dropped (or [`Span::end`]ed), and is then queued for
/// export if it was sampled.
pub struct Span {
    /// `None` when tracing is off.
    context: Option<SpanContext>,
    /// `None` when not sampled.
    record: Option<Box<Record>>,
}

impl Span {
    /// A span of a disabled tracer: no ids, records nothing.
    pub fn disabled() -> Self {
        Span {
            context: None,
            record: None,
        }
    }

    /// This span's place in the trace, for the next hop (`None` when tracing is off).
    pub fn context(&self) -> Option<SpanContext> {
        self.context
    }

    pub fn is_recording(&self) -> bool {
        self.record.is_some()
    }

    /// Sets an attribute (a no-op on a span that records nothing).
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(record) = &mut self.record {
            record.attributes.push((key, value.into()));
        }
    }

    /// Renames the span, once the request is understood (its route, its RPC).
    pub fn rename(&mut self, name: impl Into<String>) {
        if let Some(record) = &mut self.record {
            record.name = name.into();
        }
    }

    pub fn set_error(&mut self, message: impl Into<String>) {
        if let Some(record) = &mut self.record {
            record.status = Status::Error(message.into());
        }
    }

    pub fn end(self) {}
}

impl Drop for Span {
    fn drop(&mut self) {
        let (Some(record), Some(context)) = (self.record.take(), self.context) else {
            return;
        };
        let Record {
            parent_span_id,
            name,
            kind,
            start,
            attributes,
            status,
            shared,
        } = *record;
        let data = SpanData {
            context,
            parent_span_id,
            name,
            kind,
            start,
            end: SystemTime::now(),
            attributes,
            status,
        };
        // Never waits: a full queue (a slow or dead collector) costs the span, counted.
        match shared.queue.try_send(data) {
            Ok(()) => shared.metrics.queued(),
            Err(_) => shared.metrics.dropped_queue_full(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_decides_on_the_trace_id() {
        let low = TraceId([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let high = TraceId([0xff; 16]);
        assert!(sample(low, 0.01));
        assert!(!sample(high, 0.5));
        assert!(sample(high, 1.0));
        assert!(!sample(low, 0.0));
        let n = 10_000;
        let hits = (0..n).filter(|_| sample(TraceId::random(), 0.25)).count();
        // Far from the expected 2,500 only with negligible probability.
        assert!((2_000..3_000).contains(&hits), "{hits}");
    }

    #[tokio::test]
    async fn children_follow_the_parent_and_a_full_queue_drops() {
        let (tx, mut rx) = mpsc::channel(1);
        let metrics = TraceMetrics::default();
        let tracer = Tracer(Some(Arc::new(Shared::new(0.0, tx, metrics.clone()))));
        // Ratio 0: a new trace is not sampled, records nothing, still has ids.
        let root = tracer.start("root", SpanKind::Server, None);
        assert!(!root.is_recording());
        let unsampled = root.context().unwrap();
        assert!(!unsampled.sampled);
        drop(root);
        let sampled_parent = SpanContext {
            sampled: true,
            ..unsampled
        };
        let mut child = tracer.start("child", SpanKind::Client, Some(&sampled_parent));
        child.set("k", "v");
        let ctx = child.context().unwrap();
        assert_eq!(ctx.trace_id, unsampled.trace_id);
        drop(child);
        // The queue holds one span: the next is dropped and counted.
        drop(tracer.start("lost", SpanKind::Client, Some(&sampled_parent)));
        let got = rx.recv().await.unwrap();
        assert_eq!(got.name, "child");
        assert_eq!(got.parent_span_id, Some(unsampled.span_id));
        assert_eq!(got.attributes, vec![("k", Value::from("v"))]);
        assert_eq!(metrics.dropped_count("queue_full"), 1);
    }
}
