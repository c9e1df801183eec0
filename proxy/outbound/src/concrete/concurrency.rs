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
