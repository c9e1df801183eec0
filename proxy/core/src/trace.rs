//! Request tracing: the server span of every request a listener serves, and the helpers the
//! outbound side uses for the client span of each attempt.
//!
//! [`ServerSpanLayer`] is the outermost layer of the inbound and gateway stacks when tracing
//! is on (the stacks leave it out when it is off, so tracing costs nothing then). It reads the
//! caller's trace context (W3C wins over B3; a malformed header is counted in
//! `trace_context_malformed_total` and starts a new trace), starts a server span under it,
//! and writes the span's context into the request for the next hop, so the app (which copies
//! the trace headers onto the calls it makes) and the outbound side continue the trace. The
//! request id becomes `<trace id>-<span id>`, so the access logs of every hop of one trace
//! share the trace id. Attributes follow the OpenTelemetry HTTP and RPC semantic conventions
//! (`http.request.method`, `url.path`, `http.response.status_code`, `rpc.system`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, `client.address`) plus the mesh's own
//! (`ferrule.service`, `ferrule.direction`, `ferrule.error`).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{Request, Response};
use tower::{Layer, Service};

pub use ferrule_trace::context::{self as propagation, Extracted, Formats, SpanContext};
pub use ferrule_trace::{Span, SpanKind, TraceMetrics, Tracer};

use crate::body::BoxBody;
use crate::context::{RequestContext, RequestId};
use crate::errors::{ERROR_HEADER, Reason};
use crate::metrics::Direction;
use crate::server::HttpStack;
use crate::stack::{BoxStack, CloneStack};

/// The endpoint that answered an outbound request, in the response's extensions (set by the
/// endpoint level when tracing is on, read by the attempt's client span).
#[derive(Debug, Clone, Copy)]
pub struct PeerEndpoint(pub std::net::SocketAddr);

/// Reads the caller's context from `req`, counting a malformed header on `tracer`.
pub fn extract<B>(tracer: &Tracer, req: &Request<B>) -> Extracted {
    let extracted = propagation::extract(req.headers());
    if let Some(header) = extracted.malformed {
        tracing::debug!(header, "malformed trace header; starting a new trace");
        tracer.malformed(header);
    }
    extracted
}

