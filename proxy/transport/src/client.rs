//! HTTP client connections from the proxy to one address (an endpoint or the local app).
//!
//! [`Clients`] is one side's connection pool (the app-facing one of the inbound side, or the
//! peer-facing one of the outbound side; see [`crate::pool`] for how it keys, shares and
//! forgets connections). HTTP/2 gets one multiplexed connection per key, reused by every
//! request, and spoken with `h2` directly (see `crate::http2`); HTTP/1 gets a small pool of
//! keep-alive connections per key; upgrades (`Upgrade`, `CONNECT`) get a fresh HTTP/1
//! connection each, spliced to the client's once both sides have switched. Connecting is a
//! step of its own ([`Clients::connect`]) so a caller can try another endpoint when it
//! fails: nothing of the request has been sent yet. A [`Dst`] with an identity gets mutual
//! TLS (when the pool has [`MeshTls`]) and the peer must prove that identity.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::{TrySendError, http1};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use ferrule_proxy_core::body::{self, BoxBody, BoxError};
use ferrule_proxy_core::headers;
use ferrule_proxy_core::metrics::Direction;

use crate::http2;
use crate::metrics::PoolMetrics;
use crate::pool::{Checkout, Driver, Identity, Lease, Pool, PoolKey, PoolProtocol, Sender};
use crate::tls::{MeshTls, TlsError};

/// Why a connection could not be made or a request not sent. Cloneable: a failed handshake is
/// handed to every caller that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("endpoint address {0:?} is not an IP socket address")]
    BadAddress(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: Arc<io::Error>,
    },
    #[error("connecting to {addr}: no answer within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("mTLS with {addr}: {source}")]
    Tls { addr: SocketAddr, source: TlsError },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: Arc<hyper::Error>,
    },
    #[error("request to {addr}: {source}")]
    Request {
        addr: SocketAddr,
        source: Arc<hyper::Error>,
    },
    #[error("HTTP/2 handshake with {addr}: {source}")]
    Http2Handshake {
        addr: SocketAddr,
        source: Arc<h2::Error>,
    },
    #[error("HTTP/2 request to {addr}: {source}")]
    Http2 {
        addr: SocketAddr,
        source: Arc<h2::Error>,
    },
    /// The request's own body failed before anything of the request was sent.
    #[error("request to {addr}: reading the request body: {source}")]
    RequestBody {
        addr: SocketAddr,
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

/// Which kind of connection a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// HTTP/1 with the connection handed over to the request (WebSocket, `CONNECT`).
    Upgrade,
}

impl Protocol {
    /// The connection `req` needs if it is forwarded in its own version.
    pub fn of<B>(req: &Request<B>) -> Self {
        if headers::is_upgrade(req) {
            Protocol::Upgrade
        } else if req.version() == Version::HTTP_2 {
            Protocol::Http2
        } else {
            Protocol::Http1
        }
    }
}

/// Where a connection goes: the address, who is expected there, and how long a pooled
/// connection to it may stay unused. A bare [`SocketAddr`] converts into one with no identity
/// and the pool's idle timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dst {
    pub addr: SocketAddr,
    /// The identity the peer must prove (part of the pool key); `None` for a peer that is not
    /// meshed.
    pub identity: Option<Identity>,
    /// Overrides [`ClientConfig::idle_timeout`] for this connection: the outbound side passes
    /// the service's `timeouts.idle`. When callers of one key disagree, the latest wins.
    pub idle_timeout: Option<Duration>,
}

impl From<SocketAddr> for Dst {
    fn from(addr: SocketAddr) -> Self {
        Self {
            addr,
            identity: None,
            idle_timeout: None,
        }
    }
}

/// Settings of one pool.
#[derive(Debug, Clone, Copy)]
pub struct ClientConfig {
    /// Bounds the TCP connect and HTTP handshake of a new connection.
    pub connect_timeout: Duration,
    /// How long a pooled connection that carries no request stays open, unless the
    /// [`Dst`] says otherwise.
    pub idle_timeout: Duration,
}

/// One side's connections to every address it forwards to. Cheap to clone; clones share the
/// pool.
#[derive(Clone)]
pub struct Clients {
    pool: Arc<Pool>,
    config: ClientConfig,
    tls: Option<MeshTls>,
}

