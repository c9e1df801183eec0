//! Reading documents: YAML and JSON, multi-document indexes, strictness (unknown fields,
//! bad durations, gRPC codes, kinds, apiVersion) with field paths, and the round trip through
//! the store's form (`spec_json` → `from_parts`).

use std::time::Duration;

use ferrule_config::{ConfigError, GrpcCode, Kind, LoadBalancer, Resource, Spec, validate};

const POLICY: &str = "\
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata:
  name: user
spec:
  service: user
  timeouts:
    request: 2s
    perTry: 250ms
  retries:
    retryOn:
      grpcCodes: [UNAVAILABLE, 4]
  loadBalancer: round-robin
";

const ROUTE: &str = "\
apiVersion: ferrule.io/v1
kind: HTTPRoute
metadata:
  name: split
  namespace: shop
spec:
  service: user
  rules:
    - backends:
        - service: user
          weight: 90
        - service: user-v2
          weight: 10
";

fn parse_err(text: &str) -> ConfigError {
    Resource::parse_documents(text).expect_err("should be refused")
}

/// The (document, field, reason) of a parse error.
fn parse_fail(text: &str) -> (usize, String, String) {
    match parse_err(text) {
        ConfigError::Parse {
            document,
            field,
            reason,
        } => (document, field, reason),
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn yaml_documents_read_with_defaults() {
    let text = format!("{POLICY}---\n{ROUTE}");
    let resources = Resource::parse_documents(&text).unwrap();
    assert_eq!(resources.len(), 2);
    let policy = &resources[0];
    assert_eq!(policy.kind, Kind::ServicePolicy);
    assert_eq!(policy.metadata.namespace, "default");
    assert_eq!(policy.id().to_string(), "ServicePolicy/default/user");
    let Spec::ServicePolicy(spec) = &policy.spec else {
        panic!("not a policy: {policy:?}")
    };
    let eff = spec.effective();
    assert_eq!(eff.request_timeout, Some(Duration::from_secs(2)));
    assert_eq!(eff.per_try_timeout, Some(Duration::from_millis(250)));
    assert_eq!(eff.load_balancer, LoadBalancer::RoundRobin);
    assert_eq!(
        eff.retries.grpc_codes,
        [GrpcCode::Unavailable, GrpcCode::DeadlineExceeded]
    );
    assert_eq!(eff.retries.max_attempts, 3);
    assert_eq!(resources[1].id().to_string(), "HTTPRoute/shop/split");
    validate(&resources, None).unwrap();
}

#[test]
fn round_trip_through_the_store_form() {
    for text in [POLICY, ROUTE] {
        let r = Resource::parse_documents(text).unwrap().remove(0);
        let json = r.spec_json();
        let back = Resource::from_parts(
            r.kind.as_str(),
            &r.metadata.namespace,
            &r.metadata.name,
            &json,
        )
        .unwrap();
        assert_eq!(back, r);
        assert_eq!(back.spec_json(), json, "spec JSON is canonical");
        assert_eq!(
            Resource::parse_documents(&r.to_yaml()).unwrap(),
            std::slice::from_ref(&r)
        );
    }
    let r = Resource::parse_documents(POLICY).unwrap().remove(0);
    assert_eq!(
        r.spec_json(),
        r#"{"service":"user","timeouts":{"request":"2s","perTry":"250ms"},"retries":{"retryOn":{"grpcCodes":["UNAVAILABLE","DEADLINE_EXCEEDED"]}},"loadBalancer":"round-robin"}"#
    );
    let yaml = r.to_yaml();
    assert!(
        yaml.starts_with("apiVersion: ferrule.io/v1\nkind: ServicePolicy\n"),
        "{yaml}"
    );
}

#[test]
fn from_parts_is_strict_and_names_the_resource() {
    let err = Resource::from_parts(
        "servicepolicies",
        "default",
        "user",
        r#"{"service":"user","retires":{}}"#,
    )
    .unwrap_err();
    let ConfigError::Stored {
        resource,
        field,
        reason,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(resource, "ServicePolicy/default/user");
    assert_eq!(field, "spec.retires");
    assert!(reason.contains("unknown field `retires`"), "{reason}");
    assert!(Resource::from_parts("HTTPRoute", "default", "r", "{} {}").is_err());
    let err = Resource::from_parts("AuthorizationPolicy", "default", "a", r#"{"servise":"x"}"#)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("stored AuthorizationPolicy/default/a: spec.servise: unknown field"),
        "{err}"
    );
    let err = Resource::from_parts("Gateway", "default", "g", "{}").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("stored Gateway/default/g: spec: missing field `routes`"),
        "{err}"
    );
}

#[test]
fn json_input_single_array_and_stream() {
    let json = r#"{"apiVersion":"ferrule.io/v1","kind":"ServicePolicy","metadata":{"name":"a"},"spec":{"service":"a"}}"#;
    assert_eq!(Resource::parse_documents(json).unwrap().len(), 1);
    assert_eq!(
        Resource::parse_documents(&format!("[{json},{json}]"))
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        Resource::parse_documents(&format!("{json}\n{json}"))
            .unwrap()
            .len(),
        2
    );
    let flow_yaml =
        "{apiVersion: ferrule.io/v1, kind: ServicePolicy, metadata: {name: a}, spec: {service: a}}";
    assert_eq!(
        Resource::parse_documents(flow_yaml).unwrap(),
        Resource::parse_documents(json).unwrap()
    );
    let (_, _, reason) = parse_fail(r#"{"apiVersion": "ferrule.io/v1" "kind": 1}"#);
    assert!(reason.contains("expected `,` or `}` at line 1"), "{reason}");
    let bad = json.replace(r#""service":"a""#, r#""service":"a","rateLimit":{"rps":1}"#);
    let (document, field, reason) = parse_fail(&format!("[{json},{bad}]"));
    assert_eq!((document, field.as_str()), (2, "spec.rateLimit.rps"));
    assert!(reason.contains("unknown field `rps`"), "{reason}");
}

#[test]
fn unknown_field_names_document_and_path() {
    let bad = POLICY.replace("  retries:\n", "  retries:\n    maxAttempt: 3\n");
    let text = format!("{ROUTE}---\n{bad}");
    let err = parse_err(&text);
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "document 2: spec.retries.maxAttempt: unknown field `maxAttempt`, expected one of"
        ),
        "{msg}"
    );

    let (_, field, _) = parse_fail(&ROUTE.replace("weight: 10", "weight: 10\n          wieght: 1"));
    assert_eq!(field, "spec.rules[0].backends[1].wieght");

    let (_, field, _) = parse_fail(&POLICY.replace("metadata:\n", "metadata:\n  labels: {}\n"));
    assert_eq!(field, "metadata.labels");

    let (_, field, _) = parse_fail(&format!("{POLICY}status: {{}}\n"));
    assert_eq!(field, "status");
}

#[test]
fn empty_documents_are_skipped_but_counted() {
    let text = format!(
        "---\n{POLICY}---\n---\n{}",
        ROUTE.replace("weight: 90", "weight: -1")
    );
    let (document, field, _) = parse_fail(&text);
    assert_eq!(document, 3);
    assert_eq!(field, "spec.rules[0].backends[0].weight");
    assert!(Resource::parse_documents("").unwrap().is_empty());
}

#[test]
fn negative_and_unitless_durations_are_parse_errors() {
    let (document, field, reason) = parse_fail(&POLICY.replace("request: 2s", "request: -1s"));
    assert_eq!((document, field.as_str()), (1, "spec.timeouts.request"));
    assert!(reason.contains("\"-1s\""), "{reason}");
    let (_, field, _) = parse_fail(&POLICY.replace("perTry: 250ms", "perTry: 250"));
    assert_eq!(field, "spec.timeouts.perTry");
}

#[test]
fn grpc_codes_must_be_names_or_0_to_16() {
    let (_, field, reason) = parse_fail(&POLICY.replace("[UNAVAILABLE, 4]", "[UNAVAILABLE, BUSY]"));
    assert_eq!(field, "spec.retries.retryOn.grpcCodes[1]");
    assert!(reason.contains("BUSY"), "{reason}");
    let (_, field, _) = parse_fail(&POLICY.replace("[UNAVAILABLE, 4]", "[17]"));
    assert_eq!(field, "spec.retries.retryOn.grpcCodes[0]");
}

#[test]
fn api_version_and_kind_are_checked() {
    let err = parse_err(&POLICY.replace("ferrule.io/v1", "ferrule.io/v2"));
    assert!(
        matches!(&err, ConfigError::BadApiVersion { document: 1, found } if found == "ferrule.io/v2")
    );
    assert!(err.to_string().contains("use \"ferrule.io/v1\""), "{err}");

    let (_, field, reason) =
        parse_fail(&POLICY.replace("kind: ServicePolicy", "kind: AuthorizationPolicy"));
    assert!(field.starts_with("spec."), "{field}");
    assert!(
        reason.contains("unknown field"),
        "a policy's fields are not an AuthorizationPolicy's: {reason}"
    );
    let (_, field, reason) = parse_fail(&POLICY.replace("kind: ServicePolicy", "kind: Gateway"));
    assert!(field.starts_with("spec."), "{field}");
    assert!(
        reason.contains("unknown field") && reason.contains("routes"),
        "a policy's fields are not a Gateway's: {reason}"
    );
    let err = parse_err(&POLICY.replace("kind: ServicePolicy", "kind: Policy"));
    assert!(matches!(err, ConfigError::UnknownKind { .. }), "{err:?}");
    let (_, _, reason) = parse_fail(&POLICY.replace("kind: ServicePolicy\n", ""));
    assert!(reason.contains("missing field `kind`"), "{reason}");
}

#[test]
fn kind_names_for_the_cli() {
    for (text, kind) in [
        ("ServicePolicy", Kind::ServicePolicy),
        ("servicepolicy", Kind::ServicePolicy),
        ("servicepolicies", Kind::ServicePolicy),
        ("HTTPRoute", Kind::HttpRoute),
        ("httproute", Kind::HttpRoute),
        ("httproutes", Kind::HttpRoute),
        ("Gateway", Kind::Gateway),
        ("gateways", Kind::Gateway),
        ("AuthorizationPolicy", Kind::AuthorizationPolicy),
        ("authorizationpolicies", Kind::AuthorizationPolicy),
        ("authz", Kind::AuthorizationPolicy),
    ] {
        assert_eq!(text.parse::<Kind>().unwrap(), kind);
    }
    assert_eq!(Kind::HttpRoute.to_string(), "HTTPRoute");
    assert!(matches!(
        "pods".parse::<Kind>(),
        Err(ConfigError::UnknownKind { .. })
    ));
}

#[test]
fn a_document_must_be_a_mapping() {
    let (document, field, reason) = parse_fail(&format!("{POLICY}---\njust text\n"));
    assert_eq!((document, field.as_str()), (2, ""));
    assert!(reason.contains("expected a resource document"), "{reason}");
}

#[test]
fn resource_deserializes_as_strictly_from_serde() {
    let r: Resource = serde_yaml::from_str(POLICY).unwrap();
    assert_eq!(r, Resource::parse_documents(POLICY).unwrap()[0]);
    let json = serde_json::to_string(&r).unwrap();
    assert!(
        json.starts_with(r#"{"apiVersion":"ferrule.io/v1","kind":"ServicePolicy""#),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<Resource>(&json).unwrap(), r);
    let err = serde_yaml::from_str::<Resource>(&POLICY.replace("perTry", "pertry")).unwrap_err();
    assert!(
        err.to_string()
            .contains("spec.timeouts.pertry: unknown field"),
        "{err}"
    );
}
