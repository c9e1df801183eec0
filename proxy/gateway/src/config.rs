//! The gateway's config file (`--config gateway.yaml`): its model, parsing and validation.
//!
//! The file is the contract between the gateway and `ferrule dev up` (docs/gateway.md lists
//! every field). [`GatewayConfig::load`] refuses a bad file with the field's path and the
//! reason (`routes[1].service: ...`), and checks what parsing cannot: route names and prefixes,
//! service references, references to rate limits, a `jwt` section when a route needs one, and
//! exactly one key source per JWT provider. Reading keys and secrets happens when the gateway
//! starts ([`super::jwt::JwtVerifier::from_config`]), with errors shaped the same way.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrule_proto::names::ServiceRef;
use ferrule_proto::ports;
use http::{HeaderName, Method};
use serde::{Deserialize, Serialize};

/// Requests with a larger body are refused with 413 unless `maxRequestBytes` says otherwise.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 1024 * 1024;
/// Header the verified `sub` claim goes in unless `jwt.subjectHeader` says otherwise.
pub const DEFAULT_SUBJECT_HEADER: &str = "x-user-id";

/// Why a gateway config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading gateway config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `field` is the path of the offending field (`routes[1].service`), empty for the file as
    /// a whole.
    #[error("gateway config {file}: {field}: {message}", file = file.display())]
    Invalid {
        file: PathBuf,
        field: String,
        message: String,
    },
}

impl ConfigError {
    pub fn invalid(file: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        ConfigError::Invalid {
            file: file.to_path_buf(),
            field: if field.is_empty() {
                "(file)".into()
            } else {
                field
            },
            message: message.into(),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: u64,
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Named token buckets, shared by the routes that name them.
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RateLimitConfig>,
    pub routes: Vec<RouteConfig>,
    /// Where the file was read from: relative key and secret paths are relative to its folder.
    #[serde(skip)]
    pub source: PathBuf,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports::GATEWAY))
}

fn default_max_request_bytes() -> u64 {
    DEFAULT_MAX_REQUEST_BYTES
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed to call, or `["*"]` for any.
    #[serde(default)]
    pub allow_origins: Vec<String>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// How long a browser may cache a preflight answer ("10m").
    #[serde(default, with = "duration_option")]
    pub max_age: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtConfig {
    #[serde(default = "default_subject_header")]
    pub subject_header: String,
    pub providers: Vec<JwtProviderConfig>,
}

fn default_subject_header() -> String {
    DEFAULT_SUBJECT_HEADER.to_string()
}

/// One issuer of tokens the gateway accepts, with exactly one key source.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtProviderConfig {
    pub name: String,
    /// Checked against `iss` when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// When non-empty, `aud` must name one of them.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The environment variable holding the HS256 shared secret.
    #[serde(default)]
    pub hs256_secret_env: Option<String>,
    #[serde(default)]
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM public key; tokens must be RS256.
    #[serde(default)]
    pub rsa_public_key_file: Option<PathBuf>,
    /// PEM public key (P-256); tokens must be ES256.
    #[serde(default)]
    pub ec_public_key_file: Option<PathBuf>,
    /// A JWK set (`{"keys": [...]}`); the token's `kid` picks the key.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
}

