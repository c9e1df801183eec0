//! The proxy's policy side: the configuration the controller streams (`ServicePolicy`,
//! `HTTPRoute`, `AuthorizationPolicy`), compiled into a [`PolicySet`], and the pieces that apply it to requests. A
//! gateway's own `Gateway` resource travels in the same set ([`PolicySet::gateway`]).
//!
//! The proxy's Config stream client (`ferrule_proxy_api::policy::PolicyClient`) follows `ferrule.v1.Config/Watch` and publishes each good
//! snapshot as an `Arc<PolicySet>` on a `watch` channel (acking it; a snapshot that does not
//! parse or compile is nacked and the last good set stays). The logical level reads the set
//! per request; the concrete level builds its stack per target and config version. The
//! stateful pieces (budgets, breakers, limiters) are not in the set: each is a [`Guard`] that
//! the layer using it keeps in a [`GuardsCell`], carried to each new version, so a config
//! change never resets a breaker or a budget whose settings it did not touch, and in-flight
//! requests keep the pieces they hold.
//!
//! Where each piece plugs into the outbound path, level by level (as in linkerd2-proxy):
//! * **logical** (the service the app called): [`route::Routes::find`] picks the rule;
//!   [`route::HeaderRewrite`] rewrites request and response headers; [`fault::FaultPolicy`]
//!   delays or aborts; the rule's request timeout bounds the whole request, retries included;
//!   [`retry::RetryPolicy`] with a [`retry::RetryBudget`] and [`replay`]able bodies retries
//!   failed attempts, each bounded by the per-try timeout; [`route::Rule::pick_backend`]
//!   chooses the backend of a traffic split. Requests no rule matches use the service's own
//!   `ServicePolicy` ([`PolicySet::policy`]).
//! * **concrete** (a backend service, after the split): [`ratelimit::RateLimiter`] (the
//!   backend's `rateLimit`), [`breaker::ConcurrencyLimit`], then the [`balance::Balancer`].
//! * **endpoint** (one address the balancer chose): [`breaker::FailureAccrual`] admits or
//!   refuses the endpoint and is told each attempt's outcome.
//!
//! The inbound side uses [`ServiceGuards`]: its own service's local rate limit; and
//! [`authz::Authorizer`]: its `AuthorizationPolicy`s and its namespace's default, compiled
//! with the set ([`PolicySet::from_resources`]).

pub mod authz;
pub mod balance;
pub mod breaker;
pub mod endpoint;
pub mod fault;
pub mod metrics;
pub mod ratelimit;
pub mod replay;
pub mod retry;
pub mod route;
mod window;

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use ferrule_config::{
    ConfigError, EffectiveCircuitBreaker, EffectivePolicy, GatewaySpec, Resource, Spec,
    ValidationErrors,
};
use ferrule_proto::names::qualify;
use ferrule_proto::v1::ConfigSnapshot;

use breaker::{ConcurrencyLimit, FailureAccrual};
use ratelimit::RateLimiter;
use retry::{RetryBudget, RetryPolicy};
use route::{RouteError, Routes};

/// What a service without a `ServicePolicy` gets.
static DEFAULT_POLICY: LazyLock<EffectivePolicy> = LazyLock::new(EffectivePolicy::default);
static DEFAULT_RETRY: LazyLock<Arc<RetryPolicy>> =
    LazyLock::new(|| Arc::new(RetryPolicy::new(&DEFAULT_POLICY.retries)));

/// Why a config snapshot was refused (the reason of the nack).
#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyError {
    /// A resource that does not parse.
    #[error(transparent)]
    Resource(#[from] ConfigError),
    /// Resources that parse but break the rules (ranges, duplicates, weights...).
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
    /// A route the proxy could not compile.
    #[error("{resource}: {error}")]
    Route { resource: String, error: RouteError },
}

