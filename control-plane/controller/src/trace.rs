//! The controller's RPCs as trace spans: one server span per gRPC call when tracing is on
//! (`--otlp-endpoint`), named `package.Service/Method` with the RPC semantic conventions'
//! attributes, under the caller's trace context when it sends one (W3C or B3), exported like
//! the proxies' spans. Off, the layer passes calls through without allocating.
//!
//! A span ends when the response head is sent: for a streaming RPC (`Discovery/Watch`,
//! `Config/Watch`) that is when the stream opens, not when it ends; a call failed with a
//! trailers-only status carries `rpc.grpc.status_code` and is an error.

use std::task::{Context, Poll};

use ferrule_trace::{SpanKind, Tracer, context};
use futures::future::{BoxFuture, Either};
use http::{Request, Response};
use tower::{Layer, Service};

#[derive(Clone)]
pub struct RpcSpanLayer(pub Tracer);

impl<S> Layer<S> for RpcSpanLayer {
    type Service = RpcSpan<S>;
    fn layer(&self, inner: S) -> RpcSpan<S> {
        RpcSpan {
            inner,
            tracer: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcSpan<S> {
    inner: S,
    tracer: Tracer,
}

impl<S, B, RB> Service<Request<B>> for RpcSpan<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<RB>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if !self.tracer.is_enabled() {
            return Either::Left(self.inner.call(req));
        }
        let extracted = context::extract(req.headers());
        if let Some(header) = extracted.malformed {
            self.tracer.malformed(header);
        }
        let rpc = req.uri().path().trim_start_matches('/').to_string();
        let mut span = self
            .tracer
            .start(rpc.clone(), SpanKind::Server, extracted.parent.as_ref());
        if span.is_recording() {
            span.set("rpc.system", "grpc");
            if let Some((service, method)) = rpc.split_once('/') {
                span.set("rpc.service", service);
                span.set("rpc.method", method);
            }
            span.set("ferrule.component", "controller");
        }
        let fut = self.inner.call(req);
        Either::Right(Box::pin(async move {
            let result = fut.await;
            match &result {
                Ok(rsp) => {
                    let code = rsp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i64>().ok());
                    if let Some(code) = code {
                        span.set("rpc.grpc.status_code", code);
                        if code != 0 {
                            span.set_error(format!("grpc-status {code}"));
                        }
                    }
                }
                Err(_) => span.set_error("the call failed"),
            }
            span.end();
            result
        }))
    }
}
