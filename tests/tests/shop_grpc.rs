//! Order's gRPC API through the gateway, as `ferrule dev up` runs it (issue #13, item 3): a stock
//! tonic client generated from `proto/shop/order.proto` speaks h2c to the gateway, which routes
//! `/shop.order.v1.OrderService/` to `order:grpc` through the mesh after the same checks as for
//! HTTP: a JWT from user's `/login` in the `authorization` metadata, the request size limit and
//! the `/api` rate limit. The gateway's own refusals reach the client as gRPC statuses, and
//! the route (`grpc: true`) refuses what is not gRPC.
//!
//! The mesh is owned by `ferrule_harness::dev_mesh::DevMesh`, which runs `ferrule dev down`
//! when dropped, so nothing outlives the test, whether it passes or fails.

use std::time::Duration;

use anyhow::{Context, Result};
use ferrule_harness::dev_mesh::{DevMesh, metric_sum};
use shop_proto::order::v1 as pb;
use shop_proto::order::v1::order_service_client::OrderServiceClient;
use tokio::time::timeout;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Start-up of ten debug-build processes on a busy machine; `dev up` itself gives up at 60 s.
const UP_WITHIN: Duration = Duration::from_secs(90);
/// Bound on one call.
const CALL: Duration = Duration::from_secs(10);
/// The demo gateway's limit on `/api` and on order's gRPC API: requests per second and burst,
/// per client IP.
const API_LIMIT: usize = 10;
/// The demo gateway's `maxRequestBytes`.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

fn book() -> pb::Item {
    pb::Item {
        sku: "book".into(),
        quantity: 2,
        unit_price_cents: 1299,
    }
}

