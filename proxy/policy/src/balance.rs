//! Load balancer: which endpoint of one service port gets the next request.
//!
//! A [`Balancer`] follows the discovery `watch` channel of its target and keeps, per endpoint,
//! the number of requests in flight and a peak-EWMA latency estimate. The default algorithm is
//! Linkerd's: power of two choices, comparing `latency × (in_flight + 1) / weight` of two
//! random endpoints. The estimate is peak-sensitive (a slower sample replaces it at once) and
//! decays towards faster samples, and towards zero while unused, with a 10 s time constant, so
//! an endpoint that was slow gets tried again later. Round robin (smooth weighted) and least
//! request are options.
//!
//! An endpoint whose connect failed is taken out for 1 s, doubling per consecutive failure up
//! to 30 s; once its backoff expires it is picked again and a success brings it fully back.
//! Endpoints that leave discovery are never picked again. State is a small `Vec` under a
//! mutex that is never held across an await.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::endpoint::EndpointTarget;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

/// Latency assumed for an endpoint with no sample yet (Linkerd's default).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the latency estimate's decay.
const DECAY: Duration = Duration::from_secs(10);
const FAILURE_BACKOFF_BASE: Duration = Duration::from_secs(1);
const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Endpoints of one service port, as last known.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    /// Store revision of the last update applied.
    pub version: i64,
    /// Endpoints whose `port_name` matches the resolved target, resolved for dialling.
    pub endpoints: Arc<[EndpointTarget]>,
    /// True once at least one snapshot arrived for this service.
    pub synced: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency (default).
    #[default]
    PeakEwma,
    RoundRobin,
    LeastRequest,
}

impl Algorithm {
    /// The name [`FromStr`] accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::PeakEwma => "p2c-ewma",
            Algorithm::RoundRobin => "round-robin",
            Algorithm::LeastRequest => "least-request",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = String;
    /// "p2c-ewma" | "round-robin" | "least-request"
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Algorithm::PeakEwma,
            Algorithm::RoundRobin,
            Algorithm::LeastRequest,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
        .ok_or_else(|| {
            format!(
                "unknown load balancer {s:?}: expected \"p2c-ewma\", \"round-robin\" or \"least-request\""
            )
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    /// Discovery knows no endpoint for the service (after waiting).
    #[error("no endpoints")]
    NoEndpoints,
    /// Endpoints exist but all are taken out after connect failures (after waiting).
    #[error("all endpoints unavailable")]
    Unavailable,
    /// Every endpoint that could take the request is refused by the caller's filter (its
    /// circuit breaker ejected them): returned at once, without waiting.
    #[error("all endpoints ejected")]
    Ejected,
    /// [`MAX_WAITING`] requests already wait for an endpoint: refused at once rather than
    /// queued without bound.
    #[error("{MAX_WAITING} requests already wait for an endpoint")]
    TooManyWaiting,
}

/// Requests that may wait for an endpoint of one balancer at a time (while discovery has
/// none yet, or every endpoint is taken out); more fail fast.
pub const MAX_WAITING: usize = 1_000;

/// Counts one request waiting in [`Balancer::pick_admitted`] for as long as it waits.
struct Waiter<'a>(&'a AtomicUsize);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Picks endpoints for one service port. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
}

/// A balancer that does not keep it alive (metrics read it while the service exists).
#[derive(Clone)]
pub struct WeakBalancer(std::sync::Weak<Shared>);

impl WeakBalancer {
    pub fn upgrade(&self) -> Option<Balancer> {
        self.0.upgrade().map(|shared| Balancer { shared })
    }
}

struct Shared {
    /// Never advanced itself: each `pick` clones it to wait for changes.
    endpoints: watch::Receiver<Endpoints>,
    algorithm: Algorithm,
    state: Mutex<State>,
    /// Requests waiting for an endpoint now.
    waiting: AtomicUsize,
}

#[derive(Default)]
struct State {
    /// The discovery set `slots` was built from (compared by pointer).
    applied: Option<Arc<[EndpointTarget]>>,
    slots: Vec<Slot>,
    /// The indexes of the slots a pick may choose from, kept between picks so that a pick
    /// allocates nothing.
    available: Vec<usize>,
}

