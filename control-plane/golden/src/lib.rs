//! Golden metrics (success rate, requests per second, p50/p95/p99 latency) from the proxies'
//! own `/metrics`, for everything that shows them: `ferrule stat` and `top` (the CLI) and the
//! controller's web dashboard. Both find the proxies their own way (the CLI over the
//! controller's gRPC API, the controller in its store) and hand this crate [`ProxyTarget`]s;
//! reading, parsing and turning two scrapes into numbers is here, once.
//!
//! The numbers come from the proxies' series: `request_total{direction, target_service,
//! status_code, classification}` and the `response_latency_ms{direction, target_service}`
//! histogram (see docs/observability.md). A service's numbers are what its sidecars' inbound
//! side answered (a gateway's: what it answered its clients, its `gateway` direction); an edge
//! caller→callee is what the caller's proxy sent out to the callee (its `outbound` direction,
//! a gateway's included). One scrape also carries each endpoint's
//! breaker state and EWMA latency as the proxy's balancers see them, and the proxy's
//! certificate expiry.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

/// A proxy and where its admin listener answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyTarget {
    pub proxy_id: String,
    /// The service it fronts, qualified (`name` or `name.namespace`); a gateway: its name.
    pub service: String,
    /// `HOST:PORT` of its admin listener.
    pub admin: String,
}

/// Why a proxy's admin listener gave nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("admin address {0:?} is not HOST:PORT")]
    Address(String),
    #[error("GET {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("GET {url} answered {status}")]
    Status {
        url: String,
        status: http::StatusCode,
    },
    #[error("parsing /metrics: {0}")]
    Parse(String),
}

/// GET `path` on the admin listener `admin`, bounded by `timeout`: the body of a 2xx.
pub async fn admin_get(admin: &str, path: &str, timeout: Duration) -> Result<String, ScrapeError> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let url = format!("http://{admin}{path}");
    let uri: http::Uri = url
        .parse()
        .map_err(|_| ScrapeError::Address(admin.to_string()))?;
    let fetch = async {
        let rsp = client.get(uri).await.map_err(|e| e.to_string())?;
        let status = rsp.status();
        let body = rsp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    let (status, body) = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ScrapeError::Timeout {
            url: url.clone(),
            timeout,
        })?
        .map_err(|reason| ScrapeError::Http {
            url: url.clone(),
            reason,
        })?;
    if !status.is_success() {
        return Err(ScrapeError::Status { url, status });
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// What one scrape of one proxy says about one series key: requests by classification and
/// the latency histogram's cumulative bucket counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub success: f64,
    pub failure: f64,
    /// (upper bound in ms, cumulative count), ascending, `+Inf` last.
    pub buckets: Vec<(f64, f64)>,
}

/// The request series of one scrape, keyed by (direction, target service).
pub type Series = BTreeMap<(String, String), Counts>;

/// One endpoint as one proxy's balancer and breaker see it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EndpointGauges {
    /// `closed`, `open` or `half_open`; absent when the proxy keeps no breaker for it.
    pub breaker: Option<String>,
    /// The balancer's peak-EWMA latency estimate, in ms.
    pub ewma_ms: Option<f64>,
}

/// Everything the golden-metrics views read from one proxy's `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxyMetrics {
    pub series: Series,
    /// By (target service as labelled, e.g. `user:grpc`; endpoint key `port/address:port`).
    pub endpoints: BTreeMap<(String, String), EndpointGauges>,
    /// When the proxy's certificate expires (unix seconds); `None` without identity.
    pub certificate_expiry: Option<f64>,
}

/// Parses `/metrics` text into [`ProxyMetrics`].
pub fn parse_metrics(text: &str) -> Result<ProxyMetrics, ScrapeError> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape =
        prometheus_parse::Scrape::parse(lines).map_err(|e| ScrapeError::Parse(e.to_string()))?;
    let mut parsed = ProxyMetrics::default();
    for sample in &scrape.samples {
        let label = |name: &str| sample.labels.get(name).unwrap_or("").to_string();
        let key = || (label("direction"), label("target_service"));
        let gauge = match sample.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        };
        match (sample.metric.as_str(), &sample.value) {
            ("request_total", prometheus_parse::Value::Counter(n))
            | ("request_total", prometheus_parse::Value::Untyped(n)) => {
                let counts = parsed.series.entry(key()).or_default();
                match sample.labels.get("classification") {
                    Some("success") => counts.success += n,
                    _ => counts.failure += n,
                }
            }
            ("response_latency_ms", prometheus_parse::Value::Histogram(buckets)) => {
                let counts = parsed.series.entry(key()).or_default();
                counts.buckets = buckets.iter().map(|b| (b.less_than, b.count)).collect();
                counts.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            ("breaker_state", _) if gauge == Some(1.0) => {
                let endpoint = (label("target_service"), label("endpoint"));
                parsed.endpoints.entry(endpoint).or_default().breaker = Some(label("state"));
            }
            ("endpoint_latency_ewma_ms", _) if gauge.is_some() => {
                let endpoint = (label("target_service"), label("endpoint"));
                parsed.endpoints.entry(endpoint).or_default().ewma_ms = gauge;
            }
            ("identity_certificate_expiry_timestamp_seconds", _) => {
                // 0 before the first certificate.
                parsed.certificate_expiry = gauge.filter(|v| *v > 0.0);
            }
            _ => {}
        }
    }
    Ok(parsed)
}

