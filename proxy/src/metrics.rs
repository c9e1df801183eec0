//! The proxy's Prometheus metrics, served on the admin listener's `/metrics`.
//!
//! One [`Metrics`] value (cheap to clone) holds every family; stacks and listeners record into
//! it. Names follow linkerd's: `request_total{direction,target_service,status_code,
//! classification}`, `response_latency_ms` (time to the response head), `tcp_open_connections`,
//! `tcp_read_bytes_total`, `tcp_write_bytes_total`, `protocol_detect_total{result}`,
//! `proxy_errors_total{reason}` and the balancer gauges `balancer_endpoints{state}`.
//!
//! Policy families: `retries_total{target_service,reason}`,
//! `retry_budget_exhausted_total{target_service}`, `timeouts_total{target_service,kind}`
//! (`request` or `per_try`), `rate_limited_total{direction,target_service}`,
//! `faults_total{target_service,kind}` (`delay` or `abort`), `breaker_state{target_service,
//! endpoint,state}` (1 for the endpoint's current state — `closed`, `open` or `half_open` —
//! 0 for the others) and `config_version` (the policy version in force).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::StatusCode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::balance::Balancer;
use crate::discovery::Discovery;
use crate::errors::Reason;
use crate::policy::breaker::EndpointState;
use crate::policy::client::PolicyClient;

/// Which listener a request or connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
    /// The edge listener of gateway mode.
    Gateway,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
            Direction::Gateway => "gateway",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Outcome of protocol detection on one accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DetectResult {
    Http1,
    Http2,
    Opaque,
    /// The port is configured opaque: detection skipped.
    OpaquePort,
    /// Nothing recognisable arrived within the detection timeout: forwarded as opaque.
    Timeout,
    /// Looked like an HTTP/1 request line but was not one: answered 400.
    MalformedHttp,
}

