//! ferrule-controller: a stateless gRPC server over the store.
//!
//! Everything the controller knows lives in the store ([`keys`] says where), so any number of
//! replicas on one etcd give the same answers and a proxy may reconnect to any of them.
//! [`registry`] writes registrations under leases, [`discovery`] fans one store watch per
//! service out to every subscriber, [`config`] is the configuration centre, [`admin`] answers
//! the CLI, [`http`] serves `/live`,
//! `/ready`, `/metrics` and the web [`dashboard`], and [`webhook`] the HTTPS injection webhook
//! (`--webhook-addr`); [`trace`] makes each RPC a trace span when tracing is on; [`auth`] serves
//! the gRPC port over TLS and decides who may call what when the controller is the mesh CA;
//! [`identity`] is the mesh CA and [`tokenreview`] checks Kubernetes service-account tokens for it.

pub mod addresses;
pub mod admin;
pub mod auth;
pub mod config;
pub mod dashboard;
pub mod discovery;
pub mod http;
pub mod identity;
pub mod keys;
pub mod metrics;
pub mod registry;
pub mod tokenreview;
pub mod trace;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use ferrule_proto::v1::{
    admin_server::AdminServer, config_server::ConfigServer, discovery_server::DiscoveryServer,
    identity_server::IdentityServer, registry_server::RegistryServer,
};
use ferrule_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a stopping controller waits for clients to close their connections.
pub const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// What a controller is besides registry, discovery and configuration.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The mesh CA's files; `None` runs without a CA (Identity answers FAILED_PRECONDITION).
    pub identity: Option<identity::CaFiles>,
    /// Where RPC spans are exported; `None`: tracing off.
    pub trace: Option<ferrule_trace::ExportConfig>,
    /// How the gRPC API is protected (with a CA only).
    pub auth: auth::AuthOptions,
    /// The trace API the dashboard lists recent traces from (`ferrule dev up`'s receiver);
    /// `None`: the dashboard shows no traces.
    pub traces_api: Option<SocketAddr>,
}

/// Runs the controller on already-bound listeners until `shutdown` is cancelled.
pub async fn serve(
    store: Arc<dyn Store>,
    grpc: TcpListener,
    admin: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with(store, grpc, admin, Options::default(), shutdown).await
}

/// [`serve`], with every RPC traced and exported as `export` says (off when `None`).
pub async fn serve_traced(
    store: Arc<dyn Store>,
    grpc: TcpListener,
    admin: TcpListener,
    shutdown: CancellationToken,
    export: Option<ferrule_trace::ExportConfig>,
) -> anyhow::Result<()> {
    let options = Options {
        trace: export,
        ..Options::default()
    };
    serve_with(store, grpc, admin, options, shutdown).await
}

/// A CSR, a token or a certificate is a few kilobytes; nothing sent to the CA needs more.
const MAX_IDENTITY_MESSAGE: usize = 64 * 1024;

/// [`serve`] with [`Options`].
pub async fn serve_with(
    store: Arc<dyn Store>,
    grpc: TcpListener,
    admin: TcpListener,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::default());
    let grpc_addr: SocketAddr = grpc.local_addr()?;
    let check_interval = options
        .identity
        .as_ref()
        .map_or(std::time::Duration::from_secs(10), |f| f.check_interval);
    let (ca, server_tls) = match options.identity {
        Some(files) => {
            let ca = identity::CaHandle::load(files, metrics.clone(), shutdown.clone())?;
            let mut names = options.auth.names.clone();
            if names.is_empty() {
                names = default_api_names(grpc_addr);
            }
            let tls = auth::ServerTls::start(ca.subscribe(), names, shutdown.clone())?;
            if options.auth.mode == auth::ApiAuth::Off {
                tracing::warn!(
                    "--api-auth off: the API is served over TLS but checks no caller; anyone who reaches it may register endpoints, change config and create join tokens"
                );
            }
            (ca, Some(tls))
        }
        None => {
            tracing::warn!(
                "no mesh CA (--identity-dir): the API is plaintext and open; anyone who reaches it may register endpoints and change config"
            );
            (identity::CaHandle::disabled(), None)
        }
    };
    let authorizer = auth::Authorizer::new(
        &options.auth,
        ca.subscribe(),
        metrics.clone(),
        check_interval,
        shutdown.clone(),
    )?;
    let tracer = match options.trace {
        Some(config) => ferrule_trace::export::start(config, metrics.trace.clone())?,
        None => ferrule_trace::Tracer::default(),
    };
    let hub = discovery::Hub::new(store.clone(), metrics.clone());
    let dashboard_ca = ca.subscribe();
    let admin_addr: SocketAddr = admin.local_addr()?;
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, store = %store.describe(), "controller serving");

    let router = tonic::transport::Server::builder()
        .layer(trace::RpcSpanLayer(tracer))
        .layer(auth::AuthLayer(authorizer))
        .add_service(RegistryServer::new(registry::RegistryService::new(
            store.clone(),
            metrics.clone(),
            shutdown.clone(),
        )))
        .add_service(DiscoveryServer::new(discovery::DiscoveryService::new(
            hub,
            addresses::AddressIndex::spawn(store.clone(), metrics.clone()),
            shutdown.clone(),
        )))
        .add_service(AdminServer::new(admin::AdminService::new(store.clone())))
        .add_service(ConfigServer::new(config::ConfigService::new(
            config::ConfigHub::spawn(store.clone(), metrics.clone()),
            shutdown.clone(),
        )))
        .add_service(
            IdentityServer::new(identity::IdentityService::new(
                store.clone(),
                ca,
                metrics.clone(),
            ))
            .max_decoding_message_size(MAX_IDENTITY_MESSAGE),
        );
    let incoming = auth::incoming(grpc, server_tls, metrics.clone(), shutdown.clone());
    let grpc_shutdown = shutdown.clone();
    let grpc_task = async {
        let serving =
            router.serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled_owned());
        tokio::pin!(serving);
        // Streams end when shutdown starts; a client that does not close its connection in
        // reply must not keep the controller from exiting.
        tokio::select! {
            result = &mut serving => result,
            _ = async { shutdown.cancelled().await; tokio::time::sleep(DRAIN_GRACE).await } => {
                tracing::warn!(grace = ?DRAIN_GRACE, "clients still connected after the drain grace; exiting");
                Ok(())
            }
        }
    };
    let dashboard = Arc::new(
        dashboard::Dashboard::new(store.clone(), options.traces_api).with_ca(dashboard_ca),
    );
    let http_task = http::serve(admin, store, metrics, dashboard, shutdown.clone());
    let (grpc_result, http_result) = tokio::join!(grpc_task, http_task);
    grpc_result?;
    http_result?;
    Ok(())
}

/// The names the API certificate carries when `--api-san` gives none: the listen address
/// (unless it is a wildcard), `localhost` and `127.0.0.1`.
fn default_api_names(grpc: SocketAddr) -> Vec<String> {
    let mut names = Vec::new();
    if !grpc.ip().is_unspecified() {
        names.push(grpc.ip().to_string());
    }
    for name in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names
}
