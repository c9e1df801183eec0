//! The web dashboard on the admin listener: one self-contained page (`assets/dashboard.*`,
//! compiled into the binary, no CDN) and the JSON it polls.
//!
//! * `GET /api/v1/overview`: the config version; every announced proxy with the version it
//!   acked (or refused), its certificate's expiry, and the certificate it reported (identity,
//!   validity, the anchor it chains to, and its problem against the trust bundle in force,
//!   judged by `ferrule_proto::certificate` as `ferrule identity status` does); golden metrics per service and per edge
//!   caller→callee with a short history for sparklines; each endpoint's breaker state and EWMA
//!   latency as each calling proxy sees it; and the proxies that could not be read.
//! * `GET /api/v1/traces`, `GET /api/v1/traces/<id>`: the recent traces of the trace source
//!   (`--traces-api`, the JSON API of `ferrule dev up`'s OTLP receiver), when one is set.
//!
//! The numbers come from the proxies' own `/metrics`, read and computed by `ferrule_golden`
//! exactly as `ferrule stat` does. The controller reads them only while someone looks: a
//! request older than [`FRESH`] scrapes every proxy (at most [`CONCURRENCY`] at a time, each
//! bounded by [`SCRAPE_TIMEOUT`]) and compares with the previous scrape; viewers within
//! [`FRESH`] share that answer. A proxy that is slow or gone costs one timeout and shows up
//! as unreadable; it never stalls the page. The history is in memory, per replica, bounded by
//! [`HISTORY`] and [`MAX_ROWS`].

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferrule_ca::Ca;
use ferrule_golden::{Golden, ProxyMetrics, ProxyTarget, Row};
use ferrule_proto::certificate::{CertificateProblem, certificate_problem};
use ferrule_proto::v1::admin_server::Admin;
use ferrule_proto::v1::{GetConfigRequest, ListProxiesRequest};
use ferrule_store::Store;
use serde::Serialize;
use tokio::sync::{Mutex, watch};

use crate::admin::AdminService;

/// How long one scrape answers every viewer.
pub const FRESH: Duration = Duration::from_secs(2);
/// Bound on reading one proxy's `/metrics`.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
/// Proxies read at once.
pub const CONCURRENCY: usize = 16;
/// How far back the sparklines go.
pub const HISTORY: Duration = Duration::from_secs(300);
/// Services plus edges whose history is kept (the busiest when there are more).
pub const MAX_ROWS: usize = 500;
/// Bound on asking the trace source.
const TRACES_TIMEOUT: Duration = Duration::from_secs(2);
/// Traces listed.
const TRACES_SHOWN: usize = 20;

/// The page's files, compiled in.
pub const HTML: &str = include_str!("../assets/dashboard.html");
pub const JS: &str = include_str!("../assets/dashboard.js");
pub const CSS: &str = include_str!("../assets/dashboard.css");

/// What the dashboard's endpoints answer from.
pub struct Dashboard {
    admin: AdminService,
    traces: Option<SocketAddr>,
    /// The CA in force, for the trust bundle proxies' certificates are judged against.
    ca: Option<watch::Receiver<Option<Arc<Ca>>>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The last scrape, and when it was taken.
    last: Option<(Instant, Vec<(ProxyTarget, ProxyMetrics)>)>,
    /// The last answer, and when it was made.
    answer: Option<(Instant, Bytes)>,
    /// Points per row key (`service` or `caller -> callee`), oldest first.
    history: BTreeMap<String, VecDeque<Point>>,
}

