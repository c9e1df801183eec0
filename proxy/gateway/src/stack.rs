//! The gateway's request path, built in one place ([`build`]), and swapped whole when the
//! config changes ([`LiveRouter`]).
//!
//! A config becomes a router in two steps: [`prepare`] loads what can fail (JWT keys and
//! secrets, CORS, rate limits), so a `Gateway` resource the gateway cannot use is refused
//! before anything changes; [`build`] then assembles the stacks, which cannot fail.
//!
//! The [`Router`] picks the route with the longest matching prefix and hands the request to
//! that route's stack; a path no route matches gets the no-route stack (404). Each route's
//! stack, outermost first:
//!
//! 0. server span — when tracing is on: continues the caller's trace or starts one
//!    ([`ferrule_proxy_core::trace`]);
//! 1. observe — `request_total{direction="gateway",target_service=<route's service>}`,
//!    latency and the access log, for every answer including the gateway's own;
//! 2. CORS (when configured) — preflights answered here, CORS headers on every response;
//! 3. respond — [`GatewayError`]s below become the explained responses every proxy error
//!    gets (core's `RespondLayer`: JSON, or a gRPC status for a gRPC caller);
//! 4. size limit — 413 over `maxRequestBytes`;
//! 5. authenticate — JWT on non-public routes, subject header ([`super::auth`]);
//! 6. rate limit — the route's named bucket ([`super::ratelimit`]);
//! 7. gRPC only — on a `grpc: true` route, a request that is not gRPC is refused (400);
//! 8. rewrite — the matched prefix replaced by `rewritePrefix` (never on a gRPC route);
//! 9. the outbound stack of the route's service, shared with nothing else in the process:
//!    balancing, endpoint connections and meshed HTTP/2 to the service's sidecars, exactly as
//!    a sidecar's outbound side (it counts `direction="outbound"` metrics of its own).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use ferrule_proto::names::ServiceRef;
use futures::future::BoxFuture;
use http::{Request, Response};
use tokio::sync::watch;
use tower::filter::Predicate;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_http::cors::CorsLayer;

use super::auth::Authenticate;
use super::config::{ConfigError, GatewayConfig};
use super::errors::{self, GatewayError};
use super::jwt::JwtVerifier;
use super::ratelimit::NamedLimit;
use super::ratelimit::{self, RateLimit};
use super::routes::{self, RouteTable};
use super::size::SizeLimitLayer;
use ferrule_proxy_core::body::{BoxBody, BoxError};
use ferrule_proxy_core::errors::{ErrorFormat, RespondLayer};
use ferrule_proxy_core::metrics::{Direction, Metrics};
use ferrule_proxy_core::observe::ObserveLayer;
use ferrule_proxy_core::server::HttpStack;
use ferrule_proxy_core::stack::{BoxStack, CloneStack};
use ferrule_proxy_core::trace::{ServerSpanLayer, Tracer};
use ferrule_proxy_policy::route::PathPrefix;

/// What the stacks are built from besides the config.
pub struct StackParts<'a> {
    pub metrics: &'a Metrics,
    pub access_log: bool,
    /// The forwarding stack of a service (the outbound side's logical stack).
    pub forward: &'a dyn Fn(&ServiceRef) -> HttpStack,
    /// Starts each request's server span, and a new trace for a request without one.
    pub tracer: &'a Tracer,
}

/// The parts of a config that can fail to load (keys, secrets), loaded: what [`build`] needs
/// besides the outbound stacks. Preparing a config is how the gateway checks it can use a
/// `Gateway` resource before acking it.
pub struct Prepared {
    config: GatewayConfig,
    verifier: Option<Arc<JwtVerifier>>,
    cors: Option<CorsLayer>,
    limits: BTreeMap<String, Arc<NamedLimit>>,
    routes: Vec<PreparedRoute>,
}

struct PreparedRoute {
    name: String,
    prefix: PathPrefix,
    rewrite: Option<String>,
    service: ServiceRef,
    public: bool,
    limit: Option<Arc<NamedLimit>>,
    grpc: bool,
}

impl Prepared {
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }
}

