//! Where the controller keeps things in the store. The one place that knows the key layout.
//!
//! * `/ferrule/registry/<namespace>/<service>/<port-name>/<address>:<port>`: a registered
//!   endpoint (protobuf `Endpoint`), attached to the registrant's lease. Registrations are
//!   leased and renewed by their proxies, so a layout change needs no migration: keys in an
//!   older layout expire with their leases while the proxies register again.
//! * `/ferrule/proxies/<proxy-id>`: an announced proxy (protobuf `ProxyStatus`), under a lease.
//! * `/ferrule/config/<kind>/<namespace>/<name>`: a config resource's spec as JSON.
//! * `/ferrule/lease-owners/<lease-id>`: the identity of the proxy a lease was granted to,
//!   under that lease, so a proxy may refresh and revoke its own leases only.
//! * `/ferrule/config/_version`: rewritten by every config commit; its revision is the config
//!   version.

use ferrule_config::{Kind, Resource};
use ferrule_proto::names::{endpoint_key, namespace_or_default, qualified};
use ferrule_proto::v1::Endpoint;

pub const REGISTRY: &str = "/ferrule/registry/";
pub const PROXIES: &str = "/ferrule/proxies/";
pub const CONFIG: &str = "/ferrule/config/";
/// Rewritten by every config commit: its revision is the config version.
pub const CONFIG_VERSION: &str = "/ferrule/config/_version";

/// Prefix of every endpoint of one service. The trailing slash keeps `user` from matching
/// `user-v2`.
pub fn service_prefix(namespace: &str, service: &str) -> String {
    format!("{REGISTRY}{}/{service}/", namespace_or_default(namespace))
}

pub fn endpoint(ep: &Endpoint) -> String {
    format!(
        "{}{}",
        service_prefix(&ep.namespace, &ep.service),
        endpoint_key(ep)
    )
}

/// Where an endpoint key sits: its service's namespace and name, and its key within the
/// service.
#[derive(Debug, PartialEq, Eq)]
pub struct EndpointKey<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    pub key: &'a str,
}

impl EndpointKey<'_> {
    /// The service's qualified name (`ferrule_proto::names`).
    pub fn qualified_service(&self) -> String {
        qualified(self.namespace, self.service)
    }
}

/// Splits a registry key into its namespace, service and endpoint key.
pub fn split_endpoint(key: &str) -> Option<EndpointKey<'_>> {
    let (namespace, rest) = key.strip_prefix(REGISTRY)?.split_once('/')?;
    let (service, key) = rest.split_once('/')?;
    Some(EndpointKey {
        namespace,
        service,
        key,
    })
}

pub fn config_key(kind: Kind, namespace: &str, name: &str) -> String {
    format!("{CONFIG}{kind}/{namespace}/{name}")
}

pub fn config(resource: &Resource) -> String {
    config_key(
        resource.kind,
        &resource.metadata.namespace,
        &resource.metadata.name,
    )
}

/// Which config keys a read selects: every kind, one kind, one namespace of it, or one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSelector {
    Prefix(String),
    /// One resource's key: a prefix would also select `web-v2` when asked for `web`.
    Exact(String),
}

impl ConfigSelector {
    /// `None` kind means every kind; a namespace or name without the level above it is refused.
    pub fn new(kind: &Option<Kind>, namespace: &str, name: &str) -> Result<Self, tonic::Status> {
        match (kind, namespace.is_empty(), name.is_empty()) {
            (None, true, true) => Ok(Self::Prefix(CONFIG.to_string())),
            (None, _, _) => Err(tonic::Status::invalid_argument(
                "kind: required when a namespace or name is given",
            )),
            (Some(kind), true, true) => Ok(Self::Prefix(format!("{CONFIG}{kind}/"))),
            (Some(kind), false, true) => Ok(Self::Prefix(format!("{CONFIG}{kind}/{namespace}/"))),
            (Some(kind), ns_empty, false) => {
                let namespace = if ns_empty { "default" } else { namespace };
                Ok(Self::Exact(config_key(*kind, namespace, name)))
            }
        }
    }

    pub fn matches(&self, key: &str) -> bool {
        match self {
            Self::Prefix(p) => key.starts_with(p.as_str()),
            Self::Exact(k) => key == k,
        }
    }
}

/// `(kind, namespace, name)` of a config key.
pub fn split_config(key: &str) -> Option<(&str, &str, &str)> {
    let mut parts = key.strip_prefix(CONFIG)?.splitn(3, '/');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

pub fn proxy(proxy_id: &str) -> String {
    format!("{PROXIES}{proxy_id}")
}

pub const LEASE_OWNERS: &str = "/ferrule/lease-owners/";

pub fn lease_owner(lease: i64) -> String {
    format!("{LEASE_OWNERS}{lease}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_resource_selects_only_itself() {
        let one = ConfigSelector::new(&Some(Kind::ServicePolicy), "", "web").unwrap();
        assert!(one.matches("/ferrule/config/ServicePolicy/default/web"));
        assert!(!one.matches("/ferrule/config/ServicePolicy/default/web-v2"));
        let kind = ConfigSelector::new(&Some(Kind::ServicePolicy), "", "").unwrap();
        assert!(kind.matches("/ferrule/config/ServicePolicy/default/web-v2"));
        assert!(!kind.matches("/ferrule/config/HTTPRoute/default/web"));
        assert!(ConfigSelector::new(&None, "", "web").is_err());
    }

    #[test]
    fn endpoint_keys_round_trip() {
        let ep = Endpoint {
            service: "user".into(),
            port_name: "grpc".into(),
            address: "127.0.0.1".into(),
            port: 4143,
            ..Default::default()
        };
        let key = endpoint(&ep);
        assert_eq!(key, "/ferrule/registry/default/user/grpc/127.0.0.1:4143");
        assert_eq!(
            split_endpoint(&key),
            Some(EndpointKey {
                namespace: "default",
                service: "user",
                key: "grpc/127.0.0.1:4143"
            })
        );
        assert!(!key.starts_with(&service_prefix("", "use")));
        let shop = Endpoint {
            namespace: "shop".into(),
            ..ep
        };
        let key = endpoint(&shop);
        assert_eq!(key, "/ferrule/registry/shop/user/grpc/127.0.0.1:4143");
        assert_eq!(
            split_endpoint(&key).unwrap().qualified_service(),
            "user.shop"
        );
    }
}
