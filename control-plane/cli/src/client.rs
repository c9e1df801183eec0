//! Connecting to `ferrule-controller` and explaining its failures.
//!
//! Every verb that talks to the controller goes through [`connect`] and [`call`], so a controller
//! that is down, slow or too old always produces the same single line naming the address and
//! what to do, instead of a transport error chain.
//!
//! A controller that is the mesh CA serves its API over TLS and wants the admin's credential
//! ([`AuthArgs`]: `--ca-file` with `--cert`/`--key`, or `--token`). For a mesh `ferrule dev up`
//! runs, the CLI finds them by itself: `dev up` notes where its state dir is, under the
//! controller's address, in a folder only the user can write ([`dev_index_dir`]).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use ferrule_channel::{ControllerTls, StaticCert, Token};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

/// A connection to the controller that adds the admin token (if any) to each call.
pub type Conn = InterceptedService<Channel, Token>;

/// The admin's credentials for a controller whose API is protected (docs/identity.md).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// Trust anchors (PEM, the mesh's trust-anchors.pem) the controller's certificate must
    /// chain to; talks TLS to the controller. Found by itself for a `ferrule dev up` mesh.
    #[arg(long, global = true, env = "FERRULE_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<PathBuf>,

    /// The admin's client certificate (PEM; `ferrule identity init` writes admin.pem).
    #[arg(long, global = true, env = "FERRULE_CERT", value_name = "PEM")]
    pub cert: Option<PathBuf>,

    /// The key of --cert (admin.key).
    #[arg(long, global = true, env = "FERRULE_KEY", value_name = "PEM")]
    pub key: Option<PathBuf>,

    /// The admin token (`ferrule identity init` writes admin-token), sent as
    /// `authorization: Bearer` over TLS; e.g. --token "$(cat mesh-ca/admin-token)".
    #[arg(
        long,
        global = true,
        env = "FERRULE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

/// TLS and the token for the controller's protected API.
#[derive(Debug, Clone)]
struct Credentials {
    tls: ControllerTls,
    token: Token,
}

impl Credentials {
    fn new(
        ca_file: &Path,
        cert_key: Option<(&Path, &Path)>,
        token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let anchors = ferrule_channel::read_certificates(ca_file).context("--ca-file")?;
        let cert = cert_key
            .map(|(cert, key)| ferrule_channel::read_certified_key(cert, key))
            .transpose()
            .context("--cert/--key")?;
        // The controller's identity is in the trust domain of the admin's certificate, or
        // else of the anchors.
        let trust_domain = cert
            .as_ref()
            .and_then(|c| c.cert.first())
            .and_then(|leaf| ferrule_channel::trust_domain_of(leaf))
            .or_else(|| ferrule_channel::trust_domain_of(&anchors[0]))
            .unwrap_or_else(|| ferrule_proto::identity::DEFAULT_TRUST_DOMAIN.to_string());
        let expected = ferrule_proto::identity::controller_identity(&trust_domain)?;
        let tls = ControllerTls::new(anchors, expected, Arc::new(StaticCert(cert)))
            .context("--ca-file")?;
        Ok(Self {
            tls,
            token: Token::new(token).context("--token")?,
        })
    }

    /// The admin credentials `ferrule identity init` wrote into `dir`.
    fn in_identity_dir(dir: &Path) -> anyhow::Result<Self> {
        use crate::identity::{ADMIN_CERT, ADMIN_KEY, TRUST_ANCHORS};
        Self::new(
            &dir.join(TRUST_ANCHORS),
            Some((&dir.join(ADMIN_CERT), &dir.join(ADMIN_KEY))),
            None,
        )
    }
}

/// Where `ferrule dev up` notes, per controller address, the state dir of the mesh it runs:
/// `$XDG_RUNTIME_DIR/ferrule/dev`, else `<tmp>/ferrule-<uid>/dev`; made readable by the user
/// only, and trusted only while it is.
pub fn dev_index_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("ferrule").join("dev"),
        _ => std::env::temp_dir()
            .join(format!("ferrule-{}", rustix::process::getuid().as_raw()))
            .join("dev"),
    }
}

