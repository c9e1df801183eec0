//! `Gateway`: the mesh's edge proxy (`ferrule-proxy gateway`): its routes by path prefix to
//! mesh services, JWT providers, named rate limits, CORS and request size limit.
//!
//! [`GatewaySpec`] is both the `spec` of a `Gateway` resource and the whole of the gateway's
//! own file (`--config gateway.yaml`, which `ferrule dev up` writes): the file is read with
//! [`GatewaySpec::parse_file`], a resource like every other kind with
//! [`crate::Resource::parse_documents`] and [`crate::validate`]. Both apply the same rules
//! ([`GatewaySpec::check`]); a resource adds two that only make sense for it (no `listen`, no
//! relative key paths). Nothing here reads keys, secrets or environment variables: a JWT
//! provider names where its key is ([`KeySource`]) and the gateway reads it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrule_proto::names::ServiceRef;
use ferrule_proto::ports;
use http::{HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};

/// Requests with a larger body are refused with 413 unless `maxRequestBytes` says otherwise.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 1024 * 1024;
/// Header the verified `sub` claim goes in unless `jwt.subjectHeader` says otherwise.
pub const DEFAULT_SUBJECT_HEADER: &str = "x-user-id";
/// Where the gateway listens unless its file or `--listen` says otherwise.
pub const DEFAULT_GATEWAY_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports::GATEWAY);

/// The `spec` of a `Gateway`, and the gateway's file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// Where the gateway listens. Read once at start, so only the file may set it (a
    /// `Gateway` resource setting it is refused). Default [`DEFAULT_GATEWAY_LISTEN`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// At least 1. Default [`DEFAULT_MAX_REQUEST_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<u64>,
    /// Unset: no CORS headers, and `OPTIONS` is forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
    /// Required when any route is not `public` or a rate limit is keyed by `jwt-subject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<Jwt>,
    /// Named token buckets, shared by the routes that name them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rate_limits: BTreeMap<String, GatewayRateLimit>,
    /// Required, at least one. The longest matching `pathPrefix` wins.
    pub routes: Vec<GatewayRoute>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cors {
    /// Origins allowed to call (`https://shop.example`), or `["*"]` for any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origins: Vec<String>,
    /// HTTP methods, or `["*"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    /// Header names, or `["*"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    /// How long a browser may cache a preflight answer.
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_age: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Jwt {
    /// Where the verified `sub` claim goes. Default [`DEFAULT_SUBJECT_HEADER`]; see
    /// [`Jwt::subject_header`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_header: Option<String>,
    /// At least one; the first whose key verifies a token wins.
    pub providers: Vec<JwtProvider>,
}

impl Jwt {
    pub fn subject_header(&self) -> &str {
        self.subject_header
            .as_deref()
            .unwrap_or(DEFAULT_SUBJECT_HEADER)
    }
}

/// One issuer of tokens the gateway accepts, with exactly one key source.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtProvider {
    pub name: String,
    /// Checked against `iss` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// When non-empty, `aud` must name one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// The environment variable (of the gateway's process) holding the HS256 shared secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret_env: Option<String>,
    /// A file holding the HS256 shared secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM public key; tokens must be RS256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rsa_public_key_file: Option<PathBuf>,
    /// PEM public key (P-256); tokens must be ES256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec_public_key_file: Option<PathBuf>,
    /// A JWK set (`{"keys": [...]}`); the token's `kid` picks the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
}

