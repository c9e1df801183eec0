//! ferrule-proxy: the binary's library, which only assembles.
//!
//! [`sidecar::Proxy`] assembles a sidecar from a [`config::Config`] and [`gateway::Gateway`] the
//! edge proxy from its flags and file; both serve [`admin`] and stop through the core's
//! lifecycle. The behaviour lives in the crates beside this one, re-exported here under the
//! names the tests and tools use:
//!
//! | crate | modules |
//! | --- | --- |
//! | `ferrule-proxy-core` | [`body`], [`headers`], [`context`], [`errors`], [`server`], [`detect`], [`observe`], [`metrics`], [`lifecycle`], [`logging`] |
//! | `ferrule-proxy-transport` | [`client`] (connections to endpoints and apps) |
//! | `ferrule-proxy-policy` | [`policy`], [`balance`] (synchronous decisions) |
//! | `ferrule-proxy-api` | [`control`], [`discovery`], [`registration`], and the Config stream client in [`api::policy`] |
//! | `ferrule-proxy-outbound` | [`outbound`] |
//! | `ferrule-proxy-inbound` | [`inbound`] |
//! | `ferrule-proxy-gateway` | [`gateway_layers`] |

pub mod admin;
pub mod config;
pub mod gateway;
pub mod sidecar;

pub use ferrule_proxy_api as api;
pub use ferrule_proxy_api::{control, discovery, registration};
pub use ferrule_proxy_core::{
    body, context, detect, errors, headers, lifecycle, logging, metrics, observe, server,
};
pub use ferrule_proxy_gateway as gateway_layers;
pub use ferrule_proxy_inbound as inbound;
pub use ferrule_proxy_outbound as outbound;
pub use ferrule_proxy_policy as policy;
pub use ferrule_proxy_policy::balance;
pub use ferrule_proxy_transport::client;
