//! Config resources as documents: `apiVersion`, `kind`, `metadata`, `spec`, Kubernetes style.
//!
//! Users write them as YAML (or JSON); the controller stores each one's spec as canonical JSON
//! and hands it back through [`Resource::from_parts`]. Both ways are strict: an unknown field,
//! a wrong type or a malformed duration is refused with the document's (1-based) index and the
//! field's path, so the message points at the line to fix.

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::authz::AuthorizationPolicySpec;
use crate::gateway::GatewaySpec;
use crate::policy::ServicePolicySpec;
use crate::route::HttpRouteSpec;

/// The only `apiVersion` this crate reads and writes.
pub const API_VERSION: &str = "ferrule.io/v1";

/// `metadata.namespace` when a document leaves it out.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why a document or a stored resource could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Malformed YAML/JSON, an unknown or missing field, a value of the wrong type. `document`
    /// counts from 1; `field` is a path such as `spec.retries.maxAttempts` (empty when the
    /// document as a whole is wrong).
    #[error("document {document}: {}{reason}", field_prefix(field))]
    Parse {
        document: usize,
        field: String,
        reason: String,
    },
    #[error("document {document}: apiVersion {found:?} is not supported; use {API_VERSION:?}")]
    BadApiVersion { document: usize, found: String },
    #[error(
        "{}unknown kind {kind:?}; expected ServicePolicy, HTTPRoute, Gateway or AuthorizationPolicy",
        document_prefix(*document)
    )]
    UnknownKind {
        document: Option<usize>,
        kind: String,
    },
    /// A stored spec (see [`Resource::from_parts`]) that does not read back.
    #[error("stored {resource}: {}{reason}", field_prefix(field))]
    Stored {
        resource: String,
        field: String,
        reason: String,
    },
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

fn document_prefix(document: Option<usize>) -> String {
    document
        .map(|d| format!("document {d}: "))
        .unwrap_or_default()
}

/// What a resource is. `Display` gives the canonical name written in documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    ServicePolicy,
    HttpRoute,
    Gateway,
    AuthorizationPolicy,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::ServicePolicy,
        Kind::HttpRoute,
        Kind::Gateway,
        Kind::AuthorizationPolicy,
    ];

    /// `"ServicePolicy"`, `"HTTPRoute"`, `"Gateway"` or `"AuthorizationPolicy"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ServicePolicy => "ServicePolicy",
            Kind::HttpRoute => "HTTPRoute",
            Kind::Gateway => "Gateway",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// Reads the kind of a document: canonical spelling only.
    fn from_document(document: usize, kind: &str) -> Result<Self, ConfigError> {
        if let Some(k) = Kind::ALL.into_iter().find(|k| k.as_str() == kind) {
            return Ok(k);
        }
        Err(ConfigError::UnknownKind {
            document: Some(document),
            kind: kind.to_string(),
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = ConfigError;

    /// The canonical name, or the forms people type on a command line: `servicepolicy`,
    /// `servicepolicies`, `httproute`, `httproutes`, `gateway`, `gateways`,
    /// `authorizationpolicy`, `authorizationpolicies`, `authz` (any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "servicepolicy" | "servicepolicies" => Ok(Kind::ServicePolicy),
            "httproute" | "httproutes" => Ok(Kind::HttpRoute),
            "gateway" | "gateways" => Ok(Kind::Gateway),
            "authorizationpolicy" | "authorizationpolicies" | "authz" => {
                Ok(Kind::AuthorizationPolicy)
            }
            _ => Err(ConfigError::UnknownKind {
                document: None,
                kind: s.to_string(),
            }),
        }
    }
}

impl Serialize for Kind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// A DNS label, unique per kind and namespace.
    pub name: String,
    /// A DNS label; default `"default"`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// A resource's spec; its variant always matches the resource's [`Kind`].
