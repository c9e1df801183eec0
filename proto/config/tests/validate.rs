//! Validation rules, one test each: every bad value is refused with the resource, the field's
//! path and a reason, and the valid neighbours of each bad value pass.

use std::collections::BTreeSet;

mod common;

use common::{assert_refused, assert_valid, errors, errors_with, parse};
use ferrule_config::{FieldError, Kind, Spec, validate};

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: ferrule.io/v1\nkind: ServicePolicy\nmetadata:\n  name: user\nspec:\n  service: user\n{spec}"
    )
}

fn route(rule: &str) -> String {
    format!(
        "apiVersion: ferrule.io/v1\nkind: HTTPRoute\nmetadata:\n  name: split\nspec:\n  service: user\n  rules:\n{rule}"
    )
}

#[test]
fn errors_display_one_line_each_with_resource_and_field() {
    let text = route(
        "    - matches: [{path: {type: Regex, value: \"/a([\"}}]\n      backends: [{service: user, weight: 0}]\n",
    );
    let err = validate(&parse(&text), None).unwrap_err();
    assert_eq!(
        err.0[1],
        FieldError {
            resource: "HTTPRoute/default/split".into(),
            field: "spec.rules[0].backends".into(),
            reason: "weights sum to 0".into(),
        }
    );
    let shown = err.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 2, "{shown}");
    assert!(
        lines[0].starts_with(
            "HTTPRoute/default/split: spec.rules[0].matches[0].path.value: invalid regex"
        ),
        "{shown}"
    );
    assert_eq!(
        lines[1],
        "HTTPRoute/default/split: spec.rules[0].backends: weights sum to 0"
    );
}

#[test]
fn metadata_names_are_dns_labels() {
    assert_valid(&policy(""));
    assert_refused(
        &policy("").replace("name: user", "name: User"),
        "metadata.name",
        "lowercase",
    );
    assert_refused(
        &policy("").replace("  name: user", "  name: user\n  namespace: my_ns"),
        "metadata.namespace",
        "my_ns",
    );
}

#[test]
fn service_names_are_valid() {
    assert_refused(
        &policy("").replace("service: user", "service: user.svc"),
        "spec.service",
        "user.svc",
    );
    assert_refused(
        &route("    - backends: [{service: User}]\n"),
        "spec.rules[0].backends[0].service",
        "User",
    );
    assert_refused(
        &route("    - backends: [{service: user, port: gRPC}]\n"),
        "spec.rules[0].backends[0].port",
        "port name",
    );
    // A backend may live in another namespace; the service a resource configures may not.
    assert_valid(&route("    - backends: [{service: user.billing}]\n"));
    assert_refused(
        &route("    - backends: [{service: user.Billing}]\n"),
        "spec.rules[0].backends[0].service",
        "namespace",
    );
}

#[test]
fn zero_durations_are_refused_where_meaningless() {
    for (yaml, field) in [
        ("  timeouts: {request: 0s}\n", "spec.timeouts.request"),
        ("  timeouts: {perTry: 0ms}\n", "spec.timeouts.perTry"),
        ("  timeouts: {idle: 0s}\n", "spec.timeouts.idle"),
        (
            "  retries: {budget: {window: 0s}}\n",
            "spec.retries.budget.window",
        ),
        (
            "  circuitBreaker: {baseEjectionTime: 0s}\n",
            "spec.circuitBreaker.baseEjectionTime",
        ),
        (
            "  circuitBreaker: {failureRate: {window: 0s}}\n",
            "spec.circuitBreaker.failureRate.window",
        ),
    ] {
        assert_refused(&policy(yaml), field, "longer than 0s");
        assert_valid(&policy(&yaml.replace("0s", "1s").replace("0ms", "1ms")));
    }
    assert_refused(
        &route("    - timeout: 0s\n"),
        "spec.rules[0].timeout",
        "longer than 0s",
    );
    assert_refused(
        &route("    - fault: {delay: {fixed: 0s}}\n"),
        "spec.rules[0].fault.delay.fixed",
        "longer than 0s",
    );
}

#[test]
fn per_try_timeout_fits_in_the_request_timeout() {
    assert_valid(&policy("  timeouts: {request: 1s, perTry: 1s}\n"));
    assert_refused(
        &policy("  timeouts: {request: 1s, perTry: 2s}\n"),
        "spec.timeouts.perTry",
        "2s is longer than the request timeout 1s",
    );
}

#[test]
fn max_attempts_is_1_to_10() {
    assert_valid(&policy("  retries: {maxAttempts: 1}\n"));
    assert_valid(&policy("  retries: {maxAttempts: 10}\n"));
    assert_refused(
        &policy("  retries: {maxAttempts: 0}\n"),
        "spec.retries.maxAttempts",
        "1..=10",
    );
    assert_refused(
        &route("    - retries: {maxAttempts: 11}\n"),
        "spec.rules[0].retries.maxAttempts",
        "11 is not in 1..=10",
    );
}

