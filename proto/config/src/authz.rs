//! `AuthorizationPolicy`: which clients may call a service, decided by the service's own
//! (inbound) proxy from the client's verified mTLS identity.
//!
//! Two shapes share the kind:
//! * **a service's policy** (`spec.service` set): who may call the service (`from`), on all
//!   of it or only on some ports, path prefixes or `HTTPRoute` rules (`to`). A service may
//!   have several, each narrowed differently; a request is allowed when one of the policies
//!   that cover it allows its client.
//! * **a namespace's default** (`spec.service` unset, `spec.default` set): what the services
//!   of the namespace do with requests no policy of their own covers: `allow`,
//!   `authenticated-only` or `deny`. At most one per namespace.
//!
//! Either may be in `mode: audit`: it never refuses, but the proxy logs and counts what it
//! would have refused. No policy and no default means allow, as before policies existed.
//! Identity patterns ([`IdentityPattern`]) are parsed here so the controller's validation and
//! the proxy's matcher read them the same way. `docs/authorization.md` documents the resource.

use std::fmt;
use std::str::FromStr;

use ferrule_proto::identity::{SpiffeId, validate_trust_domain};
use ferrule_proto::names::validate_label;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The `spec` of an `AuthorizationPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The service the policy guards, in the policy's namespace. Unset: the policy is the
    /// namespace's default and sets `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `enforce` (the default) or `audit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<AuthzMode>,
    /// A namespace default only: what requests no service policy covers get.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<DefaultPolicy>,
    /// A service policy only: which requests it covers. Unset: every request to the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<AuthzTo>,
    /// A service policy only: the clients it allows. `{}` allows no one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AuthzFrom>,
}

impl AuthorizationPolicySpec {
    /// The mode, `enforce` when unset.
    pub fn effective_mode(&self) -> AuthzMode {
        self.mode.unwrap_or_default()
    }
}

/// Whether a policy refuses or only reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzMode {
    /// Refuse what the policy does not allow.
    #[default]
    Enforce,
    /// Allow everything, but log and count (`would_deny`) what enforcing would refuse.
    Audit,
}

impl AuthzMode {
    /// `"enforce"` or `"audit"`: the `mode` metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzMode::Enforce => "enforce",
            AuthzMode::Audit => "audit",
        }
    }
}

/// A namespace's default for requests no service policy covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    /// Any client, plaintext ones included (the mesh's behaviour without policies).
    Allow,
    /// Any client with a verified mesh identity; plaintext clients are refused.
    AuthenticatedOnly,
    /// No one: every service needs its own policy.
    Deny,
}

impl DefaultPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::Allow => "allow",
            DefaultPolicy::AuthenticatedOnly => "authenticated-only",
            DefaultPolicy::Deny => "deny",
        }
    }
}

/// Which requests to the service a policy covers; each list that is set must hold for the
/// request (an unset or empty list holds for all).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzTo {
    /// Port names of the service (`--app-port NAME=ADDR`). Connections and requests on other
    /// ports are not covered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// HTTP path prefixes, matching whole segments as `HTTPRoute` prefixes do. Opaque TCP is
    /// never covered by a policy that lists paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Names of the rules of the service's `HTTPRoute`: a request is covered when the route's
    /// first matching rule has one of these names. Opaque TCP never is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
}

/// The clients a policy allows: any one of the entries.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzFrom {
    /// Mesh identities: an exact SPIFFE id, every id of a namespace
    /// (`spiffe://<trust-domain>/ns/<namespace>/*`), or `*` (any verified identity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<IdentityPattern>,
    /// Namespaces whose workloads are allowed, whatever their service account.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Clients without a verified identity (plaintext). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
}

/// A pattern over verified client identities, as `from.identities` writes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdentityPattern {
    /// `*`: any verified identity.
    Any,
    /// `spiffe://<td>/ns/<namespace>/*`: every service account of a namespace.
    Namespace {
        trust_domain: String,
        namespace: String,
        /// `spiffe://<td>/ns/<namespace>/sa/`, what every matching id starts with.
        prefix: String,
    },
    /// One SPIFFE id, written out.
    Exact(String),
}

