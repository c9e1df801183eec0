//! The order service end to end: the real user and payment services run in-process on loopback
//! sockets, each with its own throw-away database, and their gRPC servers record the headers of
//! every call so the tests can check what order propagated. Every behaviour test runs twice, on
//! SQLite and on a real PostgreSQL server the test starts and removes (`sqlite::*` and
//! `postgres::*`, one server with a database per service); the PostgreSQL ones fail when
//! PostgreSQL is not installed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use shop_db::on_both_backends;
use shop_db::test_server::{Backend, TestDb};
use shop_order::{DatabaseUrl, OrderApp, Upstreams};
use shop_payment::{FailRate, PaymentApp};
use shop_proto::order::v1 as pb;
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use shop_proto::payment::v1::GetPaymentRequest;
use shop_proto::payment::v1::payment_service_client::PaymentServiceClient;
use shop_user::UserApp;
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Server};
use tower::util::MapRequestLayer;

const BOUND: Duration = Duration::from_secs(10);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// (gRPC path, headers) of every call a server received.
type Seen = Arc<Mutex<Vec<(String, http::HeaderMap)>>>;

fn recorder(
    seen: Seen,
) -> MapRequestLayer<
    impl Fn(http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> + Clone,
> {
    MapRequestLayer::new(move |request: http::Request<tonic::body::Body>| {
        let mut seen = seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        seen.push((request.uri().path().to_owned(), request.headers().clone()));
        request
    })
}

/// The three services, running until dropped.
struct Shop {
    order: SocketAddr,
    order_grpc: SocketAddr,
    payment_grpc: SocketAddr,
    user_calls: Seen,
    payment_calls: Seen,
    shutdown: CancellationToken,
    db: TestDb,
}

impl Drop for Shop {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

on_both_backends!(
    an_order_is_checked_charged_stored_and_traced,
    an_unknown_user_is_422_and_nothing_is_charged_or_stored,
    invalid_orders_are_400_with_the_reason,
    a_failed_payment_is_502_and_the_order_is_kept_as_failed,
    lookups_and_health,
    grpc_places_and_reads_the_same_orders,
    grpc_errors_are_status_codes,
);

async fn start_shop(backend: Backend, payment_fail_rate: f64) -> anyhow::Result<Shop> {
    let db = TestDb::new(backend, "order")
        .await
        .map_err(anyhow::Error::msg)?;
    let sibling = |name| db.sibling(name);
    let shutdown = CancellationToken::new();

    let user = UserApp::new(
        &sibling("user").await.map_err(anyhow::Error::msg)?,
        b"secret",
        Duration::from_secs(60),
    )?;
    user.prepare(BOUND).await?;
    let user_listener = TcpListener::bind("127.0.0.1:0").await?;
    let user_grpc = user_listener.local_addr()?;
    let user_calls = Seen::default();
    tokio::spawn(
        Server::builder()
            .layer(recorder(user_calls.clone()))
            .add_service(user.grpc_service())
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(user_listener),
                shutdown.clone().cancelled_owned(),
            ),
    );

    let fail_rate = FailRate::new(payment_fail_rate).map_err(anyhow::Error::msg)?;
    let payment = PaymentApp::new(
        &sibling("payment").await.map_err(anyhow::Error::msg)?,
        fail_rate,
    )?;
    payment.prepare(BOUND).await?;
    let payment_listener = TcpListener::bind("127.0.0.1:0").await?;
    let payment_grpc = payment_listener.local_addr()?;
    let payment_calls = Seen::default();
    tokio::spawn(
        Server::builder()
            .layer(recorder(payment_calls.clone()))
            .add_service(payment.grpc_service())
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(payment_listener),
                shutdown.clone().cancelled_owned(),
            ),
    );

    let (order, order_grpc) =
        start_order(db.url(), user_grpc, payment_grpc, shutdown.clone()).await?;
    Ok(Shop {
        order,
        order_grpc,
        payment_grpc,
        user_calls,
        payment_calls,
        shutdown,
        db,
    })
}

