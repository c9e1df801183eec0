//! The order service's configuration: every setting, its environment variable and its default
//! in one struct, parsed by clap.

use std::net::SocketAddr;
use std::path::PathBuf;

use http::Uri;

/// How to run the order service.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "shop-order",
    version,
    about = "The sample shop's order service: POST /orders (checks the user, charges the payment), GET /orders/{id}, GET /orders?user_id=, GET /health."
)]
pub struct Config {
    /// Address of the HTTP listener.
    #[arg(long, env = "ORDER_HTTP_ADDR", default_value = "127.0.0.1:8002")]
    pub http_addr: SocketAddr,
    /// SQLite database file; created and migrated on start.
    #[arg(long, env = "ORDER_DB", default_value = "./order.db")]
    pub db: PathBuf,
    /// gRPC address of the user service (in the mesh: the sidecar's local port for `user`).
    #[arg(
        long,
        env = "ORDER_USER_GRPC_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub user_grpc_addr: Uri,
    /// gRPC address of the payment service (in the mesh: the sidecar's local port for `payment`).
    #[arg(
        long,
        env = "ORDER_PAYMENT_GRPC_ADDR",
        default_value = "http://127.0.0.1:50053"
    )]
    pub payment_grpc_addr: Uri,
}