/// Every policy this proxy applies, as of one config version. Immutable; a new version is a
/// new set.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    version: i64,
    resources: Vec<Resource>,
    services: BTreeMap<String, ServicePolicies>,
    authz: authz::Authorizations,
}

/// What configures one service.
#[derive(Debug, Clone, Default)]
pub struct ServicePolicies {
    /// Its `ServicePolicy` with defaults filled in; `None` when it has none.
    pub policy: Option<EffectivePolicy>,
    /// Its `HTTPRoute`, compiled against its policy.
    pub routes: Option<Routes>,
    /// Its policy's retries, compiled once (requests no rule matches share it).
    pub retry: Option<Arc<RetryPolicy>>,
}

impl PolicySet {
    /// Reads, validates and compiles a snapshot from the controller.
    pub fn from_snapshot(snapshot: &ConfigSnapshot) -> Result<Self, PolicyError> {
        let resources = snapshot
            .resources
            .iter()
            .map(|r| Resource::from_parts(&r.kind, &r.namespace, &r.name, &r.spec_json))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_resources(snapshot.version, resources)
    }

    /// Validates and compiles `resources` as config version `version`.
    pub fn from_resources(version: i64, resources: Vec<Resource>) -> Result<Self, PolicyError> {
        ferrule_config::validate(&resources, None)?;
        let mut services: BTreeMap<String, ServicePolicies> = BTreeMap::new();
        // Keyed by qualified name: a resource's service names are relative to its namespace.
        // Policies first: routes compile against their service's policy.
        for resource in &resources {
            if let Spec::ServicePolicy(spec) = &resource.spec {
                let service = qualify(&resource.metadata.namespace, &spec.service);
                let entry = services.entry(service).or_default();
                let policy = spec.effective();
                entry.retry = Some(Arc::new(RetryPolicy::new(&policy.retries)));
                entry.policy = Some(policy);
            }
        }
        for resource in &resources {
            if let Spec::HttpRoute(spec) = &resource.spec {
                let namespace = &resource.metadata.namespace;
                let mut spec = spec.clone();
                spec.service = qualify(namespace, &spec.service);
                for backend in spec.rules.iter_mut().flat_map(|r| r.backends.iter_mut()) {
                    backend.service = qualify(namespace, &backend.service);
                }
                let entry = services.entry(spec.service.clone()).or_default();
                let parent = entry.policy.as_ref().unwrap_or(&DEFAULT_POLICY);
                let routes =
                    Routes::compile(&spec, parent).map_err(|error| PolicyError::Route {
                        resource: resource.id().to_string(),
                        error,
                    })?;
                entry.routes = Some(routes);
            }
        }
        let authz = authz::Authorizations::compile(&resources);
        Ok(Self {
            version,
            resources,
            services,
            authz,
        })
    }

    /// The config version (the store revision); 0 before any config arrived.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// What configures `service` (its qualified name, see `ferrule_proto::names`), if
    /// anything does.
    pub fn service(&self, service: &str) -> Option<&ServicePolicies> {
        self.services.get(service)
    }

    /// The effective policy of `service`: its `ServicePolicy`, or the defaults.
    pub fn policy(&self, service: &str) -> &EffectivePolicy {
        self.service(service)
            .and_then(|s| s.policy.as_ref())
            .unwrap_or(&DEFAULT_POLICY)
    }

    /// The retries of `service`'s policy (the default policy's without one), compiled.
    pub fn retry(&self, service: &str) -> Arc<RetryPolicy> {
        self.service(service)
            .and_then(|s| s.retry.clone())
            .unwrap_or_else(|| DEFAULT_RETRY.clone())
    }

    /// The compiled `HTTPRoute` of `service`, if it has one.
    pub fn routes(&self, service: &str) -> Option<&Routes> {
        self.service(service).and_then(|s| s.routes.as_ref())
    }

