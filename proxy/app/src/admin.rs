//! The admin listener: `/live`, `/ready`, `/metrics`, `/config`, `/tap`, `/tracing` and
//! `/shutdown`.
//!
//! `GET /tracing` shows whether tracing is on and its sampling ratio for new traces;
//! `POST /tracing?sample_ratio=R` changes the ratio live, from loopback only.
//!
//! `/ready` answers 200 once the proxy can do its job: a discovery stream is up (when it has
//! upstreams and controllers) and every app port is registered (when it registers). `/config`
//! shows the configuration the proxy runs with and the addresses its listeners actually bound,
//! so tests and operators can use port 0, and the policy in force (its version and the last
//! version refused). `POST /shutdown` starts a graceful shutdown, and only from loopback: the
//! listener binds every interface so the kubelet and Prometheus can read it, and reading is all
//! anyone else may do.
//!
//! `GET /tap?service=&path=&method=&status=&direction=` streams the metadata of every request
//! the proxy answers from then on (never bodies), as newline-delimited JSON ([`TapEvent`]),
//! filtered by the parameters given: `service` (the target service, with or without its
//! `:port`), `path` (a prefix), `method`, `status` (`503` or a class such as `5xx`) and
//! `direction` (`inbound`, `outbound`, `gateway`). A tap that reads too slowly loses events
//! (a line `{"lost": N}` says how many) rather than slowing traffic; the stream ends when the
//! client goes away or the admin listener stops.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use ferrule_proxy_api::discovery::Discovery;
use ferrule_proxy_api::policy::PolicyClient;
use ferrule_proxy_api::registration::Registration;
use ferrule_proxy_core::body::{self, BoxBody};
use ferrule_proxy_core::lifecycle::AdminServer;
use ferrule_proxy_core::metrics::Metrics;
use ferrule_proxy_core::tap::{Tap, TapEvent};
use ferrule_proxy_gateway::stack::Router;
use futures::StreamExt;
use http_body_util::StreamBody;
use hyper::body::Frame;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

/// What the admin endpoints report on.
pub struct AdminState {
    pub metrics: Metrics,
    /// The proxy's mutual TLS, when it has an identity: `/ready` waits for its certificate.
    pub identity: Option<ferrule_proxy_transport::tls::MeshTls>,
    pub discovery: Discovery,
    /// Discovery readiness only matters when there is something to discover.
    pub needs_discovery: bool,
    pub registration: Option<Arc<Registration>>,
    /// `/config`'s body.
    pub config: serde_json::Value,
    /// The policy in force, shown under `policy` on `/config`: `{"version", "resources",
    /// "lastNack"}`.
    pub policies: Option<PolicyClient>,
    /// A gateway's router in force, shown under `gateway` on `/config`: the spec and where it
    /// came from (`{"from": "file", "path"}` or `{"from": "resource", "name", "version"}`).
    pub gateway: Option<watch::Receiver<Router>>,
    /// The tracer, whose sampling ratio `/tracing` shows and changes.
    pub tracer: ferrule_proxy_core::trace::Tracer,
    /// Cancelled by `/shutdown`.
    pub shutdown: CancellationToken,
}

impl AdminState {
    pub fn ready(&self) -> bool {
        self.waiting_for().is_empty()
    }

    fn tracing_json(&self) -> Response<BoxBody> {
        let body = serde_json::json!({
            "enabled": self.tracer.is_enabled(),
            "sample_ratio": self.tracer.sample_ratio(),
        });
        text(StatusCode::OK, format!("{body}\n"))
    }