async fn start_order(
    db: &DatabaseUrl,
    user: SocketAddr,
    payment: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let upstreams = Upstreams {
        user: format!("http://{user}").parse()?,
        payment: format!("http://{payment}").parse()?,
    };
    let order = OrderApp::new(db, upstreams)?;
    order.prepare(BOUND).await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let addrs = (http.local_addr()?, grpc.local_addr()?);
    tokio::spawn(async move { order.serve(http, grpc, shutdown).await });
    Ok(addrs)
}

async fn grpc_client(addr: SocketAddr) -> anyhow::Result<OrderServiceClient<Channel>> {
    Ok(timeout(BOUND, OrderServiceClient::connect(format!("http://{addr}"))).await??)
}

fn book_item() -> pb::Item {
    pb::Item {
        sku: "book".into(),
        quantity: 2,
        unit_price_cents: 1299,
    }
}

fn book_order(user_id: &str) -> Value {
    json!({"user_id": user_id, "items": [{"sku": "book", "quantity": 2, "unit_price_cents": 1299}]})
}

async fn post_order(
    addr: SocketAddr,
    body: &Value,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, Value)> {
    let mut request = reqwest::Client::new()
        .post(format!("http://{addr}/orders"))
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = timeout(BOUND, request.send()).await??;
    Ok((response.status().as_u16(), response.json().await?))
}

async fn get_json(url: String) -> anyhow::Result<(u16, Value)> {
    let response = timeout(BOUND, reqwest::get(url)).await??;
    Ok((response.status().as_u16(), response.json().await?))
}

/// The headers of the one call a server received on `path`.
fn call_headers(calls: &Seen, path: &str) -> anyhow::Result<http::HeaderMap> {
    let calls = calls
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut matching = calls.iter().filter(|(p, _)| p == path);
    let (_, headers) = matching
        .next()
        .with_context(|| format!("no call to {path}"))?;
    anyhow::ensure!(matching.next().is_none(), "more than one call to {path}");
    Ok(headers.clone())
}

async fn an_order_is_checked_charged_stored_and_traced(backend: Backend) -> anyhow::Result<()> {
    let shop = start_shop(backend, 0.0).await?;
    let (status, created) = post_order(
        shop.order,
        &book_order("123"),
        &[
            ("traceparent", TRACEPARENT),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("authorization", "Bearer not-for-upstreams"),
        ],
    )
    .await?;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().context("id")?.to_owned();
    let payment_id = created["payment_id"]
        .as_str()
        .context("payment_id")?
        .to_owned();
    assert_eq!(created["status"], "paid");
    assert_eq!(created["total_cents"], 2598);
    assert_eq!(created["user_id"], "123");
    assert_eq!(
        created["items"],
        json!([{"sku": "book", "quantity": 2, "unit_price_cents": 1299}])
    );

    // Both upstreams saw the caller's trace context, and nothing else of its headers.
    for (calls, path) in [
        (&shop.user_calls, "/shop.user.v1.UserService/GetUser"),
        (
            &shop.payment_calls,
            "/shop.payment.v1.PaymentService/CreatePayment",
        ),
    ] {
        let headers = call_headers(calls, path)?;
        assert_eq!(
            headers.get("traceparent").map(|v| v.as_bytes()),
            Some(TRACEPARENT.as_bytes()),
            "{path}"
        );
        assert_eq!(
            headers.get("x-b3-traceid").map(|v| v.as_bytes()),
            Some(&b"80f198ee56343ba864fe8b2a57d3eff7"[..]),
            "{path}"
        );
        assert!(
            headers.get("authorization").is_none(),
            "{path} got the caller's credentials"
        );
    }

    // The charge is in payment's own database, for this order and its total.
    let mut payments = timeout(
        BOUND,
        PaymentServiceClient::connect(format!("http://{}", shop.payment_grpc)),
    )
    .await??;
    let payment = timeout(
        BOUND,
        payments.get_payment(GetPaymentRequest {
            payment_id: payment_id.clone(),
        }),
    )
    .await??
    .into_inner()
    .payment
    .context("payment")?;
    assert_eq!(payment.order_id, id);
    assert_eq!(payment.idempotency_key, id);
    assert_eq!(payment.amount_cents, 2598);

    // And the order is in order's own database.
    let (status, fetched) = get_json(format!("http://{}/orders/{id}", shop.order)).await?;
    assert_eq!(status, 200);
    assert_eq!(fetched, created);
    let (status, listed) = get_json(format!("http://{}/orders?user_id=123", shop.order)).await?;
    assert_eq!(status, 200);
    assert_eq!(listed, json!({"orders": [created]}));
    Ok(())
}

