//! What the golden-metrics views (`stat`, `top`, `tap`, and `get endpoints`' breaker column)
//! share on the CLI's side: finding the proxies through the controller (`Admin/ListProxies`,
//! each with its admin address) and reading their `/tap`. Reading `/metrics` and turning two
//! scrapes into rates and latency percentiles is `ferrule_golden`, which the controller's
//! dashboard uses too.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use ferrule_golden::{ProxyMetrics, ProxyTarget};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::client::{self, ControllerAddr};

/// Bound on reading one proxy's `/metrics`.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);
/// Proxies read at once.
const SCRAPE_CONCURRENCY: usize = 32;

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

/// One scrape of every proxy: (proxy, what its `/metrics` says), skipping (with a note on
/// stderr) those that do not answer.
pub async fn scrape_all(proxies: &[ProxyTarget]) -> Vec<(ProxyTarget, ProxyMetrics)> {
    let (answered, failed) =
        ferrule_golden::scrape_all(proxies, SCRAPE_TIMEOUT, SCRAPE_CONCURRENCY).await;
    for (p, e) in failed {
        eprintln!("skipping proxy {} ({}): {e}", p.proxy_id, p.admin);
    }
    answered
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
    let (answered, _) =
        ferrule_golden::scrape_all(proxies, SCRAPE_TIMEOUT, SCRAPE_CONCURRENCY).await;
    let mut health: BTreeMap<String, EndpointHealth> = BTreeMap::new();
    for (_, metrics) in answered {
        for ((target, endpoint), gauges) in metrics.endpoints {
            if target.split(':').next() != Some(service) {
                continue;
            }
            let entry = health.entry(endpoint).or_default();
            entry.breaker.extend(gauges.breaker);
            entry.ewma_ms.extend(gauges.ewma_ms);
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

/// Formats an optional number of milliseconds for a table.
pub fn ms(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{v:.1}ms"))
}

/// Formats an optional share as a percentage for a table.
pub fn percent(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{:.2}%", v * 100.0))
}
