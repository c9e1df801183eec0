//! `ferrule_trace::receiver` as a process of its own: the OTLP collector `bench/tracing.sh`
//! exports to (the same receiver `ferrule dev up` runs in-process and the tests use).
//!
//! `otlp_receiver [OTLP_ADDR [API_ADDR [MAX_TRACES]]]` (defaults `127.0.0.1:0`, `127.0.0.1:0`,
//! 100) prints `otlp-receiver ready: {"otlp":"IP:PORT","api":"IP:PORT"}` once bound and runs
//! until SIGINT or SIGTERM.

use std::io;
use std::net::SocketAddr;

use ferrule_trace::receiver::Receiver;
use tokio::signal::unix::{SignalKind, signal};

fn addr(arg: Option<String>) -> io::Result<SocketAddr> {
    arg.as_deref()
        .unwrap_or("127.0.0.1:0")
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{arg:?}: {e}")))
}

#[tokio::main]
async fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let otlp = addr(args.next())?;
    let api = addr(args.next())?;
    let max_traces = match args.next() {
        Some(n) => n.parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MAX_TRACES {n:?}: {e}"),
            )
        })?,
        None => 100,
    };
    let receiver = Receiver::start(otlp, api, max_traces).await?;
    println!(
        "otlp-receiver ready: {{\"otlp\":\"{}\",\"api\":\"{}\"}}",
        receiver.otlp, receiver.api
    );
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
