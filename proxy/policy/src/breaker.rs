//! Circuit breaking: per-endpoint failure accrual ([`FailureAccrual`]) and the per-service
//! concurrency limit ([`ConcurrencyLimit`]).
//!
//! **Failure accrual** follows each endpoint of a service through three states. *Closed*: it
//! takes traffic while its results are counted; `consecutiveFailures` failures in a row, or a
//! failed share of at least `failureRate.threshold` over `failureRate.window` (once
//! `minRequests` were seen), eject it. *Open*: it takes no traffic for `baseEjectionTime ×
//! 2^(n-1)` (n = its ejections so far, the time capped at `maxEjectionTime`). *Half-open*: the
//! ejection time is over and exactly one request, the probe, may go; its success closes the
//! endpoint, its failure opens it again for longer. An endpoint that stays closed for
//! `maxEjectionTime` starts over at `baseEjectionTime` on its next ejection. No ejection
//! happens that would leave more than `maxEjectionPercent` of the service's endpoints ejected:
//! a breaker that ejects everything turns a partial outage into a total one.
//!
//! The balancer asks [`FailureAccrual::try_acquire`] before using an endpoint and reports the
//! outcome on the returned [`Attempt`]; dropping an attempt unreported (a cancelled request)
//! counts as neither, and frees the probe slot if it was the probe. Time is
//! `tokio::time::Instant`, so tests drive it with a paused clock.
//!
//! **The concurrency limit** bounds requests in flight to a service from this proxy
//! (`maxConcurrentRequests`) and those waiting for a slot (`maxPending`, [`DEFAULT_MAX_PENDING`]
//! unless set); a request beyond both fails at once ([`Overloaded`]) instead of queueing
//! without bound. [`Acquire`] is one request's wait, polled, for a service's `poll_ready`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use ferrule_config::EffectiveCircuitBreaker;
use ferrule_proxy_core::FastMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::PollSemaphore;

use super::window::Window;

/// An endpoint's breaker state, as exported in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndpointState {
    Closed,
    Open,
    HalfOpen,
}

impl EndpointState {
    /// The metrics label value.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Closed => "closed",
            EndpointState::Open => "open",
            EndpointState::HalfOpen => "half_open",
        }
    }
}

/// Failure accrual for the endpoints of one service. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct FailureAccrual {
    inner: Arc<Mutex<Accrual>>,
}

#[derive(Debug)]
struct Accrual {
    config: EffectiveCircuitBreaker,
    /// Keyed by the endpoint's key, shared with the [`Attempt`]s in flight: admitting a
    /// request allocates nothing.
    endpoints: FastMap<Arc<str>, Endpoint>,
}

