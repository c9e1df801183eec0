//! The rate-limit step of a route: named token buckets shared by the routes that name them.
//!
//! Each entry of `rateLimits` becomes one [`ferrule_proxy_policy::ratelimit::RateLimiter`] (the same
//! token bucket the sidecar's `ServicePolicy.rateLimit` uses), and every route naming it takes
//! from the same buckets. The key picks the bucket: one for everything (`global`), one per
//! client address (`client-ip`, the TCP peer), or one per verified JWT subject
//! (`jwt-subject`, falling back to the client address for requests without one, such as on
//! public routes). An empty bucket refuses the request with 429 and `Retry-After`.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrule_config::EffectiveRateLimit;
use http::Request;
use tower::filter::Predicate;

use super::auth::Subject;
use super::config::{GatewayRateLimit, RateLimitKey};
use super::errors::GatewayError;
use ferrule_proxy_core::body::{BoxBody, BoxError};
use ferrule_proxy_core::context::RequestContext;
use ferrule_proxy_policy::ratelimit::{RateKey, RateLimiter};

/// One named limit: its buckets and how requests are keyed.
#[derive(Debug)]
pub struct NamedLimit {
    pub name: String,
    settings: GatewayRateLimit,
    limiter: RateLimiter,
}

impl NamedLimit {
    pub fn new(name: &str, settings: &GatewayRateLimit) -> Self {
        Self {
            name: name.to_string(),
            settings: settings.clone(),
            limiter: RateLimiter::new(EffectiveRateLimit {
                requests_per_second: settings.requests_per_second,
                burst: settings.burst(),
            }),
        }
    }

    /// The bucket `req` takes from.
    fn key(&self, req: &Request<BoxBody>) -> RateKey {
        let client_ip = || {
            req.extensions()
                .get::<RequestContext>()
                .map_or(RateKey::Global, |c| RateKey::ClientIp(c.client.ip()))
        };
        match self.settings.key() {
            RateLimitKey::Global => RateKey::Global,
            RateLimitKey::ClientIp => client_ip(),
            RateLimitKey::JwtSubject => match req.extensions().get::<Subject>() {
                Some(Subject(sub)) => RateKey::Key(sub.clone()),
                None => client_ip(),
            },
        }
    }
}

/// Every limit of the config, by name. A limit of `previous` (the config in force) whose
/// settings did not change is kept with its buckets, so a new config version resets only the
/// limits it changes.
pub fn limits(
    config: &BTreeMap<String, GatewayRateLimit>,
    previous: &BTreeMap<String, Arc<NamedLimit>>,
) -> BTreeMap<String, Arc<NamedLimit>> {
    config
        .iter()
        .map(|(name, settings)| {
            let limit = match previous.get(name) {
                Some(old) if old.settings == *settings => old.clone(),
                _ => Arc::new(NamedLimit::new(name, settings)),
            };
            (name.clone(), limit)
        })
        .collect()
}

/// A `tower::filter` predicate taking a token for each request, when the route has a limit.
#[derive(Clone, Debug)]
pub struct RateLimit(pub Option<Arc<NamedLimit>>);

impl Predicate<Request<BoxBody>> for RateLimit {
    type Request = Request<BoxBody>;