/// Loads the JWT keys, CORS settings and rate limits of a validated config. `env` looks up
/// environment variables (`hs256SecretEnv`); the rate limits of `previous` (the router in
/// force) whose settings did not change are kept with their buckets.
pub fn prepare(
    config: GatewayConfig,
    env: &dyn Fn(&str) -> Option<String>,
    previous: Option<&Router>,
) -> Result<Prepared, ConfigError> {
    let verifier = match &config.jwt {
        Some(jwt) => Some(Arc::new(JwtVerifier::from_config(&config, jwt, env)?)),
        None => None,
    };
    let cors = match &config.cors {
        Some(cors) => Some(super::cors::layer(&config, cors)?),
        None => None,
    };
    let limits = ratelimit::limits(
        &config.rate_limits,
        previous.map_or(&BTreeMap::new(), |r| &r.limits),
    );
    let mut routes = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let service = ServiceRef::parse(&route.service)
            .map_err(|e| config.invalid(format!("routes[{i}].service"), e.to_string()))?;
        let limit = match &route.rate_limit {
            Some(name) => Some(limits.get(name).cloned().ok_or_else(|| {
                config.invalid(
                    format!("routes[{i}].rateLimit"),
                    format!("no rate limit named {name:?}"),
                )
            })?),
            None => None,
        };
        routes.push(PreparedRoute {
            name: route.name.clone(),
            prefix: PathPrefix::new(&route.path_prefix),
            rewrite: route.rewrite_prefix.clone(),
            service,
            public: route.public,
            limit,
            grpc: route.grpc,
        });
    }
    Ok(Prepared {
        verifier,
        cors,
        limits,
        routes,
        config,
    })
}

/// Builds the router and every route's stack from a prepared config.
pub fn build(prepared: Prepared, parts: &StackParts<'_>) -> Router {
    let Prepared {
        config,
        verifier,
        cors,
        limits,
        routes: prepared_routes,
    } = prepared;
    let mut routes = Vec::new();
    for route in prepared_routes {
        let service = route.service;
        let name = service.to_string();
        // Respond awaits a boxed future; the route's filters make a future type of their own,
        // boxed here once.
        let filters = ServiceBuilder::new()
            .map_err(move |e| errors::to_proxy_error(&name, e))
            .layer(SizeLimitLayer::new(config.max_request_bytes()))
            .filter(Authenticate::new(verifier.clone(), route.public))
            .filter(RateLimit(route.limit))
            .filter(GrpcOnly(route.grpc.then(|| Arc::from(route.name.as_str()))))
            .filter(Rewrite {
                prefix: route.prefix.clone(),
                rewrite: route.rewrite.as_deref().map(Arc::from),
            })
            .service((parts.forward)(&service));
        let inner = RespondLayer::new(parts.metrics.clone(), Direction::Gateway)
            .layer(BoxStack::boxing(filters));
        let stack = observed(
            parts,
            &service.to_string(),
            Some(&route.name),
            cors.as_ref(),
            inner,
        );
        tracing::info!(route = %route.name, prefix = route.prefix.as_str(), %service, public = route.public, grpc = route.grpc, "gateway route");
        routes.push((route.prefix, route.rewrite, stack));
    }
    let no_route = RespondLayer::new(parts.metrics.clone(), Direction::Gateway).layer(
        BoxStack::boxing(tower::service_fn(|req: Request<BoxBody>| async move {
            Err::<Response<BoxBody>, _>(
                GatewayError::NoRoute(req.uri().path().to_string()).into_proxy_error(""),
            )
        })),
    );
    Router {
        routes: Arc::new(RouteTable::new(routes)),
        no_route: observed(parts, "", None, cors.as_ref(), no_route),
        limits,
        config: Arc::new(config),
    }
}

/// Wraps `inner` (errors already rendered) in CORS, when configured, observe and, when
/// tracing is on, the server span.
fn observed<S>(
    parts: &StackParts<'_>,
    service: &str,
    route: Option<&str>,
    cors: Option<&CorsLayer>,
    inner: S,
) -> HttpStack
where
    S: CloneStack<Request<BoxBody>, Response<BoxBody>, Infallible> + Clone + 'static,
{
    // CORS makes a future of its own, boxed once; without it the boxed future passes through.
    let inner: HttpStack = match cors {
        Some(cors) => BoxStack::boxing(cors.layer(inner)),
        None => BoxStack::new(inner),
    };
    let observe = ObserveLayer::new(
        parts.metrics.clone(),
        Direction::Gateway,
        service.into(),
        parts.access_log,
    );
    let span =
        ServerSpanLayer::new(parts.tracer, Direction::Gateway, service.into()).map(|layer| {
            match route {
                Some(route) => layer.with_route(route),
                None => layer,
            }
        });
    ServerSpanLayer::stack(span, observe.layer(inner))
}

