//! The tracer of one proxy, from its flags: off without `--otlp-endpoint`, else exporting to
//! that collector with `service.name` set to the proxy's service (or the gateway's name). Its
//! families (`trace_*`) join the proxy's `/metrics`; the sampling ratio can be changed live
//! on the admin listener (`POST /tracing?sample_ratio=R`, see [`crate::admin`]).

use ferrule_proxy_core::metrics::Metrics;
use ferrule_proxy_core::trace::{TraceMetrics, Tracer};
use ferrule_trace::export::{self, ExportConfig, ExportError};
use ferrule_trace::metrics::Register;
use prometheus_client::registry::Metric;

use crate::config::CommonArgs;

struct ProxyRegistry<'a>(&'a Metrics);

impl Register for ProxyRegistry<'_> {
    fn register(&mut self, name: &str, help: &str, metric: impl Metric) {
        self.0.register(name, help, metric);
    }
}

/// The tracer `common`'s flags ask for, for the proxy of `service` (`mode`: sidecar or
/// gateway). Must run on the Tokio runtime (it spawns the export task).
pub fn tracer(
    common: &CommonArgs,
    service: &str,
    mode: &str,
    proxy_id: &str,
    metrics: &Metrics,
) -> Result<Tracer, ExportError> {
    let Some(endpoint) = &common.otlp_endpoint else {
        return Ok(Tracer::default());
    };
    let trace_metrics = TraceMetrics::default();
    trace_metrics.register(&mut ProxyRegistry(metrics));
    let tracer = export::start(
        ExportConfig {
            endpoint: endpoint.clone(),
            protocol: common.otlp_protocol,
            sample_ratio: common.trace_sample_ratio,
            queue_size: common.trace_queue_size,
            resource: vec![
                ("service.name".into(), service.to_string()),
                ("service.instance.id".into(), proxy_id.to_string()),
                ("ferrule.proxy.mode".into(), mode.to_string()),
            ],
        },
        trace_metrics,
    )?;
    tracing::info!(%endpoint, protocol = ?common.otlp_protocol, sample_ratio = common.trace_sample_ratio, "exporting trace spans");
    Ok(tracer)
}
