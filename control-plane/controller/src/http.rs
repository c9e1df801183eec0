//! The admin listener: `/live` (the process runs), `/ready` (the store answers) and
//! `/metrics` (Prometheus text).

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

use crate::metrics::Metrics;

const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let store = store.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, store.clone(), metrics.clone()));
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
    Ok(match req.uri().path() {
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
            "not found: try /live, /ready or /metrics\n".into(),
        ),
    })
}