/// Writes `span`'s context into `req` for the next hop, in the formats the caller used.
pub fn inject<B>(req: &mut Request<B>, span: &Span, parent: &Extracted) {
    if let Some(context) = span.context() {
        propagation::inject(
            req.headers_mut(),
            &context,
            parent.tracestate.as_ref(),
            parent.formats,
        );
    }
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

/// The span name of a request: `package.Service/Method` for gRPC (RPC conventions), else the
/// method and, when known, the route.
pub fn span_name<B>(req: &Request<B>, route: Option<&str>) -> String {
    if is_grpc(req) {
        return req.uri().path().trim_start_matches('/').to_string();
    }
    match route {
        Some(route) if !route.is_empty() => format!("{} {route}", req.method()),
        _ => req.method().to_string(),
    }
}

/// The request's attributes (HTTP and RPC semantic conventions).
pub fn request_attributes<B>(span: &mut Span, req: &Request<B>) {
    if !span.is_recording() {
        return;
    }
    span.set("http.request.method", req.method().as_str());
    span.set("url.path", req.uri().path());
    let version = match req.version() {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_11 => "1.1",
        http::Version::HTTP_2 => "2",
        _ => "other",
    };
    span.set("network.protocol.version", version);
    if is_grpc(req) {
        span.set("rpc.system", "grpc");
        let mut parts = req.uri().path().trim_start_matches('/').splitn(2, '/');
        if let (Some(service), Some(method)) = (parts.next(), parts.next()) {
            span.set("rpc.service", service);
            span.set("rpc.method", method);
        }
    }
}

/// The response's attributes and the span's status. A server span is an error on 5xx, a
/// client span on 4xx too (the conventions' rule); a non-zero `grpc-status`, or a proxy error
/// (this proxy's, or a peer's `ferrule-error`), is always one.
pub fn response_attributes(span: &mut Span, rsp: &Response<BoxBody>, kind: SpanKind) {
    if !span.is_recording() {
        return;
    }
    let status = rsp.status();
    span.set("http.response.status_code", status.as_u16());
    let grpc = rsp
        .headers()
        .get(crate::headers::GRPC_STATUS)
        .and_then(|s| s.to_str().ok())
        .and_then(|s| s.parse::<i64>().ok());
    if let Some(code) = grpc {
        span.set("rpc.grpc.status_code", code);
    }
    let error = match rsp.extensions().get::<Reason>() {
        Some(reason) => Some(reason.as_str().to_string()),
        None => rsp
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    let failed = status.is_server_error()
        || (kind == SpanKind::Client && status.is_client_error())
        || grpc.is_some_and(|c| c != 0);
    match error {
        Some(reason) => {
            span.set("ferrule.error", reason.clone());
            span.set_error(reason);
        }
        None if failed => span.set_error(format!("status {}", status.as_u16())),
        None => {}
    }
}

/// Starts the server span of every request; see the module docs.
#[derive(Clone)]
pub struct ServerSpanLayer {
    tracer: Tracer,
    direction: Direction,
    service: Arc<str>,
    route: Option<Arc<str>>,
}

impl ServerSpanLayer {
    /// `None` when tracing is off (see [`ServerSpanLayer::stack`]).
    pub fn new(tracer: &Tracer, direction: Direction, service: Arc<str>) -> Option<Self> {
        tracer.is_enabled().then(|| Self {
            tracer: tracer.clone(),
            direction,
            service,
            route: None,
        })
    }

    /// A listener's whole stack: `inner` under a server span when tracing is on (`span` as
    /// [`ServerSpanLayer::new`] made it), else `inner` alone; either way its boxed futures
    /// are passed through.
    pub fn stack<S>(span: Option<Self>, inner: S) -> HttpStack
    where
        S: CloneStack<Request<BoxBody>, Response<BoxBody>, Infallible> + Clone + 'static,
    {
        match span {
            Some(span) => BoxStack::new(span.layer(inner)),
            None => BoxStack::new(inner),
        }
    }

    /// Names the route every request of this stack took (the gateway's routes).
    pub fn with_route(mut self, route: &str) -> Self {
        self.route = Some(route.into());
        self
    }
}

impl<S> Layer<S> for ServerSpanLayer {
    type Service = ServerSpan<S>;
    fn layer(&self, inner: S) -> ServerSpan<S> {
        ServerSpan {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ServerSpan<S> {
    inner: S,
    layer: ServerSpanLayer,
}

impl<S> Service<Request<BoxBody>> for ServerSpan<S>
where
    // The inner future is already boxed (observe's): awaited as it is.
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

    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        let layer = &self.layer;
        let parent = extract(&layer.tracer, &req);
        let mut span = layer.tracer.start(
            span_name(&req, layer.route.as_deref()),
            SpanKind::Server,
            parent.parent.as_ref(),
        );
        request_attributes(&mut span, &req);
        if let Some(route) = &layer.route {
            span.set("ferrule.route", route.to_string());
        }
        span.set("ferrule.service", layer.service.to_string());
        span.set("ferrule.direction", layer.direction.as_str());
        if let Some(ctx) = req.extensions_mut().get_mut::<RequestContext>() {
            if span.is_recording() {
                span.set("client.address", ctx.client.ip().to_string());
            }
            if let Some(context) = span.context() {
                ctx.id = RequestId::Trace(format!("{}-{}", context.trace_id, context.span_id));
            }
        }
        inject(&mut req, &span, &parent);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let rsp = fut.await?;
            response_attributes(&mut span, &rsp, SpanKind::Server);
            span.end();
            Ok(rsp)
        })
    }
}