/// A `tower::filter` predicate refusing what is not gRPC on a gRPC route (named here); passes
/// everything on other routes (`None`). A gRPC request is what core's error renderer answers
/// with a gRPC status ([`ErrorFormat::of`]), so the two never disagree.
#[derive(Clone, Debug)]
struct GrpcOnly(Option<Arc<str>>);

impl Predicate<Request<BoxBody>> for GrpcOnly {
    type Request = Request<BoxBody>;

    fn check(&mut self, req: Request<BoxBody>) -> Result<Request<BoxBody>, BoxError> {
        match &self.0 {
            Some(route) if ErrorFormat::of(req.headers()) != ErrorFormat::Grpc => {
                let content_type = match req.headers().get(http::header::CONTENT_TYPE) {
                    Some(ct) => format!("content-type {}", String::from_utf8_lossy(ct.as_bytes())),
                    None => "no content-type".to_string(),
                };
                Err(GatewayError::NotGrpc {
                    route: route.to_string(),
                    content_type,
                }
                .into())
            }
            _ => Ok(req),
        }
    }
}

/// A `tower::filter` predicate replacing the matched prefix by the route's `rewritePrefix`.
#[derive(Clone, Debug)]
struct Rewrite {
    prefix: PathPrefix,
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
    /// Kept for the next version, which keeps the limits it does not change.
    limits: BTreeMap<String, Arc<NamedLimit>>,
    config: Arc<GatewayConfig>,
}

impl Router {
    /// The config this router was built from.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }
}

/// The router in force, replaced whole when the config changes: each request takes the
/// router of the moment it arrives and finishes on it, so a change never affects a request
/// in flight.
#[derive(Clone)]
pub struct LiveRouter(pub watch::Receiver<Router>);

impl Service<Request<BoxBody>> for LiveRouter {
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        let mut router = self.0.borrow().clone();
        router.call(req)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::tests::{SECRET, hs256, now};
    use ferrule_proxy_core::body;
    use ferrule_proxy_core::errors::ERROR_HEADER;
    use http::header;
    use http_body_util::BodyExt;
    use serde_json::json;
    use std::path::Path;

    /// HTTP routes beside a gRPC route to `order:grpc`, as `ferrule dev up` writes them.
    const CONFIG: &str = "
jwt: {providers: [{name: shop, hs256SecretEnv: S}]}
rateLimits: {api: {requestsPerSecond: 1, burst: 2}}
routes:
  - {name: orders, pathPrefix: /api/orders, rewritePrefix: /orders, service: 'order:http'}
  - {name: orders-grpc, pathPrefix: /shop.order.v1.OrderService/, service: 'order:grpc', grpc: true, rateLimit: api}
";

