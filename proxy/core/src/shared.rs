//! Calling one stored service for many requests without cloning it for each.
//!
//! A tower service is called through `&mut self` after `poll_ready`, so a service stored where
//! many requests reach it (a connection's stack, a backend's stack) is usually cloned per
//! request and driven with `oneshot`: a boxed clone of every layer, dropped again when the
//! request ends. Most of the proxy's stacks are ready at once, so [`call_ready`] asks the stored
//! instance first, with a waker that does nothing, and calls it right away when it is ready.
//! Only an instance that has to wait (for an endpoint, a slot) leaves with its request, which
//! then drives it with its own waker, and a fresh clone takes its place: no waiter is ever left
//! behind with the waker that does nothing. A service that fails its readiness is replaced too.

use std::future::{Ready, ready};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use futures::future::{BoxFuture, Either};
use tower::Service;
use tower::util::{Oneshot, ServiceExt};

/// The future of [`call_ready`]: the stored instance's call, its readiness error, or a clone
/// that is still waiting to be ready.
pub type ReadyCall<S, R> = Either<
    <S as Service<R>>::Future,
    Either<Ready<Result<<S as Service<R>>::Response, <S as Service<R>>::Error>>, Oneshot<S, R>>,
>;

/// Sends `req` through `svc` when it is ready at once; else the waiting instance goes with
/// `req` (polled by the request's own task) and `svc` becomes a fresh clone.
pub fn call_ready<S, R>(svc: &mut S, req: R) -> ReadyCall<S, R>
where
    S: Service<R> + Clone,
{
    match svc.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(())) => Either::Left(svc.call(req)),
        Poll::Ready(Err(error)) => {
            *svc = svc.clone();
            Either::Right(Either::Left(ready(Err(error))))
        }
        Poll::Pending => {
            let fresh = svc.clone();
            let waiting = std::mem::replace(svc, fresh);
            Either::Right(Either::Right(waiting.oneshot(req)))
        }
    }
}

/// [`call_ready`] for a service whose future is already boxed (a `BoxStack`): that
/// future itself when the instance was ready, no second box; only a wait or an error is boxed.
pub fn call_ready_boxed<S, R, T, E>(svc: &mut S, req: R) -> BoxFuture<'static, Result<T, E>>
where
    S: Service<R, Response = T, Error = E, Future = BoxFuture<'static, Result<T, E>>>
        + Clone
        + Send
        + 'static,
    R: Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    match call_ready(svc, req) {
        Either::Left(called) => called,
        Either::Right(other) => Box::pin(other),
    }
}

/// A service many requests call through `&self` (hyper's `service_fn` is `Fn`), by
/// [`call_ready`] on one stored instance.
pub struct Shared<S>(Mutex<S>);

impl<S> Shared<S> {
    pub fn new(svc: S) -> Self {
        Self(Mutex::new(svc))
    }

    pub fn call<R>(&self, req: R) -> ReadyCall<S, R>
    where
        S: Service<R> + Clone,
    {
        call_ready(&mut *self.lock(), req)
    }

    /// [`call_ready_boxed`] on the stored instance.
    pub fn call_boxed<R, T, E>(&self, req: R) -> BoxFuture<'static, Result<T, E>>
    where
        S: Service<R, Response = T, Error = E, Future = BoxFuture<'static, Result<T, E>>>
            + Clone
            + Send
            + 'static,
        R: Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        call_ready_boxed(&mut *self.lock(), req)
    }

    fn lock(&self) -> MutexGuard<'_, S> {
        // Held only for `poll_ready` and `call`, which never block; a poisoned lock still
        // holds a service (a panic in those would have been a bug there, not a torn state).
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Semaphore;

    /// A service that is ready only with a permit of a shared semaphore, and counts its clones.
    struct Gate {
        permits: Arc<Semaphore>,
        pending: Option<futures::future::BoxFuture<'static, tokio::sync::OwnedSemaphorePermit>>,
        held: Option<tokio::sync::OwnedSemaphorePermit>,
        clones: Arc<AtomicUsize>,
        fail: bool,
    }

    impl Clone for Gate {
        fn clone(&self) -> Self {
            self.clones.fetch_add(1, Ordering::SeqCst);
            Self {
                permits: self.permits.clone(),
                pending: None,
                held: None,
                clones: self.clones.clone(),
                fail: self.fail,
            }
        }
    }

    impl Service<u32> for Gate {
        type Response = u32;
        type Error = &'static str;
        type Future = Ready<Result<u32, &'static str>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), &'static str>> {
            if self.fail {
                return Poll::Ready(Err("failed"));
            }
            if self.held.is_some() {
                return Poll::Ready(Ok(()));
            }
            let permits = self.permits.clone();
            let pending = self.pending.get_or_insert_with(|| {
                Box::pin(async move { permits.acquire_owned().await.unwrap() })
            });
            let permit = std::task::ready!(pending.as_mut().poll(cx));
            self.pending = None;
            self.held = Some(permit);
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: u32) -> Self::Future {
            let permit = self.held.take().expect("called when ready");
            // Given back at once: each call needs one permit to start, none to finish.
            drop(permit);
            ready(Ok(req + 1))
        }
    }

    fn gate(permits: usize, fail: bool) -> (Gate, Arc<Semaphore>, Arc<AtomicUsize>) {
        let sem = Arc::new(Semaphore::new(permits));
        let clones = Arc::new(AtomicUsize::new(0));
        let gate = Gate {
            permits: sem.clone(),
            pending: None,
            held: None,
            clones: clones.clone(),
            fail,
        };
        (gate, sem, clones)
    }

    #[tokio::test]
    async fn a_ready_service_is_called_without_a_clone() {
        let (gate, _, clones) = gate(1, false);
        let shared = Shared::new(gate);
        for i in 0..100 {
            assert_eq!(shared.call(i).await, Ok(i + 1));
        }
        assert_eq!(clones.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_service_leaves_with_its_request_and_is_woken_by_it() {
        let (gate, sem, clones) = gate(0, false);
        let shared = Shared::new(gate);
        let waiting = tokio::spawn(shared.call(1));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert_eq!(
            clones.load(Ordering::SeqCst),
            1,
            "a fresh clone took its place"
        );
        // The permit reaches the request that waits for it, not the stored instance: its own
        // waker wakes it (a waiter left with the no-op waker would hang this test).
        sem.add_permits(1);
        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the waiting request was never woken")
            .unwrap();
        assert_eq!(answer, Ok(2));
        // The next one finds the permit given back and is called on the stored instance.
        assert_eq!(shared.call(5).await, Ok(6));
        assert_eq!(clones.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_readiness_error_is_the_answer_and_the_instance_is_replaced() {
        let (gate, _, clones) = gate(1, true);
        let shared = Shared::new(gate);
        assert_eq!(shared.call(1).await, Err("failed"));
        assert_eq!(clones.load(Ordering::SeqCst), 1);
    }
}
