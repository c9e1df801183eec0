//! `ferrule register SERVICE ADDR:PORT`: registers an endpoint that has no ferrule proxy in
//! front of it (a database, a legacy service) and keeps it registered while the command runs,
//! the way a Consul service registration of an external service works.
//!
//! The registration lives under a lease: the command renews it every third of its TTL over
//! Registry/KeepAlive, registers again when the controller reports the lease gone (a controller
//! on the embedded store that restarted, say), rides out a controller that is briefly
//! unreachable, and deregisters on Ctrl-C or SIGTERM. If the command dies without
//! deregistering, the registration expires within its TTL.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ferrule_proto::names::socket_string;
use ferrule_proto::v1::registry_client::RegistryClient;
use ferrule_proto::v1::{
    DeregisterRequest, Endpoint, KeepAliveRequest, ProtocolHint, RegisterRequest,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::{MissedTickBehavior, interval, sleep, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::client::{self, CALL_TIMEOUT, ControllerAddr};
use crate::parse;

/// How long to wait before trying again after the controller could not be reached.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
#[command(
    after_help = "Example: ferrule register user-db 10.0.0.5:5432 --label engine=postgres \
                        --protocol opaque"
)]
pub struct RegisterArgs {
    /// Service the endpoint belongs to, e.g. `user-db`.
    #[arg(value_parser = parse::service)]
    service: String,

    /// Address and port peers dial: IP:PORT, or [IPv6]:PORT.
    #[arg(value_name = "ADDR:PORT", value_parser = parse::socket_addr)]
    address: SocketAddr,

    /// Lease length: how long the registration outlives this command if it stops without
    /// deregistering. Renewed every third of it.
    #[arg(long, default_value = "30s", value_parser = parse::ttl)]
    ttl: Duration,

    /// Label KEY=VALUE for the endpoint; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse::label)]
    labels: Vec<(String, String)>,

    /// The service port this endpoint serves, e.g. `grpc`; omit for a service with one
    /// unnamed port.
    #[arg(long, value_parser = parse::port_name)]
    port_name: Option<String>,

    /// Zone the endpoint runs in, for zone-aware load balancing.
    #[arg(long)]
    zone: Option<String>,

    /// Namespace of the service; callers in another namespace name it `SERVICE.NAMESPACE`.
    #[arg(long, short = 'n', default_value = "default", value_parser = parse::namespace)]
    namespace: String,

    /// What the endpoint speaks; `opaque` for server-speaks-first protocols such as databases,
    /// so proxies forward bytes without waiting to detect a protocol.
    #[arg(long, value_enum)]
    protocol: Option<Protocol>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Protocol {
    Http1,
    Http2,
    Grpc,
    Opaque,
}

impl From<Protocol> for ProtocolHint {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Http1 => Self::Http1,
            Protocol::Http2 => Self::Http2,
            Protocol::Grpc => Self::Grpc,
            Protocol::Opaque => Self::Opaque,
        }
    }
}

impl RegisterArgs {
    /// Checks what clap cannot see one value at a time: a label key given twice.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = HashMap::new();
        for (key, value) in &self.labels {
            if let Some(first) = seen.insert(key, value) {
                return Err(format!(
                    "label {key:?} is given twice (--label {key}={first} and --label {key}={value})"
                ));
            }
        }
        Ok(())
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            service: self.service.clone(),
            namespace: self.namespace.clone(),
            port_name: self.port_name.clone().unwrap_or_default(),
            address: self.address.ip().to_string(),
            port: self.address.port().into(),
            labels: self.labels.iter().cloned().collect(),
            zone: self.zone.clone().unwrap_or_default(),
            protocol_hint: self.protocol.map_or(ProtocolHint::Unspecified, Into::into) as i32,
            meshed: false,
            ..Default::default()
        }
    }
}

pub async fn run(args: RegisterArgs, addr: &ControllerAddr) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            Ok(()) = tokio::signal::ctrl_c() => {}
            Some(()) = terminate.recv() => {}
        }
        on_signal.cancel();
    });

    let registrar = Registrar {
        client: RegistryClient::new(client::connect(addr).await?),
        addr: addr.clone(),
        endpoint: args.endpoint(),
        ttl: args.ttl,
        retry: RETRY,
    };
    registrar.run(&shutdown, &mut io::stdout()).await
}

