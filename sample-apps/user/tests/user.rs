//! The user service on real loopback sockets with a throw-away database: logins, the HTTP user
//! lookup, gRPC lookups and paging, idempotent start-up and graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use serde_json::{Value, json};
use shop_proto::user::v1::user_service_client::UserServiceClient;
use shop_proto::user::v1::{GetUserRequest, ListUsersRequest};
use shop_user::UserApp;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"test-secret";
const BOUND: Duration = Duration::from_secs(10);

/// A running user service; stops when dropped.
struct Running {
    http: SocketAddr,
    grpc: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), shop_user::Error>>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> anyhow::Result<Running> {
    let dir = tempfile::tempdir()?;
    let app = UserApp::open(
        &dir.path().join("user.db"),
        SECRET,
        Duration::from_secs(600),
    )?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let (http_addr, grpc_addr) = (http.local_addr()?, grpc.local_addr()?);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { app.serve(http, grpc, stop).await });
    Ok(Running {
        http: http_addr,
        grpc: grpc_addr,
        shutdown,
        task,
        _dir: dir,
    })
}

async fn post_login(addr: SocketAddr, body: Value) -> anyhow::Result<(u16, Value)> {
    let response = timeout(
        BOUND,
        reqwest::Client::new()
            .post(format!("http://{addr}/login"))
            .json(&body)
            .send(),
    )
    .await??;
    Ok((response.status().as_u16(), response.json().await?))
}

async fn get_json(url: String) -> anyhow::Result<(u16, Value)> {
    let response = timeout(BOUND, reqwest::get(url)).await??;
    Ok((response.status().as_u16(), response.json().await?))
}

async fn grpc_client(
    addr: SocketAddr,
) -> anyhow::Result<UserServiceClient<tonic::transport::Channel>> {
    Ok(timeout(BOUND, UserServiceClient::connect(format!("http://{addr}"))).await??)
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    name: String,
    iat: u64,
    exp: u64,
    iss: String,
}

#[tokio::test]
async fn login_returns_a_token_signed_with_the_configured_key() -> anyhow::Result<()> {
    let user = start().await?;
    let (status, body) = post_login(
        user.http,
        json!({"username": "alice", "password": "wonderland"}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().context("token field")?;
    let expires_in = body["expires_in"].as_u64().context("expires_in field")?;
    assert_eq!(expires_in, 600);

    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&["ferrule-shop"]);
    let claims = jsonwebtoken::decode::<Claims>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET),
        &validation,
    )?
    .claims;
    assert_eq!(claims.sub, "123");
    assert_eq!(claims.name, "Alice Liddell");
    assert_eq!(claims.iss, "ferrule-shop");
    assert_eq!(claims.exp - claims.iat, expires_in);

    // The other demo users log in with the passwords the README gives.
    for (username, password, user_id) in [("bob", "builder", "124"), ("carol", "christmas", "125")]
    {
        let (status, body) = post_login(
            user.http,
            json!({"username": username, "password": password}),
        )
        .await?;
        assert_eq!(status, 200, "{username}: {body}");
        let token = body["token"].as_str().context("token field")?;
        let claims = jsonwebtoken::decode::<Claims>(
            token,
            &jsonwebtoken::DecodingKey::from_secret(SECRET),
            &validation,
        )?
        .claims;
        assert_eq!(claims.sub, user_id);
    }

    let wrong_key = jsonwebtoken::decode::<Claims>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(b"another-secret"),
        &validation,
    );
    assert!(wrong_key.is_err(), "token must not verify with another key");
    Ok(())
}