#[derive(Debug)]
struct Endpoint {
    phase: Phase,
    consecutive_failures: u32,
    /// Requests and failures, when the failure-rate trigger is on.
    window: Option<Window>,
    ejections: u32,
    /// When it last became closed (or was first seen).
    closed_since: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl Endpoint {
    fn new(config: &EffectiveCircuitBreaker, now: Instant) -> Self {
        Self {
            phase: Phase::Closed,
            consecutive_failures: 0,
            window: fresh_window(config, now),
            ejections: 0,
            closed_since: now,
        }
    }

    /// Moves an open endpoint whose time is up to half-open.
    fn refresh(&mut self, now: Instant) {
        if let Phase::Open { until } = self.phase
            && now >= until
        {
            self.phase = Phase::HalfOpen { probing: false };
        }
    }

    fn state(&self) -> EndpointState {
        match self.phase {
            Phase::Closed => EndpointState::Closed,
            Phase::Open { .. } => EndpointState::Open,
            Phase::HalfOpen { .. } => EndpointState::HalfOpen,
        }
    }

    /// Whether the failure just counted trips a trigger.
    fn tripped(&mut self, config: &EffectiveCircuitBreaker, now: Instant) -> bool {
        if config.consecutive_failures > 0
            && self.consecutive_failures >= config.consecutive_failures
        {
            return true;
        }
        match (&config.failure_rate, &mut self.window) {
            (Some(rate), Some(window)) => {
                let counts = window.sum(now);
                counts.requests >= u64::from(rate.min_requests)
                    && counts.requests > 0
                    && counts.marked as f64 / counts.requests as f64 >= rate.threshold
            }
            _ => false,
        }
    }

    fn eject(&mut self, config: &EffectiveCircuitBreaker, now: Instant) {
        if self.phase == Phase::Closed
            && now.saturating_duration_since(self.closed_since) >= config.max_ejection_time
        {
            self.ejections = 0;
        }
        self.ejections += 1;
        let time = config
            .base_ejection_time
            .saturating_mul(1 << (self.ejections - 1).min(31))
            .min(config.max_ejection_time);
        self.phase = Phase::Open { until: now + time };
        self.reset_counts(config, now);
    }

    fn close(&mut self, config: &EffectiveCircuitBreaker, now: Instant) {
        self.phase = Phase::Closed;
        self.closed_since = now;
        self.reset_counts(config, now);
    }

    fn reset_counts(&mut self, config: &EffectiveCircuitBreaker, now: Instant) {
        self.consecutive_failures = 0;
        self.window = fresh_window(config, now);
    }
}

fn fresh_window(config: &EffectiveCircuitBreaker, now: Instant) -> Option<Window> {
    config
        .failure_rate
        .as_ref()
        .map(|r| Window::new(r.window, now))
}

impl Accrual {
    /// The state of `key` (an endpoint not known yet starts closed), with the map's own key.
    fn endpoint(&mut self, key: &str, now: Instant) -> (Arc<str>, &mut Endpoint) {
        let key = match self.endpoints.get_key_value(key) {
            Some((known, _)) => known.clone(),
            None => {
                let key: Arc<str> = Arc::from(key);
                let endpoint = Endpoint::new(&self.config, now);
                self.endpoints.insert(key.clone(), endpoint);
                key
            }
        };
        let endpoint = self
            .endpoints
            .get_mut(&key)
            .expect("known or inserted above");
        endpoint.refresh(now);
        (key, endpoint)
    }

    /// Whether one more endpoint may be ejected under `maxEjectionPercent`.
    fn may_eject(&self) -> bool {
        let ejected = self
            .endpoints
            .values()
            .filter(|e| e.phase != Phase::Closed)
            .count();
        (ejected + 1) * 100 <= self.config.max_ejection_percent as usize * self.endpoints.len()
    }

    fn record(&mut self, key: &str, probe: bool, success: bool, now: Instant) {
        let Some(endpoint) = self.endpoints.get_mut(key) else {
            // Removed from discovery while the request was in flight.
            return;
        };
        endpoint.refresh(now);
        let config = &self.config;
        match (endpoint.phase, probe) {
            (Phase::HalfOpen { probing: true }, true) => {
                if success {
                    endpoint.close(config, now);
                    tracing::info!(endpoint = key, "breaker: probe succeeded, endpoint closed");
                } else {
                    endpoint.eject(config, now);
                    tracing::info!(
                        endpoint = key,
                        ejections = endpoint.ejections,
                        "breaker: probe failed, endpoint ejected again"
                    );
                }
            }
            (Phase::Closed, false) => {
                if let Some(window) = &mut endpoint.window {
                    window.add(now, 1, u64::from(!success));
                }
                if success {
                    endpoint.consecutive_failures = 0;
                    return;
                }
                endpoint.consecutive_failures += 1;
                if !endpoint.tripped(config, now) {
                    return;
                }
                if self.may_eject() {
                    let endpoint = self.endpoints.get_mut(key).expect("looked up above");
                    endpoint.eject(&self.config, now);
                    tracing::info!(
                        endpoint = key,
                        ejections = endpoint.ejections,
                        "breaker: endpoint ejected"
                    );
                } else {
                    tracing::debug!(
                        endpoint = key,
                        "breaker: ejection skipped, maxEjectionPercent reached"
                    );
                }
            }
            // Results of requests admitted before the endpoint was ejected say nothing new.
            _ => {}
        }
    }
}

/// Permission to send one request to an endpoint; report how it went.
#[derive(Debug)]
#[must_use = "report the outcome with success() or failure()"]
pub struct Attempt {
    accrual: Arc<Mutex<Accrual>>,
    endpoint: Arc<str>,
    probe: bool,
    reported: bool,
}

impl Attempt {
    /// Whether this is a half-open endpoint's single probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn success(self) {
        self.report(true);
    }

