//! The benchmark's fixed-rate load generator: holds a request rate and counts latency from
//! when each request was dispatched, so that coordinated omission is corrected.
//!
//! A closed-loop generator (wrk, h2load) sends the next request only when an earlier one has
//! answered, so a stall delays the requests it should have been measured on and the stall
//! vanishes from the percentiles. Here a pacer dispatches request `i` at `start + i / rate`
//! whatever happened to the others; a request that must wait for a free HTTP/1.1 connection
//! counts that wait in its latency. bench/run.sh uses it for the fixed-rate runs (oha, which
//! does the same with `--latency-correction`, does not build from crates.io without its TLS
//! stack, and this needs nothing the workspace does not already build).
//!
//! ```text
//! bench_load URL RATE SECONDS CONNECTIONS [h1|h2|grpc]
//! ```
//!
//! `h1` (the default) keeps CONNECTIONS HTTP/1.1 keep-alive connections, one request each at
//! a time; `h2` and `grpc` spread requests over CONNECTIONS HTTP/2 (prior knowledge)
//! connections; `grpc` POSTs one empty message and counts a call as good only when its
//! trailers say `grpc-status: 0`. Every request is bounded by a 10 s timeout (counted as an
//! error). Prints one line: `achieved_rps ok errors p50_ms p99_ms p999_ms max_pacer_lag_ms`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

/// Bound on one request, queueing for a connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    H1,
    H2,
    Grpc,
}

/// HTTP/1.1 connections are lent out one request at a time; HTTP/2 ones are shared.
#[derive(Clone)]
enum Pool {
    H1 {
        free: Arc<Mutex<mpsc::Receiver<http1::SendRequest<Full<Bytes>>>>>,
        give_back: mpsc::Sender<http1::SendRequest<Full<Bytes>>>,
    },
    H2(Arc<Vec<http2::SendRequest<Full<Bytes>>>>),
}

async fn dial(authority: &str) -> anyhow::Result<TokioIo<TcpStream>> {
    let stream = TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    Ok(TokioIo::new(stream))
}

async fn pool(mode: Mode, authority: &str, connections: usize) -> anyhow::Result<Pool> {
    if mode == Mode::H1 {
        let (give_back, free) = mpsc::channel(connections);
        for _ in 0..connections {
            let (send, conn) = http1::handshake(dial(authority).await?).await?;
            tokio::spawn(conn);
            give_back.send(send).await?;
        }
        return Ok(Pool::H1 {
            free: Arc::new(Mutex::new(free)),
            give_back,
        });
    }
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (send, conn) = http2::handshake(TokioExecutor::new(), dial(authority).await?).await?;
        tokio::spawn(conn);
        conns.push(send);
    }
    Ok(Pool::H2(Arc::new(conns)))
}

fn request(mode: Mode, uri: &Uri) -> Request<Full<Bytes>> {
    let builder = Request::builder().uri(uri.clone());
    let built = if mode == Mode::Grpc {
        builder
            .method(Method::POST)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
    } else if mode == Mode::H1 {
        // HTTP/1.1 needs a Host header; HTTP/2 carries :authority from the URI, and nginx
        // refuses a request that has both.
        builder
            .header("host", uri.authority().map_or("", |a| a.as_str()))
            .body(Full::new(Bytes::new()))
    } else {
        builder.body(Full::new(Bytes::new()))
    };
    built.expect("a valid request")
}

/// One request on the pool: whether it succeeded (2xx, and `grpc-status: 0` for gRPC).
async fn one(pool: Pool, mode: Mode, uri: Uri, n: usize) -> anyhow::Result<bool> {
    let rsp = match pool {
        Pool::H1 { free, give_back } => {
            let mut send = free
                .lock()
                .await
                .recv()
                .await
                .ok_or_else(|| anyhow::anyhow!("pool closed"))?;
            send.ready().await?;
            let rsp = send.send_request(request(mode, &uri)).await?;
            let (parts, body) = rsp.into_parts();
            let collected = body.collect().await?;
            give_back.send(send).await?;
            http::Response::from_parts(parts, collected)
        }
        Pool::H2(conns) => {
            let mut send = conns[n % conns.len()].clone();
            send.ready().await?;
            let rsp = send.send_request(request(mode, &uri)).await?;
            let (parts, body) = rsp.into_parts();
            http::Response::from_parts(parts, body.collect().await?)
        }
    };
    let ok = rsp.status().is_success()
        && (mode != Mode::Grpc
            || rsp
                .body()
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .is_some_and(|s| s == "0"));
    Ok(ok)
}

fn percentile(sorted: &[Duration], q: f64) -> String {
    if sorted.is_empty() {
        return "-".to_string();
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    format!("{:.3}", sorted[i].as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, rate, seconds, connections, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: bench_load URL RATE SECONDS CONNECTIONS [h1|h2|grpc]");
    };
    let uri: Uri = url.parse()?;
    let rate: f64 = rate.parse()?;
    let seconds: f64 = seconds.parse()?;
    let connections: usize = connections.parse()?;
    let mode = match rest.first().map(String::as_str) {
        None | Some("h1") => Mode::H1,
        Some("h2") => Mode::H2,
        Some("grpc") => Mode::Grpc,
        Some(other) => anyhow::bail!("mode is h1, h2 or grpc, not {other:?}"),
    };
    anyhow::ensure!(
        rate > 0.0 && seconds > 0.0 && connections > 0,
        "all must be > 0"
    );
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow::anyhow!("{url} has no host:port"))?
        .to_string();
    let pool = pool(mode, &authority, connections).await?;

    let total = (rate * seconds).round() as usize;
    let mut tasks = Vec::with_capacity(total);
    let mut max_lag = Duration::ZERO;
    let start = Instant::now() + Duration::from_millis(20);
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        // Timers fire on a millisecond wheel: the pacer's lateness is reported, and latency
        // counts from the dispatch, which includes any wait for a free connection.
        let dispatched = Instant::now();
        max_lag = max_lag.max(dispatched - due);
        let (pool, uri) = (pool.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            let ok = tokio::time::timeout(REQUEST_TIMEOUT, one(pool, mode, uri, n)).await;
            (matches!(ok, Ok(Ok(true))), dispatched.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut errors = 0usize;
    for task in tasks {
        match task.await {
            Ok((true, latency)) => latencies.push(latency),
            _ => errors += 1,
        }
    }
    latencies.sort_unstable();
    println!(
        "{:.0} {} {} {} {} {} {:.3}",
        latencies.len() as f64 / seconds,
        latencies.len(),
        errors,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        max_lag.as_secs_f64() * 1000.0
    );
    Ok(())
}