    /// The spec of the `Gateway` resource named `name`, if this version has one. The policy
    /// side does not apply it (the gateway's router does); it travels in the set so that a
    /// gateway sees its own resource and its services' policies as of one version.
    pub fn gateway(&self, name: &str) -> Option<&GatewaySpec> {
        self.resources.iter().find_map(|r| match &r.spec {
            Spec::Gateway(spec) if r.metadata.name == name => Some(spec),
            _ => None,
        })
    }

    /// The resources of this version as documents, for the admin `/config` page.
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    /// `{"version": N, "resources": [documents...]}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "version": self.version,
            "resources": self.resources,
        })
    }
}

/// One stateful policy piece a stack owns, built from a service's effective policy: a retry
/// budget, a failure accrual, a concurrency limit, a rate limit. A layer keeps its piece in a
/// [`GuardsCell`], which carries it to each new config version whose [`Guard::Settings`] for
/// it are unchanged, so breaker states, budgets and token buckets survive changes that do not
/// touch their settings. Cheap to clone; clones share state.
pub trait Guard: Clone {
    /// What the piece is built from; equal settings keep the piece (and its state).
    type Settings: PartialEq + std::fmt::Debug;

    fn settings(policy: &EffectivePolicy) -> Self::Settings;

    fn build(policy: &EffectivePolicy) -> Self;
}

/// The retry budget of requests to a service (the logical level's).
impl Guard for Arc<RetryBudget> {
    type Settings = retry::BudgetSettings;

    fn settings(policy: &EffectivePolicy) -> Self::Settings {
        RetryPolicy::new(&policy.retries).budget()
    }

    fn build(policy: &EffectivePolicy) -> Self {
        Arc::new(RetryBudget::new(Self::settings(policy)))
    }
}

/// The endpoint breakers of a backend service (the endpoint level's).
impl Guard for FailureAccrual {
    type Settings = EffectiveCircuitBreaker;

    fn settings(policy: &EffectivePolicy) -> Self::Settings {
        EffectiveCircuitBreaker {
            max_concurrent_requests: None,
            max_pending: None,
            ..policy.circuit_breaker.clone()
        }
    }

    fn build(policy: &EffectivePolicy) -> Self {
        FailureAccrual::new(&policy.circuit_breaker)
    }
}

/// The concurrency limit of a backend service (the concrete level's).
impl Guard for ConcurrencyLimit {
    type Settings = (Option<u32>, Option<u32>);

    fn settings(policy: &EffectivePolicy) -> Self::Settings {
        (
            policy.circuit_breaker.max_concurrent_requests,
            policy.circuit_breaker.max_pending,
        )
    }

    fn build(policy: &EffectivePolicy) -> Self {
        ConcurrencyLimit::from_config(&policy.circuit_breaker)
    }
}

/// A service's `rateLimit`, keyed by [`ratelimit::RateKey::Global`]; `None` without one.
impl Guard for Option<Arc<RateLimiter>> {
    type Settings = Option<ferrule_config::EffectiveRateLimit>;

    fn settings(policy: &EffectivePolicy) -> Self::Settings {
        policy.rate_limit
    }

    fn build(policy: &EffectivePolicy) -> Self {
        policy.rate_limit.map(|l| Arc::new(RateLimiter::new(l)))
    }
}

/// What the inbound side guards its own service with: the local rate limit.
#[derive(Clone, Debug)]
pub struct ServiceGuards {
    /// Keyed by [`ratelimit::RateKey::Global`]; `None` without a `rateLimit`.
    pub rate_limit: Option<Arc<RateLimiter>>,
}

impl Guard for ServiceGuards {
    type Settings = Option<ferrule_config::EffectiveRateLimit>;

    fn settings(policy: &EffectivePolicy) -> Self::Settings {
        policy.rate_limit
    }

    fn build(policy: &EffectivePolicy) -> Self {
        Self {
            rate_limit: Guard::build(policy),
        }
    }
}

