//! Where the controller keeps things in the store. The one place that knows the key layout.
//!
//! * `/ferrule/registry/<service>/<port-name>/<address>:<port>`: a registered endpoint
//!   (protobuf `Endpoint`), attached to the registrant's lease.
//! * `/ferrule/proxies/<proxy-id>`: an announced proxy (protobuf `ProxyStatus`), under a lease.
//! * `/ferrule/config/<kind>/<namespace>/<name>`: config resources (issue #5).

use ferrule_proto::names::endpoint_key;
use ferrule_proto::v1::Endpoint;

pub const REGISTRY: &str = "/ferrule/registry/";
pub const PROXIES: &str = "/ferrule/proxies/";

/// Prefix of every endpoint of one service. The trailing slash keeps `user` from matching
/// `user-v2`.
pub fn service_prefix(service: &str) -> String {
    format!("{REGISTRY}{service}/")
}

pub fn endpoint(ep: &Endpoint) -> String {
    format!("{}{}", service_prefix(&ep.service), endpoint_key(ep))
}

/// The service an endpoint key belongs to, and the endpoint's key within it.
pub fn split_endpoint(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(REGISTRY)?.split_once('/')
}

pub fn proxy(proxy_id: &str) -> String {
    format!("{PROXIES}{proxy_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(key, "/ferrule/registry/user/grpc/127.0.0.1:4143");
        assert_eq!(split_endpoint(&key), Some(("user", "grpc/127.0.0.1:4143")));
        assert!(!key.starts_with(&service_prefix("use")));
    }
}