/// Why a string is not an identity pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{value:?} is not an identity pattern ({reason}); write a SPIFFE id \
     spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, a namespace \
     spiffe://<trust-domain>/ns/<namespace>/*, or * for any authenticated client"
)]
pub struct IdentityPatternError {
    pub value: String,
    pub reason: String,
}

impl IdentityPattern {
    /// Whether the verified identity `id` (a SPIFFE id string) matches. Allocates nothing.
    pub fn matches(&self, id: &str) -> bool {
        match self {
            IdentityPattern::Any => true,
            IdentityPattern::Namespace { prefix, .. } => id
                .strip_prefix(prefix.as_str())
                .is_some_and(|sa| !sa.is_empty() && !sa.contains('/')),
            IdentityPattern::Exact(exact) => id == exact,
        }
    }
}

impl FromStr for IdentityPattern {
    type Err = IdentityPatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| IdentityPatternError {
            value: s.to_string(),
            reason,
        };
        if s == "*" {
            return Ok(IdentityPattern::Any);
        }
        if let Some(head) = s.strip_suffix("/*") {
            let rest = head
                .strip_prefix("spiffe://")
                .ok_or_else(|| fail("it does not start with spiffe://".into()))?;
            let parts: Vec<&str> = rest.split('/').collect();
            let [trust_domain, "ns", namespace] = parts[..] else {
                return Err(fail(
                    "a wildcard may only stand for the service account, after /ns/<namespace>"
                        .into(),
                ));
            };
            validate_trust_domain(trust_domain).map_err(fail)?;
            validate_label("namespace", namespace).map_err(|e| fail(e.to_string()))?;
            return Ok(IdentityPattern::Namespace {
                trust_domain: trust_domain.to_string(),
                namespace: namespace.to_string(),
                prefix: format!("spiffe://{trust_domain}/ns/{namespace}/sa/"),
            });
        }
        if s.contains('*') {
            return Err(fail(
                "'*' is allowed alone or as the last segment after /ns/<namespace>/".into(),
            ));
        }
        let id: SpiffeId = s
            .parse()
            .map_err(|e: ferrule_proto::identity::IdentityError| fail(e.to_string()))?;
        Ok(IdentityPattern::Exact(id.to_string()))
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityPattern::Any => f.write_str("*"),
            IdentityPattern::Namespace {
                trust_domain,
                namespace,
                ..
            } => write!(f, "spiffe://{trust_domain}/ns/{namespace}/*"),
            IdentityPattern::Exact(id) => f.write_str(id),
        }
    }
}

impl Serialize for IdentityPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IdentityPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_and_match() {
        let exact: IdentityPattern = "spiffe://cluster.local/ns/shop/sa/order".parse().unwrap();
        assert!(exact.matches("spiffe://cluster.local/ns/shop/sa/order"));
        assert!(!exact.matches("spiffe://cluster.local/ns/shop/sa/order2"));

        let ns: IdentityPattern = "spiffe://cluster.local/ns/shop/*".parse().unwrap();
        assert!(ns.matches("spiffe://cluster.local/ns/shop/sa/order"));
        assert!(!ns.matches("spiffe://cluster.local/ns/shop/sa/"));
        assert!(!ns.matches("spiffe://cluster.local/ns/shopping/sa/order"));
        assert!(!ns.matches("spiffe://other.domain/ns/shop/sa/order"));
        assert!(!ns.matches("spiffe://cluster.local/ns/shop/sa/a/b"));
        assert_eq!(ns.to_string(), "spiffe://cluster.local/ns/shop/*");

        assert!("*".parse::<IdentityPattern>().unwrap().matches("anything"));
    }

    #[test]
    fn bad_patterns_say_why() {
        for (bad, why) in [
            ("spiffe://cluster.local/ns/shop", "not of the form"),
            ("spiffe://cluster.local/*", "after /ns/<namespace>"),
            (
                "spiffe://cluster.local/ns/sh*p/sa/x",
                "'*' is allowed alone",
            ),
            ("order", "does not start with"),
            (
                "http://cluster.local/ns/shop/*",
                "does not start with spiffe://",
            ),
            ("spiffe://Cluster/ns/shop/sa/x", "lowercase"),
            ("spiffe://cluster.local/ns/Shop/*", "namespace"),
            ("", "does not start with"),
        ] {
            let err = bad.parse::<IdentityPattern>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