/// One scrape of every proxy, at most `concurrency` at a time, each bounded by `timeout`: the
/// proxies that answered, with what they said, and those that did not, with why. A proxy that
/// is slow or gone costs at most `timeout` and never holds up the others' answers.
pub async fn scrape_all(
    proxies: &[ProxyTarget],
    timeout: Duration,
    concurrency: usize,
) -> (
    Vec<(ProxyTarget, ProxyMetrics)>,
    Vec<(ProxyTarget, ScrapeError)>,
) {
    let results: Vec<_> = futures::stream::iter(proxies.iter().cloned())
        .map(|p| async move {
            let metrics = admin_get(&p.admin, "/metrics", timeout)
                .await
                .and_then(|text| parse_metrics(&text));
            (p, metrics)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut answered = Vec::new();
    let mut failed = Vec::new();
    for (p, result) in results {
        match result {
            Ok(metrics) => answered.push((p, metrics)),
            Err(e) => failed.push((p, e)),
        }
    }
    answered.sort_by(|a, b| (&a.0.service, &a.0.proxy_id).cmp(&(&b.0.service, &b.0.proxy_id)));
    (answered, failed)
}

/// Golden metrics of one row over one window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Golden {
    /// Requests in the window.
    pub requests: f64,
    /// Successful share of them, 0..1 (absent without requests).
    pub success_rate: Option<f64>,
    pub rps: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Sums of what changed between two scrapes, for one row (possibly over several proxies).
#[derive(Debug, Clone, Default)]
pub struct Delta {
    success: f64,
    failure: f64,
    buckets: Vec<(f64, f64)>,
}

impl Delta {
    /// Adds what `after` counted since `before` (a counter that went down restarted: its
    /// whole value is new).
    pub fn add(&mut self, before: Option<&Counts>, after: &Counts) {
        let since = |b: f64, a: f64| if a >= b { a - b } else { a };
        let empty = Counts::default();
        let before = before.unwrap_or(&empty);
        self.success += since(before.success, after.success);
        self.failure += since(before.failure, after.failure);
        for &(le, count) in &after.buckets {
            let was = before
                .buckets
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, c)| *c);
            match self.buckets.iter_mut().find(|(l, _)| *l == le) {
                Some((_, c)) => *c += since(was, count),
                None => self.buckets.push((le, since(was, count))),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    pub fn golden(&self, window: Duration) -> Golden {
        let requests = self.success + self.failure;
        Golden {
            requests,
            success_rate: (requests > 0.0).then(|| self.success / requests),
            rps: requests / window.as_secs_f64().max(f64::EPSILON),
            p50_ms: quantile(&self.buckets, 0.50),
            p95_ms: quantile(&self.buckets, 0.95),
            p99_ms: quantile(&self.buckets, 0.99),
        }
    }
}

/// The `q` quantile of a cumulative histogram, interpolated linearly inside the bucket it
/// falls in (as Prometheus' `histogram_quantile`); in the `+Inf` bucket, the highest finite
/// bound.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let share = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

/// The `q` quantile of `sorted` samples (nearest rank).
pub fn sample_quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied()
}

/// One row of golden metrics: a service, an edge caller→callee, or a service's route.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The service (a service row, a route row).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The calling service (an edge).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// The called service (an edge).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callee: Option<String>,
    /// `GET /users/123` (a route row).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Proxies whose numbers the row sums.
    pub proxies: usize,
    #[serde(flatten)]
    pub golden: Golden,
}

impl Row {
    /// `user`, or `order -> user`.
    pub fn path(&self) -> String {
        match (&self.caller, &self.callee, &self.service, &self.route) {
            (Some(caller), Some(callee), _, _) => format!("{caller} -> {callee}"),
            (_, _, Some(service), Some(route)) => format!("{service} {route}"),
            (_, _, Some(service), None) => service.clone(),
            _ => String::new(),
        }
    }
}

/// What every proxy did over one window: rows per service and per edge.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub window: Duration,
    pub services: Vec<Row>,
    pub edges: Vec<Row>,
}

