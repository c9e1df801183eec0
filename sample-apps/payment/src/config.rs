//! The payment service's configuration: every setting, its environment variable and its
//! default in one struct, parsed by clap.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use shop_db::DatabaseUrl;

/// How to run the payment service.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "shop-payment",
    version,
    about = "The sample shop's payment service: gRPC PaymentService (idempotent CreatePayment, GetPayment), GET /health."
)]
pub struct Config {
    /// Address of the HTTP listener (health only).
    #[arg(long, env = "PAYMENT_HTTP_ADDR", default_value = "127.0.0.1:8003")]
    pub http_addr: SocketAddr,
    /// Address of the gRPC listener.
    #[arg(long, env = "PAYMENT_GRPC_ADDR", default_value = "127.0.0.1:50053")]
    pub grpc_addr: SocketAddr,
    /// The database: sqlite://PATH (created on start) or postgres://USER@HOST:PORT/DATABASE;
    /// migrated on start.
    #[arg(
        long,
        env = "PAYMENT_DATABASE_URL",
        default_value = "sqlite://./payment.db",
        value_name = "URL"
    )]
    pub database_url: DatabaseUrl,
    /// How long to keep trying to reach the database at start before giving up.
    #[arg(long, env = "PAYMENT_DATABASE_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub database_wait: Duration,
    /// Share of CreatePayment calls to fail with UNAVAILABLE, from 0 to 1 (resilience demos).
    #[arg(long, env = "PAYMENT_FAIL_RATE", default_value = "0")]
    pub fail_rate: FailRate,
}

/// A probability from 0 to 1.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FailRate(f64);

impl FailRate {
    pub fn new(rate: f64) -> Result<Self, String> {
        if (0.0..=1.0).contains(&rate) {
            Ok(Self(rate))
        } else {
            Err(format!("a fail rate is between 0 and 1, got {rate}"))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl FromStr for FailRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rate = s
            .parse()
            .map_err(|e| format!("a fail rate is a number between 0 and 1, got {s:?}: {e}"))?;
        Self::new(rate)
    }
}