    pub fn failure(self) {
        self.report(false);
    }

    fn report(mut self, success: bool) {
        self.reported = true;
        lock(&self.accrual).record(&self.endpoint, self.probe, success, Instant::now());
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.reported || !self.probe {
            return;
        }
        // A cancelled probe proved nothing: let the next request probe instead.
        let mut accrual = lock(&self.accrual);
        if let Some(endpoint) = accrual.endpoints.get_mut(&self.endpoint)
            && endpoint.phase == (Phase::HalfOpen { probing: true })
        {
            endpoint.phase = Phase::HalfOpen { probing: false };
        }
    }
}

fn lock(accrual: &Mutex<Accrual>) -> MutexGuard<'_, Accrual> {
    // Every update leaves an endpoint in a valid state before the next one starts.
    accrual.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FailureAccrual {
    pub fn new(config: &EffectiveCircuitBreaker) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Accrual {
                config: config.clone(),
                endpoints: FastMap::default(),
            })),
        }
    }

    /// Makes the endpoints known exactly `keys` (as given by discovery): new ones start
    /// closed, known ones keep their state, others are forgotten. The known endpoints are the
    /// base of `maxEjectionPercent`.
    pub fn set_endpoints<I: IntoIterator<Item = String>>(&self, keys: I) {
        let now = Instant::now();
        let mut accrual = lock(&self.inner);
        let mut kept = FastMap::default();
        for key in keys {
            let endpoint = accrual
                .endpoints
                .remove(key.as_str())
                .unwrap_or_else(|| Endpoint::new(&accrual.config, now));
            kept.insert(Arc::from(key), endpoint);
        }
        accrual.endpoints = kept;
    }

    /// Whether `endpoint` may take a request now: closed, or half-open with no probe in
    /// flight. For the balancer to skip ejected endpoints without claiming the probe.
    pub fn is_available(&self, endpoint: &str) -> bool {
        let mut accrual = lock(&self.inner);
        let (_, endpoint) = accrual.endpoint(endpoint, Instant::now());
        matches!(
            endpoint.phase,
            Phase::Closed | Phase::HalfOpen { probing: false }
        )
    }

    /// Admits one request to `endpoint`, or `None` while it is ejected (open, or half-open with
    /// its probe in flight). An endpoint not known yet starts closed.
    pub fn try_acquire(&self, endpoint: &str) -> Option<Attempt> {
        let mut accrual = lock(&self.inner);
        let (endpoint, state) = accrual.endpoint(endpoint, Instant::now());
        let probe = match state.phase {
            Phase::Closed => false,
            Phase::HalfOpen { probing: false } => {
                state.phase = Phase::HalfOpen { probing: true };
                true
            }
            Phase::Open { .. } | Phase::HalfOpen { probing: true } => return None,
        };
        Some(Attempt {
            accrual: self.inner.clone(),
            endpoint,
            probe,
            reported: false,
        })
    }

    /// Every known endpoint's state, for metrics.
    pub fn states(&self) -> Vec<(String, EndpointState)> {
        let now = Instant::now();
        let mut accrual = lock(&self.inner);
        let mut states: Vec<_> = accrual
            .endpoints
            .iter_mut()
            .map(|(key, e)| {
                e.refresh(now);
                (key.to_string(), e.state())
            })
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }
}

/// Requests to a service beyond its concurrency limit and its pending queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "{max_concurrent} requests in flight and {max_pending} waiting: the service's concurrency limit is reached"
)]
pub struct Overloaded {
    pub max_concurrent: u32,
    pub max_pending: u32,
}

/// The per-service limit on requests in flight (`maxConcurrentRequests`) and waiting
/// (`maxPending`). Cheap to clone; clones share the limit.
#[derive(Clone, Debug)]
pub struct ConcurrencyLimit {
    /// `None`: no limit.
    limit: Option<(u32, Arc<Semaphore>)>,
    /// Always set: [`DEFAULT_MAX_PENDING`] unless configured.
    max_pending: Option<u32>,
    pending: Arc<AtomicU32>,
}

