//! `Gateway`: the gateway's file and the `Gateway` resource are one model. The file format as
//! documented (docs/gateway.md) parses unchanged; every rule is refused with the field's path,
//! from the top of the file or from `spec.` in a resource; a resource refuses what only a
//! file may hold; and a spec survives the store's round trip.

use std::path::Path;
use std::time::Duration;

use ferrule_config::{
    DEFAULT_GATEWAY_LISTEN, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_SUBJECT_HEADER, GatewayFileError,
    GatewaySpec, KeySource, Kind, RateLimitKey, Resource, Spec, ValidationErrors, validate,
};

const GATEWAY_DOC: &str = include_str!("../../../docs/gateway.md");

/// The example under "The config file" in docs/gateway.md: the file's contract.
fn documented_file() -> &'static str {
    let after = GATEWAY_DOC
        .split("## The config file")
        .nth(1)
        .expect("docs/gateway.md has a \"The config file\" section");
    after
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the section has a yaml block")
}

/// One public route: the smallest valid file.
const ROUTE: &str = "routes: [{name: all, pathPrefix: /, service: web, public: true}]";

fn file_errors(text: &str) -> Vec<GatewayFileError> {
    match GatewaySpec::parse_file(text) {
        Ok(_) => Vec::new(),
        Err(e) => e.0,
    }
}

fn resource(spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!("apiVersion: ferrule.io/v1\nkind: Gateway\nmetadata:\n  name: edge\nspec:\n{spec}")
}

#[test]
fn the_documented_file_parses_unchanged() {
    let spec = GatewaySpec::parse_file(documented_file()).unwrap();
    assert_eq!(spec.listen(), "127.0.0.1:8000".parse().unwrap());
    assert_eq!(spec.max_request_bytes(), 1_048_576);
    let cors = spec.cors.as_ref().unwrap();
    assert_eq!(cors.max_age, Some(Duration::from_secs(600)));
    assert_eq!(cors.allow_methods.len(), 5);
    let jwt = spec.jwt.as_ref().unwrap();
    assert_eq!(jwt.subject_header(), "x-user-id");
    assert_eq!(
        jwt.providers[0].key_source(),
        Some(("hs256SecretEnv", KeySource::Hs256Env("USER_JWT_SECRET")))
    );
    let api = &spec.rate_limits["api"];
    assert_eq!(
        (api.requests_per_second, api.burst(), api.key()),
        (10, 10, RateLimitKey::ClientIp)
    );
    assert_eq!(spec.routes.len(), 4);
    assert!(spec.routes[0].public);
    assert_eq!(spec.routes[1].rewrite_prefix.as_deref(), Some("/users"));
    assert_eq!(spec.routes[2].rate_limit.as_deref(), Some("api"));
    assert!(spec.routes[3].grpc && !spec.routes[2].grpc);
    assert_eq!(
        spec.services().into_iter().collect::<Vec<_>>(),
        ["order", "user"]
    );
}

#[test]
fn defaults() {
    let spec = GatewaySpec::parse_file(ROUTE).unwrap();
    assert_eq!(spec.listen(), DEFAULT_GATEWAY_LISTEN);
    assert_eq!(DEFAULT_GATEWAY_LISTEN, "0.0.0.0:8000".parse().unwrap());
    assert_eq!(spec.max_request_bytes(), DEFAULT_MAX_REQUEST_BYTES);
    assert!(spec.cors.is_none() && spec.jwt.is_none() && spec.rate_limits.is_empty());
    let spec = GatewaySpec::parse_file(
        "jwt: {providers: [{name: a, hs256SecretFile: s}]}\nrateLimits: {x: {requestsPerSecond: 3}}\nroutes: [{name: all, pathPrefix: /, service: web}]",
    )
    .unwrap();
    assert_eq!(spec.jwt.unwrap().subject_header(), DEFAULT_SUBJECT_HEADER);
    assert_eq!(spec.rate_limits["x"].burst(), 3);
    assert_eq!(spec.rate_limits["x"].key(), RateLimitKey::Global);
}

