//! The proxy's policy side: the configuration the controller streams (`ServicePolicy`,
//! `HTTPRoute`), compiled into a [`PolicySet`], and the pieces that apply it to requests. A
//! gateway's own `Gateway` resource travels in the same set ([`PolicySet::gateway`]).
//!
//! The proxy's Config stream client (`ferrule_proxy_api::policy::PolicyClient`) follows `ferrule.v1.Config/Watch` and publishes each good
//! snapshot as an `Arc<PolicySet>` on a `watch` channel (acking it; a snapshot that does not
//! parse or compile is nacked and the last good set stays). Stacks read the set when they are
//! built and rebuild when it changes. The stateful pieces (budgets, breakers, limiters) are
//! not in the set: stacks own them, one [`ServiceGuards`] per service, and carry them to each
//! new version with [`ServiceGuards::update`], so a config change never resets a breaker or a
//! budget whose settings it did not touch, and in-flight requests keep the pieces they hold.
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
//!   backend's `rateLimit`), [`breaker::ConcurrencyLimit`], then the balancer.
//! * **endpoint** (one address the balancer chose): [`breaker::FailureAccrual`] admits or
//!   refuses the endpoint and is told each attempt's outcome.

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
}

/// What configures one service.
#[derive(Debug, Clone, Default)]
pub struct ServicePolicies {
    /// Its `ServicePolicy` with defaults filled in; `None` when it has none.
    pub policy: Option<EffectivePolicy>,
    /// Its `HTTPRoute`, compiled against its policy.
    pub routes: Option<Routes>,
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
                services.entry(service).or_default().policy = Some(spec.effective());
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
        Ok(Self {
            version,
            resources,
            services,
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

/// The stateful policy pieces of one service, built from its effective policy: the retry
/// budget of requests to it, and, where it is a backend, its rate limit, concurrency limit and
/// endpoint breakers. Stacks keep one per service and carry it to each new config version with
/// [`ServiceGuards::update`], so breaker states, budgets and token buckets survive changes
/// that do not touch their settings. Cheap to clone; clones share state.
///
/// A route rule whose `retries.budget` differs from its service's gets its own
/// `RetryBudget::new(rule.retry().budget())`, kept per rule the same way.
#[derive(Clone, Debug)]
pub struct ServiceGuards {
    pub retry_budget: Arc<RetryBudget>,
    pub failure_accrual: FailureAccrual,
    pub concurrency: ConcurrencyLimit,
    /// Keyed by [`ratelimit::RateKey::Global`]; `None` without a `rateLimit`.
    pub rate_limit: Option<Arc<RateLimiter>>,
    policy: EffectivePolicy,
}

impl ServiceGuards {
    pub fn new(policy: &EffectivePolicy) -> Self {
        Self {
            retry_budget: Arc::new(RetryBudget::new(RetryPolicy::new(&policy.retries).budget())),
            failure_accrual: FailureAccrual::new(&policy.circuit_breaker),
            concurrency: ConcurrencyLimit::from_config(&policy.circuit_breaker),
            rate_limit: policy.rate_limit.map(|l| Arc::new(RateLimiter::new(l))),
            policy: policy.clone(),
        }
    }

    /// How long a connection to one of the service's endpoints may stay unused
    /// (`timeouts.idle`).
    pub fn idle_timeout(&self) -> std::time::Duration {
        self.policy.idle_timeout
    }

    /// The guards for `policy`: each piece whose settings are unchanged is kept (state
    /// included), the others are built afresh.
    pub fn update(&self, policy: &EffectivePolicy) -> Self {
        let fresh = Self::new(policy);
        let old = &self.policy;
        let budget = |p: &EffectivePolicy| RetryPolicy::new(&p.retries).budget();
        let accrual = |p: &EffectivePolicy| EffectiveCircuitBreaker {
            max_concurrent_requests: None,
            max_pending: None,
            ..p.circuit_breaker.clone()
        };
        let concurrency = |p: &EffectivePolicy| {
            (
                p.circuit_breaker.max_concurrent_requests,
                p.circuit_breaker.max_pending,
            )
        };
        Self {
            retry_budget: if budget(old) == budget(policy) {
                self.retry_budget.clone()
            } else {
                fresh.retry_budget
            },
            failure_accrual: if accrual(old) == accrual(policy) {
                self.failure_accrual.clone()
            } else {
                fresh.failure_accrual
            },
            concurrency: if concurrency(old) == concurrency(policy) {
                self.concurrency.clone()
            } else {
                fresh.concurrency
            },
            rate_limit: if old.rate_limit == policy.rate_limit {
                self.rate_limit.clone()
            } else {
                fresh.rate_limit
            },
            policy: policy.clone(),
        }
    }
}

/// The [`ServiceGuards`] of one service, brought up to date with each config version the
/// first time a request of that version asks for them. Requests keep the guards they got, so a
/// new version never takes a slot or a probe away from one in flight.
#[derive(Debug)]
pub struct GuardsCell {
    service: String,
    state: Mutex<(i64, ServiceGuards)>,
}

impl GuardsCell {
    /// Guards for `service` under the defaults, until a set says otherwise.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            state: Mutex::new((0, ServiceGuards::new(&DEFAULT_POLICY))),
        }
    }

    /// The guards for `set`: updated (see [`ServiceGuards::update`]) when `set` is of another
    /// version than the last one asked for.
    pub fn get(&self, set: &PolicySet) -> ServiceGuards {
        // A poisoned lock still holds a whole (version, guards) pair.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.0 != set.version() {
            let guards = state.1.update(set.policy(&self.service));
            *state = (set.version(), guards);
        }
        state.1.clone()
    }

    /// The guards as of the last version asked for, for metrics.
    pub fn current(&self) -> ServiceGuards {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
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

    #[tokio::test(start_paused = true)]
    async fn guards_keep_state_across_unrelated_changes() {
        let spec = |timeout: u64, consecutive: u32| ferrule_config::ServicePolicySpec {
            service: "user".into(),
            timeouts: Some(ferrule_config::Timeouts {
                request: Some(Duration::from_secs(timeout)),
                ..Default::default()
            }),
            circuit_breaker: Some(ferrule_config::CircuitBreaker {
                consecutive_failures: Some(consecutive),
                max_ejection_percent: Some(100),
                ..Default::default()
            }),
            rate_limit: Some(ferrule_config::RateLimit {
                requests_per_second: 1,
                burst: None,
            }),
            ..Default::default()
        };
        let guards = ServiceGuards::new(&spec(1, 1).effective());
        guards.failure_accrual.set_endpoints(["ep".to_string()]);
        guards.failure_accrual.try_acquire("ep").unwrap().failure();
        let limit = guards.rate_limit.as_ref().unwrap();
        limit.check(&ratelimit::RateKey::Global).unwrap();

        // Only the timeout changed: the ejection and the drained bucket carry over.
        let kept = guards.update(&spec(2, 1).effective());
        assert!(kept.failure_accrual.try_acquire("ep").is_none());
        assert!(Arc::ptr_eq(&kept.retry_budget, &guards.retry_budget));
        let limit = kept.rate_limit.as_ref().unwrap();
        assert!(limit.check(&ratelimit::RateKey::Global).is_err());

        // The breaker settings changed: breakers start over.
        let fresh = kept.update(&spec(2, 3).effective());
        assert!(fresh.failure_accrual.try_acquire("ep").is_some());
        assert!(fresh.rate_limit.is_some());
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
