//! Validation of a batch of resources as it would be stored: what parsing cannot catch (ranges,
//! regexes, weights, names, references) and what only shows across resources (duplicates,
//! two policies or two routes for one service).
//!
//! Every problem is reported, not just the first, each with the resource, the field's path in
//! the document and the reason, so one `apply` shows everything to fix.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use ferrule_proto::names::{qualify, validate_label, validate_service, validate_service_name};

use crate::authz::AuthorizationPolicySpec;
use crate::policy::{CircuitBreaker, Retries, ServicePolicySpec};
use crate::resource::{Kind, Resource, Spec};
use crate::route::{
    HeaderModifier, HttpRouteSpec, MAX_BACKEND_WEIGHT, PathMatchType, RouteMatch, RouteRule,
    ValueMatch, ValueMatchType,
};

/// One problem with one field of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `HTTPRoute/default/split`.
    pub resource: String,
    /// `spec.rules[0].backends[1].weight`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.resource, self.field, self.reason)
    }
}

/// Everything wrong with a batch; never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    /// One line per error.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Validates one batch as it would be stored: each resource's ranges, regexes, weights and
/// names, plus batch rules (no duplicate ids; at most one `ServicePolicy` and one `HTTPRoute`
/// per service; at most one namespace-default `AuthorizationPolicy` per namespace). `known_services` lets the caller say which services exist (qualified names,
/// see `ferrule_proto::names`) so a route to an
/// unknown backend can be refused (`None` = don't check). A `Gateway`'s routes are not checked
/// against it: the gateway answers 503 for a service that is not there yet, and the edge is
/// often configured before the services behind it start.
///
/// The controller should pass the whole configuration that would result from a write (stored
/// resources with the applied ones replacing theirs), so conflicts with what is already
/// stored are found too.
pub fn validate(
    batch: &[Resource],
    known_services: Option<&BTreeSet<String>>,
) -> Result<(), ValidationErrors> {
    let mut errors = Vec::new();
    for resource in batch {
        let mut check = Check {
            resource: resource.id().to_string(),
            errors: &mut errors,
        };
        check_resource(&mut check, resource, known_services);
    }
    check_batch(&mut errors, batch);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(errors))
    }
}

/// Collects the errors of one resource.
struct Check<'a> {
    resource: String,
    errors: &'a mut Vec<FieldError>,
}

