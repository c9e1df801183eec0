//! The gateway's configuration: a [`GatewaySpec`] (the model `ferrule-config` owns, shared by
//! the `--config` file and the `Gateway` resource) together with where it came from.
//!
//! Parsing and validation are `ferrule-config`'s ([`GatewaySpec::parse_file`] for the file,
//! `ferrule_config::validate` for a streamed resource); what is left here is what only the
//! gateway can do: name the origin in errors, and resolve key files. A file's relative key
//! paths are relative to the file's folder; a resource's are absolute (validation refuses
//! relative ones). Reading keys and secrets happens when the router is built
//! ([`super::jwt::JwtVerifier::from_config`]), with errors shaped like validation's.

use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};

pub use ferrule_config::{
    Cors, GatewayFileErrors, GatewayRateLimit, GatewayRoute, GatewaySpec, Jwt, JwtProvider,
    KeySource, RateLimitKey,
};

/// Where a gateway's config came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase", tag = "from")]
pub enum Origin {
    /// The `--config` file.
    File { path: PathBuf },
    /// The `Gateway` resource of this name, as of a config version.
    Resource { name: String, version: i64 },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path } => write!(f, "gateway config {}", path.display()),
            Origin::Resource { name, version } => {
                write!(f, "Gateway/default/{name} (version {version})")
            }
        }
    }
}

/// Why a gateway config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading gateway config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file breaks the rules of a `Gateway` spec; each error names its field.
    #[error("gateway config {file}: {errors}", file = file.display())]
    File {
        file: PathBuf,
        errors: GatewayFileErrors,
    },
    /// The config is valid but the gateway cannot use it (a key file it cannot read, a
    /// secret not set). `field` is the path of the offending field (`jwt.providers[0]`).
    #[error("{origin}: {field}: {message}")]
    Invalid {
        origin: Origin,
        field: String,
        message: String,
    },
}

/// A validated spec and its origin. Derefs to the spec.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    spec: GatewaySpec,
    origin: Origin,
}

impl Deref for GatewayConfig {
    type Target = GatewaySpec;

    fn deref(&self) -> &GatewaySpec {
        &self.spec
    }
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

    /// Parses and validates `text` as the file at `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let spec = GatewaySpec::parse_file(text).map_err(|errors| ConfigError::File {
            file: path.to_path_buf(),
            errors,
        })?;
        Ok(Self {
            spec,
            origin: Origin::File {
                path: path.to_path_buf(),
            },
        })
    }

    /// The spec of the `Gateway` resource `name` as of config `version` (validated by the
    /// config client).
    pub fn from_resource(spec: GatewaySpec, name: &str, version: i64) -> Self {
        Self {
            spec,
            origin: Origin::Resource {
                name: name.to_string(),
                version,
            },
        }
    }

    pub fn spec(&self) -> &GatewaySpec {
        &self.spec
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Whether `other` would build the same router: the same spec from the same file, or the
    /// same spec from the same resource (whatever the config version).
    pub fn same_as(&self, other: &GatewayConfig) -> bool {
        let origins = match (&self.origin, &other.origin) {
            (Origin::File { path: a }, Origin::File { path: b }) => a == b,
            (Origin::Resource { name: a, .. }, Origin::Resource { name: b, .. }) => a == b,
            _ => false,
        };
        origins && self.spec == other.spec
    }

    /// Resolves a key path: a file's relative paths against the file's folder.
    pub fn resolve(&self, file: &Path) -> PathBuf {
        match &self.origin {
            Origin::File { path } if file.is_relative() => match path.parent() {
                Some(dir) => dir.join(file),
                None => file.to_path_buf(),
            },
            _ => file.to_path_buf(),
        }
    }

    /// An error about `field` of this config.
    pub fn invalid(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_name_the_file_and_the_field() {
        let err = GatewayConfig::parse(
            "routes: [{name: r, pathPrefix: /, service: web, public: true, rateLimit: x}]",
            Path::new("/etc/ferrule/gateway.yaml"),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "gateway config /etc/ferrule/gateway.yaml: routes[0].rateLimit: no rate limit named \"x\" in rateLimits"
        );
    }

    #[test]
    fn key_paths_resolve_against_the_files_folder_only() {
        let file = GatewayConfig::parse(
            "routes: [{name: r, pathPrefix: /, service: web, public: true}]",
            Path::new("/etc/ferrule/gateway.yaml"),
        )
        .unwrap();
        assert_eq!(
            file.resolve(Path::new("keys/jwt.pem")),
            PathBuf::from("/etc/ferrule/keys/jwt.pem")
        );
        assert_eq!(
            file.resolve(Path::new("/keys/jwt.pem")),
            PathBuf::from("/keys/jwt.pem")
        );
        let resource = GatewayConfig::from_resource(file.spec().clone(), "gateway", 7);
        assert_eq!(
            resource.resolve(Path::new("/keys/jwt.pem")),
            PathBuf::from("/keys/jwt.pem")
        );
        assert_eq!(
            resource.invalid("jwt.providers[0]", "no key").to_string(),
            "Gateway/default/gateway (version 7): jwt.providers[0]: no key"
        );
    }

    /// A `grpc: true` route: its prefix must name a gRPC service or method, its paths are never
    /// rewritten; each refusal names the field and why.
    #[test]
    fn grpc_routes_name_a_service_and_are_never_rewritten() {
        let parse = |route: &str| {
            GatewayConfig::parse(
                &format!(
                    "routes: [{{name: g, service: 'order:grpc', public: true, grpc: true, {route}}}]"
                ),
                Path::new("/etc/ferrule/gateway.yaml"),
            )
        };
        for ok in [
            "pathPrefix: /shop.order.v1.OrderService/",
            "pathPrefix: /shop.order.v1.OrderService",
            "pathPrefix: /shop.order.v1.OrderService/CreateOrder",
            "pathPrefix: /Greeter",
            "pathPrefix: /",
        ] {
            let config = parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(config.routes[0].grpc);
        }
        for (bad, reason) in [
            (
                "pathPrefix: /api/orders/list",
                "routes[0].pathPrefix: \"/api/orders/list\" is not a gRPC service or method path",
            ),
            (
                "pathPrefix: /shop..OrderService/",
                "routes[0].pathPrefix: \"/shop..OrderService/\" is not a gRPC service or method path",
            ),
            (
                "pathPrefix: /shop.order.v1.OrderService/Create-Order",
                "routes[0].pathPrefix: \"/shop.order.v1.OrderService/Create-Order\" is not a gRPC",
            ),
            (
                "pathPrefix: /shop.order.v1.OrderService/, rewritePrefix: /orders",
                "routes[0].rewritePrefix: a gRPC route forwards paths unchanged",
            ),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!(
                    "gateway config /etc/ferrule/gateway.yaml: {reason}"
                )),
                "{bad}: {err}"
            );
        }
        // Without `grpc: true` the same prefixes are plain HTTP routes, rewrites allowed.
        let http = GatewayConfig::parse(
            "routes: [{name: h, pathPrefix: /shop.order.v1.OrderService/, rewritePrefix: /x, service: 'order:grpc', public: true}]",
            Path::new("gateway.yaml"),
        )
        .unwrap();
        assert!(!http.routes[0].grpc);
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
