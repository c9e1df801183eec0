//! One endpoint as the proxy uses it, resolved once from what discovery announced.
//!
//! Discovery speaks in protobuf `Endpoint`s (an address string, a port number, an identity
//! string). The data path wants a `SocketAddr` to dial, the identity to expect of the peer,
//! whether a Ferrule proxy fronts it, and the key its balancer slot, breaker and metrics use.
//! [`EndpointTarget::resolve`] turns one into the other when the endpoint set changes, so no
//! request re-parses strings.

use std::net::SocketAddr;
use std::sync::Arc;

use ferrule_proto::names::{endpoint_key, socket_string};
use ferrule_proto::v1::{Endpoint, ProtocolHint};

/// An endpoint ready to be balanced over and dialled. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointTarget {
    pub addr: SocketAddr,
    /// The identity discovery announced for it, which its certificate must carry once mTLS
    /// checks it; `None` when none was announced.
    pub identity: Option<Arc<str>>,
    /// Another Ferrule proxy's inbound listener (it takes HTTP/2 and the mesh headers).
    pub meshed: bool,
    pub hint: ProtocolHint,
    /// Relative share of requests, at least 1.
    pub weight: u32,
    /// `port-name/address:port`: the balancer slot, breaker entry and metric label.
    pub key: Arc<str>,
    /// The service it belongs to, for logs.
    pub service: Arc<str>,
}

/// An endpoint whose address is not an IP socket address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("endpoint {key}: address {address:?} is not an IP socket address")]
pub struct BadAddress {
    pub key: String,
    pub address: String,
}

impl EndpointTarget {
    /// The port dialled, as discovery's `u32`.
    pub fn port(&self) -> u32 {
        u32::from(self.addr.port())
    }

    pub fn resolve(ep: &Endpoint) -> Result<Self, BadAddress> {
        let address = socket_string(&ep.address, ep.port);
        let addr = address.parse().map_err(|_| BadAddress {
            key: endpoint_key(ep),
            address,
        })?;
        Ok(Self {
            addr,
            identity: (!ep.identity.is_empty()).then(|| Arc::from(ep.identity.as_str())),
            meshed: ep.meshed,
            hint: ProtocolHint::try_from(ep.protocol_hint).unwrap_or(ProtocolHint::Unspecified),
            weight: ep.weight.max(1),
            key: endpoint_key(ep).into(),
            service: ep.service.as_str().into(),
        })
    }

    /// Resolves every endpoint of a set; one that cannot be dialled is left out with a
    /// warning rather than failing the others.
    pub fn resolve_all<'a>(endpoints: impl IntoIterator<Item = &'a Endpoint>) -> Arc<[Self]> {
        endpoints
            .into_iter()
            .filter_map(|ep| match Self::resolve(ep) {
                Ok(target) => Some(target),
                Err(error) => {
                    tracing::warn!(%error, "endpoint left out of balancing");
                    None
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_addresses_identity_and_weight_once() {
        let ep = Endpoint {
            service: "user".into(),
            address: "::1".into(),
            port: 4143,
            identity: "spiffe://mesh/ns/default/sa/user".into(),
            meshed: true,
            weight: 0,
            ..Default::default()
        };
        let t = EndpointTarget::resolve(&ep).unwrap();
        assert_eq!(t.addr, "[::1]:4143".parse().unwrap());
        assert_eq!(
            t.identity.as_deref(),
            Some("spiffe://mesh/ns/default/sa/user")
        );
        assert!(t.meshed);
        assert_eq!(t.weight, 1, "weight 0 counts as 1");
        assert_eq!(&*t.key, endpoint_key(&ep));

        let bad = Endpoint {
            address: "user.example".into(),
            port: 1,
            ..Default::default()
        };
        assert!(EndpointTarget::resolve(&bad).is_err());
        assert_eq!(EndpointTarget::resolve_all([&ep, &bad]).len(), 1);
    }
}
