//! The gateway's request path, built in one place ([`build`]).
//!
//! The [`Router`] picks the route with the longest matching prefix and hands the request to
//! that route's stack; a path no route matches gets the no-route stack (404). Each route's
//! stack, outermost first:
//!
//! 1. observe — `request_total{direction="gateway",target_service=<route's service>}`,
//!    latency and the access log, for every answer including the gateway's own;
//! 2. CORS (when configured) — preflights answered here, CORS headers on every response;
//! 3. respond — [`GatewayError`]s below become the explained responses every proxy error
//!    gets (core's `RespondLayer`: JSON, or a gRPC status for a gRPC caller);
//! 4. size limit — 413 over `maxRequestBytes`;
//! 5. authenticate — JWT on non-public routes, subject header ([`super::auth`]);
//! 6. rate limit — the route's named bucket ([`super::ratelimit`]);
//! 7. rewrite — the matched prefix replaced by `rewritePrefix`;
//! 8. the outbound stack of the route's service, shared with nothing else in the process:
//!    balancing, endpoint connections and meshed HTTP/2 to the service's sidecars, exactly as
//!    a sidecar's outbound side (it counts `direction="outbound"` metrics of its own).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use ferrule_proto::names::ServiceRef;
use futures::future::BoxFuture;
use http::{Request, Response};
use tower::filter::Predicate;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_http::cors::CorsLayer;

use super::auth::Authenticate;
use super::config::{ConfigError, GatewayConfig};
use super::errors::{self, GatewayError};
use super::jwt::JwtVerifier;
use super::ratelimit::{self, RateLimit};
use super::routes::{self, RouteTable};
use super::size::SizeLimitLayer;
use ferrule_proxy_core::body::{BoxBody, BoxError};
use ferrule_proxy_core::errors::RespondLayer;
use ferrule_proxy_core::metrics::{Direction, Metrics};
use ferrule_proxy_core::observe::ObserveLayer;
use ferrule_proxy_core::server::HttpStack;

/// What the stacks are built from besides the config.
pub struct StackParts<'a> {
    pub metrics: &'a Metrics,
    pub access_log: bool,
    /// The forwarding stack of a service (the outbound side's logical stack).
    pub forward: &'a dyn Fn(&ServiceRef) -> HttpStack,
    /// Looks up environment variables for `hs256SecretEnv`.
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

/// Builds the router and every route's stack from a validated config.
pub fn build(config: &GatewayConfig, parts: &StackParts<'_>) -> Result<Router, ConfigError> {
    let verifier = match &config.jwt {
        Some(jwt) => Some(Arc::new(JwtVerifier::from_config(config, jwt, parts.env)?)),
        None => None,
    };
    let cors = match &config.cors {
        Some(cors) => Some(super::cors::layer(config, cors)?),
        None => None,
    };
    let limits = ratelimit::limits(&config.rate_limits);
    let mut routes = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let service = ServiceRef::parse(&route.service).map_err(|e| {
            ConfigError::invalid(
                &config.source,
                format!("routes[{i}].service"),
                e.to_string(),
            )
        })?;
        let limit = match &route.rate_limit {
            Some(name) => Some(limits.get(name).cloned().ok_or_else(|| {
                ConfigError::invalid(
                    &config.source,
                    format!("routes[{i}].rateLimit"),
                    format!("no rate limit named {name:?}"),
                )
            })?),
            None => None,
        };
        let prefix = routes::normalize_prefix(&route.path_prefix);
        let name = service.to_string();
        let inner = ServiceBuilder::new()
            .layer(RespondLayer::new(parts.metrics.clone(), Direction::Gateway))
            .map_err(move |e| errors::to_proxy_error(&name, e))
            .layer(SizeLimitLayer::new(config.max_request_bytes))
            .filter(Authenticate::new(verifier.clone(), route.public))
            .filter(RateLimit(limit))
            .filter(Rewrite {
                prefix: prefix.clone().into(),
                rewrite: route.rewrite_prefix.as_deref().map(Arc::from),
            })
            .service((parts.forward)(&service));
        let stack = observed(parts, &service.to_string(), cors.as_ref(), inner);
        tracing::info!(route = %route.name, prefix, %service, public = route.public, "gateway route");
        routes.push((prefix, route.rewrite_prefix.clone(), stack));
    }
    let no_route = ServiceBuilder::new()
        .layer(RespondLayer::new(parts.metrics.clone(), Direction::Gateway))
        .service(tower::service_fn(|req: Request<BoxBody>| async move {
            Err::<Response<BoxBody>, _>(
                GatewayError::NoRoute(req.uri().path().to_string()).into_proxy_error(""),
            )
        }));
    Ok(Router {
        routes: Arc::new(RouteTable::new(routes)),
        no_route: observed(parts, "", cors.as_ref(), no_route),
    })
}

/// Wraps `inner` (errors already rendered) in CORS, when configured, and observe.
fn observed<S>(
    parts: &StackParts<'_>,
    service: &str,
    cors: Option<&CorsLayer>,
    inner: S,
) -> HttpStack
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let inner = match cors {
        Some(cors) => BoxCloneSyncService::new(cors.layer(inner)),
        None => BoxCloneSyncService::new(inner),
    };
    let observe = ObserveLayer::new(
        parts.metrics.clone(),
        Direction::Gateway,
        service.into(),
        parts.access_log,
    );
    BoxCloneSyncService::new(observe.layer(inner))
}

/// A `tower::filter` predicate replacing the matched prefix by the route's `rewritePrefix`.
#[derive(Clone, Debug)]
struct Rewrite {
    prefix: Arc<str>,
    rewrite: Option<Arc<str>>,
}

impl Predicate<Request<BoxBody>> for Rewrite {
    type Request = Request<BoxBody>;

    fn check(&mut self, mut req: Request<BoxBody>) -> Result<Request<BoxBody>, BoxError> {
        let Some(rewrite) = &self.rewrite else {
            return Ok(req);
        };
        // The router matched this prefix; a path that does not match is left alone.
        if let Some(path) = routes::forward_path(&self.prefix, Some(rewrite), req.uri().path()) {
            *req.uri_mut() = routes::with_path(req.uri(), &path)
                .map_err(|e| GatewayError::BadRewrite(e.to_string()))?;
        }
        Ok(req)
    }
}

/// Picks the route's stack by path.
#[derive(Clone)]
pub struct Router {
    routes: Arc<RouteTable<HttpStack>>,
    no_route: HttpStack,
}

impl Service<Request<BoxBody>> for Router {
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Route stacks are always ready; each call drives its own clone.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        let stack = match self.routes.find(req.uri().path()) {
            Some(matched) => matched.route.clone(),
            None => self.no_route.clone(),
        };
        Box::pin(stack.oneshot(req))
    }
}