/// Where a provider's key comes from. Paths in a file are relative to the file's folder; in a
/// resource they must be absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource<'a> {
    Hs256Env(&'a str),
    Hs256File(&'a Path),
    RsaPem(&'a Path),
    EcPem(&'a Path),
    Jwks(&'a Path),
}

impl KeySource<'_> {
    /// The file it names, if any.
    pub fn path(&self) -> Option<&Path> {
        match *self {
            KeySource::Hs256Env(_) => None,
            KeySource::Hs256File(p)
            | KeySource::RsaPem(p)
            | KeySource::EcPem(p)
            | KeySource::Jwks(p) => Some(p),
        }
    }
}

impl JwtProvider {
    /// Every key source given, with its field name.
    fn key_sources(&self) -> Vec<(&'static str, KeySource<'_>)> {
        let mut sources = Vec::new();
        if let Some(v) = &self.hs256_secret_env {
            sources.push(("hs256SecretEnv", KeySource::Hs256Env(v)));
        }
        if let Some(v) = &self.hs256_secret_file {
            sources.push(("hs256SecretFile", KeySource::Hs256File(v)));
        }
        if let Some(v) = &self.rsa_public_key_file {
            sources.push(("rsaPublicKeyFile", KeySource::RsaPem(v)));
        }
        if let Some(v) = &self.ec_public_key_file {
            sources.push(("ecPublicKeyFile", KeySource::EcPem(v)));
        }
        if let Some(v) = &self.jwks_file {
            sources.push(("jwksFile", KeySource::Jwks(v)));
        }
        sources
    }

    /// The one key source and its field name; `None` when there is not exactly one, which
    /// validation refuses.
    pub fn key_source(&self) -> Option<(&'static str, KeySource<'_>)> {
        let mut sources = self.key_sources();
        (sources.len() == 1).then(|| sources.remove(0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RateLimitKey {
    /// One bucket for every request.
    #[default]
    Global,
    /// One bucket per client address (the TCP peer, not a header a client can forge).
    ClientIp,
    /// One bucket per verified JWT subject; requests without one are keyed by client address.
    JwtSubject,
}

/// A set of token buckets, one per [`RateLimitKey`] value.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayRateLimit {
    /// Refill rate, at least 1.
    pub requests_per_second: u32,
    /// Bucket size, at least 1. Default: `requestsPerSecond`; see [`GatewayRateLimit::burst`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Default `global`; see [`GatewayRateLimit::key`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RateLimitKey>,
}

impl GatewayRateLimit {
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_second)
    }

    pub fn key(&self) -> RateLimitKey {
        self.key.unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayRoute {
    /// Unique within the gateway.
    pub name: String,
    /// Matches the path itself and everything below it on a segment boundary; a trailing
    /// slash does not matter.
    pub path_prefix: String,
    /// Replaces the matched prefix before the request is forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite_prefix: Option<String>,
    /// A mesh service reference, `service[:port-name]`.
    pub service: String,
    /// No JWT required.
    #[serde(default, skip_serializing_if = "is_false")]
    pub public: bool,
    /// The name of a bucket in `rateLimits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// The route carries gRPC: it takes only gRPC requests (`content-type:
    /// application/grpc*`, over h2c) and forwards their paths unchanged, so `pathPrefix` names
    /// a gRPC service (`/package.Service/`) or method (`/package.Service/Method`), or is `/`,
    /// and `rewritePrefix` is refused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub grpc: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `pathPrefix` without trailing slashes, `/` for the root: two routes whose prefixes are equal
/// so match the same paths (the proxy's matcher is `ferrule_proxy_policy::route::PathPrefix`).
fn normalize_prefix(prefix: &str) -> &str {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() { "/" } else { trimmed }
}

/// One problem in a gateway file: the field's path from the top of the file
/// (`routes[1].service`; empty for the file as a whole) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayFileError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for GatewayFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

/// Everything wrong with a gateway file, one per line; never empty. A file that does not
/// parse has one error; a file that parses has one per rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct GatewayFileErrors(pub Vec<GatewayFileError>);

impl fmt::Display for GatewayFileErrors {
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

impl GatewaySpec {
    /// Reads and validates the gateway's file (YAML, or JSON): the spec's fields at the top
    /// level, no `apiVersion`/`kind`/`metadata` around them. Errors name fields from the top
    /// of the file (`routes[1].rateLimit`).
    pub fn parse_file(text: &str) -> Result<GatewaySpec, GatewayFileErrors> {
        let de = serde_yaml::Deserializer::from_str(text);
        let spec: GatewaySpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            GatewayFileErrors(vec![GatewayFileError {
                field,
                reason: e.into_inner().to_string(),
            }])
        })?;
        let mut errors = Vec::new();
        spec.check("", &mut |field, reason| {
            errors.push(GatewayFileError { field, reason })
        });
        if errors.is_empty() {
            Ok(spec)
        } else {
            Err(GatewayFileErrors(errors))
        }
    }

    /// `listen`, or [`DEFAULT_GATEWAY_LISTEN`].
    pub fn listen(&self) -> SocketAddr {
        self.listen.unwrap_or(DEFAULT_GATEWAY_LISTEN)
    }

    /// `maxRequestBytes`, or [`DEFAULT_MAX_REQUEST_BYTES`].
    pub fn max_request_bytes(&self) -> u64 {
        self.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES)
    }

    /// The services the routes send to, without port names.
    pub fn services(&self) -> BTreeSet<&str> {
        self.routes
            .iter()
            .map(|r| r.service.split_once(':').map_or(&*r.service, |(s, _)| s))
            .collect()
    }

    /// Every rule of the file and the resource alike; `fail` gets each broken one as (field
    /// path, reason), the path starting with `at` (`""` for a file, `"spec."` for a resource).
    pub(crate) fn check(&self, at: &str, fail: &mut dyn FnMut(String, String)) {
        let mut fail = |field: &str, reason: String| fail(format!("{at}{field}"), reason);
        if self.max_request_bytes == Some(0) {
            fail("maxRequestBytes", "must be at least 1".into());
        }
        if let Some(cors) = &self.cors {
            check_cors(cors, &mut |f, r| fail(&format!("cors.{f}"), r));
        }
        if let Some(jwt) = &self.jwt {
            check_jwt(jwt, &mut |f, r| fail(&format!("jwt.{f}"), r));
        }
        for (name, limit) in &self.rate_limits {
            let field = format!("rateLimits.{name}");
            if name.is_empty() {
                fail(&field, "a rate limit needs a name".into());
            }
            if limit.requests_per_second == 0 {
                fail(
                    &format!("{field}.requestsPerSecond"),
                    "must be at least 1".into(),
                );
            }
            if limit.burst == Some(0) {
                fail(&format!("{field}.burst"), "must be at least 1".into());
            }
            if limit.key() == RateLimitKey::JwtSubject && self.jwt.is_none() {
                fail(
                    &format!("{field}.key"),
                    "jwt-subject needs a `jwt` section to verify subjects".into(),
                );
            }
        }
        if self.routes.is_empty() {
            fail("routes", "at least one route is needed".into());
        }
        let mut names = BTreeSet::new();
        let mut prefixes = BTreeSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let field = |f: &str| format!("routes[{i}].{f}");
            if route.name.is_empty() {
                fail(&field("name"), "a route needs a name".into());
            } else if !names.insert(route.name.as_str()) {
                fail(
                    &field("name"),
                    format!("route name {:?} is used twice", route.name),
                );
            }
            match check_prefix(&route.path_prefix) {
                Err(reason) => fail(&field("pathPrefix"), reason),
                Ok(()) if !prefixes.insert(normalize_prefix(&route.path_prefix)) => fail(
                    &field("pathPrefix"),
                    format!("prefix {:?} is used by another route", route.path_prefix),
                ),
                Ok(()) => {}
            }
            if let Some(rewrite) = &route.rewrite_prefix
                && let Err(reason) = check_prefix(rewrite)
            {
                fail(&field("rewritePrefix"), reason);
            }
            if route.grpc {
                if check_prefix(&route.path_prefix).is_ok()
                    && let Err(reason) = check_grpc_prefix(&route.path_prefix)
                {
                    fail(&field("pathPrefix"), reason);
                }
                if route.rewrite_prefix.is_some() {
                    fail(
                        &field("rewritePrefix"),
                        "a gRPC route forwards paths unchanged: the path names the method called (/package.Service/Method), so a rewrite would call another; remove rewritePrefix or `grpc: true`".into(),
                    );
                }
            }
            if let Err(e) = ServiceRef::parse(&route.service) {
                fail(&field("service"), e.to_string());
            }
            if let Some(limit) = &route.rate_limit
                && !self.rate_limits.contains_key(limit)
            {
                fail(
                    &field("rateLimit"),
                    format!("no rate limit named {limit:?} in rateLimits"),
                );
            }
            if !route.public && self.jwt.is_none() {
                fail(
                    &field("public"),
                    format!(
                        "route {:?} requires a JWT but there is no `jwt` section; add one or mark the route `public: true`",
                        route.name
                    ),
                );
            }
        }
    }

    /// What a `Gateway` resource may not hold though the file may: `listen` (bound once, at
    /// start) and relative key paths (a resource has no folder to be relative to).
    pub(crate) fn check_resource(&self, fail: &mut dyn FnMut(String, String)) {
        if let Some(listen) = self.listen {
            fail(
                "spec.listen".into(),
                format!(
                    "{listen} cannot be set in a Gateway resource: the gateway binds its listener once, at start (set it in the gateway's file or with --listen)"
                ),
            );
        }
        let providers = self.jwt.iter().flat_map(|j| j.providers.iter());
        for (i, provider) in providers.enumerate() {
            for (field, source) in provider.key_sources() {
                if let Some(path) = source.path()
                    && path.is_relative()
                {
                    fail(
                        format!("spec.jwt.providers[{i}].{field}"),
                        format!(
                            "{} is a relative path; a Gateway resource has no folder it could be relative to, so give an absolute path",
                            path.display()
                        ),
                    );
                }
            }
        }
    }
}

fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') {
        return Err(format!("{prefix:?} must start with '/'"));
    }
    if prefix.contains(['?', '#']) || prefix.contains(char::is_whitespace) {
        return Err(format!(
            "{prefix:?} must be a plain path (no query, fragment or spaces)"
        ));
    }
    Ok(())
}

/// A gRPC route's prefix: `/`, a fully-qualified service (`/shop.order.v1.OrderService`, a
/// trailing slash allowed) or one of its methods (`/shop.order.v1.OrderService/CreateOrder`).
fn check_grpc_prefix(prefix: &str) -> Result<(), String> {
    let is_identifier = |s: &str| {
        s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let trimmed = prefix
        .strip_prefix('/')
        .unwrap_or(prefix)
        .trim_end_matches('/');
    let valid = match trimmed.split_once('/') {
        _ if trimmed.is_empty() => true,
        None => trimmed.split('.').all(is_identifier),
        Some((service, method)) => service.split('.').all(is_identifier) && is_identifier(method),
    };
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{prefix:?} is not a gRPC service or method path: a gRPC route matches /package.Service/ (e.g. /shop.order.v1.OrderService/) or /package.Service/Method"
        ))
    }
}