/// A slot in flight; dropping it frees the slot.
#[derive(Debug)]
pub struct ConcurrencyPermit {
    _permit: Option<OwnedSemaphorePermit>,
}

/// Counts one waiting request for as long as it waits (also when it is dropped waiting).
#[derive(Debug)]
struct Waiting(Arc<AtomicU32>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Requests that may wait for a concurrency slot when `maxPending` is not set: the queue is
/// bounded by default, so a stalled service costs a fast 503 rather than unbounded memory.
pub const DEFAULT_MAX_PENDING: u32 = 1_000;

impl ConcurrencyLimit {
    pub fn new(max_concurrent: Option<u32>, max_pending: Option<u32>) -> Self {
        Self {
            limit: max_concurrent.map(|n| (n, Arc::new(Semaphore::new(n as usize)))),
            max_pending: Some(max_pending.unwrap_or(DEFAULT_MAX_PENDING)),
            pending: Arc::new(AtomicU32::new(0)),
        }
    }

    /// The limit a circuit-breaker config sets.
    pub fn from_config(config: &EffectiveCircuitBreaker) -> Self {
        Self::new(config.max_concurrent_requests, config.max_pending)
    }

    /// The state of one request's wait for a slot, for a service's `poll_ready`.
    /// Whether a limit is set: without one every request proceeds at once and nothing waits.
    pub fn is_limited(&self) -> bool {
        self.limit.is_some()
    }

    pub fn acquirer(&self) -> Acquire {
        Acquire {
            limit: self.clone(),
            semaphore: None,
            waiting: None,
        }
    }

    /// Requests waiting for a slot now.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Acquire)
    }
}

/// One request's wait for a slot of a [`ConcurrencyLimit`], polled (see
/// [`Acquire::poll_acquire`]). Dropping it while waiting leaves the queue.
#[derive(Debug)]
pub struct Acquire {
    limit: ConcurrencyLimit,
    /// Set once the request had to wait.
    semaphore: Option<PollSemaphore>,
    /// Held while the request counts as pending.
    waiting: Option<Waiting>,
}

