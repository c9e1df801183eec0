//! Connecting to `ferrule-controller` and explaining its failures.
//!
//! Every verb that talks to the controller goes through [`connect`] and [`call`], so a controller
//! that is down, slow or too old always produces the same single line naming the address and
//! what to do, instead of a transport error chain.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

/// How long to wait for the controller to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a single unary call may take once connected.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the controller's gRPC API listens, as the user wrote it (`HOST:PORT` or
/// `http://HOST:PORT`).
#[derive(Debug, Clone)]
pub struct ControllerAddr {
    shown: String,
    uri: Uri,
}

impl ControllerAddr {
    /// Parses `--controller` / `FERRULE_CONTROLLER`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let authority = s.strip_prefix("http://").unwrap_or(s);
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        let refuse = || format!("expected HOST:PORT or http://HOST:PORT, got {s:?}");
        if authority.is_empty() || authority.contains(['/', '?', '#']) || authority.contains("://")
        {
            return Err(refuse());
        }
        let uri: Uri = format!("http://{authority}")
            .parse()
            .map_err(|_| refuse())?;
        if uri.port_u16().is_none() {
            return Err(format!(
                "{s:?} has no port (the controller's default is 8086)"
            ));
        }
        Ok(Self {
            shown: authority.to_string(),
            uri,
        })
    }
}

impl fmt::Display for ControllerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Opens a connection to the controller, or fails within [`CONNECT_TIMEOUT`] with one line
/// saying why and what to do. The channel reconnects by itself afterwards.
pub async fn connect(addr: &ControllerAddr) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from(addr.uri.clone()).connect_timeout(CONNECT_TIMEOUT);
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(err)) => Err(unreachable(addr, &transport_reason(&err))),
        Err(_) => Err(unreachable(
            addr,
            &format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
        )),
    }
}

/// Runs one unary call named `rpc` ("Admin/ListServices"), bounded by [`CALL_TIMEOUT`], and
/// turns a failure into a readable error.
pub async fn call<T>(
    addr: &ControllerAddr,
    rpc: &str,
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(explain_status(addr, rpc, &status)),
        Err(_) => Err(anyhow!(
            "the controller at {addr} did not answer {rpc} within {}s",
            CALL_TIMEOUT.as_secs()
        )),
    }
}

/// Explains a status the controller (or the transport underneath) returned for `rpc`.
pub fn explain_status(addr: &ControllerAddr, rpc: &str, status: &Status) -> anyhow::Error {
    match status.code() {
        Code::Unavailable => unreachable(addr, status.message()),
        Code::Unimplemented => anyhow!(
            "the server at {addr} does not implement {rpc}; is it a ferrule-controller as new as \
             this client?"
        ),
        code => anyhow!(
            "the controller at {addr} refused {rpc}: {} ({})",
            status.message(),
            code.description()
        ),
    }
}

fn unreachable(addr: &ControllerAddr, reason: &str) -> anyhow::Error {
    anyhow!(
        "cannot reach the controller at {addr} ({reason}); is ferrule-controller running? \
         set --controller or FERRULE_CONTROLLER"
    )
}

/// The most specific cause in a transport error's chain: an I/O error's kind ("connection
/// refused") when there is one, otherwise the innermost message.
fn transport_reason(err: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = err;
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() != std::io::ErrorKind::Other
        {
            return io.kind().to_string();
        }
        innermost = e;
        source = e.source();
    }
    innermost.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for (input, shown) in [
            ("127.0.0.1:8086", "127.0.0.1:8086"),
            ("http://127.0.0.1:8086", "127.0.0.1:8086"),
            ("http://localhost:9/", "localhost:9"),
            ("[::1]:8086", "[::1]:8086"),
        ] {
            assert_eq!(ControllerAddr::parse(input).unwrap().to_string(), shown);
        }
        for bad in [
            "",
            "127.0.0.1",
            "https://x:1",
            "x:1/path",
            "http://",
            "a b:1",
        ] {
            assert!(ControllerAddr::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn unreachable_controller_is_one_clear_line() {
        // A port that was free a moment ago: nothing listens there now.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = ControllerAddr::parse(&format!("127.0.0.1:{port}")).unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), connect(&addr))
            .await
            .expect("connect is bounded")
            .expect_err("nothing listens");
        let text = format!("{err:#}");
        assert_eq!(
            text,
            format!(
                "cannot reach the controller at 127.0.0.1:{port} (connection refused); is \
                 ferrule-controller running? set --controller or FERRULE_CONTROLLER"
            )
        );
    }

    #[test]
    fn statuses() {
        let addr = ControllerAddr::parse("127.0.0.1:8086").unwrap();
        let unimpl = explain_status(&addr, "Admin/ListProxies", &Status::unimplemented(""));
        assert!(
            unimpl
                .to_string()
                .contains("does not implement Admin/ListProxies")
        );
        let invalid = explain_status(
            &addr,
            "Registry/Register",
            &Status::invalid_argument("bad port"),
        );
        assert_eq!(
            invalid.to_string(),
            "the controller at 127.0.0.1:8086 refused Registry/Register: bad port \
             (Client specified an invalid argument)"
        );
    }
}

/// Every proxy the controller knows of, with its config acks (`Admin/ListProxies`).
pub async fn list_proxies(
    addr: &ControllerAddr,
) -> anyhow::Result<Vec<ferrule_proto::v1::ProxyStatus>> {
    let mut admin = ferrule_proto::v1::admin_client::AdminClient::new(connect(addr).await?);
    let resp = call(
        addr,
        "Admin/ListProxies",
        admin.list_proxies(ferrule_proto::v1::ListProxiesRequest {}),
    )
    .await?;
    Ok(resp.proxies)
}
