//! The user service's configuration: every setting, its environment variable and its default
//! in one struct, parsed by clap.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use shop_db::DatabaseUrl;

use crate::Error;

/// How to run the user service.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "shop-user",
    version,
    about = "The sample shop's user service: gRPC UserService, HTTP POST /login issuing HS256 JWTs, GET /users/{id}, GET /health."
)]
pub struct Config {
    /// Address of the HTTP listener.
    #[arg(long, env = "USER_HTTP_ADDR", default_value = "127.0.0.1:8001")]
    pub http_addr: SocketAddr,
    /// Address of the gRPC listener.
    #[arg(long, env = "USER_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// The database: sqlite://PATH (created on start) or postgres://USER@HOST:PORT/DATABASE;
    /// migrated and seeded on start.
    #[arg(
        long,
        env = "USER_DATABASE_URL",
        default_value = "sqlite://./user.db",
        value_name = "URL"
    )]
    pub database_url: DatabaseUrl,
    /// How long to keep trying to reach the database at start before giving up.
    #[arg(long, env = "USER_DATABASE_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub database_wait: Duration,
    /// Key that signs login tokens (HS256). Exactly one of this and --jwt-secret-file is required.
    #[arg(long, env = "USER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding the key that signs login tokens; a trailing newline is ignored.
    #[arg(long, env = "USER_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// How long a login token is valid, e.g. "1h" or "15m".
    #[arg(long, env = "USER_JWT_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub jwt_ttl: Duration,
}

impl Config {
    /// The token signing key, from `--jwt-secret` or `--jwt-secret-file`.
    pub fn signing_key(&self) -> Result<Vec<u8>, Error> {
        match (&self.jwt_secret, &self.jwt_secret_file) {
            (Some(secret), None) => Ok(secret.clone().into_bytes()),
            (None, Some(path)) => {
                let mut key = std::fs::read(path).map_err(|e| {
                    Error::SigningKey(format!("reading {}: {e}", path.display()))
                })?;
                while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    key.pop();
                }
                Ok(key)
            }
            (Some(_), Some(_)) => Err(Error::SigningKey(
                "both USER_JWT_SECRET and USER_JWT_SECRET_FILE are set; set only one".into(),
            )),
            (None, None) => Err(Error::SigningKey(
                "set USER_JWT_SECRET or USER_JWT_SECRET_FILE (the gateway verifies tokens with the same key)".into(),
            )),
        }
    }
}
