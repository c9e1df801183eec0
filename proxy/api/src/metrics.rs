//! The control-plane clients' metrics, read at scrape time: `controller_connected` (1 while a
//! discovery stream to a controller is established) and `config_version` (the configuration
//! version in force; 0 before any).

use std::fmt;

use ferrule_proxy_core::metrics::Metrics;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::Gauge;

use crate::discovery::Discovery;
use crate::policy::PolicyClient;

/// Registers the gauges of `discovery` and `policies` (absent: the version stays 0).
pub fn register(metrics: &Metrics, discovery: Discovery, policies: Option<PolicyClient>) {
    metrics.register_collector(Box::new(ControlPlane {
        discovery,
        policies,
    }));
}

struct ControlPlane {
    discovery: Discovery,
    policies: Option<PolicyClient>,
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane").finish_non_exhaustive()
    }
}

impl Collector for ControlPlane {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let connected = Gauge::<i64>::default();
        connected.set(i64::from(self.discovery.connected()));
        let e = encoder.encode_descriptor(
            "controller_connected",
            "1 while a discovery stream to a controller is established",
            None,
            connected.metric_type(),
        )?;
        connected.encode(e)?;
        let version = Gauge::<i64>::default();
        version.set(self.policies.as_ref().map_or(0, PolicyClient::version));
        let e = encoder.encode_descriptor(
            "config_version",
            "The configuration version (store revision) in force; 0 before any",
            None,
            version.metric_type(),
        )?;
        version.encode(e)
    }
}
