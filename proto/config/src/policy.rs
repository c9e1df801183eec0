//! `ServicePolicy`: how callers treat one service — timeouts, retries and their budget,
//! circuit breaking, load balancing, local rate limits and opaque ports.
//!
//! The spec types hold exactly what the user wrote: every section and every field is optional,
//! so a stored policy round-trips unchanged. The proxy works from [`EffectivePolicy`], where
//! each unset field has taken its default; the defaults are the `DEFAULT_*` constants below,
//! written down once here and in `docs/config.md`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::grpc::GrpcCode;

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_RETRY_STATUS_CODES: [u16; 3] = [502, 503, 504];
pub const DEFAULT_RETRY_GRPC_CODES: [GrpcCode; 1] = [GrpcCode::Unavailable];
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
pub const DEFAULT_BACKOFF_JITTER: f64 = 0.5;
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
pub const DEFAULT_BUDGET_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
pub const DEFAULT_FAILURE_RATE_THRESHOLD: f64 = 0.5;
pub const DEFAULT_FAILURE_RATE_MIN_REQUESTS: u32 = 20;
pub const DEFAULT_FAILURE_RATE_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;

/// The `spec` of a `ServicePolicy`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePolicySpec {
    /// The service the policy applies to, for every caller.
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Ports of the service forwarded as plain TCP, without protocol detection
    /// (server-speaks-first protocols).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opaque_ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Whole request, retries included. Unset: no limit.
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub request: Option<Duration>,
    /// One attempt. Unset: no limit besides `request`.
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try: Option<Duration>,
    /// How long an unused upstream connection stays open. Default 90s.
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle: Option<Duration>,
}

/// Retry settings. Also the shape of an `HTTPRoute` rule's `retries`, where each field that is
/// set overrides the service policy's.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Attempts in all, the first included: 1 turns retries off. 1..=10, default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<RetryOn>,
    /// Retry non-idempotent methods (POST, PATCH) too. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub non_idempotent: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

/// Which failures are retried. A list that is set replaces the default list.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryOn {
    /// HTTP statuses, 100..=599. Default [502, 503, 504].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_codes: Option<Vec<u16>>,
    /// gRPC statuses by name or number. Default [UNAVAILABLE].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_codes: Option<Vec<GrpcCode>>,
    /// Failures to connect to an endpoint (always safe: nothing was sent). Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_errors: Option<bool>,
}

/// Exponential backoff between attempts: `min(max, base * 2^(n-1))`, of which a `jitter`
/// fraction is random.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub base: Option<Duration>,
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max: Option<Duration>,
    /// 0..=1, default 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
}

/// Retries may add at most `ratio` of the requests over `window`, plus `minPerSecond`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// 0..=1, default 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<u32>,
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub window: Option<Duration>,
}

/// Per-endpoint ejection (consecutive failures or failure rate) and per-service limits on
/// concurrency.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Failures in a row that eject an endpoint; 0 turns this trigger off. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// Unset: the failure-rate trigger is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<FailureRate>,
    /// First ejection; each further ejection of the same endpoint doubles it. Default 30s.
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_ejection_time: Option<Duration>,
    /// Cap on the grown ejection time. Default 300s.
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_ejection_time: Option<Duration>,
    /// Never eject more than this share of the service's endpoints. 0..=100, default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// Requests in flight to the service per proxy; excess waits in `maxPending`. Unset: no
    /// limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
    /// Requests waiting for a slot; excess fails fast with 503. Unset: 1,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
}

/// Eject an endpoint whose failed share of at least `minRequests` over `window` reaches
/// `threshold`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailureRate {
    /// Failed share, greater than 0 and at most 1. Default 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u32>,
    /// Default 10s.
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub window: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency.
    #[default]
    #[serde(rename = "p2c-ewma")]
    P2cEwma,
    #[serde(rename = "round-robin")]
    RoundRobin,
    #[serde(rename = "least-request")]
    LeastRequest,
}

