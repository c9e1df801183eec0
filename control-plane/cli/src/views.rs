//! What the golden-metrics views (`stat`, `top`, `tap`, and `get endpoints`' breaker column)
//! share: finding the proxies through the controller (`Admin/ListProxies`, each with its admin
//! address), reading their Prometheus `/metrics`, and turning two scrapes into rates and
//! latency percentiles.
//!
//! The numbers come from the proxies' own series: `request_total{direction, target_service,
//! status_code, classification}` and the `response_latency_ms{direction, target_service}`
//! histogram (see docs/observability.md). A service's numbers are what its sidecar's inbound
//! side answered; an edge caller→callee is what the caller's sidecar sent out to the callee.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::client::{self, ControllerAddr};

/// Bound on reading one proxy's `/metrics`.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// A proxy the controller knows, with where its admin listener answers.
#[derive(Debug, Clone)]
pub struct ProxyTarget {
    pub proxy_id: String,
    /// The service it fronts (a gateway: its name).
    pub service: String,
    pub admin: String,
}

/// Every announced proxy that said where its admin listener is, sorted by service and id.
pub async fn proxies(addr: &ControllerAddr) -> anyhow::Result<Vec<ProxyTarget>> {
    let mut proxies: Vec<ProxyTarget> = client::list_proxies(addr)
        .await?
        .into_iter()
        .filter_map(|p| p.proxy)
        .filter(|p| !p.admin_address.is_empty())
        .map(|p| ProxyTarget {
            proxy_id: p.proxy_id,
            service: ferrule_proto::names::qualified(&p.namespace, &p.service),
            admin: p.admin_address,
        })
        .collect();
    proxies.sort_by(|a, b| (&a.service, &a.proxy_id).cmp(&(&b.service, &b.proxy_id)));
    Ok(proxies)
}

/// GET `path` on a proxy's admin listener: the body of a 200, else an error naming the proxy.
pub async fn admin_get(admin: &str, path: &str) -> anyhow::Result<String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: http::Uri = format!("http://{admin}{path}")
        .parse()
        .with_context(|| format!("admin address {admin:?}"))?;
    let fetch = async {
        let rsp = client.get(uri).await?;
        let status = rsp.status();
        let body = rsp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    let (status, body) = tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
        .await
        .with_context(|| format!("{admin}{path} did not answer within {SCRAPE_TIMEOUT:?}"))?
        .with_context(|| format!("GET http://{admin}{path}"))?;
    if !status.is_success() {
        bail!("GET http://{admin}{path} answered {status}");
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

/// The series of one scrape, keyed by (direction, target service).
pub type Series = BTreeMap<(String, String), Counts>;

/// Parses `/metrics` text into [`Series`].
pub fn parse_metrics(text: &str) -> anyhow::Result<Series> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).context("parsing /metrics")?;
    let mut series = Series::new();
    for sample in &scrape.samples {
        let key = || {
            (
                sample.labels.get("direction").unwrap_or("").to_string(),
                sample
                    .labels
                    .get("target_service")
                    .unwrap_or("")
                    .to_string(),
            )
        };
        match (sample.metric.as_str(), &sample.value) {
            ("request_total", prometheus_parse::Value::Counter(n))
            | ("request_total", prometheus_parse::Value::Untyped(n)) => {
                let counts = series.entry(key()).or_default();
                match sample.labels.get("classification") {
                    Some("success") => counts.success += n,
                    _ => counts.failure += n,
                }
            }
            ("response_latency_ms", prometheus_parse::Value::Histogram(buckets)) => {
                let counts = series.entry(key()).or_default();
                counts.buckets = buckets.iter().map(|b| (b.less_than, b.count)).collect();
                counts
                    .buckets
                    .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
            }
            _ => {}
        }
    }
    Ok(series)
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
        self.buckets
            .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
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

/// One scrape of every proxy: (proxy, its series), skipping (with a note on stderr) those
/// that do not answer.
pub async fn scrape_all(proxies: &[ProxyTarget]) -> Vec<(ProxyTarget, Series)> {
    let scrapes = futures::future::join_all(proxies.iter().map(|p| async move {
        let series = admin_get(&p.admin, "/metrics")
            .await
            .and_then(|text| parse_metrics(&text));
        (p.clone(), series)
    }))
    .await;
    scrapes
        .into_iter()
        .filter_map(|(p, series)| match series {
            Ok(series) => Some((p, series)),
            Err(e) => {
                eprintln!("skipping proxy {} ({}): {e:#}", p.proxy_id, p.admin);
                None
            }
        })
        .collect()
}

/// How the proxies calling a service see each of its endpoints: the circuit breaker state and
/// the balancer's peak-EWMA latency, by endpoint key (`port-name/address:port`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointHealth {
    /// Current breaker state per caller proxy that has one: `closed`, `open`, `half_open`.
    pub breaker: Vec<String>,
    /// EWMA latency per caller proxy that balances over it, in ms.
    pub ewma_ms: Vec<f64>,
}