/// The rows of what changed from `before` to `after`, two scrapes `window` apart. Proxies are
/// matched by id; one seen only in `after` counts from zero.
pub fn compare(
    before: &[(ProxyTarget, ProxyMetrics)],
    after: &[(ProxyTarget, ProxyMetrics)],
    window: Duration,
) -> Measurement {
    let mut services: BTreeMap<String, (usize, Delta)> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String), (usize, Delta)> = BTreeMap::new();
    for (proxy, metrics) in after {
        let was = before
            .iter()
            .find(|(p, _)| p.proxy_id == proxy.proxy_id)
            .map(|(_, m)| &m.series);
        let mut counted_service = false;
        for ((direction, target), counts) in &metrics.series {
            // A series that never counted a request (registered ahead, e.g. passthrough) is
            // no row.
            if counts.success + counts.failure <= 0.0 {
                continue;
            }
            let previous = was.and_then(|s| s.get(&(direction.clone(), target.clone())));
            match direction.as_str() {
                // What a sidecar's app answered, or what a gateway answered its clients (its
                // own refusals included).
                "inbound" | "gateway" => {
                    let entry = services.entry(proxy.service.clone()).or_default();
                    entry.1.add(previous, counts);
                    if !counted_service {
                        entry.0 += 1;
                        counted_service = true;
                    }
                }
                // What the proxy sent to another service; a gateway sends through the same
                // outbound stack, so its edges are these too.
                "outbound" => {
                    // `user:http` is an edge to `user`.
                    let callee = target.split(':').next().unwrap_or(target).to_string();
                    if callee.is_empty() {
                        continue;
                    }
                    let entry = edges.entry((proxy.service.clone(), callee)).or_default();
                    entry.1.add(previous, counts);
                    entry.0 += 1;
                }
                _ => {}
            }
        }
    }
    Measurement {
        window,
        services: services
            .into_iter()
            .map(|(service, (proxies, delta))| Row {
                service: Some(service),
                caller: None,
                callee: None,
                route: None,
                proxies,
                golden: delta.golden(window),
            })
            .collect(),
        edges: edges
            .into_iter()
            .map(|((caller, callee), (proxies, delta))| Row {
                service: None,
                caller: Some(caller),
                callee: Some(callee),
                route: None,
                proxies,
                golden: delta.golden(window),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"# HELP request_total HTTP requests.
# TYPE request_total counter
request_total{direction="inbound",target_service="user",status_code="200",classification="success"} 90
request_total{direction="inbound",target_service="user",status_code="503",classification="failure"} 10
# HELP response_latency_ms Time to the response head.
# TYPE response_latency_ms histogram
response_latency_ms_sum{direction="inbound",target_service="user"} 1000.0
response_latency_ms_count{direction="inbound",target_service="user"} 100
response_latency_ms_bucket{le="10.0",direction="inbound",target_service="user"} 50
response_latency_ms_bucket{le="20.0",direction="inbound",target_service="user"} 100
response_latency_ms_bucket{le="+Inf",direction="inbound",target_service="user"} 100
# HELP breaker_state Circuit breaker state per endpoint.
# TYPE breaker_state gauge
breaker_state{target_service="payment:grpc",endpoint="grpc/127.0.0.1:4143",state="closed"} 0
breaker_state{target_service="payment:grpc",endpoint="grpc/127.0.0.1:4143",state="open"} 1
# HELP endpoint_latency_ewma_ms EWMA.
# TYPE endpoint_latency_ewma_ms gauge
endpoint_latency_ewma_ms{target_service="payment:grpc",endpoint="grpc/127.0.0.1:4143"} 2.5
# HELP identity_certificate_expiry_timestamp_seconds Expiry.
# TYPE identity_certificate_expiry_timestamp_seconds gauge
identity_certificate_expiry_timestamp_seconds 1800000000
# EOF
"#;

    #[test]
    fn two_scrapes_give_rates_success_and_percentiles() {
        let after = parse_metrics(METRICS).unwrap();
        let key = ("inbound".to_string(), "user".to_string());
        let counts = &after.series[&key];
        assert_eq!((counts.success, counts.failure), (90.0, 10.0));
        assert_eq!(counts.buckets.len(), 3);

        let mut delta = Delta::default();
        delta.add(None, counts);
        let golden = delta.golden(Duration::from_secs(10));
        assert_eq!(golden.requests, 100.0);
        assert_eq!(golden.success_rate, Some(0.9));
        assert_eq!(golden.rps, 10.0);
        // Half the requests are at or under 10 ms: p50 is the bucket's bound; p95 interpolates
        // 90 % of the way into (10, 20].
        assert_eq!(golden.p50_ms, Some(10.0));
        assert!((golden.p95_ms.unwrap() - 19.0).abs() < 1e-9);

        // The second scrape saw nothing new: no requests, no percentiles.
        let mut none = Delta::default();
        none.add(Some(counts), counts);
        let golden = none.golden(Duration::from_secs(10));
        assert_eq!(
            (golden.requests, golden.success_rate, golden.p99_ms),
            (0.0, None, None)
        );
    }

    #[test]
    fn one_scrape_carries_breakers_ewma_and_certificate_expiry() {
        let parsed = parse_metrics(METRICS).unwrap();
        let endpoint = (
            "payment:grpc".to_string(),
            "grpc/127.0.0.1:4143".to_string(),
        );
        assert_eq!(
            parsed.endpoints[&endpoint],
            EndpointGauges {
                breaker: Some("open".into()),
                ewma_ms: Some(2.5)
            }
        );
        assert_eq!(parsed.certificate_expiry, Some(1_800_000_000.0));
    }

    #[test]
    fn compare_makes_service_rows_and_edges_per_caller_and_skips_silent_series() {
        let proxy = |id: &str, service: &str| ProxyTarget {
            proxy_id: id.into(),
            service: service.into(),
            admin: "127.0.0.1:1".into(),
        };
        let counts = |success: f64| Counts {
            success,
            ..Counts::default()
        };
        let metrics = |entries: &[(&str, &str, f64)]| ProxyMetrics {
            series: entries
                .iter()
                .map(|(d, t, n)| ((d.to_string(), t.to_string()), counts(*n)))
                .collect(),
            ..ProxyMetrics::default()
        };
        let before = vec![(
            proxy("gw", "gateway"),
            metrics(&[("gateway", "order", 12.0), ("outbound", "order:http", 10.0)]),
        )];
        let after = vec![
            (
                proxy("gw", "gateway"),
                metrics(&[
                    ("gateway", "order", 34.0),
                    ("gateway", "", 2.0),
                    ("outbound", "order:http", 30.0),
                    ("outbound", "(passthrough)", 0.0),
                ]),
            ),
            (
                proxy("o1", "order"),
                metrics(&[
                    ("inbound", "order", 20.0),
                    ("outbound", "user:grpc", 20.0),
                    ("outbound", "payment:grpc", 4.0),
                ]),
            ),
        ];
        let m = compare(&before, &after, Duration::from_secs(2));
        let edges: Vec<(String, f64)> = m.edges.iter().map(|r| (r.path(), r.golden.rps)).collect();
        assert_eq!(
            edges,
            [
                ("gateway -> order".to_string(), 10.0),
                ("order -> payment".to_string(), 2.0),
                ("order -> user".to_string(), 10.0),
            ]
        );
        // The gateway's row: what it answered its clients (its refusals, target "", included).
        let services: Vec<(String, f64)> = m
            .services
            .iter()
            .map(|r| (r.path(), r.golden.requests))
            .collect();
        assert_eq!(
            services,
            [("gateway".to_string(), 24.0), ("order".to_string(), 20.0)]
        );
    }

    #[test]
    fn sample_quantiles_take_the_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(sample_quantile(&samples, 0.5), Some(50.0));
        assert_eq!(sample_quantile(&samples, 0.99), Some(99.0));
        assert_eq!(sample_quantile(&[7.0], 0.99), Some(7.0));
        assert_eq!(sample_quantile(&[], 0.5), None);
    }

    #[test]
    fn a_restarted_counter_counts_from_zero() {
        let before = Counts {
            success: 100.0,
            ..Counts::default()
        };
        let after = Counts {
            success: 5.0,
            ..Counts::default()
        };
        let mut delta = Delta::default();
        delta.add(Some(&before), &after);
        assert_eq!(delta.golden(Duration::from_secs(1)).requests, 5.0);
    }

    #[tokio::test]
    async fn a_dead_proxy_is_reported_not_waited_for() {
        // A bound port nobody answers on (accepted, never read): the timeout is what bounds it.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxies = [ProxyTarget {
            proxy_id: "p".into(),
            service: "s".into(),
            admin: silent.local_addr().unwrap().to_string(),
        }];
        let started = std::time::Instant::now();
        let (answered, failed) = scrape_all(&proxies, Duration::from_millis(200), 4).await;
        assert!(answered.is_empty());
        assert!(
            matches!(failed[0].1, ScrapeError::Timeout { .. }),
            "{:?}",
            failed
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
