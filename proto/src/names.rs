//! Names shared by every part of the mesh: service names, namespaces, service references
//! (`service[.namespace][:port-name]`) and endpoint keys.
//!
//! Every service lives in a namespace (`default` unless said otherwise). A service's
//! *qualified name* is `service.namespace`, written as plain `service` in the default
//! namespace, so a mesh that uses only `default` reads as it always did; it is the name the
//! proxies key their targets, subscriptions and metric labels by. Names in config resources
//! are relative to the resource's namespace ([`qualify`]).
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

/// The namespace of everything that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Checks a namespace.
pub fn validate_namespace(namespace: &str) -> Result<(), NameError> {
    validate_label("namespace", namespace)
}

/// The namespace an empty one means.
pub fn namespace_or_default(namespace: &str) -> &str {
    if namespace.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        namespace
    }
}

/// The qualified name of `service` in `namespace`: `service.namespace`, or `service` in the
/// default namespace.
pub fn qualified(namespace: &str, service: &str) -> String {
    let namespace = namespace_or_default(namespace);
    if namespace == DEFAULT_NAMESPACE {
        service.to_string()
    } else {
        format!("{service}.{namespace}")
    }
}

/// The qualified name of a name written in `namespace`: a bare `service` is that namespace's,
/// `service.other` names its own.
pub fn qualify(namespace: &str, name: &str) -> String {
    match name.split_once('.') {
        Some((service, namespace)) => qualified(namespace, service),
        None => qualified(namespace, name),
    }
}

/// Checks a service name as config and flags may write it: `service` or `service.namespace`.
pub fn validate_service_name(name: &str) -> Result<(), NameError> {
    match name.split_once('.') {
        Some((service, namespace)) => {
            validate_service(service)?;
            validate_namespace(namespace)
        }
        None => validate_service(name),
    }
}

/// What a client names: a service in a namespace and optionally one of its named ports
/// (`user:grpc`, `user.shop:grpc`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    /// Never empty: [`DEFAULT_NAMESPACE`] unless named.
    pub namespace: String,
    pub service: String,
    /// Empty means the service's default (only) port.
    pub port_name: String,
}

impl ServiceRef {
    /// `service[.namespace][:port]`, in the default namespace unless it names one.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        Self::parse_in(s, DEFAULT_NAMESPACE)
    }

    /// `service[.namespace][:port]`, in `namespace` unless it names one.
    pub fn parse_in(s: &str, namespace: &str) -> Result<Self, NameError> {
        let (name, port_name) = match s.split_once(':') {
            Some((name, port)) => {
                validate_label("port name", port)?;
                (name, port)
            }
            None => (s, ""),
        };
        let (service, namespace) = match name.split_once('.') {
            Some((service, namespace)) => (service, namespace),
            None => (name, namespace_or_default(namespace)),
        };
        validate_service(service)?;
        validate_namespace(namespace)?;
        Ok(Self {
            namespace: namespace.to_string(),
            service: service.to_string(),
            port_name: port_name.to_string(),
        })
    }

    /// A service's default port.
    pub fn new(namespace: &str, service: &str) -> Self {
        Self {
            namespace: namespace_or_default(namespace).to_string(),
            service: service.to_string(),
            port_name: String::new(),
        }
    }

    /// The service's qualified name (see the module docs), without the port.
    pub fn name(&self) -> String {
        qualified(&self.namespace, &self.service)
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.service)?;
        if self.namespace != DEFAULT_NAMESPACE {
            write!(f, ".{}", self.namespace)?;
        }
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        Ok(())
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
        assert_eq!(r.namespace, DEFAULT_NAMESPACE);
    }

    #[test]
    fn service_refs_in_namespaces() {
        let r = ServiceRef::parse("user.shop:grpc").unwrap();
        assert_eq!(
            (
                r.namespace.as_str(),
                r.service.as_str(),
                r.port_name.as_str()
            ),
            ("shop", "user", "grpc")
        );
        assert_eq!(
            (r.to_string(), r.name()),
            ("user.shop:grpc".into(), "user.shop".into())
        );
        // The default namespace is never written out, so `user.default` is `user`.
        assert_eq!(
            ServiceRef::parse("user.default").unwrap().to_string(),
            "user"
        );
        let relative = ServiceRef::parse_in("user", "shop").unwrap();
        assert_eq!(relative, ServiceRef::parse("user.shop").unwrap());
        assert!(ServiceRef::parse("user.Shop").is_err());
        assert!(ServiceRef::parse("user.").is_err());
        assert_eq!(qualify("shop", "user"), "user.shop");
        assert_eq!(qualify("shop", "user.other"), "user.other");
        assert_eq!(qualify("", "user"), "user");
        assert!(validate_service_name("user.shop").is_ok());
        assert!(validate_service_name("user.sh/op").is_err());
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
