//! The concurrency-limit layer, the second of the concrete level: the backend service's
//! `circuitBreaker.maxConcurrentRequests`, requests in flight to it from this proxy.
//!
//! `poll_ready` acquires a slot before the balancer below it is asked for an endpoint. When
//! none is free the request waits for one, as long as fewer than `maxPending` requests
//! already wait ([`DEFAULT_MAX_PENDING`] unless set); beyond that it fails at once with 503
//! `overloaded`, which says the limit and the queue are full. The slot is held from readiness
//! until the response head arrives (the limit bounds requests waiting on the service, not
//! responses streaming back) and freed when the request is dropped at any point, waiting
//! included.
//!
//! [`DEFAULT_MAX_PENDING`]: ferrule_proxy_policy::breaker::DEFAULT_MAX_PENDING

use std::sync::Arc;
use std::task::{Context, Poll, ready};

use ferrule_proxy_core::errors::{ProxyError, Reason};
use ferrule_proxy_policy::breaker::{Acquire, ConcurrencyLimit, ConcurrencyPermit};
use futures::future::BoxFuture;
use tower::{Layer, Service};

#[derive(Clone)]
pub struct ConcurrencyLimitLayer {
    name: Arc<str>,
    limit: ConcurrencyLimit,
}

impl ConcurrencyLimitLayer {
    pub fn new(name: Arc<str>, limit: ConcurrencyLimit) -> Self {
        Self { name, limit }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimited<S>;

    fn layer(&self, inner: S) -> ConcurrencyLimited<S> {
        ConcurrencyLimited {
            layer: self.clone(),
            acquire: None,
            permit: None,
            inner,
        }
    }
}

pub struct ConcurrencyLimited<S> {
    layer: ConcurrencyLimitLayer,
    /// The wait for a slot, while waiting.
    acquire: Option<Acquire>,
    /// The slot of the next call.
    permit: Option<ConcurrencyPermit>,
    inner: S,
}

impl<S: Clone> Clone for ConcurrencyLimited<S> {
    fn clone(&self) -> Self {
        self.layer.layer(self.inner.clone())
    }
}

impl<S, Req> Service<Req> for ConcurrencyLimited<S>
where
    S: Service<Req, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<S::Response, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        if self.permit.is_none() {
            let limit = &self.layer.limit;
            let acquire = self.acquire.get_or_insert_with(|| limit.acquirer());
            let acquired = ready!(acquire.poll_acquire(cx));
            self.acquire = None;
            match acquired {
                Ok(permit) => self.permit = Some(permit),
                Err(overloaded) => {
                    return Poll::Ready(Err(ProxyError::new(
                        Reason::Overloaded,
                        self.layer.name.to_string(),
                        overloaded.to_string(),
                    )));
                }
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let permit = self
            .permit
            .take()
            .expect("ConcurrencyLimited::call without poll_ready reporting ready first");
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
            drop(permit);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;
    use tokio::sync::watch;
    use tower::ServiceExt;

    use super::*;

    /// A service whose calls answer once `open` is true.
    fn gated(
        open: watch::Receiver<bool>,
    ) -> impl Service<
        (),
        Response = (),
        Error = ProxyError,
        Future = BoxFuture<'static, Result<(), ProxyError>>,
    > + Clone {
        tower::service_fn(move |()| {
            let mut open = open.clone();
            let answer: BoxFuture<'static, Result<(), ProxyError>> = Box::pin(async move {
                let _ = open.wait_for(|open| *open).await;
                Ok(())
            });
            answer
        })
    }

    #[tokio::test]
    async fn poll_ready_waits_for_a_slot_and_fails_fast_past_max_pending() {
        let (release, open) = watch::channel(false);
        let limit = ConcurrencyLimit::new(Some(1), Some(1));
        let layer = ConcurrencyLimitLayer::new("user".into(), limit.clone());
        let mut first = layer.layer(gated(open));
        let mut second = first.clone();
        let mut third = first.clone();

        // The first request takes the only slot in poll_ready and holds it while in flight.
        first.ready().await.unwrap();
        let in_flight = tokio::spawn(first.call(()));

        // The second is not ready: it waits, counted as pending.
        assert!(
            second.ready().now_or_never().is_none(),
            "ready without a slot"
        );
        assert_eq!(limit.pending(), 1);

        // The queue (maxPending 1) is full: the third fails at once, saying why.
        let error = third
            .ready()
            .now_or_never()
            .expect("failed fast")
            .err()
            .unwrap();
        assert_eq!(error.reason, Reason::Overloaded);
        assert!(
            error.message.contains("1 requests in flight and 1 waiting"),
            "{}",
            error.message
        );

        // The first response frees the slot: the waiting request becomes ready.
        release.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), in_flight)
            .await
            .expect("the first request never finished")
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), second.ready())
            .await
            .expect("the waiting request never got the slot")
            .unwrap();
        assert_eq!(limit.pending(), 0);
    }

    #[tokio::test]
    async fn a_dropped_waiter_leaves_the_queue_and_a_dropped_permit_frees_the_slot() {
        let (_release, open) = watch::channel(false);
        let limit = ConcurrencyLimit::new(Some(1), Some(1));
        let layer = ConcurrencyLimitLayer::new("user".into(), limit.clone());
        let mut holder = layer.layer(gated(open));
        holder.ready().await.unwrap();

        let mut waiter = holder.clone();
        assert!(waiter.ready().now_or_never().is_none());
        assert_eq!(limit.pending(), 1);
        drop(waiter);
        assert_eq!(
            limit.pending(),
            0,
            "a dropped waiter still counts as pending"
        );

        // Ready but never called: dropping the service frees its slot.
        let mut next = holder.clone();
        drop(holder);
        tokio::time::timeout(Duration::from_secs(5), next.ready())
            .await
            .expect("the slot of a dropped service was never freed")
            .unwrap();
    }
}
