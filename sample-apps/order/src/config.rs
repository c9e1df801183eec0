//! The order service's configuration: every setting, its environment variable and its default
//! in one struct, parsed by clap.

use std::net::SocketAddr;
use std::time::Duration;

use http::Uri;
use shop_db::DatabaseUrl;

/// How to run the order service.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "shop-order",
    version,
    about = "The sample shop's order service: POST /orders (checks the user, charges the payment), GET /orders/{id}, GET /orders?user_id=, GET /health; and the same orders over gRPC (shop.order.v1.OrderService: CreateOrder, GetOrder).",
    after_help = "Example: shop-order --http-addr 127.0.0.1:8002 --grpc-addr 127.0.0.1:50052 --database-url sqlite://./order.db"
)]
pub struct Config {
    /// Address of the HTTP listener.
    #[arg(long, env = "ORDER_HTTP_ADDR", default_value = "127.0.0.1:8002")]
    pub http_addr: SocketAddr,
    /// Address of the gRPC listener (`shop.order.v1.OrderService`).
    #[arg(long, env = "ORDER_GRPC_ADDR", default_value = "127.0.0.1:50052")]
    pub grpc_addr: SocketAddr,
    /// The database: sqlite://PATH (created on start) or postgres://USER@HOST:PORT/DATABASE;
    /// migrated on start.
    #[arg(
        long,
        env = "ORDER_DATABASE_URL",
        default_value = "sqlite://./order.db",
        value_name = "URL"
    )]
    pub database_url: DatabaseUrl,
    /// How long to keep trying to reach the database at start before giving up.
    #[arg(long, env = "ORDER_DATABASE_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub database_wait: Duration,
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