/// Where a provider's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource<'a> {
    Hs256Env(&'a str),
    Hs256File(&'a Path),
    RsaPem(&'a Path),
    EcPem(&'a Path),
    Jwks(&'a Path),
}

impl JwtProviderConfig {
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

    /// The one key source and its field name (validated by [`GatewayConfig::load`]).
    pub fn key_source(&self) -> Option<(&'static str, KeySource<'_>)> {
        let mut sources = self.key_sources();
        (sources.len() == 1).then(|| sources.remove(0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConfig {
    pub requests_per_second: u32,
    /// Bucket size; defaults to `requestsPerSecond`.
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub key: RateLimitKey,
}

impl RateLimitConfig {
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_second)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Matches the path itself and everything below it on a segment boundary.
    pub path_prefix: String,
    /// Replaces the matched prefix before the request is forwarded.
    #[serde(default)]
    pub rewrite_prefix: Option<String>,
    /// A mesh service reference, `service[:port-name]`.
    pub service: String,
    /// No JWT required.
    #[serde(default)]
    pub public: bool,
    /// The name of a bucket in `rateLimits`.
    #[serde(default)]
    pub rate_limit: Option<String>,
}

impl GatewayConfig {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`, naming `path` in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let mut config: GatewayConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            ConfigError::invalid(path, field, e.into_inner().to_string())
        })?;
        config.source = path.to_path_buf();
        config.validate()?;
        Ok(config)
    }

    /// Resolves a path named in the file against the file's folder.
    pub fn resolve(&self, file: &Path) -> PathBuf {
        match self.source.parent() {
            Some(dir) if file.is_relative() => dir.join(file),
            _ => file.to_path_buf(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |field: String, message: String| ConfigError::invalid(&self.source, field, message);
        if self.max_request_bytes == 0 {
            return Err(bad("maxRequestBytes".into(), "must be at least 1".into()));
        }
        if let Some(cors) = &self.cors {
            validate_cors(cors).map_err(|(f, m)| bad(format!("cors.{f}"), m))?;
        }
        if let Some(jwt) = &self.jwt {
            validate_jwt(jwt).map_err(|(f, m)| bad(format!("jwt.{f}"), m))?;
        }
        for (name, limit) in &self.rate_limits {
            let field = format!("rateLimits.{name}");
            if name.is_empty() {
                return Err(bad(field, "a rate limit needs a name".into()));
            }
            if limit.requests_per_second == 0 {
                return Err(bad(
                    format!("{field}.requestsPerSecond"),
                    "must be at least 1".into(),
                ));
            }
            if limit.burst == Some(0) {
                return Err(bad(format!("{field}.burst"), "must be at least 1".into()));
            }
            if limit.key == RateLimitKey::JwtSubject && self.jwt.is_none() {
                return Err(bad(
                    format!("{field}.key"),
                    "jwt-subject needs a `jwt` section to verify subjects".into(),
                ));
            }
        }
        if self.routes.is_empty() {
            return Err(bad("routes".into(), "at least one route is needed".into()));
        }
        let mut names = HashSet::new();
        let mut prefixes = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let field = |f: &str| format!("routes[{i}].{f}");
            if route.name.is_empty() {
                return Err(bad(field("name"), "a route needs a name".into()));
            }
            if !names.insert(route.name.as_str()) {
                return Err(bad(
                    field("name"),
                    format!("route name {:?} is used twice", route.name),
                ));
            }
            validate_prefix(&route.path_prefix).map_err(|m| bad(field("pathPrefix"), m))?;
            if !prefixes.insert(super::routes::normalize_prefix(&route.path_prefix)) {
                return Err(bad(
                    field("pathPrefix"),
                    format!("prefix {:?} is used by another route", route.path_prefix),
                ));
            }
            if let Some(rewrite) = &route.rewrite_prefix {
                validate_prefix(rewrite).map_err(|m| bad(field("rewritePrefix"), m))?;
            }
            ServiceRef::parse(&route.service).map_err(|e| bad(field("service"), e.to_string()))?;
            if let Some(limit) = &route.rate_limit
                && !self.rate_limits.contains_key(limit)
            {
                return Err(bad(
                    field("rateLimit"),
                    format!("no rate limit named {limit:?} in rateLimits"),
                ));
            }
            if !route.public && self.jwt.is_none() {
                return Err(bad(
                    field("public"),
                    format!(
                        "route {:?} requires a JWT but there is no `jwt` section; add one or mark the route `public: true`",
                        route.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn validate_prefix(prefix: &str) -> Result<(), String> {
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

fn validate_cors(cors: &CorsConfig) -> Result<(), (String, String)> {
    if cors.allow_origins.is_empty() {
        return Err((
            "allowOrigins".into(),
            "list at least one origin, or \"*\"".into(),
        ));
    }
    let any = cors.allow_origins.iter().any(|o| o == "*");
    if any && cors.allow_origins.len() > 1 {
        return Err((
            "allowOrigins".into(),
            "\"*\" allows every origin; list it alone".into(),
        ));
    }
    for (i, origin) in cors.allow_origins.iter().enumerate() {
        if !any && (!origin.contains("://") || http::HeaderValue::from_str(origin).is_err()) {
            return Err((
                format!("allowOrigins[{i}]"),
                format!("{origin:?} is not an origin such as \"https://shop.example\""),
            ));
        }
    }
    for (i, method) in cors.allow_methods.iter().enumerate() {
        if method != "*" && Method::from_bytes(method.as_bytes()).is_err() {
            return Err((
                format!("allowMethods[{i}]"),
                format!("{method:?} is not an HTTP method"),
            ));
        }
    }
    for (i, header) in cors.allow_headers.iter().enumerate() {
        if header != "*" && HeaderName::from_bytes(header.as_bytes()).is_err() {
            return Err((
                format!("allowHeaders[{i}]"),
                format!("{header:?} is not a header name"),
            ));
        }
    }
    Ok(())
}

fn validate_jwt(jwt: &JwtConfig) -> Result<(), (String, String)> {
    if HeaderName::from_bytes(jwt.subject_header.as_bytes()).is_err() {
        return Err((
            "subjectHeader".into(),
            format!("{:?} is not a header name", jwt.subject_header),
        ));
    }
    if jwt.providers.is_empty() {
        return Err(("providers".into(), "at least one provider is needed".into()));
    }
    let mut names = HashSet::new();
    for (i, p) in jwt.providers.iter().enumerate() {
        if p.name.is_empty() {
            return Err((
                format!("providers[{i}].name"),
                "a provider needs a name".into(),
            ));
        }
        if !names.insert(p.name.as_str()) {
            return Err((
                format!("providers[{i}].name"),
                format!("provider name {:?} is used twice", p.name),
            ));
        }
        let sources = p.key_sources();
        if sources.len() != 1 {
            let given: Vec<&str> = sources.iter().map(|(f, _)| *f).collect();
            return Err((
                format!("providers[{i}]"),
                format!(
                    "give exactly one of hs256SecretEnv, hs256SecretFile, rsaPublicKeyFile, ecPublicKeyFile, jwksFile (got {})",
                    if given.is_empty() {
                        "none".to_string()
                    } else {
                        given.join(", ")
                    }
                ),
            ));
        }
    }
    Ok(())
}

/// `maxAge: 10m`: a humantime duration, or nothing.
mod duration_option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => humantime::parse_duration(&text).map(Some).map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); write a number and a unit, e.g. \"10m\""
                ))
            }),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the contract (docs/gateway.md), verbatim.
    pub(crate) const EXAMPLE: &str = r#"
listen: 127.0.0.1:8000
maxRequestBytes: 1048576
cors:
  allowOrigins: ["*"]
  allowMethods: [GET, POST, PUT, DELETE, OPTIONS]
  allowHeaders: [authorization, content-type]
  maxAge: 10m
jwt:
  subjectHeader: x-user-id
  providers:
    - name: shop
      issuer: ferrule-shop
      audiences: []
      hs256SecretEnv: USER_JWT_SECRET
rateLimits:
  api: {requestsPerSecond: 10, burst: 10, key: client-ip}
routes:
  - name: login
    pathPrefix: /login
    service: user:http
    public: true
  - name: users
    pathPrefix: /api/users
    rewritePrefix: /users
    service: user:http
    rateLimit: api
  - name: orders
    pathPrefix: /api/orders
    rewritePrefix: /orders
    service: order:http
    rateLimit: api
"#;

    fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(text, Path::new("/etc/ferrule/gateway.yaml"))
    }

    /// The field an error names.
    fn field_of(text: &str) -> (String, String) {
        match parse(text).unwrap_err() {
            ConfigError::Invalid { field, message, .. } => (field, message),
            other => panic!("not a field error: {other}"),
        }
    }

    #[test]
    fn parses_the_contract_example() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(c.max_request_bytes, 1_048_576);
        let cors = c.cors.as_ref().unwrap();
        assert_eq!(cors.max_age, Some(Duration::from_secs(600)));
        assert_eq!(cors.allow_methods.len(), 5);
        let jwt = c.jwt.as_ref().unwrap();
        assert_eq!(jwt.subject_header, "x-user-id");
        assert_eq!(
            jwt.providers[0].key_source(),
            Some(("hs256SecretEnv", KeySource::Hs256Env("USER_JWT_SECRET")))
        );
        let api = &c.rate_limits["api"];
        assert_eq!(
            (api.requests_per_second, api.burst(), api.key),
            (10, 10, RateLimitKey::ClientIp)
        );
        assert_eq!(c.routes.len(), 3);
        assert!(c.routes[0].public);
        assert_eq!(c.routes[1].rewrite_prefix.as_deref(), Some("/users"));
        assert_eq!(c.routes[2].rate_limit.as_deref(), Some("api"));
        assert_eq!(
            c.resolve(Path::new("keys/jwt.pem")),
            PathBuf::from("/etc/ferrule/keys/jwt.pem")
        );
    }

    #[test]
    fn defaults() {
        let c = parse("routes: [{name: all, pathPrefix: /, service: web, public: true}]").unwrap();
        assert_eq!(c.listen, "0.0.0.0:8000".parse().unwrap());
        assert_eq!(c.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        assert!(c.cors.is_none() && c.jwt.is_none() && c.rate_limits.is_empty());
        let c = parse(
            "jwt: {providers: [{name: a, hs256SecretFile: s}]}\nrateLimits: {x: {requestsPerSecond: 3}}\nroutes: [{name: all, pathPrefix: /, service: web}]",
        )
        .unwrap();
        assert_eq!(c.jwt.unwrap().subject_header, DEFAULT_SUBJECT_HEADER);
        assert_eq!(c.rate_limits["x"].burst(), 3);
        assert_eq!(c.rate_limits["x"].key, RateLimitKey::Global);
    }

    #[test]
    fn bad_files_name_the_field() {
        let route = "routes: [{name: all, pathPrefix: /, service: web, public: true}]";
        let cases: Vec<(String, &str, &str)> = vec![
            ("listen: nowhere\n".to_string() + route, "listen", ""),
            ("maxRequestBytes: 0\n".to_string() + route, "maxRequestBytes", "at least 1"),
            ("colour: blue\n".to_string() + route, "colour", "unknown field `colour`"),
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
                "routes: [{name: a, pathPrefix: api, service: web, public: true}]".into(),
                "routes[0].pathPrefix",
                "must start with '/'",
            ),
            (
                "routes: [{name: a, pathPrefix: /a, service: Web!, public: true}]".into(),
                "routes[0].service",
                "",
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
                "routes: [{name: a, pathPrefix: /a, service: web, public: true, rateLimit: nope}]".into(),
                "routes[0].rateLimit",
                "no rate limit named \"nope\"",
            ),
            (
                "routes: [{name: a, pathPrefix: /a, service: web}]".into(),
                "routes[0].public",
                "no `jwt` section",
            ),
            (
                "rateLimits: {api: {requestsPerSecond: 0}}\n".to_string() + route,
                "rateLimits.api.requestsPerSecond",
                "at least 1",
            ),
            (
                "rateLimits: {api: {requestsPerSecond: 1, key: per-user}}\n".to_string() + route,
                "rateLimits.api.key",
                "unknown variant `per-user`",
            ),
            (
                "rateLimits: {api: {requestsPerSecond: 1, key: jwt-subject}}\n".to_string() + route,
                "rateLimits.api.key",
                "needs a `jwt` section",
            ),
            (
                "jwt: {providers: [{name: a}]}\n".to_string() + route,
                "jwt.providers[0]",
                "exactly one of",
            ),
            (
                "jwt: {providers: [{name: a, hs256SecretEnv: S, jwksFile: k.json}]}\n".to_string() + route,
                "jwt.providers[0]",
                "got hs256SecretEnv, jwksFile",
            ),
            (
                "jwt: {subjectHeader: 'bad header', providers: [{name: a, hs256SecretEnv: S}]}\n".to_string() + route,
                "jwt.subjectHeader",
                "not a header name",
            ),
            (
                "cors: {allowOrigins: ['*'], maxAge: soon}\n".to_string() + route,
                "cors.maxAge",
                "invalid duration \"soon\"",
            ),
            (
                "cors: {allowOrigins: [shop.example]}\n".to_string() + route,
                "cors.allowOrigins[0]",
                "not an origin",
            ),
            (
                "cors: {allowOrigins: ['*'], allowMethods: ['GE T']}\n".to_string() + route,
                "cors.allowMethods[0]",
                "not an HTTP method",
            ),
        ];
        for (text, field, message) in cases {
            let (got_field, got_message) = field_of(&text);
            let want_field = if field.is_empty() { "(file)" } else { field };
            assert_eq!(got_field, want_field, "for {text:?}: {got_message}");
            assert!(
                got_message.contains(message),
                "for {text:?}: {got_message:?} lacks {message:?}"
            );
        }
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let err = GatewayConfig::load(Path::new("/nonexistent/gateway.yaml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/gateway.yaml"),
            "{err}"
        );
    }
}
