//! Authorization on the inbound side: may this client call this service, on this port, path
//! or route?
//!
//! The `AuthorizationPolicy` resources of a config version are compiled once, when the set is
//! built ([`ServiceAuthz`] per service, [`NamespaceDefault`] per namespace), so a decision
//! allocates nothing: with no policy and no namespace default it is two map lookups. The
//! decision ([`decide`]):
//!
//! 1. The service's policies that cover the request (`to`: port names, path prefixes,
//!    `HTTPRoute` rule names; a connection of opaque TCP is covered only by policies without
//!    paths or routes). If any enforced one covers it, the request is allowed when one of those
//!    allows its client, and refused otherwise. If only audited ones cover it, it is allowed,
//!    but reported as "would deny" when none of those allows its client.
//! 2. Nothing covers it: the namespace's default (`allow`, `authenticated-only`, `deny`), in
//!    the default's own mode.
//! 3. No default: allowed, as before policies existed.
//!
//! A client is the verified identity mutual TLS proved, or none (plaintext). [`Authorizer`]
//! follows the policy in force for one service, counts every denial in
//! `authz_decisions_total{target_service,decision,reason,mode}` (`decision` is `deny`, or
//! `would_deny` in audit mode) and logs each distinct client, reason and policy at info once
//! (per-request detail at debug).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use ferrule_config::{
    AuthorizationPolicySpec, AuthzMode, DefaultPolicy, IdentityPattern, Resource, Spec,
};
use ferrule_proxy_core::metrics::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;

use crate::PolicySet;
use crate::route::{PathPrefix, Routes};

/// Why a client was (or, in audit mode, would have been) refused: the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The client has no verified identity and the policy wants one.
    Unauthenticated,
    /// The client's identity is not among those the covering policies allow.
    IdentityNotAllowed,
    /// No policy covers the request and the namespace's default is `deny`.
    DefaultDeny,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Unauthenticated => "unauthenticated",
            DenyReason::IdentityNotAllowed => "identity_not_allowed",
            DenyReason::DefaultDeny => "default_deny",
        }
    }
}

/// A refusal (enforced or audited) and the policy that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: DenyReason,
    pub mode: AuthzMode,
    /// `AuthorizationPolicy/<namespace>/<name>` of the deciding policy.
    pub policy: Arc<str>,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.reason {
            DenyReason::Unauthenticated => "the client has no mesh identity (plaintext)",
            DenyReason::IdentityNotAllowed => "the client's identity is not allowed",
            DenyReason::DefaultDeny => "no policy allows it and the namespace default is deny",
        };
        write!(f, "{why} ({}, {})", self.reason.as_str(), self.policy)
    }
}

/// What is being decided: one HTTP request, or one connection of opaque TCP.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a, B> {
    /// The app port's name (`--app-port NAME=ADDR`), if it has one.
    pub port: Option<&'a str>,
    /// The request; `None` for a TCP connection.
    pub request: Option<&'a http::Request<B>>,
    /// The verified client identity; `None` for plaintext.
    pub client: Option<&'a str>,
}

/// One service's compiled policies.
#[derive(Debug, Clone, Default)]
pub struct ServiceAuthz {
    policies: Vec<Compiled>,
}

#[derive(Debug, Clone)]
struct Compiled {
    id: Arc<str>,
    mode: AuthzMode,
    ports: Vec<String>,
    paths: Vec<PathPrefix>,
    routes: Vec<String>,
    identities: Vec<IdentityPattern>,
    namespaces: Vec<String>,
    unauthenticated: bool,
}

impl Compiled {
    fn new(id: Arc<str>, spec: &AuthorizationPolicySpec) -> Self {
        let to = spec.to.clone().unwrap_or_default();
        let from = spec.from.clone().unwrap_or_default();
        Self {
            id,
            mode: spec.effective_mode(),
            ports: to.ports,
            paths: to.paths.iter().map(|p| PathPrefix::new(p)).collect(),
            routes: to.routes,
            identities: from.identities,
            namespaces: from.namespaces,
            unauthenticated: from.unauthenticated,
        }
    }

