//! The payment service on real loopback sockets with a throw-away database: idempotent charges,
//! lookups, validation, injected failures and health. Every behaviour test runs twice, on
//! SQLite and on a real PostgreSQL server the test starts and removes (`sqlite::*` and
//! `postgres::*`); the PostgreSQL ones fail when PostgreSQL is not installed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use shop_db::on_both_backends;
use shop_db::test_server::{Backend, TestDb};
use shop_payment::{FailRate, PaymentApp};
use shop_proto::payment::v1::payment_service_client::PaymentServiceClient;
use shop_proto::payment::v1::{CreatePaymentRequest, GetPaymentRequest, PaymentStatus};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const BOUND: Duration = Duration::from_secs(10);

/// A running payment service; stops when dropped.
struct Running {
    http: SocketAddr,
    grpc: SocketAddr,
    db: TestDb,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

on_both_backends!(
    the_same_idempotency_key_charges_once,
    reusing_a_key_for_another_charge_is_refused,
    invalid_charges_and_unknown_payments_are_rejected,
    a_fail_rate_of_one_fails_every_charge_and_stores_nothing,
    health_answers_json,
);

/// The payment service on a new database, prepared and serving.
async fn start(backend: Backend, fail_rate: f64) -> anyhow::Result<Running> {
    let db = TestDb::new(backend, "payment")
        .await
        .map_err(anyhow::Error::msg)?;
    let app = PaymentApp::new(
        db.url(),
        FailRate::new(fail_rate).map_err(anyhow::Error::msg)?,
    )?;
    app.prepare(BOUND).await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let (http_addr, grpc_addr) = (http.local_addr()?, grpc.local_addr()?);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move { app.serve(http, grpc, stop).await });
    Ok(Running {
        http: http_addr,
        grpc: grpc_addr,
        db,
        shutdown,
    })
}

async fn client(addr: SocketAddr) -> anyhow::Result<PaymentServiceClient<Channel>> {
    Ok(timeout(
        BOUND,
        PaymentServiceClient::connect(format!("http://{addr}")),
    )
    .await??)
}

fn charge(key: &str, amount_cents: i64) -> CreatePaymentRequest {
    CreatePaymentRequest {
        idempotency_key: key.into(),
        order_id: "order-1".into(),
        user_id: "123".into(),
        amount_cents,
        currency: "USD".into(),
    }
}

async fn the_same_idempotency_key_charges_once(backend: Backend) -> anyhow::Result<()> {
    let payment = start(backend, 0.0).await?;
    let mut client = client(payment.grpc).await?;
    let first = timeout(BOUND, client.create_payment(charge("order-1", 2598)))
        .await??
        .into_inner()
        .payment
        .context("payment in response")?;
    assert_eq!(first.status(), PaymentStatus::Succeeded);
    assert_eq!(first.amount_cents, 2598);
    assert!(!first.payment_id.is_empty());

    let again = timeout(BOUND, client.create_payment(charge("order-1", 2598)))
        .await??
        .into_inner()
        .payment
        .context("payment in response")?;
    assert_eq!(again, first, "a replay returns the first payment unchanged");

    let other = timeout(BOUND, client.create_payment(charge("order-2", 2598)))
        .await??
        .into_inner()
        .payment
        .context("payment in response")?;
    assert_ne!(other.payment_id, first.payment_id);

    let rows = payment
        .db
        .scalar("SELECT COUNT(*) FROM payments")
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(rows, 2);

    let fetched = timeout(
        BOUND,
        client.get_payment(GetPaymentRequest {
            payment_id: first.payment_id.clone(),
        }),
    )
    .await??
    .into_inner()
    .payment;
    assert_eq!(fetched, Some(first));
    Ok(())
}

async fn reusing_a_key_for_another_charge_is_refused(backend: Backend) -> anyhow::Result<()> {
    let payment = start(backend, 0.0).await?;
    let mut client = client(payment.grpc).await?;
    timeout(BOUND, client.create_payment(charge("order-1", 100))).await??;
    let refused = timeout(BOUND, client.create_payment(charge("order-1", 999)))
        .await?
        .expect_err("different amount under the same key");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("order-1"),
        "{}",
        refused.message()
    );
    Ok(())
}

async fn invalid_charges_and_unknown_payments_are_rejected(backend: Backend) -> anyhow::Result<()> {
    let payment = start(backend, 0.0).await?;
    let mut client = client(payment.grpc).await?;
    let mut lower_case = charge("k", 100);
    lower_case.currency = "usd".into();
    for (request, needle) in [
        (charge("", 100), "idempotency_key"),
        (charge("k", 0), "amount_cents"),
        (lower_case, "currency"),
    ] {
        let status = timeout(BOUND, client.create_payment(request))
            .await?
            .expect_err("invalid charge");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(needle), "{}", status.message());
    }
    let missing = timeout(
        BOUND,
        client.get_payment(GetPaymentRequest {
            payment_id: "nope".into(),
        }),
    )
    .await?
    .expect_err("unknown payment");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    Ok(())
}

async fn a_fail_rate_of_one_fails_every_charge_and_stores_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let payment = start(backend, 1.0).await?;
    let mut client = client(payment.grpc).await?;
    let failed = timeout(BOUND, client.create_payment(charge("order-1", 100)))
        .await?
        .expect_err("fail rate 1");
    assert_eq!(failed.code(), tonic::Code::Unavailable);
    let rows = payment
        .db
        .scalar("SELECT COUNT(*) FROM payments")
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(rows, 0);
    Ok(())
}

#[test]
fn fail_rates_outside_zero_to_one_are_refused() {
    assert!("0.25".parse::<FailRate>().is_ok());
    assert!("1.5".parse::<FailRate>().is_err());
    assert!("-0.1".parse::<FailRate>().is_err());
    assert!("often".parse::<FailRate>().is_err());
}

async fn health_answers_json(backend: Backend) -> anyhow::Result<()> {
    let payment = start(backend, 0.0).await?;
    let response = timeout(
        BOUND,
        reqwest::get(format!("http://{}/health", payment.http)),
    )
    .await??;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.json::<Value>().await?, json!({"status": "ok"}));
    Ok(())
}
