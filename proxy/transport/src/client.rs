//! HTTP client connections from the proxy to one address (an endpoint or the local app).
//!
//! HTTP/2 gets one multiplexed connection per address, reused by every request; HTTP/1 gets a
//! small pool of keep-alive connections per address; upgrades (`Upgrade`, `CONNECT`) get a
//! fresh HTTP/1 connection each, spliced to the client's once both sides have switched.
//! Connecting is a step of its own ([`Clients::connect`]) so a caller can try another endpoint
//! when it fails: nothing of the request has been sent yet. TLS will wrap the stream here.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, StatusCode, Version, header};
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use ferrule_proxy_core::body::{self, BoxBody};
use ferrule_proxy_core::headers;

/// Idle HTTP/1 connections kept per address.
const MAX_IDLE_PER_ADDR: usize = 32;
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("endpoint address {0:?} is not an IP socket address")]
    BadAddress(String),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connecting to {addr}: no answer within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("request to {addr}: {source}")]
    Request {
        addr: SocketAddr,
        source: hyper::Error,
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

#[derive(Default)]
struct Pools {
    h1: HashMap<SocketAddr, Vec<http1::SendRequest<BoxBody>>>,
    h2: HashMap<SocketAddr, http2::SendRequest<BoxBody>>,
}

/// Connections of one proxy to every address it forwards to. Cheap to clone.
#[derive(Clone)]
pub struct Clients {
    pools: Arc<Mutex<Pools>>,
    connect_timeout: Duration,
}

impl Clients {
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            pools: Arc::default(),
            connect_timeout,
        }
    }

    /// A connection to `addr` ready to carry one request of `protocol`.
    pub async fn connect(&self, addr: SocketAddr, protocol: Protocol) -> Result<Conn, ClientError> {
        match protocol {
            Protocol::Http2 => {
                let existing = self.lock().h2.get(&addr).cloned();
                if let Some(sender) = existing.filter(|s| !s.is_closed()) {
                    return Ok(Conn::new(self, addr, Kind::H2(sender)));
                }
                let io = self.tcp(addr).await?;
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    // One connection carries every request to the address: notice a peer
                    // that vanished without closing it.
                    .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                    .handshake(io)
                    .await
                    .map_err(|source| ClientError::Handshake { addr, source })?;
                tokio::spawn(async move {
                    if let Err(error) = conn.await {
                        tracing::debug!(%addr, %error, "HTTP/2 connection ended");
                    }
                });
                let mut pools = self.lock();
                // Forget connections that closed since (endpoints that went away).
                pools.h2.retain(|_, s| !s.is_closed());
                pools.h2.insert(addr, sender.clone());
                Ok(Conn::new(self, addr, Kind::H2(sender)))
            }
            Protocol::Http1 => {
                if let Some(sender) = self.idle_h1(addr) {
                    return Ok(Conn::new(self, addr, Kind::H1(sender)));
                }
                let sender = self.h1_handshake(addr, false).await?;
                // Forget connections that closed since (endpoints that went away).
                self.lock().h1.retain(|_, senders| {
                    senders.retain(|s| !s.is_closed());
                    !senders.is_empty()
                });
                Ok(Conn::new(self, addr, Kind::H1(sender)))
            }
            Protocol::Upgrade => {
                let sender = self.h1_handshake(addr, true).await?;
                Ok(Conn::new(self, addr, Kind::Upgrade(sender)))
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pools> {
        self.pools.lock().expect("connection pool lock poisoned")
    }

    /// An idle pooled connection; busy ones (still streaming a response) stay in the pool.
    fn idle_h1(&self, addr: SocketAddr) -> Option<http1::SendRequest<BoxBody>> {
        let mut pools = self.lock();
        let senders = pools.h1.get_mut(&addr)?;
        senders.retain(|s| !s.is_closed());
        let idle = senders.iter().position(|s| s.is_ready())?;
        Some(senders.swap_remove(idle))
    }

    fn release_h1(&self, addr: SocketAddr, sender: http1::SendRequest<BoxBody>) {
        let mut pools = self.lock();
        let senders = pools.h1.entry(addr).or_default();
        if senders.len() < MAX_IDLE_PER_ADDR {
            senders.push(sender);
        }
    }

    async fn tcp(&self, addr: SocketAddr) -> Result<TokioIo<TcpStream>, ClientError> {
        connect_tcp(addr, self.connect_timeout)
            .await
            .map(TokioIo::new)
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    async fn h1_handshake(
        &self,
        addr: SocketAddr,
        upgrades: bool,
    ) -> Result<http1::SendRequest<BoxBody>, ClientError> {
        let io = self.tcp(addr).await?;
        let (mut sender, conn) = http1::handshake(io)
            .await
            .map_err(|source| ClientError::Handshake { addr, source })?;
        tokio::spawn(async move {
            let result = if upgrades {
                conn.with_upgrades().await
            } else {
                conn.await
            };
            if let Err(error) = result {
                tracing::debug!(%addr, %error, "HTTP/1 connection ended");
            }
        });
        sender
            .ready()
            .await
            .map_err(|source| ClientError::Handshake { addr, source })?;
        Ok(sender)
    }
}

/// Opens a TCP connection with a bound on how long it may take.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ClientError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ClientError::ConnectTimeout { addr, timeout })?
        .map_err(|source| ClientError::Connect { addr, source })?;
    // Latency matters more than packet count for proxied traffic.
    stream
        .set_nodelay(true)
        .map_err(|source| ClientError::Connect { addr, source })?;
    Ok(stream)
}

enum Kind {
    H1(http1::SendRequest<BoxBody>),
    H2(http2::SendRequest<BoxBody>),
    Upgrade(http1::SendRequest<BoxBody>),
}

/// A connection ready for one request.
pub struct Conn {
    clients: Clients,
    addr: SocketAddr,
    kind: Kind,
}

impl Conn {
    fn new(clients: &Clients, addr: SocketAddr, kind: Kind) -> Self {
        Self {
            clients: clients.clone(),
            addr,
            kind,
        }
    }

    /// Sends `req` (hop-by-hop headers removed, version and URI fitted to the connection) and
    /// returns the response head with its body streaming. When the connection turns out
    /// closed before the request left, the error gives the request back so the caller may
    /// send it elsewhere.
    pub async fn send(self, mut req: Request<BoxBody>) -> Result<Response<BoxBody>, SendError> {
        let addr = self.addr;
        let upgrade = matches!(self.kind, Kind::Upgrade(_));
        headers::strip_hop_by_hop(req.headers_mut(), upgrade);
        let rsp = match self.kind {
            Kind::H2(mut sender) => {
                fit_http2(&mut req, addr);
                if let Err(source) = sender.ready().await {
                    return Err(SendError::unsent(addr, source, req));
                }
                sender
                    .try_send_request(req)
                    .await
                    .map_err(|e| SendError::from_try(addr, e))?
            }
            Kind::H1(mut sender) => {
                fit_http1(&mut req);
                let rsp = sender
                    .try_send_request(req)
                    .await
                    .map_err(|e| SendError::from_try(addr, e))?;
                self.clients.release_h1(addr, sender);
                rsp
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
                rsp
            }
        };
        let (mut parts, body) = rsp.into_parts();
        let switched = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        headers::strip_hop_by_hop(&mut parts.headers, switched);
        Ok(Response::from_parts(parts, body::boxed(body)))
    }
}

/// A request that failed, and the request itself when it never left.
#[derive(Debug)]
pub struct SendError {
    pub error: ClientError,
    pub unsent: Option<Request<BoxBody>>,
}

impl SendError {
    fn unsent(addr: SocketAddr, source: hyper::Error, req: Request<BoxBody>) -> Self {
        Self {
            error: ClientError::Request { addr, source },
            unsent: Some(req),
        }
    }

    fn from_try(addr: SocketAddr, mut e: TrySendError<Request<BoxBody>>) -> Self {
        let unsent = e.take_message();
        Self {
            error: ClientError::Request {
                addr,
                source: e.into_error(),
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
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<Authority>().ok())
        .unwrap_or_else(|| {
            addr.to_string()
                .parse()
                .expect("a socket address is an authority")
        });
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    req.headers_mut().remove(header::HOST);
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
}