    /// What the proxy still waits for before it is ready, for people (`/ready`'s body).
    pub fn waiting_for(&self) -> Vec<String> {
        let mut waiting = Vec::new();
        if self.needs_discovery && !self.discovery.connected() {
            waiting.push("a discovery stream to a controller".to_string());
        }
        // With an identity, peers refuse this proxy until it holds a certificate.
        if self
            .identity
            .as_ref()
            .is_some_and(|tls| tls.credentials().is_none())
        {
            waiting.push("a certificate from the mesh CA (see the identity log lines)".to_string());
        }
        if let Some(registration) = &self.registration {
            if let Some(health) = registration.waiting_for() {
                waiting.push(health);
            } else if !registration.registered() {
                waiting.push("the controller to register the app's ports".to_string());
            }
        }
        waiting
    }

    fn respond(
        &self,
        req: &Request<Incoming>,
        peer: SocketAddr,
        stop: &CancellationToken,
    ) -> Response<BoxBody> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/tap") => match TapFilter::parse(req.uri().query().unwrap_or("")) {
                Ok(filter) => tap_stream(self.metrics.tap(), filter, stop.clone()),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            },
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => {
                let waiting = self.waiting_for();
                if waiting.is_empty() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    let lines: Vec<String> = waiting
                        .iter()
                        .map(|w| format!("waiting for {w}\n"))
                        .collect();
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready\n{}", lines.concat()),
                    )
                }
            }
            (&Method::GET, "/metrics") => match self.metrics.encode() {
                Ok(metrics) => {
                    let mut rsp = text(StatusCode::OK, metrics);
                    rsp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    rsp
                }
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding metrics failed\n",
                ),
            },
            (&Method::GET, "/config") => {
                let mut config = self.config.clone();
                config["ready"] = self.ready().into();
                config["controller_connected"] = self.discovery.connected().into();
                if let Some(gateway) = &self.gateway {
                    let router = gateway.borrow();
                    config["gateway"] = serde_json::json!({
                        "origin": router.config().origin(),
                        "spec": router.config().spec(),
                    });
                }
                if let Some(policies) = &self.policies {
                    config["policy"] = policies.to_json();
                }
                if let Some(r) = &self.registration {
                    config["registered"] = r.registered().into();
                    config["app_healthy"] = r.healthy().into();
                }
                let mut rsp = text(StatusCode::OK, format!("{config:#}\n"));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                rsp
            }
            (&Method::POST, "/shutdown") if !peer.ip().is_loopback() => {
                tracing::warn!(%peer, "shutdown refused: not from loopback");
                text(
                    StatusCode::FORBIDDEN,
                    "shutdown is only accepted from loopback\n",
                )
            }
            (&Method::POST, "/shutdown") => {
                tracing::info!("shutdown requested on the admin listener");
                self.shutdown.cancel();
                text(StatusCode::OK, "shutting down\n")
            }
            (_, "/shutdown") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
            (&Method::GET, "/tracing") => self.tracing_json(),
            (&Method::POST, "/tracing") if !peer.ip().is_loopback() => text(
                StatusCode::FORBIDDEN,
                "the sampling ratio can only be changed from loopback\n",
            ),
            (&Method::POST, "/tracing") => {
                let ratio = req
                    .uri()
                    .query()
                    .and_then(|q| q.strip_prefix("sample_ratio="))
                    .map(crate::config::parse_ratio);
                match ratio {
                    _ if !self.tracer.is_enabled() => text(
                        StatusCode::CONFLICT,
                        "tracing is off: start the proxy with --otlp-endpoint\n",
                    ),
                    Some(Ok(ratio)) => {
                        tracing::info!(ratio, "trace sampling ratio changed");
                        self.tracer.set_sample_ratio(ratio);
                        self.tracing_json()
                    }
                    Some(Err(reason)) => {
                        text(StatusCode::BAD_REQUEST, format!("sample_ratio: {reason}\n"))
                    }
                    None => text(
                        StatusCode::BAD_REQUEST,
                        "expected ?sample_ratio=R, R from 0 to 1\n",
                    ),
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /live /ready /metrics /config /tap /tracing /shutdown\n",
            ),
        }
    }
}

