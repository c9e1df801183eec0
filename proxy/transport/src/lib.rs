//! How the proxy reaches what it forwards to: [`client`] connects to endpoints and apps and
//! pools the connections. TLS and the original destination of redirected connections will
//! live here too.

pub mod client;
