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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::errors::is_endpoint_failure;
use ferrule_proxy_policy::breaker::{Attempt, FailureAccrual};
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
    S::Future: Unpin,
{
    type Response = Response<BoxBody>;
    type Error = EndpointError;
    type Future = Recorded<S::Future>;

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
        Recorded {
            response: self.inner.call(req),
            attempt: Some(attempt),
        }
    }
}

/// The inner service's future, its outcome recorded on the breaker when it ends (a named
/// future rather than a boxed one: no allocation per request).
pub struct Recorded<F> {
    response: F,
    /// Taken when the outcome is recorded; dropped unrecorded, it frees a probe.
    attempt: Option<Attempt>,
}

impl<F> Future for Recorded<F>
where
    F: Future<Output = Result<Response<BoxBody>, EndpointError>> + Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let result = ready!(Pin::new(&mut self.response).poll(cx));
        if let Some(attempt) = self.attempt.take() {
            match &result {
                Ok(rsp) if !is_endpoint_failure(rsp) => attempt.success(),
                _ => attempt.failure(),
            }
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use ferrule_config::{CircuitBreaker, ServicePolicySpec};
    use ferrule_proxy_core::body;
    use futures::FutureExt;
    use http::StatusCode;
    use tower::ServiceExt;

    use super::*;

    fn answering(
        status: StatusCode,
    ) -> impl Service<
        (),
        Response = Response<BoxBody>,
        Error = EndpointError,
        Future = std::future::Ready<Result<Response<BoxBody>, EndpointError>>,
    > + Clone {
        tower::service_fn(move |()| {
            let mut rsp = Response::new(body::empty());
            *rsp.status_mut() = status;
            std::future::ready(Ok(rsp))
        })
    }

    fn accrual(consecutive_failures: u32) -> FailureAccrual {
        let policy = ServicePolicySpec {
            circuit_breaker: Some(CircuitBreaker {
                consecutive_failures: Some(consecutive_failures),
                max_ejection_percent: Some(100),
                ..Default::default()
            }),
            ..Default::default()
        }
        .effective();
        let accrual = FailureAccrual::new(&policy.circuit_breaker);
        accrual.set_endpoints(["ep".to_string()]);
        accrual
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_are_recorded_and_an_ejected_endpoint_is_not_ready() {
        let breaker = accrual(2);
        let ok = Accrual::new(breaker.clone(), "ep".into(), answering(StatusCode::OK));
        let failing = Accrual::new(
            breaker.clone(),
            "ep".into(),
            answering(StatusCode::BAD_GATEWAY),
        );

        failing.clone().oneshot(()).await.unwrap();
        // A success in between resets the count: two more failures are needed.
        ok.clone().oneshot(()).await.unwrap();
        failing.clone().oneshot(()).await.unwrap();
        assert!(breaker.is_available("ep"));
        failing.clone().oneshot(()).await.unwrap();
        assert!(
            !breaker.is_available("ep"),
            "two failures in a row did not eject"
        );

        let mut next = ok.clone();
        let refused = next.ready().now_or_never().expect("refused at once");
        assert!(matches!(refused, Err(EndpointError::Ejected)));
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_claims_the_single_probe_and_dropping_it_frees_the_probe() {
        let breaker = accrual(1);
        let ok = Accrual::new(breaker.clone(), "ep".into(), answering(StatusCode::OK));
        let failing = Accrual::new(
            breaker.clone(),
            "ep".into(),
            answering(StatusCode::INTERNAL_SERVER_ERROR),
        );
        failing.clone().oneshot(()).await.unwrap();
        // Past the default base ejection time: half-open.
        tokio::time::advance(std::time::Duration::from_secs(31)).await;

        let mut probe = ok.clone();
        probe.ready().await.unwrap();
        let mut other = ok.clone();
        assert!(
            matches!(
                other.ready().now_or_never(),
                Some(Err(EndpointError::Ejected))
            ),
            "a second probe"
        );

        // A probe dropped before its outcome proved nothing: the next request probes.
        drop(probe);
        let mut probe = ok.clone();
        probe.ready().await.unwrap();
        probe.call(()).await.unwrap();
        assert!(breaker.is_available("ep"));
        ok.clone().oneshot(()).await.unwrap();
    }
}
