//! The shop's payment service: charges orders, exactly once per idempotency key.
//!
//! It serves gRPC `shop.payment.v1.PaymentService` (`CreatePayment`, `GetPayment`) and an HTTP
//! `GET /health`. Payments live in the service's own database, a SQLite file or a PostgreSQL
//! database (`--database-url`), migrated on start.
//! For resilience demos it can be told to fail a share of its charges (`PAYMENT_FAIL_RATE`), so
//! the mesh's retries and circuit breakers have something to do.
//!
//! It is a plain application: nothing in it knows about the mesh around it.

mod config;
mod grpc;
mod http;
mod store;
mod trace;

use std::net::SocketAddr;
use std::time::Duration;

use shop_proto::payment::v1::payment_service_server::PaymentServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

pub use config::{Config, FailRate};
pub use grpc::PaymentApi;
pub use shop_db::{DatabaseUrl, DbError};

use store::Store;

/// Why the payment service could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("payment database: {0}")]
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

/// The payment service: its database and its injected failure rate. Cheap to clone.
#[derive(Clone)]
pub struct PaymentApp {
    store: Store,
    fail_rate: FailRate,
}

impl PaymentApp {
    /// The service over the database at `db`; `fail_rate` of the `CreatePayment` calls will
    /// fail with UNAVAILABLE. Nothing is connected yet: requests fail with UNAVAILABLE (503 on
    /// HTTP) until [`PaymentApp::prepare`] has succeeded. Must run inside a tokio runtime.
    pub fn new(db: &DatabaseUrl, fail_rate: FailRate) -> Result<Self, Error> {
        Ok(Self {
            store: Store::new(db)?,
            fail_rate,
        })
    }

    /// Connects to the database (retrying for up to `wait` while it is unreachable) and
    /// migrates it. Safe to repeat.
    pub async fn prepare(&self, wait: Duration) -> Result<(), Error> {
        self.store.prepare(wait).await?;
        tracing::info!(database = %self.store.url(), "database ready");
        Ok(())
    }

    /// The gRPC `PaymentService`, for callers that build their own tonic server around it.
    pub fn grpc_service(&self) -> PaymentServiceServer<PaymentApi> {
        PaymentServiceServer::new(PaymentApi::new(self.store.clone(), self.fail_rate))
    }

    /// The HTTP routes (`/health`).
    pub fn router(&self) -> axum::Router {
        http::router(self.store.clone())
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
        },)?;
        Ok(())
    }
}

/// Runs the payment service as `config` says until `shutdown` is cancelled.
/// Once listening it prints one line to stdout, `shop-payment ready: {JSON}`, with the bound
/// addresses ("http" and "grpc"), so a caller can configure port 0 and read the port back.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let app = PaymentApp::new(&config.database_url, config.fail_rate)?;
    let (http, http_addr) = bind("HTTP", config.http_addr).await?;
    let (grpc, grpc_addr) = bind("gRPC", config.grpc_addr).await?;
    println!(
        "shop-payment ready: {}",
        serde_json::json!({ "http": http_addr, "grpc": grpc_addr })
    );
    tracing::info!(
        http = %http_addr,
        grpc = %grpc_addr,
        database = %config.database_url,
        fail_rate = config.fail_rate.get(),
        "payment service listening"
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
