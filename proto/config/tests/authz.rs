//! `AuthorizationPolicy`: parsing, validation (table tests, one per rule, each naming the field
//! and the reason) and property tests over random identity patterns and specs.

use ferrule_config::{
    AuthorizationPolicySpec, AuthzMode, ConfigError, DefaultPolicy, IdentityPattern, Kind,
    Resource, Spec,
};
use proptest::prelude::*;

mod common;

use common::{assert_refused, errors};

fn doc(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: ferrule.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

/// The field and reason of a document that does not parse.
fn parse_fail(text: &str) -> (String, String) {
    match Resource::parse_documents(text) {
        Err(ConfigError::Parse { field, reason, .. }) => (field, reason),
        other => panic!("expected a parse error, got {other:?}"),
    }
}

const FULL: &str = "  service: user
  mode: audit
  to:
    ports: [grpc]
    paths: [/admin]
    routes: [get-user]
  from:
    identities:
      - spiffe://cluster.local/ns/shop/sa/order
      - spiffe://cluster.local/ns/billing/*
      - \"*\"
    namespaces: [shop]
    unauthenticated: true
";

#[test]
fn a_full_policy_parses_and_round_trips() {
    let resources = Resource::parse_documents(&doc("shop", "user-callers", FULL)).unwrap();
    let [resource] = &resources[..] else {
        panic!("{resources:?}")
    };
    assert_eq!(resource.kind, Kind::AuthorizationPolicy);
    assert_eq!(resource.target_service().as_deref(), Some("user.shop"));
    let Spec::AuthorizationPolicy(spec) = &resource.spec else {
        panic!("{resource:?}")
    };
    assert_eq!(spec.effective_mode(), AuthzMode::Audit);
    let from = spec.from.as_ref().unwrap();
    assert_eq!(
        from.identities,
        [
            IdentityPattern::Exact("spiffe://cluster.local/ns/shop/sa/order".into()),
            "spiffe://cluster.local/ns/billing/*".parse().unwrap(),
            IdentityPattern::Any,
        ]
    );
    assert!(from.unauthenticated);
    assert_eq!(errors(&doc("shop", "user-callers", FULL)), []);
    // Stored as canonical JSON and read back the same.
    let back = Resource::from_parts(
        "AuthorizationPolicy",
        "shop",
        "user-callers",
        &resource.spec_json(),
    )
    .unwrap();
    assert_eq!(&back, resource);
    assert_eq!(
        Resource::parse_documents(&back.to_yaml()).unwrap(),
        resources
    );

    let default = doc("shop", "default", "  default: authenticated-only\n");
    let resources = Resource::parse_documents(&default).unwrap();
    let Spec::AuthorizationPolicy(spec) = &resources[0].spec else {
        panic!()
    };
    assert_eq!(spec.default, Some(DefaultPolicy::AuthenticatedOnly));
    assert_eq!(spec.effective_mode(), AuthzMode::Enforce);
    assert_eq!(resources[0].target_service(), None);
    assert_eq!(errors(&default), []);
}

#[test]
fn unknown_fields_and_bad_values_are_refused_at_parse_with_the_path() {
    for (spec, field, reason) in [
        (
            "  service: user\n  form: {}\n",
            "spec.form",
            "unknown field `form`",
        ),
        (
            "  service: user\n  from: {identity: [\"*\"]}\n",
            "spec.from.identity",
            "unknown field `identity`",
        ),
        (
            "  service: user\n  to: {port: [grpc]}\n",
            "spec.to.port",
            "unknown field `port`",
        ),
        (
            "  service: user\n  from: {identities: [\"spiffe://cluster.local/ns/shop\"]}\n",
            "spec.from.identities[0]",
            "not an identity pattern",
        ),
        (
            "  service: user\n  from: {identities: [ok, \"spiffe://td/ns/a/*/x\"]}\n",
            "spec.from.identities[0]",
            "does not start with \"spiffe://\"",
        ),
        (
            "  service: user\n  from: {identities: [\"spiffe://td/ns/a/sa/b\", \"spiffe://td/*\"]}\n",
            "spec.from.identities[1]",
            "a wildcard may only stand for the service account",
        ),
        (
            "  service: user\n  mode: dry-run\n  from: {}\n",
            "spec.mode",
            "unknown variant `dry-run`",
        ),
        (
            "  default: maybe\n",
            "spec.default",
            "unknown variant `maybe`",
        ),
    ] {
        let (f, r) = parse_fail(&doc("default", "p", spec));
        assert_eq!(f, field, "{spec}");
        assert!(r.contains(reason), "{spec}: {r:?} lacks {reason:?}");
    }
}

#[test]
fn validation_rules_name_the_field() {
    for (spec, field, reason) in [
        ("  service: User\n  from: {}\n", "spec.service", "service"),
        ("  service: user\n", "spec.from", "needs `from`"),
        (
            "  service: user\n  default: deny\n  from: {}\n",
            "spec.default",
            "only a namespace's default",
        ),
        ("  mode: audit\n", "spec.default", "needs `default`"),
        (
            "  default: deny\n  from: {}\n",
            "spec.from",
            "has no `to` or `from`",
        ),
        (
            "  default: allow\n  to: {paths: [/]}\n",
            "spec.to",
            "has no `to` or `from`",
        ),
        (
            "  service: user\n  to: {}\n  from: {}\n",
            "spec.to",
            "names no ports",
        ),
        (
            "  service: user\n  to: {paths: [admin]}\n  from: {}\n",
            "spec.to.paths[0]",
            "must start with '/'",
        ),
        (
            "  service: user\n  to: {ports: [GRPC]}\n  from: {}\n",
            "spec.to.ports[0]",
            "port name",
        ),
        (
            "  service: user\n  to: {routes: [a_b]}\n  from: {}\n",
            "spec.to.routes[0]",
            "route rule name",
        ),
        (
            "  service: user\n  from: {namespaces: [shop, \"\"]}\n",
            "spec.from.namespaces[1]",
            "namespace",
        ),
    ] {
        assert_refused(&doc("default", "p", spec), field, reason);
    }
}

#[test]
fn several_policies_per_service_but_one_default_per_namespace() {
    let two_for_user = format!(
        "{}---\n{}",
        doc(
            "shop",
            "a",
            "  service: user\n  from: {namespaces: [shop]}\n"
        ),
        doc(
            "shop",
            "b",
            "  service: user\n  to: {paths: [/admin]}\n  from: {}\n"
        ),
    );
    assert_eq!(errors(&two_for_user), []);

    let two_defaults = format!(
        "{}---\n{}---\n{}",
        doc("shop", "a", "  default: deny\n"),
        doc("billing", "a", "  default: deny\n"),
        doc("shop", "b", "  default: allow\n"),
    );
    let errs = errors(&two_defaults);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].0, "spec.default");
    assert!(
        errs[0]
            .1
            .contains("already has a default AuthorizationPolicy (AuthorizationPolicy/shop/a)"),
        "{errs:?}"
    );
}