async fn an_unknown_user_is_422_and_nothing_is_charged_or_stored(
    backend: Backend,
) -> anyhow::Result<()> {
    let shop = start_shop(backend, 0.0).await?;
    let (status, body) = post_order(shop.order, &book_order("999"), &[]).await?;
    assert_eq!(status, 422);
    assert_eq!(body, json!({"error": "user 999 does not exist"}));
    assert!(shop.payment_calls.lock().unwrap().is_empty());
    let (_, listed) = get_json(format!("http://{}/orders?user_id=999", shop.order)).await?;
    assert_eq!(listed, json!({"orders": []}));
    Ok(())
}

async fn invalid_orders_are_400_with_the_reason(backend: Backend) -> anyhow::Result<()> {
    let shop = start_shop(backend, 0.0).await?;
    let cases = [
        (json!({"user_id": "123", "items": []}), "at least one item"),
        (
            json!({"user_id": "", "items": [{"sku": "book", "quantity": 1, "unit_price_cents": 1}]}),
            "user_id",
        ),
        (
            json!({"user_id": "123", "items": [{"sku": "book", "quantity": 0, "unit_price_cents": 1}]}),
            "items[0].quantity",
        ),
        (
            json!({"user_id": "123", "items": [{"sku": "book", "quantity": 1, "unit_price_cents": -5}]}),
            "items[0].unit_price_cents",
        ),
        (
            json!({"user_id": "123", "items": [{"sku": "book", "quantity": 4294967295_u32, "unit_price_cents": i64::MAX}]}),
            "too large",
        ),
        (json!({"items": []}), "user_id"),
    ];
    for (body, reason) in cases {
        let (status, answer) = post_order(shop.order, &body, &[]).await?;
        assert_eq!(status, 400, "{body}: {answer}");
        let error = answer["error"].as_str().context("error field")?;
        assert!(error.contains(reason), "{body}: {error}");
    }
    assert!(shop.user_calls.lock().unwrap().is_empty());
    Ok(())
}

async fn a_failed_payment_is_502_and_the_order_is_kept_as_failed(
    backend: Backend,
) -> anyhow::Result<()> {
    let shop = start_shop(backend, 1.0).await?;
    let (status, body) = post_order(shop.order, &book_order("123"), &[]).await?;
    assert_eq!(status, 502, "{body}");
    let error = body["error"].as_str().context("error field")?;
    assert!(error.starts_with("payment service failed"), "{error}");
    let (_, listed) = get_json(format!("http://{}/orders?user_id=123", shop.order)).await?;
    assert_eq!(listed["orders"][0]["status"], "payment_failed");
    assert_eq!(listed["orders"][0]["payment_id"], Value::Null);
    Ok(())
}

