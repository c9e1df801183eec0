//! The proxy's core: what every listener and every stack share.
//!
//! [`body`] and [`headers`] are the HTTP vocabulary; [`context`] is what a request carries
//! through the stack; [`errors`] the reasons the proxy answers a request itself and how such
//! an answer looks; [`server`] accepts connections and serves HTTP on them after protocol
//! [`detect`]ion; [`observe`] is the first layer of every HTTP stack (metrics, access log);
//! [`metrics`] the core's own families and the registry other crates add theirs to;
//! [`lifecycle`] the shutdown order; [`logging`] the subscriber; [`trace`] the server span of
//! each request and the trace context every hop passes on; [`shared`] calls one stored
//! service for many requests without a clone per request; [`stack::BoxStack`] holds a whole
//! stack behind one type without boxing its futures twice; [`FastMap`] is the map for keys
//! looked up on every request.

pub mod body;
pub mod context;
pub mod detect;
pub mod errors;
pub mod headers;
pub mod idle_cache;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod reason;
pub mod server;
pub mod shared;
pub mod stack;
pub mod tap;
pub mod trace;

/// A `HashMap` for keys the proxy looks up on every request (pool keys, breaker endpoints):
/// foldhash instead of std's SipHash, which cost about 300 instructions per lookup of a pool
/// key. The keys come from discovery, not from clients, so SipHash's resistance to chosen
/// keys buys nothing here; the seed is still random per process.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