#[tokio::test]
async fn bad_credentials_are_401_and_bad_bodies_400() -> anyhow::Result<()> {
    let user = start().await?;
    for body in [
        json!({"username": "alice", "password": "looking-glass"}),
        json!({"username": "mallory", "password": "wonderland"}),
    ] {
        let (status, answer) = post_login(user.http, body).await?;
        assert_eq!(status, 401);
        assert_eq!(answer, json!({"error": "invalid username or password"}));
    }
    let (status, answer) = post_login(user.http, json!({"username": "alice"})).await?;
    assert_eq!(status, 400);
    let error = answer["error"].as_str().context("error field")?;
    assert!(error.contains("password"), "{error}");
    Ok(())
}

#[tokio::test]
async fn http_serves_users_and_health() -> anyhow::Result<()> {
    let user = start().await?;
    let (status, body) = get_json(format!("http://{}/users/123", user.http)).await?;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"user_id": "123", "name": "Alice Liddell", "email": "alice@example.com", "age": 28})
    );
    let (status, body) = get_json(format!("http://{}/users/999", user.http)).await?;
    assert_eq!(status, 404);
    assert_eq!(body, json!({"error": "user 999 not found"}));
    let (status, body) = get_json(format!("http://{}/health", user.http)).await?;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let (status, _) = get_json(format!("http://{}/nowhere", user.http)).await?;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test]
async fn grpc_get_user_finds_seeded_users_only() -> anyhow::Result<()> {
    let user = start().await?;
    let mut client = grpc_client(user.grpc).await?;
    let found = timeout(
        BOUND,
        client.get_user(GetUserRequest {
            user_id: "123".into(),
        }),
    )
    .await??
    .into_inner()
    .user
    .context("user in response")?;
    assert_eq!(
        (found.user_id.as_str(), found.name.as_str(), found.age),
        ("123", "Alice Liddell", 28)
    );
    let missing = timeout(
        BOUND,
        client.get_user(GetUserRequest {
            user_id: "999".into(),
        }),
    )
    .await?
    .expect_err("user 999 does not exist");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    Ok(())
}

#[tokio::test]
async fn grpc_list_users_pages_through_everyone_once() -> anyhow::Result<()> {
    let user = start().await?;
    let mut client = grpc_client(user.grpc).await?;
    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = timeout(
            BOUND,
            client.list_users(ListUsersRequest {
                page_size: 2,
                page_token: page_token.clone(),
            }),
        )
        .await??
        .into_inner();
        assert!(page.users.len() <= 2, "page larger than asked: {page:?}");
        seen.extend(page.users.into_iter().map(|u| u.user_id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(seen, ["123", "124", "125"]);
    assert_eq!(pages, 2);

    let everyone = timeout(BOUND, client.list_users(ListUsersRequest::default()))
        .await??
        .into_inner();
    assert_eq!(everyone.users.len(), 3);
    assert!(everyone.next_page_token.is_empty());

    let negative = timeout(
        BOUND,
        client.list_users(ListUsersRequest {
            page_size: -1,
            page_token: String::new(),
        }),
    )
    .await?
    .expect_err("negative page size");
    assert_eq!(negative.code(), tonic::Code::InvalidArgument);
    Ok(())
}

#[tokio::test]
async fn replicas_sharing_a_database_migrate_and_seed_it_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("user.db");
    // Two replicas starting at once, then a restart.
    let starts: Vec<_> = (0..2)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                UserApp::open(&path, SECRET, Duration::from_secs(60)).map(drop)
            })
        })
        .collect();
    for start in starts {
        start
            .join()
            .map_err(|_| anyhow::anyhow!("opening thread panicked"))??;
    }
    UserApp::open(&path, SECRET, Duration::from_secs(60))?;
    let conn = rusqlite::Connection::open(&path)?;
    let users: i64 = conn.query_row("SELECT COUNT(*) FROM users", [], |row| row.get(0))?;
    assert_eq!(users, 3);
    Ok(())
}

#[tokio::test]
async fn serve_returns_once_shutdown_is_cancelled() -> anyhow::Result<()> {
    let mut user = start().await?;
    user.shutdown.cancel();
    timeout(BOUND, &mut user.task).await???;
    Ok(())
}