#[tokio::test]
async fn an_unreachable_user_service_is_502() -> anyhow::Result<()> {
    let db = TestDb::new(Backend::Sqlite, "order")
        .await
        .map_err(anyhow::Error::msg)?;
    // A port nothing listens on any more.
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (order, order_grpc) = start_order(db.url(), closed, closed, shutdown).await?;
    let (status, body) = post_order(order, &book_order("123"), &[]).await?;
    assert_eq!(status, 502, "{body}");
    let error = body["error"].as_str().context("error field")?;
    assert!(error.starts_with("user service failed"), "{error}");
    // Over gRPC the dependency's failure is UNAVAILABLE, with the same explanation.
    let mut client = grpc_client(order_grpc).await?;
    let status = timeout(
        BOUND,
        client.create_order(pb::CreateOrderRequest {
            user_id: "123".into(),
            items: vec![book_item()],
        }),
    )
    .await?
    .expect_err("created an order without a user service");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("user service failed"),
        "{status:?}"
    );
    Ok(())
}

async fn lookups_and_health(backend: Backend) -> anyhow::Result<()> {
    let shop = start_shop(backend, 0.0).await?;
    let (status, body) = get_json(format!("http://{}/orders/nope", shop.order)).await?;
    assert_eq!(
        (status, body),
        (404, json!({"error": "order nope not found"}))
    );
    let (status, body) = get_json(format!("http://{}/orders", shop.order)).await?;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().context("error")?.contains("user_id"));
    let (status, body) = get_json(format!("http://{}/health", shop.order)).await?;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    Ok(())
}

