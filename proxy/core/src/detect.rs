//! Protocol detection on accepted connections.
//!
//! Reads the first bytes of a connection and decides: the HTTP/2 client preface, an HTTP/1.x
//! request line, something that starts like an HTTP request but is not one (answered 400 by
//! the caller), or anything else (forwarded as opaque TCP). Detection gives up after a
//! timeout and treats the connection as opaque, so a client that waits for the server to speak
//! first is only delayed, never stuck; ports configured opaque skip detection entirely. The
//! bytes read are replayed to whoever handles the connection through [`PrefixedIo`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::metrics::DetectResult;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A request line longer than this is not worth waiting for.
const MAX_REQUEST_LINE: usize = 16 * 1024;
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Reads from `io` until the protocol is known or `timeout` passes.
pub async fn detect<T>(mut io: T, timeout: Duration) -> io::Result<(DetectResult, PrefixedIo<T>)>
where
    T: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let read_until_known = async {
        loop {
            if buf.len() >= MAX_REQUEST_LINE {
                return Ok::<_, io::Error>(classify(&buf, true));
            }
            if io.read_buf(&mut buf).await? == 0 {
                return Ok(classify(&buf, true));
            }
            if let Some(result) = classify(&buf, false) {
                return Ok(Some(result));
            }
        }
    };
    let result = match tokio::time::timeout(timeout, read_until_known).await {
        Ok(result) => result?.unwrap_or(DetectResult::Opaque),
        Err(_elapsed) => DetectResult::Timeout,
    };
    Ok((result, PrefixedIo::new(buf.freeze(), io)))
}

/// Whether a connection starts with a TLS ClientHello: `Some(true)`, `Some(false)` (anything
/// else, including a connection that sent nothing within `timeout`, such as a client waiting
/// for its server to speak first), with the bytes read put back in front.
pub async fn detect_tls<T>(mut io: T, timeout: Duration) -> io::Result<(bool, PrefixedIo<T>)>
where
    T: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(512);
    let read_until_known = async {
        loop {
            if let Some(known) = is_client_hello(&buf) {
                return Ok::<_, io::Error>(known);
            }
            if io.read_buf(&mut buf).await? == 0 {
                return Ok(false);
            }
        }
    };
    let tls = tokio::time::timeout(timeout, read_until_known)
        .await
        .unwrap_or(Ok(false))?;
    Ok((tls, PrefixedIo::new(buf.freeze(), io)))
}

/// Whether `prefix` starts a TLS ClientHello: a handshake record (22) of version 3.1–3.4 whose
/// first message is a ClientHello (1). `None` while too few bytes have come to tell.
pub fn is_client_hello(prefix: &[u8]) -> Option<bool> {
    match prefix {
        [] | [0x16] | [0x16, 0x03] => None,
        [0x16, 0x03, minor, ..] if *minor <= 0x04 => prefix.get(5).map(|&kind| kind == 0x01),
        _ => Some(false),
    }
}

/// `None` while more bytes could change the answer; `done` means no more bytes will come.
fn classify(buf: &[u8], done: bool) -> Option<DetectResult> {
    if buf.is_empty() {
        return done.then_some(DetectResult::Opaque);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(DetectResult::Http2)
        } else {
            done.then_some(DetectResult::Opaque)
        };
    }
    if let Some(end) = buf.iter().position(|&b| b == b'\n') {
        let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
        return Some(if is_request_line(line) {
            DetectResult::Http1
        } else if starts_like_http(line) {
            DetectResult::MalformedHttp
        } else {
            DetectResult::Opaque
        });
    }
    if !buf[0].is_ascii_uppercase() {
        return Some(DetectResult::Opaque);
    }
    if done {
        return Some(if starts_like_http(buf) {
            DetectResult::MalformedHttp
        } else {
            DetectResult::Opaque
        });
    }
    None
}

fn is_request_line(line: &[u8]) -> bool {
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    token(method)
        && !target.is_empty()
        && target.bytes().all(|b| b.is_ascii_graphic())
        && (version == "HTTP/1.1" || version == "HTTP/1.0")
}

fn starts_like_http(line: &[u8]) -> bool {
    METHODS.iter().any(|m| {
        line.strip_prefix(m.as_bytes())
            .is_some_and(|rest| rest.first() == Some(&b' '))
    })
}

pin_project_lite::pin_project! {
    /// A connection whose first bytes were already read: they are read again first.
    pub struct PrefixedIo<T> {
        prefix: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> PrefixedIo<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }

    /// The bytes detection read (not yet consumed by a reader).
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }
}

impl<T: AsyncRead> AsyncRead for PrefixedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for PrefixedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn detect_bytes(input: &[u8], close: bool) -> (DetectResult, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client.write_all(input).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        let (result, mut io) = detect(server, Duration::from_millis(200)).await.unwrap();
        drop(client);
        let mut replay = Vec::new();
        io.read_to_end(&mut replay).await.unwrap();
        (result, replay)
    }

    #[tokio::test]
    async fn http2_preface() {
        let (r, replay) = detect_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest", false).await;
        assert_eq!(r, DetectResult::Http2);
        assert!(replay.starts_with(H2_PREFACE));
        assert!(replay.ends_with(b"rest"));
    }

    #[tokio::test]
    async fn http1_request_line_is_replayed() {
        let req = b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n";
        let (r, replay) = detect_bytes(req, false).await;
        assert_eq!(r, DetectResult::Http1);
        assert_eq!(replay, req);
    }

    #[tokio::test]
    async fn malformed_http() {
        let (r, _) = detect_bytes(b"GET /a b HTTP/1.1\r\n\r\n", false).await;
        assert_eq!(r, DetectResult::MalformedHttp);
        let (r, _) = detect_bytes(b"POST /x HTTP/9\r\n\r\n", false).await;
        assert_eq!(r, DetectResult::MalformedHttp);
    }

    #[tokio::test]
    async fn binary_is_opaque_at_once() {
        let (r, replay) = detect_bytes(b"\x16\x03\x01hello", false).await;
        assert_eq!(r, DetectResult::Opaque);
        assert_eq!(replay, b"\x16\x03\x01hello");
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        let (r, replay) = detect_bytes(b"", false).await;
        assert_eq!(r, DetectResult::Timeout);
        assert!(replay.is_empty());
    }

    #[tokio::test]
    async fn partial_preface_then_close_is_opaque() {
        let (r, _) = detect_bytes(b"PRI * HT", true).await;
        assert_eq!(r, DetectResult::Opaque);
    }

    #[test]
    fn client_hello_detection() {
        let hello = [0x16, 0x03, 0x01, 0x00, 0xf0, 0x01, 0x00];
        assert_eq!(is_client_hello(&hello), Some(true));
        assert_eq!(is_client_hello(&hello[..3]), None);
        assert_eq!(is_client_hello(b"GET / HTTP/1.1\r\n"), Some(false));
        assert_eq!(is_client_hello(b"PRI * HTTP/2.0"), Some(false));
        assert_eq!(is_client_hello(&[0x16, 0x03, 0x09, 0, 0, 1]), Some(false));
        assert_eq!(
            is_client_hello(&[0x16, 0x03, 0x03, 0, 5, 0x02]),
            Some(false)
        );
    }
}
