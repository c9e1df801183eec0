//! The small record every request carries through a stack, in its extensions.
//!
//! Created when the request arrives on a listener, read by the layers that need to know which
//! request this is (metrics, access log, errors); the request's tracing span carries the same
//! fields.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::Request;

use crate::headers;
use crate::metrics::Direction;

#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Random, unique enough to find one request in the logs.
    pub id: String,
    pub direction: Direction,
    /// The service the request is for (outbound) or the fronted app port (inbound).
    pub target: Arc<str>,
    pub client: SocketAddr,
    pub start: Instant,
    /// The request came from another ferrule proxy (inbound only).
    pub meshed_peer: bool,
}

impl RequestContext {
    /// Builds the context of `req`, stores it in its extensions, and returns the span the
    /// request's events belong to (at debug level: free when disabled).
    pub fn attach<B>(
        req: &mut Request<B>,
        direction: Direction,
        target: Arc<str>,
        client: SocketAddr,
    ) -> tracing::Span {
        let meshed_peer =
            direction == Direction::Inbound && req.headers().contains_key(headers::MESHED);
        let ctx = RequestContext {
            id: format!("{:016x}", rand::random::<u64>()),
            direction,
            target,
            client,
            start: Instant::now(),
            meshed_peer,
        };
        let span = tracing::debug_span!(
            "request",
            id = %ctx.id,
            %direction,
            target = %ctx.target,
            %client,
            meshed_peer,
        );
        req.extensions_mut().insert(ctx);
        span
    }
}