#[test]
fn fractions_are_0_to_1() {
    assert_valid(&policy(
        "  retries: {backoff: {jitter: 0}, budget: {ratio: 1}}\n",
    ));
    assert_refused(
        &policy("  retries: {backoff: {jitter: 1.5}}\n"),
        "spec.retries.backoff.jitter",
        "1.5",
    );
    assert_refused(
        &policy("  retries: {backoff: {jitter: -0.1}}\n"),
        "spec.retries.backoff.jitter",
        "-0.1",
    );
    assert_refused(
        &policy("  retries: {budget: {ratio: 1.2}}\n"),
        "spec.retries.budget.ratio",
        "1.2",
    );
    assert_valid(&policy("  circuitBreaker: {failureRate: {threshold: 1}}\n"));
    assert_refused(
        &policy("  circuitBreaker: {failureRate: {threshold: 0}}\n"),
        "spec.circuitBreaker.failureRate.threshold",
        "greater than 0",
    );
}

#[test]
fn percentages_are_0_to_100() {
    assert_valid(&policy("  circuitBreaker: {maxEjectionPercent: 100}\n"));
    assert_refused(
        &policy("  circuitBreaker: {maxEjectionPercent: 101}\n"),
        "spec.circuitBreaker.maxEjectionPercent",
        "101",
    );
    assert_valid(&route(
        "    - fault: {delay: {fixed: 1s, percent: 0}, abort: {status: 500, percent: 100}}\n",
    ));
    assert_refused(
        &route("    - fault: {delay: {fixed: 1s, percent: 100.5}}\n"),
        "spec.rules[0].fault.delay.percent",
        "100.5",
    );
    assert_refused(
        &route("    - fault: {abort: {status: 500, percent: -1}}\n"),
        "spec.rules[0].fault.abort.percent",
        "-1",
    );
}

#[test]
fn weights_are_0_to_10000_and_sum_above_0() {
    assert_valid(&route(
        "    - backends: [{service: user, weight: 10000}, {service: user-v2, weight: 0}]\n",
    ));
    assert_refused(
        &route("    - backends: [{service: user, weight: 1}, {service: user-v2, weight: 10001}]\n"),
        "spec.rules[0].backends[1].weight",
        "10001 is not in 0..=10000",
    );
    assert_refused(
        &route("    - backends: [{service: user, weight: 0}, {service: user-v2, weight: 0}]\n"),
        "spec.rules[0].backends",
        "weights sum to 0",
    );
    assert_refused(
        &route("    - backends: [{service: user}, {service: user}]\n"),
        "spec.rules[0].backends[1]",
        "listed twice",
    );
}

#[test]
fn regexes_compile() {
    let bad = "\"(unclosed\"";
    assert_refused(
        &route(&format!(
            "    - matches: [{{path: {{type: Regex, value: {bad}}}}}]\n"
        )),
        "spec.rules[0].matches[0].path.value",
        "invalid regex \"(unclosed\": unclosed group",
    );
    assert_refused(
        &route(&format!(
            "    - matches: [{{headers: [{{name: x-a, type: Regex, value: {bad}}}]}}]\n"
        )),
        "spec.rules[0].matches[0].headers[0].value",
        "invalid regex",
    );
    assert_refused(
        &route(&format!(
            "    - matches: [{{}}, {{queryParams: [{{name: q, type: Regex, value: {bad}}}]}}]\n"
        )),
        "spec.rules[0].matches[1].queryParams[0].value",
        "invalid regex",
    );
    // The same text is fine where it is matched exactly.
    assert_valid(&route(&format!(
        "    - matches: [{{headers: [{{name: x-a, value: {bad}}}]}}]\n"
    )));
}

#[test]
fn matches_are_well_formed() {
    assert_refused(
        &route("    - matches: [{path: {type: Exact, value: users}}]\n"),
        "spec.rules[0].matches[0].path.value",
        "must start with '/'",
    );
    assert_refused(
        &route("    - matches: [{method: get}]\n"),
        "spec.rules[0].matches[0].method",
        "not an HTTP method",
    );
    assert_refused(
        &route("    - matches: [{headers: [{name: \"bad header\", value: x}]}]\n"),
        "spec.rules[0].matches[0].headers[0].name",
        "not a header name",
    );
    assert_refused(
        &route("    - requestHeaders: {set: {\"x a\": b}}\n"),
        "spec.rules[0].requestHeaders.set.x a",
        "not a header name",
    );
    assert_refused(
        &route("    - responseHeaders: {remove: [\"x:y\"]}\n"),
        "spec.rules[0].responseHeaders.remove[0]",
        "not a header name",
    );
}

#[test]
fn status_codes_are_in_range() {
    assert_valid(&policy("  retries: {retryOn: {statusCodes: [100, 599]}}\n"));
    assert_refused(
        &policy("  retries: {retryOn: {statusCodes: [503, 600]}}\n"),
        "spec.retries.retryOn.statusCodes[1]",
        "600",
    );
    assert_valid(&route("    - fault: {abort: {status: 200}}\n"));
    assert_refused(
        &route("    - fault: {abort: {status: 199}}\n"),
        "spec.rules[0].fault.abort.status",
        "200..=599",
    );
}