#[test]
fn every_key_source_is_read() {
    for (field, value, want) in [
        ("hs256SecretEnv", "S", KeySource::Hs256Env("S")),
        (
            "hs256SecretFile",
            "s.txt",
            KeySource::Hs256File(Path::new("s.txt")),
        ),
        (
            "rsaPublicKeyFile",
            "rsa.pem",
            KeySource::RsaPem(Path::new("rsa.pem")),
        ),
        (
            "ecPublicKeyFile",
            "/k/ec.pem",
            KeySource::EcPem(Path::new("/k/ec.pem")),
        ),
        (
            "jwksFile",
            "keys.json",
            KeySource::Jwks(Path::new("keys.json")),
        ),
    ] {
        let text = format!(
            "jwt: {{providers: [{{name: a, {field}: {value}}}]}}\nroutes: [{{name: all, pathPrefix: /, service: web}}]"
        );
        let spec = GatewaySpec::parse_file(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            spec.jwt.unwrap().providers[0].key_source(),
            Some((field, want))
        );
    }
}

/// Every rule of the file, one case each: (file, field named, words of the reason).
fn bad_files() -> Vec<(String, &'static str, &'static str)> {
    let with = |section: &str| format!("{section}\n{ROUTE}");
    vec![
        (with("listen: nowhere"), "listen", "invalid socket address"),
        (with("maxRequestBytes: 0"), "maxRequestBytes", "at least 1"),
        (with("maxRequestBytes: -1"), "maxRequestBytes", "expected u64"),
        (with("colour: blue"), "colour", "unknown field `colour`"),
        ("listen: 127.0.0.1:1".into(), "", "missing field `routes`"),
        ("routes: []".into(), "routes", "at least one"),
        (
            "routes: [{name: a, pathPrefix: /, service: web, public: true, extra: 1}]".into(),
            "routes[0].extra",
            "unknown field `extra`",
        ),
        (
            "routes: [{name: a, pathPrefix: /, public: true}]".into(),
            "routes[0]",
            "missing field `service`",
        ),
        (
            "routes: [{name: '', pathPrefix: /, service: web, public: true}]".into(),
            "routes[0].name",
            "needs a name",
        ),
        (
            "routes: [{name: a, pathPrefix: api, service: web, public: true}]".into(),
            "routes[0].pathPrefix",
            "must start with '/'",
        ),
        (
            "routes: [{name: a, pathPrefix: '/a?b', service: web, public: true}]".into(),
            "routes[0].pathPrefix",
            "plain path",
        ),
        (
            "routes: [{name: a, pathPrefix: /a, rewritePrefix: b, service: web, public: true}]"
                .into(),
            "routes[0].rewritePrefix",
            "must start with '/'",
        ),
        (
            "routes: [{name: a, pathPrefix: /a, service: Web!, public: true}]".into(),
            "routes[0].service",
            "service name \"Web!\"",
        ),
        (
            "routes: [{name: a, pathPrefix: /a, service: 'web:HTTP', public: true}]".into(),
            "routes[0].service",
            "port name \"HTTP\"",
        ),
        (
            "routes: [{name: a, pathPrefix: /a, service: web, public: true}, {name: a, pathPrefix: /b, service: web, public: true}]".into(),
            "routes[1].name",
            "used twice",
        ),
        (
            "routes: [{name: a, pathPrefix: /a/, service: web, public: true}, {name: b, pathPrefix: /a, service: web, public: true}]".into(),
            "routes[1].pathPrefix",
            "another route",
        ),
        (
            "routes: [{name: a, pathPrefix: /a, service: web, public: true, rateLimit: nope}]"
                .into(),
            "routes[0].rateLimit",
            "no rate limit named \"nope\"",
        ),
        (
            "routes: [{name: a, pathPrefix: /a, service: web}]".into(),
            "routes[0].public",
            "no `jwt` section",
        ),
        (
            "routes: [{name: g, pathPrefix: /api/v1/orders, service: 'order:grpc', public: true, grpc: true}]".into(),
            "routes[0].pathPrefix",
            "not a gRPC service or method path",
        ),
        (
            "routes: [{name: g, pathPrefix: /pkg.Svc/, rewritePrefix: /x, service: 'order:grpc', public: true, grpc: true}]".into(),
            "routes[0].rewritePrefix",
            "forwards paths unchanged",
        ),
        (
            with("rateLimits: {api: {requestsPerSecond: 0}}"),
            "rateLimits.api.requestsPerSecond",
            "at least 1",
        ),
        (
            with("rateLimits: {api: {requestsPerSecond: 1, burst: 0}}"),
            "rateLimits.api.burst",
            "at least 1",
        ),
        (
            with("rateLimits: {'': {requestsPerSecond: 1}}"),
            "rateLimits.",
            "needs a name",
        ),
        (
            with("rateLimits: {api: {requestsPerSecond: 1, key: per-user}}"),
            "rateLimits.api.key",
            "unknown variant `per-user`",
        ),
        (
            with("rateLimits: {api: {requestsPerSecond: 1, key: jwt-subject}}"),
            "rateLimits.api.key",
            "needs a `jwt` section",
        ),
        (
            with("jwt: {providers: []}"),
            "jwt.providers",
            "at least one provider",
        ),
        (
            with("jwt: {providers: [{name: a}]}"),
            "jwt.providers[0]",
            "exactly one of",
        ),
        (
            with("jwt: {providers: [{name: a, hs256SecretEnv: S, jwksFile: k.json}]}"),
            "jwt.providers[0]",
            "got hs256SecretEnv, jwksFile",
        ),
        (
            with("jwt: {providers: [{name: '', hs256SecretEnv: S}]}"),
            "jwt.providers[0].name",
            "needs a name",
        ),
        (
            with("jwt: {providers: [{name: a, hs256SecretEnv: S}, {name: a, hs256SecretEnv: T}]}"),
            "jwt.providers[1].name",
            "used twice",
        ),
        (
            with("jwt: {providers: [{name: a, hs256SecretEnv: S, secret: x}]}"),
            "jwt.providers[0].secret",
            "unknown field `secret`",
        ),
        (
            with("jwt: {subjectHeader: 'bad header', providers: [{name: a, hs256SecretEnv: S}]}"),
            "jwt.subjectHeader",
            "not a header name",
        ),
        (
            with("cors: {allowOrigins: ['*'], maxAge: soon}"),
            "cors.maxAge",
            "invalid duration \"soon\"",
        ),
        (
            with("cors: {allowMethods: [GET]}"),
            "cors.allowOrigins",
            "at least one origin",
        ),
        (
            with("cors: {allowOrigins: ['*', 'https://a.example']}"),
            "cors.allowOrigins",
            "list it alone",
        ),
        (
            with("cors: {allowOrigins: [shop.example]}"),
            "cors.allowOrigins[0]",
            "not an origin",
        ),
        (
            with("cors: {allowOrigins: ['*'], allowMethods: ['GE T']}"),
            "cors.allowMethods[0]",
            "not an HTTP method",
        ),
        (
            with("cors: {allowOrigins: ['*'], allowHeaders: ['x y']}"),
            "cors.allowHeaders[0]",
            "not a header name",
        ),
    ]
}