impl Check<'_> {
    fn fail(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(FieldError {
            resource: self.resource.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn name(&mut self, field: &str, what: &'static str, value: &str) {
        if let Err(e) = validate_label(what, value) {
            self.fail(field, e.to_string());
        }
    }

    /// The service a resource configures: a plain name, in the resource's own namespace.
    fn service(&mut self, field: &str, value: &str) {
        if let Err(e) = validate_service(value) {
            self.fail(field, e.to_string());
        }
    }

    /// A service a route sends to: `name`, or `name.namespace` for another namespace's.
    fn backend_service(&mut self, field: &str, value: &str) {
        if let Err(e) = validate_service_name(value) {
            self.fail(field, e.to_string());
        }
    }

    fn positive(&mut self, field: &str, value: Option<Duration>) {
        if value == Some(Duration::ZERO) {
            self.fail(field, "must be longer than 0s");
        }
    }

    fn fraction(&mut self, field: &str, value: Option<f64>) {
        if let Some(v) = value
            && !(0.0..=1.0).contains(&v)
        {
            self.fail(field, format!("{v} is not between 0 and 1"));
        }
    }

    fn percent(&mut self, field: &str, value: f64) {
        if !(0.0..=100.0).contains(&value) {
            self.fail(
                field,
                format!("{value} is not a percentage between 0 and 100"),
            );
        }
    }

    fn regex(&mut self, field: &str, pattern: &str) {
        if let Err(e) = regex::Regex::new(pattern) {
            // Syntax errors come as several lines drawing a caret under the pattern; the
            // last line says what is wrong, and errors here are one line each.
            let text = e.to_string();
            let why = text.lines().last().unwrap_or_default();
            let why = why.strip_prefix("error: ").unwrap_or(why);
            self.fail(field, format!("invalid regex {pattern:?}: {why}"));
        }
    }
}

fn check_resource(check: &mut Check, resource: &Resource, known: Option<&BTreeSet<String>>) {
    check.name("metadata.name", "name", &resource.metadata.name);
    check.name(
        "metadata.namespace",
        "namespace",
        &resource.metadata.namespace,
    );
    if resource.kind != resource.spec.kind() {
        check.fail(
            "kind",
            format!(
                "is {} but the spec is a {}",
                resource.kind,
                resource.spec.kind()
            ),
        );
    }
    match &resource.spec {
        Spec::ServicePolicy(spec) => check_policy(check, spec),
        Spec::HttpRoute(spec) => check_route(check, spec, &resource.metadata.namespace, known),
        Spec::Gateway(spec) => {
            let mut fail = |field: String, reason: String| check.fail(field, reason);
            spec.check("spec.", &mut fail);
            spec.check_resource(&mut fail);
        }
        Spec::AuthorizationPolicy(spec) => check_authz(check, spec),
    }
}

/// A service's policy names who may call (`from`) and optionally what (`to`); a namespace's
/// default names only `default` (and `mode`).
fn check_authz(check: &mut Check, spec: &AuthorizationPolicySpec) {
    match &spec.service {
        Some(service) => {
            check.service("spec.service", service);
            if spec.default.is_some() {
                check.fail(
                    "spec.default",
                    "only a namespace's default policy (one without spec.service) sets a default",
                );
            }
            if spec.from.is_none() {
                check.fail(
                    "spec.from",
                    "a service's policy needs `from` (the clients it allows); `from: {}` allows no one",
                );
            }
        }
        None => {
            if spec.default.is_none() {
                check.fail(
                    "spec.default",
                    "a policy without spec.service is its namespace's default and needs \
                     `default` (allow, authenticated-only or deny); set spec.service to guard \
                     one service",
                );
            }
            for (field, set) in [
                ("spec.to", spec.to.is_some()),
                ("spec.from", spec.from.is_some()),
            ] {
                if set {
                    check.fail(
                        field,
                        "a namespace's default policy has no `to` or `from`; set spec.service to \
                         guard one service with them",
                    );
                }
            }
        }
    }
    if let Some(to) = &spec.to {
        if to.ports.is_empty() && to.paths.is_empty() && to.routes.is_empty() {
            check.fail(
                "spec.to",
                "names no ports, paths or routes; leave `to` out to cover the whole service",
            );
        }
        for (i, port) in to.ports.iter().enumerate() {
            check.name(&format!("spec.to.ports[{i}]"), "port name", port);
        }
        for (i, path) in to.paths.iter().enumerate() {
            if !path.starts_with('/') {
                check.fail(
                    format!("spec.to.paths[{i}]"),
                    format!("path prefix {path:?} must start with '/'"),
                );
            }
        }
        for (i, route) in to.routes.iter().enumerate() {
            check.name(&format!("spec.to.routes[{i}]"), "route rule name", route);
        }
    }
    if let Some(from) = &spec.from {
        for (i, namespace) in from.namespaces.iter().enumerate() {
            check.name(
                &format!("spec.from.namespaces[{i}]"),
                "namespace",
                namespace,
            );
        }
    }
}

fn check_policy(check: &mut Check, spec: &ServicePolicySpec) {
    check.service("spec.service", &spec.service);
    if let Some(t) = &spec.timeouts {
        check.positive("spec.timeouts.request", t.request);
        check.positive("spec.timeouts.perTry", t.per_try);
        check.positive("spec.timeouts.idle", t.idle);
        if let (Some(request), Some(per_try)) = (t.request, t.per_try)
            && per_try > request
        {
            check.fail(
                "spec.timeouts.perTry",
                format!(
                    "{} is longer than the request timeout {}",
                    crate::duration::format(per_try),
                    crate::duration::format(request)
                ),
            );
        }
    }
    if let Some(r) = &spec.retries {
        check_retries(check, "spec.retries", r);
    }
    if let Some(b) = &spec.circuit_breaker {
        check_breaker(check, b);
    }
    if let Some(r) = &spec.rate_limit {
        if r.requests_per_second == 0 {
            check.fail("spec.rateLimit.requestsPerSecond", "must be at least 1");
        }
        if r.burst == Some(0) {
            check.fail("spec.rateLimit.burst", "must be at least 1");
        }
    }
    let mut seen = BTreeSet::new();
    for (i, port) in spec.opaque_ports.iter().enumerate() {
        let field = format!("spec.opaquePorts[{i}]");
        if *port == 0 {
            check.fail(field, "port 0 is not a port");
        } else if !seen.insert(port) {
            check.fail(field, format!("port {port} is listed twice"));
        }
    }
}

fn check_retries(check: &mut Check, at: &str, r: &Retries) {
    if let Some(n) = r.max_attempts
        && !(1..=10).contains(&n)
    {
        check.fail(format!("{at}.maxAttempts"), format!("{n} is not in 1..=10"));
    }
    if let Some(codes) = r.retry_on.as_ref().and_then(|on| on.status_codes.as_ref()) {
        for (i, code) in codes.iter().enumerate() {
            if !(100..=599).contains(code) {
                check.fail(
                    format!("{at}.retryOn.statusCodes[{i}]"),
                    format!("{code} is not an HTTP status (100..=599)"),
                );
            }
        }
    }
    if let Some(b) = &r.backoff {
        check.fraction(&format!("{at}.backoff.jitter"), b.jitter);
        if let (Some(base), Some(max)) = (b.base, b.max)
            && max < base
        {
            check.fail(
                format!("{at}.backoff.max"),
                format!(
                    "{} is shorter than base {}",
                    crate::duration::format(max),
                    crate::duration::format(base)
                ),
            );
        }
    }
    if let Some(b) = &r.budget {
        check.fraction(&format!("{at}.budget.ratio"), b.ratio);
        check.positive(&format!("{at}.budget.window"), b.window);
    }
}

fn check_breaker(check: &mut Check, b: &CircuitBreaker) {
    let at = "spec.circuitBreaker";
    if let Some(rate) = &b.failure_rate {
        if let Some(t) = rate.threshold
            && !(t > 0.0 && t <= 1.0)
        {
            check.fail(
                format!("{at}.failureRate.threshold"),
                format!("{t} is not a failed share greater than 0 and at most 1"),
            );
        }
        if rate.min_requests == Some(0) {
            check.fail(
                format!("{at}.failureRate.minRequests"),
                "must be at least 1",
            );
        }
        check.positive(&format!("{at}.failureRate.window"), rate.window);
    }
    check.positive(&format!("{at}.baseEjectionTime"), b.base_ejection_time);
    check.positive(&format!("{at}.maxEjectionTime"), b.max_ejection_time);
    let base = b
        .base_ejection_time
        .unwrap_or(crate::policy::DEFAULT_BASE_EJECTION_TIME);
    if let Some(max) = b.max_ejection_time
        && max < base
    {
        check.fail(
            format!("{at}.maxEjectionTime"),
            format!(
                "{} is shorter than baseEjectionTime {}",
                crate::duration::format(max),
                crate::duration::format(base)
            ),
        );
    }
    if let Some(p) = b.max_ejection_percent {
        check.percent(&format!("{at}.maxEjectionPercent"), f64::from(p));
    }
    if b.max_concurrent_requests == Some(0) {
        check.fail(format!("{at}.maxConcurrentRequests"), "must be at least 1");
    }
}

/// `known`: qualified names of the services that exist; the route's names are relative to
/// its `namespace`.
fn check_route(
    check: &mut Check,
    spec: &HttpRouteSpec,
    namespace: &str,
    known: Option<&BTreeSet<String>>,
) {
    check.service("spec.service", &spec.service);
    if spec.rules.is_empty() {
        check.fail("spec.rules", "a route needs at least one rule");
    }
    let mut names = BTreeSet::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if let Some(name) = &rule.name {
            check.name(&format!("{at}.name"), "rule name", name);
            if !names.insert(name) {
                check.fail(
                    format!("{at}.name"),
                    format!("rule {name:?} is named twice"),
                );
            }
        }
        check_rule(check, &at, rule, namespace, known);
    }
}

fn check_rule(
    check: &mut Check,
    at: &str,
    rule: &RouteRule,
    namespace: &str,
    known: Option<&BTreeSet<String>>,
) {
    for (i, m) in rule.matches.iter().enumerate() {
        check_match(check, &format!("{at}.matches[{i}]"), m);
    }
    let mut targets = BTreeSet::new();
    for (i, b) in rule.backends.iter().enumerate() {
        let field = format!("{at}.backends[{i}]");
        check.backend_service(&format!("{field}.service"), &b.service);
        if let Some(known) = known
            && validate_service_name(&b.service).is_ok()
            && !known.contains(&qualify(namespace, &b.service))
        {
            check.fail(
                format!("{field}.service"),
                format!("service {:?} does not exist", b.service),
            );
        }
        if let Some(port) = &b.port {
            check.name(&format!("{field}.port"), "port name", port);
        }
        if b.weight > MAX_BACKEND_WEIGHT {
            check.fail(
                format!("{field}.weight"),
                format!("{} is not in 0..={MAX_BACKEND_WEIGHT}", b.weight),
            );
        }
        if !targets.insert((&b.service, &b.port)) {
            check.fail(field, "this backend is listed twice in the rule");
        }
    }
    if !rule.backends.is_empty() && rule.backends.iter().all(|b| b.weight == 0) {
        check.fail(format!("{at}.backends"), "weights sum to 0");
    }
    check.positive(&format!("{at}.timeout"), rule.timeout);
    if let Some(r) = &rule.retries {
        check_retries(check, &format!("{at}.retries"), r);
    }
    if let Some(h) = &rule.request_headers {
        check_headers(check, &format!("{at}.requestHeaders"), h);
    }
    if let Some(h) = &rule.response_headers {
        check_headers(check, &format!("{at}.responseHeaders"), h);
    }
    if let Some(fault) = &rule.fault {
        if let Some(d) = &fault.delay {
            check.positive(&format!("{at}.fault.delay.fixed"), Some(d.fixed));
            check.percent(&format!("{at}.fault.delay.percent"), d.percent);
        }
        if let Some(a) = &fault.abort {
            if !(200..=599).contains(&a.status) {
                check.fail(
                    format!("{at}.fault.abort.status"),
                    format!("{} is not an HTTP status in 200..=599", a.status),
                );
            }
            check.percent(&format!("{at}.fault.abort.percent"), a.percent);
        }
    }
}

fn check_match(check: &mut Check, at: &str, m: &RouteMatch) {
    if let Some(path) = &m.path {
        let field = format!("{at}.path.value");
        match path.kind {
            PathMatchType::Regex => check.regex(&field, &path.value),
            PathMatchType::Exact | PathMatchType::Prefix => {
                if !path.value.starts_with('/') {
                    check.fail(field, format!("path {:?} must start with '/'", path.value));
                }
            }
        }
    }
    if let Some(method) = &m.method
        && (method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()))
    {
        check.fail(
            format!("{at}.method"),
            format!("{method:?} is not an HTTP method (upper-case letters, e.g. GET)"),
        );
    }
    for (i, h) in m.headers.iter().enumerate() {
        let field = format!("{at}.headers[{i}]");
        if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
            check.fail(
                format!("{field}.name"),
                format!("{:?} is not a header name", h.name),
            );
        }
        check_value_match(check, &field, h);
    }
    for (i, q) in m.query_params.iter().enumerate() {
        let field = format!("{at}.queryParams[{i}]");
        if q.name.is_empty() {
            check.fail(format!("{field}.name"), "is empty");
        }
        check_value_match(check, &field, q);
    }
}

