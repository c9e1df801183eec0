//! The tracing families: what was exported, what was dropped and why, malformed trace
//! headers, and the export queue's fill level and bound.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Metric;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HeaderLabel {
    header: &'static str,
}

/// Where a binary's metrics go: its registry, under the names given.
pub trait Register {
    fn register(&mut self, name: &str, help: &str, metric: impl Metric);
}

impl Register for prometheus_client::registry::Registry {
    fn register(&mut self, name: &str, help: &str, metric: impl Metric) {
        prometheus_client::registry::Registry::register(self, name, help, metric);
    }
}

/// Cheap to clone; clones count into the same families.
#[derive(Clone, Debug, Default)]
pub struct TraceMetrics {
    exported: Counter,
    dropped: Family<ReasonLabel, Counter>,
    malformed: Family<HeaderLabel, Counter>,
    queued: Gauge<i64, AtomicI64>,
    capacity: Gauge<i64, AtomicI64>,
}

impl TraceMetrics {
    pub fn register(&self, registry: &mut impl Register) {
        registry.register(
            "trace_spans_exported",
            "Spans the collector accepted",
            self.exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans not exported: queue_full (the export queue was at its bound) or \
             export_failed (the collector refused or did not answer in time)",
            self.dropped.clone(),
        );
        registry.register(
            "trace_context_malformed",
            "Requests whose trace header could not be read (they started a new trace)",
            self.malformed.clone(),
        );
        registry.register(
            "trace_queue_spans",
            "Finished spans waiting for export",
            self.queued.clone(),
        );
        registry.register(
            "trace_queue_capacity",
            "The export queue's bound: spans beyond it are dropped, never buffered",
            self.capacity.clone(),
        );
    }

    pub(crate) fn set_capacity(&self, capacity: usize) {
        self.capacity
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
    }

    pub(crate) fn queued(&self) {
        self.queued.inc();
    }

    pub(crate) fn dequeued(&self, n: usize) {
        self.queued.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn exported(&self, n: usize) {
        self.exported.inc_by(n as u64);
    }

    pub(crate) fn dropped_queue_full(&self, n: usize) {
        self.dropped
            .get_or_create(&ReasonLabel {
                reason: "queue_full",
            })
            .inc_by(n as u64);
    }

    pub(crate) fn export_failed(&self, n: usize) {
        self.dropped
            .get_or_create(&ReasonLabel {
                reason: "export_failed",
            })
            .inc_by(n as u64);
    }

    pub(crate) fn malformed(&self, header: &'static str) {
        self.malformed.get_or_create(&HeaderLabel { header }).inc();
    }

    /// Spans dropped for `reason` so far (for tests).
    pub fn dropped_count(&self, reason: &'static str) -> u64 {
        self.dropped.get_or_create(&ReasonLabel { reason }).get()
    }

    /// Spans exported so far (for tests).
    pub fn exported_count(&self) -> u64 {
        self.exported.get()
    }

    /// Spans waiting now.
    pub fn queue_len(&self) -> i64 {
        self.queued.get()
    }
}
