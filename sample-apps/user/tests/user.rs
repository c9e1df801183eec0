//! The user service on real loopback sockets with a throw-away database: logins, the HTTP user
//! lookup, gRPC lookups and paging, idempotent start-up and graceful shutdown. Every behaviour
//! test runs twice, on SQLite and on a real PostgreSQL server the test starts and removes
//! (`sqlite::*` and `postgres::*`); the PostgreSQL ones fail when PostgreSQL is not installed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use serde_json::{Value, json};
use shop_db::on_both_backends;
use shop_db::test_server::{Backend, TestDb};
use shop_proto::user::v1::user_service_client::UserServiceClient;
use shop_proto::user::v1::{GetUserRequest, ListUsersRequest};
use shop_user::{DatabaseUrl, UserApp};
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
    db: TestDb,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

on_both_backends!(
    login_returns_a_token_signed_with_the_configured_key,
    bad_credentials_are_401_and_bad_bodies_400,
    http_serves_users_and_health,
    grpc_get_user_finds_seeded_users_only,
    grpc_list_users_pages_through_everyone_once,
    replicas_sharing_a_database_migrate_and_seed_it_once,
    a_newer_schema_is_refused,
);

async fn test_db(backend: Backend) -> anyhow::Result<TestDb> {
    TestDb::new(backend, "user")
        .await
        .map_err(anyhow::Error::msg)
}

/// The user service on a new database, prepared (migrated and seeded) and serving.
async fn start(backend: Backend) -> anyhow::Result<Running> {
    let db = test_db(backend).await?;
    let app = UserApp::new(db.url(), SECRET, Duration::from_secs(600))?;
    app.prepare(BOUND).await?;
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
        db,
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

async fn login_returns_a_token_signed_with_the_configured_key(
    backend: Backend,
) -> anyhow::Result<()> {
    let user = start(backend).await?;
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

async fn bad_credentials_are_401_and_bad_bodies_400(backend: Backend) -> anyhow::Result<()> {
    let user = start(backend).await?;
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

async fn http_serves_users_and_health(backend: Backend) -> anyhow::Result<()> {
    let user = start(backend).await?;
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

async fn grpc_get_user_finds_seeded_users_only(backend: Backend) -> anyhow::Result<()> {
    let user = start(backend).await?;
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

async fn grpc_list_users_pages_through_everyone_once(backend: Backend) -> anyhow::Result<()> {
    let user = start(backend).await?;
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

async fn replicas_sharing_a_database_migrate_and_seed_it_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let db = test_db(backend).await?;
    // Two replicas starting at once, then a restart.
    let replica = || async {
        let app = UserApp::new(db.url(), SECRET, Duration::from_secs(60))?;
        app.prepare(BOUND).await
    };
    let (one, two) = tokio::join!(replica(), replica());
    one?;
    two?;
    replica().await?;
    let users = db
        .scalar("SELECT COUNT(*) FROM users")
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(users, 3);
    Ok(())
}

async fn a_newer_schema_is_refused(backend: Backend) -> anyhow::Result<()> {
    let user = start(backend).await?;
    let newer = match backend {
        Backend::Sqlite => "PRAGMA user_version = 7",
        Backend::Postgres => "UPDATE schema_version SET version = 7",
    };
    user.db.execute(newer).await.map_err(anyhow::Error::msg)?;
    let app = UserApp::new(user.db.url(), SECRET, Duration::from_secs(60))?;
    let error = app.prepare(BOUND).await.expect_err("schema 7 is unknown");
    let message = error.to_string();
    assert!(
        message.contains("schema version 7, newer than the 1 this build knows"),
        "{message}"
    );
    Ok(())
}

/// On SQLite only: stopping does not depend on the database.
#[tokio::test]
async fn serve_returns_once_shutdown_is_cancelled() -> anyhow::Result<()> {
    let mut user = start(Backend::Sqlite).await?;
    user.shutdown.cancel();
    timeout(BOUND, &mut user.task).await???;
    Ok(())
}

#[tokio::test]
async fn a_postgres_outage_is_503_until_the_server_is_back() -> anyhow::Result<()> {
    let mut user = start(Backend::Postgres).await?;
    let health = format!("http://{}/health", user.http);
    let (status, _) = get_json(health.clone()).await?;
    assert_eq!(status, 200);

    let server = user.db.server().context("a PostgreSQL server")?;
    server.kill().map_err(anyhow::Error::msg)?;
    let (status, body) = get_json(format!("http://{}/users/123", user.http)).await?;
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().context("error field")?;
    assert!(error.contains("unavailable"), "{error}");
    let (status, _) = get_json(health.clone()).await?;
    assert_eq!(status, 503);
    let mut client = grpc_client(user.grpc).await?;
    let failed = timeout(
        BOUND,
        client.get_user(GetUserRequest {
            user_id: "123".into(),
        }),
    )
    .await?
    .expect_err("the database is down");
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");

    // Back without restarting the app: its pool connects again.
    let server = user.db.server().context("a PostgreSQL server")?;
    server.restart().map_err(anyhow::Error::msg)?;
    let (status, body) = get_json(format!("http://{}/users/123", user.http)).await?;
    assert_eq!(status, 200, "{body}");
    let (status, _) = get_json(health).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test]
async fn an_unreachable_postgres_at_start_is_retried_then_given_up() -> anyhow::Result<()> {
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let url: DatabaseUrl = format!("postgres://shop@{closed}/user")
        .parse()
        .map_err(anyhow::Error::msg)?;
    let app = UserApp::new(&url, SECRET, Duration::from_secs(60))?;
    // Not prepared yet: requests are 503, not 500.
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let http_addr = http.local_addr()?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let serving = app.clone();
    tokio::spawn(async move { serving.serve(http, grpc, shutdown).await });
    let (status, body) = get_json(format!("http://{http_addr}/health")).await?;
    assert_eq!(status, 503, "{body}");

    let started = std::time::Instant::now();
    let error = timeout(BOUND, app.prepare(Duration::from_millis(1500)))
        .await?
        .expect_err("nothing listens there");
    let message = error.to_string();
    assert!(message.contains("--database-wait"), "{message}");
    assert!(message.contains(&closed.to_string()), "{message}");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    Ok(())
}

#[test]
fn a_malformed_database_url_names_the_flag() {
    use clap::Parser;
    let error =
        shop_user::Config::try_parse_from(["shop-user", "--database-url", "mysql://user.db"])
            .expect_err("not a database URL");
    let text = error.to_string();
    assert!(text.contains("--database-url"), "{text}");
    assert!(text.contains("sqlite://PATH"), "{text}");
}