fn label() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,8}[a-z0-9]"
}

proptest! {
    /// Any string either parses into a pattern that prints back as itself (and so reads back
    /// the same), or is refused with a reason naming it; never a panic.
    #[test]
    fn any_string_parses_or_is_refused(s in ".{0,80}") {
        match s.parse::<IdentityPattern>() {
            Ok(p) => prop_assert_eq!(p.to_string().parse::<IdentityPattern>().unwrap(), p),
            Err(e) => {
                let expected = format!("{s:?}");
                prop_assert!(e.to_string().contains(&expected));
            }
        }
    }

    /// A namespace pattern matches exactly the ids of its namespace and trust domain.
    #[test]
    fn namespace_patterns_match_their_namespace(
        td in label(), ns in label(), other in label(), sa in label(),
    ) {
        let pattern: IdentityPattern = format!("spiffe://{td}/ns/{ns}/*").parse().unwrap();
        let id = format!("spiffe://{td}/ns/{ns}/sa/{sa}");
        let elsewhere = format!("spiffe://{td}/ns/{other}/sa/{sa}");
        let longer = format!("{id}x");
        prop_assert!(pattern.matches(&id));
        prop_assert_eq!(pattern.matches(&elsewhere), other == ns);
        let exact: IdentityPattern = id.parse().unwrap();
        prop_assert!(exact.matches(&id));
        prop_assert!(!exact.matches(&longer));
    }

    /// Random specs from valid parts round-trip through the store's JSON unchanged.
    #[test]
    fn specs_round_trip_through_json(
        service in proptest::option::of(label()),
        audit in any::<bool>(),
        namespaces in proptest::collection::vec(label(), 0..3),
        paths in proptest::collection::vec("/[a-z]{0,6}", 0..3),
        unauthenticated in any::<bool>(),
    ) {
        let spec = AuthorizationPolicySpec {
            default: service.is_none().then_some(DefaultPolicy::Deny),
            service,
            mode: audit.then_some(AuthzMode::Audit),
            to: (!paths.is_empty()).then(|| ferrule_config::AuthzTo {
                paths,
                ..Default::default()
            }),
            from: Some(ferrule_config::AuthzFrom {
                identities: vec![IdentityPattern::Any],
                namespaces,
                unauthenticated,
            }),
        };
        let json = serde_json::to_string(&spec).unwrap();
        let back = Resource::from_parts("AuthorizationPolicy", "default", "p", &json).unwrap();
        prop_assert_eq!(back.spec, Spec::AuthorizationPolicy(spec));
    }
}
