//! Pooled HTTP/2 connections on the `h2` crate directly, without hyper's client dispatcher.
//!
//! Every request to a peer goes over one pooled HTTP/2 connection, so the per-request cost of
//! the client is the proxy's cost. hyper's HTTP/2 client sends each request through its
//! dispatch channel with a callback and a cancel oneshot, and spawns a task per request that
//! only waits for the response head (issue #9). Here a request is `poll_ready`, `send_request`
//! and the response future, all polled in the caller's own future; the connection itself is
//! driven by the pool's task ([`drive`]).
//!
//! A request body that is complete when the request is sent (empty, or one frame and its end,
//! as in a unary gRPC call) is sent inline. Only a body still streaming gets a task, [`Pipe`],
//! which sends it under HTTP/2 flow control; it resets the stream when the body fails or when
//! the caller drops the response before its end. The response body ([`RecvBody`]) gives the
//! peer its window back for every data frame it hands out.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::{HeaderMap, Method, Request, Response, header};
use http_body::{Body, Frame};
use tokio::sync::oneshot;

use ferrule_proxy_core::body::{BoxBody, BoxError};

use crate::client::{ClientError, MeshIo, SendError};
use crate::pool::Driver;

/// hyper's HTTP/2 client settings, which these connections used before: windows larger than
/// the spec's 64 KiB so one stream can fill a fast link, and a bounded send buffer per stream.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// One connection carries every request to its key: a ping every interval notices a peer that
/// vanished without closing it, and the connection closes when the pong is later than the
/// timeout. Pings are not use: an idle connection still closes after its idle timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The sending half of a pooled HTTP/2 connection; clones share the connection.
#[derive(Clone)]
pub(crate) struct Http2Sender {
    send: SendRequest<Bytes>,
    /// Set when the connection is known to be unusable: its driver ended, or it refused a new
    /// stream. `h2` has no such question, and the pool must not hand it out again.
    closed: Arc<AtomicBool>,
}

/// HTTP/2 over `io` (TCP or mutual TLS), with hyper's client settings.
pub(crate) async fn handshake(
    io: Box<dyn MeshIo>,
    addr: SocketAddr,
) -> Result<(Http2Sender, Driver), ClientError> {
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|source| ClientError::Http2Handshake {
            addr,
            source: Arc::new(source),
        })?;
    let ping = conn
        .ping_pong()
        .expect("a new connection's ping handle is taken once");
    let closed = Arc::new(AtomicBool::new(false));
    let driver = drive(conn, ping, MarkClosed(closed.clone()));
    Ok((Http2Sender { send, closed }, Box::pin(driver)))
}

/// Marks the connection closed when its driver ends or is dropped, before the pool forgets it.
struct MarkClosed(Arc<AtomicBool>);

impl Drop for MarkClosed {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Why a connection's driver ended with an error.
#[derive(Debug, thiserror::Error)]
enum DriveError {
    #[error(transparent)]
    Connection(#[from] h2::Error),
    #[error("no answer to a keep-alive ping within {0:?}")]
    KeepAliveTimeout(Duration),
}

/// Drives the connection (its frames, flow control and the requests' streams) until it
/// closes or a keep-alive ping goes unanswered.
async fn drive(
    conn: Connection<Box<dyn MeshIo>, Bytes>,
    mut ping: PingPong,
    _closed: MarkClosed,
) -> Result<(), BoxError> {
    tokio::select! {
        biased;
        result = conn => result.map_err(|e| DriveError::from(e).into()),
        error = keep_alive(&mut ping) => Err(error.into()),
    }
}

/// Pings every [`KEEPALIVE_INTERVAL`]; returns when a pong is missing or pinging fails.
async fn keep_alive(ping: &mut PingPong) -> DriveError {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        if let Err(error) = ping.send_ping(Ping::opaque()) {
            return error.into();
        }
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, poll_fn(|cx| ping.poll_pong(cx))).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(error)) => return error.into(),
            Err(_) => return DriveError::KeepAliveTimeout(KEEPALIVE_TIMEOUT),
        }
    }
}