impl EncodeLabelValue for DetectResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        let s = match self {
            DetectResult::Http1 => "http1",
            DetectResult::Http2 => "http2",
            DetectResult::Opaque => "opaque",
            DetectResult::OpaquePort => "opaque_port",
            DetectResult::Timeout => "timeout",
            DetectResult::MalformedHttp => "malformed_http",
        };
        fmt::Write::write_str(encoder, s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    direction: Direction,
    target_service: String,
    status_code: u16,
    classification: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LatencyLabels {
    direction: Direction,
    target_service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    direction: Direction,
    target_service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DetectLabels {
    direction: Direction,
    result: DetectResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    direction: Direction,
    reason: Reason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    target_service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RetryLabels {
    target_service: String,
    reason: String,
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

/// Reads the breaker state of each endpoint of a service, at scrape time.
pub type BreakerStates = Arc<dyn Fn() -> Vec<(String, EndpointState)> + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BalancerLabels {
    target_service: String,
    state: &'static str,
}

const LATENCY_BUCKETS_MS: [f64; 14] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_MS)
}

/// Every metric family of the proxy. Cheap to clone; clones record into the same families.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    tcp_open: Family<TcpLabels, Gauge>,
    tcp_read: Family<TcpLabels, Counter>,
    tcp_write: Family<TcpLabels, Counter>,
    detect: Family<DetectLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    balancer_endpoints: Family<BalancerLabels, Gauge>,
    controller_connected: Gauge,
    retries: Family<RetryLabels, Counter>,
    retry_budget_exhausted: Family<ServiceLabels, Counter>,
    timeouts: Family<KindLabels, Counter>,
    rate_limited: Family<TcpLabels, Counter>,
    faults: Family<KindLabels, Counter>,
    breaker_state: Family<BreakerLabels, Gauge>,
    config_version: Gauge,
    /// Balancers whose endpoint counts are copied into gauges at each scrape.
    balancers: Arc<Mutex<Vec<(String, Balancer)>>>,
    /// Services whose breaker states are copied into gauges at each scrape.
    breakers: Arc<Mutex<Vec<(String, BreakerStates)>>>,
    /// The policy client whose version `config_version` shows.
    policies: Arc<Mutex<Option<PolicyClient>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let tcp_open = Family::<TcpLabels, Gauge>::default();
        let tcp_read = Family::<TcpLabels, Counter>::default();
        let tcp_write = Family::<TcpLabels, Counter>::default();
        let detect = Family::<DetectLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let balancer_endpoints = Family::<BalancerLabels, Gauge>::default();
        let controller_connected = Gauge::default();
        let retries = Family::<RetryLabels, Counter>::default();
        let retry_budget_exhausted = Family::<ServiceLabels, Counter>::default();
        let timeouts = Family::<KindLabels, Counter>::default();
        let rate_limited = Family::<TcpLabels, Counter>::default();
        let faults = Family::<KindLabels, Counter>::default();
        let breaker_state = Family::<BreakerLabels, Gauge>::default();
        let config_version = Gauge::default();
        // prometheus-client appends `_total` to counter names.
        registry.register(
            "request",
            "HTTP requests by direction, target service, status code and classification",
            requests.clone(),
        );
        registry.register(
            "response_latency_ms",
            "Time from request to response head, in milliseconds",
            latency.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "Connections currently open",
            tcp_open.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from accepted connections",
            tcp_read.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to accepted connections",
            tcp_write.clone(),
        );
        registry.register(
            "protocol_detect",
            "Protocol detection outcomes per accepted connection",
            detect.clone(),
        );
        registry.register(
            "proxy_errors",
            "Responses the proxy made itself, by reason",
            errors.clone(),
        );
        registry.register(
            "balancer_endpoints",
            "Endpoints known to each balancer (state=total) and available to it (state=available)",
            balancer_endpoints.clone(),
        );
        registry.register(
            "controller_connected",
            "1 while a discovery stream to a controller is established",
            controller_connected.clone(),
        );
        registry.register(
            "retries",
            "Retried attempts, by the reason the previous attempt failed",
            retries.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Failures returned without a retry because the retry budget was spent",
            retry_budget_exhausted.clone(),
        );
        registry.register(
            "timeouts",
            "Request (kind=request) and attempt (kind=per_try) timeouts that fired",
            timeouts.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a local rate limit",
            rate_limited.clone(),
        );
        registry.register(
            "faults",
            "Faults injected by routes, by kind (delay, abort)",
            faults.clone(),
        );
        registry.register(
            "breaker_state",
            "Circuit breaker state per endpoint: 1 for the current state, 0 for the others",
            breaker_state.clone(),
        );
        registry.register(
            "config_version",
            "The configuration version (store revision) in force; 0 before any",
            config_version.clone(),
        );
        Self {
            registry: Arc::new(registry),
            retries,
            retry_budget_exhausted,
            timeouts,
            rate_limited,
            faults,
            breaker_state,
            config_version,
            breakers: Arc::default(),
            policies: Arc::default(),
            requests,
            latency,
            tcp_open,
            tcp_read,
            tcp_write,
            detect,
            errors,
            balancer_endpoints,
            controller_connected,
            balancers: Arc::default(),
        }
    }

    /// Counts one response (made by the app or by the proxy) and its latency.
    pub fn response(
        &self,
        direction: Direction,
        target: &str,
        status: StatusCode,
        success: bool,
        latency: std::time::Duration,
    ) {
        self.latency(direction, target, latency);
        self.count(direction, target, status, success);
    }

    /// Observes the time to a response head.
    pub fn latency(&self, direction: Direction, target: &str, latency: std::time::Duration) {
        self.latency
            .get_or_create(&LatencyLabels {
                direction,
                target_service: target.to_string(),
            })
            .observe(latency.as_secs_f64() * 1000.0);
    }

    /// Counts a response once its classification is known.
    pub fn count(&self, direction: Direction, target: &str, status: StatusCode, success: bool) {
        self.requests
            .get_or_create(&RequestLabels {
                direction,
                target_service: target.to_string(),
                status_code: status.as_u16(),
                classification: if success { "success" } else { "failure" },
            })
            .inc();
    }

    pub fn proxy_error(&self, direction: Direction, reason: Reason) {
        self.errors
            .get_or_create(&ErrorLabels { direction, reason })
            .inc();
    }

    pub fn detected(&self, direction: Direction, result: DetectResult) {
        self.detect
            .get_or_create(&DetectLabels { direction, result })
            .inc();
    }

    /// Labels for the TCP counters of connections accepted for `target`.
    pub fn tcp_labels(direction: Direction, target: &str) -> TcpLabels {
        TcpLabels {
            direction,
            target_service: target.to_string(),
        }
    }

    /// Wraps an accepted connection so its bytes are counted and it shows as open until
    /// dropped.
    pub fn count_io<T>(&self, labels: &TcpLabels, io: T) -> CountingIo<T> {
        let open = self.tcp_open.get_or_create(labels).clone();
        open.inc();
        CountingIo {
            inner: io,
            read: self.tcp_read.get_or_create(labels).clone(),
            written: self.tcp_write.get_or_create(labels).clone(),
            _open: OpenGuard(open),
        }
    }

    /// Reports `balancer`'s endpoint counts under `target` at every scrape.
    pub fn watch_balancer(&self, target: String, balancer: Balancer) {
        self.balancers
            .lock()
            .expect("balancer list lock poisoned")
            .push((target, balancer));
    }

    /// Counts one retry of a request to `target`.
    pub fn retry(&self, target: &str, reason: &str) {
        self.retries
            .get_or_create(&RetryLabels {
                target_service: target.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn retry_budget_exhausted(&self, target: &str) {
        self.retry_budget_exhausted
            .get_or_create(&ServiceLabels {
                target_service: target.to_string(),
            })
            .inc();
    }

    /// Counts a timeout of `kind` ("request" or "per_try").
    pub fn timeout(&self, target: &str, kind: &'static str) {
        self.timeouts
            .get_or_create(&KindLabels {
                target_service: target.to_string(),
                kind,
            })
            .inc();
    }

    pub fn rate_limited(&self, direction: Direction, target: &str) {
        self.rate_limited
            .get_or_create(&Self::tcp_labels(direction, target))
            .inc();
    }

    /// Counts an injected fault of `kind` ("delay" or "abort").
    pub fn fault(&self, target: &str, kind: &'static str) {
        self.faults
            .get_or_create(&KindLabels {
                target_service: target.to_string(),
                kind,
            })
            .inc();
    }

    /// Reports the breaker states `states` reads under `target` at every scrape.
    pub fn watch_breakers(&self, target: String, states: BreakerStates) {
        self.breakers
            .lock()
            .expect("breaker list lock poisoned")
            .push((target, states));
    }

    /// Reports `client`'s version as `config_version` at every scrape.
    pub fn watch_policies(&self, client: PolicyClient) {
        *self.policies.lock().expect("policy client lock poisoned") = Some(client);
    }

    /// The Prometheus text exposition, with gauges refreshed from their sources first.
    pub fn encode(&self, discovery: Option<&Discovery>) -> Result<String, fmt::Error> {
        // Endpoints leave discovery: start from nothing so their gauges go too.
        self.breaker_state.clear();
        for (target, states) in self
            .breakers
            .lock()
            .expect("breaker list lock poisoned")
            .iter()
        {
            for (endpoint, current) in states() {
                for state in [
                    EndpointState::Closed,
                    EndpointState::Open,
                    EndpointState::HalfOpen,
                ] {
                    self.breaker_state
                        .get_or_create(&BreakerLabels {
                            target_service: target.clone(),
                            endpoint: endpoint.clone(),
                            state: state.as_str(),
                        })
                        .set(i64::from(state == current));
                }
            }
        }
        if let Some(client) = &*self.policies.lock().expect("policy client lock poisoned") {
            self.config_version.set(client.version());
        }
        for (target, balancer) in self
            .balancers
            .lock()
            .expect("balancer list lock poisoned")
            .iter()
        {
            let (total, available) = balancer.counts();
            for (state, n) in [("total", total), ("available", available)] {
                self.balancer_endpoints
                    .get_or_create(&BalancerLabels {
                        target_service: target.clone(),
                        state,
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        if let Some(discovery) = discovery {
            self.controller_connected
                .set(i64::from(discovery.connected()));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pin_project_lite::pin_project! {
    /// An accepted connection whose reads and writes are counted as they happen.
    pub struct CountingIo<T> {
        #[pin]
        inner: T,
        read: Counter,
        written: Counter,
        _open: OpenGuard,
    }
}

impl<T: AsyncRead> AsyncRead for CountingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        this.read.inc_by((buf.filled().len() - before) as u64);
        res
    }
}

impl<T: AsyncWrite> AsyncWrite for CountingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            this.written.inc_by(n as u64);
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            this.written.inc_by(n as u64);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
