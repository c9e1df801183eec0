//! The controller's Prometheus metrics, served on the admin listener's `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Default)]
pub struct Metrics {
    /// Endpoint registrations accepted.
    pub registrations: Counter,
    /// Discovery streams open to proxies.
    pub discovery_streams: Gauge,
    /// Store watches (one per watched service).
    pub service_watches: Gauge,
    /// Store calls that failed inside background watches.
    pub store_errors: Counter,
    /// Trace export (`trace_*`), when tracing is on.
    pub trace: ferrule_trace::TraceMetrics,
}

impl Metrics {
    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix("ferrule_controller");
        registry.register(
            "registrations",
            "Endpoint registrations accepted",
            self.registrations.clone(),
        );
        registry.register(
            "discovery_streams",
            "Discovery streams open to proxies",
            self.discovery_streams.clone(),
        );
        registry.register(
            "service_watches",
            "Store watches, one per watched service",
            self.service_watches.clone(),
        );
        registry.register(
            "store_errors",
            "Store calls that failed in background watches",
            self.store_errors.clone(),
        );
        self.trace.register(&mut registry);
        let mut out = String::new();
        encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}