/// A registration the controller granted.
struct Lease {
    id: i64,
    ttl: Duration,
}

/// Why keeping a lease alive stopped.
enum Lapse {
    /// The controller no longer has the lease: register again.
    Lost,
    /// The stream failed; the lease may still exist, so keep it alive again after a pause.
    Broken(String),
}

struct Registrar {
    client: RegistryClient<crate::client::Conn>,
    addr: ControllerAddr,
    endpoint: Endpoint,
    ttl: Duration,
    retry: Duration,
}

impl Registrar {
    /// Registers, keeps the registration alive until `shutdown`, then deregisters. Only the
    /// first registration and the deregistration can fail the command; in between, failures
    /// are reported on stderr and retried.
    async fn run(
        mut self,
        shutdown: &CancellationToken,
        out: &mut impl Write,
    ) -> anyhow::Result<()> {
        let mut lease = self.register().await?;
        self.announce(out, "registered", &lease);
        loop {
            let lapse = tokio::select! {
                () = shutdown.cancelled() => break,
                lapse = self.keep_alive(&lease) => lapse,
            };
            match lapse {
                Lapse::Lost => {
                    eprintln!(
                        "warning: the controller no longer has lease {}; registering again",
                        lease.id
                    );
                    let Some(renewed) = self.register_until_done(shutdown).await else {
                        eprintln!("stopped before the endpoint was registered again");
                        return Ok(());
                    };
                    lease = renewed;
                    self.announce(out, "registered", &lease);
                }
                Lapse::Broken(reason) => {
                    eprintln!(
                        "warning: cannot keep lease {} alive ({reason}); retrying in {}",
                        lease.id,
                        humantime::format_duration(self.retry)
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = sleep(self.retry) => {}
                    }
                }
            }
        }
        self.deregister(&lease).await?;
        self.announce(out, "deregistered", &lease);
        Ok(())
    }

    /// Prints one line about the registration. A stdout that cannot be written (a closed
    /// pipe) must not stop the registration from being kept alive and revoked, so that is
    /// only a warning.
    fn announce(&self, out: &mut impl Write, what: &str, lease: &Lease) {
        let written = writeln!(
            out,
            "{what} {} {} lease={} ttl={}s",
            self.endpoint.service,
            socket_string(&self.endpoint.address, self.endpoint.port),
            lease.id,
            lease.ttl.as_secs()
        )
        .and_then(|()| out.flush());
        if let Err(err) = written {
            eprintln!("warning: cannot write to stdout ({err})");
        }
    }

    async fn register(&mut self) -> anyhow::Result<Lease> {
        let request = RegisterRequest {
            endpoint: Some(self.endpoint.clone()),
            ttl_seconds: u32::try_from(self.ttl.as_secs()).unwrap_or(u32::MAX),
        };
        let granted = client::call(
            &self.addr,
            "Registry/Register",
            self.client.register(request),
        )
        .await?;
        Ok(Lease {
            id: granted.lease_id,
            // The controller clamps the TTL; a zero would make us renew in a busy loop.
            ttl: Duration::from_secs(granted.ttl_seconds.max(1).into()),
        })
    }

    /// Registers again, retrying until it works; `None` if shut down first.
    async fn register_until_done(&mut self, shutdown: &CancellationToken) -> Option<Lease> {
        loop {
            let attempt = tokio::select! {
                () = shutdown.cancelled() => return None,
                attempt = self.register() => attempt,
            };
            match attempt {
                Ok(lease) => return Some(lease),
                Err(err) => eprintln!(
                    "warning: {err:#}; retrying in {}",
                    humantime::format_duration(self.retry)
                ),
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = sleep(self.retry) => {}
            }
        }
    }

