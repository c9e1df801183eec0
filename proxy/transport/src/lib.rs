//! How the proxy reaches what it forwards to: [`client`] connects to endpoints and apps,
//! through a [`pool`] per side that keys connections by who is at the other end, makes one
//! handshake for a cold key and closes connections left unused; [`metrics`] counts them;
//! [`orig_dst`] reads where a redirected connection was going; [`tls`] is mutual TLS between
//! proxies.

pub mod client;
pub mod metrics;
pub mod orig_dst;
pub mod pool;
pub mod tls;