#[test]
fn bad_files_name_the_field() {
    for (text, field, reason) in bad_files() {
        let errors = file_errors(&text);
        assert_eq!(errors.len(), 1, "for {text:?}: {errors:?}");
        assert_eq!(errors[0].field, field, "for {text:?}: {}", errors[0].reason);
        assert!(
            errors[0].reason.contains(reason),
            "for {text:?}: {:?} lacks {reason:?}",
            errors[0].reason
        );
    }
}

/// The same rules on a resource, with the path from the document (`spec.routes[0]...`).
#[test]
fn bad_resources_name_the_field_under_spec() {
    for (text, field, reason) in bad_files() {
        // `listen` is refused in a resource anyway; see below.
        if field == "listen" || text.starts_with("listen") {
            continue;
        }
        let doc = resource(&text);
        let errors: Vec<(String, String)> = match Resource::parse_documents(&doc) {
            Err(e) => {
                let ferrule_config::ConfigError::Parse { field, reason, .. } = e else {
                    panic!("{e:?}")
                };
                vec![(field, reason)]
            }
            // Relative key paths (`k.json`) are refused in a resource too; see below.
            Ok(resources) => match validate(&resources, None) {
                Ok(()) => Vec::new(),
                Err(ValidationErrors(errors)) => errors
                    .into_iter()
                    .filter(|e| !e.reason.contains("relative path"))
                    .map(|e| (e.field, e.reason))
                    .collect(),
            },
        };
        let want = if field.is_empty() {
            "spec".to_string()
        } else {
            format!("spec.{field}")
        };
        assert_eq!(errors.len(), 1, "for {doc}: {errors:?}");
        assert_eq!(errors[0].0, want, "for {doc}: {}", errors[0].1);
        assert!(errors[0].1.contains(reason), "for {doc}: {:?}", errors[0].1);
    }
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let errors = file_errors(
        "maxRequestBytes: 0\nroutes: [{name: a, pathPrefix: x, service: web}, {name: a, pathPrefix: /b, service: web, public: true}]",
    );
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "maxRequestBytes",
            "routes[0].pathPrefix",
            "routes[0].public",
            "routes[1].name"
        ]
    );
    let text = ferrule_config::GatewayFileErrors(errors).to_string();
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(
        text.starts_with("maxRequestBytes: must be at least 1\n"),
        "{text}"
    );
}

