//! Test backends, served in the test process on real loopback sockets: an HTTP server (HTTP/1.1
//! and h2c, upgrades, streaming bodies) that can be told to fail or slow down, a gRPC echo
//! service with every call shape, and a TCP echo server with half-close.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};

pub mod echo {
    //! Generated from `tests/proto/echo.proto`.
    #![allow(clippy::all)]
    tonic::include_proto!("ferrule.test.v1");
}

use echo::echo_server::{Echo, EchoServer};
use echo::{EchoMessage, EchoRequestCount};

/// What an [`HttpBackend`] does, changeable while it runs.
#[derive(Default)]
pub struct Behaviour {
    /// Per mille of requests answered 503.
    pub fail_per_mille: AtomicU32,
    /// Milliseconds to wait before answering.
    pub delay_ms: AtomicU64,
}

/// An HTTP server naming itself in every answer (`x-backend` header and body) and counting
/// requests. It echoes request bodies (streamed), answers `Upgrade` requests with 101 and then
/// echoes raw bytes, and serves `/health`.
pub struct HttpBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub behaviour: Arc<Behaviour>,
    requests: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

impl HttpBackend {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// [`HttpBackend::start`] on `addr` (an address of a network namespace the test made).
    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let behaviour = Arc::new(Behaviour::default());
        let requests = Arc::new(AtomicU64::new(0));
        let (n, b, r) = (name.to_string(), behaviour.clone(), requests.clone());
        let task = tokio::spawn(async move {
            let counter = Arc::new(AtomicU64::new(0));
            while let Ok((stream, _)) = listener.accept().await {
                let (n, b, r, c) = (n.clone(), b.clone(), r.clone(), counter.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        handle(req, n.clone(), b.clone(), r.clone(), c.clone())
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            name: name.to_string(),
            addr,
            behaviour,
            requests,
            task,
        })
    }

    /// Requests served (not counting `/health`).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn set_fail_per_mille(&self, v: u32) {
        self.behaviour.fail_per_mille.store(v, Ordering::SeqCst);
    }

    pub fn set_delay(&self, d: Duration) {
        self.behaviour
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    req: Request<Incoming>,
    name: String,
    behaviour: Arc<Behaviour>,
    requests: Arc<AtomicU64>,
    counter: Arc<AtomicU64>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/health" {
        return Ok(Response::new(full("ok")));
    }
    let n = requests.fetch_add(1, Ordering::SeqCst);
    let delay = behaviour.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    // Deterministic spread of failures: request i fails when its slot in 1000 is below the rate.
    let fail = behaviour.fail_per_mille.load(Ordering::SeqCst);
    if fail > 0 && (counter.fetch_add(1, Ordering::SeqCst) * 7919) % 1000 < u64::from(fail) {
        return Ok(Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header("x-backend", &name)
            .body(full(format!("{name} failing")))
            .expect("valid response"));
    }
    let _ = n;
    if req.headers().contains_key(http::header::UPGRADE) {
        let upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, "echo")
            .header("x-backend", &name)
            .body(full(""))
            .expect("valid response"));
    }
    let version = format!("{:?}", req.version());
    let path = req.uri().path().to_string();
    let method = req.method().to_string();
    // Who the inbound proxy says the client is (mutual TLS), echoed for the tests.
    let client_id = req
        .headers()
        .get("ferrule-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if method == "POST" || method == "PUT" {
        // Stream the request body straight back.
        let body = req.into_body().boxed();
        return Ok(Response::builder()
            .header("x-backend", &name)
            .header("x-backend-version", version)
            .body(body)
            .expect("valid response"));
    }
    Ok(Response::builder()
        .header("x-backend", &name)
        .header("x-backend-version", version)
        .header("x-client-id", client_id)
        .body(full(format!("{name} {method} {path}")))
        .expect("valid response"))
}

/// The gRPC echo service on its own port, answering with its name in `server`.
pub struct GrpcBackend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl GrpcBackend {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let svc = EchoServer::new(EchoImpl {
            name: name.to_string(),
        });
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(Self { addr, task })
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct EchoImpl {
    name: String,
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<EchoMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoImpl {
    async fn unary(
        &self,
        req: GrpcRequest<EchoMessage>,
    ) -> Result<GrpcResponse<EchoMessage>, Status> {
        let text = req.into_inner().text;
        if text == "fail" {
            return Err(Status::failed_precondition("asked to fail"));
        }
        Ok(GrpcResponse::new(EchoMessage {
            text,
            server: self.name.clone(),
        }))
    }

    type ServerStreamStream = MsgStream;

    async fn server_stream(
        &self,
        req: GrpcRequest<EchoRequestCount>,
    ) -> Result<GrpcResponse<Self::ServerStreamStream>, Status> {
        let req = req.into_inner();
        let server = self.name.clone();
        let items = (0..req.count).map(move |i| {
            Ok(EchoMessage {
                text: format!("{} {i}", req.text),
                server: server.clone(),
            })
        });
        Ok(GrpcResponse::new(Box::pin(futures::stream::iter(items))))
    }

    async fn client_stream(
        &self,
        req: GrpcRequest<Streaming<EchoMessage>>,
    ) -> Result<GrpcResponse<EchoMessage>, Status> {
        let mut stream = req.into_inner();
        let mut texts = Vec::new();
        while let Some(msg) = stream.next().await {
            texts.push(msg?.text);
        }
        Ok(GrpcResponse::new(EchoMessage {
            text: texts.join(","),
            server: self.name.clone(),
        }))
    }

    type BidiStream = MsgStream;

    async fn bidi(
        &self,
        req: GrpcRequest<Streaming<EchoMessage>>,
    ) -> Result<GrpcResponse<Self::BidiStream>, Status> {
        let server = self.name.clone();
        let out = req.into_inner().map(move |msg| {
            msg.map(|m| EchoMessage {
                text: m.text,
                server: server.clone(),
            })
        });
        Ok(GrpcResponse::new(Box::pin(out)))
    }
}

/// A TCP server that echoes what it reads, and closes its write side when the client closes
/// its own (half-close), after sending everything back.
pub struct TcpEcho {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpEcho {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}
