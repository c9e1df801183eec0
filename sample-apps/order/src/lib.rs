//! The shop's order service: takes orders over HTTP and settles them with the other services.
//!
//! `POST /orders` checks the user with the user service (gRPC `GetUser`), stores the order as
//! pending, charges it through the payment service (gRPC `CreatePayment`, with the order id as
//! idempotency key) and stores the outcome. `GET /orders/{id}` and `GET /orders?user_id=` read
//! the service's own SQLite file; `GET /health` says it is up.
//!
//! It is a plain application: it calls its upstreams at fixed addresses from its configuration
//! (in the mesh, the sidecar's local ports) and only copies the caller's trace headers onto those
//! calls. Discovery, retries, timeouts and TLS are the mesh's job, not its own.

mod config;
mod http;
mod store;
mod trace;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ::http::Uri;
use shop_proto::payment::v1::payment_service_client::PaymentServiceClient;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

pub use config::Config;

use store::Store;

/// Why the order service could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening order database {path}: {source}")]
    Database {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("binding HTTP listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving HTTP: {0}")]
    Http(std::io::Error),
}

/// Where the order service's upstreams are, as `http://host:port` gRPC addresses.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub user: Uri,
    pub payment: Uri,
}

/// The order service: its database and its clients of the user and payment services. Cheap to
/// clone.
#[derive(Clone)]
pub struct OrderApp {
    store: Store,
    users: UserServiceClient<Channel>,
    payments: PaymentServiceClient<Channel>,
}

impl OrderApp {
    /// Opens (creating and migrating as needed) the database at `db`. Upstream connections are
    /// made on first use, so the upstreams need not be up yet. Must run inside a tokio runtime.
    pub fn open(db: &Path, upstreams: Upstreams) -> Result<Self, Error> {
        let store = Store::open(db).map_err(|source| Error::Database {
            path: db.to_owned(),
            source,
        })?;
        Ok(Self {
            store,
            users: UserServiceClient::new(Endpoint::from(upstreams.user).connect_lazy()),
            payments: PaymentServiceClient::new(Endpoint::from(upstreams.payment).connect_lazy()),
        })
    }

    /// The HTTP routes (`/orders`, `/orders/{id}`, `/health`).
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }

    /// Serves HTTP on `listener` until `shutdown` is cancelled, then lets in-flight requests
    /// finish.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(Error::Http)
    }
}

/// Runs the order service as `config` says until `shutdown` is cancelled.
/// Once listening it prints one line to stdout, `shop-order ready: {JSON}`, with the bound
/// addresses ("http"), so a caller can configure port 0 and read the port back.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let upstreams = Upstreams {
        user: config.user_grpc_addr.clone(),
        payment: config.payment_grpc_addr.clone(),
    };
    let app = OrderApp::open(&config.db, upstreams)?;
    let bind_error = |source| Error::Bind {
        addr: config.http_addr,
        source,
    };
    let listener = TcpListener::bind(config.http_addr)
        .await
        .map_err(bind_error)?;
    let http_addr = listener.local_addr().map_err(bind_error)?;
    println!(
        "shop-order ready: {}",
        serde_json::json!({ "http": http_addr })
    );
    tracing::info!(
        http = %http_addr,
        db = %config.db.display(),
        user = %config.user_grpc_addr,
        payment = %config.payment_grpc_addr,
        "order service listening"
    );
    app.serve(listener, shutdown).await
}
