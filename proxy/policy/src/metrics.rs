//! The policy crate's metric families, registered in the proxy's one registry.
//!
//! Counters: `retries_total{target_service,reason}`,
//! `retry_budget_exhausted_total{target_service}`, `timeouts_total{target_service,kind}`
//! (`request` or `per_try`), `rate_limited_total{direction,target_service}` and
//! `faults_total{target_service,kind}` (`delay` or `abort`). Read at scrape time from the
//! balancers and breakers that are alive then: `balancer_endpoints{target_service,state}`
//! (`total`, `available`), `endpoint_latency_ewma_ms{target_service,endpoint}` (the
//! balancer's peak-EWMA latency estimate) and `breaker_state{target_service,endpoint,state}` (1 for the
//! endpoint's current state — `closed`, `open` or `half_open` — 0 for the others). Sources are
//! held weakly, so a service's stack that is dropped takes its series with it.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use ferrule_proxy_core::metrics::{Direction, Metrics, TcpLabels};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::balance::{Balancer, WeakBalancer};
use crate::breaker::EndpointState;
use crate::retry::RetryReason;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    target_service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RetryLabels {
    target_service: String,
    reason: RetryReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    target_service: String,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BreakerLabels {
    target_service: String,
    endpoint: String,
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    target_service: String,
    endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BalancerLabels {
    target_service: String,
    state: &'static str,
}

/// Reads the breaker state of each endpoint of a service, at scrape time; `None` once the
/// service is gone.
pub type BreakerStates = Box<dyn Fn() -> Option<Vec<(String, EndpointState)>> + Send + Sync>;

/// The policy families. Cheap to clone (one reference count: layers hold a clone each, and
/// requests clone layers); clones record into the same families.
#[derive(Clone)]
pub struct PolicyMetrics(Arc<Families>);

struct Families {
    retries: Family<RetryLabels, Counter>,
    retry_budget_exhausted: Family<ServiceLabels, Counter>,
    timeouts: Family<KindLabels, Counter>,
    rate_limited: Family<TcpLabels, Counter>,
    faults: Family<KindLabels, Counter>,
    sources: Arc<ScrapeSources>,
    /// The retry reasons counted per target, so [`PolicyMetrics::forget`] finds the series.
    retry_reasons: Arc<Mutex<HashMap<String, Vec<RetryReason>>>>,
}

impl PolicyMetrics {
    /// Registers the families in `metrics`' registry.
    pub fn register(metrics: &Metrics) -> Self {
        let this = Families {
            retries: Family::default(),
            retry_budget_exhausted: Family::default(),
            timeouts: Family::default(),
            rate_limited: Family::default(),
            faults: Family::default(),
            sources: Arc::default(),
            retry_reasons: Arc::default(),
        };
        metrics.register(
            "retries",
            "Retried attempts, by the reason the previous attempt failed",
            this.retries.clone(),
        );
        metrics.register(
            "retry_budget_exhausted",
            "Failures returned without a retry because the retry budget was spent",
            this.retry_budget_exhausted.clone(),
        );
        metrics.register(
            "timeouts",
            "Request (kind=request) and attempt (kind=per_try) timeouts that fired",
            this.timeouts.clone(),
        );
        metrics.register(
            "rate_limited",
            "Requests refused by a local rate limit",
            this.rate_limited.clone(),
        );
        metrics.register(
            "faults",
            "Faults injected by routes, by kind (delay, abort)",
            this.faults.clone(),
        );
        metrics.register_collector(Box::new(this.sources.clone()));
        Self(Arc::new(this))
    }

    /// Counts one retry of a request to `target`.
    pub fn retry(&self, target: &str, reason: RetryReason) {
        {
            let mut seen = lock(&self.0.retry_reasons);
            let reasons = seen.entry(target.to_string()).or_default();
            if !reasons.contains(&reason) {
                reasons.push(reason);
            }
        }
        self.0
            .retries
            .get_or_create(&RetryLabels {
                target_service: target.to_string(),
                reason,
            })
            .inc();
    }

    pub fn retry_budget_exhausted(&self, target: &str) {
        self.0
            .retry_budget_exhausted
            .get_or_create(&ServiceLabels {
                target_service: target.to_string(),
            })
            .inc();
    }

    /// Counts a timeout of `kind` ("request" or "per_try").
    pub fn timeout(&self, target: &str, kind: &'static str) {
        self.0
            .timeouts
            .get_or_create(&KindLabels {
                target_service: target.to_string(),
                kind,
            })
            .inc();
    }

    pub fn rate_limited(&self, direction: Direction, target: &str) {
        self.0
            .rate_limited
            .get_or_create(&Metrics::tcp_labels(direction, target))
            .inc();
    }

    /// Counts an injected fault of `kind` ("delay" or "abort").
    pub fn fault(&self, target: &str, kind: &'static str) {
        self.0
            .faults
            .get_or_create(&KindLabels {
                target_service: target.to_string(),
                kind,
            })
            .inc();
    }

    /// Removes every series of `target`: the proxy forgot it (idle), so `/metrics` forgets
    /// it too. Counting again later starts the series from zero, as after a restart.
    pub fn forget(&self, target: &str) {
        let target_service = target.to_string();
        for reason in lock(&self.0.retry_reasons)
            .remove(target)
            .unwrap_or_default()
        {
            self.0.retries.remove(&RetryLabels {
                target_service: target_service.clone(),
                reason,
            });
        }
        self.0.retry_budget_exhausted.remove(&ServiceLabels {
            target_service: target_service.clone(),
        });
        for kind in ["request", "per_try"] {
            self.0.timeouts.remove(&KindLabels {
                target_service: target_service.clone(),
                kind,
            });
        }
        for kind in ["delay", "abort"] {
            self.0.faults.remove(&KindLabels {
                target_service: target_service.clone(),
                kind,
            });
        }
        for direction in [Direction::Inbound, Direction::Outbound, Direction::Gateway] {
            self.0
                .rate_limited
                .remove(&Metrics::tcp_labels(direction, target));
        }
    }

    /// Reports `balancer`'s endpoint counts under `target` at every scrape while it lives.
    pub fn watch_balancer(&self, target: String, balancer: &Balancer) {
        lock(&self.0.sources.balancers).push((target, balancer.downgrade()));
    }

    /// Reports the breaker states `states` reads under `target` at every scrape, until it
    /// answers `None`.
    pub fn watch_breakers(&self, target: String, states: BreakerStates) {
        lock(&self.0.sources.breakers).push((target, states));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The lists are only pushed to and pruned; a panic cannot leave one half-changed.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Balancers and breakers whose state `/metrics` shows, read at each scrape.
#[derive(Default)]
struct ScrapeSources {
    balancers: Mutex<Vec<(String, WeakBalancer)>>,
    breakers: Mutex<Vec<(String, BreakerStates)>>,
}

impl fmt::Debug for ScrapeSources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrapeSources").finish_non_exhaustive()
    }
}

impl Collector for ScrapeSources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let endpoints = Family::<BalancerLabels, Gauge>::default();
        let ewma = Family::<EndpointLabels, Gauge<f64, AtomicU64>>::default();
        lock(&self.balancers).retain(|(target, balancer)| {
            let Some(balancer) = balancer.upgrade() else {
                return false;
            };
            for (endpoint, ms) in balancer.latency_ewma_ms() {
                ewma.get_or_create(&EndpointLabels {
                    target_service: target.clone(),
                    endpoint,
                })
                .set(ms);
            }
            let (total, available) = balancer.counts();
            for (state, n) in [("total", total), ("available", available)] {
                endpoints
                    .get_or_create(&BalancerLabels {
                        target_service: target.clone(),
                        state,
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            true
        });
        let breakers = Family::<BreakerLabels, Gauge>::default();
        lock(&self.breakers).retain(|(target, states)| {
            let Some(states) = states() else {
                return false;
            };
            for (endpoint, current) in states {
                for state in [
                    EndpointState::Closed,
                    EndpointState::Open,
                    EndpointState::HalfOpen,
                ] {
                    breakers
                        .get_or_create(&BreakerLabels {
                            target_service: target.clone(),
                            endpoint: endpoint.clone(),
                            state: state.as_str(),
                        })
                        .set(i64::from(state == current));
                }
            }
            true
        });
        let e = encoder.encode_descriptor(
            "balancer_endpoints",
            "Endpoints known to each balancer (state=total) and available to it (state=available)",
            None,
            endpoints.metric_type(),
        )?;
        endpoints.encode(e)?;
        let e = encoder.encode_descriptor(
            "endpoint_latency_ewma_ms",
            "Each endpoint's peak-EWMA latency estimate as its balancer sees it, in milliseconds",
            None,
            ewma.metric_type(),
        )?;
        ewma.encode(e)?;
        let e = encoder.encode_descriptor(
            "breaker_state",
            "Circuit breaker state per endpoint: 1 for the current state, 0 for the others",
            None,
            breakers.metric_type(),
        )?;
        breakers.encode(e)
    }
}
