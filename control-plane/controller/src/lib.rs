//! ferrule-controller: a stateless gRPC server over the store.
//!
//! Everything the controller knows lives in the store ([`keys`] says where), so any number of
//! replicas on one etcd give the same answers and a proxy may reconnect to any of them.
//! [`registry`] writes registrations under leases, [`discovery`] fans one store watch per
//! service out to every subscriber, [`config`] is the configuration centre, [`admin`] answers
//! the CLI, [`http`] serves `/live`,
//! `/ready` and `/metrics`, and [`webhook`] the HTTPS injection webhook (`--webhook-addr`);
//! [`trace`] makes each RPC a trace span when tracing is on; [`identity`] is the mesh CA and
//! [`tokenreview`] checks Kubernetes service-account tokens for it.

pub mod addresses;
pub mod admin;
pub mod config;
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
    let ca = match options.identity {
        Some(files) => identity::CaHandle::load(files, metrics.clone(), shutdown.clone())?,
        None => identity::CaHandle::disabled(),
    };
    let tracer = match options.trace {
        Some(config) => ferrule_trace::export::start(config, metrics.trace.clone())?,
        None => ferrule_trace::Tracer::default(),
    };
    let hub = discovery::Hub::new(store.clone(), metrics.clone());
    let grpc_addr: SocketAddr = grpc.local_addr()?;
    let admin_addr: SocketAddr = admin.local_addr()?;
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, store = %store.describe(), "controller serving");

    let router = tonic::transport::Server::builder()
        .layer(trace::RpcSpanLayer(tracer))
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
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
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
    let http_task = http::serve(admin, store, metrics, shutdown.clone());
    let (grpc_result, http_result) = tokio::join!(grpc_task, http_task);
    grpc_result?;
    http_result?;
    Ok(())
}
