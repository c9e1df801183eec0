//! Workload identities: SPIFFE ids of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The controller's CA writes one into each leaf certificate's single URI SAN; proxies read it
//! back from a verified peer certificate and compare it with what discovery announced. On the
//! laptop mesh the service name stands in for the service account.

use std::fmt;
use std::str::FromStr;

use crate::names::validate_label;

/// The trust domain a mesh uses when nobody chose one, as in Kubernetes' cluster domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Prefix of the join tokens the controller issues.
pub const JOIN_TOKEN_PREFIX: &str = "ferrule-join-";

/// The namespace of the control plane's own identities.
pub const SYSTEM_NAMESPACE: &str = "ferrule-system";
/// The controller's service account: its gRPC server certificate is
/// `spiffe://<trust-domain>/ns/ferrule-system/sa/ferrule-controller`.
pub const CONTROLLER_ACCOUNT: &str = "ferrule-controller";
/// The administrator's service account: a client certificate for
/// `spiffe://<trust-domain>/ns/ferrule-system/sa/ferrule-admin` may use the whole API.
pub const ADMIN_ACCOUNT: &str = "ferrule-admin";
/// Prefix of admin tokens (`ferrule identity init` writes one).
pub const ADMIN_TOKEN_PREFIX: &str = "ferrule-admin-";

/// The controller's identity in `trust_domain`.
pub fn controller_identity(trust_domain: &str) -> Result<SpiffeId, IdentityError> {
    SpiffeId::new(trust_domain, SYSTEM_NAMESPACE, CONTROLLER_ACCOUNT)
}

/// The administrator's identity in `trust_domain`.
pub fn admin_identity(trust_domain: &str) -> Result<SpiffeId, IdentityError> {
    SpiffeId::new(trust_domain, SYSTEM_NAMESPACE, ADMIN_ACCOUNT)
}

/// Whether `id` is one of the control plane's own identities, which the CA never issues to a
/// workload (they come from the issuer directly: the controller's from itself, the admin's
/// from `ferrule identity init`).
pub fn is_reserved(id: &SpiffeId) -> bool {
    id.namespace == SYSTEM_NAMESPACE
        && (id.service_account == CONTROLLER_ACCOUNT || id.service_account == ADMIN_ACCOUNT)
}

/// Why a string is not a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
    #[error("identity {value:?}: {reason}")]
    Part { value: String, reason: String },
}

/// A workload's SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// Builds and checks an id from its parts.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let id = Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        };
        id.check()?;
        Ok(id)
    }

    fn check(&self) -> Result<(), IdentityError> {
        let part = |reason: String| IdentityError::Part {
            value: self.to_string(),
            reason,
        };
        validate_trust_domain(&self.trust_domain).map_err(part)?;
        validate_label("namespace", &self.namespace).map_err(|e| part(e.to_string()))?;
        // Kubernetes service-account names are DNS subdomains; a label is what the mesh's
        // service names are, and what it needs here.
        validate_label("service account", &self.service_account)
            .map_err(|e| part(e.to_string()))?;
        Ok(())
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [trust_domain, "ns", namespace, "sa", service_account] = parts[..] else {
            return Err(IdentityError::Shape(s.to_string()));
        };
        Self::new(trust_domain, namespace, service_account)
    }
}

/// Checks a trust domain: lowercase DNS-like name (letters, digits, `-`, `.`, `_`), at most
/// 255 characters, as the SPIFFE spec allows.
pub fn validate_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("trust domain is empty".into());
    }
    if td.len() > 255 {
        return Err(format!("trust domain {td:?} is longer than 255 characters"));
    }
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c);
    if !td.chars().all(ok) {
        return Err(format!(
            "trust domain {td:?} may hold only lowercase letters, digits, '-', '.' and '_'"
        ));
    }
    Ok(())
}

/// The workload identity a certificate carries: its single `spiffe://` URI SAN. Only parses;
/// whoever calls this has verified the certificate's chain.
#[cfg(feature = "x509")]
pub fn identity_of_certificate(der: &[u8]) -> Result<SpiffeId, String> {
    use x509_parser::extensions::GeneralName;

    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("certificate's subject alternative names do not parse: {e}"))?
        .ok_or("certificate has no subject alternative name")?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => uri.parse().map_err(|e: IdentityError| e.to_string()),
        (None, _) => Err("certificate has no spiffe:// URI SAN".into()),
        (Some(_), Some(_)) => Err("certificate has more than one spiffe:// URI SAN".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/user".parse().unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.service_account, "user");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/user");
        assert_eq!(SpiffeId::new("cluster.local", "shop", "user").unwrap(), id);
    }

    #[test]
    fn refuses_other_shapes() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/sa/a/ns/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster/ns/a/sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a/sa/",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} was accepted");
        }
    }
}
