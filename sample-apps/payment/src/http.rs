//! HTTP side of the payment service: `GET /health` only (charges are gRPC). Errors are JSON
//! `{"error": "..."}`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tower_http::trace::TraceLayer;

use crate::store::Store;
use crate::trace;

pub(crate) fn router(store: Store) -> Router {
    Router::new()
        .route("/health", get(health))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": "no such route" })),
            )
        })
        .with_state(store)
        .layer(TraceLayer::new_for_http().make_span_with(trace::request_span))
}

async fn health(State(store): State<Store>) -> (StatusCode, Json<Value>) {
    match store.ping().await {
        Ok(()) => (StatusCode::OK, Json(json!({ "status": "ok" }))),
        Err(error) => {
            tracing::error!(%error, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": error.to_string() })),
            )
        }
    }
}