impl Http2Sender {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` (already fitted to HTTP/2) and waits for the response head. The request
    /// comes back in the error when the connection cannot take a new stream.
    pub(crate) async fn send(
        mut self,
        req: Request<BoxBody>,
        addr: SocketAddr,
    ) -> Result<Response<RecvBody>, SendError> {
        if let Err(source) = poll_fn(|cx| self.send.poll_ready(cx)).await {
            self.closed.store(true, Ordering::Release);
            return Err(SendError {
                error: request_error(addr, source),
                unsent: Some(req),
            });
        }
        let (head, mut body) = req.into_parts();
        let mut head = Request::from_parts(head, ());
        // As hyper did: a body of known size gets its `content-length`.
        if let Some(len) = body.size_hint().exact()
            && (len != 0 || has_payload_semantics(head.method()))
            && !head.headers().contains_key(header::CONTENT_LENGTH)
        {
            head.headers_mut()
                .insert(header::CONTENT_LENGTH, http::HeaderValue::from(len));
        }
        let start = start(&mut body).await.map_err(|source| SendError {
            error: ClientError::RequestBody {
                addr,
                source: Arc::from(source),
            },
            unsent: None,
        })?;
        let sent_error = |source| SendError {
            error: request_error(addr, source),
            unsent: None,
        };
        let end_of_stream = matches!(start, Start::Complete(Complete::Nothing));
        let (response, mut stream) = self
            .send
            .send_request(head, end_of_stream)
            .map_err(sent_error)?;
        // Held until the response ends: dropping it makes a streaming pipe reset the stream.
        let mut pipe_guard = None;
        match start {
            Start::Complete(rest) => rest.send(&mut stream).map_err(sent_error)?,
            Start::Streaming(taken) => {
                for data in taken.into_iter().flatten() {
                    stream.send_data(data, false).map_err(sent_error)?;
                }
                let (guard, cancel) = oneshot::channel();
                pipe_guard = Some(cancel);
                tokio::spawn(Pipe {
                    body,
                    stream,
                    guard,
                    addr,
                });
            }
        }
        let rsp = response.await.map_err(sent_error)?;
        Ok(rsp.map(|recv| RecvBody {
            recv,
            data_done: false,
            _pipe: pipe_guard,
        }))
    }
}

fn request_error(addr: SocketAddr, source: h2::Error) -> ClientError {
    ClientError::Http2 {
        addr,
        source: Arc::new(source),
    }
}

/// Methods whose request body means something, so a zero length is said explicitly.
fn has_payload_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::CONNECT
    )
}

/// What the request body had ready when the request was sent.
enum Start {
    /// All of it: sent inline, no task.
    Complete(Complete),
    /// More to come: the data frames already taken, if any; the rest is piped by a task.
    Streaming([Option<Bytes>; 2]),
}

/// A whole body, taken without waiting.
enum Complete {
    Nothing,
    Data(Bytes),
    Trailers(Option<Bytes>, HeaderMap),
}

impl Complete {
    fn send(self, stream: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
        match self {
            // The request's HEADERS frame carried END_STREAM.
            Complete::Nothing => Ok(()),
            // Sent without waiting for window: `h2` buffers it until the peer gives some, and
            // it is in memory already.
            Complete::Data(data) => stream.send_data(data, true),
            Complete::Trailers(data, trailers) => {
                if let Some(data) = data {
                    stream.send_data(data, false)?;
                }
                stream.send_trailers(trailers)
            }
        }
    }
}

/// Polls `body` without waiting, at most twice: enough to see a unary call's one message and
/// its end. It runs before the request is sent, so a body error here means nothing was sent.
async fn start(body: &mut BoxBody) -> Result<Start, BoxError> {
    if body.is_end_stream() {
        return Ok(Start::Complete(Complete::Nothing));
    }
    let data = match poll_once(body).await {
        Poll::Pending => return Ok(Start::Streaming([None, None])),
        Poll::Ready(None) => return Ok(Start::Complete(Complete::Nothing)),
        Poll::Ready(Some(frame)) => match frame?.into_data() {
            Ok(data) => data,
            Err(frame) => return Ok(trailers_or_streaming(None, frame)),
        },
    };
    if body.is_end_stream() {
        return Ok(Start::Complete(Complete::Data(data)));
    }
    Ok(match poll_once(body).await {
        Poll::Pending => Start::Streaming([Some(data), None]),
        Poll::Ready(None) => Start::Complete(Complete::Data(data)),
        Poll::Ready(Some(frame)) => match frame?.into_data() {
            // A second data frame: a stream, not one message.
            Ok(second) => Start::Streaming([Some(data), Some(second)]),
            Err(frame) => trailers_or_streaming(Some(data), frame),
        },
    })
}

fn trailers_or_streaming(data: Option<Bytes>, frame: Frame<Bytes>) -> Start {
    match frame.into_trailers() {
        Ok(trailers) => Start::Complete(Complete::Trailers(data, trailers)),
        // Neither data nor trailers: nothing to send; the pipe goes on.
        Err(_) => Start::Streaming([data, None]),
    }
}

async fn poll_once(body: &mut BoxBody) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
}

/// Sends the rest of a streaming request body (gRPC client and bidirectional streams) under
/// HTTP/2 flow control: it takes a frame from the body only when the stream has window.
struct Pipe {
    body: BoxBody,
    stream: SendStream<Bytes>,
    /// Closed when the caller dropped the response (or it ended): stop and reset.
    guard: oneshot::Sender<Infallible>,
    addr: SocketAddr,
}

impl Future for Pipe {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            if this.guard.poll_closed(cx).is_ready() {
                this.stream.send_reset(Reason::CANCEL);
                return Poll::Ready(());
            }
            // Ask for a byte of window before taking a frame: `h2` asks the peer for the
            // rest of the frame's size when it is sent.
            this.stream.reserve_capacity(1);
            if this.stream.capacity() == 0 {
                loop {
                    match ready!(this.stream.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(error)) => return this.stopped(&error),
                        // The stream is no longer sending: the peer reset or finished it.
                        None => return Poll::Ready(()),
                    }
                }
            } else if let Poll::Ready(reason) = this.stream.poll_reset(cx) {
                tracing::debug!(addr = %this.addr, ?reason, "peer reset the request stream");
                return Poll::Ready(());
            }
            let sent = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = this.body.is_end_stream();
                        match this.stream.send_data(data, end) {
                            Ok(()) if !end => continue,
                            sent => sent,
                        }
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => this.stream.send_trailers(trailers),
                        Err(_) => continue,
                    },
                },
                Some(Err(error)) => {
                    tracing::debug!(addr = %this.addr, %error, "request body failed; resetting the stream");
                    this.stream.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
                None => this.stream.send_data(Bytes::new(), true),
            };
            return match sent {
                Ok(()) => Poll::Ready(()),
                Err(error) => this.stopped(&error),
            };
        }
    }
}

impl Pipe {
    fn stopped(&self, error: &h2::Error) -> Poll<()> {
        tracing::debug!(addr = %self.addr, %error, "request body not sent to the end");
        Poll::Ready(())
    }
}

/// A response body read from its HTTP/2 stream. Every data frame handed out gives its size
/// back to the peer's window: the stream's window is the proxy's buffer, and what the
/// downstream has taken is no longer buffered here.
pub(crate) struct RecvBody {
    recv: RecvStream,
    data_done: bool,
    /// The streaming request body's pipe stops when this drops (see [`Pipe::guard`]).
    _pipe: Option<oneshot::Receiver<Infallible>>,
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Fails only when the stream is gone, which the next poll reports.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // As hyper: a peer that resets with NO_ERROR or CANCEL after its response
                // (it needs no more of the request) ends the body; it does not fail it.
                Some(Err(error)) if is_graceful_reset(&error) => return Poll::Ready(None),
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

fn is_graceful_reset(error: &h2::Error) -> bool {
    matches!(error.reason(), Some(Reason::NO_ERROR | Reason::CANCEL))
}
