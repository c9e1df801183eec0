//! The sample shop on PostgreSQL through the mesh (issue #13): `ferrule dev up --postgres`
//! starts one PostgreSQL server with a database per service, registers it as the mesh service
//! `postgres` behind a sidecar, and every app reaches it through its own sidecar. The test
//! places an order through the gateway, finds its rows in the order, payment and user
//! databases, sees the database connections counted as opaque TCP to `postgres` on order's
//! sidecar, then kills PostgreSQL (an immediate shutdown, as a crash) and starts it again:
//! meanwhile requests fail with 503s that say why, and afterwards the same app processes serve
//! again without being restarted.
//!
//! Needs Debian's `postgresql` package (`make deps`); without it `dev up --postgres` fails,
//! saying so, and so does this test.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferrule_harness::dev_mesh::{DevMesh, metric_sum as metric};
use ferrule_harness::{Process, Reply, eventually};
use serde_json::{Value, json};

/// Start-up of twelve debug-build processes and a PostgreSQL cluster on a busy machine.
const UP_WITHIN: Duration = Duration::from_secs(120);
/// How long the mesh gets to notice PostgreSQL is back and serve again.
const RECOVER_WITHIN: Duration = Duration::from_secs(60);
/// The line PostgreSQL logs once it accepts connections.
const PG_READY: &str = "database system is ready to accept connections";

/// The mesh's PostgreSQL server, read by the test over connections of its own.
struct Postgres(SocketAddr);

impl Postgres {
    /// One row of `sql` in the service database `database`, read over a connection of the
    /// test's own, straight to the server.
    async fn row(
        &self,
        database: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row> {
        let config = format!(
            "host={} port={} user=ferrule dbname={database}",
            self.0.ip(),
            self.0.port()
        );
        let (client, connection) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_postgres::connect(&config, tokio_postgres::NoTls),
        )
        .await
        .context("connecting to PostgreSQL timed out")??;
        let connection = tokio::spawn(connection);
        let row = client
            .query_one(sql, params)
            .await
            .with_context(|| format!("{sql} in {database}"));
        drop(client);
        let _ = connection.await;
        row
    }
}

fn json_body(reply: &Reply) -> Result<Value> {
    serde_json::from_str(&reply.body).with_context(|| format!("not JSON: {reply:?}"))
}

/// Labels of traffic `direction` to the service `postgres`.
fn to_postgres(direction: &'static str) -> impl Fn(&prometheus_parse::Labels) -> bool {
    move |l| {
        l.get("direction") == Some(direction)
            && l.get("target_service")
                .is_some_and(|t| t.split(':').next() == Some("postgres"))
    }
}

/// The command line and the user of a running process, to start it again as it was.
fn command_of(pid: u32) -> Result<Command> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    // Each argument ends with a NUL; some are empty (`-k ''`).
    let cmdline = cmdline.strip_suffix(&[0]).unwrap_or(&cmdline);
    let mut argv = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let program = argv.next().context("an empty command line")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let id = |key: &str| -> Result<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|ids| ids.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("{key} of process {pid}"))
    };
    let mut cmd = Command::new(program);
    cmd.args(argv).uid(id("Uid:")?).gid(id("Gid:")?);
    Ok(cmd)
}