fn check_value_match(check: &mut Check, at: &str, m: &ValueMatch) {
    if m.kind == ValueMatchType::Regex {
        check.regex(&format!("{at}.value"), &m.value);
    }
}

fn check_headers(check: &mut Check, at: &str, h: &HeaderModifier) {
    let maps = [("set", &h.set), ("add", &h.add)];
    for (which, map) in maps {
        for (name, value) in map {
            let field = format!("{at}.{which}.{name}");
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                check.fail(&field, format!("{name:?} is not a header name"));
            }
            if http::HeaderValue::from_str(value).is_err() {
                check.fail(&field, format!("{value:?} is not a header value"));
            }
        }
    }
    for (i, name) in h.remove.iter().enumerate() {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            check.fail(
                format!("{at}.remove[{i}]"),
                format!("{name:?} is not a header name"),
            );
        }
    }
}

/// Rules across resources: ids are unique, a service has at most one policy and one route
/// (two would leave the proxy guessing which applies), and a namespace at most one default
/// `AuthorizationPolicy`. A service may have several `AuthorizationPolicy`s: each allows.
fn check_batch(errors: &mut Vec<FieldError>, batch: &[Resource]) {
    let mut ids = BTreeSet::new();
    let mut by_service: BTreeMap<(Kind, String), String> = BTreeMap::new();
    for resource in batch {
        let id = resource.id();
        let name = id.to_string();
        if !ids.insert(id) {
            errors.push(FieldError {
                resource: name.clone(),
                field: "metadata.name".into(),
                reason: "appears more than once in the batch".into(),
            });
            continue;
        }
        if let Spec::AuthorizationPolicy(spec) = &resource.spec {
            if spec.service.is_none() {
                let key = (
                    resource.kind,
                    format!("namespace {}", resource.metadata.namespace),
                );
                if let Some(first) = by_service.get(&key) {
                    errors.push(FieldError {
                        resource: name,
                        field: "spec.default".into(),
                        reason: format!(
                            "namespace {:?} already has a default AuthorizationPolicy ({first}); \
                             merge them into one",
                            resource.metadata.namespace
                        ),
                    });
                } else {
                    by_service.insert(key, name);
                }
            }
            continue;
        }
        let Some(service) = resource.target_service() else {
            continue;
        };
        if let Some(first) = by_service.get(&(resource.kind, service.clone())) {
            errors.push(FieldError {
                resource: name,
                field: "spec.service".into(),
                reason: format!(
                    "service {service:?} already has a {} ({first}); merge them into one",
                    resource.kind
                ),
            });
        } else {
            by_service.insert((resource.kind, service), name);
        }
    }
}
