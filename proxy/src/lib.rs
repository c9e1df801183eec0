//! ferrule-proxy: the data plane.
//!
//! [`app::Proxy`] assembles a running proxy from a [`config::Config`]. The request path, read
//! top-down: [`outbound`] (traffic the app sends: target → logical service → balancer →
//! endpoint) and [`inbound`] (traffic to the app), both starting with protocol [`detect`]ion
//! and served by [`server`]; every HTTP stack starts with [`observe`] (metrics, access log)
//! and [`errors`] (proxy-made responses that explain themselves). Control-plane side:
//! [`discovery`] (endpoints of the services the app calls), [`balance`] (which endpoint gets a
//! request) and [`registration`] (health-check the app and keep its endpoints registered).
//! Operations: [`admin`], [`metrics`], [`logging`].

pub mod admin;
pub mod app;
pub mod balance;
pub mod body;
pub mod client;
pub mod config;
pub mod context;
pub mod control;
pub mod detect;
pub mod discovery;
pub mod errors;
pub mod gateway;
pub mod headers;
pub mod inbound;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod outbound;
pub mod policy;
pub mod registration;
pub mod server;
