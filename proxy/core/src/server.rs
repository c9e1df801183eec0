//! Accepting connections and serving HTTP on them, shared by the inbound and outbound sides.
//!
//! Listeners run [`accept_loop`] until shutdown; every connection is a task in the proxy's
//! `TaskTracker` so shutdown can wait for them to drain. [`serve_http`] runs hyper's HTTP/1
//! (with upgrades) or HTTP/2 server over a connection whose protocol detection already chose,
//! attaches a [`RequestContext`] to each request and hands it to the listener's stack. On
//! shutdown it asks hyper to finish in-flight requests and close gracefully.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::body::{self, BoxBody};
pub use crate::context::ConnMeta;
use crate::context::RequestContext;
use crate::detect::detect;
use crate::errors::{ProxyError, Reason};
use crate::metrics::{DetectResult, Direction, Metrics, TargetMetrics};
use crate::shared::Shared;
use crate::stack::BoxStack;

/// A listener's whole HTTP request path, errors already rendered as responses.
pub type HttpStack = BoxStack<Request<BoxBody>, Response<BoxBody>, Infallible>;

/// Which HTTP server a detected connection gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// Any stream a connection handler can read and write: the accepted socket, possibly with
/// the bytes protocol detection read put back in front.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection handed to a listener's opaque (TCP) path.
pub type BoxIo = Box<dyn Io>;

/// What every listener of one kind shares when it dispatches a connection: the one place
/// that detects the protocol, counts the outcome and hands the connection to HTTP or to the
/// listener's opaque path.
#[derive(Clone)]
pub struct Dispatcher {
    pub direction: Direction,
    pub metrics: Metrics,
    pub detect_timeout: Duration,
    pub shutdown: CancellationToken,
}

impl Dispatcher {
    /// Serves one accepted connection for the target `series` count it under: its bytes
    /// are counted there; `opaque_port` skips detection; HTTP goes to `http`; anything else
    /// to `opaque`, or is closed when the listener has no opaque path (the gateway).
    pub async fn dispatch<F, Fut>(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        series: &Arc<TargetMetrics>,
        opaque_port: bool,
        http: HttpStack,
        opaque: Option<F>,
    ) where
        F: FnOnce(BoxIo) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let io = series.count_io(stream);
        self.dispatch_io(io, peer, None, series, opaque_port, http, opaque)
            .await;
    }

    /// [`Dispatcher::dispatch`] for a connection already counted and possibly unwrapped from
    /// TLS, whose client proved `peer_identity` (the inbound side after mutual TLS).
    #[allow(clippy::too_many_arguments)]
    pub async fn dispatch_io<I, F, Fut>(
        &self,
        io: I,
        peer: SocketAddr,
        peer_identity: Option<Arc<str>>,
        series: &Arc<TargetMetrics>,
        opaque_port: bool,
        http: HttpStack,
        opaque: Option<F>,
    ) where
        I: Io,
        F: FnOnce(BoxIo) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        if opaque_port {
            self.metrics
                .detected(self.direction, DetectResult::OpaquePort);
            if let Some(opaque) = opaque {
                opaque(Box::new(io)).await;
            }
            return;
        }
        let (result, io) = match detect(io, self.detect_timeout).await {
            Ok(detected) => detected,
            Err(error) => {
                tracing::debug!(%peer, %error, "connection failed during detection");
                return;
            }
        };
        self.metrics.detected(self.direction, result);
        let meta = ConnMeta {
            direction: self.direction,
            target: series.target().clone(),
            client: peer,
            peer_identity,
        };
        let version = match result {
            DetectResult::Http1 => HttpVersion::Http1,
            DetectResult::Http2 => HttpVersion::Http2,
            DetectResult::MalformedHttp => {
                refuse_malformed(io, &meta, &self.metrics, series).await;
                return;
            }
            DetectResult::Opaque
            | DetectResult::Timeout
            | DetectResult::OpaquePort
            | DetectResult::Tls
            | DetectResult::PlaintextRefused => {
                match opaque {
                    Some(opaque) => opaque(Box::new(io)).await,
                    None => tracing::debug!(%peer, ?result, "not HTTP: connection closed"),
                }
                return;
            }
        };
        serve_http(io, version, http, meta, self.shutdown.clone()).await;
    }
}

/// Accepts connections until `shutdown`, running `handle` for each as a tracked task.
///
/// `handle` returns a boxed future: that keeps rustc's Send inference for the connection
/// futures in a concrete context (rust-lang/rust#64552).
pub async fn accept_loop<F>(
    listener: TcpListener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> BoxFuture<'static, ()>,
{
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Small writes (HTTP heads, gRPC frames) should leave at once.
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "set_nodelay failed");
                }
                tracker.spawn(handle(stream, peer));
            }
            Err(error) => {
                // Usually out of file descriptors: back off a little instead of spinning.
                tracing::warn!(?local, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(?local, "listener closed");
}

/// Serves HTTP on `io` with `stack` until the client closes or shutdown has drained it.
pub async fn serve_http<I>(
    io: I,
    version: HttpVersion,
    stack: HttpStack,
    meta: ConnMeta,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // One stack per connection, called in place while it is ready (see `shared`): no clone
    // of every layer and no box of its own per request. The future stays a `BoxFuture`: a
    // type with the stack's projections in it trips rustc's `Send` inference in the
    // callers' async fns (rust-lang/rust#64552).
    let stack = Shared::new(stack);
    let svc = service_fn(move |req: Request<Incoming>| {
        let mut req = req.map(body::incoming);
        let span = RequestContext::attach(&mut req, &meta);
        stack.call_boxed(req).instrument(span)
    });
    let io = TokioIo::new(io);
    let result = match version {
        HttpVersion::Http1 => {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(io, svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => result,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        HttpVersion::Http2 => {
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => result,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "HTTP connection ended with an error");
    }
}

/// Copies bytes both ways until both directions are closed; each side's end of stream is
/// passed on as a half-close.
pub async fn splice_tcp<A, B>(mut client: A, mut upstream: B, upstream_addr: SocketAddr)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            tracing::debug!(%upstream_addr, sent, received, "TCP connection closed");
        }
        Err(error) => tracing::debug!(%upstream_addr, %error, "TCP connection failed"),
    }
}

/// Answers a connection whose first line looked like an HTTP request but was not one: a 400
/// that explains itself, counted like any other response.
pub async fn refuse_malformed<I>(
    mut io: I,
    meta: &ConnMeta,
    metrics: &Metrics,
    series: &TargetMetrics,
) where
    I: AsyncWrite + Unpin,
{
    let error = ProxyError::new(
        Reason::BadRequest,
        meta.target.to_string(),
        "malformed HTTP/1 request line",
    );
    metrics.proxy_error(meta.direction, Reason::BadRequest);
    series.response(Reason::BadRequest.status(), true, Duration::ZERO);
    let written = async {
        io.write_all(&error.to_http1_bytes()).await?;
        io.shutdown().await
    };
    if let Err(error) = written.await {
        tracing::debug!(client = %meta.client, %error, "could not answer a malformed request");
    }
}