/// One point of a sparkline.
#[derive(Debug, Clone, Serialize)]
struct Point {
    /// Unix milliseconds at the end of the window.
    t: u64,
    rps: f64,
    success_rate: Option<f64>,
    p99_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Overview {
    /// Unix milliseconds.
    generated_at: u64,
    config_version: i64,
    /// How long the rates are measured over; 0 on the first look (no rates yet: the next
    /// answer has them).
    window_seconds: f64,
    services: Vec<RowView>,
    edges: Vec<RowView>,
    proxies: Vec<ProxyView>,
    endpoints: Vec<EndpointView>,
    /// Whether `/api/v1/traces` has a source.
    traces: bool,
}

#[derive(Debug, Serialize)]
struct RowView {
    #[serde(flatten)]
    row: Row,
    history: Vec<Point>,
}

#[derive(Debug, Serialize)]
struct ProxyView {
    proxy_id: String,
    service: String,
    mode: String,
    version: String,
    address: String,
    admin_address: String,
    acked_version: i64,
    nacked_version: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    nack_reason: String,
    /// Unix seconds.
    last_seen: i64,
    /// Unix seconds; absent without identity (or when the proxy could not be read).
    certificate_expiry: Option<f64>,
    /// The certificate the proxy reported; absent for a proxy without identity.
    certificate: Option<CertificateView>,
    /// Why its `/metrics` could not be read this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    scrape_error: Option<String>,
}

/// A proxy's reported certificate, with what is wrong with it.
#[derive(Debug, Serialize)]
struct CertificateView {
    /// The SPIFFE id; empty before the first certificate.
    identity: String,
    /// Unix seconds (0 before the first certificate).
    not_before: i64,
    not_after: i64,
    /// Hex SHA-256 of the anchor it chains to; empty when the proxy could not tell.
    anchor_fingerprint: String,
    /// `no_certificate`, `expired`, `unknown_anchor` or `expires_soon`.
    problem: Option<&'static str>,
    /// The problem for people, and what to do about it.
    problem_text: Option<String>,
    fix: Option<&'static str>,
}

impl CertificateView {
    fn of(cert: &ferrule_proto::v1::ProxyCertificate, bundle: &[String], now: i64) -> Self {
        let problem: Option<CertificateProblem> = certificate_problem(Some(cert), bundle, now);
        Self {
            identity: cert.identity.clone(),
            not_before: cert.not_before,
            not_after: cert.not_after,
            anchor_fingerprint: cert.anchor_fingerprint.clone(),
            problem: problem.map(CertificateProblem::code),
            problem_text: problem.map(|p| p.to_string()),
            fix: problem.map(CertificateProblem::fix),
        }
    }
}

#[derive(Debug, Serialize)]
struct EndpointView {
    /// The proxy whose balancer and breaker these are.
    caller: String,
    proxy_id: String,
    /// As labelled: `user:grpc`.
    target_service: String,
    endpoint: String,
    breaker: Option<String>,
    ewma_ms: Option<f64>,
}

/// An answer of the dashboard's API: status and JSON body.
pub type ApiAnswer = (http::StatusCode, Bytes);

impl Dashboard {
    pub fn new(store: Arc<dyn Store>, traces: Option<SocketAddr>) -> Self {
        Self {
            admin: AdminService::new(store),
            traces,
            ca: None,
            state: Mutex::new(State::default()),
        }
    }

    /// Judges proxies' certificates against the trust bundle of `ca` (the controller's CA, as
    /// it reloads; `None` inside while it runs without one).
    pub fn with_ca(mut self, ca: watch::Receiver<Option<Arc<Ca>>>) -> Self {
        self.ca = Some(ca);
        self
    }