fn check_cors(cors: &Cors, fail: &mut dyn FnMut(&str, String)) {
    if cors.allow_origins.is_empty() {
        fail("allowOrigins", "list at least one origin, or \"*\"".into());
    }
    let any = cors.allow_origins.iter().any(|o| o == "*");
    if any && cors.allow_origins.len() > 1 {
        fail(
            "allowOrigins",
            "\"*\" allows every origin; list it alone".into(),
        );
    }
    for (i, origin) in cors.allow_origins.iter().enumerate() {
        if !any && (!origin.contains("://") || HeaderValue::from_str(origin).is_err()) {
            fail(
                &format!("allowOrigins[{i}]"),
                format!("{origin:?} is not an origin such as \"https://shop.example\""),
            );
        }
    }
    for (i, method) in cors.allow_methods.iter().enumerate() {
        if method != "*" && Method::from_bytes(method.as_bytes()).is_err() {
            fail(
                &format!("allowMethods[{i}]"),
                format!("{method:?} is not an HTTP method"),
            );
        }
    }
    for (i, header) in cors.allow_headers.iter().enumerate() {
        if header != "*" && HeaderName::from_bytes(header.as_bytes()).is_err() {
            fail(
                &format!("allowHeaders[{i}]"),
                format!("{header:?} is not a header name"),
            );
        }
    }
}

