//! Request bodies that can be sent again, so a request with a body can be retried.
//!
//! [`replayable`] wraps a request body for its first attempt: the body streams through
//! unchanged (nothing waits for it to be complete, so streaming calls never stall) while its
//! frames are kept, up to a cap ([`MAX_REPLAY_BYTES`] by default). [`Replay::body`] then gives
//! the same body again — data and trailers — if and only if the first attempt read the body to
//! its end within the cap. A body larger than the cap, one that failed, or one whose end the
//! first attempt had not reached when the retry is decided (a server that answered before
//! reading the whole request) is not replayable, and the request is not retried: its failure
//! goes back to the app. Requests without a body (most GETs) are always replayable.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use ferrule_proxy_core::body::{BoxBody, BoxError};

/// The largest request body kept for a retry.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

/// Wraps `body` for its first attempt. Returns the body to send and the handle that gives
/// replays of it.
pub fn replayable(body: BoxBody, cap: usize) -> (BoxBody, Replay) {
    // Most requests have no body: nothing to record, nothing to wrap, no allocation.
    if body.is_end_stream() {
        return (body, Replay { shared: None });
    }
    let mut recorded = Recorded::default();
    if body.size_hint().lower() > cap as u64 {
        recorded.state = State::Unusable;
    }
    let shared = Arc::new(Mutex::new(recorded));
    let recording = Recording {
        inner: body,
        shared: shared.clone(),
        cap,
    };
    (
        ferrule_proxy_core::body::boxed(recording),
        Replay {
            shared: Some(shared),
        },
    )
}

/// Gives copies of a body recorded by [`replayable`].
#[derive(Clone, Debug)]
pub struct Replay {
    /// `None` for a body that was empty from the start.
    shared: Option<Arc<Mutex<Recorded>>>,
}

impl Replay {
    /// The body again, if its first attempt read all of it within the cap.
    pub fn body(&self) -> Option<BoxBody> {
        let Some(shared) = &self.shared else {
            return Some(ferrule_proxy_core::body::empty());
        };
        let recorded = lock(shared);
        if recorded.state != State::Complete {
            return None;
        }
        Some(ferrule_proxy_core::body::boxed(Replayed {
            data: recorded.data.iter().cloned().collect(),
            trailers: recorded.trailers.clone(),
            remaining: recorded.len as u64,
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// The first attempt is still reading.
    #[default]
    Recording,
    /// Read to its end within the cap: replayable.
    Complete,
    /// Over the cap, or failed: never replayable, nothing kept.
    Unusable,
}

#[derive(Debug, Default)]
struct Recorded {
    state: State,
    data: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
}

fn lock(shared: &Mutex<Recorded>) -> std::sync::MutexGuard<'_, Recorded> {
    // Recorded frames are only appended whole; a panic elsewhere cannot leave them torn.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Recorded {
    fn give_up(&mut self) {
        self.state = State::Unusable;
        self.data = Vec::new();
        self.trailers = None;
    }
}

/// The first attempt's body: the original, recording what passes through.
struct Recording {
    inner: BoxBody,
    shared: Arc<Mutex<Recorded>>,
    cap: usize,
}

impl Body for Recording {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let Poll::Ready(frame) = polled else {
            return Poll::Pending;
        };
        let ended = self.inner.is_end_stream();
        let mut recorded = lock(&self.shared);
        match &frame {
            Some(Ok(frame)) if recorded.state == State::Recording => {
                if let Some(data) = frame.data_ref() {
                    if recorded.len + data.len() > self.cap {
                        recorded.give_up();
                    } else {
                        recorded.len += data.len();
                        recorded.data.push(data.clone());
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    recorded.trailers = Some(trailers.clone());
                }
                // Callers may stop polling once the body says it has ended, without waiting
                // for the final `None`.
                if ended && recorded.state == State::Recording {
                    recorded.state = State::Complete;
                }
            }
            Some(Err(_)) => recorded.give_up(),
            None if recorded.state == State::Recording => recorded.state = State::Complete,
            _ => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A replay: the recorded frames, with the exact length known up front.
struct Replayed {
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    remaining: u64,
}

impl Body for Replayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(data) = self.data.pop_front() {
            self.remaining -= data.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;
    use ferrule_proxy_core::body;

    /// A chunked body of `chunks`, with optional trailers, of unknown length.
    fn chunked(chunks: &[&'static str], trailers: Option<HeaderMap>) -> BoxBody {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        frames.extend(trailers.map(|t| Ok(Frame::trailers(t))));
        body::boxed(StreamBody::new(stream::iter(frames)))
    }

    async fn read(body: BoxBody) -> (Bytes, Option<HeaderMap>) {
        let collected = body.collect().await.expect("body reads");
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_replays_with_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let (first, replay) = replayable(chunked(&["ab", "cd"], Some(trailers)), 16);
        assert!(replay.body().is_none(), "nothing read yet");
        let (data, t) = read(first).await;
        assert_eq!(data, "abcd");
        for _ in 0..2 {
            let again = replay.body().expect("replayable");
            assert_eq!(again.size_hint().exact(), Some(4));
            let (data, t2) = read(again).await;
            assert_eq!(data, "abcd");
            assert_eq!(t2, t);
        }
    }

    #[tokio::test]
    async fn empty_and_known_small_bodies_are_replayable() {
        let (_first, replay) = replayable(body::empty(), 16);
        let again = replay.body().expect("an empty body needs no reading");
        assert!(again.is_end_stream());

        // A full body that ends without a final `None` being polled still counts as read.
        let (mut first, replay) = replayable(body::full("hello"), 16);
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello");
        assert!(first.is_end_stream());
        assert_eq!(read(replay.body().unwrap()).await.0, "hello");
    }

    #[tokio::test]
    async fn bodies_over_the_cap_stream_through_but_do_not_replay() {
        // Known too large up front.
        let (first, replay) = replayable(body::full(vec![b'x'; 32]), 16);
        assert_eq!(read(first).await.0.len(), 32);
        assert!(replay.body().is_none());

        // Found too large while streaming: every byte still reaches the first attempt.
        let (first, replay) = replayable(chunked(&["0123456789", "0123456789"], None), 16);
        assert_eq!(read(first).await.0.len(), 20);
        assert!(replay.body().is_none());
    }

    #[tokio::test]
    async fn a_partly_read_or_failed_body_does_not_replay() {
        let (mut first, replay) = replayable(chunked(&["a", "b"], None), 16);
        first.frame().await.unwrap().unwrap();
        assert!(replay.body().is_none(), "the end was not reached");

        let failing: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Err("reset".into()),
        ];
        let (first, replay) = replayable(body::boxed(StreamBody::new(stream::iter(failing))), 16);
        assert!(first.collect().await.is_err());
        assert!(replay.body().is_none());
    }
}
