//! Test harness: backends on 127.0.0.1 port 0, and client/server proxy pairs wired with
//! `Discovery::fixed`.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use ferrule_config::Resource;
use ferrule_proto::names::ServiceRef;
use ferrule_proto::v1::Endpoint;
use ferrule_proxy::api::policy::PolicyClient;
use ferrule_proxy::body::{self, BoxBody};
use ferrule_proxy::config::Config;
use ferrule_proxy::discovery::Discovery;
use ferrule_proxy::policy::PolicySet;
use ferrule_proxy::sidecar::Proxy;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every test's overall bound.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// An HTTP/1 + HTTP/2 backend:
/// * any path: echoes the request body as it streams, with `x-seen-version`,
///   `x-seen-meshed` (the mesh headers reached the app?) and `x-seen-path` headers;
/// * `/trailers`: a body in three chunks followed by `grpc-status: 0` trailers;
/// * `/ws`: answers an upgrade with 101 and echoes bytes on the upgraded connection;
/// * `CONNECT`: answers 200 and echoes bytes on the tunnel.
pub async fn http_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(backend_handle);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn backend_handle(mut req: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    let version = format!("{:?}", req.version());
    let meshed = req.headers().contains_key("ferrule-meshed")
        || req.headers().contains_key("ferrule-orig-proto");
    let path = req.uri().path().to_string();
    let mut rsp = match path.as_str() {
        "/trailers" => {
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"one,"))),
                Ok(Frame::data(Bytes::from_static(b"two,"))),
                Ok(Frame::data(Bytes::from_static(b"three"))),
                Ok(Frame::trailers({
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", "0".parse().unwrap());
                    t.insert("grpc-message", "fine".parse().unwrap());
                    t
                })),
            ];
            let mut rsp =
                Response::new(body::boxed(StreamBody::new(futures::stream::iter(frames))));
            rsp.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            rsp
        }
        _ if path == "/ws" || req.method() == http::Method::CONNECT => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut rsp = Response::new(body::empty());
            if req.method() != http::Method::CONNECT {
                *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                rsp.headers_mut()
                    .insert("connection", "upgrade".parse().unwrap());
                rsp.headers_mut()
                    .insert("upgrade", "websocket".parse().unwrap());
            }
            rsp
        }
        _ => Response::new(body::boxed(req.into_body())),
    };
    let h = rsp.headers_mut();
    h.insert("x-seen-version", version.parse().unwrap());
    h.insert("x-seen-meshed", meshed.to_string().parse().unwrap());
    h.insert("x-seen-path", path.parse().unwrap());
    Ok(rsp)
}

/// A TCP backend that reads until the client half-closes, then answers
/// `got N bytes` and closes.
pub async fn tcp_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut all = Vec::new();
                if stream.read_to_end(&mut all).await.is_ok() {
                    let _ = stream
                        .write_all(format!("got {} bytes", all.len()).as_bytes())
                        .await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    addr
}

pub fn config(args: &[&str]) -> Config {
    let base = ["ferrule-proxy", "--admin-addr=127.0.0.1:0"];
    Config::try_parse_from(base.iter().chain(args.iter()).copied()).expect("test config parses")
}

/// A server-side proxy fronting `app` as service `service`.
pub async fn server_proxy(service: &str, app: SocketAddr, extra: &[&str]) -> Proxy {
    let mut args = vec![
        format!("--service={service}"),
        format!("--app-addr={app}"),
        "--inbound-addr=127.0.0.1:0".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start(config(&args), Discovery::fixed(vec![]))
        .await
        .expect("server proxy starts")
}

/// An endpoint of `service` reached through `proxy`'s inbound listener.
pub fn meshed_endpoint(service: &str, proxy: &Proxy) -> Endpoint {
    let addr = proxy.addrs.inbound_port("").expect("inbound listener");
    Endpoint {
        service: service.to_string(),
        address: addr.ip().to_string(),
        port: u32::from(addr.port()),
        meshed: true,
        ..Default::default()
    }
}

/// A plain (non-meshed) endpoint.
pub fn plain_endpoint(service: &str, addr: SocketAddr) -> Endpoint {
    Endpoint {
        service: service.to_string(),
        address: addr.ip().to_string(),
        port: u32::from(addr.port()),
        ..Default::default()
    }
}

/// A client-side proxy with one upstream listener per service in `services`.
pub async fn client_proxy(services: Vec<(&str, Vec<Endpoint>)>, extra: &[&str]) -> Proxy {
    let mut args: Vec<String> = services
        .iter()
        .map(|(s, _)| format!("--upstream={s}=127.0.0.1:0"))
        .collect();
    args.push("--endpoint-wait=300ms".to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let fixed = services
        .into_iter()
        .map(|(s, eps)| (ServiceRef::parse(s).unwrap(), eps))
        .collect();
    Proxy::start(config(&args), Discovery::fixed(fixed))
        .await
        .expect("client proxy starts")
}

/// A config resource (`ServicePolicy`, `HTTPRoute`) named `name` in namespace `default`.
pub fn resource(kind: &str, name: &str, spec: serde_json::Value) -> Resource {
    Resource::from_parts(kind, "default", name, &spec.to_string()).expect("resource parses")
}

/// A client proxy with one upstream listener per service in `services`, under the policy
/// `resources` (version 42) given by a fixed `PolicyClient`.
pub async fn policy_proxy(
    services: Vec<(&str, Vec<Endpoint>)>,
    resources: Vec<Resource>,
    extra: &[&str],
) -> Proxy {
    let mut args: Vec<String> = services
        .iter()
        .map(|(s, _)| format!("--upstream={s}=127.0.0.1:0"))
        .collect();
    args.push("--endpoint-wait=300ms".into());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let fixed = services
        .into_iter()
        .map(|(s, eps)| (ServiceRef::parse(s).unwrap(), eps))
        .collect();
    let set = PolicySet::from_resources(42, resources).expect("policy compiles");
    Proxy::start_with_policies(
        config(&args),
        Discovery::fixed(fixed),
        Some(PolicyClient::fixed(set)),
    )
    .await
    .expect("proxy starts")
}

/// One HTTP/1 request on a fresh connection; the body is collected.
pub async fn http1(
    addr: SocketAddr,
    req: Request<BoxBody>,
) -> anyhow::Result<(http::response::Parts, Bytes)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let rsp = sender.send_request(req).await?;
    let (parts, body) = rsp.into_parts();
    let bytes = body.collect().await?.to_bytes();
    Ok((parts, bytes))
}

/// An HTTP/2 connection to `addr`.
pub async fn h2_client(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<BoxBody>> {
    let stream = TcpStream::connect(addr).await?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .context("h2 handshake")?;
    tokio::spawn(conn);
    Ok(sender)
}

/// GETs `path` on a proxy's admin listener.
pub async fn admin_get(proxy: &Proxy, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let req = Request::get(path)
        .header("host", "admin")
        .body(body::empty())?;
    let (parts, bytes) = http1(proxy.addrs.admin, req).await?;
    Ok((parts.status, String::from_utf8(bytes.to_vec())?))
}

/// Sends raw bytes and reads until the server closes.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(bytes).await?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
