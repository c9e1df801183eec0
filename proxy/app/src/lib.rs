//! ferrule-proxy: the binary's library, which only assembles.
//!
//! [`sidecar::Proxy`] assembles a sidecar from a [`config::Config`] and [`gateway::Gateway`] the
//! edge proxy from its flags and file; both start their [`identity`], serve [`admin`] and stop
//! through the core's lifecycle. The behaviour lives in the crates beside this one, re-exported here under the
//! names the tests and tools use:
//!
//! | crate | modules |
//! | --- | --- |
//! | `ferrule-proxy-core` | [`body`], [`headers`], [`context`], [`errors`], [`server`], [`detect`], [`observe`], [`metrics`], [`lifecycle`], [`logging`] |
//! | `ferrule-proxy-transport` | [`client`] (connections to endpoints and apps), [`tls`] (mutual TLS) |
//! | `ferrule-proxy-policy` | [`policy`], [`balance`] (synchronous decisions) |
//! | `ferrule-proxy-api` | [`control`], [`discovery`], [`registration`], and the Config stream client in [`api::policy`] |
//! | `ferrule-proxy-outbound` | [`outbound`] |
//! | `ferrule-proxy-inbound` | [`inbound`] |
//! | `ferrule-proxy-gateway` | [`gateway_layers`] |

pub mod admin;
pub mod config;
pub mod gateway;
pub mod identity;
pub mod init;
pub mod sidecar;
pub mod trace;

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
pub use ferrule_proxy_transport::{client, tls};

/// Prints the ready line, `ferrule-proxy ready: {JSON}` with the listeners actually bound, to
/// stdout (the logs go to stderr): the same line for the sidecar and the gateway, so a starter
/// can bind port 0 and read the ports back.
pub fn announce_ready(listeners: &impl serde::Serialize) {
    match serde_json::to_string(listeners) {
        Ok(json) => println!("ferrule-proxy ready: {json}"),
        Err(error) => tracing::error!(%error, "cannot print the ready line"),
    }
}

/// Cancels `shutdown` (the graceful shutdown) on SIGTERM or SIGINT.
pub fn shutdown_on_signals(shutdown: tokio_util::sync::CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            () = shutdown.cancelled() => return,
        }
        shutdown.cancel();
    });
    Ok(())
}
