//! [`BoxStack`]: a stack behind one type, cloneable and shareable, whose calls return the
//! inner service's boxed future as it is.
//!
//! tower's `BoxCloneSyncService` boxes every future its service returns, also one that is
//! already a `BoxFuture`: every layer of the proxy returns one, so each of the three stacks a
//! request crosses (the listener's, the logical service's, the concrete backend's) cost a
//! second box per request. [`BoxStack::new`] takes a service whose future is boxed and
//! passes it through; [`BoxStack::boxing`] boxes any other future once.

use std::fmt;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::{Service, ServiceExt};

/// What [`BoxStack`] keeps: a service with a boxed future that can clone itself. Every
/// `Clone + Send + Sync + 'static` service whose future is a `BoxFuture` is one.
pub trait CloneStack<Req, Rsp, E>:
    Service<Req, Response = Rsp, Error = E, Future = BoxFuture<'static, Result<Rsp, E>>> + Send + Sync
{
    fn clone_stack(&self) -> DynStack<Req, Rsp, E>;
}

type DynStack<Req, Rsp, E> = Box<
    dyn CloneStack<
            Req,
            Rsp,
            E,
            Response = Rsp,
            Error = E,
            Future = BoxFuture<'static, Result<Rsp, E>>,
        >,
>;

impl<S, Req, Rsp, E> CloneStack<Req, Rsp, E> for S
where
    S: Service<Req, Response = Rsp, Error = E, Future = BoxFuture<'static, Result<Rsp, E>>>
        + Clone
        + Send
        + Sync
        + 'static,
{
    fn clone_stack(&self) -> DynStack<Req, Rsp, E> {
        Box::new(self.clone())
    }
}

/// A cloneable, `Send + Sync` service of any type with a boxed future, which it returns as
/// the inner service made it.
pub struct BoxStack<Req, Rsp, E>(DynStack<Req, Rsp, E>);

impl<Req, Rsp, E> BoxStack<Req, Rsp, E> {
    /// A stack whose future is already boxed: its calls are passed through.
    pub fn new<S>(svc: S) -> Self
    where
        S: CloneStack<Req, Rsp, E> + 'static,
    {
        Self(Box::new(svc))
    }

    /// A stack with a future of its own type, boxed once per call.
    pub fn boxing<S>(svc: S) -> Self
    where
        S: Service<Req, Response = Rsp, Error = E> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        Req: 'static,
        Rsp: 'static,
        E: 'static,
    {
        Self::new(svc.map_future(|fut| -> BoxFuture<'static, Result<Rsp, E>> { Box::pin(fut) }))
    }
}

impl<Req, Rsp, E> Service<Req> for BoxStack<Req, Rsp, E> {
    type Response = Rsp;
    type Error = E;
    type Future = BoxFuture<'static, Result<Rsp, E>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.0.call(req)
    }
}

impl<Req, Rsp, E> Clone for BoxStack<Req, Rsp, E> {
    fn clone(&self) -> Self {
        Self(self.0.clone_stack())
    }
}

impl<Req, Rsp, E> fmt::Debug for BoxStack<Req, Rsp, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxStack")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn clones_share_nothing_but_call_the_same_service() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let svc = tower::service_fn(move |n: u32| {
            counted.fetch_add(1, Ordering::Relaxed);
            let fut: BoxFuture<'static, Result<u32, ()>> = Box::pin(async move { Ok(n + 1) });
            fut
        });
        let stack = BoxStack::new(svc);
        assert_eq!(stack.clone().oneshot(1).await, Ok(2));
        assert_eq!(stack.oneshot(2).await, Ok(3));
        assert_eq!(calls.load(Ordering::Relaxed), 2);

        let other = BoxStack::boxing(tower::service_fn(
            |n: u32| async move { Ok::<_, ()>(n * 2) },
        ));
        assert_eq!(other.oneshot(21).await, Ok(42));
    }
}