impl Clients {
    /// A pool for one side of the proxy: `Direction::Inbound` for the app-facing one,
    /// `Direction::Outbound` for the peer-facing one. Each side makes its own, so an app's
    /// address and an endpoint's never share a connection; `direction` labels the metrics.
    pub fn new(direction: Direction, config: ClientConfig, metrics: &PoolMetrics) -> Self {
        Self {
            pool: Arc::new(Pool::new(direction, metrics.clone())),
            config,
            tls: None,
        }
    }

    /// Connections to a [`Dst`] with an identity use mutual TLS with `tls`.
    pub fn with_tls(mut self, tls: Option<MeshTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The TLS this pool uses towards peers with an identity, if any.
    pub fn tls(&self) -> Option<&MeshTls> {
        self.tls.as_ref()
    }

    /// A TCP connection to `dst`, with mutual TLS when it has an identity and this pool has
    /// TLS, for opaque traffic.
    pub async fn connect_stream(&self, dst: &Dst) -> Result<Box<dyn MeshIo>, ClientError> {
        let timeout = self.config.connect_timeout;
        let addr = dst.addr;
        tokio::time::timeout(
            timeout,
            stream(addr, dst.identity.as_ref(), self.tls.as_ref()),
        )
        .await
        .map_err(|_| ClientError::ConnectTimeout { addr, timeout })?
    }

    /// A connection to `dst` ready to carry one request of `protocol`: a pooled one when the
    /// pool has one to spare, else a new one (see [`crate::pool`] for who waits for whom).
    pub async fn connect(
        &self,
        dst: impl Into<Dst>,
        protocol: Protocol,
    ) -> Result<Conn, ClientError> {
        let dst = dst.into();
        let addr = dst.addr;
        let protocol = match protocol {
            Protocol::Http1 => PoolProtocol::Http1,
            Protocol::Http2 => PoolProtocol::Http2,
            Protocol::Upgrade => {
                let sender = self.upgrade_handshake(&dst).await?;
                return Ok(Conn {
                    addr,
                    kind: Kind::Upgrade(sender),
                });
            }
        };
        let key = PoolKey {
            addr,
            identity: dst.identity,
            protocol,
        };
        let idle_timeout = dst.idle_timeout.unwrap_or(self.config.idle_timeout);
        loop {
            let mut checkout = self
                .pool
                .checkout(&key, idle_timeout, || {
                    // Boxed: a handshake (TCP, TLS, HTTP) is rare and its future large; inline
                    // it would make every request's future that size.
                    Box::pin(handshake(
                        &key,
                        self.tls.as_ref(),
                        self.config.connect_timeout,
                    ))
                })
                .await?;
            // HTTP/1 carries one request at a time: wait until hyper has finished with the
            // last response (an HTTP/2 connection takes requests as long as it is open).
            if let Sender::Http1(sender) = &mut checkout.sender
                && let Err(source) = sender.ready().await
            {
                if checkout.reused {
                    // It closed while idle; its driver forgets it. Each turn takes another
                    // from the pool, until one is made.
                    continue;
                }
                return Err(handshake_error(addr, source));
            }
            return Ok(Conn {
                addr,
                kind: Kind::Pooled(self.pool.clone(), checkout),
            });
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        self.config.connect_timeout
    }

    /// Each key in the pool and how many connections it holds (HTTP/1 ones lent to a request
    /// not counted), in key order.
    pub fn pooled(&self) -> Vec<(PoolKey, usize)> {
        self.pool.snapshot()
    }

    async fn upgrade_handshake(
        &self,
        dst: &Dst,
    ) -> Result<http1::SendRequest<BoxBody>, ClientError> {
        let addr = dst.addr;
        let io = TokioIo::new(self.connect_stream(dst).await?);
        let (mut sender, conn) = http1::handshake(io)
            .await
            .map_err(|source| handshake_error(addr, source))?;
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                tracing::debug!(%addr, %error, "HTTP/1 connection ended");
            }
        });
        sender
            .ready()
            .await
            .map_err(|source| handshake_error(addr, source))?;
        Ok(sender)
    }
}

/// A connection's byte stream: plain TCP, or TLS over it.
pub trait MeshIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> MeshIo for T {}

