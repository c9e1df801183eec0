//! The shop's user service: who the shop's customers are, and how they log in.
//!
//! It serves two listeners: gRPC `shop.user.v1.UserService` (`GetUser`, `ListUsers`) for other
//! services, and HTTP (`POST /login`, `GET /users/{id}`, `GET /health`) for people. Users live in
//! the service's own SQLite file, created, migrated and seeded with demo users on start. A login
//! checks an argon2 password hash and answers with an HS256 JWT the edge gateway can verify.
//!
//! It is a plain application: nothing in it knows about the mesh around it.

mod config;
mod grpc;
mod http;
mod store;
mod token;
mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shop_proto::user::v1::user_service_server::UserServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

pub use config::Config;
pub use grpc::UserApi;
pub use shop_db::{DatabaseUrl, DbError};

use store::Store;
use token::TokenIssuer;

/// Why the user service could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("user database: {0}")]
    Database(#[from] DbError),
    #[error("JWT signing key: {0}")]
    SigningKey(String),
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

/// The user service: its database and its token issuer. Cheap to clone.
#[derive(Clone)]
pub struct UserApp {
    store: Store,
    tokens: Arc<TokenIssuer>,
}

impl UserApp {
    /// The service over the database at `db`, signing login tokens with `signing_key`, valid
    /// for `token_ttl`. Nothing is connected yet: requests answer 503 until
    /// [`UserApp::prepare`] has succeeded. Must run inside a tokio runtime.
    pub fn new(db: &DatabaseUrl, signing_key: &[u8], token_ttl: Duration) -> Result<Self, Error> {
        if signing_key.is_empty() {
            return Err(Error::SigningKey("the key is empty".into()));
        }
        Ok(Self {
            store: Store::new(db)?,
            tokens: Arc::new(TokenIssuer::new(signing_key, token_ttl)),
        })
    }

    /// Connects to the database (retrying for up to `wait` while it is unreachable), migrates
    /// it and adds the missing demo users. Safe to repeat, and from several replicas at once.
    pub async fn prepare(&self, wait: Duration) -> Result<(), Error> {
        self.store.prepare(wait).await?;
        tracing::info!(database = %self.store.url(), "database ready");
        Ok(())
    }

    /// The gRPC `UserService`, for callers that build their own tonic server around it.
    pub fn grpc_service(&self) -> UserServiceServer<UserApi> {
        UserServiceServer::new(UserApi::new(self.store.clone()))
    }

    /// The HTTP routes (`/login`, `/users/{id}`, `/health`).
    pub fn router(&self) -> axum::Router {
        http::router(self.store.clone(), self.tokens.clone())
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

/// Runs the user service as `config` says until `shutdown` is cancelled.
/// Once listening it prints one line to stdout, `shop-user ready: {JSON}`, with the bound
/// addresses ("http" and "grpc"), so a caller can configure port 0 and read the port back.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let key = config.signing_key()?;
    let app = UserApp::new(&config.database_url, &key, config.jwt_ttl)?;
    let (http, http_addr) = bind("HTTP", config.http_addr).await?;
    let (grpc, grpc_addr) = bind("gRPC", config.grpc_addr).await?;
    println!(
        "shop-user ready: {}",
        serde_json::json!({ "http": http_addr, "grpc": grpc_addr })
    );
    tracing::info!(http = %http_addr, grpc = %grpc_addr, database = %config.database_url, "user service listening");
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
