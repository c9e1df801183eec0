//! The transport's metric families, registered in the proxy's one registry.
//!
//! `pool_connections{direction,protocol}`: pooled connections open now (lent out or idle);
//! `pool_connects_total{direction,protocol,result}`: handshakes the pools made, `result` being
//! `success` or `failure`. `direction` is the side the pool serves: `inbound` connects to the
//! app, `outbound` to endpoints.

use ferrule_proxy_core::metrics::{Direction, Metrics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::pool::PoolProtocol;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PoolLabels {
    direction: Direction,
    protocol: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConnectLabels {
    direction: Direction,
    protocol: &'static str,
    result: &'static str,
}

/// The pools' families. Cheap to clone; clones record into the same families. The default
/// value records into families no registry encodes (for tests and tools).
#[derive(Clone, Default)]
pub struct PoolMetrics {
    open: Family<PoolLabels, Gauge>,
    connects: Family<ConnectLabels, Counter>,
}

impl PoolMetrics {
    /// Registers the families in `metrics`' registry. Call once per registry; both pools
    /// share the result.
    pub fn register(metrics: &Metrics) -> Self {
        let this = Self::default();
        metrics.register(
            "pool_connections",
            "Pooled connections open now, by the side they serve and their protocol",
            this.open.clone(),
        );
        metrics.register(
            "pool_connects",
            "Connections the pools made (TCP connect and HTTP handshake), by result",
            this.connects.clone(),
        );
        this
    }

    pub(crate) fn open(&self, direction: Direction, protocol: PoolProtocol) -> Gauge {
        self.open
            .get_or_create(&PoolLabels {
                direction,
                protocol: protocol.as_str(),
            })
            .clone()
    }

    pub(crate) fn connect(&self, direction: Direction, protocol: PoolProtocol, success: bool) {
        self.connects(direction, protocol, success).inc();
    }

    /// Handshakes made so far, successful ones or failed ones (read by tests).
    pub fn connects_made(
        &self,
        direction: Direction,
        protocol: PoolProtocol,
        success: bool,
    ) -> u64 {
        self.connects(direction, protocol, success).get()
    }

    fn connects(&self, direction: Direction, protocol: PoolProtocol, success: bool) -> Counter {
        self.connects
            .get_or_create(&ConnectLabels {
                direction,
                protocol: protocol.as_str(),
                result: if success { "success" } else { "failure" },
            })
            .clone()
    }

    /// Pooled connections open now (read by tests).
    pub fn open_connections(&self, direction: Direction, protocol: PoolProtocol) -> i64 {
        self.open(direction, protocol).get()
    }
}
