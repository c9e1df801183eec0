//! How the proxy reaches what it forwards to: [`client`] connects to endpoints and apps,
//! through a [`pool`] per side that keys connections by who is at the other end, makes one
//! handshake for a cold key and closes connections left unused; [`metrics`] counts them. TLS
//! and the original destination of redirected connections will live here too.

pub mod client;
pub mod metrics;
pub mod pool;
