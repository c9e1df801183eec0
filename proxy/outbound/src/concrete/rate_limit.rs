//! The rate limit layer, the first of the concrete level: the backend service's own
//! `rateLimit` (`ServicePolicy.rateLimit`, one token bucket per service for this proxy).
//!
//! `poll_ready` takes a token before anything below it runs (so a refused request never
//! waits for a concurrency slot or an endpoint): without one the request fails at once with
//! 429 `rate_limited` and a `Retry-After` of when the next token comes, counted in
//! `rate_limited_total`. A token taken by a service that is then dropped uncalled is spent,
//! as the request it was for is gone.

use std::sync::Arc;
use std::task::{Context, Poll};

use ferrule_proxy_core::errors::{ProxyError, Reason};
use ferrule_proxy_core::metrics::Direction;
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_policy::ratelimit::{RateKey, RateLimiter};
use tower::{Layer, Service};

#[derive(Clone)]
pub struct RateLimitLayer {
    name: Arc<str>,
    /// `None`: the service has no `rateLimit`.
    limit: Option<Arc<RateLimiter>>,
    metrics: PolicyMetrics,
}

impl RateLimitLayer {
    pub fn new(name: Arc<str>, limit: Option<Arc<RateLimiter>>, metrics: PolicyMetrics) -> Self {
        Self {
            name,
            limit,
            metrics,
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            layer: self.clone(),
            admitted: false,
            inner,
        }
    }
}

pub struct RateLimit<S> {
    layer: RateLimitLayer,
    /// A token was taken for the next call.
    admitted: bool,
    inner: S,
}

impl<S: Clone> Clone for RateLimit<S> {
    fn clone(&self) -> Self {
        Self {
            layer: self.layer.clone(),
            admitted: false,
            inner: self.inner.clone(),
        }
    }
}

impl<S, Req> Service<Req> for RateLimit<S>
where
    S: Service<Req, Error = ProxyError>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        if !self.admitted {
            let layer = &self.layer;
            if let Some(limit) = &layer.limit
                && let Err(limited) = limit.check(&RateKey::Global)
            {
                layer.metrics.rate_limited(Direction::Outbound, &layer.name);
                return Poll::Ready(Err(ProxyError::new(
                    Reason::RateLimited,
                    layer.name.to_string(),
                    limited.to_string(),
                )
                .with_retry_after(limited.retry_after)));
            }
            self.admitted = true;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> S::Future {
        self.admitted = false;
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use ferrule_config::EffectiveRateLimit;
    use ferrule_proxy_core::metrics::Metrics;
    use futures::FutureExt;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn poll_ready_takes_a_token_or_refuses_before_the_layers_below() {
        let limiter = RateLimiter::new(EffectiveRateLimit {
            requests_per_second: 1,
            burst: 1,
        });
        let layer = RateLimitLayer::new(
            "user".into(),
            Some(Arc::new(limiter)),
            PolicyMetrics::register(&Metrics::new()),
        );
        let readied = Arc::new(AtomicUsize::new(0));
        let inner = {
            let readied = readied.clone();
            tower::service_fn(move |()| {
                readied.fetch_add(1, Ordering::Relaxed);
                std::future::ready(Ok::<_, ProxyError>(()))
            })
        };
        let mut first = layer.layer(inner);
        let mut second = first.clone();
        first.ready().await.unwrap();
        first.call(()).await.unwrap();

        let error = second
            .ready()
            .now_or_never()
            .expect("refused at once")
            .err()
            .unwrap();
        assert_eq!(error.reason, Reason::RateLimited);
        assert_eq!(
            readied.load(Ordering::Relaxed),
            1,
            "a refused request went on"
        );

        // The bucket refills: the next request is admitted.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        second.ready().await.unwrap();
        second.call(()).await.unwrap();
        assert_eq!(readied.load(Ordering::Relaxed), 2);
    }
}