#[tokio::test]
async fn the_shop_on_postgres_through_the_mesh() -> Result<()> {
    let mesh = DevMesh::up(&["--postgres"], UP_WITHIN).await?;
    let db = Postgres(mesh.addr("postgres")?);
    for sqlite in ["user.db", "order.db", "payment.db"] {
        assert!(
            !mesh.state_dir.join(sqlite).exists(),
            "{sqlite} was created: the apps are not on PostgreSQL"
        );
    }

    // Log in and place an order through the gateway, as the walkthrough does.
    let token = mesh.login().await?;
    let order = json!({"user_id": "123", "items": [{"sku": "book", "quantity": 2, "unit_price_cents": 1299}]});
    let reply = mesh
        .call("POST", "/api/orders", Some(&token), Some(&order))
        .await?;
    ensure!(reply.status == 201, "POST /api/orders: {reply:?}");
    let created = json_body(&reply)?;
    assert_eq!(created["status"], "paid", "{created}");
    let id = created["id"].as_str().context("order id")?.to_string();
    let payment_id = created["payment_id"]
        .as_str()
        .context("payment id")?
        .to_string();

    // The rows, in each service's own database on the one server.
    let row = db
        .row(
            "order",
            "SELECT status, total_cents FROM orders WHERE id = $1",
            &[&id],
        )
        .await?;
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i64>(1)),
        ("paid".to_string(), 2598)
    );
    let row = db
        .row(
            "order",
            "SELECT COUNT(*) FROM order_items WHERE order_id = $1",
            &[&id],
        )
        .await?;
    assert_eq!(row.get::<_, i64>(0), 1);
    let row = db
        .row(
            "payment",
            "SELECT order_id, amount_cents, status FROM payments WHERE payment_id = $1",
            &[&payment_id],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), id);
    assert_eq!(row.get::<_, i64>(1), 2598);
    assert_eq!(row.get::<_, String>(2), "PAYMENT_STATUS_SUCCEEDED");
    let row = db
        .row(
            "user",
            "SELECT username FROM users WHERE user_id = $1",
            &[&"123"],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "alice");

    // The database connections crossed the mesh as opaque TCP to `postgres`: order's sidecar
    // carried bytes both ways without detecting a protocol (no requests counted), and the
    // server's sidecar received them.
    let order_proxy = mesh.admin("order-proxy")?;
    let read = metric(order_proxy, "tcp_read_bytes_total", to_postgres("outbound")).await?;
    let written = metric(
        order_proxy,
        "tcp_write_bytes_total",
        to_postgres("outbound"),
    )
    .await?;
    assert!(
        read > 0.0 && written > 0.0,
        "order's sidecar counted no TCP bytes to postgres (read {read}, written {written})"
    );
    let opaque = metric(order_proxy, "protocol_detect_total", |l| {
        l.get("direction") == Some("outbound") && l.get("result") == Some("opaque_port")
    })
    .await?;
    assert!(opaque > 0.0, "no outbound connection was taken as opaque");
    let requests = metric(order_proxy, "request_total", to_postgres("outbound")).await?;
    assert_eq!(requests, 0.0, "database traffic was counted as requests");
    let inbound = metric(
        mesh.admin("postgres-proxy")?,
        "tcp_read_bytes_total",
        to_postgres("inbound"),
    )
    .await?;
    assert!(inbound > 0.0, "postgres's sidecar received no bytes");

    // PostgreSQL goes away (immediate shutdown, as a crash).
    let postgres_pid = mesh.pid("postgres")?;
    let restart = command_of(postgres_pid)?;
    let apps: Vec<u32> = ["user-1", "user-2", "payment", "order"]
        .iter()
        .map(|name| mesh.pid(name))
        .collect::<Result<_>>()?;
    let status = Command::new("kill")
        .args(["-QUIT", &postgres_pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -QUIT postgres");
    eventually(Duration::from_secs(20), "postgres to exit", || async {
        let stat = std::fs::read_to_string(format!("/proc/{postgres_pid}/stat")).ok();
        // Gone, or a zombie `dev up` has not reaped yet.
        stat.is_none_or(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .then_some(())
    })
    .await?;

    // Requests fail, and say why: the order service's 503 naming its database, or, once the
    // sidecar has deregistered the unhealthy app, the proxy's own explained 503.
    let reply = mesh
        .call("GET", &format!("/api/orders/{id}"), Some(&token), None)
        .await?;
    assert_eq!(reply.status, 503, "{reply:?}");
    let error = json_body(&reply)?["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("database postgres://") && error.contains("unavailable")
            || reply.header("ferrule-error").is_some(),
        "an unexplained failure: {reply:?}"
    );
    let order_log = std::fs::read_to_string(mesh.state_dir.join("logs/order.log"))?;
    assert!(
        order_log.contains("database unavailable"),
        "order's log does not say its database is unavailable"
    );

    // PostgreSQL comes back, as it was; the same app processes serve again.
    let mut restarted = Process::spawn(
        "postgres (restarted)",
        restart,
        &mesh.dir().join("postgres-restarted.log"),
    )?;
    restarted
        .wait_for_line(PG_READY, Duration::from_secs(30))
        .await?;
    let deadline = tokio::time::Instant::now() + RECOVER_WITHIN;
    let last = loop {
        let reply = mesh
            .call("GET", &format!("/api/orders/{id}"), Some(&token), None)
            .await?;
        if reply.status == 200 || tokio::time::Instant::now() > deadline {
            break reply;
        }
        // Under the gateway's rate limit of 10 a second.
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        last.status, 200,
        "not recovered in {RECOVER_WITHIN:?}: {last:?}"
    );
    assert_eq!(json_body(&last)?["status"], "paid");
    let reply = mesh
        .call("POST", "/api/orders", Some(&token), Some(&order))
        .await?;
    assert_eq!(reply.status, 201, "an order after the outage: {reply:?}");
    for (name, pid) in ["user-1", "user-2", "payment", "order"].iter().zip(apps) {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{name} (pid {pid}) is gone: it should have recovered, not restarted"
        );
    }

    // Fast shutdown of the server this test started, then the mesh.
    let status = Command::new("kill")
        .args(["-INT", &restarted.pid().to_string()])
        .status()?;
    ensure!(status.success(), "kill -INT postgres");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while restarted.running() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "postgres ignored SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(mesh);
    Ok(())
}