    /// Fingerprints of the anchors in the trust bundle in force (none without a CA).
    fn bundle(&self) -> Vec<String> {
        let Some(ca) = &self.ca else {
            return Vec::new();
        };
        let ca = ca.borrow();
        ca.as_ref()
            .map(|ca| {
                ca.anchors()
                    .iter()
                    .map(|a| ferrule_ca::fingerprint(a))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `GET /api/v1/overview`.
    pub async fn overview(&self) -> ApiAnswer {
        // One scrape at a time: viewers arriving meanwhile wait for it and share it.
        let mut state = self.state.lock().await;
        if let Some((at, body)) = &state.answer
            && at.elapsed() < FRESH
        {
            return (http::StatusCode::OK, body.clone());
        }
        match self.build(&mut state).await {
            Ok(overview) => {
                let body = Bytes::from(serde_json::to_vec(&overview).expect("plain data"));
                state.answer = Some((Instant::now(), body.clone()));
                (http::StatusCode::OK, body)
            }
            Err(status) => error(
                http::StatusCode::SERVICE_UNAVAILABLE,
                &format!("reading the store: {}", status.message()),
            ),
        }
    }

    async fn build(&self, state: &mut State) -> Result<Overview, tonic::Status> {
        let proxies = self
            .admin
            .list_proxies(tonic::Request::new(ListProxiesRequest {}))
            .await?
            .into_inner()
            .proxies;
        let config_version = self
            .admin
            .get_config(tonic::Request::new(GetConfigRequest::default()))
            .await?
            .into_inner()
            .version;
        let targets: Vec<ProxyTarget> = proxies
            .iter()
            .filter_map(|p| p.proxy.as_ref())
            .filter(|p| !p.admin_address.is_empty())
            .map(|p| ProxyTarget {
                proxy_id: p.proxy_id.clone(),
                service: ferrule_proto::names::qualified(&p.namespace, &p.service),
                admin: p.admin_address.clone(),
            })
            .collect();
        let (scraped, failed) =
            ferrule_golden::scrape_all(&targets, SCRAPE_TIMEOUT, CONCURRENCY).await;
        let now = Instant::now();

        // Rates need a previous scrape; the first look shows the topology with no rates.
        let (measurement, window) = match &state.last {
            Some((at, before)) => {
                let window = now.duration_since(*at);
                (ferrule_golden::compare(before, &scraped, window), window)
            }
            None => (
                ferrule_golden::compare(&scraped, &scraped, Duration::ZERO),
                Duration::ZERO,
            ),
        };
        let t = unix_millis();
        if !window.is_zero() {
            record(
                &mut state.history,
                &measurement.services,
                &measurement.edges,
                t,
            );
        }

        let mut errors: BTreeMap<String, String> = failed
            .into_iter()
            .map(|(p, e)| (p.proxy_id, e.to_string()))
            .collect();
        let by_id: BTreeMap<&str, &ProxyMetrics> = scraped
            .iter()
            .map(|(p, m)| (p.proxy_id.as_str(), m))
            .collect();
        let bundle = self.bundle();
        let now_unix = ferrule_proto::certificate::unix_now();
        let proxy_views = proxies
            .iter()
            .filter_map(|status| {
                let p = status.proxy.as_ref()?;
                Some(ProxyView {
                    proxy_id: p.proxy_id.clone(),
                    service: ferrule_proto::names::qualified(&p.namespace, &p.service),
                    mode: p.mode.clone(),
                    version: p.version.clone(),
                    address: p.address.clone(),
                    admin_address: p.admin_address.clone(),
                    acked_version: status.acked_version,
                    nacked_version: status.nacked_version,
                    nack_reason: status.nack_reason.clone(),
                    last_seen: status.last_seen,
                    certificate_expiry: by_id
                        .get(p.proxy_id.as_str())
                        .and_then(|m| m.certificate_expiry),
                    certificate: p
                        .certificate
                        .as_ref()
                        .map(|c| CertificateView::of(c, &bundle, now_unix)),
                    scrape_error: errors.remove(&p.proxy_id),
                })
            })
            .collect();
        let endpoints = scraped
            .iter()
            .flat_map(|(p, m)| {
                m.endpoints
                    .iter()
                    .map(move |((target, endpoint), gauges)| EndpointView {
                        caller: p.service.clone(),
                        proxy_id: p.proxy_id.clone(),
                        target_service: target.clone(),
                        endpoint: endpoint.clone(),
                        breaker: gauges.breaker.clone(),
                        ewma_ms: gauges.ewma_ms,
                    })
            })
            .collect();
        let with_history = |rows: Vec<Row>| -> Vec<RowView> {
            rows.into_iter()
                .map(|row| RowView {
                    history: state
                        .history
                        .get(&row.path())
                        .map(|h| h.iter().cloned().collect())
                        .unwrap_or_default(),
                    row,
                })
                .collect()
        };
        let overview = Overview {
            generated_at: t,
            config_version,
            window_seconds: window.as_secs_f64(),
            services: with_history(measurement.services),
            edges: with_history(measurement.edges),
            proxies: proxy_views,
            endpoints,
            traces: self.traces.is_some(),
        };
        state.last = Some((now, scraped));
        Ok(overview)
    }

    /// `GET /api/v1/traces` (`id` = None) or `GET /api/v1/traces/<id>`: the trace source's
    /// answer, passed on (the list cut to the newest [`TRACES_SHOWN`]).
    pub async fn traces(&self, id: Option<&str>) -> ApiAnswer {
        let Some(source) = self.traces else {
            return error(
                http::StatusCode::NOT_FOUND,
                "no trace source: start the controller with --traces-api ADDR (ferrule dev up does)",
            );
        };
        let path = match id {
            None => "/traces".to_string(),
            Some(id) if id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()) => {
                format!("/traces/{id}")
            }
            Some(id) => {
                return error(
                    http::StatusCode::BAD_REQUEST,
                    &format!("{id:?} is not a trace id (32 hex digits)"),
                );
            }
        };
        let text = match ferrule_golden::admin_get(&source.to_string(), &path, TRACES_TIMEOUT).await
        {
            Ok(text) => text,
            Err(ferrule_golden::ScrapeError::Status { status, .. })
                if status == http::StatusCode::NOT_FOUND =>
            {
                return error(http::StatusCode::NOT_FOUND, "no such trace is kept");
            }
            Err(e) => {
                return error(
                    http::StatusCode::BAD_GATEWAY,
                    &format!("the trace source at {source}: {e}"),
                );
            }
        };
        let Ok(mut value) = serde_json::from_str::<serde_json::Value>(&text) else {
            return error(
                http::StatusCode::BAD_GATEWAY,
                &format!("the trace source at {source} answered something else than JSON"),
            );
        };
        if let Some(list) = value.as_array_mut() {
            list.truncate(TRACES_SHOWN);
            value = serde_json::json!({ "traces": list });
        }
        (
            http::StatusCode::OK,
            Bytes::from(serde_json::to_vec(&value).expect("plain data")),
        )
    }
}

/// Appends one point per row and forgets what is older than [`HISTORY`], and rows with no
/// point left; beyond [`MAX_ROWS`] rows, the quietest go.
fn record(
    history: &mut BTreeMap<String, VecDeque<Point>>,
    services: &[Row],
    edges: &[Row],
    t: u64,
) {
    for row in services.iter().chain(edges) {
        let g: &Golden = &row.golden;
        history.entry(row.path()).or_default().push_back(Point {
            t,
            rps: g.rps,
            success_rate: g.success_rate,
            p99_ms: g.p99_ms,
        });
    }
    let oldest = t.saturating_sub(HISTORY.as_millis() as u64);
    history.retain(|_, points| {
        while points.front().is_some_and(|p| p.t < oldest) {
            points.pop_front();
        }
        !points.is_empty()
    });
    if history.len() > MAX_ROWS {
        let mut by_traffic: Vec<(String, f64)> = history
            .iter()
            .map(|(k, points)| (k.clone(), points.iter().map(|p| p.rps).sum()))
            .collect();
        by_traffic.sort_by(|a, b| a.1.total_cmp(&b.1));
        let excess = history.len() - MAX_ROWS;
        for (key, _) in by_traffic.into_iter().take(excess) {
            history.remove(&key);
        }
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn error(status: http::StatusCode, message: &str) -> ApiAnswer {
    (
        status,
        Bytes::from(serde_json::json!({ "error": message }).to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(path: &str, rps: f64) -> Row {
        let (caller, callee) = path.split_once(" -> ").unzip();
        Row {
            service: caller.is_none().then(|| path.to_string()),
            caller: caller.map(str::to_string),
            callee: callee.map(str::to_string),
            route: None,
            proxies: 1,
            golden: Golden {
                requests: rps,
                success_rate: Some(1.0),
                rps,
                p50_ms: None,
                p95_ms: None,
                p99_ms: None,
            },
        }
    }

    #[test]
    fn certificates_are_judged_against_the_bundle_with_the_fields_check_reads() {
        let cert = ferrule_proto::v1::ProxyCertificate {
            identity: "spiffe://cluster.local/ns/default/sa/user".into(),
            not_before: 1_000,
            not_after: 2_000,
            anchor_fingerprint: "ab".repeat(32),
        };
        // `ferrule check` (control-plane/cli/src/install.rs) reads `problem` by these codes.
        let view =
            serde_json::to_value(CertificateView::of(&cert, &["cd".repeat(32)], 1_500)).unwrap();
        assert_eq!(view["problem"], "unknown_anchor");
        assert_eq!(view["not_after"], 2_000);
        assert!(view["fix"].as_str().unwrap().contains("anchor"), "{view}");
        let view =
            serde_json::to_value(CertificateView::of(&cert, &["ab".repeat(32)], 1_500)).unwrap();
        assert!(view["problem"].is_null(), "{view}");
        let view =
            serde_json::to_value(CertificateView::of(&cert, &["ab".repeat(32)], 2_000)).unwrap();
        assert_eq!(view["problem"], "expired");
    }

    #[test]
    fn history_forgets_old_points_and_keeps_the_busiest_rows() {
        let mut history = BTreeMap::new();
        record(
            &mut history,
            &[row("user", 1.0)],
            &[row("order -> user", 2.0)],
            1_000,
        );
        let later = 1_000 + HISTORY.as_millis() as u64 + 1;
        record(&mut history, &[row("user", 3.0)], &[], later);
        assert_eq!(history["user"].len(), 1, "the old point is forgotten");
        assert_eq!(history["user"][0].rps, 3.0);
        assert!(
            !history.contains_key("order -> user"),
            "a row with no point left goes"
        );

        let many: Vec<Row> = (0..MAX_ROWS + 5)
            .map(|i| row(&format!("s{i}"), i as f64))
            .collect();
        record(&mut history, &many, &[], later + 1);
        assert_eq!(history.len(), MAX_ROWS);
        assert!(!history.contains_key("s0") && history.contains_key(&format!("s{}", MAX_ROWS + 4)));
    }
}
