//! The admin listener: `/live`, `/ready`, `/metrics`, `/config`, `/tracing` and `/shutdown`.
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
use ferrule_proxy_gateway::stack::Router;
use tokio::sync::watch;

/// What the admin endpoints report on.
pub struct AdminState {
    pub metrics: Metrics,
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
        let discovery_ok = !self.needs_discovery || self.discovery.connected();
        let registration_ok = self.registration.as_ref().is_none_or(|r| r.registered());
        discovery_ok && registration_ok
    }

    fn tracing_json(&self) -> Response<BoxBody> {
        let body = serde_json::json!({
            "enabled": self.tracer.is_enabled(),
            "sample_ratio": self.tracer.sample_ratio(),
        });
        text(StatusCode::OK, format!("{body}\n"))
    }

    fn respond(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<BoxBody> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => {
                if self.ready() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
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
                "not found; try /live /ready /metrics /config /tracing /shutdown\n",
            ),
        }
    }
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
                let svc = service_fn(move |req: Request<Incoming>| {
                    let rsp = state.respond(&req, peer);
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