/// Reads `breaker_state` and `endpoint_latency_ewma_ms` of `service`'s endpoints from the
/// `/metrics` of every proxy; proxies that do not answer are skipped.
pub async fn endpoint_health(
    proxies: &[ProxyTarget],
    service: &str,
) -> BTreeMap<String, EndpointHealth> {
    let texts = futures::future::join_all(
        proxies
            .iter()
            .map(|p| async move { admin_get(&p.admin, "/metrics").await.ok() }),
    )
    .await;
    let mut health: BTreeMap<String, EndpointHealth> = BTreeMap::new();
    for text in texts.into_iter().flatten() {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let Ok(scrape) = prometheus_parse::Scrape::parse(lines) else {
            continue;
        };
        for sample in &scrape.samples {
            let for_service = sample
                .labels
                .get("target_service")
                .is_some_and(|t| t.split(':').next() == Some(service));
            let Some(endpoint) = sample.labels.get("endpoint").filter(|_| for_service) else {
                continue;
            };
            let value = match sample.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => continue,
            };
            let entry = health.entry(endpoint.to_string()).or_default();
            match sample.metric.as_str() {
                "breaker_state" if value == 1.0 => {
                    entry
                        .breaker
                        .push(sample.labels.get("state").unwrap_or("").to_string());
                }
                "endpoint_latency_ewma_ms" => entry.ewma_ms.push(value),
                _ => {}
            }
        }
    }
    health
}

/// The tap events (`/tap?{query}`) one proxy streams during `window`; an error if its tap
/// cannot be opened.
pub async fn tap_for(
    admin: &str,
    query: &str,
    window: Duration,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: http::Uri = format!("http://{admin}/tap?{query}")
        .parse()
        .with_context(|| format!("admin address {admin:?}"))?;
    let rsp = tokio::time::timeout(SCRAPE_TIMEOUT, client.get(uri.clone()))
        .await
        .with_context(|| format!("{uri} did not answer within {SCRAPE_TIMEOUT:?}"))?
        .with_context(|| format!("GET {uri}"))?;
    if !rsp.status().is_success() {
        bail!("GET {uri} answered {}", rsp.status());
    }
    let mut body = rsp.into_body();
    let mut pending = Vec::new();
    let mut events = Vec::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let event: serde_json::Value = serde_json::from_slice(&line)?;
                if event.get("lost").is_none() {
                    events.push(event);
                }
            }
        }
        anyhow::Ok(())
    };
    // The window ending is the normal way out; a stream that ends early is fine too.
    if let Ok(result) = tokio::time::timeout(window, read).await {
        result?;
    }
    Ok(events)
}

/// The `q` quantile of `sorted` samples (nearest rank).
pub fn sample_quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied()
}

/// Formats an optional number of milliseconds for a table.
pub fn ms(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{v:.1}ms"))
}

/// Formats an optional share as a percentage for a table.
pub fn percent(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{:.2}%", v * 100.0))
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
# EOF
"#;

    #[test]
    fn two_scrapes_give_rates_success_and_percentiles() {
        let after = parse_metrics(METRICS).unwrap();
        let key = ("inbound".to_string(), "user".to_string());
        let counts = &after[&key];
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
}
