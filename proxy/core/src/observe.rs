//! The outermost layer of every HTTP stack: counts each response and writes the access log.
//!
//! It sees the final response, whether the app made it or the proxy did (the error layer
//! below it has already turned proxy errors into responses, with their [`Reason`] in the
//! response's extensions), so `request_total` and the access log agree with what the client
//! received. A response is classified from its head (5xx, or a non-zero `grpc-status` in a
//! trailers-only gRPC answer — which is how a gRPC caller gets the proxy's own errors — are
//! failures), except a gRPC response without a status in its head: it is counted when its
//! trailers arrive, and as a failure if the stream ends without them.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::body::{self, BoxBody};
use crate::context::RequestContext;
use crate::errors::{ERROR_HEADER, Reason};
use crate::metrics::{Direction, Metrics, TargetMetrics};
use crate::tap::{Tap, TapEvent};

#[derive(Clone)]
pub struct ObserveLayer {
    /// The target's series: they live as long as the stack this layer is part of.
    series: Arc<TargetMetrics>,
    direction: Direction,
    target: Arc<str>,
    access_log: bool,
    tap: Tap,
}

impl ObserveLayer {
    pub fn new(metrics: Metrics, direction: Direction, target: Arc<str>, access_log: bool) -> Self {
        Self {
            tap: metrics.tap().clone(),
            series: metrics.target(direction, target.clone()),
            direction,
            target,
            access_log,
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

/// A gRPC response whose status will come in trailers.
fn awaits_grpc_status(rsp: &Response<BoxBody>) -> bool {
    rsp.status().is_success()
        && !rsp.headers().contains_key(crate::headers::GRPC_STATUS)
        && rsp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

/// How to count a response once it is classified.
struct Verdict {
    series: Arc<TargetMetrics>,
    status: http::StatusCode,
}

impl Verdict {
    fn record(self, success: bool) {
        self.series.count(self.status, success);
    }
}

/// A verdict not given yet; dropped unrecorded, it counts the response as failed (the
/// stream ended without a status).
struct PendingVerdict(Option<Verdict>);

impl PendingVerdict {
    fn record(&mut self, success: bool) {
        if let Some(verdict) = self.0.take() {
            verdict.record(success);
        }
    }
}

impl Drop for PendingVerdict {
    fn drop(&mut self) {
        self.record(false);
    }
}

pin_project_lite::pin_project! {
    /// A gRPC response body that classifies the response by its trailers.
    struct GrpcStatusBody {
        #[pin]
        inner: BoxBody,
        verdict: PendingVerdict,
    }
}

impl http_body::Body for GrpcStatusBody {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let ok = trailers
                        .get(crate::headers::GRPC_STATUS)
                        .is_some_and(|s| s.as_bytes() == b"0");
                    this.verdict.record(ok);
                }
            }
            Some(Err(_)) | None => this.verdict.record(false),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// gRPC reports failures in `grpc-status`; a trailers-only response carries it in the head.
fn is_success(rsp: &Response<BoxBody>) -> bool {
    let grpc_ok = rsp
        .headers()
        .get(crate::headers::GRPC_STATUS)
        .is_none_or(|s| s.as_bytes() == b"0");
    !rsp.status().is_server_error() && grpc_ok
}

impl<S> Service<Request<BoxBody>> for Observe<S>
where
    // The inner future is already boxed (every stack's `Respond`): awaited as it is, no
    // second box around it per request.
    S: Service<
            Request<BoxBody>,
            Response = Response<BoxBody>,
            Error = Infallible,
            Future = BoxFuture<'static, Result<Response<BoxBody>, Infallible>>,
        >,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        let ctx = req.extensions().get::<RequestContext>();
        let start = ctx.map_or_else(Instant::now, |c| c.start);
        // What the access log and `/tap` show is read only when one of them is on: most
        // requests are only counted.
        let tapped = self.layer.tap.active();
        let detail = (tapped || self.layer.access_log).then(|| Detail {
            ctx: ctx.cloned(),
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            version: req.version(),
            authority: tapped
                .then(|| {
                    req.uri().authority().map(ToString::to_string).or_else(|| {
                        req.headers()
                            .get(http::header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .map(str::to_string)
                    })
                })
                .flatten(),
        });
        let layer = self.layer.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let rsp = fut.await?;
            let elapsed = start.elapsed();
            layer.series.latency(elapsed);
            let verdict = Verdict {
                series: layer.series.clone(),
                status: rsp.status(),
            };
            let rsp = if awaits_grpc_status(&rsp) {
                rsp.map(|body| {
                    body::boxed(GrpcStatusBody {
                        inner: body,
                        verdict: PendingVerdict(Some(verdict)),
                    })
                })
            } else {
                verdict.record(is_success(&rsp));
                rsp
            };
            if let Some(detail) = detail {
                detail.report(&layer, &rsp, elapsed);
            }
            Ok(rsp)
        })
    }
}

