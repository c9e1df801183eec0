//! The failure-accrual layer, the first of the endpoint level: the endpoint's circuit
//! breaker (`ServicePolicy.circuitBreaker`: consecutive failures, failure rate, ejection and
//! the single probe of a half-open endpoint; the state machine is
//! [`ferrule_proxy_policy::breaker`]).
//!
//! `poll_ready` asks the breaker to admit one request ([`FailureAccrual::try_acquire`]): an
//! ejected endpoint, or a half-open one whose probe another request holds, is not ready and
//! fails with [`EndpointError::Ejected`] (the balancer then picks again). The call records
//! its outcome: a response whose status (or `ferrule-error` reason) is a 5xx, or any error
//! (nothing sent, or the connection broke), is a failure; any other response a success. A
//! request dropped before its outcome counts as neither and frees the probe.

use std::sync::Arc;
use std::task::{Context, Poll};

use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::errors::is_endpoint_failure;
use ferrule_proxy_policy::breaker::{Attempt, FailureAccrual};
use futures::future::BoxFuture;
use http::Response;
use tower::Service;

use super::EndpointError;

pub struct Accrual<S> {
    accrual: FailureAccrual,
    /// The endpoint's key in the breaker.
    key: Arc<str>,
    /// The breaker's admission of the next call.
    attempt: Option<Attempt>,
    inner: S,
}

impl<S> Accrual<S> {
    pub fn new(accrual: FailureAccrual, key: Arc<str>, inner: S) -> Self {
        Self {
            accrual,
            key,
            attempt: None,
            inner,
        }
    }
}

impl<S: Clone> Clone for Accrual<S> {
    fn clone(&self) -> Self {
        Self::new(self.accrual.clone(), self.key.clone(), self.inner.clone())
    }
}

impl<S, Req> Service<Req> for Accrual<S>
where
    S: Service<Req, Response = Response<BoxBody>, Error = EndpointError>,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = EndpointError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, EndpointError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), EndpointError>> {
        if self.attempt.is_none() {
            match self.accrual.try_acquire(&self.key) {
                Some(attempt) => self.attempt = Some(attempt),
                None => return Poll::Ready(Err(EndpointError::Ejected)),
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let attempt = self
            .attempt
            .take()
            .expect("Accrual::call without poll_ready reporting ready first");
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
            match &result {
                Ok(rsp) if !is_endpoint_failure(rsp) => attempt.success(),
                _ => attempt.failure(),
            }
            result
        })
    }
}
