//! The connection service, the innermost of the endpoint level: how a request reaches the
//! address the balancer picked.
//!
//! [`Connect`] takes a connection from the pool (or makes one: one handshake per cold key),
//! adds the mesh header a meshed peer expects, and sends. Its `poll_ready` is always ready:
//! which connection a request needs (HTTP/1, HTTP/2, an upgrade) is known only from the
//! request, and the pool bounds connects per key itself. When nothing was sent (connecting
//! failed, or the connection closed before the request left) the request comes back in
//! [`EndpointError::Unsent`], as it arrived, for the balancer to send elsewhere; a connection
//! that broke after the request left is [`EndpointError::Broken`].
//!
//! A meshed endpoint (another ferrule proxy's inbound listener) gets one multiplexed HTTP/2
//! connection that carries every request, HTTP/1 ones included: they are marked with
//! `ferrule-orig-proto` and the peer turns them back into HTTP/1 for its app. Upgrades stay on
//! HTTP/1 connections of their own. A plain endpoint gets the request in the version the client
//! spoke. This is where mTLS to meshed peers will be added.

use std::task::{Context, Poll};
use std::time::Duration;

use ferrule_proxy_policy::endpoint::EndpointTarget;
use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response, Version};
use tower::Service;

use super::EndpointError;
use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::headers;
use ferrule_proxy_transport::client::{ClientError, Clients, Conn, Dst, Protocol, SendError};
use ferrule_proxy_transport::pool::Identity;

#[derive(Clone)]
pub struct EndpointConnector {
    clients: Clients,
    /// Whether responses carry [`PeerEndpoint`](ferrule_proxy_core::trace::PeerEndpoint),
    /// the endpoint that answered, for the attempt's trace span. Off unless tracing is on:
    /// the extension costs two allocations per response.
    report_peer: bool,
}

impl EndpointConnector {
    pub fn new(clients: Clients) -> Self {
        Self {
            clients,
            report_peer: false,
        }
    }

    /// Marks every response with the endpoint that answered (for tracing).
    pub fn report_peer(mut self, on: bool) -> Self {
        self.report_peer = on;
        self
    }

    /// Connects to `ep` for a request that needs `protocol` (see [`Protocol::of`]); nothing
    /// is sent yet. A new connection closes after `idle_timeout` unused (the service's
    /// `timeouts.idle`).
    async fn connect(
        &self,
        ep: &EndpointTarget,
        identity: Option<Identity>,
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
            // Part of the pool key; mutual TLS makes the peer prove it.
            identity,
            idle_timeout: Some(idle_timeout),
        };
        self.clients.connect(dst, protocol).await
    }

    /// Adds the mesh header a meshed peer expects; a mesh header the app itself sent never
    /// leaves (only this proxy speaks for the mesh). Whether a request came from a meshed
    /// peer is never said in a header: the peer's side knows it from the connection
    /// (its authenticated identity, see `ConnMeta::peer_identity`).
    fn prepare(&self, ep: &EndpointTarget, req: &mut Request<BoxBody>) {
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
    fn unprepare(&self, req: &mut Request<BoxBody>, version: Version) {
        req.headers_mut().remove(headers::ORIG_PROTO);
        *req.version_mut() = version;
    }
}

/// The connection service of one endpoint: connect, prepare, send. Built per attempt from
/// reference counts only (no allocation); each request's future holds a clone.
#[derive(Clone)]
pub struct Connect {
    connector: EndpointConnector,
    target: EndpointTarget,
    /// How long a new connection may stay unused (the service's `timeouts.idle`).
    idle_timeout: Duration,
}

impl Connect {
    pub fn new(
        connector: EndpointConnector,
        target: EndpointTarget,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            connector,
            target,
            idle_timeout,
        }
    }
}

impl Service<Request<BoxBody>> for Connect {
    type Response = Response<BoxBody>;
    type Error = EndpointError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, EndpointError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), EndpointError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let version = req.version();
            let protocol = Protocol::of(&req);
            // The identity the endpoint must prove, as the pool keys it.
            let identity = this.target.identity.clone().map(Identity::new);
            let conn = match this
                .connector
                .connect(&this.target, identity, protocol, this.idle_timeout)
                .await
            {
                Ok(conn) => conn,
                Err(error) => {
                    return Err(EndpointError::Unsent {
                        error,
                        req: Box::new(req),
                    });
                }
            };
            this.connector.prepare(&this.target, &mut req);
            match conn.send(req).await {
                Ok(mut rsp) => {
                    if this.connector.report_peer {
                        rsp.extensions_mut()
                            .insert(ferrule_proxy_core::trace::PeerEndpoint(this.target.addr));
                    }
                    Ok(rsp)
                }
                // Undo what this endpoint's connection changed, for the next endpoint.
                Err(SendError {
                    error,
                    unsent: Some(mut req),
                }) => {
                    this.connector.unprepare(&mut req, version);
                    Err(EndpointError::Unsent {
                        error,
                        req: Box::new(req),
                    })
                }
                Err(SendError {
                    error,
                    unsent: None,
                }) => Err(EndpointError::Broken(error)),
            }
        })
    }
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
