//! The order service's HTTP API: `POST /orders`, `GET /orders/{id}`, `GET /orders?user_id=` and
//! `GET /health`. Every error is JSON `{"error": "..."}`: 400 for a bad request, 404 for an
//! unknown order, 422 for an order naming a user that does not exist, 502 when the user or
//! payment service fails, 503 while the order database cannot be reached.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shop_db::DbError;
use shop_proto::payment::v1::CreatePaymentRequest;
use shop_proto::user::v1::GetUserRequest;
use tower_http::trace::TraceLayer;

use crate::OrderApp;
use crate::store::{Item, Order, OrderStatus};
use crate::trace::{self, TraceContext};

/// Orders are charged in this currency.
const CURRENCY: &str = "USD";

pub(crate) fn router(app: OrderApp) -> Router {
    Router::new()
        .route("/orders", get(list_orders).post(create_order))
        .route("/orders/{id}", get(order))
        .route("/health", get(health))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(app)
        .layer(TraceLayer::new_for_http().make_span_with(trace::request_span))
}

/// What a handler can answer instead of success.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("user {0} does not exist")]
    UnknownUser(String),
    #[error("{} service failed ({:?}): {}", .service, .status.code(), .status.message())]
    Upstream {
        service: &'static str,
        status: tonic::Status,
    },
    #[error(transparent)]
    Store(#[from] DbError),
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::UnknownUser(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Upstream { service, status } => {
                tracing::warn!(service, code = ?status.code(), message = status.message(), "upstream call failed");
                StatusCode::BAD_GATEWAY
            }
            Self::Store(error) if error.is_unavailable() => {
                tracing::warn!(%error, "database unavailable");
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Store(error) => {
                tracing::error!(%error, "query failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

#[derive(Deserialize)]
struct NewOrder {
    user_id: String,
    items: Vec<Item>,
}

impl NewOrder {
    /// Checks the order and returns its total.
    fn total_cents(&self) -> Result<i64, ApiError> {
        let bad = |message: String| Err(ApiError::BadRequest(message));
        if self.user_id.is_empty() {
            return bad("user_id must not be empty".into());
        }
        if self.items.is_empty() {
            return bad("an order needs at least one item".into());
        }
        let mut total: i64 = 0;
        for (i, item) in self.items.iter().enumerate() {
            if item.sku.is_empty() {
                return bad(format!("items[{i}].sku must not be empty"));
            }
            if item.quantity == 0 {
                return bad(format!("items[{i}].quantity must be at least 1"));
            }
            if item.unit_price_cents <= 0 {
                return bad(format!(
                    "items[{i}].unit_price_cents must be positive, got {}",
                    item.unit_price_cents
                ));
            }
            let line = item.unit_price_cents.checked_mul(item.quantity.into());
            match line.and_then(|line| total.checked_add(line)) {
                Some(sum) => total = sum,
                None => return bad("the order total is too large".into()),
            }
        }
        Ok(total)
    }
}

async fn create_order(
    State(app): State<OrderApp>,
    trace: TraceContext,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(new) = body?;
    let total_cents = new.total_cents()?;

    let user = GetUserRequest {
        user_id: new.user_id.clone(),
    };
    match app.users.clone().get_user(trace.request(user)).await {
        Ok(_) => {}
        Err(status) if status.code() == tonic::Code::NotFound => {
            return Err(ApiError::UnknownUser(new.user_id));
        }
        Err(status) => {
            return Err(ApiError::Upstream {
                service: "user",
                status,
            });
        }
    }

    // Stored before charging, so a charge never exists without its order; the order id is
    // the idempotency key, so charging it twice cannot charge twice.
    let mut order = Order {
        id: uuid::Uuid::new_v4().to_string(),
        status: OrderStatus::Pending,
        total_cents,
        user_id: new.user_id,
        items: new.items,
        payment_id: None,
    };
    app.store.insert(order.clone()).await?;

    let charge = CreatePaymentRequest {
        idempotency_key: order.id.clone(),
        order_id: order.id.clone(),
        user_id: order.user_id.clone(),
        amount_cents: total_cents,
        currency: CURRENCY.into(),
    };
    let payment = match app
        .payments
        .clone()
        .create_payment(trace.request(charge))
        .await
    {
        Ok(response) => response
            .into_inner()
            .payment
            .ok_or_else(|| ApiError::Upstream {
                service: "payment",
                status: tonic::Status::internal("CreatePayment answered without a payment"),
            }),
        Err(status) => Err(ApiError::Upstream {
            service: "payment",
            status,
        }),
    };
    let payment = match payment {
        Ok(payment) => payment,
        Err(error) => {
            app.store
                .settle(order.id, OrderStatus::PaymentFailed, None)
                .await?;
            return Err(error);
        }
    };
    order.status = OrderStatus::Paid;
    order.payment_id = Some(payment.payment_id);
    app.store
        .settle(order.id.clone(), order.status, order.payment_id.clone())
        .await?;
    tracing::info!(order_id = %order.id, user_id = %order.user_id, total_cents, "order paid");
    let location = format!("/orders/{}", order.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(order),
    )
        .into_response())
}

async fn order(
    State(app): State<OrderApp>,
    Path(id): Path<String>,
) -> Result<Json<Order>, ApiError> {
    match app.store.order(id.clone()).await? {
        Some(order) => Ok(Json(order)),
        None => Err(ApiError::NotFound(format!("order {id} not found"))),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    user_id: Option<String>,
}

#[derive(Serialize)]
struct OrderList {
    orders: Vec<Order>,
}

async fn list_orders(
    State(app): State<OrderApp>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<OrderList>, ApiError> {
    let Query(ListQuery { user_id }) = query?;
    let Some(user_id) = user_id.filter(|id| !id.is_empty()) else {
        return Err(ApiError::BadRequest(
            "the user_id query parameter is required, e.g. /orders?user_id=123".into(),
        ));
    };
    let orders = app.store.orders_of(user_id).await?;
    Ok(Json(OrderList { orders }))
}

async fn health(State(app): State<OrderApp>) -> Result<Json<serde_json::Value>, ApiError> {
    app.store.ping().await?;
    Ok(Json(json!({ "status": "ok" })))
}
