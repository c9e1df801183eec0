//! The inbound HTTP stack of one app port, built in [`stack`]: server span (when tracing is
//! on) → observe → respond → authorize → rate limit → forward to the app on loopback.
//!
//! Requests from a meshed peer lose the mesh headers here: `ferrule-orig-proto` turns an
//! HTTP/2-carried HTTP/1 request back into HTTP/1. `ferrule-client-id` is always removed and,
//! when the connection's mutual TLS proved the client's identity, set to it: the app can trust
//! it. The app is spoken to in the version the request now has.
//!
//! The proxy's own service's `AuthorizationPolicy`s are checked first
//! ([`ferrule_proxy_policy::authz::Authorizer`], against the connection's verified client
//! identity): a refused request is answered 403 `forbidden` (a gRPC one PERMISSION_DENIED)
//! and never reaches the app. Then its `ServicePolicy.rateLimit`, if any
//! ([`LocalRateLimit`]): a request over it is answered 429 with `Retry-After`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response, Version};
use tower::{Service, ServiceBuilder};

use tokio::sync::watch;

use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::context::RequestContext;
use ferrule_proxy_core::errors::{ProxyError, Reason, RespondLayer};
use ferrule_proxy_core::headers;
use ferrule_proxy_core::metrics::{Direction, Metrics};
use ferrule_proxy_core::observe::ObserveLayer;
use ferrule_proxy_core::server::HttpStack;
use ferrule_proxy_core::trace::{ServerSpanLayer, Tracer};
use ferrule_proxy_policy::authz::{Access, Authorizer};
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_policy::ratelimit::RateKey;
use ferrule_proxy_policy::{GuardsCell, PolicySet};
use ferrule_proxy_transport::client::{Clients, Protocol};

/// The local rate limit of the proxy's own service, following the policy in force.
pub struct LocalRateLimit {
    policies: watch::Receiver<Arc<PolicySet>>,
    guards: GuardsCell,
    metrics: PolicyMetrics,
}

impl LocalRateLimit {
    /// The limit `service`'s policy in `policies` sets (none without a policy).
    pub fn new(
        policies: watch::Receiver<Arc<PolicySet>>,
        service: &str,
        metrics: PolicyMetrics,
    ) -> Self {
        Self {
            policies,
            guards: GuardsCell::new(service),
            metrics,
        }
    }

    /// Takes a token for one request to `name`, or the 429 to answer.
    fn check(&self, name: &str) -> Result<(), ProxyError> {
        let set = self.policies.borrow().clone();
        match &self.guards.get(&set).rate_limit {
            Some(limit) => limit.check(&RateKey::Global).map_err(|limited| {
                self.metrics.rate_limited(Direction::Inbound, name);
                ProxyError::new(Reason::RateLimited, name, limited.to_string())
                    .with_retry_after(limited.retry_after)
            }),
            None => Ok(()),
        }
    }
}

/// What guards the app of one port: authorization and the local rate limit.
#[derive(Clone)]
pub struct Guards {
    pub authz: Arc<Authorizer>,
    pub limit: Arc<LocalRateLimit>,
    /// The port's name (`--app-port NAME=ADDR`), for policies narrowed to ports.
    pub port_name: Option<Arc<str>>,
}

impl Guards {
    /// Refuses a request the service's authorization policies do not allow.
    fn authorize(&self, name: &str, req: &Request<BoxBody>) -> Result<(), ProxyError> {
        let client = req
            .extensions()
            .get::<RequestContext>()
            .and_then(|ctx| ctx.peer_identity.as_deref());
        let access = Access {
            port: self.port_name.as_deref(),
            request: Some(req),
            client,
        };
        self.authz.check(&access).map_err(|denial| {
            ProxyError::new(
                Reason::Forbidden,
                name,
                format!("{} to {} {}", denial, req.method(), req.uri().path()),
            )
        })
    }
}