    /// Renews `lease` every third of its TTL over one KeepAlive stream, until the stream
    /// fails or the controller reports the lease gone. Each answer must arrive before the next
    /// renewal is due.
    async fn keep_alive(&mut self, lease: &Lease) -> Lapse {
        let period = lease.ttl / 3;
        let request = KeepAliveRequest { lease_id: lease.id };
        let (tx, rx) = mpsc::channel(1);
        // Queue the first renewal before opening the stream, so a controller that waits for
        // a first message before answering the call still answers.
        if tx.try_send(request).is_err() {
            return Lapse::Broken("keep-alive queue is full".to_string());
        }
        let call = self.client.keep_alive(ReceiverStream::new(rx));
        let mut answers = match timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return Lapse::Broken(describe(&status)),
            Err(_) => return Lapse::Broken("the controller did not open the stream".to_string()),
        };
        let mut ticks = interval(period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            match timeout(period, answers.message()).await {
                Ok(Ok(Some(answer))) if !answer.found => return Lapse::Lost,
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => {
                    return Lapse::Broken("the controller closed the stream".to_string());
                }
                Ok(Err(status)) => return Lapse::Broken(describe(&status)),
                Err(_) => {
                    return Lapse::Broken(format!(
                        "no answer within {}",
                        humantime::format_duration(period)
                    ));
                }
            }
            ticks.tick().await;
            if tx.send(request).await.is_err() {
                return Lapse::Broken("the stream to the controller closed".to_string());
            }
        }
    }

    /// Revokes the lease. A lease the controller no longer has counts as revoked.
    async fn deregister(&mut self, lease: &Lease) -> anyhow::Result<()> {
        let mut first_attempt = true;
        let outcome = loop {
            let call = self
                .client
                .deregister(DeregisterRequest { lease_id: lease.id });
            match timeout(CALL_TIMEOUT, call).await {
                Ok(Ok(_)) => break Ok(()),
                Ok(Err(status)) if status.code() == Code::NotFound => break Ok(()),
                // The connection broke under the call (a controller restarting, say); the
                // channel reconnects on the next call, so one more try is worth it.
                Ok(Err(status))
                    if first_attempt
                        && matches!(status.code(), Code::Unavailable | Code::Cancelled) =>
                {
                    first_attempt = false;
                }
                Ok(Err(status)) => {
                    break Err(client::explain_status(
                        &self.addr,
                        "Registry/Deregister",
                        &status,
                    ));
                }
                Err(_) => {
                    break Err(anyhow::anyhow!(
                        "the controller at {} did not answer Registry/Deregister within {}s",
                        self.addr,
                        CALL_TIMEOUT.as_secs()
                    ));
                }
            }
        };
        outcome.with_context(|| {
            format!(
                "lease {} was not revoked, so the endpoint stays registered for up to {}s",
                lease.id,
                lease.ttl.as_secs()
            )
        })
    }
}

