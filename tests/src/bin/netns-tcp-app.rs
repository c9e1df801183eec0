//! `netns-tcp-app`: the raw TCP app of the network-namespace cluster test
//! (`tests/tests/netns_cluster.rs`), a stand-in for a database or a legacy service.
//!
//! `netns-tcp-app --echo ADDR --peer ADDR...` listens on every address given. An `--echo`
//! listener copies back what it reads (the client speaks first). A `--peer` listener speaks
//! first: it writes the IP address its client connected from, one line, then echoes; so a
//! test learns both that a server-speaks-first connection is not held up and whether a proxy
//! sat in front of it (the peer is then the proxy, on loopback). Once bound it prints
//! `netns-tcp-app ready: {}`.

use std::net::SocketAddr;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    /// A listener that echoes.
    #[arg(long)]
    echo: Vec<SocketAddr>,
    /// A listener that first writes the client's IP address.
    #[arg(long)]
    peer: Vec<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut tasks = Vec::new();
    for (addr, banner) in args
        .echo
        .iter()
        .map(|a| (*a, false))
        .chain(args.peer.iter().map(|a| (*a, true)))
    {
        let listener = TcpListener::bind(addr).await?;
        tasks.push(tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                tokio::spawn(serve(stream, peer, banner));
            }
        }));
    }
    println!("netns-tcp-app ready: {{}}");
    futures::future::join_all(tasks).await;
    Ok(())
}

async fn serve(mut stream: TcpStream, peer: SocketAddr, banner: bool) -> std::io::Result<()> {
    if banner {
        stream
            .write_all(format!("{}\n", peer.ip().to_canonical()).as_bytes())
            .await?;
    }
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}