/// Builds the HTTP path of one inbound port.
pub fn stack(
    name: Arc<str>,
    app_addr: SocketAddr,
    clients: Clients,
    guards: Guards,
    metrics: &Metrics,
    access_log: bool,
    tracer: &Tracer,
) -> HttpStack {
    let observe = ObserveLayer::new(
        metrics.clone(),
        Direction::Inbound,
        name.clone(),
        access_log,
    );
    let observed = ServiceBuilder::new()
        .layer(observe)
        .layer(RespondLayer::new(metrics.clone(), Direction::Inbound))
        .service(ForwardToApp {
            name: name.clone(),
            app_addr,
            clients,
            guards,
        });
    ServerSpanLayer::stack(
        ServerSpanLayer::new(tracer, Direction::Inbound, name),
        observed,
    )
}

#[derive(Clone)]
struct ForwardToApp {
    name: Arc<str>,
    app_addr: SocketAddr,
    clients: Clients,
    guards: Guards,
}

/// Undoes what the outbound proxy of a meshed peer did to the request, and says who the
/// client is as only the connection can.
fn strip_mesh_headers(req: &mut Request<BoxBody>) {
    req.headers_mut().remove(headers::CLIENT_ID);
    let identity = req
        .extensions()
        .get::<RequestContext>()
        .and_then(|ctx| ctx.peer_identity.clone());
    if let Some(identity) = identity
        && let Ok(value) = HeaderValue::from_str(&identity)
    {
        req.headers_mut().insert(headers::CLIENT_ID, value);
    }
    if let Some(orig) = req.headers_mut().remove(headers::ORIG_PROTO) {
        if orig == headers::ORIG_PROTO_HTTP1 {
            *req.version_mut() = Version::HTTP_11;
        } else {
            tracing::debug!(?orig, "unknown original protocol; forwarding as received");
        }
    }
}

impl Service<Request<BoxBody>> for ForwardToApp {
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        if let Err(refused) = self.guards.authorize(&self.name, &req) {
            return Box::pin(std::future::ready(Err(refused)));
        }
        let this = self.clone();
        Box::pin(async move {
            this.guards.limit.check(&this.name)?;
            strip_mesh_headers(&mut req);
            let protocol = Protocol::of(&req);
            let conn = this
                .clients
                .connect(this.app_addr, protocol)
                .await
                .map_err(|error| {
                    ProxyError::new(
                        Reason::UpstreamConnectFailure,
                        this.name.to_string(),
                        format!("could not connect to the app: {error}"),
                    )
                })?;
            conn.send(req).await.map_err(|e| {
                ProxyError::new(
                    Reason::UpstreamFailure,
                    this.name.to_string(),
                    e.error.to_string(),
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrule_proxy_core::body;

    #[test]
    fn orig_proto_restores_http1() {
        let mut req = Request::get("http://user/x")
            .version(Version::HTTP_2)
            .header(headers::ORIG_PROTO, headers::ORIG_PROTO_HTTP1)
            .body(body::empty())
            .unwrap();
        strip_mesh_headers(&mut req);
        assert_eq!(req.version(), Version::HTTP_11);
        assert!(!req.headers().contains_key(headers::ORIG_PROTO));
        assert_eq!(Protocol::of(&req), Protocol::Http1);
    }

    #[test]
    fn client_id_comes_only_from_the_connection() {
        let forged = || {
            Request::get("http://user/x")
                .header(
                    headers::CLIENT_ID,
                    "spiffe://cluster.local/ns/shop/sa/admin",
                )
                .body(body::empty())
                .unwrap()
        };
        let ctx = |peer_identity: Option<&str>| RequestContext {
            id: ferrule_proxy_core::context::RequestId::Random(1),
            direction: Direction::Inbound,
            target: "user".into(),
            client: "127.0.0.1:1".parse().unwrap(),
            start: std::time::Instant::now(),
            peer_identity: peer_identity.map(Arc::from),
        };
        // Plaintext: the forged value is removed and nothing replaces it.
        let mut req = forged();
        req.extensions_mut().insert(ctx(None));
        strip_mesh_headers(&mut req);
        assert!(!req.headers().contains_key(headers::CLIENT_ID));
        // Mutual TLS: the verified identity replaces it.
        let mut req = forged();
        req.extensions_mut()
            .insert(ctx(Some("spiffe://cluster.local/ns/shop/sa/order")));
        strip_mesh_headers(&mut req);
        let values: Vec<_> = req.headers().get_all(headers::CLIENT_ID).iter().collect();
        assert_eq!(values, ["spiffe://cluster.local/ns/shop/sa/order"]);
    }
}