/// One [`Guard`] of one service, brought up to date with each config version the first time
/// a request of that version asks for it: kept when its settings did not change, built afresh
/// when they did. Requests keep the piece they got, so a new version never takes a slot or a
/// probe away from one in flight.
#[derive(Debug)]
pub struct GuardsCell<G: Guard = ServiceGuards> {
    service: String,
    /// (config version, the settings the piece was built from, the piece).
    state: Mutex<(i64, G::Settings, G)>,
}

impl<G: Guard> GuardsCell<G> {
    /// The piece for `service` under the defaults, until a set says otherwise.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            state: Mutex::new((0, G::settings(&DEFAULT_POLICY), G::build(&DEFAULT_POLICY))),
        }
    }

    /// The piece for `set`: updated when `set` is of another version than the last one asked
    /// for and the service's settings for the piece changed.
    pub fn get(&self, set: &PolicySet) -> G {
        // A poisoned lock still holds a whole (version, piece) pair.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.0 != set.version() {
            let policy = set.policy(&self.service);
            let settings = G::settings(policy);
            if state.1 != settings {
                state.2 = G::build(policy);
                state.1 = settings;
            }
            state.0 = set.version();
        }
        state.2.clone()
    }

    /// The piece as of the last version asked for, for metrics.
    pub fn current(&self) -> G {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .2
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferrule_proto::v1 as pb;

    use super::*;

    pub(crate) fn resource(kind: &str, name: &str, spec: serde_json::Value) -> pb::Resource {
        pb::Resource {
            kind: kind.into(),
            namespace: "default".into(),
            name: name.into(),
            spec_json: spec.to_string(),
            revision: 1,
        }
    }

    #[test]
    fn snapshot_compiles_policies_and_routes() {
        let snapshot = ConfigSnapshot {
            version: 7,
            subscription: 0,
            resources: vec![
                resource(
                    "HTTPRoute",
                    "user",
                    serde_json::json!({
                        "service": "user",
                        "rules": [{"matches": [{"path": {"value": "/v2"}}],
                                   "backends": [{"service": "user-v2"}]}],
                    }),
                ),
                resource(
                    "ServicePolicy",
                    "user",
                    serde_json::json!({"service": "user", "timeouts": {"request": "3s"}}),
                ),
            ],
        };
        let set = PolicySet::from_snapshot(&snapshot).unwrap();
        assert_eq!(set.version(), 7);
        assert_eq!(
            set.policy("user").request_timeout,
            Some(Duration::from_secs(3))
        );
        assert_eq!(set.policy("order"), &EffectivePolicy::default());
        assert!(set.service("order").is_none());
        let routes = set.routes("user").unwrap();
        let req = http::Request::get("/v2/x").body(()).unwrap();
        let rule = routes.find(&req).unwrap();
        // Compiled against the policy even though the route came first in the snapshot.
        assert_eq!(rule.request_timeout(), Some(Duration::from_secs(3)));
        assert_eq!(rule.backends()[0].service, "user-v2");

        let json = set.to_json();
        assert_eq!(json["version"], 7);
        assert_eq!(json["resources"][0]["kind"], "HTTPRoute");
        assert_eq!(json["resources"][1]["spec"]["timeouts"]["request"], "3s");
    }

    /// A resource's names are relative to its namespace: `user` in `shop` is keyed and
    /// routed as `user.shop`, apart from `user` in `default`.
    #[test]
    fn resources_in_a_namespace_configure_that_namespaces_service() {
        let in_shop = |kind: &str, spec: serde_json::Value| ferrule_proto::v1::Resource {
            namespace: "shop".into(),
            ..resource(kind, "user", spec)
        };
        let snapshot = ConfigSnapshot {
            version: 2,
            subscription: 0,
            resources: vec![
                in_shop(
                    "ServicePolicy",
                    serde_json::json!({"service": "user", "timeouts": {"request": "4s"}}),
                ),
                in_shop(
                    "HTTPRoute",
                    serde_json::json!({"service": "user",
                        "rules": [{"backends": [{"service": "user-v2"}, {"service": "pay.billing"}]}]}),
                ),
            ],
        };
        let set = PolicySet::from_snapshot(&snapshot).unwrap();
        assert_eq!(set.policy("user"), &EffectivePolicy::default());
        assert_eq!(
            set.policy("user.shop").request_timeout,
            Some(Duration::from_secs(4))
        );
        let routes = set.routes("user.shop").unwrap();
        let rule = routes
            .find(&http::Request::get("/").body(()).unwrap())
            .unwrap();
        let backends: Vec<_> = rule.backends().iter().map(|b| b.service.as_str()).collect();
        assert_eq!(backends, ["user-v2.shop", "pay.billing"]);
    }

    /// A set of version `version` with one `ServicePolicy` for `user`.
    fn policy_set(version: i64, timeout: u64, consecutive: u32) -> PolicySet {
        PolicySet::from_snapshot(&ConfigSnapshot {
            version,
            subscription: 0,
            resources: vec![resource(
                "ServicePolicy",
                "user",
                serde_json::json!({"service": "user",
                    "timeouts": {"request": format!("{timeout}s")},
                    "circuitBreaker": {"consecutiveFailures": consecutive,
                                       "maxEjectionPercent": 100},
                    "rateLimit": {"requestsPerSecond": 1}}),
            )],
        })
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn guards_keep_state_across_unrelated_changes() {
        let budget = GuardsCell::<Arc<RetryBudget>>::new("user");
        let accrual = GuardsCell::<FailureAccrual>::new("user");
        let rate = GuardsCell::<Option<Arc<RateLimiter>>>::new("user");
        let first = policy_set(1, 1, 1);
        let breakers = accrual.get(&first);
        breakers.set_endpoints(["ep".to_string()]);
        breakers.try_acquire("ep").unwrap().failure();
        let limit = rate.get(&first).unwrap();
        limit.check(&ratelimit::RateKey::Global).unwrap();
        let first_budget = budget.get(&first);

        // Only the timeout changed: the ejection and the drained bucket carry over.
        let kept = policy_set(2, 2, 1);
        assert!(accrual.get(&kept).try_acquire("ep").is_none());
        assert!(Arc::ptr_eq(&budget.get(&kept), &first_budget));
        let limit = rate.get(&kept).unwrap();
        assert!(limit.check(&ratelimit::RateKey::Global).is_err());

        // The breaker settings changed: breakers start over.
        let fresh = policy_set(3, 2, 3);
        assert!(accrual.get(&fresh).try_acquire("ep").is_some());
        assert!(rate.get(&fresh).is_some());
        // The inbound side's guards follow the same rule.
        let inbound = GuardsCell::<ServiceGuards>::new("user");
        let drained = inbound.get(&first).rate_limit.unwrap();
        drained.check(&ratelimit::RateKey::Global).unwrap();
        let limit = inbound.get(&kept).rate_limit.unwrap();
        assert!(limit.check(&ratelimit::RateKey::Global).is_err());
    }

    #[test]
    fn bad_snapshots_are_refused_with_the_reason() {
        let unknown_field = ConfigSnapshot {
            version: 2,
            subscription: 0,
            resources: vec![resource(
                "ServicePolicy",
                "user",
                serde_json::json!({"service": "user", "timeout": "1s"}),
            )],
        };
        let err = PolicySet::from_snapshot(&unknown_field).unwrap_err();
        assert!(matches!(err, PolicyError::Resource(_)), "{err}");
        assert!(
            err.to_string().contains("ServicePolicy/default/user"),
            "{err}"
        );

        let out_of_range = ConfigSnapshot {
            version: 3,
            subscription: 0,
            resources: vec![resource(
                "ServicePolicy",
                "user",
                serde_json::json!({"service": "user", "retries": {"maxAttempts": 99}}),
            )],
        };
        let err = PolicySet::from_snapshot(&out_of_range).unwrap_err();
        assert!(matches!(err, PolicyError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("maxAttempts"), "{err}");
    }
}