fn create_request(
    token: Option<&str>,
    items: Vec<pb::Item>,
) -> Result<Request<pb::CreateOrderRequest>> {
    let mut request = Request::new(pb::CreateOrderRequest {
        user_id: "123".into(),
        items,
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(request)
}

fn get_request(token: &str, id: &str) -> Result<Request<pb::GetOrderRequest>> {
    let mut request = Request::new(pb::GetOrderRequest { id: id.into() });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

/// The status of a call that must fail.
fn refused<T: std::fmt::Debug>(what: &str, answer: Result<tonic::Response<T>, Status>) -> Status {
    match answer {
        Ok(response) => panic!("{what}: answered {response:?}"),
        Err(status) => status,
    }
}

#[tokio::test]
async fn orders_over_grpc_through_the_gateway() -> Result<()> {
    let mesh = DevMesh::up(&[], UP_WITHIN).await?;
    let token = mesh.login().await?;
    // Plaintext HTTP/2 with prior knowledge (h2c), as every gRPC client without TLS speaks.
    let channel = Channel::from_shared(format!("http://{}", mesh.gateway))?
        .connect_timeout(CALL)
        .timeout(CALL)
        .connect()
        .await
        .context("connecting to the gateway")?;
    let mut client = OrderServiceClient::new(channel);
    let gateway_admin = mesh.admin("gateway")?;
    let to_order_grpc = |l: &prometheus_parse::Labels| {
        l.get("direction") == Some("gateway") && l.get("target_service") == Some("order:grpc")
    };
    let routed_before = metric_sum(gateway_admin, "request_total", to_order_grpc).await?;

    // Create and read an order with the token from /login.
    let created = timeout(
        CALL,
        client.create_order(create_request(Some(&token), vec![book()])?),
    )
    .await?
    .context("CreateOrder through the gateway")?
    .into_inner()
    .order
    .context("CreateOrder answered without an order")?;
    assert_eq!(created.status(), pb::OrderStatus::Paid, "{created:?}");
    assert_eq!(created.total_cents, 2598, "{created:?}");
    assert_eq!(created.items, [book()]);
    assert!(!created.payment_id.is_empty(), "{created:?}");
    let read = timeout(CALL, client.get_order(get_request(&token, &created.id)?))
        .await?
        .context("GetOrder through the gateway")?
        .into_inner()
        .order
        .context("GetOrder answered without an order")?;
    assert_eq!(read, created);
    // The gateway routed both to order:grpc (counted under the route's service).
    let routed = metric_sum(gateway_admin, "request_total", to_order_grpc).await?;
    assert!(
        routed >= routed_before + 2.0,
        "gateway counted {routed_before} then {routed} requests to order:grpc"
    );
    // The same order over the HTTP API: one store behind both.
    let reply = mesh
        .call(
            "GET",
            &format!("/api/orders/{}", created.id),
            Some(&token),
            None,
        )
        .await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    let json: serde_json::Value = serde_json::from_str(&reply.body)?;
    assert_eq!(json["payment_id"], created.payment_id.as_str(), "{json}");

    // The order service's own refusals come through unchanged.
    let status = refused(
        "GetOrder of an unknown id",
        timeout(CALL, client.get_order(get_request(&token, "nope")?)).await?,
    );
    assert_eq!(
        (status.code(), status.message()),
        (Code::NotFound, "order nope not found")
    );

    // Without a token, and with a tampered one: UNAUTHENTICATED from the gateway, which names
    // its reason in the status message and never reaches order.
    let status = refused(
        "CreateOrder without a token",
        timeout(
            CALL,
            client.create_order(create_request(None, vec![book()])?),
        )
        .await?,
    );
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("missing authorization header"),
        "{status:?}"
    );
    assert_eq!(
        status
            .metadata()
            .get("ferrule-error")
            .and_then(|v| v.to_str().ok()),
        Some("unauthenticated"),
        "{status:?}"
    );
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered)?;
    let status = refused(
        "CreateOrder with a tampered token",
        timeout(
            CALL,
            client.create_order(create_request(Some(&tampered), vec![book()])?),
        )
        .await?,
    );
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("invalid token"), "{status:?}");

    // The route is `grpc: true`: a plain HTTP request on it is refused by the gateway with a
    // reason, instead of reaching a gRPC server that cannot answer it.
    let reply = mesh
        .call(
            "POST",
            "/shop.order.v1.OrderService/CreateOrder",
            Some(&token),
            Some(&serde_json::json!({"user_id": "123"})),
        )
        .await?;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(
        reply.header("ferrule-error"),
        Some("bad_request"),
        "{reply:?}"
    );
    assert!(reply.body.contains("takes gRPC only"), "{reply:?}");

    // A message larger than maxRequestBytes: RESOURCE_EXHAUSTED from the size limit.
    let huge = pb::Item {
        sku: "x".repeat(MAX_REQUEST_BYTES + 1),
        ..book()
    };
    let status = refused(
        "CreateOrder over the size limit",
        timeout(
            CALL,
            client.create_order(create_request(Some(&token), vec![huge])?),
        )
        .await?,
    );
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("ferrule-error")
            .and_then(|v| v.to_str().ok()),
        Some("payload_too_large"),
        "{status:?}"
    );

    // The /api rate limit applies to gRPC alike: a burst of three times the limit, sent at
    // once, cannot all pass (the bucket holds API_LIMIT and refills API_LIMIT a second).
    let calls = (0..3 * API_LIMIT).map(|_| {
        let mut client = client.clone();
        let request = get_request(&token, &created.id);
        async move {
            timeout(CALL, client.get_order(request?))
                .await?
                .map_err(anyhow::Error::from)
        }
    });
    let answers = futures::future::join_all(calls).await;
    let limited: Vec<Status> = answers
        .into_iter()
        .filter_map(|answer| match answer {
            Ok(_) => None,
            Err(e) => Some(
                e.downcast::<Status>()
                    .expect("a gRPC status, not a timeout"),
            ),
        })
        .collect();
    assert!(!limited.is_empty(), "no call of the burst was rate limited");
    for status in &limited {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(
            status
                .metadata()
                .get("ferrule-error")
                .and_then(|v| v.to_str().ok()),
            Some("rate_limited"),
            "{status:?}"
        );
    }
    Ok(())
}