fn describe(status: &Status) -> String {
    if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use clap::Parser;
    use ferrule_proto::v1::registry_server::{Registry, RegistryServer};
    use ferrule_proto::v1::{
        AnnounceProxyRequest, DeregisterResponse, KeepAliveResponse, RegisterResponse,
    };
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Streaming};

    use super::*;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: RegisterArgs,
    }

    fn args(argv: &[&str]) -> RegisterArgs {
        Cmd::try_parse_from(std::iter::once("register").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn builds_an_unmeshed_endpoint() {
        let a = args(&[
            "user-db",
            "[::1]:5432",
            "--label",
            "engine=postgres",
            "--label",
            "tier=data",
            "--port-name",
            "sql",
            "--zone",
            "z1",
            "--protocol",
            "opaque",
        ]);
        assert_eq!(a.ttl, Duration::from_secs(30));
        assert!(a.check().is_ok());
        let ep = a.endpoint();
        assert_eq!(
            (ep.service.as_str(), ep.address.as_str(), ep.port),
            ("user-db", "::1", 5432)
        );
        assert_eq!((ep.port_name.as_str(), ep.zone.as_str()), ("sql", "z1"));
        assert_eq!(ep.labels.len(), 2);
        assert_eq!(ep.labels["engine"], "postgres");
        assert_eq!(ep.protocol_hint, ProtocolHint::Opaque as i32);
        assert!(!ep.meshed);
    }

    #[test]
    fn refuses_a_label_given_twice() {
        let a = args(&["db", "127.0.0.1:1", "--label", "a=1", "--label", "a=2"]);
        assert_eq!(
            a.check().unwrap_err(),
            "label \"a\" is given twice (--label a=1 and --label a=2)"
        );
    }

    #[derive(Debug, PartialEq)]
    enum Event {
        Registered(i64),
        KeptAlive(i64),
        Deregistered(i64),
    }

    /// A Registry that misbehaves on purpose: its first KeepAlive stream closes after one
    /// answer, and lease 1 is reported gone on the second stream.
    struct FakeRegistry {
        events: mpsc::UnboundedSender<Event>,
        leases: Mutex<i64>,
        streams: Mutex<u32>,
    }

    #[tonic::async_trait]
    impl Registry for FakeRegistry {
        async fn register(
            &self,
            request: Request<RegisterRequest>,
        ) -> Result<Response<RegisterResponse>, Status> {
            let request = request.into_inner();
            assert_eq!(request.endpoint.unwrap().service, "user");
            let id = {
                let mut leases = self.leases.lock().unwrap();
                *leases += 1;
                *leases
            };
            self.events.send(Event::Registered(id)).unwrap();
            Ok(Response::new(RegisterResponse {
                lease_id: id,
                ttl_seconds: request.ttl_seconds,
                revision: id,
            }))
        }

        type KeepAliveStream = ReceiverStream<Result<KeepAliveResponse, Status>>;

        async fn keep_alive(
            &self,
            request: Request<Streaming<KeepAliveRequest>>,
        ) -> Result<Response<Self::KeepAliveStream>, Status> {
            let stream_no = {
                let mut streams = self.streams.lock().unwrap();
                *streams += 1;
                *streams
            };
            let mut requests = request.into_inner();
            let (tx, rx) = mpsc::channel(4);
            let events = self.events.clone();
            tokio::spawn(async move {
                while let Ok(Some(req)) = requests.message().await {
                    let found = !(stream_no == 2 && req.lease_id == 1);
                    if found {
                        events.send(Event::KeptAlive(req.lease_id)).unwrap();
                    }
                    let answer = KeepAliveResponse {
                        lease_id: req.lease_id,
                        found,
                        ttl_seconds: 1,
                    };
                    if tx.send(Ok(answer)).await.is_err() || stream_no == 1 {
                        break;
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        }

        async fn deregister(
            &self,
            request: Request<DeregisterRequest>,
        ) -> Result<Response<DeregisterResponse>, Status> {
            self.events
                .send(Event::Deregistered(request.into_inner().lease_id))
                .unwrap();
            Ok(Response::new(DeregisterResponse {}))
        }

        async fn announce_proxy(
            &self,
            _: Request<AnnounceProxyRequest>,
        ) -> Result<Response<RegisterResponse>, Status> {
            Err(Status::unimplemented("not used by the CLI"))
        }
    }

    async fn next(events: &mut mpsc::UnboundedReceiver<Event>) -> Event {
        timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("the registrar acts within 5s")
            .expect("the fake registry is running")
    }

    #[tokio::test]
    async fn survives_a_broken_stream_and_a_lost_lease_then_deregisters() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let fake = FakeRegistry {
            events: events_tx,
            leases: Mutex::new(0),
            streams: Mutex::new(0),
        };
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RegistryServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );

        let addr = ControllerAddr::parse(&format!("127.0.0.1:{port}")).unwrap();
        let channel = timeout(Duration::from_secs(5), client::connect(&addr))
            .await
            .unwrap()
            .unwrap();
        let registrar = Registrar {
            client: RegistryClient::new(channel),
            addr,
            endpoint: args(&["user", "127.0.0.1:9001"]).endpoint(),
            ttl: Duration::from_secs(1),
            retry: Duration::from_millis(20),
        };
        let shutdown = CancellationToken::new();
        let running = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                registrar.run(&shutdown, &mut out).await.map(|()| out)
            })
        };

        // Stream 1 answers once and closes; stream 2 reports lease 1 gone; lease 2 is renewed.
        assert_eq!(next(&mut events).await, Event::Registered(1));
        assert_eq!(next(&mut events).await, Event::KeptAlive(1));
        assert_eq!(next(&mut events).await, Event::Registered(2));
        assert_eq!(next(&mut events).await, Event::KeptAlive(2));
        assert_eq!(next(&mut events).await, Event::KeptAlive(2));
        shutdown.cancel();
        assert_eq!(next(&mut events).await, Event::Deregistered(2));

        let out = timeout(Duration::from_secs(5), running)
            .await
            .expect("the registrar stops within 5s of shutdown")
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "registered user 127.0.0.1:9001 lease=1 ttl=1s\n\
             registered user 127.0.0.1:9001 lease=2 ttl=1s\n\
             deregistered user 127.0.0.1:9001 lease=2 ttl=1s\n"
        );
        server.abort();
    }
}