/// A token bucket per proxy for requests to the service; excess is refused with 429.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Refill rate, at least 1.
    pub requests_per_second: u32,
    /// Bucket size, at least 1. Default: `requestsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// A policy with every default filled in: what the proxy applies.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectivePolicy {
    pub request_timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub idle_timeout: Duration,
    pub retries: EffectiveRetries,
    pub circuit_breaker: EffectiveCircuitBreaker,
    pub load_balancer: LoadBalancer,
    pub rate_limit: Option<EffectiveRateLimit>,
    pub opaque_ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveRetries {
    pub max_attempts: u32,
    pub status_codes: Vec<u16>,
    pub grpc_codes: Vec<GrpcCode>,
    pub connect_errors: bool,
    pub non_idempotent: bool,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub backoff_jitter: f64,
    pub budget_ratio: f64,
    pub budget_min_per_second: u32,
    pub budget_window: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveCircuitBreaker {
    /// 0: the consecutive-failures trigger is off.
    pub consecutive_failures: u32,
    pub failure_rate: Option<EffectiveFailureRate>,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub max_concurrent_requests: Option<u32>,
    pub max_pending: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveFailureRate {
    pub threshold: f64,
    pub min_requests: u32,
    pub window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveRateLimit {
    pub requests_per_second: u32,
    pub burst: u32,
}

impl Default for EffectivePolicy {
    /// What a service with no `ServicePolicy` gets.
    fn default() -> Self {
        ServicePolicySpec::default().effective()
    }
}

impl Default for EffectiveRetries {
    fn default() -> Self {
        Retries::default().apply_to(None)
    }
}

impl ServicePolicySpec {
    /// The policy with every unset field defaulted.
    pub fn effective(&self) -> EffectivePolicy {
        let timeouts = self.timeouts.clone().unwrap_or_default();
        let breaker = self.circuit_breaker.clone().unwrap_or_default();
        EffectivePolicy {
            request_timeout: timeouts.request,
            per_try_timeout: timeouts.per_try,
            idle_timeout: timeouts.idle.unwrap_or(DEFAULT_IDLE_TIMEOUT),
            retries: self.retries.clone().unwrap_or_default().apply_to(None),
            circuit_breaker: EffectiveCircuitBreaker {
                consecutive_failures: breaker
                    .consecutive_failures
                    .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES),
                failure_rate: breaker.failure_rate.map(|r| EffectiveFailureRate {
                    threshold: r.threshold.unwrap_or(DEFAULT_FAILURE_RATE_THRESHOLD),
                    min_requests: r.min_requests.unwrap_or(DEFAULT_FAILURE_RATE_MIN_REQUESTS),
                    window: r.window.unwrap_or(DEFAULT_FAILURE_RATE_WINDOW),
                }),
                base_ejection_time: breaker
                    .base_ejection_time
                    .unwrap_or(DEFAULT_BASE_EJECTION_TIME),
                max_ejection_time: breaker
                    .max_ejection_time
                    .unwrap_or(DEFAULT_MAX_EJECTION_TIME),
                max_ejection_percent: breaker
                    .max_ejection_percent
                    .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT),
                max_concurrent_requests: breaker.max_concurrent_requests,
                max_pending: breaker.max_pending,
            },
            load_balancer: self.load_balancer.unwrap_or_default(),
            rate_limit: self.rate_limit.as_ref().map(|r| EffectiveRateLimit {
                requests_per_second: r.requests_per_second,
                burst: r.burst.unwrap_or(r.requests_per_second),
            }),
            opaque_ports: self.opaque_ports.clone(),
        }
    }
}

impl Retries {
    /// These settings over `base` (a service's effective retries, for a route override), or
    /// over the defaults when `base` is `None`: each field that is set wins.
    pub fn apply_to(&self, base: Option<&EffectiveRetries>) -> EffectiveRetries {
        let on = self.retry_on.clone().unwrap_or_default();
        let backoff = self.backoff.clone().unwrap_or_default();
        let budget = self.budget.clone().unwrap_or_default();
        let or =
            |set: Option<f64>, base: Option<f64>, default: f64| set.or(base).unwrap_or(default);
        EffectiveRetries {
            max_attempts: self
                .max_attempts
                .or(base.map(|b| b.max_attempts))
                .unwrap_or(DEFAULT_MAX_ATTEMPTS),
            status_codes: on
                .status_codes
                .or_else(|| base.map(|b| b.status_codes.clone()))
                .unwrap_or_else(|| DEFAULT_RETRY_STATUS_CODES.to_vec()),
            grpc_codes: on
                .grpc_codes
                .or_else(|| base.map(|b| b.grpc_codes.clone()))
                .unwrap_or_else(|| DEFAULT_RETRY_GRPC_CODES.to_vec()),
            connect_errors: on
                .connect_errors
                .or(base.map(|b| b.connect_errors))
                .unwrap_or(true),
            non_idempotent: self
                .non_idempotent
                .or(base.map(|b| b.non_idempotent))
                .unwrap_or(false),
            backoff_base: backoff
                .base
                .or(base.map(|b| b.backoff_base))
                .unwrap_or(DEFAULT_BACKOFF_BASE),
            backoff_max: backoff
                .max
                .or(base.map(|b| b.backoff_max))
                .unwrap_or(DEFAULT_BACKOFF_MAX),
            backoff_jitter: or(
                backoff.jitter,
                base.map(|b| b.backoff_jitter),
                DEFAULT_BACKOFF_JITTER,
            ),
            budget_ratio: or(
                budget.ratio,
                base.map(|b| b.budget_ratio),
                DEFAULT_BUDGET_RATIO,
            ),
            budget_min_per_second: budget
                .min_per_second
                .or(base.map(|b| b.budget_min_per_second))
                .unwrap_or(DEFAULT_BUDGET_MIN_PER_SECOND),
            budget_window: budget
                .window
                .or(base.map(|b| b.budget_window))
                .unwrap_or(DEFAULT_BUDGET_WINDOW),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_unset_fields() {
        let p = EffectivePolicy::default();
        assert_eq!(p.request_timeout, None);
        assert_eq!(p.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(p.retries.max_attempts, 3);
        assert_eq!(p.retries.status_codes, [502, 503, 504]);
        assert_eq!(p.retries.grpc_codes, [GrpcCode::Unavailable]);
        assert!(p.retries.connect_errors && !p.retries.non_idempotent);
        assert_eq!(p.circuit_breaker.consecutive_failures, 5);
        assert_eq!(p.circuit_breaker.failure_rate, None);
        assert_eq!(p.load_balancer, LoadBalancer::P2cEwma);
        assert_eq!(p.rate_limit, None);

        let spec = ServicePolicySpec {
            rate_limit: Some(RateLimit {
                requests_per_second: 50,
                burst: None,
            }),
            ..Default::default()
        };
        let limit = spec.effective().rate_limit.unwrap();
        assert_eq!((limit.requests_per_second, limit.burst), (50, 50));
    }

    #[test]
    fn route_override_wins_field_by_field() {
        let service = Retries {
            max_attempts: Some(5),
            retry_on: Some(RetryOn {
                status_codes: Some(vec![503]),
                ..Default::default()
            }),
            ..Default::default()
        }
        .apply_to(None);
        let route = Retries {
            non_idempotent: Some(true),
            ..Default::default()
        }
        .apply_to(Some(&service));
        assert_eq!(route.max_attempts, 5);
        assert_eq!(route.status_codes, [503]);
        assert!(route.non_idempotent);
        assert_eq!(route.budget_ratio, DEFAULT_BUDGET_RATIO);
    }
}
