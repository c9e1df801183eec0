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
use tower_http::trace::TraceLayer;

use crate::OrderApp;
use crate::orders::{self, NewOrder, OrderError};
use crate::store::Order;
use crate::trace::{self, TraceContext};

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
    #[error(transparent)]
    Order(#[from] OrderError),
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

impl From<DbError> for ApiError {
    fn from(error: DbError) -> Self {
        Self::Order(OrderError::Store(error))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::BadRequest(_) | Self::Order(OrderError::Invalid(_)) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) | Self::Order(OrderError::NotFound(_)) => StatusCode::NOT_FOUND,
            Self::Order(OrderError::UnknownUser(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Order(OrderError::Upstream { service, status }) => {
                tracing::warn!(service, code = ?status.code(), message = status.message(), "upstream call failed");
                StatusCode::BAD_GATEWAY
            }
            Self::Order(OrderError::Store(error)) if error.is_unavailable() => {
                tracing::warn!(%error, "database unavailable");
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Order(OrderError::Store(error)) => {
                tracing::error!(%error, "query failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

async fn create_order(
    State(app): State<OrderApp>,
    trace: TraceContext,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(new) = body?;
    let order = orders::place(&app, &trace, new).await?;
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
    Ok(Json(orders::find(&app, id).await?))
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
