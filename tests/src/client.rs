//! Small HTTP client helpers for tests: one request on a fresh connection, HTTP/1.1 or h2c.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Bounds every helper request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A response with its body read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn collect(resp: Response<hyper::body::Incoming>) -> anyhow::Result<Reply> {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .context("reading the response body")?
        .to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends one HTTP/1.1 request on a new connection to `addr`.
pub async fn http1(addr: SocketAddr, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        collect(sender.send_request(req).await?).await
    })
    .await
    .with_context(|| format!("request to {addr} timed out"))?
}

/// Sends one HTTP/2 (prior knowledge, h2c) request on a new connection to `addr`.
pub async fn http2(addr: SocketAddr, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        tokio::spawn(conn);
        collect(sender.send_request(req).await?).await
    })
    .await
    .with_context(|| format!("request to {addr} timed out"))?
}

/// `GET path` over HTTP/1.1: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let reply = http1(addr, req).await?;
    Ok((reply.status, reply.body))
}

/// A `GET path` request with a Host header, for [`http1`] / [`http2`].
pub fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{host}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .expect("valid request")
}