#[test]
fn a_resource_may_not_set_listen_or_relative_key_paths() {
    let doc = resource(
        "listen: 127.0.0.1:8000\njwt:\n  providers:\n    - {name: a, rsaPublicKeyFile: keys/rsa.pem}\n    - {name: b, jwksFile: /etc/ferrule/jwks.json}\n    - {name: c, hs256SecretEnv: SECRET}\nroutes: [{name: all, pathPrefix: /, service: web}]",
    );
    let resources = Resource::parse_documents(&doc).unwrap();
    let errors = validate(&resources, None).unwrap_err().0;
    let fields: Vec<(&str, &str)> = errors
        .iter()
        .map(|e| (e.resource.as_str(), e.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("Gateway/default/edge", "spec.listen"),
            (
                "Gateway/default/edge",
                "spec.jwt.providers[0].rsaPublicKeyFile"
            ),
        ]
    );
    assert!(
        errors[0].reason.contains("--listen"),
        "{}",
        errors[0].reason
    );
    assert!(
        errors[1].reason.contains("absolute"),
        "{}",
        errors[1].reason
    );
    // The same spec is a fine file: relative paths are relative to the file's folder.
    let file = doc.split("spec:\n").nth(1).unwrap();
    let file: String = file.lines().map(|l| format!("{}\n", &l[2..])).collect();
    GatewaySpec::parse_file(&file).unwrap();
}

#[test]
fn a_resource_round_trips_through_the_store_and_yaml() {
    let file = documented_file().replace("listen: 127.0.0.1:8000", "");
    let resources = Resource::parse_documents(&resource(&file)).unwrap();
    validate(&resources, None).unwrap();
    let r = &resources[0];
    assert_eq!(r.kind, Kind::Gateway);
    assert_eq!(r.spec.service(), None);
    let Spec::Gateway(spec) = &r.spec else {
        panic!("{r:?}")
    };
    assert_eq!(spec, &GatewaySpec::parse_file(&file).unwrap());
    let back = Resource::from_parts("Gateway", "default", "edge", &r.spec_json()).unwrap();
    assert_eq!(&back, r);
    assert_eq!(
        Resource::parse_documents(&r.to_yaml()).unwrap(),
        std::slice::from_ref(r)
    );
    // Unset fields stay unset: the canonical JSON holds what was written.
    let minimal = Resource::parse_documents(&resource(ROUTE)).unwrap();
    assert_eq!(
        minimal[0].spec_json(),
        r#"{"routes":[{"name":"all","pathPrefix":"/","service":"web","public":true}]}"#
    );
}

#[test]
fn gateways_are_one_per_name_and_do_not_count_as_a_service_policy() {
    let policy = "apiVersion: ferrule.io/v1\nkind: ServicePolicy\nmetadata: {name: edge}\nspec: {service: edge}\n";
    let text = format!("{}---\n{policy}", resource(ROUTE));
    validate(&Resource::parse_documents(&text).unwrap(), None).unwrap();
    let twice = format!("{}---\n{}", resource(ROUTE), resource(ROUTE));
    let errors = validate(&Resource::parse_documents(&twice).unwrap(), None)
        .unwrap_err()
        .0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field, "metadata.name");
}
