//! A server-side proxy killed with SIGKILL while requests flow through a client proxy
//! (issue "The proxy, rebuilt", item 7): idempotent requests written to the dead peer's
//! connection before any response byte are retried on the other endpoint, so none fails; a
//! `POST` in flight is not retried and fails with the self-explaining 502.
//!
//! Static discovery (no controller): the client proxy knows both server proxies' inbound
//! listeners as meshed endpoints of `web`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use ferrule_harness::backend::HttpBackend;
use ferrule_harness::{Proxy, eventually, http1};
use http_body_util::Full;

const WAIT: Duration = Duration::from_secs(15);

struct Mesh {
    backends: Vec<HttpBackend>,
    servers: Vec<Proxy>,
    client: Proxy,
    upstream: SocketAddr,
}

impl Mesh {
    async fn start() -> Result<Mesh> {
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for i in 1..=2 {
            let backend = HttpBackend::start(&format!("web-{i}")).await?;
            let server = Proxy::builder(&format!("web-{i}-proxy"))
                .args(["--service", "web", "--app-addr", &backend.addr.to_string()])
                .start()
                .await?;
            backends.push(backend);
            servers.push(server);
        }
        let mut client = Proxy::builder("client-proxy")
            .upstream("web")
            .args(["--balancer", "round-robin"]);
        for server in &servers {
            client = client.args([
                "--static-endpoint",
                &format!("web={}/meshed", server.inbound[""]),
            ]);
        }
        let client = client.start().await?;
        client.wait_ready(WAIT).await?;
        let upstream = client.upstream("web")?;
        let mesh = Mesh {
            backends,
            servers,
            client,
            upstream,
        };
        // Both endpoints serve before anything is counted.
        eventually(WAIT, "both web endpoints answered", || async {
            for _ in 0..4 {
                mesh.get("/warm").await.ok()?;
            }
            mesh.backends.iter().all(|b| b.requests() > 0).then_some(())
        })
        .await?;
        Ok(mesh)
    }

    async fn send(&self, method: &str, path: &str) -> Result<ferrule_harness::Reply> {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "web")
            .body(Full::new(Bytes::from_static(b"order")))?;
        tokio::time::timeout(WAIT, http1(self.upstream, req))
            .await
            .context("request timed out")?
    }

    async fn get(&self, path: &str) -> Result<ferrule_harness::Reply> {
        self.send("GET", path).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_server_proxy_fails_no_idempotent_request() -> Result<()> {
    let mesh = Arc::new(Mesh::start().await?);
    // Every request spends a little time at the backend, so some are always in flight on
    // the connection to the proxy that is killed.
    for backend in &mesh.backends {
        backend.set_delay(Duration::from_millis(5));
    }
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(tokio::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (mesh, sent, failed, stop) = (mesh.clone(), sent.clone(), failed.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            // Bounded: at most 2,000 requests per worker whatever happens.
            for _ in 0..2_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                sent.fetch_add(1, Ordering::SeqCst);
                match mesh.get("/item").await {
                    Ok(reply) if reply.status == 200 => {}
                    Ok(reply) => failed.lock().await.push(format!(
                        "{} {:?} {}",
                        reply.status,
                        reply.header("ferrule-error"),
                        reply.body
                    )),
                    Err(error) => failed.lock().await.push(format!("{error:#}")),
                }
            }
        }));
    }
    // Kill once traffic is flowing to both, then keep sending for a while after.
    let before = mesh.backends[0].requests();
    eventually(WAIT, "traffic flowing to web-1", || async {
        (mesh.backends[0].requests() > before + 50).then_some(())
    })
    .await?;
    let victim = mesh.servers[0].process.pid();
    kill9(victim)?;
    let after_kill = sent.load(Ordering::SeqCst);
    eventually(WAIT, "200 more requests after the kill", || async {
        (sent.load(Ordering::SeqCst) > after_kill + 200).then_some(())
    })
    .await?;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await?;
    }
    let failures = failed.lock().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed after SIGKILL of a server proxy; first: {:?}\nclient log:\n{}",
        failures.len(),
        sent.load(Ordering::SeqCst),
        failures.first(),
        mesh.client.process.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_in_flight_to_a_killed_server_proxy_is_not_retried() -> Result<()> {
    let mesh = Mesh::start().await?;
    // The POST waits at whichever backend gets it, long enough to kill its proxy.
    for backend in &mesh.backends {
        backend.set_delay(Duration::from_secs(10));
    }
    let counts: Vec<u64> = mesh.backends.iter().map(|b| b.requests()).collect();
    let post = {
        let upstream = mesh.upstream;
        tokio::spawn(async move {
            let req = http::Request::post("/orders")
                .header("host", "web")
                .body(Full::new(Bytes::from_static(b"order")))?;
            tokio::time::timeout(WAIT, http1(upstream, req))
                .await
                .context("POST timed out")?
        })
    };
    let holder = eventually(WAIT, "the POST reached a backend", || async {
        (0..mesh.backends.len()).find(|&i| mesh.backends[i].requests() > counts[i])
    })
    .await?;
    kill9(mesh.servers[holder].process.pid())?;
    let reply = post.await??;
    assert_eq!(reply.status, 502, "body: {}", reply.body);
    assert_eq!(reply.header("ferrule-error"), Some("upstream_failure"));
    let other = 1 - holder;
    assert_eq!(
        mesh.backends[other].requests(),
        counts[other],
        "the POST was sent again to the other endpoint"
    );
    Ok(())
}

fn kill9(pid: u32) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -9 {pid} failed: {status}");
    }
    Ok(())
}
