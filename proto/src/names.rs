//! Names shared by every part of the mesh: service names, service references
//! (`service[:port-name]`) and endpoint keys.
//!
//! Service names follow Kubernetes' DNS label rules (lowercase alphanumerics and `-`, at most
//! 63 characters, starting and ending with an alphanumeric), so the same name works as a
//! Kubernetes Service, an etcd key segment and a metrics label.

use std::fmt;

use crate::v1::Endpoint;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} {value:?} is longer than 63 characters")]
    TooLong { what: &'static str, value: String },
    #[error(
        "{what} {value:?} must be lowercase letters, digits and '-', starting and ending with a letter or digit"
    )]
    Invalid { what: &'static str, value: String },
}

/// Checks a DNS-label style name (service names, port names, namespaces).
pub fn validate_label(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > 63 {
        return Err(NameError::TooLong {
            what,
            value: value.to_string(),
        });
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let ends_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !value.chars().all(ok_char)
        || !ends_ok(value.chars().next())
        || !ends_ok(value.chars().last())
    {
        return Err(NameError::Invalid {
            what,
            value: value.to_string(),
        });
    }
    Ok(())
}

/// Checks a service name.
pub fn validate_service(name: &str) -> Result<(), NameError> {
    validate_label("service name", name)
}

/// What a client names: a service and optionally one of its named ports (`user:grpc`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub service: String,
    /// Empty means the service's default (only) port.
    pub port_name: String,
}

impl ServiceRef {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let (service, port_name) = match s.split_once(':') {
            Some((svc, port)) => {
                validate_label("port name", port)?;
                (svc, port)
            }
            None => (s, ""),
        };
        validate_service(service)?;
        Ok(Self {
            service: service.to_string(),
            port_name: port_name.to_string(),
        })
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port_name.is_empty() {
            f.write_str(&self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port_name)
        }
    }
}

/// The key that identifies an endpoint within its service: `<port_name>/<address>:<port>`.
/// Discovery deltas name removed endpoints by it.
pub fn endpoint_key(ep: &Endpoint) -> String {
    format!("{}/{}", ep.port_name, socket_string(&ep.address, ep.port))
}

/// `address:port`, with IPv6 addresses bracketed.
pub fn socket_string(address: &str, port: u32) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        assert!(validate_service("user").is_ok());
        assert!(validate_service("user-v2").is_ok());
        assert!(matches!(validate_service(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            validate_service("User"),
            Err(NameError::Invalid { .. })
        ));
        assert!(matches!(
            validate_service("-user"),
            Err(NameError::Invalid { .. })
        ));
        assert!(matches!(
            validate_service("a/b"),
            Err(NameError::Invalid { .. })
        ));
        assert!(matches!(
            validate_service(&"a".repeat(64)),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn service_refs() {
        let r = ServiceRef::parse("user:grpc").unwrap();
        assert_eq!((r.service.as_str(), r.port_name.as_str()), ("user", "grpc"));
        assert_eq!(r.to_string(), "user:grpc");
        assert_eq!(ServiceRef::parse("user").unwrap().to_string(), "user");
        assert!(ServiceRef::parse("user:").is_err());
        assert!(ServiceRef::parse(":grpc").is_err());
    }

    #[test]
    fn endpoint_keys() {
        let ep = Endpoint {
            address: "::1".into(),
            port: 80,
            port_name: "http".into(),
            ..Default::default()
        };
        assert_eq!(endpoint_key(&ep), "http/[::1]:80");
    }
}