struct Slot {
    endpoint: EndpointTarget,
    weight: u32,
    load: Arc<Load>,
    /// Smooth weighted round robin's running weight.
    current: i64,
}

/// Per-endpoint load, shared with the [`Pick`]s in flight.
struct Load {
    in_flight: AtomicUsize,
    health: Mutex<Health>,
}

struct Health {
    /// Peak-EWMA latency estimate, in nanoseconds, as of `updated`.
    rtt_ns: f64,
    updated: Instant,
    consecutive_failures: u32,
    down_until: Option<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay consistent across a panic (plain numbers), so keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Load {
    fn new(now: Instant) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            health: Mutex::new(Health {
                rtt_ns: DEFAULT_RTT.as_nanos() as f64,
                updated: now,
                consecutive_failures: 0,
                down_until: None,
            }),
        }
    }

    fn available(&self, now: Instant) -> bool {
        lock(&self.health).down_until.is_none_or(|t| t <= now)
    }

    fn down_until(&self) -> Option<Instant> {
        lock(&self.health).down_until
    }

    /// `latency × (in_flight + 1)`, the latency decayed to `now`.
    fn cost(&self, now: Instant) -> f64 {
        let rtt = lock(&self.health).rtt_at(now);
        rtt * (self.in_flight.load(Ordering::Relaxed) + 1) as f64
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        let mut h = lock(&self.health);
        let sample = rtt.as_nanos() as f64;
        let estimate = h.rtt_at(now);
        h.rtt_ns = if sample > estimate {
            sample
        } else {
            let w = decay_weight(now - h.updated);
            // An EWMA in time, not in samples: the older the estimate, the more a sample counts.
            h.rtt_ns * w + sample * (1.0 - w)
        };
        h.updated = now;
        h.consecutive_failures = 0;
        h.down_until = None;
    }

    /// Takes the endpoint out; returns for how long, or `None` when it was already out (a
    /// burst of failures from requests started before the first one counts once).
    fn fail(&self, now: Instant) -> Option<Duration> {
        let mut h = lock(&self.health);
        if h.down_until.is_some_and(|t| t > now) {
            return None;
        }
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        let exp = (h.consecutive_failures - 1).min(16);
        let backoff = (FAILURE_BACKOFF_BASE * 2u32.pow(exp)).min(FAILURE_BACKOFF_MAX);
        h.down_until = Some(now + backoff);
        Some(backoff)
    }
}

impl Health {
    fn rtt_at(&self, now: Instant) -> f64 {
        self.rtt_ns * decay_weight(now.saturating_duration_since(self.updated))
    }
}

/// How much of an estimate `elapsed` old still counts.
fn decay_weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

/// Why no endpoint could be picked right now.
struct Blocked {
    /// No endpoint known at all (rather than all taken out).
    empty: bool,
    /// Endpoints are up but the caller's filter refused every one.
    ejected: bool,
    /// When the first taken-out endpoint comes back.
    retry_at: Option<Instant>,
}

impl State {
    /// Rebuilds the slots when discovery published a new set, keeping the load of endpoints
    /// that stay.
    fn sync(&mut self, endpoints: &Arc<[EndpointTarget]>, now: Instant) {
        if self
            .applied
            .as_ref()
            .is_some_and(|a| Arc::ptr_eq(a, endpoints))
        {
            return;
        }
        let mut old: HashMap<Arc<str>, Slot> = self
            .slots
            .drain(..)
            .map(|slot| (slot.endpoint.key.clone(), slot))
            .collect();
        self.slots = endpoints
            .iter()
            .map(|ep| {
                let (load, current) = match old.remove(&ep.key) {
                    Some(slot) => (slot.load, slot.current),
                    None => (Arc::new(Load::new(now)), 0),
                };
                Slot {
                    endpoint: ep.clone(),
                    weight: ep.weight.max(1),
                    load,
                    current,
                }
            })
            .collect();
        self.applied = Some(endpoints.clone());
    }