/// TCP to `addr`, then mutual TLS when the peer has an identity to prove and the proxy has TLS.
async fn stream(
    addr: SocketAddr,
    identity: Option<&Identity>,
    tls: Option<&MeshTls>,
) -> Result<Box<dyn MeshIo>, ClientError> {
    let tcp = tcp(addr).await?;
    match (identity, tls) {
        (Some(identity), Some(tls)) => {
            let stream = tls.connect(tcp, identity.as_arc()).await.map_err(|source| {
                // A peer that cannot prove the identity discovery announced is a security
                // event, not only a failed connection: say so where operators look.
                tracing::warn!(%addr, expected = %identity, error = %source, "mutual TLS with a peer failed");
                ClientError::Tls { addr, source }
            })?;
            Ok(Box::new(stream))
        }
        _ => Ok(Box::new(tcp)),
    }
}

/// Makes a new connection for `key`, within `timeout`.
async fn handshake(
    key: &PoolKey,
    tls: Option<&MeshTls>,
    timeout: Duration,
) -> Result<(Sender, Driver), ClientError> {
    let addr = key.addr;
    let made = async {
        let io = stream(addr, key.identity.as_ref(), tls).await?;
        Ok(match key.protocol {
            PoolProtocol::Http2 => {
                let (sender, driver) = http2::handshake(io, addr).await?;
                (Sender::Http2(sender), driver)
            }
            PoolProtocol::Http1 => {
                let (sender, conn) = http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(|source| handshake_error(addr, source))?;
                let driver = async { conn.await.map_err(BoxError::from) };
                (Sender::Http1(sender), Box::pin(driver) as Driver)
            }
        })
    };
    tokio::time::timeout(timeout, made)
        .await
        .map_err(|_| ClientError::ConnectTimeout { addr, timeout })?
}

fn handshake_error(addr: SocketAddr, source: hyper::Error) -> ClientError {
    ClientError::Handshake {
        addr,
        source: Arc::new(source),
    }
}

/// Opens a TCP connection with a bound on how long it may take.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ClientError> {
    tokio::time::timeout(timeout, tcp(addr))
        .await
        .map_err(|_| ClientError::ConnectTimeout { addr, timeout })?
}

async fn tcp(addr: SocketAddr) -> Result<TcpStream, ClientError> {
    let connect_error = |source| ClientError::Connect {
        addr,
        source: Arc::new(source),
    };
    let stream = TcpStream::connect(addr).await.map_err(connect_error)?;
    // Latency matters more than packet count for proxied traffic.
    stream.set_nodelay(true).map_err(connect_error)?;
    Ok(stream)
}

enum Kind {
    Pooled(Arc<Pool>, Checkout),
    Upgrade(http1::SendRequest<BoxBody>),
}

/// A connection ready for one request.
pub struct Conn {
    addr: SocketAddr,
    kind: Kind,
}