// Specs are few and long-lived (one per resource, never per request), so the size gap between
// variants costs nothing worth a `Box` in every caller's pattern.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    ServicePolicy(ServicePolicySpec),
    HttpRoute(HttpRouteSpec),
    Gateway(GatewaySpec),
    AuthorizationPolicy(AuthorizationPolicySpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::ServicePolicy(_) => Kind::ServicePolicy,
            Spec::HttpRoute(_) => Kind::HttpRoute,
            Spec::Gateway(_) => Kind::Gateway,
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    /// The service the resource configures: the policy's target or the route's parent. A
    /// `Gateway` has none: it configures the gateway proxy its `metadata.name` names; nor has
    /// an `AuthorizationPolicy` that is its namespace's default.
    pub fn service(&self) -> Option<&str> {
        match self {
            Spec::ServicePolicy(s) => Some(&s.service),
            Spec::HttpRoute(s) => Some(&s.service),
            Spec::Gateway(_) => None,
            Spec::AuthorizationPolicy(s) => s.service.as_deref(),
        }
    }
}

impl Serialize for Spec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Spec::ServicePolicy(spec) => spec.serialize(s),
            Spec::HttpRoute(spec) => spec.serialize(s),
            Spec::Gateway(spec) => spec.serialize(s),
            Spec::AuthorizationPolicy(spec) => spec.serialize(s),
        }
    }
}

/// Which resource: unique within a stored configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceId {
    /// `ServicePolicy/default/user`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// One config resource. (De)serializes as the whole document, `apiVersion` included.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub kind: Kind,
    pub metadata: Metadata,
    pub spec: Spec,
}

/// The document around a spec, read before the kind is known.
#[derive(Deserialize)]
#[serde(
    rename_all = "camelCase",
    deny_unknown_fields,
    expecting = "a resource document (apiVersion, kind, metadata, spec)"
)]
struct Envelope {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: Option<serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvelopeRef<'a> {
    api_version: &'static str,
    kind: Kind,
    metadata: &'a Metadata,
    spec: &'a Spec,
}

impl Resource {
    /// Reads every resource in `text`: YAML documents separated by `---`, or JSON (one object,
    /// several objects in a row, or an array of them). Empty documents are skipped but still
    /// counted, so `document N` in an error is the Nth document of the file.
    pub fn parse_documents(text: &str) -> Result<Vec<Resource>, ConfigError> {
        let trimmed = text.trim_start();
        // JSON is read as JSON for its precise errors; text that only looks like it (a YAML
        // flow mapping such as `{kind: HTTPRoute, ...}`) falls back to YAML.
        let values = if trimmed.starts_with('{') || trimmed.starts_with('[') {
            json_documents(trimmed)
                .or_else(|json_err| yaml_documents(text).map_err(|_| json_err))?
        } else {
            yaml_documents(text)?
        };
        values
            .into_iter()
            .enumerate()
            .filter(|(_, v)| !v.is_null())
            .map(|(i, v)| Resource::from_value(i + 1, v))
            .collect()
    }

    /// Rebuilds a stored resource from its key parts and spec JSON, as strictly as a user's
    /// document is read. `kind` may be any form [`Kind`]'s `FromStr` accepts.
    pub fn from_parts(
        kind: &str,
        namespace: &str,
        name: &str,
        spec_json: &str,
    ) -> Result<Resource, ConfigError> {
        let kind: Kind = kind.parse()?;
        let metadata = Metadata {
            name: name.to_string(),
            namespace: namespace.to_string(),
        };
        let resource = format!("{kind}/{namespace}/{name}");
        let stored = |field: String, reason: String| ConfigError::Stored {
            resource: resource.clone(),
            field,
            reason,
        };
        let mut de = serde_json::Deserializer::from_str(spec_json);
        let spec = read_spec(kind, &mut de).map_err(|(f, r)| stored(f, r))?;
        de.end().map_err(|e| stored("spec".into(), e.to_string()))?;
        Ok(Resource {
            kind,
            metadata,
            spec,
        })
    }

    /// The spec as canonical JSON: fields in a fixed order, unset fields left out, durations as
    /// humantime strings. Equal specs give equal strings, so the controller can tell
    /// "unchanged" from "configured" by comparing them.
    pub fn spec_json(&self) -> String {
        serde_json::to_string(&self.spec).expect("config specs always serialize to JSON")
    }