    fn choose(
        &mut self,
        algorithm: Algorithm,
        now: Instant,
        admit: &dyn Fn(&str) -> bool,
    ) -> Result<usize, Blocked> {
        let mut available = std::mem::take(&mut self.available);
        available.clear();
        let mut up = false;
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.load.available(now) {
                up = true;
                if admit(&slot.endpoint.key) {
                    available.push(i);
                }
            }
        }
        if available.is_empty() {
            self.available = available;
            return Err(Blocked {
                empty: self.slots.is_empty(),
                ejected: up,
                retry_at: self.slots.iter().filter_map(|s| s.load.down_until()).min(),
            });
        }
        let cost = |i: usize| self.slots[i].load.cost(now) / f64::from(self.slots[i].weight);
        let requests = |i: usize| {
            (self.slots[i].load.in_flight.load(Ordering::Relaxed) + 1) as f64
                / f64::from(self.slots[i].weight)
        };
        let mut rng = rand::rng();
        let chosen = match algorithm {
            Algorithm::PeakEwma if available.len() == 1 => available[0],
            Algorithm::PeakEwma => {
                let a = rng.random_range(0..available.len());
                let mut b = rng.random_range(0..available.len() - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (available[a], available[b]);
                if cost(b) < cost(a) { b } else { a }
            }
            Algorithm::LeastRequest => {
                // Start the scan at a random place so ties spread out.
                let start = rng.random_range(0..available.len());
                (0..available.len())
                    .map(|k| available[(start + k) % available.len()])
                    .min_by(|&x, &y| requests(x).total_cmp(&requests(y)))
                    .unwrap_or(available[0])
            }
            Algorithm::RoundRobin => {
                let total: i64 = available
                    .iter()
                    .map(|&i| i64::from(self.slots[i].weight))
                    .sum();
                let mut best = available[0];
                for &i in &available {
                    self.slots[i].current += i64::from(self.slots[i].weight);
                    if self.slots[i].current > self.slots[best].current {
                        best = i;
                    }
                }
                self.slots[best].current -= total;
                best
            }
        };
        self.available = available;
        Ok(chosen)
    }
}