#[test]
fn ordered_durations_and_limits() {
    assert_refused(
        &policy("  retries: {backoff: {base: 1s, max: 100ms}}\n"),
        "spec.retries.backoff.max",
        "shorter than base",
    );
    assert_refused(
        &policy("  circuitBreaker: {maxEjectionTime: 10s}\n"),
        "spec.circuitBreaker.maxEjectionTime",
        "shorter than baseEjectionTime 30s",
    );
    assert_refused(
        &policy("  circuitBreaker: {maxConcurrentRequests: 0}\n"),
        "spec.circuitBreaker.maxConcurrentRequests",
        "at least 1",
    );
    assert_refused(
        &policy("  rateLimit: {requestsPerSecond: 0}\n"),
        "spec.rateLimit.requestsPerSecond",
        "at least 1",
    );
    assert_refused(
        &policy("  rateLimit: {requestsPerSecond: 5, burst: 0}\n"),
        "spec.rateLimit.burst",
        "at least 1",
    );
    assert_refused(
        &policy("  opaquePorts: [5432, 0]\n"),
        "spec.opaquePorts[1]",
        "port 0",
    );
    assert_refused(
        &policy("  opaquePorts: [5432, 5432]\n"),
        "spec.opaquePorts[1]",
        "listed twice",
    );
}

#[test]
fn route_rules_exist_and_have_unique_names() {
    assert_refused(&route("    []\n"), "spec.rules", "at least one rule");
    assert_refused(
        &route("    - name: a\n    - name: a\n"),
        "spec.rules[1].name",
        "named twice",
    );
    assert_refused(&route("    - name: A\n"), "spec.rules[0].name", "rule name");
}

#[test]
fn duplicate_ids_in_a_batch() {
    let text = format!(
        "{}---\n{}",
        policy(""),
        policy("  loadBalancer: round-robin\n")
    );
    let errs = validate(&parse(&text), None).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].resource, "ServicePolicy/default/user");
    assert_eq!(errs[0].field, "metadata.name");
    assert!(errs[0].reason.contains("more than once"));
    // The same name in another namespace, or of another kind, is another resource.
    let other_ns = policy("").replace("name: user", "name: user\n  namespace: shop");
    let text = format!(
        "{}---\n{}",
        policy(""),
        other_ns.replace("service: user", "service: order")
    );
    assert_valid(&text);
    let route = route("    - {}\n").replace("name: split", "name: user");
    assert_valid(&format!("{}---\n{route}", policy("")));
}

#[test]
fn one_policy_and_one_route_per_service() {
    let other = policy("").replace("name: user", "name: user-2");
    let text = format!("{}---\n{other}", policy(""));
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].0, "spec.service");
    assert!(
        errs[0]
            .1
            .contains("already has a ServicePolicy (ServicePolicy/default/user)"),
        "{errs:?}"
    );
    let r = route("    - {}\n");
    let text = format!("{r}---\n{}", r.replace("name: split", "name: split-2"));
    assert_eq!(errors(&text).len(), 1);
}

#[test]
fn backends_must_be_known_services_when_the_caller_says_which_exist() {
    let text =
        route("    - backends: [{service: user, weight: 9}, {service: user-v2, weight: 1}]\n");
    let known: BTreeSet<String> = ["user".to_string()].into();
    let errs = errors_with(&text, Some(&known));
    assert_eq!(
        errs,
        [(
            "spec.rules[0].backends[1].service".to_string(),
            "service \"user-v2\" does not exist".to_string()
        )]
    );
    assert_valid(&text);
    let known: BTreeSet<String> = ["user".to_string(), "user-v2".to_string()].into();
    assert!(errors_with(&text, Some(&known)).is_empty());
}

#[test]
fn kind_must_match_the_spec() {
    let mut r = parse(&policy("")).remove(0);
    r.kind = Kind::HttpRoute;
    assert!(matches!(r.spec, Spec::ServicePolicy(_)));
    let errs = validate(&[r], None).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].field, "kind");
}

#[test]
fn every_error_of_a_batch_is_reported() {
    let text = format!(
        "{}---\n{}",
        policy("  retries: {maxAttempts: 0, backoff: {jitter: 2}}\n"),
        route("    - backends: [{service: user, weight: 0}]\n      timeout: 0s\n")
    );
    let errs = validate(&parse(&text), None).unwrap_err().0;
    let fields: Vec<(&str, &str)> = errs
        .iter()
        .map(|e| (e.resource.as_str(), e.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("ServicePolicy/default/user", "spec.retries.maxAttempts"),
            ("ServicePolicy/default/user", "spec.retries.backoff.jitter"),
            ("HTTPRoute/default/split", "spec.rules[0].backends"),
            ("HTTPRoute/default/split", "spec.rules[0].timeout"),
        ]
    );
}
