//! The controller's Prometheus metrics, served on the admin listener's `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
    /// Workload certificates the mesh CA signed.
    pub identity_issued: Counter,
    /// Certificate requests refused, by reason.
    pub identity_refused: Family<ReasonLabel, Counter>,
    /// Times the CA's files changed but did not load (the CA in use stayed).
    pub identity_reload_failures: Counter,
    /// Seconds until the issuer expires (negative once it has).
    pub identity_issuer_expiry_seconds: Gauge,
    /// API calls refused by authentication or authorization, by reason.
    pub api_refused: Family<ReasonLabel, Counter>,
    /// Stored values the controller skips because it cannot read them, by area.
    unreadable_keys: Family<AreaLabels, Gauge>,
    /// Trace export (`trace_*`), when tracing is on.
    pub trace: ferrule_trace::TraceMetrics,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Which part of the store a key is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Area {
    /// `/ferrule/config/`.
    Config,
    /// `/ferrule/registry/`.
    Registry,
}

impl Area {
    fn as_str(self) -> &'static str {
        match self {
            Area::Config => "config",
            Area::Registry => "registry",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AreaLabels {
    area: &'static str,
}

impl Metrics {
    /// The count of unreadable stored values under `area`, as last seen by the controller's
    /// watch of it.
    pub fn unreadable_keys(&self, area: Area) -> Gauge {
        self.unreadable_keys
            .get_or_create(&AreaLabels {
                area: area.as_str(),
            })
            .clone()
    }

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
        registry.register(
            "identity_certificates_issued",
            "Workload certificates the mesh CA signed",
            self.identity_issued.clone(),
        );
        registry.register(
            "identity_requests_refused",
            "Certificate requests refused, by reason",
            self.identity_refused.clone(),
        );
        registry.register(
            "api_calls_refused",
            "gRPC calls refused because the caller was not authenticated or not allowed, by reason",
            self.api_refused.clone(),
        );
        registry.register(
            "identity_reload_failures",
            "Times the CA files changed but did not load; the CA in use stayed",
            self.identity_reload_failures.clone(),
        );
        registry.register(
            "identity_issuer_expiry_seconds",
            "Seconds until the mesh CA's issuer certificate expires (negative once it has)",
            self.identity_issuer_expiry_seconds.clone(),
        );
        registry.register(
            "unreadable_keys",
            "Stored values skipped because they cannot be read (area: config or registry)",
            self.unreadable_keys.clone(),
        );
        self.trace.register(&mut registry);
        let mut out = String::new();
        encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}