impl Balancer {
    pub fn new(endpoints: watch::Receiver<Endpoints>, algorithm: Algorithm) -> Self {
        Self {
            shared: Arc::new(Shared {
                endpoints,
                algorithm,
                state: Mutex::default(),
                waiting: AtomicUsize::new(0),
            }),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.shared.algorithm
    }

    /// Waits up to `wait` for an available endpoint and picks one.
    pub async fn pick(&self, wait: Duration) -> Result<Pick, BalanceError> {
        self.pick_admitted(wait, &|_| true).await
    }

    /// [`Balancer::pick_admitted`] without waiting: the pick when an endpoint is available
    /// now, else `None` (and `pick_admitted` says why, or waits). Most picks are made here,
    /// without a future.
    pub fn pick_now(&self, admit: &dyn Fn(&str) -> bool) -> Option<Pick> {
        let endpoints = self.shared.endpoints.borrow().endpoints.clone();
        self.try_pick(&endpoints, admit).ok()
    }

    /// Like [`Balancer::pick`], among the endpoints (by [`EndpointTarget::key`]) that `admit`
    /// accepts; fails at once with [`BalanceError::Ejected`] when it accepts none of those
    /// that are up.
    pub async fn pick_admitted(
        &self,
        wait: Duration,
        admit: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Pick, BalanceError> {
        let deadline = Instant::now() + wait;
        let mut rx = self.shared.endpoints.clone();
        let mut discovery_open = true;
        let mut waiter = None;
        loop {
            let endpoints = rx.borrow_and_update().endpoints.clone();
            let blocked = match self.try_pick(&endpoints, admit) {
                Ok(pick) => return Ok(pick),
                Err(blocked) => blocked,
            };
            if blocked.ejected {
                return Err(BalanceError::Ejected);
            }
            if Instant::now() >= deadline {
                return Err(if blocked.empty {
                    BalanceError::NoEndpoints
                } else {
                    BalanceError::Unavailable
                });
            }
            if waiter.is_none() {
                let waiting = &self.shared.waiting;
                if waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
                    waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(BalanceError::TooManyWaiting);
                }
                waiter = Some(Waiter(waiting));
            }
            let wake = blocked.retry_at.map_or(deadline, |t| t.min(deadline));
            tokio::select! {
                changed = rx.changed(), if discovery_open => discovery_open = changed.is_ok(),
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn try_pick(
        &self,
        endpoints: &Arc<[EndpointTarget]>,
        admit: &dyn Fn(&str) -> bool,
    ) -> Result<Pick, Blocked> {
        let now = Instant::now();
        let mut state = lock(&self.shared.state);
        state.sync(endpoints, now);
        let i = state.choose(self.shared.algorithm, now, admit)?;
        let slot = &state.slots[i];
        slot.load.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Pick {
            endpoint: slot.endpoint.clone(),
            load: slot.load.clone(),
            started: now,
        })
    }

    /// (total endpoints known, endpoints currently available) for gauges.
    pub fn downgrade(&self) -> WeakBalancer {
        WeakBalancer(Arc::downgrade(&self.shared))
    }

    /// Each endpoint's peak-EWMA latency estimate as of now, in milliseconds, by endpoint key
    /// (an endpoint never measured shows the starting estimate).
    pub fn latency_ewma_ms(&self) -> Vec<(String, f64)> {
        let now = Instant::now();
        let endpoints = self.shared.endpoints.borrow().endpoints.clone();
        let mut state = lock(&self.shared.state);
        state.sync(&endpoints, now);
        state
            .slots
            .iter()
            .map(|s| {
                let rtt_ns = lock(&s.load.health).rtt_at(now);
                (s.endpoint.key.to_string(), rtt_ns / 1e6)
            })
            .collect()
    }

    pub fn counts(&self) -> (usize, usize) {
        let now = Instant::now();
        let endpoints = self.shared.endpoints.borrow().endpoints.clone();
        let mut state = lock(&self.shared.state);
        state.sync(&endpoints, now);
        let available = state.slots.iter().filter(|s| s.load.available(now)).count();
        (state.slots.len(), available)
    }
}

/// One chosen endpoint for one request. Dropping it without recording counts it as cancelled
/// (in-flight released, no latency sample).
pub struct Pick {
    endpoint: EndpointTarget,
    load: Arc<Load>,
    started: Instant,
}

impl Pick {
    pub fn endpoint(&self) -> &EndpointTarget {
        &self.endpoint
    }

    /// The endpoint's key (see [`EndpointTarget::key`]).
    pub fn key(&self) -> &str {
        &self.endpoint.key
    }

    /// The response head arrived: feeds the latency estimate.
    pub fn record_success(self) {
        let now = Instant::now();
        self.load.observe(now - self.started, now);
    }

    /// Connecting failed: takes the endpoint out until it recovers.
    pub fn record_connect_failure(self) {
        if let Some(backoff) = self.load.fail(Instant::now()) {
            tracing::info!(
                endpoint = %self.endpoint.key,
                service = %self.endpoint.service,
                ?backoff,
                "endpoint taken out of balancing after a connect failure"
            );
        }
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ferrule_proto::v1::Endpoint;

    use super::*;

    fn ep(port: u32) -> Endpoint {
        Endpoint {
            service: "user".into(),
            address: "127.0.0.1".into(),
            port,
            ..Default::default()
        }
    }

    fn endpoints(eps: Vec<Endpoint>) -> Endpoints {
        Endpoints {
            version: 1,
            endpoints: EndpointTarget::resolve_all(&eps),
            synced: true,
        }
    }

    fn balancer(ports: &[u32], algorithm: Algorithm) -> (watch::Sender<Endpoints>, Balancer) {
        let (tx, rx) = watch::channel(endpoints(ports.iter().map(|&p| ep(p)).collect()));
        (tx, Balancer::new(rx, algorithm))
    }

    const NO_WAIT: Duration = Duration::ZERO;

    /// Runs `requests` requests from `concurrency` clients; each holds its pick for the
    /// latency `latency(port)` of virtual time. Returns picks per port.
    async fn load(
        b: &Balancer,
        concurrency: usize,
        requests: usize,
        latency: fn(u32) -> Duration,
    ) -> BTreeMap<u32, usize> {
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let clients: Vec<_> = (0..concurrency)
            .map(|_| {
                let (b, counts) = (b.clone(), counts.clone());
                tokio::spawn(async move {
                    for _ in 0..requests / concurrency {
                        let pick = b.pick(NO_WAIT).await.unwrap();
                        let port = pick.endpoint().port();
                        *lock(&counts).entry(port).or_insert(0) += 1;
                        tokio::time::sleep(latency(port)).await;
                        pick.record_success();
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        lock(&counts).clone()
    }

    #[test]
    fn algorithm_names_round_trip() {
        for a in [
            Algorithm::PeakEwma,
            Algorithm::RoundRobin,
            Algorithm::LeastRequest,
        ] {
            assert_eq!(a.to_string().parse::<Algorithm>(), Ok(a));
        }
        assert!(
            "random"
                .parse::<Algorithm>()
                .unwrap_err()
                .contains("random")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_algorithm_spreads_over_all_endpoints() {
        for algorithm in [
            Algorithm::PeakEwma,
            Algorithm::RoundRobin,
            Algorithm::LeastRequest,
        ] {
            let (_tx, b) = balancer(&[1, 2, 3], algorithm);
            let counts = load(&b, 4, 600, |_| Duration::from_millis(5)).await;
            assert_eq!(counts.len(), 3, "{algorithm}: {counts:?}");
            for (port, n) in &counts {
                assert!(*n >= 100, "{algorithm}: port {port} got {n} of 600");
            }
            if algorithm == Algorithm::RoundRobin {
                assert!(counts.values().all(|&n| n == 200), "{counts:?}");
            }
            assert_eq!(b.counts(), (3, 3));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_honours_weights() {
        let mut heavy = ep(2);
        heavy.weight = 3;
        let (_tx, rx) = watch::channel(endpoints(vec![ep(1), heavy]));
        let b = Balancer::new(rx, Algorithm::RoundRobin);
        let counts = load(&b, 1, 400, |_| Duration::ZERO).await;
        assert_eq!(counts[&1], 100);
        assert_eq!(counts[&2], 300);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_endpoint_gets_less_under_p2c_ewma() {
        let (_tx, b) = balancer(&[1, 2, 3], Algorithm::PeakEwma);
        let counts = load(&b, 4, 1200, |port| {
            Duration::from_millis(if port == 3 { 100 } else { 5 })
        })
        .await;
        let slow = counts.get(&3).copied().unwrap_or(0);
        assert!(
            slow * 5 < counts[&1] && slow * 5 < counts[&2],
            "slow endpoint got too much: {counts:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn least_request_avoids_busy_endpoint() {
        let (_tx, b) = balancer(&[1, 2], Algorithm::LeastRequest);
        let held: Vec<_> = {
            let first = b.pick(NO_WAIT).await.unwrap();
            let busy = first.endpoint().port();
            let mut held = vec![first];
            // Three more: the first goes to the idle one, then they alternate.
            for _ in 0..3 {
                held.push(b.pick(NO_WAIT).await.unwrap());
            }
            let on_busy = held.iter().filter(|p| p.endpoint().port() == busy).count();
            assert_eq!(on_busy, 2);
            held
        };
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_endpoint_is_skipped_then_retried_after_backoff() {
        let (_tx, b) = balancer(&[1, 2], Algorithm::RoundRobin);
        let pick_port = |b: Balancer| async move {
            let p = b.pick(NO_WAIT).await.unwrap();
            let port = p.endpoint().port();
            (port, p)
        };
        // Find endpoint 1 and fail it.
        let (mut port, mut p) = pick_port(b.clone()).await;
        while port != 1 {
            p.record_success();
            (port, p) = pick_port(b.clone()).await;
        }
        p.record_connect_failure();
        assert_eq!(b.counts(), (2, 1));
        for _ in 0..10 {
            let (port, p) = pick_port(b.clone()).await;
            assert_eq!(port, 2, "taken-out endpoint picked");
            p.record_success();
        }

        // After the 1 s backoff it is tried again; failing again doubles the backoff.
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(b.counts(), (2, 2));
        let (mut port, mut p) = pick_port(b.clone()).await;
        while port != 1 {
            p.record_success();
            (port, p) = pick_port(b.clone()).await;
        }
        p.record_connect_failure();
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(b.counts(), (2, 1), "second backoff should be 2 s");
        tokio::time::advance(Duration::from_millis(501)).await;
        assert_eq!(b.counts(), (2, 2));

        // A success clears the failure count: the next failure backs off 1 s again.
        let (mut port, mut p) = pick_port(b.clone()).await;
        while port != 1 {
            p.record_success();
            (port, p) = pick_port(b.clone()).await;
        }
        p.record_success();
        let (mut port, mut p) = pick_port(b.clone()).await;
        while port != 1 {
            p.record_success();
            (port, p) = pick_port(b.clone()).await;
        }
        p.record_connect_failure();
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(b.counts(), (2, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn pick_waits_for_a_taken_out_endpoint_to_come_back() {
        let (_tx, b) = balancer(&[1], Algorithm::PeakEwma);
        b.pick(NO_WAIT).await.unwrap().record_connect_failure();
        assert!(matches!(
            b.pick(Duration::from_millis(500)).await,
            Err(BalanceError::Unavailable)
        ));
        let start = Instant::now();
        let p = b.pick(Duration::from_secs(5)).await.unwrap();
        assert_eq!(p.endpoint().port(), 1);
        assert!(Instant::now() - start < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn pick_waits_for_an_endpoint_that_appears_later() {
        let (tx, b) = balancer(&[], Algorithm::PeakEwma);
        let waiting = tokio::spawn({
            let b = b.clone();
            async move {
                b.pick(Duration::from_secs(5))
                    .await
                    .map(|p| p.endpoint().port())
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        tx.send_replace(endpoints(vec![ep(9)]));
        assert_eq!(waiting.await.unwrap().unwrap(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn pick_now_picks_what_pick_would_without_waiting_and_nothing_else() {
        let (tx, b) = balancer(&[1, 2], Algorithm::RoundRobin);
        let first = b.pick_now(&|_| true).expect("an endpoint is available");
        assert_eq!(b.counts(), (2, 2));
        // The pick counts like pick's: round robin moves on, the load is held until released.
        let second = b.pick_now(&|_| true).unwrap();
        assert_ne!(first.endpoint().port(), second.endpoint().port());
        first.record_success();
        second.record_success();
        // Only admitted endpoints, and none when none is: pick would wait, pick_now does not.
        assert_eq!(
            b.pick_now(&|key| key.ends_with(":2"))
                .unwrap()
                .endpoint()
                .port(),
            2
        );
        assert!(b.pick_now(&|_| false).is_none());
        tx.send_replace(endpoints(vec![]));
        assert!(b.pick_now(&|_| true).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn pick_times_out_with_no_endpoints() {
        let (_tx, b) = balancer(&[], Algorithm::PeakEwma);
        let start = Instant::now();
        let err = b.pick(Duration::from_millis(300)).await.err().unwrap();
        assert!(matches!(err, BalanceError::NoEndpoints), "{err}");
        assert_eq!(Instant::now() - start, Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn removed_endpoints_are_never_picked() {
        let (tx, b) = balancer(&[1, 2], Algorithm::RoundRobin);
        let held = b.pick(NO_WAIT).await.unwrap();
        tx.send_replace(endpoints(vec![ep(2)]));
        for _ in 0..5 {
            assert_eq!(b.pick(NO_WAIT).await.unwrap().endpoint().port(), 2);
        }
        assert_eq!(b.counts(), (1, 1));
        // A pick of a removed endpoint still releases cleanly.
        held.record_success();
        tx.send_replace(endpoints(vec![]));
        assert!(matches!(
            b.pick(NO_WAIT).await.err(),
            Some(BalanceError::NoEndpoints)
        ));
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let load = Load::new(t0);
        let ms = |load: &Load, t| lock(&load.health).rtt_at(t) / 1e6;
        load.observe(Duration::from_millis(100), t0);
        assert!((ms(&load, t0) - 100.0).abs() < 1e-6, "peak taken at once");
        // A fast sample 10 s later: one time constant, so the old value keeps weight 1/e.
        let t1 = t0 + DECAY;
        load.observe(Duration::from_millis(10), t1);
        let expected = 100.0 / std::f64::consts::E + 10.0 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((ms(&load, t1) - expected).abs() < 1e-6, "{}", ms(&load, t1));
        // Unused, the estimate decays towards zero.
        assert!(ms(&load, t1 + DECAY * 3) < expected / 10.0);
    }
}