#[tokio::test]
async fn a_postgres_outage_is_503_and_orders_resume_when_it_is_back() -> anyhow::Result<()> {
    let mut shop = start_shop(Backend::Postgres, 0.0).await?;
    let (status, created) = post_order(shop.order, &book_order("123"), &[]).await?;
    assert_eq!(status, 201, "{created}");

    let server = shop.db.server().context("a PostgreSQL server")?;
    server.kill().map_err(anyhow::Error::msg)?;
    let (status, body) = get_json(format!("http://{}/orders?user_id=123", shop.order)).await?;
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().context("error field")?;
    assert!(error.starts_with("database postgres://"), "{error}");
    assert!(error.contains("unavailable"), "{error}");
    // The user service's database is on the same server: order says which service failed.
    let (status, body) = post_order(shop.order, &book_order("123"), &[]).await?;
    assert_eq!(status, 502, "{body}");
    let error = body["error"].as_str().context("error field")?;
    assert!(
        error.starts_with("user service failed (Unavailable)"),
        "{error}"
    );

    let server = shop.db.server().context("a PostgreSQL server")?;
    server.restart().map_err(anyhow::Error::msg)?;
    let (status, created) = post_order(shop.order, &book_order("123"), &[]).await?;
    assert_eq!(status, 201, "{created}");
    let (_, listed) = get_json(format!("http://{}/orders?user_id=123", shop.order)).await?;
    assert_eq!(
        listed["orders"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    Ok(())
}

/// An order placed over gRPC is checked, charged, traced and stored like one placed over HTTP,
/// and each API reads the other's orders.
async fn grpc_places_and_reads_the_same_orders(backend: Backend) -> anyhow::Result<()> {
    let shop = start_shop(backend, 0.0).await?;
    let mut client = grpc_client(shop.order_grpc).await?;
    let mut request = tonic::Request::new(pb::CreateOrderRequest {
        user_id: "123".into(),
        items: vec![book_item()],
    });
    request
        .metadata_mut()
        .insert("traceparent", TRACEPARENT.parse()?);
    let created = timeout(BOUND, client.create_order(request))
        .await??
        .into_inner()
        .order
        .context("CreateOrder answered without an order")?;
    assert_eq!(created.status(), pb::OrderStatus::Paid);
    assert_eq!(created.total_cents, 2598);
    assert_eq!(created.user_id, "123");
    assert_eq!(created.items, [book_item()]);
    assert!(!created.payment_id.is_empty());
    let headers = call_headers(
        &shop.payment_calls,
        "/shop.payment.v1.PaymentService/CreatePayment",
    )?;
    assert_eq!(
        headers.get("traceparent").map(|v| v.as_bytes()),
        Some(TRACEPARENT.as_bytes())
    );

    // The HTTP API reads it...
    let (status, fetched) =
        get_json(format!("http://{}/orders/{}", shop.order, created.id)).await?;
    assert_eq!(status, 200, "{fetched}");
    assert_eq!(fetched["status"], "paid");
    assert_eq!(fetched["payment_id"], created.payment_id.as_str());
    // ...and GetOrder reads one placed over HTTP.
    let (status, posted) = post_order(shop.order, &book_order("123"), &[]).await?;
    assert_eq!(status, 201, "{posted}");
    let id = posted["id"].as_str().context("id")?.to_owned();
    let read = timeout(
        BOUND,
        client.get_order(pb::GetOrderRequest { id: id.clone() }),
    )
    .await??
    .into_inner()
    .order
    .context("GetOrder answered without an order")?;
    assert_eq!(read.id, id);
    assert_eq!(read.status(), pb::OrderStatus::Paid);
    assert_eq!(read.items, [book_item()]);
    Ok(())
}

/// Every refusal is the status code order.proto promises, naming what was wrong.
async fn grpc_errors_are_status_codes(backend: Backend) -> anyhow::Result<()> {
    let shop = start_shop(backend, 0.0).await?;
    let mut client = grpc_client(shop.order_grpc).await?;
    let create = |user_id: &str, items: Vec<pb::Item>| pb::CreateOrderRequest {
        user_id: user_id.into(),
        items,
    };
    let zero = pb::Item {
        quantity: 0,
        ..book_item()
    };
    for (request, code, message) in [
        (
            create("", vec![book_item()]),
            tonic::Code::InvalidArgument,
            "user_id must not be empty",
        ),
        (
            create("123", Vec::new()),
            tonic::Code::InvalidArgument,
            "an order needs at least one item",
        ),
        (
            create("123", vec![zero]),
            tonic::Code::InvalidArgument,
            "items[0].quantity must be at least 1",
        ),
        (
            create("999", vec![book_item()]),
            tonic::Code::FailedPrecondition,
            "user 999 does not exist",
        ),
    ] {
        let status = timeout(BOUND, client.create_order(request))
            .await?
            .expect_err(message);
        assert_eq!((status.code(), status.message()), (code, message));
    }
    // Nothing was charged or stored for the refused ones.
    assert!(shop.payment_calls.lock().unwrap().is_empty());
    let (_, listed) = get_json(format!("http://{}/orders?user_id=999", shop.order)).await?;
    assert_eq!(listed["orders"], json!([]));

    for (id, code, message) in [
        ("", tonic::Code::InvalidArgument, "id is required"),
        ("nope", tonic::Code::NotFound, "order nope not found"),
    ] {
        let status = timeout(
            BOUND,
            client.get_order(pb::GetOrderRequest { id: id.into() }),
        )
        .await?
        .expect_err(message);
        assert_eq!((status.code(), status.message()), (code, message));
    }
    Ok(())
}

/// A payment the payment service refuses is UNAVAILABLE (the caller may place the order again)
/// and the order is kept as failed, as over HTTP.
#[tokio::test]
async fn a_failed_payment_over_grpc_is_unavailable() -> anyhow::Result<()> {
    let shop = start_shop(Backend::Sqlite, 1.0).await?;
    let mut client = grpc_client(shop.order_grpc).await?;
    let status = timeout(
        BOUND,
        client.create_order(pb::CreateOrderRequest {
            user_id: "123".into(),
            items: vec![book_item()],
        }),
    )
    .await?
    .expect_err("paid though payment fails every charge");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("payment service failed"),
        "{status:?}"
    );
    let (_, listed) = get_json(format!("http://{}/orders?user_id=123", shop.order)).await?;
    assert_eq!(listed["orders"][0]["status"], "payment_failed");
    Ok(())
}