    /// The resource as a YAML document, `apiVersion` included.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("config resources always serialize to YAML")
    }

    /// The qualified name of the service the resource configures (its `spec.service`, which
    /// is relative to the resource's namespace; see `ferrule_proto::names`).
    pub fn target_service(&self) -> Option<String> {
        self.spec
            .service()
            .map(|service| ferrule_proto::names::qualify(&self.metadata.namespace, service))
    }

    /// The qualified names of the backends its routes send to (relative to its namespace).
    pub fn backend_services(&self) -> Vec<String> {
        match &self.spec {
            Spec::HttpRoute(route) => route
                .rules
                .iter()
                .flat_map(|rule| rule.backends.iter())
                .map(|b| ferrule_proto::names::qualify(&self.metadata.namespace, &b.service))
                .collect(),
            Spec::ServicePolicy(_) | Spec::Gateway(_) | Spec::AuthorizationPolicy(_) => Vec::new(),
        }
    }

    pub fn id(&self) -> ResourceId {
        ResourceId {
            kind: self.kind,
            namespace: self.metadata.namespace.clone(),
            name: self.metadata.name.clone(),
        }
    }

    fn from_value(document: usize, value: serde_json::Value) -> Result<Resource, ConfigError> {
        let parse = |field: String, reason: String| ConfigError::Parse {
            document,
            field,
            reason,
        };
        let envelope: Envelope = serde_path_to_error::deserialize(value)
            .map_err(|e| parse(path_string(e.path()), e.into_inner().to_string()))?;
        if envelope.api_version != API_VERSION {
            return Err(ConfigError::BadApiVersion {
                document,
                found: envelope.api_version,
            });
        }
        let kind = Kind::from_document(document, &envelope.kind)?;
        let spec = envelope
            .spec
            .ok_or_else(|| parse(String::new(), "missing field `spec`".into()))?;
        let spec = read_spec(kind, spec).map_err(|(f, r)| parse(f, r))?;
        Ok(Resource {
            kind,
            metadata: envelope.metadata,
            spec,
        })
    }
}

/// Reads a spec of `kind`, returning the failing field's path (from `spec`) and the reason.
fn read_spec<'de, D: Deserializer<'de>>(kind: Kind, de: D) -> Result<Spec, (String, String)> {
    fn read<'de, T: DeserializeOwned, D: Deserializer<'de>>(de: D) -> Result<T, (String, String)> {
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = path_string(e.path());
            let field = match path.as_str() {
                "" => "spec".to_string(),
                p if p.starts_with('[') => format!("spec{p}"),
                p => format!("spec.{p}"),
            };
            (field, e.into_inner().to_string())
        })
    }
    Ok(match kind {
        Kind::ServicePolicy => Spec::ServicePolicy(read(de)?),
        Kind::HttpRoute => Spec::HttpRoute(read(de)?),
        Kind::Gateway => Spec::Gateway(read(de)?),
        Kind::AuthorizationPolicy => Spec::AuthorizationPolicy(read(de)?),
    })
}

/// `serde_path_to_error` writes the empty path as `.`; we write it as nothing.
fn path_string(path: &serde_path_to_error::Path) -> String {
    let p = path.to_string();
    if p == "." { String::new() } else { p }
}

fn yaml_documents(text: &str) -> Result<Vec<serde_json::Value>, ConfigError> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, doc)| {
            serde_json::Value::deserialize(doc).map_err(|e| ConfigError::Parse {
                document: i + 1,
                field: String::new(),
                reason: e.to_string(),
            })
        })
        .collect()
}

fn json_documents(text: &str) -> Result<Vec<serde_json::Value>, ConfigError> {
    let mut values = Vec::new();
    for value in serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>() {
        match value {
            Ok(serde_json::Value::Array(items)) => values.extend(items),
            Ok(v) => values.push(v),
            Err(e) => {
                return Err(ConfigError::Parse {
                    document: values.len() + 1,
                    field: String::new(),
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(values)
}

impl Serialize for Resource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        EnvelopeRef {
            api_version: API_VERSION,
            kind: self.kind,
            metadata: &self.metadata,
            spec: &self.spec,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Resource {
    /// Reads one document, as strictly as [`Resource::parse_documents`].
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        Resource::from_value(1, value).map_err(serde::de::Error::custom)
    }
}