    /// A router whose forwarding stacks answer 200 with `<service> <path>` in a header.
    fn router() -> Router {
        let config = GatewayConfig::parse(CONFIG, Path::new("gateway.yaml")).unwrap();
        let prepared = prepare(config, &|_| Some(SECRET.into()), None).unwrap();
        let metrics = Metrics::new();
        let forward = |service: &ServiceRef| -> HttpStack {
            let service = service.to_string();
            BoxStack::boxing(tower::service_fn(move |req: Request<BoxBody>| {
                let seen = format!("{service} {}", req.uri().path());
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("x-forwarded-to", seen)
                            .body(body::empty())
                            .unwrap(),
                    )
                }
            }))
        };
        build(
            prepared,
            &StackParts {
                metrics: &metrics,
                access_log: false,
                forward: &forward,
                tracer: &Tracer::default(),
            },
        )
    }

    fn grpc_call(path: &str, token: Option<&str>) -> Request<BoxBody> {
        let mut req = Request::post(path)
            .version(http::Version::HTTP_2)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers");
        if let Some(token) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        req.body(body::empty()).unwrap()
    }

    async fn call(router: &Router, req: Request<BoxBody>) -> Response<BoxBody> {
        router.clone().oneshot(req).await.unwrap()
    }

    fn header<'a>(rsp: &'a Response<BoxBody>, name: &str) -> &'a str {
        rsp.headers().get(name).map_or("", |v| v.to_str().unwrap())
    }

    #[tokio::test]
    async fn grpc_methods_route_unchanged_to_the_services_grpc_port() {
        let router = router();
        let token = hs256(json!({"sub": "123", "exp": now() + 60}), SECRET);
        let rsp = call(
            &router,
            grpc_call("/shop.order.v1.OrderService/CreateOrder", Some(&token)),
        )
        .await;
        assert_eq!(
            header(&rsp, "x-forwarded-to"),
            "order:grpc /shop.order.v1.OrderService/CreateOrder"
        );
        // HTTP routes still rewrite.
        let http = Request::get("/api/orders/7")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(body::empty())
            .unwrap();
        assert_eq!(
            header(&call(&router, http).await, "x-forwarded-to"),
            "order:http /orders/7"
        );
    }

    #[tokio::test]
    async fn grpc_callers_get_grpc_statuses_from_the_gateway() {
        let router = router();
        // No token: UNAUTHENTICATED.
        let rsp = call(
            &router,
            grpc_call("/shop.order.v1.OrderService/GetOrder", None),
        )
        .await;
        assert_eq!(rsp.status().as_u16(), 200);
        assert_eq!(header(&rsp, "grpc-status"), "16");
        assert_eq!(header(&rsp, ERROR_HEADER.as_str()), "unauthenticated");
        // A bad token: UNAUTHENTICATED.
        let rsp = call(
            &router,
            grpc_call("/shop.order.v1.OrderService/GetOrder", Some("not.a.jwt")),
        )
        .await;
        assert_eq!(header(&rsp, "grpc-status"), "16");
        // A service no route names (a prefix is matched on a segment boundary): UNIMPLEMENTED.
        let token = hs256(json!({"sub": "123", "exp": now() + 60}), SECRET);
        let rsp = call(
            &router,
            grpc_call("/shop.order.v1.OrderServiceX/GetOrder", Some(&token)),
        )
        .await;
        assert_eq!(header(&rsp, "grpc-status"), "12");
        assert_eq!(header(&rsp, ERROR_HEADER.as_str()), "no_route");
        // The route's bucket holds 2: the third call in a row is RESOURCE_EXHAUSTED.
        let statuses = [
            call(
                &router,
                grpc_call("/shop.order.v1.OrderService/GetOrder", Some(&token)),
            )
            .await,
            call(
                &router,
                grpc_call("/shop.order.v1.OrderService/GetOrder", Some(&token)),
            )
            .await,
            call(
                &router,
                grpc_call("/shop.order.v1.OrderService/GetOrder", Some(&token)),
            )
            .await,
        ]
        .map(|rsp| header(&rsp, "grpc-status").to_string());
        assert_eq!(statuses, ["", "", "8"]);
    }

    #[tokio::test]
    async fn a_grpc_route_refuses_what_is_not_grpc() {
        let router = router();
        let token = hs256(json!({"sub": "123", "exp": now() + 60}), SECRET);
        // Two calls: the route's bucket holds two.
        for content_type in [None, Some("application/grpc-web")] {
            let mut req = Request::post("/shop.order.v1.OrderService/CreateOrder")
                .header(header::AUTHORIZATION, format!("Bearer {token}"));
            if let Some(ct) = content_type {
                req = req.header(header::CONTENT_TYPE, ct);
            }
            let rsp = call(&router, req.body(body::empty()).unwrap()).await;
            assert_eq!(rsp.status().as_u16(), 400, "{content_type:?}");
            assert_eq!(header(&rsp, ERROR_HEADER.as_str()), "bad_request");
            assert!(rsp.headers().get("x-forwarded-to").is_none());
            let body = rsp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let error = v["error"].as_str().unwrap();
            assert!(
                error.starts_with("route \"orders-grpc\" takes gRPC only"),
                "{error}"
            );
        }
    }
}