    fn covers<B>(&self, access: &Access<'_, B>, routes: Option<&Routes>) -> bool {
        if !self.ports.is_empty()
            && !access
                .port
                .is_some_and(|p| self.ports.iter().any(|x| x == p))
        {
            return false;
        }
        if !self.paths.is_empty() {
            let Some(req) = access.request else {
                return false;
            };
            if !self.paths.iter().any(|p| p.matches(req.uri().path())) {
                return false;
            }
        }
        if !self.routes.is_empty() {
            let rule = access
                .request
                .and_then(|req| routes.and_then(|r| r.find(req)));
            if !rule.is_some_and(|rule| self.routes.iter().any(|name| name == rule.label())) {
                return false;
            }
        }
        true
    }

    fn allows(&self, client: Option<&str>) -> bool {
        match client {
            None => self.unauthenticated,
            Some(id) => {
                self.identities.iter().any(|p| p.matches(id))
                    || namespace_of(id).is_some_and(|ns| self.namespaces.iter().any(|n| n == ns))
            }
        }
    }
}

/// The namespace of a SPIFFE id (`spiffe://td/ns/<namespace>/sa/sa`).
fn namespace_of(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let (_, path) = rest.split_once('/')?;
    let (namespace, _) = path.strip_prefix("ns/")?.split_once("/sa/")?;
    Some(namespace)
}

/// A namespace's default policy, compiled.
#[derive(Debug, Clone)]
pub struct NamespaceDefault {
    id: Arc<str>,
    default: DefaultPolicy,
    mode: AuthzMode,
}

/// Every `AuthorizationPolicy` of a config version, compiled.
#[derive(Debug, Clone, Default)]
pub struct Authorizations {
    /// By qualified service name.
    services: BTreeMap<String, ServiceAuthz>,
    /// By namespace.
    defaults: BTreeMap<String, NamespaceDefault>,
}

impl Authorizations {
    /// Compiles the policies among `resources` (validated already: one default per namespace).
    pub(crate) fn compile(resources: &[Resource]) -> Self {
        let mut this = Self::default();
        for resource in resources {
            let Spec::AuthorizationPolicy(spec) = &resource.spec else {
                continue;
            };
            let id: Arc<str> = resource.id().to_string().into();
            match (&spec.service, spec.default) {
                (Some(_), _) => {
                    let service = resource.target_service().unwrap_or_default();
                    this.services
                        .entry(service)
                        .or_default()
                        .policies
                        .push(Compiled::new(id, spec));
                }
                (None, Some(default)) => {
                    this.defaults.insert(
                        resource.metadata.namespace.clone(),
                        NamespaceDefault {
                            id,
                            default,
                            mode: spec.effective_mode(),
                        },
                    );
                }
                (None, None) => {}
            }
        }
        this
    }
}

