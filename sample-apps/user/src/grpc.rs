//! gRPC side of the user service: `shop.user.v1.UserService`.

use shop_proto::user::v1::user_service_server::UserService;
use shop_proto::user::v1::{GetUserRequest, GetUserResponse, ListUsersRequest, ListUsersResponse};
use tonic::{Request, Response, Status};

use shop_db::DbError;

use crate::store::Store;

/// Page size when the caller asks for 0.
const DEFAULT_PAGE_SIZE: u32 = 10;
/// Larger page sizes are capped to this.
const MAX_PAGE_SIZE: u32 = 100;

/// The `UserService` implementation, reading the service's own database.
pub struct UserApi {
    store: Store,
}

impl UserApi {
    pub(crate) fn new(store: Store) -> Self {
        Self { store }
    }
}

/// UNAVAILABLE while the database cannot be reached (the caller may try again), INTERNAL for a
/// query that failed.
fn status(error: DbError) -> Status {
    if error.is_unavailable() {
        tracing::warn!(%error, "database unavailable");
        Status::unavailable(error.to_string())
    } else {
        tracing::error!(%error, "query failed");
        Status::internal(error.to_string())
    }
}

#[tonic::async_trait]
impl UserService for UserApi {
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let user_id = request.into_inner().user_id;
        if user_id.is_empty() {
            return Err(Status::invalid_argument("user_id is required"));
        }
        match self.store.user(user_id.clone()).await.map_err(status)? {
            Some(user) => Ok(Response::new(GetUserResponse {
                user: Some(user.into()),
            })),
            None => Err(Status::not_found(format!("user {user_id} not found"))),
        }
    }

    /// Keyset paging: the page token is the last user id of the previous page, so pages stay
    /// consistent while users are added.
    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let ListUsersRequest {
            page_size,
            page_token,
        } = request.into_inner();
        let page_size = match u32::try_from(page_size) {
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(size) => size.min(MAX_PAGE_SIZE),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "page_size must not be negative, got {page_size}"
                )));
            }
        };
        // One row more than the page tells whether another page follows.
        let mut users = self
            .store
            .users_after(page_token, page_size + 1)
            .await
            .map_err(status)?;
        let next_page_token = if users.len() > page_size as usize {
            users.truncate(page_size as usize);
            users.last().map(|u| u.user_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListUsersResponse {
            users: users.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }
}