fn check_jwt(jwt: &Jwt, fail: &mut dyn FnMut(&str, String)) {
    if HeaderName::from_bytes(jwt.subject_header().as_bytes()).is_err() {
        fail(
            "subjectHeader",
            format!("{:?} is not a header name", jwt.subject_header()),
        );
    }
    if jwt.providers.is_empty() {
        fail("providers", "at least one provider is needed".into());
    }
    let mut names = BTreeSet::new();
    for (i, p) in jwt.providers.iter().enumerate() {
        if p.name.is_empty() {
            fail(
                &format!("providers[{i}].name"),
                "a provider needs a name".into(),
            );
        } else if !names.insert(p.name.as_str()) {
            fail(
                &format!("providers[{i}].name"),
                format!("provider name {:?} is used twice", p.name),
            );
        }
        let sources = p.key_sources();
        if sources.len() != 1 {
            let given: Vec<&str> = sources.iter().map(|(f, _)| *f).collect();
            fail(
                &format!("providers[{i}]"),
                format!(
                    "give exactly one of hs256SecretEnv, hs256SecretFile, rsaPublicKeyFile, ecPublicKeyFile, jwksFile (got {})",
                    if given.is_empty() {
                        "none".to_string()
                    } else {
                        given.join(", ")
                    }
                ),
            );
        }
    }
}