/// What the access log and `/tap` say of a request besides its response.
struct Detail {
    ctx: Option<RequestContext>,
    method: http::Method,
    path: String,
    version: http::Version,
    authority: Option<String>,
}

impl Detail {
    fn report(self, layer: &ObserveLayer, rsp: &Response<BoxBody>, elapsed: Duration) {
        let Detail {
            ctx,
            method,
            path,
            version,
            authority,
        } = self;
        // This proxy's own error, else the one a peer proxy answered with.
        let error = || match rsp.extensions().get::<Reason>() {
            Some(reason) => reason.as_str(),
            None => rsp
                .headers()
                .get(ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        };
        layer.tap.publish(|| TapEvent {
            ts_ms: crate::tap::now_ms(),
            direction: layer.direction.as_str(),
            target_service: layer.target.to_string(),
            request_id: ctx.as_ref().map_or_else(String::new, |c| c.id.to_string()),
            client: ctx
                .as_ref()
                .map_or_else(String::new, |c| c.client.to_string()),
            method: method.to_string(),
            authority: authority.unwrap_or_default(),
            path: path.clone(),
            status: rsp.status().as_u16(),
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            error: error().to_string(),
        });
        if layer.access_log {
            let error = error();
            tracing::info!(
                target: "access",
                direction = %layer.direction,
                target_service = %layer.target,
                request_id = %ctx.as_ref().map_or_else(String::new, |c| c.id.to_string()),
                client = %ctx.as_ref().map_or_else(String::new, |c| c.client.to_string()),
                meshed_peer = ctx.as_ref().is_some_and(RequestContext::meshed_peer),
                %method,
                path,
                version = ?version,
                status = rsp.status().as_u16(),
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                error,
                "request"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::{ProxyError, RespondLayer};
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_proxy_made_grpc_error_counts_as_a_failure() {
        let metrics = Metrics::new();
        // The layer holds the target's series; they go when the last stack of it goes.
        let observe = ObserveLayer::new(metrics.clone(), Direction::Outbound, "user".into(), true);
        let stack = tower::ServiceBuilder::new()
            .layer(observe.clone())
            .layer(RespondLayer::new(metrics.clone(), Direction::Outbound))
            .service_fn(|_req: Request<BoxBody>| {
                let failed: futures::future::BoxFuture<'static, _> =
                    Box::pin(std::future::ready(Err::<Response<BoxBody>, _>(
                        ProxyError::new(Reason::NoEndpoints, "user", "no endpoint"),
                    )));
                failed
            });
        let req = Request::post("/user.Users/Get")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(body::empty())
            .unwrap();
        let rsp = stack.oneshot(req).await.unwrap();
        assert_eq!(rsp.headers()["grpc-status"], "14");
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(r#"request_total{direction="outbound",target_service="user",status_code="200",classification="failure"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"proxy_errors_total{direction="outbound",reason="no_endpoints"} 1"#),
            "{text}"
        );
    }
}
