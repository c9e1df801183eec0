//! Gateway mode: `ferrule-proxy gateway --config gateway.yaml`, the mesh's edge.
//!
//! One HTTP listener (default `:8000`) takes requests from outside the mesh, routes them by
//! path prefix to mesh services and forwards them through the same outbound stack a sidecar
//! uses (discovery, balancing, meshed HTTP/2 to the services' sidecars), after the edge's own
//! checks: JWT validation, rate limits, CORS and a request size limit. [`stack`] builds the
//! request path and swaps it when the config changes; [`config`] is the `Gateway` spec (from
//! the file or the streamed resource; docs/gateway.md is its reference); [`jwt`],
//! [`auth`], [`ratelimit`], [`cors`], [`size`] and [`routes`] are the steps; [`errors`] the
//! answers the gateway makes itself. The binary (`ferrule-proxy`'s `gateway` module) assembles
//! these with the outbound stack, the admin listener and the lifecycle a sidecar uses.

pub mod auth;
pub mod config;
pub mod cors;
pub mod errors;
pub mod jwt;
pub mod ratelimit;
pub mod routes;
pub mod size;
pub mod stack;
