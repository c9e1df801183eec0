//! The order service's gRPC API, `shop.order.v1.OrderService`: `CreateOrder` and `GetOrder`
//! over the same store, the same calls to user and payment and the same checks as the HTTP
//! routes ([`crate::orders`]); only the answers differ, gRPC status codes instead of HTTP
//! ones ([`status`]).

use shop_proto::order::v1 as pb;
use shop_proto::order::v1::order_service_server::OrderService;
use tonic::{Code, Request, Response, Status};

use crate::OrderApp;
use crate::orders::{self, NewOrder, OrderError};
use crate::store::{Item, Order, OrderStatus};
use crate::trace::TraceContext;

/// The `OrderService` implementation.
pub struct OrderApi {
    app: OrderApp,
}

impl OrderApi {
    pub(crate) fn new(app: OrderApp) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn create_order(
        &self,
        request: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::CreateOrderResponse>, Status> {
        let trace = TraceContext::from_headers(&request.metadata().clone().into_headers());
        let pb::CreateOrderRequest { user_id, items } = request.into_inner();
        let new = NewOrder {
            user_id,
            items: items.into_iter().map(Item::from).collect(),
        };
        let order = orders::place(&self.app, &trace, new)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateOrderResponse {
            order: Some(order.into()),
        }))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("id is required"));
        }
        let order = orders::find(&self.app, id).await.map_err(status)?;
        Ok(Response::new(pb::GetOrderResponse {
            order: Some(order.into()),
        }))
    }
}

/// The gRPC status for why an order could not be placed or read:
///
/// * INVALID_ARGUMENT for a malformed order (the message names the field);
/// * NOT_FOUND for an unknown order;
/// * FAILED_PRECONDITION for an order naming a user that does not exist;
/// * a failed user or payment call: UNAVAILABLE when the dependency is down, overloaded or
///   timed out (the caller may try again), FAILED_PRECONDITION when it refused for the state
///   of things, INTERNAL when it refused what order sent (order's own fault);
/// * UNAVAILABLE while the order database cannot be reached, INTERNAL for a failed query.
fn status(error: OrderError) -> Status {
    let message = error.to_string();
    match error {
        OrderError::Invalid(_) => Status::invalid_argument(message),
        OrderError::NotFound(_) => Status::not_found(message),
        OrderError::UnknownUser(_) => Status::failed_precondition(message),
        OrderError::Upstream { service, status } => {
            tracing::warn!(service, code = ?status.code(), message = status.message(), "upstream call failed");
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Cancelled
                | Code::Unknown => Status::unavailable(message),
                Code::FailedPrecondition => Status::failed_precondition(message),
                _ => Status::internal(message),
            }
        }
        OrderError::Store(error) if error.is_unavailable() => {
            tracing::warn!(%error, "database unavailable");
            Status::unavailable(message)
        }
        OrderError::Store(error) => {
            tracing::error!(%error, "query failed");
            Status::internal(message)
        }
    }
}

impl From<pb::Item> for Item {
    fn from(item: pb::Item) -> Self {
        Item {
            sku: item.sku,
            quantity: item.quantity,
            unit_price_cents: item.unit_price_cents,
        }
    }
}

impl From<Item> for pb::Item {
    fn from(item: Item) -> Self {
        pb::Item {
            sku: item.sku,
            quantity: item.quantity,
            unit_price_cents: item.unit_price_cents,
        }
    }
}

impl From<OrderStatus> for pb::OrderStatus {
    fn from(status: OrderStatus) -> Self {
        match status {
            OrderStatus::Pending => pb::OrderStatus::Pending,
            OrderStatus::Paid => pb::OrderStatus::Paid,
            OrderStatus::PaymentFailed => pb::OrderStatus::PaymentFailed,
        }
    }
}

impl From<Order> for pb::Order {
    fn from(order: Order) -> Self {
        pb::Order {
            id: order.id,
            status: pb::OrderStatus::from(order.status).into(),
            total_cents: order.total_cents,
            user_id: order.user_id,
            items: order.items.into_iter().map(Into::into).collect(),
            payment_id: order.payment_id.unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shop_db::DbError;

    fn upstream(service: &'static str, code: Code) -> OrderError {
        OrderError::Upstream {
            service,
            status: Status::new(code, "it said no"),
        }
    }

    #[test]
    fn errors_map_to_the_codes_the_proto_promises() {
        let cases = [
            (
                OrderError::Invalid("items[0].quantity must be at least 1".into()),
                Code::InvalidArgument,
                "items[0].quantity must be at least 1",
            ),
            (
                OrderError::NotFound("o-1".into()),
                Code::NotFound,
                "order o-1 not found",
            ),
            (
                OrderError::UnknownUser("999".into()),
                Code::FailedPrecondition,
                "user 999 does not exist",
            ),
            (
                upstream("payment", Code::Unavailable),
                Code::Unavailable,
                "payment service failed (Unavailable): it said no",
            ),
            (
                upstream("user", Code::DeadlineExceeded),
                Code::Unavailable,
                "user service failed (DeadlineExceeded): it said no",
            ),
            (
                upstream("user", Code::Unknown),
                Code::Unavailable,
                "user service failed (Unknown): it said no",
            ),
            (
                upstream("payment", Code::FailedPrecondition),
                Code::FailedPrecondition,
                "payment service failed (FailedPrecondition): it said no",
            ),
            (
                upstream("payment", Code::InvalidArgument),
                Code::Internal,
                "payment service failed (InvalidArgument): it said no",
            ),
            (
                OrderError::Store(DbError::Unavailable {
                    url: "postgres://db/order".into(),
                    reason: "connection refused".into(),
                }),
                Code::Unavailable,
                "database postgres://db/order unavailable: connection refused",
            ),
            (
                OrderError::Store(DbError::NotReady {
                    url: "sqlite://order.db".into(),
                }),
                Code::Unavailable,
                "database sqlite://order.db not ready yet: still connecting and migrating",
            ),
            (
                OrderError::Store(DbError::Column("unknown order status \"x\"".into())),
                Code::Internal,
                "unexpected database column: unknown order status \"x\"",
            ),
        ];
        for (error, code, message) in cases {
            let status = status(error);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn orders_convert_field_by_field() {
        let order = Order {
            id: "o-1".into(),
            status: OrderStatus::PaymentFailed,
            total_cents: 2598,
            user_id: "123".into(),
            items: vec![Item {
                sku: "book".into(),
                quantity: 2,
                unit_price_cents: 1299,
            }],
            payment_id: None,
        };
        let pb = pb::Order::from(order);
        assert_eq!(pb.status(), pb::OrderStatus::PaymentFailed);
        assert_eq!(pb.payment_id, "");
        assert_eq!(pb.total_cents, 2598);
        assert_eq!(
            pb.items,
            [pb::Item {
                sku: "book".into(),
                quantity: 2,
                unit_price_cents: 1299
            }]
        );
        let paid = Order {
            status: OrderStatus::Paid,
            payment_id: Some("p-1".into()),
            items: Vec::new(),
            ..Order {
                id: "o-2".into(),
                status: OrderStatus::Pending,
                total_cents: 1,
                user_id: "123".into(),
                items: Vec::new(),
                payment_id: None,
            }
        };
        let pb = pb::Order::from(paid);
        assert_eq!(pb.status(), pb::OrderStatus::Paid);
        assert_eq!(pb.payment_id, "p-1");
    }
}