/// Which requests a `/tap` subscriber wants.
#[derive(Debug, Default, PartialEq)]
struct TapFilter {
    service: Option<String>,
    path: Option<String>,
    method: Option<String>,
    /// An exact code, or a class: `5` for `5xx`.
    status: Option<(u16, bool)>,
    direction: Option<String>,
}

impl TapFilter {
    fn parse(query: &str) -> Result<Self, String> {
        let mut filter = TapFilter::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let value = value.into_owned();
            if value.is_empty() {
                continue;
            }
            match key.as_ref() {
                "service" => filter.service = Some(value),
                "path" => filter.path = Some(value),
                "method" => filter.method = Some(value.to_ascii_uppercase()),
                "direction" => match value.as_str() {
                    "inbound" | "outbound" | "gateway" => filter.direction = Some(value),
                    _ => {
                        return Err(format!(
                            "direction: expected inbound, outbound or gateway, got {value:?}"
                        ));
                    }
                },
                "status" => {
                    let bad =
                        || format!("status: expected a code (503) or a class (5xx), got {value:?}");
                    filter.status = Some(match value.strip_suffix("xx") {
                        Some(class) => (class.parse().map_err(|_| bad())?, true),
                        None => (value.parse().map_err(|_| bad())?, false),
                    });
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}: use service, path, method, status, direction"
                    ));
                }
            }
        }
        Ok(filter)
    }

    fn matches(&self, e: &TapEvent) -> bool {
        let service_ok = self
            .service
            .as_deref()
            .is_none_or(|s| e.target_service == s || e.target_service.split(':').next() == Some(s));
        let status_ok = self.status.is_none_or(|(n, class)| match class {
            true => e.status / 100 == n,
            false => e.status == n,
        });
        service_ok
            && status_ok
            && self.path.as_deref().is_none_or(|p| e.path.starts_with(p))
            && self.method.as_deref().is_none_or(|m| e.method == m)
            && self.direction.as_deref().is_none_or(|d| e.direction == d)
    }
}

fn line(value: &impl serde::Serialize) -> Result<Frame<bytes::Bytes>, Infallible> {
    let mut line = serde_json::to_vec(value).expect("tap lines are plain data");
    line.push(b'\n');
    Ok(Frame::data(bytes::Bytes::from(line)))
}

/// `/tap`'s response: one JSON line per matching event until the client leaves or `stop`.
fn tap_stream(tap: &Tap, filter: TapFilter, stop: CancellationToken) -> Response<BoxBody> {
    let events = futures::stream::unfold(
        (tap.subscribe(), filter),
        move |(mut rx, filter)| async move {
            loop {
                match rx.recv().await {
                    Ok(event) if filter.matches(&event) => {
                        return Some((line(&*event), (rx, filter)));
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(lost)) => {
                        let lost = serde_json::json!({ "lost": lost });
                        return Some((line(&lost), (rx, filter)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    )
    .take_until(stop.cancelled_owned());
    let mut rsp = Response::new(body::boxed(StreamBody::new(events)));
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    rsp
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<BoxBody> {
    let mut rsp = Response::new(body::full(body));
    *rsp.status_mut() = status;
    rsp
}

/// Serves the admin endpoints on `listener` until the lifecycle stops it, last.
pub fn spawn(listener: TcpListener, state: Arc<AdminState>) -> AdminServer {
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let task = tokio::spawn(serve(listener, state, stop.clone(), tracker.clone()));
    AdminServer {
        stop,
        tracker,
        task,
    }
}

async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    ferrule_proxy_core::server::accept_loop(
        listener,
        stop.clone(),
        tracker,
        move |stream, peer: SocketAddr| {
            let state = state.clone();
            let stop = stop.clone();
            Box::pin(async move {
                let tap_stop = stop.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let rsp = state.respond(&req, peer, &tap_stop);
                    async move { Ok::<_, Infallible>(rsp) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                let result = tokio::select! {
                    result = conn.as_mut() => result,
                    () = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "admin connection failed");
                }
            })
        },
    )
    .await;
}