/// Decides `access` to `service` (its qualified name) under `set`; `None` allows.
/// A proxy without a service (`service` empty) has nothing to guard and allows.
pub fn decide<B>(set: &PolicySet, service: &str, access: &Access<'_, B>) -> Option<Denial> {
    if service.is_empty() {
        return None;
    }
    let authz = &set.authz;
    let namespace = service
        .split_once('.')
        .map_or(ferrule_proto::names::DEFAULT_NAMESPACE, |(_, ns)| ns);
    let policies = authz
        .services
        .get(service)
        .map_or(&[][..], |s| &s.policies[..]);
    let default = authz.defaults.get(namespace);
    if policies.is_empty() && default.is_none() {
        return None;
    }
    let denied = |reason, mode, id: &Arc<str>| Denial {
        reason,
        mode,
        policy: id.clone(),
    };
    let client_reason = match access.client {
        None => DenyReason::Unauthenticated,
        Some(_) => DenyReason::IdentityNotAllowed,
    };
    let routes = set.routes(service);
    for mode in [AuthzMode::Enforce, AuthzMode::Audit] {
        let mut first_covering = None;
        for policy in policies.iter().filter(|p| p.mode == mode) {
            if !policy.covers(access, routes) {
                continue;
            }
            if policy.allows(access.client) {
                return None;
            }
            first_covering.get_or_insert(policy);
        }
        if let Some(policy) = first_covering {
            return Some(denied(client_reason, mode, &policy.id));
        }
    }
    let default = default?;
    match (default.default, access.client) {
        (DefaultPolicy::Allow, _) | (DefaultPolicy::AuthenticatedOnly, Some(_)) => None,
        (DefaultPolicy::AuthenticatedOnly, None) => Some(denied(
            DenyReason::Unauthenticated,
            default.mode,
            &default.id,
        )),
        (DefaultPolicy::Deny, _) => {
            Some(denied(DenyReason::DefaultDeny, default.mode, &default.id))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    target_service: String,
    decision: &'static str,
    reason: &'static str,
    mode: &'static str,
}

/// How many distinct (client, reason, policy) triples are remembered for logging once; when
/// full it starts over, so a flood of distinct clients is logged at most this often.
const LOGGED_CAP: usize = 4096;

/// A denial already logged at info: (client, reason, policy).
type Logged = (Option<Arc<str>>, DenyReason, Arc<str>);

/// The inbound side's authorization of one service, following the policy in force.
pub struct Authorizer {
    policies: watch::Receiver<Arc<PolicySet>>,
    service: Arc<str>,
    decisions: Family<DecisionLabels, Counter>,
    logged: Mutex<HashSet<Logged>>,
}

impl Authorizer {
    /// Registers `authz_decisions_total` in `metrics` and follows `policies` for `service`
    /// (its qualified name).
    pub fn new(
        policies: watch::Receiver<Arc<PolicySet>>,
        service: &str,
        metrics: &Metrics,
    ) -> Self {
        let decisions = Family::default();
        metrics.register(
            "authz_decisions",
            "Requests and connections an AuthorizationPolicy refused (decision=deny) or, in \
             audit mode, would have refused (decision=would_deny), by reason and mode",
            decisions.clone(),
        );
        Self {
            policies,
            service: service.into(),
            decisions,
            logged: Mutex::default(),
        }
    }

    /// Decides `access`: `Err` for an enforced refusal. An audited one is logged, counted and
    /// allowed.
    pub fn check<B>(&self, access: &Access<'_, B>) -> Result<(), Denial> {
        let denial = {
            let set = self.policies.borrow();
            decide(&set, &self.service, access)
        };
        let Some(denial) = denial else {
            return Ok(());
        };
        let decision = match denial.mode {
            AuthzMode::Enforce => "deny",
            AuthzMode::Audit => "would_deny",
        };
        self.decisions
            .get_or_create(&DecisionLabels {
                target_service: self.service.to_string(),
                decision,
                reason: denial.reason.as_str(),
                mode: denial.mode.as_str(),
            })
            .inc();
        let path = access.request.map(|r| r.uri().path());
        let client = access.client.unwrap_or("(plaintext)");
        if self.first_time(access.client, &denial) {
            tracing::info!(
                service = %self.service, client, path, port = access.port, decision,
                reason = denial.reason.as_str(), policy = %denial.policy,
                "authorization: {decision} (logged once per client, reason and policy)"
            );
        } else {
            tracing::debug!(
                service = %self.service, client, path, decision,
                reason = denial.reason.as_str(), policy = %denial.policy, "authorization"
            );
        }
        match denial.mode {
            AuthzMode::Enforce => Err(denial),
            AuthzMode::Audit => Ok(()),
        }
    }

    fn first_time(&self, client: Option<&str>, denial: &Denial) -> bool {
        let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
        if logged.len() >= LOGGED_CAP {
            logged.clear();
        }
        logged.insert((client.map(Arc::from), denial.reason, denial.policy.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";
    const ADMIN: &str = "spiffe://cluster.local/ns/ops/sa/admin";

    fn set(docs: &str) -> PolicySet {
        let resources = Resource::parse_documents(docs).unwrap();
        PolicySet::from_resources(1, resources).unwrap()
    }

    fn policy(namespace: &str, name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: ferrule.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
        )
    }

    fn get(path: &str) -> http::Request<()> {
        http::Request::get(path).body(()).unwrap()
    }

    /// The reason label of the decision, "allow" when allowed.
    fn verdict(
        set: &PolicySet,
        service: &str,
        port: Option<&str>,
        path: Option<&str>,
        client: Option<&str>,
    ) -> String {
        let req = path.map(get);
        let access = Access {
            port,
            request: req.as_ref(),
            client,
        };
        match decide(set, service, &access) {
            None => "allow".into(),
            Some(d) => format!("{}/{}", d.reason.as_str(), d.mode.as_str()),
        }
    }

    #[test]
    fn no_policy_and_no_default_allows_everyone() {
        let set = set(&policy("ops", "d", "  default: deny\n"));
        assert_eq!(verdict(&set, "user.shop", None, Some("/"), None), "allow");
        assert_eq!(verdict(&set, "user", None, None, Some(ADMIN)), "allow");
        assert_eq!(
            verdict(&set, "user.ops", None, None, Some(ADMIN)),
            "default_deny/enforce"
        );
    }

    #[test]
    fn identities_namespaces_any_and_unauthenticated() {
        let set = set(&[
            policy("shop", "exact", "  service: user\n  from: {identities: [\"spiffe://cluster.local/ns/shop/sa/order\"]}\n"),
            policy("shop", "ns", "  service: cart\n  from: {identities: [\"spiffe://cluster.local/ns/ops/*\"]}\n"),
            policy("shop", "any", "  service: pay\n  from: {identities: [\"*\"]}\n"),
            policy("shop", "nsl", "  service: web\n  from: {namespaces: [shop], unauthenticated: true}\n"),
        ].concat());
        let v = |service, client| verdict(&set, service, None, Some("/"), client);
        assert_eq!(v("user.shop", Some(ORDER)), "allow");
        assert_eq!(v("user.shop", Some(ADMIN)), "identity_not_allowed/enforce");
        assert_eq!(v("user.shop", None), "unauthenticated/enforce");
        assert_eq!(v("cart.shop", Some(ADMIN)), "allow");
        assert_eq!(v("cart.shop", Some(ORDER)), "identity_not_allowed/enforce");
        assert_eq!(v("pay.shop", Some(ADMIN)), "allow");
        assert_eq!(v("pay.shop", None), "unauthenticated/enforce");
        assert_eq!(v("web.shop", Some(ORDER)), "allow");
        assert_eq!(v("web.shop", None), "allow");
        assert_eq!(v("web.shop", Some(ADMIN)), "identity_not_allowed/enforce");
    }

    #[test]
    fn narrowed_policies_cover_only_their_ports_and_paths() {
        let set = set(&[
            policy("default", "admin", "  service: user\n  to: {paths: [/admin]}\n  from: {identities: [\"spiffe://cluster.local/ns/ops/sa/admin\"]}\n"),
            policy("default", "grpc", "  service: user\n  to: {ports: [grpc]}\n  from: {}\n"),
        ].concat());
        let v = |port, path, client| verdict(&set, "user", port, path, client);
        assert_eq!(v(None, Some("/admin/x"), Some(ADMIN)), "allow");
        assert_eq!(
            v(None, Some("/admin"), Some(ORDER)),
            "identity_not_allowed/enforce"
        );
        assert_eq!(v(None, Some("/administrator"), Some(ORDER)), "allow");
        assert_eq!(v(None, Some("/public"), None), "allow");
        // A connection of opaque TCP is never covered by a policy of paths.
        assert_eq!(v(None, None, Some(ORDER)), "allow");
        assert_eq!(
            v(Some("grpc"), None, Some(ADMIN)),
            "identity_not_allowed/enforce"
        );
        assert_eq!(v(Some("http"), Some("/x"), Some(ADMIN)), "allow");
        // On a port both cover, either may allow.
        assert_eq!(v(Some("grpc"), Some("/admin"), Some(ADMIN)), "allow");
    }

    #[test]
    fn routes_are_the_services_http_route_rules() {
        let route = "---\napiVersion: ferrule.io/v1\nkind: HTTPRoute\nmetadata: {name: user}\nspec:\n  service: user\n  rules:\n    - name: writes\n      matches: [{method: POST}]\n      backends: [{service: user}]\n";
        let set = set(&[
            route.to_string(),
            policy("default", "w", "  service: user\n  to: {routes: [writes]}\n  from: {identities: [\"spiffe://cluster.local/ns/ops/sa/admin\"]}\n"),
        ].concat());
        let post = http::Request::post("/users").body(()).unwrap();
        let access = |client| Access {
            port: None,
            request: Some(&post),
            client,
        };
        assert!(decide(&set, "user", &access(Some(ADMIN))).is_none());
        assert_eq!(
            decide(&set, "user", &access(Some(ORDER))).unwrap().reason,
            DenyReason::IdentityNotAllowed
        );
        assert_eq!(
            verdict(&set, "user", None, Some("/users"), Some(ORDER)),
            "allow"
        );
    }

    #[test]
    fn defaults_apply_to_what_no_policy_covers() {
        let set = set(&[
            policy("shop", "default", "  default: authenticated-only\n"),
            policy(
                "shop",
                "admin",
                "  service: user\n  to: {paths: [/admin]}\n  from: {namespaces: [ops]}\n",
            ),
            policy("ops", "default", "  default: deny\n  mode: audit\n"),
            policy("dev", "default", "  default: allow\n"),
        ]
        .concat());
        let v = |service, path, client| verdict(&set, service, None, Some(path), client);
        assert_eq!(v("user.shop", "/x", Some(ORDER)), "allow");
        assert_eq!(v("user.shop", "/x", None), "unauthenticated/enforce");
        assert_eq!(
            v("user.shop", "/admin", Some(ORDER)),
            "identity_not_allowed/enforce"
        );
        assert_eq!(v("user.shop", "/admin", Some(ADMIN)), "allow");
        assert_eq!(v("user.ops", "/", Some(ADMIN)), "default_deny/audit");
        assert_eq!(v("user.dev", "/", None), "allow");
    }

    #[test]
    fn enforced_policies_decide_before_audited_ones() {
        let set = set(&[
            policy(
                "default",
                "trial",
                "  service: user\n  mode: audit\n  from: {namespaces: [shop]}\n",
            ),
            policy(
                "default",
                "live",
                "  service: cart\n  from: {namespaces: [shop]}\n",
            ),
            policy(
                "default",
                "trial",
                "  service: cart\n  mode: audit\n  from: {namespaces: [ops]}\n",
            )
            .replace("name: trial", "name: trial2"),
        ]
        .concat());
        let v = |service, client| verdict(&set, service, None, Some("/"), client);
        assert_eq!(v("user", Some(ORDER)), "allow");
        assert_eq!(v("user", Some(ADMIN)), "identity_not_allowed/audit");
        assert_eq!(v("user", None), "unauthenticated/audit");
        // An audited policy never opens what an enforced one closes.
        assert_eq!(v("cart", Some(ADMIN)), "identity_not_allowed/enforce");
        assert_eq!(v("cart", Some(ORDER)), "allow");
    }

    #[test]
    fn authorizer_counts_denials_and_lets_audits_through() {
        let (tx, rx) = watch::channel(Arc::new(set(&policy(
            "default",
            "p",
            "  service: user\n  mode: audit\n  from: {}\n",
        ))));
        let metrics = Metrics::new();
        let authz = Authorizer::new(rx, "user", &metrics);
        let req = get("/");
        let access = Access {
            port: None,
            request: Some(&req),
            client: Some(ORDER),
        };
        assert!(authz.check(&access).is_ok());
        assert!(authz.check(&access).is_ok());
        tx.send_replace(Arc::new(set(&policy(
            "default",
            "p",
            "  service: user\n  from: {}\n",
        ))));
        let denial = authz.check(&access).unwrap_err();
        assert_eq!(denial.policy.as_ref(), "AuthorizationPolicy/default/p");
        assert!(
            denial.to_string().contains("identity_not_allowed"),
            "{denial}"
        );
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(r#"authz_decisions_total{target_service="user",decision="would_deny",reason="identity_not_allowed",mode="audit"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"authz_decisions_total{target_service="user",decision="deny",reason="identity_not_allowed",mode="enforce"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn spiffe_namespaces() {
        assert_eq!(namespace_of(ORDER), Some("shop"));
        assert_eq!(namespace_of("spiffe://td/ns/a"), None);
        assert_eq!(namespace_of("order"), None);
    }
}