    fn check(&mut self, req: Request<BoxBody>) -> Result<Request<BoxBody>, BoxError> {
        if let Some(limit) = &self.0 {
            let key = limit.key(&req);
            if let Err(limited) = limit.limiter.check(&key) {
                tracing::debug!(limit = %limit.name, ?key, "rate limited");
                return Err(GatewayError::RateLimited {
                    retry_after: limited.retry_after,
                }
                .into());
            }
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrule_proxy_core::body;
    use ferrule_proxy_core::context::ConnMeta;
    use ferrule_proxy_core::metrics::Direction;
    use std::net::SocketAddr;

    fn limit(key: RateLimitKey) -> RateLimit {
        RateLimit(Some(Arc::new(NamedLimit::new(
            "api",
            &GatewayRateLimit {
                requests_per_second: 1,
                burst: Some(2),
                key: Some(key),
            },
        ))))
    }

    fn req(client: &str, subject: Option<&str>) -> Request<BoxBody> {
        let mut r = Request::get("/").body(body::empty()).unwrap();
        let client: SocketAddr = client.parse().unwrap();
        let conn = ConnMeta {
            direction: Direction::Gateway,
            target: "gateway".into(),
            client,
            peer_identity: None,
        };
        RequestContext::attach(&mut r, &conn);
        if let Some(s) = subject {
            r.extensions_mut().insert(Subject(s.into()));
        }
        r
    }

    /// How many of `reqs` pass.
    fn passed(limit: &mut RateLimit, reqs: Vec<Request<BoxBody>>) -> usize {
        reqs.into_iter()
            .map(|r| limit.check(r))
            .filter(Result::is_ok)
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn global_shares_one_bucket() {
        let mut l = limit(RateLimitKey::Global);
        let reqs = vec![
            req("10.0.0.1:1", None),
            req("10.0.0.2:1", None),
            req("10.0.0.3:1", Some("a")),
        ];
        assert_eq!(passed(&mut l, reqs), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn client_ip_ignores_ports_and_subjects() {
        let mut l = limit(RateLimitKey::ClientIp);
        let reqs = vec![
            req("10.0.0.1:1", Some("a")),
            req("10.0.0.1:2", Some("b")),
            req("10.0.0.1:3", None),
            req("10.0.0.2:1", None),
        ];
        assert_eq!(passed(&mut l, reqs), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn jwt_subject_keys_by_subject_then_client() {
        let mut l = limit(RateLimitKey::JwtSubject);
        let reqs = vec![
            req("10.0.0.1:1", Some("a")),
            req("10.0.0.2:1", Some("a")),
            req("10.0.0.3:1", Some("a")),
            req("10.0.0.1:1", Some("b")),
            req("10.0.0.1:1", None),
        ];
        assert_eq!(passed(&mut l, reqs), 4);
        // The refusal carries the wait.
        let err = l.check(req("10.0.0.9:1", Some("a"))).unwrap_err();
        let err = err.downcast::<GatewayError>().unwrap();
        assert!(
            matches!(*err, GatewayError::RateLimited { retry_after } if retry_after.as_millis() == 1000)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shared_by_routes_that_name_it() {
        let named = limits(&one_per_second(1), &BTreeMap::new());
        let mut users = RateLimit(Some(named["api"].clone()));
        let mut orders = RateLimit(Some(named["api"].clone()));
        assert!(users.check(req("10.0.0.1:1", None)).is_ok());
        assert!(orders.check(req("10.0.0.1:1", None)).is_err());
        assert!(RateLimit(None).check(req("10.0.0.1:1", None)).is_ok());
    }

    fn one_per_second(burst: u32) -> BTreeMap<String, GatewayRateLimit> {
        BTreeMap::from([(
            "api".to_string(),
            GatewayRateLimit {
                requests_per_second: 1,
                burst: Some(burst),
                key: None,
            },
        )])
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_version_resets_only_changed_limits() {
        let old = limits(&one_per_second(1), &BTreeMap::new());
        assert!(
            RateLimit(Some(old["api"].clone()))
                .check(req("10.0.0.1:1", None))
                .is_ok()
        );
        // Same settings: the same, empty, bucket.
        let same = limits(&one_per_second(1), &old);
        assert!(Arc::ptr_eq(&same["api"], &old["api"]));
        assert!(
            RateLimit(Some(same["api"].clone()))
                .check(req("10.0.0.1:1", None))
                .is_err()
        );
        // New settings: a new, full, bucket.
        let changed = limits(&one_per_second(2), &same);
        assert!(
            RateLimit(Some(changed["api"].clone()))
                .check(req("10.0.0.1:1", None))
                .is_ok()
        );
    }
}