impl Acquire {
    /// A slot at once if one is free; `Pending` while waiting in the queue if it has room;
    /// [`Overloaded`] at once if it has none.
    pub fn poll_acquire(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ConcurrencyPermit, Overloaded>> {
        let Some((max_concurrent, semaphore)) = &self.limit.limit else {
            return Poll::Ready(Ok(ConcurrencyPermit { _permit: None }));
        };
        if self.waiting.is_none() {
            if let Ok(permit) = semaphore.clone().try_acquire_owned() {
                return Poll::Ready(Ok(ConcurrencyPermit {
                    _permit: Some(permit),
                }));
            }
            let max_pending = self.limit.max_pending;
            let overloaded = Overloaded {
                max_concurrent: *max_concurrent,
                max_pending: max_pending.unwrap_or(u32::MAX),
            };
            let pending = &self.limit.pending;
            if pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (max_pending.is_none_or(|max| n < max)).then_some(n + 1)
                })
                .is_err()
            {
                return Poll::Ready(Err(overloaded));
            }
            self.waiting = Some(Waiting(pending.clone()));
        }
        let semaphore = self
            .semaphore
            .get_or_insert_with(|| PollSemaphore::new(semaphore.clone()));
        match semaphore.poll_acquire(cx) {
            Poll::Ready(permit) => {
                self.waiting = None;
                self.semaphore = None;
                let permit = permit.expect("the semaphore is never closed");
                Poll::Ready(Ok(ConcurrencyPermit {
                    _permit: Some(permit),
                }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferrule_config::{CircuitBreaker, FailureRate, ServicePolicySpec};

    use super::*;

    fn config(breaker: CircuitBreaker) -> EffectiveCircuitBreaker {
        ServicePolicySpec {
            circuit_breaker: Some(breaker),
            ..Default::default()
        }
        .effective()
        .circuit_breaker
    }

    fn consecutive(n: u32, percent: u32) -> EffectiveCircuitBreaker {
        config(CircuitBreaker {
            consecutive_failures: Some(n),
            base_ejection_time: Some(Duration::from_secs(10)),
            max_ejection_time: Some(Duration::from_secs(35)),
            max_ejection_percent: Some(percent),
            ..Default::default()
        })
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ep{i}")).collect()
    }

    fn fail(b: &FailureAccrual, ep: &str, times: usize) {
        for _ in 0..times {
            b.try_acquire(ep).expect("admitted").failure();
        }
    }

    fn state(b: &FailureAccrual, ep: &str) -> EndpointState {
        b.states().into_iter().find(|(k, _)| k == ep).unwrap().1
    }

    impl ConcurrencyLimit {
        /// A slot for one request, as a service's `poll_ready` gets it.
        async fn acquire(&self) -> Result<ConcurrencyPermit, Overloaded> {
            let mut acquire = self.acquirer();
            std::future::poll_fn(|cx| acquire.poll_acquire(cx)).await
        }
    }

    async fn advance(d: Duration) {
        tokio::time::advance(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_then_one_probe_closes() {
        let b = FailureAccrual::new(&consecutive(3, 100));
        b.set_endpoints(keys(2));
        fail(&b, "ep0", 2);
        b.try_acquire("ep0").unwrap().success();
        fail(&b, "ep0", 2);
        assert_eq!(
            state(&b, "ep0"),
            EndpointState::Closed,
            "a success resets the count"
        );
        fail(&b, "ep0", 1);
        assert_eq!(state(&b, "ep0"), EndpointState::Open);
        assert!(b.try_acquire("ep0").is_none() && !b.is_available("ep0"));
        assert_eq!(state(&b, "ep1"), EndpointState::Closed);

        // No traffic while open.
        advance(Duration::from_millis(9_999)).await;
        assert!(b.try_acquire("ep0").is_none());
        // Then half-open: exactly one probe.
        advance(Duration::from_millis(1)).await;
        assert_eq!(state(&b, "ep0"), EndpointState::HalfOpen);
        assert!(b.is_available("ep0"));
        let probe = b.try_acquire("ep0").expect("the probe");
        assert!(probe.is_probe());
        assert!(b.try_acquire("ep0").is_none(), "only one probe at a time");
        assert!(!b.is_available("ep0"));
        probe.success();
        assert_eq!(state(&b, "ep0"), EndpointState::Closed);
        let normal = b.try_acquire("ep0").unwrap();
        assert!(!normal.is_probe());
        normal.success();
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probes_grow_the_ejection_up_to_the_max() {
        let b = FailureAccrual::new(&consecutive(1, 100));
        b.set_endpoints(keys(1));
        fail(&b, "ep0", 1);
        // 10s, then 20s, then 35s (40s capped), then 35s.
        for secs in [10, 20, 35, 35] {
            advance(Duration::from_secs(secs) - Duration::from_millis(1)).await;
            assert!(b.try_acquire("ep0").is_none(), "still open before {secs}s");
            advance(Duration::from_millis(1)).await;
            b.try_acquire("ep0").expect("probe").failure();
            assert_eq!(state(&b, "ep0"), EndpointState::Open);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_start_over_after_staying_closed() {
        let b = FailureAccrual::new(&consecutive(1, 100));
        b.set_endpoints(keys(1));
        fail(&b, "ep0", 1);
        advance(Duration::from_secs(10)).await;
        b.try_acquire("ep0").unwrap().failure(); // second ejection: 20s
        advance(Duration::from_secs(20)).await;
        b.try_acquire("ep0").unwrap().success();
        // Closed for maxEjectionTime: the next ejection is back to the base time.
        advance(Duration::from_secs(35)).await;
        fail(&b, "ep0", 1);
        advance(Duration::from_secs(10)).await;
        assert!(b.try_acquire("ep0").is_some_and(|a| a.is_probe()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_frees_the_probe_slot() {
        let b = FailureAccrual::new(&consecutive(1, 100));
        b.set_endpoints(keys(1));
        fail(&b, "ep0", 1);
        advance(Duration::from_secs(10)).await;
        drop(b.try_acquire("ep0").unwrap());
        assert!(b.try_acquire("ep0").is_some_and(|a| a.is_probe()));
    }

    #[tokio::test(start_paused = true)]
    async fn never_ejects_more_than_max_percent() {
        let b = FailureAccrual::new(&consecutive(1, 50));
        b.set_endpoints(keys(4));
        for ep in keys(4) {
            fail(&b, &ep, 1);
        }
        let open = b
            .states()
            .iter()
            .filter(|(_, s)| *s != EndpointState::Closed)
            .count();
        assert_eq!(open, 2, "{:?}", b.states());
        // A lone endpoint is never ejected at 50 %.
        let single = FailureAccrual::new(&consecutive(1, 50));
        single.set_endpoints(keys(1));
        fail(&single, "ep0", 10);
        assert_eq!(state(&single, "ep0"), EndpointState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_over_the_window_ejects() {
        let cfg = config(CircuitBreaker {
            consecutive_failures: Some(0),
            failure_rate: Some(FailureRate {
                threshold: Some(0.5),
                min_requests: Some(10),
                window: Some(Duration::from_secs(10)),
            }),
            max_ejection_percent: Some(100),
            ..Default::default()
        });
        let b = FailureAccrual::new(&cfg);
        b.set_endpoints(keys(1));
        // Alternating results: 50 % failed, but below minRequests until the 10th.
        for i in 0..9 {
            let a = b.try_acquire("ep0").unwrap();
            if i % 2 == 0 { a.failure() } else { a.success() }
        }
        assert_eq!(
            state(&b, "ep0"),
            EndpointState::Closed,
            "5/9 but under minRequests"
        );
        // Old results leave the window: a fresh run of mostly successes stays closed.
        advance(Duration::from_secs(11)).await;
        for i in 0..20 {
            let a = b.try_acquire("ep0").unwrap();
            if i % 4 == 0 { a.failure() } else { a.success() }
        }
        assert_eq!(state(&b, "ep0"), EndpointState::Closed, "25 % failed");
        for _ in 0..20 {
            b.try_acquire("ep0").unwrap().failure();
            if state(&b, "ep0") == EndpointState::Open {
                return;
            }
        }
        panic!("never ejected at a rising failure rate");
    }

    #[tokio::test(start_paused = true)]
    async fn results_of_requests_admitted_before_ejection_are_ignored() {
        let b = FailureAccrual::new(&consecutive(1, 100));
        b.set_endpoints(keys(1));
        let late = b.try_acquire("ep0").unwrap();
        fail(&b, "ep0", 1);
        late.success();
        assert_eq!(state(&b, "ep0"), EndpointState::Open);
        b.set_endpoints(Vec::new());
        assert!(b.states().is_empty());
    }

    #[tokio::test]
    async fn concurrency_limit_queues_then_fails_fast() {
        let limit = ConcurrencyLimit::new(Some(2), Some(1));
        let a = limit.acquire().await.unwrap();
        let _b = limit.acquire().await.unwrap();
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await.map(|_| ()) }
        });
        // The third request waits; wait (bounded) until it is counted as pending.
        tokio::time::timeout(Duration::from_secs(5), async {
            while limit.pending() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the third request never queued");
        assert_eq!(
            limit.acquire().await.unwrap_err(),
            Overloaded {
                max_concurrent: 2,
                max_pending: 1
            }
        );
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the queued request never got a slot")
            .unwrap()
            .unwrap();
        assert_eq!(limit.pending(), 0);
    }

    #[tokio::test]
    async fn cancelled_waiters_leave_the_queue() {
        let limit = ConcurrencyLimit::new(Some(1), Some(1));
        let _held = limit.acquire().await.unwrap();
        let wait = tokio::time::timeout(Duration::from_millis(10), limit.acquire()).await;
        assert!(wait.is_err(), "should have waited");
        assert_eq!(limit.pending(), 0);
        // The queue has room again: a new waiter is queued, not refused.
        let again = tokio::time::timeout(Duration::from_millis(10), limit.acquire()).await;
        assert!(again.is_err(), "should have waited, not failed fast");

        let unlimited = ConcurrencyLimit::new(None, Some(0));
        let permits: Vec<_> =
            futures::future::join_all((0..100).map(|_| unlimited.acquire())).await;
        assert!(permits.iter().all(Result::is_ok));
    }
}
