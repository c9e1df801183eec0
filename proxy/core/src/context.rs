//! What every request carries through a stack, in its extensions, and what its connection
//! knows about the peer.
//!
//! [`ConnMeta`] is made once per accepted connection; [`RequestContext`] is created from it
//! when each request arrives, and read by the layers that need to know which request this is
//! (metrics, access log, errors); the request's tracing span carries the same fields.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::Request;

use crate::metrics::Direction;

/// Where a connection came from and what it is for, for every request on it.
#[derive(Debug, Clone)]
pub struct ConnMeta {
    pub direction: Direction,
    pub target: Arc<str>,
    pub client: SocketAddr,
    /// The peer's mesh identity, authenticated by the connection's handshake (mTLS). `None`
    /// for a plaintext connection: nothing a client sends can make it a meshed peer.
    pub peer_identity: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Random, unique enough to find one request in the logs.
    pub id: String,
    pub direction: Direction,
    /// The service the request is for (outbound) or the fronted app port (inbound).
    pub target: Arc<str>,
    pub client: SocketAddr,
    pub start: Instant,
    /// The connection's authenticated peer identity (see [`ConnMeta::peer_identity`]).
    pub peer_identity: Option<Arc<str>>,
}

impl RequestContext {
    /// Builds the context of `req` on the connection `conn`, stores it in its extensions, and
    /// returns the span the request's events belong to (at debug level: free when disabled).
    pub fn attach<B>(req: &mut Request<B>, conn: &ConnMeta) -> tracing::Span {
        let ctx = RequestContext {
            id: format!("{:016x}", rand::random::<u64>()),
            direction: conn.direction,
            target: conn.target.clone(),
            client: conn.client,
            start: Instant::now(),
            peer_identity: conn.peer_identity.clone(),
        };
        let span = tracing::debug_span!(
            "request",
            id = %ctx.id,
            direction = %ctx.direction,
            target = %ctx.target,
            client = %ctx.client,
            meshed_peer = ctx.meshed_peer(),
        );
        req.extensions_mut().insert(ctx);
        span
    }

    /// Whether the request came from another proxy of the mesh, as its connection proved.
    pub fn meshed_peer(&self) -> bool {
        self.peer_identity.is_some()
    }
}
