//! HTTP side of the user service: `POST /login`, `GET /users/{id}` and `GET /health`. Every
//! error is JSON `{"error": "..."}` with its status code.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::PasswordVerifier;
use argon2::password_hash::phc::PasswordHash;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower_http::trace::TraceLayer;

use shop_db::DbError;

use crate::store::{Store, User};
use crate::token::TokenIssuer;
use crate::trace;

#[derive(Clone)]
struct AppState {
    store: Store,
    tokens: Arc<TokenIssuer>,
}

pub(crate) fn router(store: Store, tokens: Arc<TokenIssuer>) -> Router {
    Router::new()
        .route("/login", post(login))
        .route("/users/{id}", get(user))
        .route("/health", get(health))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(AppState { store, tokens })
        .layer(TraceLayer::new_for_http().make_span_with(trace::request_span))
}

/// What a handler can answer instead of success.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid username or password")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    /// The database cannot be reached: try again later.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}

impl From<DbError> for ApiError {
    fn from(error: DbError) -> Self {
        if error.is_unavailable() {
            Self::Unavailable(error.to_string())
        } else {
            Self::Internal(error.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unavailable(error) => {
                tracing::warn!(%error, "database unavailable");
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(error) => {
                tracing::error!(%error, "request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

#[derive(Deserialize)]
struct LoginRequest {
    username: String,
    password: String,
}

#[derive(Serialize)]
struct LoginResponse {
    token: String,
    expires_in: u64,
}

async fn login(
    State(state): State<AppState>,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<Json<LoginResponse>, ApiError> {
    let Json(LoginRequest { username, password }) = body?;
    let Some((user, hash)) = state.store.credentials(username).await? else {
        return Err(ApiError::Unauthorized);
    };
    // argon2 is deliberately slow: keep it off the async workers.
    let verified = tokio::task::spawn_blocking(move || password_matches(&password, &hash))
        .await
        .map_err(|e| ApiError::Internal(format!("password check: {e}")))??;
    if !verified {
        return Err(ApiError::Unauthorized);
    }
    let token = state
        .tokens
        .issue(&user)
        .map_err(|e| ApiError::Internal(format!("signing token: {e}")))?;
    tracing::info!(user_id = %user.user_id, "login");
    Ok(Json(LoginResponse {
        token: token.token,
        expires_in: token.expires_in,
    }))
}

fn password_matches(password: &str, hash: &str) -> Result<bool, ApiError> {
    let hash = PasswordHash::new(hash)
        .map_err(|e| ApiError::Internal(format!("stored password hash: {e}")))?;
    Ok(Argon2::default()
        .verify_password(password.as_bytes(), &hash)
        .is_ok())
}

async fn user(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
) -> Result<Json<User>, ApiError> {
    match state.store.user(user_id.clone()).await? {
        Some(user) => Ok(Json(user)),
        None => Err(ApiError::NotFound(format!("user {user_id} not found"))),
    }
}

async fn health(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state.store.ping().await?;
    Ok(Json(json!({ "status": "ok" })))
}
