//! The shop's order service: takes orders over HTTP and settles them with the other services.
//!
//! `POST /orders` checks the user with the user service (gRPC `GetUser`), stores the order as
//! pending, charges it through the payment service (gRPC `CreatePayment`, with the order id as
//! idempotency key) and stores the outcome. `GET /orders/{id}` and `GET /orders?user_id=` read
//! the service's own database (a SQLite file or a PostgreSQL database, `--database-url`);
//! `GET /health` says it is up and its database answers. The same orders are served over gRPC
//! on a port of their own (`shop.order.v1.OrderService`: `CreateOrder`, `GetOrder`), placed
//! and read by the same code ([`orders`]) as the HTTP routes.
//!
//! It is a plain application: it calls its upstreams at fixed addresses from its configuration
//! (in the mesh, the sidecar's local ports) and only copies the caller's trace headers onto those
//! calls. Discovery, retries, timeouts and TLS are the mesh's job, not its own.

mod config;
mod grpc;
mod http;
mod orders;
mod store;
mod trace;

use std::net::SocketAddr;
use std::time::Duration;

use ::http::Uri;
use shop_proto::order::v1::order_service_server::OrderServiceServer;
use shop_proto::payment::v1::payment_service_client::PaymentServiceClient;
use shop_proto::user::v1::user_service_client::UserServiceClient;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tower_http::trace::TraceLayer;

pub use config::Config;
pub use grpc::OrderApi;
pub use shop_db::{DatabaseUrl, DbError};

use store::Store;

/// Why the order service could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("order database: {0}")]
    Database(#[from] DbError),
    #[error("binding {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving HTTP: {0}")]
    Http(std::io::Error),
    #[error("serving gRPC: {0}")]
    Grpc(tonic::transport::Error),
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
    /// The service over the database at `db`. Nothing is connected yet: requests answer 503
    /// until [`OrderApp::prepare`] has succeeded; upstream connections are made on first use,
    /// so the upstreams need not be up yet. Must run inside a tokio runtime.
    pub fn new(db: &DatabaseUrl, upstreams: Upstreams) -> Result<Self, Error> {
        Ok(Self {
            store: Store::new(db)?,
            users: UserServiceClient::new(Endpoint::from(upstreams.user).connect_lazy()),
            payments: PaymentServiceClient::new(Endpoint::from(upstreams.payment).connect_lazy()),
        })
    }

    /// Connects to the database (retrying for up to `wait` while it is unreachable) and
    /// migrates it. Safe to repeat.
    pub async fn prepare(&self, wait: Duration) -> Result<(), Error> {
        self.store.prepare(wait).await?;
        tracing::info!(database = %self.store.url(), "database ready");
        Ok(())
    }

    /// The HTTP routes (`/orders`, `/orders/{id}`, `/health`).
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }

    /// The gRPC `OrderService`, for callers that build their own tonic server around it.
    pub fn grpc_service(&self) -> OrderServiceServer<OrderApi> {
        OrderServiceServer::new(OrderApi::new(self.clone()))
    }

    /// Serves HTTP on `http` and gRPC on `grpc` until `shutdown` is cancelled, then lets
    /// in-flight requests finish.
    pub async fn serve(
        &self,
        http: TcpListener,
        grpc: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let http_server = axum::serve(http, self.router())
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let grpc_server = tonic::transport::Server::builder()
            .layer(TraceLayer::new_for_grpc().make_span_with(trace::request_span))
            .add_service(self.grpc_service())
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), shutdown.cancelled_owned());
        tokio::try_join!(async { http_server.await.map_err(Error::Http) }, async {
            grpc_server.await.map_err(Error::Grpc)
        })?;
        Ok(())
    }
}

/// Runs the order service as `config` says until `shutdown` is cancelled.
/// Once listening it prints one line to stdout, `shop-order ready: {JSON}`, with the bound
/// addresses ("http" and "grpc"), so a caller can configure port 0 and read the port back.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let upstreams = Upstreams {
        user: config.user_grpc_addr.clone(),
        payment: config.payment_grpc_addr.clone(),
    };
    let app = OrderApp::new(&config.database_url, upstreams)?;
    let (http, http_addr) = bind("HTTP", config.http_addr).await?;
    let (grpc, grpc_addr) = bind("gRPC", config.grpc_addr).await?;
    println!(
        "shop-order ready: {}",
        serde_json::json!({ "http": http_addr, "grpc": grpc_addr })
    );
    tracing::info!(
        http = %http_addr,
        grpc = %grpc_addr,
        database = %config.database_url,
        user = %config.user_grpc_addr,
        payment = %config.payment_grpc_addr,
        "order service listening"
    );
    // Listening first, connecting second: in the mesh the database is reached through the
    // sidecar, which starts once the app is listening. Until then /health answers 503.
    let serving = app.serve(http, grpc, shutdown);
    tokio::pin!(serving);
    tokio::select! {
        stopped = &mut serving => return stopped,
        prepared = app.prepare(config.database_wait) => prepared?,
    }
    serving.await
}

/// Binds `addr`; returns the listener and the address it got (the port the system chose when
/// `addr` has port 0).
async fn bind(what: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let error = |source| Error::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    Ok((listener, bound))
}
