//! What every request carries through a stack, in its extensions, and what its connection
//! knows about the peer.
//!
//! [`ConnMeta`] is made once per accepted connection; [`RequestContext`] is created from it
//! when each request arrives, and read by the layers that need to know which request this is
//! (metrics, access log, errors); the request's tracing span carries the same fields.

use std::fmt;
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

/// A request's id in logs and tap events: random, unique enough to find one request in the
/// logs, or the trace and span ids of its server span when tracing is on. A number until
/// something prints it: formatting it for every request cost an allocation and a few hundred
/// instructions that only the access log and tap use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestId {
    Random(u64),
    Trace(String),
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestId::Random(n) => write!(f, "{n:016x}"),
            RequestId::Trace(id) => f.write_str(id),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestContext {
    pub id: RequestId,
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
            id: RequestId::Random(rand::random()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_print_as_sixteen_hex_digits_or_the_trace_ids() {
        assert_eq!(RequestId::Random(0xab).to_string(), "00000000000000ab");
        assert_eq!(RequestId::Random(u64::MAX).to_string(), "ffffffffffffffff");
        assert_eq!(RequestId::Trace("t-s".into()).to_string(), "t-s");
    }
}