impl Conn {
    /// Sends `req` (hop-by-hop headers removed, version and URI fitted to the connection) and
    /// returns the response head with its body streaming. When the connection turns out
    /// closed before the request left, the error gives the request back so the caller may
    /// send it elsewhere. A pooled connection counts as in use until the response body ends
    /// or is dropped.
    pub async fn send(self, mut req: Request<BoxBody>) -> Result<Response<BoxBody>, SendError> {
        let addr = self.addr;
        let upgrade = matches!(self.kind, Kind::Upgrade(_));
        headers::strip_hop_by_hop(req.headers_mut(), upgrade);
        let rsp = match self.kind {
            Kind::Pooled(pool, checkout) => {
                let Checkout {
                    key,
                    id,
                    sender,
                    lease,
                    ..
                } = checkout;
                match sender {
                    Sender::Http2(sender) => {
                        fit_http2(&mut req, addr);
                        let rsp = sender.send(req, addr).await?;
                        rsp.map(|body| body::boxed(Leased::new(body, lease)))
                    }
                    Sender::Http1(mut sender) => {
                        fit_http1(&mut req);
                        let rsp = sender
                            .try_send_request(req)
                            .await
                            .map_err(|e| SendError::from_try(addr, e))?;
                        pool.release(key, id, sender, &lease);
                        rsp.map(|body| body::boxed(Leased::new(body, lease)))
                    }
                }
            }
            Kind::Upgrade(mut sender) => {
                fit_http1(&mut req);
                let is_connect = req.method() == Method::CONNECT;
                let client_side = hyper::upgrade::on(&mut req);
                let mut rsp = sender
                    .try_send_request(req)
                    .await
                    .map_err(|e| SendError::from_try(addr, e))?;
                let switched = rsp.status() == StatusCode::SWITCHING_PROTOCOLS
                    || (is_connect && rsp.status().is_success());
                if switched {
                    let server_side = hyper::upgrade::on(&mut rsp);
                    tokio::spawn(splice(client_side, server_side, addr));
                }
                rsp.map(body::boxed)
            }
        };
        let (mut parts, body) = rsp.into_parts();
        let switched = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        headers::strip_hop_by_hop(&mut parts.headers, switched);
        Ok(Response::from_parts(parts, body))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its connection's lease until it ends or is dropped.
    struct Leased<B> {
        #[pin]
        inner: B,
        lease: Option<Lease>,
    }
}

impl<B> Leased<B> {
    fn new(inner: B, lease: Lease) -> Self {
        Self {
            inner,
            lease: Some(lease),
        }
    }
}

impl<B: Body> Body for Leased<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            this.lease.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request that failed, and the request itself when it never left.
#[derive(Debug)]
pub struct SendError {
    pub error: ClientError,
    pub unsent: Option<Request<BoxBody>>,
}

impl SendError {
    fn from_try(addr: SocketAddr, mut e: TrySendError<Request<BoxBody>>) -> Self {
        let unsent = e.take_message();
        Self {
            error: ClientError::Request {
                addr,
                source: Arc::new(e.into_error()),
            },
            unsent,
        }
    }
}

/// Copies bytes both ways between the two upgraded connections until both sides close.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
    addr: SocketAddr,
) {
    let (client, server) = match tokio::try_join!(client, server) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%addr, %error, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut server = TokioIo::new(server);
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok((up, down)) => tracing::debug!(%addr, up, down, "upgraded connection closed"),
        Err(error) => tracing::debug!(%addr, %error, "upgraded connection failed"),
    }
}

/// HTTP/1 wants origin-form targets (`/path?q`), except `CONNECT`'s authority-form.
fn fit_http1(req: &mut Request<BoxBody>) {
    if req.version() == Version::HTTP_2 {
        *req.version_mut() = Version::HTTP_11;
    }
    if req.method() != Method::CONNECT && req.uri().authority().is_some() {
        if !req.headers().contains_key(header::HOST)
            && let Some(host) = req.uri().authority().and_then(|a| a.as_str().parse().ok())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
    }
}

/// HTTP/2 wants a scheme and an authority: taken from the `Host` header, else the address.
fn fit_http2(req: &mut Request<BoxBody>, addr: SocketAddr) {
    *req.version_mut() = Version::HTTP_2;
    if req.uri().scheme().is_some() && req.uri().authority().is_some() {
        return;
    }
    let authority = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| {
            addr.to_string()
                .parse()
                .expect("a socket address is an authority")
        });
    // Taken, not cloned: the parts are put back whole below.
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path make a URI");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_targets_are_origin_form() {
        let mut req = Request::get("http://user:8001/a?b=1")
            .version(Version::HTTP_2)
            .body(body::empty())
            .unwrap();
        fit_http1(&mut req);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()[header::HOST], "user:8001");
    }

    #[test]
    fn http2_targets_are_absolute() {
        let mut req = Request::get("/a")
            .header(header::HOST, "user")
            .body(body::empty())
            .unwrap();
        fit_http2(&mut req, "127.0.0.1:1".parse().unwrap());
        assert_eq!(req.uri(), "http://user/a");
        assert!(!req.headers().contains_key(header::HOST));
    }

    #[test]
    fn http2_targets_without_a_usable_host_name_the_address() {
        let addr = "127.0.0.1:4143".parse().unwrap();
        let mut no_host = Request::get("/a?b=1").body(body::empty()).unwrap();
        fit_http2(&mut no_host, addr);
        assert_eq!(no_host.uri(), "http://127.0.0.1:4143/a?b=1");
        let mut bad_host = Request::get("/")
            .header(header::HOST, "not a host")
            .body(body::empty())
            .unwrap();
        fit_http2(&mut bad_host, addr);
        assert_eq!(bad_host.uri(), "http://127.0.0.1:4143/");
        assert!(!bad_host.headers().contains_key(header::HOST));
    }
}
