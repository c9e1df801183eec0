//! How the proxy reaches what it forwards to: [`client`] connects to endpoints and apps,
//! through a [`pool`] per side that keys connections by who is at the other end, makes one
//! handshake for a cold key and closes connections left unused; `http2` carries requests over
//! pooled HTTP/2 connections with the `h2` crate directly (HTTP/1 and upgrades stay on hyper);
//! [`metrics`] counts them; [`orig_dst`] reads where a redirected connection was going; [`tls`]
//! is mutual TLS between proxies.

pub mod client;
mod http2;
pub mod metrics;
pub mod orig_dst;
pub mod pool;
pub mod tls;
