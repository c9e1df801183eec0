//! A running `ferrule dev up` (the local mesh `make demo` starts), owned by a guard.
//!
//! [`DevMesh::up`] starts it with its state in a temporary folder, waits for its ready line and
//! reads `dev.json` (every process's pid, admin address and database, the gateway's and the
//! controller's addresses). Dropping the guard runs `ferrule dev down` (itself bounded:
//! SIGTERM, a wait, then SIGKILL) and then kills `dev up` if it is still there, so nothing
//! outlives the test, whether it passes or fails; a failing test also prints the end of every
//! process's log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

use crate::{ANY_PORT, Process, Reply, binary, http1};

pub struct DevMesh {
    pub process: Process,
    pub state_dir: PathBuf,
    pub gateway: SocketAddr,
    /// `dev.json`, read once the mesh is ready.
    pub state: Value,
    dir: tempfile::TempDir,
}

impl DevMesh {
    /// `ferrule dev up --quiet` with `args` and the gateway on port 0 (`dev up` writes the
    /// port it got to `dev.json`), ready within `within`.
    pub async fn up(args: &[&str], within: Duration) -> anyhow::Result<DevMesh> {
        let dir = tempfile::Builder::new().prefix("ferrule-dev-").tempdir()?;
        let state_dir = dir.path().join("state");
        let mut cmd = Command::new(binary("ferrule")?);
        cmd.args(["dev", "up", "--quiet", "--gateway-addr", ANY_PORT])
            .args(args)
            .arg("--state-dir")
            .arg(&state_dir);
        let process = Process::spawn("ferrule dev up", cmd, &dir.path().join("dev-up.log"))?;
        // The guard exists before the wait, so a failed start-up is cleaned up too.
        let mut mesh = DevMesh {
            process,
            state_dir,
            gateway: ANY_PORT.parse()?,
            state: Value::Null,
            dir,
        };
        mesh.process.wait_for_line("ready:", within).await?;
        let json = std::fs::read(mesh.state_dir.join("dev.json")).context("reading dev.json")?;
        mesh.state = serde_json::from_slice(&json).context("parsing dev.json")?;
        mesh.gateway = mesh.addr("gateway")?;
        Ok(mesh)
    }

    /// The folder the mesh's state folder is in, for a test's own files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A top-level address in `dev.json` (`gateway`, `controller`, `postgres`).
    pub fn addr(&self, key: &str) -> anyhow::Result<SocketAddr> {
        self.state[key]
            .as_str()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("{key} in dev.json: {}", self.state))
    }

    /// The mesh CA's files `dev up` made (none with `--no-identity`).
    pub fn identity_dir(&self) -> Option<PathBuf> {
        Some(self.state_dir.join("identity"))
            .filter(|d| d.join(crate::controller::ADMIN_CERT).is_file())
    }

    /// A channel to the mesh's controller as the admin (over TLS, as `ferrule` finds its way
    /// there by itself), or plaintext with `--no-identity`.
    pub async fn controller_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!(
            "http://{}",
            self.addr("controller")?
        ))?
        .connect_timeout(Duration::from_secs(5));
        let channel = match self.identity_dir() {
            Some(dir) => {
                crate::controller_tls(&dir, ferrule_proto::identity::DEFAULT_TRUST_DOMAIN, true)?
                    .connect(endpoint)
                    .await
            }
            None => endpoint.connect().await,
        };
        Ok(channel?)
    }

    /// `dev.json`'s record of the process called `name`.
    pub fn process(&self, name: &str) -> anyhow::Result<&Value> {
        self.state["processes"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .with_context(|| format!("no process {name} in dev.json: {}", self.state))
    }

    pub fn pid(&self, name: &str) -> anyhow::Result<u32> {
        let pid = self.process(name)?["pid"].as_u64().context("pid")?;
        Ok(u32::try_from(pid)?)
    }

    pub fn admin(&self, name: &str) -> anyhow::Result<SocketAddr> {
        let admin = self.process(name)?["admin"].as_str().context("admin")?;
        Ok(admin.parse()?)
    }

    /// One request to the gateway, with a bearer token and a JSON body if given.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<Reply> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.gateway))
            .header("host", self.gateway.to_string());
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some(body) => {
                req = req.header("content-type", "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        http1(self.gateway, req.body(Full::new(body))?).await
    }

    /// Logs in through the gateway as the shop's seeded user (alice); the token (a 200 with a
    /// token, or an error saying what came instead).
    pub async fn login(&self) -> anyhow::Result<String> {
        let credentials = serde_json::json!({"username": "alice", "password": "wonderland"});
        let reply = self
            .call("POST", "/login", None, Some(&credentials))
            .await?;
        anyhow::ensure!(reply.status == 200, "login: {reply:?}");
        let body: Value = serde_json::from_str(&reply.body)
            .with_context(|| format!("login answered no JSON: {reply:?}"))?;
        Ok(body["token"]
            .as_str()
            .with_context(|| format!("login answered no token: {reply:?}"))?
            .to_string())
    }
}

impl Drop for DevMesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_logs(&self.state_dir.join("logs"));
        }
        // `dev down` is itself bounded: SIGTERM, a wait, then SIGKILL. Blocking is fine in a
        // destructor that must finish before the test's processes may be left alone.
        match Command::new(binary("ferrule").expect("ferrule was found at start"))
            .args(["dev", "down", "--state-dir"])
            .arg(&self.state_dir)
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "ferrule dev down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("could not run ferrule dev down: {e}"),
        }
        // Then the `Process` field kills `dev up` if it is still there.
    }
}

/// The end of every process's log, for a failing test's output.
fn print_logs(logs: &Path) {
    let Ok(entries) = std::fs::read_dir(logs) else {
        return;
    };
    for entry in entries.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "--- {} (last 30 lines) ---\n{}",
            entry.path().display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        );
    }
}

/// The sum of the samples of `metric` on the proxy whose admin listener is `admin`, over the
/// series whose labels satisfy `select`.
pub async fn metric_sum(
    admin: SocketAddr,
    metric: &str,
    select: impl Fn(&prometheus_parse::Labels) -> bool,
) -> anyhow::Result<f64> {
    let (status, text) = crate::http_get(admin, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics on {admin} answered {status}");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).context("metrics parse")?;
    Ok(scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && select(&s.labels))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum())
}
