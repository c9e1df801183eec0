//! The core's Prometheus metrics and the one registry every crate adds its own to.
//!
//! [`Metrics`] (cheap to clone: one `Arc`) holds the families every listener records into,
//! named as linkerd's: `request_total{direction,target_service,status_code,classification}`,
//! `response_latency_ms` (time to the response head), `tcp_open_connections`,
//! `tcp_read_bytes_total`, `tcp_write_bytes_total`, `protocol_detect_total{result}` and
//! `proxy_errors_total{reason}`. Other crates own their families and register them here with
//! [`Metrics::register`], or a [`Collector`] for values read at scrape time with
//! [`Metrics::register_collector`]; the admin listener's `/metrics` is [`Metrics::encode`].

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use http::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::reason::Reason;

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
    /// A TLS ClientHello: mutual TLS terminated here (the inner protocol is counted too).
    Tls,
    /// Plaintext where this proxy accepts only mutual TLS: closed.
    PlaintextRefused,
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
            DetectResult::Tls => "tls",
            DetectResult::PlaintextRefused => "plaintext_refused",
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

const LATENCY_BUCKETS_MS: [f64; 14] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_MS)
}

/// The core's metric families and the registry. Cheap to clone; clones record into the same
/// families.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Families>,
}

struct Families {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    tcp_open: Family<TcpLabels, Gauge>,
    tcp_read: Family<TcpLabels, Counter>,
    tcp_write: Family<TcpLabels, Counter>,
    detect: Family<DetectLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    /// Live request metadata for `/tap`; with the metrics because every observe layer has them.
    tap: crate::tap::Tap,
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
        Self {
            inner: Arc::new(Families {
                registry: Mutex::new(registry),
                requests,
                latency,
                tcp_open,
                tcp_read,
                tcp_write,
                detect,
                errors,
                tap: crate::tap::Tap::default(),
            }),
        }
    }

    /// Adds another crate's metric to the registry `/metrics` encodes.
    /// Where observe layers publish request metadata for `/tap`.
    pub fn tap(&self) -> &crate::tap::Tap {
        &self.inner.tap
    }

    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry().register(name, help, metric);
    }

    /// Adds values another crate reads at each scrape.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry().register_collector(collector);
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Registering and encoding never panic halfway, so a poisoned lock holds a whole
        // registry.
        self.inner
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn proxy_error(&self, direction: Direction, reason: Reason) {
        self.inner
            .errors
            .get_or_create(&ErrorLabels { direction, reason })
            .inc();
    }

    pub fn detected(&self, direction: Direction, result: DetectResult) {
        self.inner
            .detect
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

    /// The series of one target, removed from every family when the returned handle (and
    /// every connection it counts) is dropped: a target the proxy forgot leaves nothing
    /// behind in `/metrics`.
    pub fn target(&self, direction: Direction, target: Arc<str>) -> Arc<TargetMetrics> {
        let latency = self.inner.latency.get_or_create_owned(&LatencyLabels {
            direction,
            target_service: target.to_string(),
        });
        Arc::new(TargetMetrics {
            families: self.inner.clone(),
            direction,
            target,
            latency,
            statuses: Mutex::default(),
            tcp: Mutex::default(),
        })
    }

    /// The Prometheus text exposition of every registered metric and collector.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry())?;
        Ok(text)
    }
}

/// The series of one (direction, target): response counts by status, latency, and the TCP
/// counters of its connections. Recording through it needs no label allocation; dropping it
/// removes its series.
pub struct TargetMetrics {
    families: Arc<Families>,
    direction: Direction,
    target: Arc<str>,
    latency: Histogram,
    /// The response counters created so far, by (status, success).
    statuses: Mutex<Vec<(u16, bool, Counter)>>,
    /// The TCP counters (open, read, written), once a connection was counted.
    tcp: Mutex<Option<(Gauge, Counter, Counter)>>,
}

impl TargetMetrics {
    pub fn direction(&self) -> Direction {
        self.direction
    }

    pub fn target(&self) -> &Arc<str> {
        &self.target
    }

    /// Counts one response (made by the app or by the proxy) and its latency.
    pub fn response(&self, status: StatusCode, success: bool, latency: std::time::Duration) {
        self.latency(latency);
        self.count(status, success);
    }

    /// Observes the time to a response head.
    pub fn latency(&self, latency: std::time::Duration) {
        self.latency.observe(latency.as_secs_f64() * 1000.0);
    }

    /// Counts a response once its classification is known.
    pub fn count(&self, status: StatusCode, success: bool) {
        let code = status.as_u16();
        let mut statuses = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, _, counter)) = statuses
            .iter()
            .find(|(c, s, _)| *c == code && *s == success)
        {
            counter.inc();
            return;
        }
        let counter = self.families.requests.get_or_create_owned(&RequestLabels {
            direction: self.direction,
            target_service: self.target.to_string(),
            status_code: code,
            classification: classification(success),
        });
        counter.inc();
        statuses.push((code, success, counter));
    }

    /// Wraps an accepted connection so its bytes are counted and it shows as open until
    /// dropped; the connection keeps these series alive.
    pub fn count_io<T>(self: &Arc<Self>, io: T) -> CountingIo<T> {
        let (open, read, written) = self
            .tcp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| {
                let labels = Metrics::tcp_labels(self.direction, &self.target);
                (
                    self.families.tcp_open.get_or_create_owned(&labels),
                    self.families.tcp_read.get_or_create_owned(&labels),
                    self.families.tcp_write.get_or_create_owned(&labels),
                )
            })
            .clone();
        open.inc();
        CountingIo {
            inner: io,
            read,
            written,
            _open: OpenGuard(open),
            _series: self.clone(),
        }
    }
}

impl Drop for TargetMetrics {
    fn drop(&mut self) {
        let target_service = self.target.to_string();
        self.families.latency.remove(&LatencyLabels {
            direction: self.direction,
            target_service: target_service.clone(),
        });
        let statuses = self
            .statuses
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for (status_code, success, _) in statuses.drain(..) {
            self.families.requests.remove(&RequestLabels {
                direction: self.direction,
                target_service: target_service.clone(),
                status_code,
                classification: classification(success),
            });
        }
        if self
            .tcp
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            let labels = Metrics::tcp_labels(self.direction, &self.target);
            self.families.tcp_open.remove(&labels);
            self.families.tcp_read.remove(&labels);
            self.families.tcp_write.remove(&labels);
        }
    }
}

fn classification(success: bool) -> &'static str {
    if success { "success" } else { "failure" }
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
        _series: Arc<TargetMetrics>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_targets_series_go_with_its_last_handle() {
        let metrics = Metrics::new();
        let series = metrics.target(Direction::Outbound, "user".into());
        series.response(StatusCode::OK, true, std::time::Duration::from_millis(3));
        series.count(StatusCode::SERVICE_UNAVAILABLE, false);
        let io = series.count_io(tokio::io::empty());
        let text = metrics.encode().unwrap();
        assert!(text.contains(r#"request_total{direction="outbound",target_service="user",status_code="503",classification="failure"} 1"#), "{text}");
        assert!(
            text.contains(r#"tcp_open_connections{direction="outbound",target_service="user"} 1"#),
            "{text}"
        );

        // A connection keeps the series alive after the stack let go of them.
        drop(series);
        assert!(
            metrics
                .encode()
                .unwrap()
                .contains(r#"target_service="user""#)
        );
        drop(io);
        let text = metrics.encode().unwrap();
        assert!(!text.contains(r#"target_service="user""#), "{text}");
    }
}
