//! The admin listener: `/live` (the process runs), `/ready` (the store answers), `/metrics`
//! (Prometheus text), and the web dashboard: its page at `/` (`/dashboard.js`,
//! `/dashboard.css`) and the JSON it polls under `/api/v1/` ([`crate::dashboard`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrule_store::Store;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::dashboard::Dashboard;
use crate::metrics::Metrics;

const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    dashboard: Arc<Dashboard>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let store = store.clone();
        let metrics = metrics.clone();
        let dashboard = dashboard.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                handle(req, store.clone(), metrics.clone(), dashboard.clone())
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection error");
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    dashboard: Arc<Dashboard>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    if req.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into()));
    }
    let path = req.uri().path();
    if let Some(rest) = path.strip_prefix("/api/v1/") {
        let (status, body) = match rest {
            "overview" => dashboard.overview().await,
            "traces" => dashboard.traces(None).await,
            _ => match rest.strip_prefix("traces/") {
                Some(id) => dashboard.traces(Some(id)).await,
                None => (
                    StatusCode::NOT_FOUND,
                    Bytes::from_static(
                        br#"{"error":"not found: try /api/v1/overview or /api/v1/traces"}"#,
                    ),
                ),
            },
        };
        return Ok(asset(status, "application/json", body));
    }
    Ok(match path {
        "/" | "/dashboard" | "/dashboard/" => asset(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(crate::dashboard::HTML.as_bytes()),
        ),
        "/dashboard.js" => asset(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            Bytes::from_static(crate::dashboard::JS.as_bytes()),
        ),
        "/dashboard.css" => asset(
            StatusCode::OK,
            "text/css; charset=utf-8",
            Bytes::from_static(crate::dashboard::CSS.as_bytes()),
        ),
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => {
            match tokio::time::timeout(READY_PROBE_TIMEOUT, store.get("/ferrule/ready-probe")).await
            {
                Ok(Ok(_)) => text(StatusCode::OK, "ready\n".into()),
                Ok(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
                Err(_) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: the store did not answer within {READY_PROBE_TIMEOUT:?}\n"),
                ),
            }
        }
        "/metrics" => {
            let mut resp = text(StatusCode::OK, metrics.render());
            resp.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /, /live, /ready or /metrics\n".into(),
        ),
    })
}

/// A dashboard response: never cached (the numbers move), and the page may load only its own
/// files and call only this listener.
fn asset(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .header(
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:",
        )
        .body(Full::new(body))
        .expect("static response parts are valid")
}
