//! One endpoint: how a request reaches the address the balancer picked.
//!
//! A meshed endpoint (another ferrule proxy's inbound listener) gets one multiplexed HTTP/2
//! connection that carries every request, HTTP/1 ones included: they are marked with
//! `ferrule-orig-proto` and the peer turns them back into HTTP/1 for its app. Upgrades stay on
//! HTTP/1 connections of their own. A plain endpoint gets the request in the version the client
//! spoke. This is where mTLS to meshed peers will be added.

use std::sync::Arc;
use std::time::Duration;

use ferrule_proxy_policy::endpoint::EndpointTarget;
use http::{HeaderValue, Request, Version};

use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::errors::{ProxyError, Reason};
use ferrule_proxy_core::headers;
use ferrule_proxy_transport::client::{ClientError, Clients, Conn, Dst, Protocol};
use ferrule_proxy_transport::pool::Identity;

#[derive(Clone)]
pub struct EndpointConnector {
    clients: Clients,
}

impl EndpointConnector {
    pub fn new(clients: Clients) -> Self {
        Self { clients }
    }

    /// Connects to `ep` for a request that needs `protocol` (see [`Protocol::of`]); nothing
    /// is sent yet. A new connection closes after `idle_timeout` unused (the service's
    /// `timeouts.idle`).
    pub async fn connect(
        &self,
        ep: &EndpointTarget,
        protocol: Protocol,
        idle_timeout: Duration,
    ) -> Result<Conn, ClientError> {
        let addr = ep.addr;
        let protocol = match protocol {
            Protocol::Http1 if ep.meshed => Protocol::Http2,
            protocol => protocol,
        };
        let dst = Dst {
            addr,
            // The identity is part of the pool key now; mTLS will verify it.
            identity: ep.identity.clone().map(Identity::new),
            idle_timeout: Some(idle_timeout),
        };
        self.clients.connect(dst, protocol).await
    }

    /// Adds the mesh header a meshed peer expects; a mesh header the app itself sent never
    /// leaves (only this proxy speaks for the mesh). Whether a request came from a meshed
    /// peer is never said in a header: the peer's side knows it from the connection
    /// (its authenticated identity, see `ConnMeta::peer_identity`).
    pub fn prepare(&self, ep: &EndpointTarget, req: &mut Request<BoxBody>) {
        req.headers_mut().remove(headers::ORIG_PROTO);
        if !ep.meshed {
            return;
        }
        if !headers::is_upgrade(req) && req.version() != Version::HTTP_2 {
            req.headers_mut().insert(
                headers::ORIG_PROTO,
                HeaderValue::from_static(headers::ORIG_PROTO_HTTP1),
            );
        }
    }

    /// Undoes [`Self::prepare`] and the connection's fitting, before the request goes to
    /// another endpoint.
    pub fn unprepare(&self, req: &mut Request<BoxBody>, version: Version) {
        req.headers_mut().remove(headers::ORIG_PROTO);
        *req.version_mut() = version;
    }
}

/// The error a request sees when no endpoint could be connected.
pub fn connect_failure(service: &Arc<str>, error: &ClientError) -> ProxyError {
    ProxyError::new(
        Reason::UpstreamConnectFailure,
        service.to_string(),
        format!("could not connect to any endpoint of {service}: {error}"),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use ferrule_proxy_core::body;
    use ferrule_proxy_core::metrics::Direction;
    use ferrule_proxy_transport::client::ClientConfig;
    use ferrule_proxy_transport::metrics::PoolMetrics;

    fn endpoint(meshed: bool) -> EndpointTarget {
        EndpointTarget::resolve(&ferrule_proto::v1::Endpoint {
            address: "127.0.0.1".into(),
            port: 4143,
            meshed,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn mesh_headers_go_only_to_meshed_peers() {
        let clients = Clients::new(
            Direction::Outbound,
            ClientConfig {
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
            },
            &PoolMetrics::default(),
        );
        let connector = EndpointConnector::new(clients);
        let mut spoofed = Request::get("/")
            .header(headers::ORIG_PROTO, "HTTP/9")
            .body(body::empty())
            .unwrap();
        connector.prepare(&endpoint(false), &mut spoofed);
        assert!(!spoofed.headers().contains_key(headers::ORIG_PROTO));

        let mut req = Request::get("/").body(body::empty()).unwrap();
        connector.prepare(&endpoint(true), &mut req);
        assert_eq!(
            req.headers()[headers::ORIG_PROTO],
            headers::ORIG_PROTO_HTTP1
        );
        *req.version_mut() = Version::HTTP_2;
        connector.unprepare(&mut req, Version::HTTP_11);
        assert_eq!(req.version(), Version::HTTP_11);
        assert!(!req.headers().contains_key(headers::ORIG_PROTO));
    }
}
