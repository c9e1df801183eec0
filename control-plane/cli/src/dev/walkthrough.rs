//! What `ferrule dev up` prints once the mesh is ready: the `ready:` line, the dashboard's
//! URL and a short walkthrough of copy-pasteable commands against the gateway (log in, read a user, create an
//! order over HTTP and over gRPC, run into the rate limit), then where each proxy's metrics
//! are and how to see traces.
//!
//! The README's walkthrough is this text; keep the two together.

use std::fmt::Write;
use std::path::Path;

use super::plan::{API_RATE_LIMIT, ORDER_GRPC_PREFIX};
use super::state::DevState;

/// The walkthrough for the mesh in `state`, whose files are in `state_dir`.
pub fn render(state: &DevState, state_dir: &Path) -> String {
    let gw = format!("http://{}", state.gateway);
    let gw_host = state.gateway;
    let dir = shown(state_dir);
    let ferrule = shown(&state.supervisor.program);
    let controller = state.controller;
    let over = API_RATE_LIMIT + 5;
    let dashboard = state
        .processes
        .iter()
        .find(|p| p.name == "controller")
        .and_then(|p| p.admin)
        .map(|admin| {
            format!(
                "\nDashboard (topology, golden metrics, breakers, proxies, traces): http://{admin}/\n"
            )
        })
        .unwrap_or_default();
    let mut out = format!(
        "ready: the shop is up behind the gateway at {gw} ({} processes, logs in {dir}/logs)
{dashboard}
Try it from another shell:

  # log in as alice and keep the token
  TOKEN=$(curl -s {gw}/login -H 'content-type: application/json' \\
    -d '{{\"username\":\"alice\",\"password\":\"wonderland\"}}' | sed -E 's/.*\"token\":\"([^\"]+)\".*/\\1/')

  # read a user: the gateway checks the token and picks one of the two user replicas
  curl -s {gw}/api/users/123 -H \"authorization: Bearer $TOKEN\"

  # without a token: 401 missing authorization header
  curl -s {gw}/api/users/123

  # create an order: order calls user and payment through its sidecar
  curl -s {gw}/api/orders -H \"authorization: Bearer $TOKEN\" -H 'content-type: application/json' \\
    -d '{{\"user_id\":\"123\",\"items\":[{{\"sku\":\"book\",\"quantity\":2,\"unit_price_cents\":1299}}]}}'

  # the same over gRPC (h2c to the gateway, routed by {ORDER_GRPC_PREFIX} to order:grpc; the
  # token goes in the authorization metadata). grpcurl needs the proto: proto/shop/order.proto
  grpcurl -plaintext -import-path proto/shop -proto order.proto -H \"authorization: Bearer $TOKEN\" \\
    -d '{{\"user_id\":\"123\",\"items\":[{{\"sku\":\"book\",\"quantity\":2,\"unit_price_cents\":1299}}]}}' \\
    {gw_host} shop.order.v1.OrderService/CreateOrder

  # /api allows {API_RATE_LIMIT} requests a second per client: the last of these get 429
  for i in $(seq {over}); do curl -s -o /dev/null -w '%{{http_code}} ' {gw}/api/users/123 -H \"authorization: Bearer $TOKEN\"; done; echo

  # the registry: each user replica's sidecar registered its http and grpc ports, with the
  # identity its certificate proves (every hop between proxies is mutual TLS)
  {ferrule} --controller {controller} get endpoints user
  {ferrule} --controller {controller} identity status

Metrics (Prometheus text):
",
        state.processes.len()
    );
    let width = state
        .processes
        .iter()
        .filter(|p| p.admin.is_some())
        .map(|p| p.name.len())
        .max()
        .unwrap_or(0);
    for process in &state.processes {
        if let Some(admin) = process.admin {
            let _ = writeln!(out, "  {:<width$}  http://{admin}/metrics", process.name);
        }
    }
    if let Some(postgres) = state.postgres {
        let _ = write!(
            out,
            "
PostgreSQL (--postgres) on {postgres}, one database per service (user, order, payment); the
apps reach it through their sidecars, as the mesh service `postgres`:
  psql -h {ip} -p {port} -U {user} order -c 'SELECT id, status, total_cents FROM orders'
",
            ip = postgres.ip(),
            port = postgres.port(),
            user = super::postgres::USER,
        );
    }
    match (&state.traces, &state.otlp) {
        (Some(_), _) => {
            let _ = write!(
                out,
                "
Traces: every proxy exports its spans to this mesh's own OTLP receiver:
  {ferrule} traces --state-dir {dir}            # the last traces, newest first
  {ferrule} trace <TRACE ID> --state-dir {dir}  # one trace's waterfall
"
            );
        }
        (None, Some(otlp)) => {
            let _ = write!(out, "\nTraces: every proxy exports its spans to {otlp}\n");
        }
        (None, None) => {}
    }
    let _ = write!(
        out,
        "
Ctrl-C stops the mesh; so does `{ferrule} dev down --state-dir {dir}` from another shell.
"
    );
    out
}

/// The state dir as the user gave it when it is relative to where they are, else absolute.
fn shown(state_dir: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| state_dir.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| state_dir.to_path_buf())
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::state::ProcessRecord;

    #[test]
    fn names_the_gateway_and_every_metrics_url() {
        let record = |name: &str, admin: Option<&str>| ProcessRecord {
            name: name.into(),
            pid: 1,
            program: "/bin/x".into(),
            log: None,
            admin: admin.map(|a| a.parse().unwrap()),
            database: None,
        };
        let state = DevState {
            supervisor: record("ferrule dev up", None),
            controller: "127.0.0.1:1".parse().unwrap(),
            gateway: "127.0.0.1:8000".parse().unwrap(),
            postgres: None,
            traces: Some("127.0.0.1:5".parse().unwrap()),
            otlp: None,
            processes: vec![
                record("controller", Some("127.0.0.1:9990")),
                record("user-1", None),
                record("user-1-proxy", Some("127.0.0.1:4191")),
                record("gateway", Some("127.0.0.1:4192")),
            ],
        };
        let text = render(&state, Path::new("/tmp/st"));
        assert!(text.starts_with("ready: "), "{text}");
        assert!(
            text.contains("Dashboard (topology, golden metrics, breakers, proxies, traces): http://127.0.0.1:9990/\n"),
            "{text}"
        );
        assert!(text.contains("curl -s http://127.0.0.1:8000/api/users/123 -H"));
        assert!(text.contains("  user-1-proxy  http://127.0.0.1:4191/metrics\n"));
        assert!(text.contains("  gateway       http://127.0.0.1:4192/metrics\n"));
        assert!(text.contains("  controller    http://127.0.0.1:9990/metrics\n"));
        assert!(text.contains("`/bin/x dev down --state-dir /tmp/st`"));
        assert!(text.contains("/bin/x --controller 127.0.0.1:1 get endpoints user\n"));
        assert!(text.contains("$(seq 15)"));
        assert!(text.contains("    127.0.0.1:8000 shop.order.v1.OrderService/CreateOrder\n"));
        assert!(
            text.contains("/bin/x traces --state-dir /tmp/st "),
            "{text}"
        );
    }
}