/// The index entry of the controller at `authority` (`IP:PORT`).
pub fn dev_index_entry(authority: &str) -> PathBuf {
    dev_index_dir().join(authority.replace([':', '[', ']'], "_"))
}

/// Notes that the dev mesh in `state_dir` runs the controller at `authority`.
pub fn note_dev_mesh(authority: &str, state_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = dev_index_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let entry = dev_index_entry(authority);
    std::fs::write(&entry, state_dir.as_os_str().as_encoded_bytes())
        .with_context(|| format!("writing {}", entry.display()))
}

/// Removes the note of [`note_dev_mesh`], if it is still this state dir's.
pub fn forget_dev_mesh(authority: &str, state_dir: &Path) {
    let entry = dev_index_entry(authority);
    if std::fs::read(&entry).is_ok_and(|noted| noted == state_dir.as_os_str().as_encoded_bytes()) {
        let _ = std::fs::remove_file(entry);
    }
}

/// The identity dir of the dev mesh whose controller is at `authority`, if one is noted and
/// the note can be trusted (the user's own, private folder; the mesh's dev.json agrees).
fn dev_mesh_identity(authority: &str) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::getuid().as_raw();
    let private =
        |path: &Path| std::fs::metadata(path).is_ok_and(|m| m.uid() == me && m.mode() & 0o022 == 0);
    let entry = dev_index_entry(authority);
    if !private(&dev_index_dir()) || !private(&entry) {
        return None;
    }
    let state_dir = PathBuf::from(std::fs::read_to_string(&entry).ok()?);
    let state = crate::dev::state::DevState::load(&state_dir).ok()??;
    (state.controller.to_string() == authority)
        .then(|| state_dir.join("identity"))
        .filter(|dir| dir.join(crate::identity::ADMIN_CERT).is_file())
}

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
    credentials: Option<Credentials>,
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
            credentials: None,
        })
    }

    /// The same address, reached with the credentials `args` name; with none, those of the
    /// dev mesh running this controller, if there is one.
    pub fn with_auth(mut self, args: &AuthArgs) -> anyhow::Result<Self> {
        let cert_key = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            (Some(_), None) => bail!("--cert needs --key"),
            (None, Some(_)) => bail!("--key needs --cert"),
        };
        self.credentials = match &args.ca_file {
            Some(ca_file) => Some(Credentials::new(ca_file, cert_key, args.token.as_deref())?),
            None if cert_key.is_some() || args.token.is_some() => bail!(
                "--cert, --key and --token need --ca-file: the controller's API is reached over TLS, verified against the mesh's trust anchors"
            ),
            None => match dev_mesh_identity(&self.shown) {
                Some(dir) => Some(Credentials::in_identity_dir(&dir).with_context(|| {
                    format!("the admin credentials of the dev mesh in {}", dir.display())
                })?),
                None => None,
            },
        };
        Ok(self)
    }

    /// The same address, reached with the admin credentials in the identity dir `dir`.
    pub fn with_identity_dir(mut self, dir: &Path) -> anyhow::Result<Self> {
        self.credentials = Some(Credentials::in_identity_dir(dir)?);
        Ok(self)
    }
}

impl fmt::Display for ControllerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Opens a connection to the controller, or fails within [`CONNECT_TIMEOUT`] with one line
/// saying why and what to do. The channel reconnects by itself afterwards.
pub async fn connect(addr: &ControllerAddr) -> anyhow::Result<Conn> {
    let endpoint = Endpoint::from(addr.uri.clone()).connect_timeout(CONNECT_TIMEOUT);
    let (connecting, token) = match &addr.credentials {
        Some(c) => (
            futures::future::Either::Left(c.tls.connect(endpoint)),
            c.token.clone(),
        ),
        None => (
            futures::future::Either::Right(async move { endpoint.connect().await }),
            Token::default(),
        ),
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(channel)) => Ok(InterceptedService::new(channel, token)),
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
        Code::Unauthenticated | Code::PermissionDenied => anyhow!(
            "the controller at {addr} refused {rpc}: {} ({}); its API wants the admin's \
             credential: --ca-file with --cert and --key, or --token (docs/identity.md)",
            status.message(),
            status.code().description()
        ),
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
