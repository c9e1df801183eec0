//! `config-bench`: how fast a config change reaches proxies (issue #5, item 5), for `make bench`.
//!
//! Two measurements, each against its own fresh `ferrule-controller --store memory`:
//!
//! * **Load test**: one process opens `--streams` `Config/Watch` streams (each its own proxy,
//!   announced with `Registry/AnnounceProxy` so the controller records its acks, each on its own
//!   connection like a real proxy), then applies a new `ServicePolicy` version `--rounds` times
//!   through `Admin/ApplyConfig`. For every stream and round it takes the time from the apply
//!   returning to the snapshot arriving on that stream (the stream acks it at once); per round,
//!   the time until every stream had it and until `Admin/ListProxies` showed every ack.
//! * **Real proxies**: `--proxies` `ferrule-proxy` sidecars (`--controller`, `--service`, a
//!   shared in-process app) and the same rounds, each applied with the real `ferrule apply -f`
//!   and timed from that command exiting, polling `Admin/ListProxies` until every proxy acked.
//!   A build whose proxies do not subscribe to config is reported as skipped.
//! * **Registered endpoints** (`--endpoints N`, 0 by default): before the load test's streams
//!   open, N endpoints are registered with `Registry/Register` (timed), and a `Discovery/Watch`
//!   on one of their services is opened; once the rounds are done, new endpoints of that
//!   service are registered one at a time and timed until the watcher's delta shows them.
//!
//! The controller's resident memory (`VmRSS`, peak `VmHWM` from `/proc/PID/status`) is sampled
//! around the load test. Results go to `--out` as markdown and to stdout. Every process started
//! here is owned by a harness guard and killed on exit; the whole run is bounded by `--deadline`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use ferrule_harness::backend::HttpBackend;
use ferrule_harness::{ANY_PORT, Process, Proxy, binary};
use ferrule_proto::v1::admin_client::AdminClient;
use ferrule_proto::v1::config_client::ConfigClient;
use ferrule_proto::v1::discovery_client::DiscoveryClient;
use ferrule_proto::v1::registry_client::RegistryClient;
use ferrule_proto::v1::{
    Ack, AnnounceProxyRequest, ApplyConfigRequest, ConfigRequest, DiscoveryUpdate, Endpoint,
    ListProxiesRequest, ProxyInfo, RegisterRequest, Resource, Subscribe, WatchRequest,
    config_request, discovery_update,
};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// How the bench runs; every default is here.
#[derive(Debug, Parser)]
#[command(about = "Config propagation benchmark: apply returning -> every proxy acked")]
struct Args {
    /// `Config/Watch` streams the load test opens from this process.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Real `ferrule-proxy` processes.
    #[arg(long, default_value_t = 10)]
    proxies: usize,
    /// Config versions applied in each part.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Bound on one round (apply to every ack), and on each setup step.
    #[arg(long, default_value = "15", value_parser = parse_secs)]
    round_timeout: Duration,
    /// Bound on the whole run.
    #[arg(long, default_value = "110", value_parser = parse_secs)]
    deadline: Duration,
    /// Endpoints registered (`Registry/Register`, spread over `--endpoint-services` services)
    /// before the streams open, and kept registered through the load test; with a discovery
    /// watcher on one of their services.
    #[arg(long, default_value_t = 0)]
    endpoints: usize,
    /// How many services the `--endpoints` are spread over.
    #[arg(long, default_value_t = 100)]
    endpoint_services: usize,
    /// Markdown results file.
    #[arg(long, default_value = "bench/results/config.md")]
    out: PathBuf,
}

fn parse_secs(s: &str) -> Result<Duration, std::num::ParseFloatError> {
    s.parse::<f64>().map(Duration::from_secs_f64)
}

/// How often `Admin/ListProxies` is polled while waiting for acks: it bounds the resolution of
/// the ack timings below.
const POLL: Duration = Duration::from_millis(5);
/// Announce TTL for the load test's proxies: longer than the run, so no keep-alive is needed.
const ANNOUNCE_TTL_SECONDS: u32 = 300;
/// Registration TTL of the `--endpoints`: longer than the run, so no keep-alive is needed.
const ENDPOINT_TTL_SECONDS: u32 = 900;
/// Registrations timed against the discovery watcher once everything is open.
const DISCOVERY_PROBES: usize = 20;
/// Load-test streams announced or connected at once.
const SETUP_CONCURRENCY: usize = 64;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = tokio::time::timeout(args.deadline, run(&args))
        .await
        .with_context(|| format!("the bench did not finish within {:?}", args.deadline))??;
    print!("{report}");
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(&args.out, &report).with_context(|| format!("write {}", args.out.display()))?;
    eprintln!("config-bench: results in {}", args.out.display());
    Ok(())
}

async fn run(args: &Args) -> anyhow::Result<String> {
    let load = load_test(args).await.context("load test")?;
    let proxies = real_proxies(args).await.context("real proxies")?;
    Ok(markdown(args, &load, &proxies)?)
}

/// A controller on a memory store with quiet logs (per-stream debug logging would be part of
/// what is measured otherwise).
struct BenchController {
    process: Process,
    grpc: SocketAddr,
    _dir: tempfile::TempDir,
}

impl BenchController {
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ferrule-config-bench-")
            .tempdir()?;
        let mut cmd = Command::new(binary("ferrule-controller")?);
        cmd.args(["--store", "memory"])
            .args(["--grpc-addr", ANY_PORT, "--admin-addr", ANY_PORT])
            .env("RUST_LOG", "warn");
        let mut process = Process::spawn(
            "ferrule-controller",
            cmd,
            &dir.path().join("controller.log"),
        )?;
        let listeners: serde_json::Value = process
            .ready("ferrule-controller", Duration::from_secs(20))
            .await?;
        let grpc = listeners["grpc"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .context("the controller's ready line has no gRPC address")?;
        Ok(Self {
            process,
            grpc,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        let url = self.url();
        tonic::transport::Endpoint::from_shared(url.clone())?
            .connect()
            .await
            .with_context(|| format!("connect to the controller at {url}"))
    }

    /// (VmRSS, VmHWM) in KiB.
    fn memory(&self) -> anyhow::Result<Memory> {
        let path = format!("/proc/{}/status", self.process.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no {name} in {path}"))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

/// Applies a `ServicePolicy` for `svc-0` whose request timeout names the round, so every round
/// is a real change; returns the new version and when the apply returned.
async fn apply_round(
    admin: &mut AdminClient<Channel>,
    round: usize,
) -> anyhow::Result<(i64, Instant)> {
    let spec = format!(
        r#"{{"service":"svc-0","timeouts":{{"request":"{}ms"}}}}"#,
        1000 + round
    );
    let response = admin
        .apply_config(ApplyConfigRequest {
            resources: vec![Resource {
                kind: "ServicePolicy".into(),
                namespace: "default".into(),
                name: "svc-0".into(),
                spec_json: spec,
                revision: 0,
            }],
            dry_run: false,
        })
        .await
        .with_context(|| format!("Admin/ApplyConfig, round {round}"))?
        .into_inner();
    Ok((response.version, Instant::now()))
}

/// The same change as [`apply_round`], made the way a user does: `ferrule apply -f FILE`.
/// Returns the version it printed and when the command exited.
async fn cli_apply(
    cli: &Path,
    controller: SocketAddr,
    dir: &Path,
    round: usize,
) -> anyhow::Result<(i64, Instant)> {
    let file = dir.join(format!("policy-{round}.yaml"));
    let yaml = format!(
        "apiVersion: ferrule.io/v1\nkind: ServicePolicy\nmetadata:\n  name: svc-0\nspec:\n  \
         service: svc-0\n  timeouts:\n    request: {}ms\n",
        1000 + round
    );
    std::fs::write(&file, yaml).with_context(|| format!("write {}", file.display()))?;
    let output = tokio::process::Command::new(cli)
        .arg("--controller")
        .arg(controller.to_string())
        .arg("apply")
        .arg("-f")
        .arg(&file)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("run {}", cli.display()))?;
    let returned = Instant::now();
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "ferrule apply, round {round}: {}: {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let version = stdout
        .lines()
        .find_map(|l| l.strip_prefix("config version "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no 'config version N' in ferrule apply's output: {stdout}"))?;
    Ok((version, returned))
}

/// Acked versions of the listed proxies, by proxy id.
async fn acked_versions(admin: &mut AdminClient<Channel>) -> anyhow::Result<HashMap<String, i64>> {
    let proxies = admin
        .list_proxies(ListProxiesRequest {})
        .await
        .context("Admin/ListProxies")?
        .into_inner()
        .proxies;
    Ok(proxies
        .into_iter()
        .filter_map(|p| Some((p.proxy?.proxy_id, p.acked_version)))
        .collect())
}

/// Polls `Admin/ListProxies` until every id in `ids` acked `version` or later; returns, per
/// proxy, the time from `since` to the poll that first showed its ack.
async fn wait_for_acks(
    admin: &mut AdminClient<Channel>,
    ids: &[String],
    version: i64,
    since: Instant,
    within: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let mut seen: HashMap<&str, Duration> = HashMap::new();
    let deadline = Instant::now() + within;
    loop {
        let acked = acked_versions(admin).await?;
        let now = since.elapsed();
        for id in ids {
            if acked.get(id).is_some_and(|v| *v >= version) {
                seen.entry(id.as_str()).or_insert(now);
            }
        }
        if seen.len() == ids.len() {
            return Ok(seen.into_values().collect());
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {} proxies acked version {version} within {within:?}",
                seen.len(),
                ids.len()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What one load-test stream reports.
enum StreamEvent {
    Received { version: i64, at: Instant },
    Failed { stream: usize, error: String },
}

fn proxy_info(id: &str, service: String) -> ProxyInfo {
    ProxyInfo {
        proxy_id: id.to_string(),
        service,
        namespace: "default".into(),
        address: "127.0.0.1".into(),
        mode: "sidecar".into(),
        version: "config-bench".into(),
        admin_address: String::new(),
        certificate: None,
    }
}

fn request(kind: config_request::Kind) -> ConfigRequest {
    ConfigRequest { kind: Some(kind) }
}

/// One simulated proxy: reports a failure to the collector instead of ending silently.
async fn watch_stream(
    stream: usize,
    channel: Channel,
    info: ProxyInfo,
    events: mpsc::UnboundedSender<StreamEvent>,
) {
    if let Err(e) = subscribe_and_ack(channel, info, &events).await {
        let _ = events.send(StreamEvent::Failed {
            stream,
            error: format!("{e:#}"),
        });
    }
}

/// Subscribes, then acks every snapshot as soon as it arrives and reports its arrival.
async fn subscribe_and_ack(
    channel: Channel,
    info: ProxyInfo,
    events: &mpsc::UnboundedSender<StreamEvent>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(request(config_request::Kind::Subscribe(Subscribe {
        proxy: Some(info),
        upstreams: Vec::new(),
        generation: 0,
    })))
    .await?;
    let mut snapshots = ConfigClient::new(channel)
        .watch(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(snapshot) = snapshots.message().await? {
        let at = Instant::now();
        let version = snapshot.version;
        tx.send(request(config_request::Kind::Ack(Ack { version })))
            .await?;
        if events.send(StreamEvent::Received { version, at }).is_err() {
            // The bench is over.
            return Ok(());
        }
    }
    bail!("the controller ended the stream")
}

/// Waits until `count` streams received `version` (or later); returns their arrival times.
async fn wait_for_snapshots(
    events: &mut mpsc::UnboundedReceiver<StreamEvent>,
    version: i64,
    count: usize,
    within: Duration,
) -> anyhow::Result<Vec<Instant>> {
    let mut arrivals = Vec::with_capacity(count);
    let deadline = tokio::time::Instant::now() + within;
    while arrivals.len() < count {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(StreamEvent::Received { version: v, at })) => {
                if v >= version {
                    arrivals.push(at);
                }
            }
            Ok(Some(StreamEvent::Failed { stream, error })) => {
                bail!("stream {stream} failed: {error}")
            }
            Ok(None) => bail!("every stream ended"),
            Err(_) => bail!(
                "{} of {count} streams received version {version} within {within:?}",
                arrivals.len()
            ),
        }
    }
    Ok(arrivals)
}

struct LoadResult {
    streams: usize,
    /// Apply returned -> snapshot on the stream, every stream x round (0 when the snapshot
    /// arrived before the apply's answer).
    per_stream: Vec<Duration>,
    /// Samples that arrived before the apply's answer did.
    early: usize,
    /// Per round: apply returned -> the last stream had the snapshot.
    all_received: Vec<Duration>,
    /// Per round: apply returned -> `ListProxies` showed every ack.
    all_acked: Vec<Duration>,
    /// Apply round trips.
    apply: Vec<Duration>,
    setup: Duration,
    /// With `--endpoints`: what registering them and watching them cost.
    endpoints: Option<EndpointsResult>,
    idle: Memory,
    connected: Memory,
    after: Memory,
}

struct EndpointsResult {
    count: usize,
    services: usize,
    /// `Registry/Register` round trips, one per endpoint.
    register: Vec<Duration>,
    /// All of them, `SETUP_CONCURRENCY` at a time.
    total: Duration,
    /// Every endpoint registered, no stream open yet.
    registered: Memory,
    /// `Discovery/Watch` on one service: call -> its first snapshot, and how many it held.
    first_snapshot: Duration,
    snapshot_size: usize,
    /// With everything open: a new endpoint's `Register` returned -> the watcher's delta.
    register_to_delta: Vec<Duration>,
}

/// An endpoint of the `--endpoints` load: service `svc-(i mod services)`, a distinct
/// address (never dialled: only the registry holds it).
fn bench_endpoint(i: usize, services: usize) -> Endpoint {
    Endpoint {
        service: format!("svc-{}", i % services),
        port_name: "http".into(),
        address: format!("127.{}.{}.{}", 1 + i / 62_500, (i / 250) % 250, 1 + i % 250),
        port: 8080,
        namespace: "default".into(),
        weight: 1,
        ..Default::default()
    }
}

/// Registers `args.endpoints` endpoints, then opens a discovery watch on `svc-0` and waits
/// for its first snapshot; returns the watch for [`probe_discovery`].
async fn register_endpoints(
    args: &Args,
    controller: &BenchController,
    control: &Channel,
) -> anyhow::Result<(EndpointsResult, tonic::Streaming<DiscoveryUpdate>)> {
    eprintln!(
        "config-bench: registering {} endpoints over {} services",
        args.endpoints, args.endpoint_services
    );
    let registry = RegistryClient::new(control.clone());
    let started = Instant::now();
    let register: Vec<Duration> = futures::stream::iter(0..args.endpoints)
        .map(|i| {
            let mut registry = registry.clone();
            let endpoint = bench_endpoint(i, args.endpoint_services);
            async move {
                let sent = Instant::now();
                registry
                    .register(RegisterRequest {
                        endpoint: Some(endpoint),
                        ttl_seconds: ENDPOINT_TTL_SECONDS,
                    })
                    .await
                    .with_context(|| format!("Registry/Register endpoint {i}"))?;
                anyhow::Ok(sent.elapsed())
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    let total = started.elapsed();
    let registered = controller.memory()?;
    let asked = Instant::now();
    let mut watch = DiscoveryClient::new(controller.channel().await?)
        .watch(WatchRequest {
            service: "svc-0".into(),
            proxy: None,
            namespace: "default".into(),
        })
        .await
        .context("Discovery/Watch svc-0")?
        .into_inner();
    let first = tokio::time::timeout(args.round_timeout, watch.message())
        .await
        .context("no discovery snapshot in time")??
        .context("the discovery stream ended")?;
    let first_snapshot = asked.elapsed();
    let Some(discovery_update::Kind::Snapshot(snapshot)) = first.kind else {
        bail!("the first discovery update was no snapshot: {first:?}");
    };
    Ok((
        EndpointsResult {
            count: args.endpoints,
            services: args.endpoint_services,
            register,
            total,
            registered,
            first_snapshot,
            snapshot_size: snapshot.endpoints.len(),
            register_to_delta: Vec::new(),
        },
        watch,
    ))
}

/// Registers `DISCOVERY_PROBES` new endpoints of `svc-0` one at a time and times each from
/// `Register` returning to the watcher's delta that adds it.
async fn probe_discovery(
    args: &Args,
    control: &Channel,
    watch: &mut tonic::Streaming<DiscoveryUpdate>,
    result: &mut EndpointsResult,
) -> anyhow::Result<()> {
    let mut registry = RegistryClient::new(control.clone());
    for probe in 0..DISCOVERY_PROBES {
        // Indices past the load's, in svc-0 (multiples of the service count).
        let endpoint = bench_endpoint(
            (args.endpoints + probe + 1) * args.endpoint_services,
            args.endpoint_services,
        );
        let address = endpoint.address.clone();
        registry
            .register(RegisterRequest {
                endpoint: Some(endpoint),
                ttl_seconds: ENDPOINT_TTL_SECONDS,
            })
            .await
            .with_context(|| format!("Registry/Register probe {probe}"))?;
        let returned = Instant::now();
        let deadline = tokio::time::Instant::now() + args.round_timeout;
        loop {
            let update = tokio::time::timeout_at(deadline, watch.message())
                .await
                .with_context(|| format!("probe {probe}: no delta for {address} in time"))??
                .context("the discovery stream ended")?;
            let added = match update.kind {
                Some(discovery_update::Kind::Delta(d)) => d.added,
                Some(discovery_update::Kind::Snapshot(s)) => s.endpoints,
                None => Vec::new(),
            };
            if added.iter().any(|e| e.address == address) {
                result.register_to_delta.push(returned.elapsed());
                break;
            }
        }
    }
    Ok(())
}

async fn load_test(args: &Args) -> anyhow::Result<LoadResult> {
    eprintln!("config-bench: load test, {} streams", args.streams);
    let controller = BenchController::start().await?;
    let idle = controller.memory()?;
    let control = controller.channel().await?;
    let mut admin = AdminClient::new(control.clone());
    let mut endpoints = if args.endpoints > 0 {
        Some(register_endpoints(args, &controller, &control).await?)
    } else {
        None
    };
    let ids: Vec<String> = (0..args.streams).map(|i| format!("load-{i}")).collect();
    let service = |i: usize| format!("svc-{}", i % 10);

    let started = Instant::now();
    let registry = RegistryClient::new(control.clone());
    futures::stream::iter(ids.iter().enumerate())
        .map(|(i, id)| {
            let mut registry = registry.clone();
            let info = proxy_info(id, service(i));
            async move {
                registry
                    .announce_proxy(AnnounceProxyRequest {
                        proxy: Some(info),
                        ttl_seconds: ANNOUNCE_TTL_SECONDS,
                        lease_id: 0,
                    })
                    .await
                    .with_context(|| format!("Registry/AnnounceProxy {id}"))
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    // One connection per stream, as each proxy has its own.
    let channels: Vec<Channel> = futures::stream::iter(0..args.streams)
        .map(|_| controller.channel())
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, channel) in channels.into_iter().enumerate() {
        let info = proxy_info(&ids[i], service(i));
        tasks.spawn(watch_stream(i, channel, info, events_tx.clone()));
    }
    drop(events_tx);
    // Every stream starts with the current (empty) config, version 0.
    wait_for_snapshots(&mut events, 0, args.streams, args.round_timeout)
        .await
        .context("initial snapshots")?;
    let setup = started.elapsed();
    let connected = controller.memory()?;

    let mut result = LoadResult {
        streams: args.streams,
        per_stream: Vec::with_capacity(args.streams * args.rounds),
        early: 0,
        all_received: Vec::new(),
        all_acked: Vec::new(),
        apply: Vec::new(),
        setup,
        endpoints: None,
        idle,
        connected,
        after: connected,
    };
    for round in 1..=args.rounds {
        let sent = Instant::now();
        let (version, returned) = apply_round(&mut admin, round).await?;
        result.apply.push(returned - sent);
        let arrivals = wait_for_snapshots(&mut events, version, args.streams, args.round_timeout)
            .await
            .with_context(|| format!("round {round} (version {version})"))?;
        for at in &arrivals {
            if *at < returned {
                result.early += 1;
            }
            result
                .per_stream
                .push(at.saturating_duration_since(returned));
        }
        let last = arrivals.iter().max().copied().unwrap_or(returned);
        result
            .all_received
            .push(last.saturating_duration_since(returned));
        let acks = wait_for_acks(&mut admin, &ids, version, returned, args.round_timeout)
            .await
            .with_context(|| format!("round {round} acks"))?;
        result
            .all_acked
            .push(acks.into_iter().max().unwrap_or_default());
    }
    if let Some((mut registered, mut watch)) = endpoints.take() {
        probe_discovery(args, &control, &mut watch, &mut registered)
            .await
            .context("discovery probes")?;
        result.endpoints = Some(registered);
    }
    result.after = controller.memory()?;
    tasks.abort_all();
    Ok(result)
}

enum ProxiesResult {
    /// The proxies announced themselves but none acked a config version.
    Skipped { waited: Duration },
    Measured {
        proxies: usize,
        /// Apply returned -> `ListProxies` first showed the proxy's ack, every proxy x round.
        per_proxy: Vec<Duration>,
        /// Per round: apply returned -> every proxy acked.
        all_acked: Vec<Duration>,
    },
}

async fn real_proxies(args: &Args) -> anyhow::Result<ProxiesResult> {
    eprintln!("config-bench: {} real proxies", args.proxies);
    let controller = BenchController::start().await?;
    let cli = binary("ferrule")?;
    let files = tempfile::Builder::new()
        .prefix("ferrule-config-bench-")
        .tempdir()?;
    let app = HttpBackend::start("config-bench-app").await?;
    let mut proxies = Vec::with_capacity(args.proxies);
    let ids: Vec<String> = (0..args.proxies)
        .map(|i| format!("bench-proxy-{i}"))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let proxy = Proxy::builder(id)
            .arg(format!("--controller={}", controller.grpc))
            .arg(format!("--service=svc-{i}"))
            .arg(format!("--app-addr={}", app.addr))
            .arg(format!("--proxy-id={id}"))
            .start()
            .await?;
        proxies.push(proxy);
    }
    for proxy in &proxies {
        proxy.wait_ready(args.round_timeout).await?;
    }
    let mut admin = AdminClient::new(controller.channel().await?);
    // Announced: each proxy is listed (with acked version 0 until it acks).
    let deadline = Instant::now() + args.round_timeout;
    loop {
        let listed = acked_versions(&mut admin).await?;
        if ids.iter().all(|id| listed.contains_key(id)) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the proxies did not announce themselves within {:?}",
            args.round_timeout
        );
        tokio::time::sleep(POLL).await;
    }

    // Does this build's proxy subscribe to config at all? One probe version, waited for a while.
    let probe_wait = Duration::from_secs(5);
    let (version, returned) = cli_apply(&cli, controller.grpc, files.path(), 0).await?;
    let probe = wait_for_acks(&mut admin, &ids, version, returned, probe_wait).await;
    if probe.is_err() {
        let acked = acked_versions(&mut admin).await?;
        if ids.iter().all(|id| acked.get(id).is_none_or(|v| *v == 0)) {
            return Ok(ProxiesResult::Skipped { waited: probe_wait });
        }
        probe.context("probe version")?;
    }

    let mut per_proxy = Vec::with_capacity(args.proxies * args.rounds);
    let mut all_acked = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds {
        let (version, returned) = cli_apply(&cli, controller.grpc, files.path(), round).await?;
        let acks = wait_for_acks(&mut admin, &ids, version, returned, args.round_timeout)
            .await
            .with_context(|| format!("round {round} (version {version})"))?;
        all_acked.push(acks.iter().max().copied().unwrap_or_default());
        per_proxy.extend(acks);
    }
    Ok(ProxiesResult::Measured {
        proxies: args.proxies,
        per_proxy,
        all_acked,
    })
}

/// Nearest-rank percentile of `samples` (which it sorts).
fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// "p50 / p99 / max" of `samples`.
fn spread(samples: &[Duration]) -> String {
    let mut s = samples.to_vec();
    let (p50, p99, max) = (
        percentile(&mut s, 50.0),
        percentile(&mut s, 99.0),
        percentile(&mut s, 100.0),
    );
    format!("{} / {} / {}", ms(p50), ms(p99), ms(max))
}

fn markdown(
    args: &Args,
    load: &LoadResult,
    proxies: &ProxiesResult,
) -> Result<String, std::fmt::Error> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::new();
    let w = &mut md;
    writeln!(w, "# Config propagation benchmark\n")?;
    writeln!(
        w,
        "`config-bench --streams {} --proxies {} --rounds {} --endpoints {}`, {} CPUs, \
         loopback only: the controller (release build, `--store memory`, `RUST_LOG=warn`), the \
         proxies and the load generator share the same machine and CPUs.\n",
        args.streams, args.proxies, args.rounds, args.endpoints, cpus
    )?;
    writeln!(
        w,
        "Each round applies a changed `ServicePolicy` and measures from the moment the apply \
         returned: for the load test, the `Admin/ApplyConfig` call (the RPC `ferrule apply` \
         makes); for the real proxies, the `ferrule apply -f` command exiting. Times are p50 / \
         p99 / max.\n"
    )?;
    writeln!(
        w,
        "## {} `Config/Watch` streams from one process\n",
        load.streams
    )?;
    writeln!(
        w,
        "Each stream is one simulated proxy on its own connection, announced with \
         `Registry/AnnounceProxy`; it acks each snapshot as it arrives. Setup (announce, connect, \
         first snapshot on every stream): {}.\n",
        ms(load.setup)
    )?;
    writeln!(w, "| measure | p50 / p99 / max |")?;
    writeln!(w, "| --- | --- |")?;
    writeln!(
        w,
        "| apply returned -> snapshot on a stream ({} stream x round samples) | {} |",
        load.per_stream.len(),
        spread(&load.per_stream)
    )?;
    writeln!(
        w,
        "| apply returned -> every stream had it ({} rounds) | {} |",
        load.all_received.len(),
        spread(&load.all_received)
    )?;
    writeln!(
        w,
        "| apply returned -> `ListProxies` showed every ack (polled every {} ms) | {} |",
        POLL.as_millis(),
        spread(&load.all_acked)
    )?;
    writeln!(
        w,
        "| `Admin/ApplyConfig` round trip | {} |\n",
        spread(&load.apply)
    )?;
    writeln!(
        w,
        "{} of {} snapshots arrived before the apply's answer did (counted as 0 ms).\n",
        load.early,
        load.per_stream.len()
    )?;
    if let Some(e) = &load.endpoints {
        writeln!(
            w,
            "### {} registered endpoints\n\nRegistered before the streams opened ({} services, \
             {} at a time) and kept through the run: {} in all ({:.0} registrations/s). A \
             `Discovery/Watch` on one service got its first snapshot ({} endpoints) {} after \
             the call. With every stream open, {} further endpoints of that service were \
             registered one at a time.\n",
            e.count,
            e.services,
            SETUP_CONCURRENCY,
            ms(e.total),
            e.count as f64 / e.total.as_secs_f64().max(1e-9),
            e.snapshot_size,
            ms(e.first_snapshot),
            e.register_to_delta.len(),
        )?;
        writeln!(w, "| measure | p50 / p99 / max |")?;
        writeln!(w, "| --- | --- |")?;
        writeln!(
            w,
            "| `Registry/Register` round trip ({} samples) | {} |",
            e.register.len(),
            spread(&e.register)
        )?;
        writeln!(
            w,
            "| `Register` returned -> the watcher's delta ({} samples) | {} |\n",
            e.register_to_delta.len(),
            spread(&e.register_to_delta)
        )?;
    }
    writeln!(w, "Controller memory (`/proc/PID/status`):\n")?;
    writeln!(w, "| when | VmRSS | VmHWM (peak) |")?;
    writeln!(w, "| --- | --- | --- |")?;
    for (when, m) in [("started, no streams".to_string(), load.idle)]
        .into_iter()
        .chain(load.endpoints.as_ref().map(|e| {
            (
                format!("{} endpoints registered, no streams", e.count),
                e.registered,
            )
        }))
        .chain([
            (
                format!("{} streams open, initial snapshot sent", load.streams),
                load.connected,
            ),
            (format!("after {} rounds", args.rounds), load.after),
        ])
    {
        writeln!(w, "| {when} | {} | {} |", mib(m.rss_kib), mib(m.hwm_kib))?;
    }
    writeln!(w)?;
    writeln!(w, "## Real proxies\n")?;
    match proxies {
        ProxiesResult::Skipped { waited } => {
            writeln!(
                w,
                "skipped: proxies do not subscribe to config in this build ({} `ferrule-proxy` \
                 sidecars announced themselves, but none acked a new version within {:?}).",
                args.proxies, waited
            )?;
        }
        ProxiesResult::Measured {
            proxies,
            per_proxy,
            all_acked,
        } => {
            writeln!(
                w,
                "{proxies} `ferrule-proxy` sidecars (`--controller`, `--service svc-i`, one \
                 shared in-process app); acks seen by polling `Admin/ListProxies` every {} ms, \
                 which bounds the resolution.\n",
                POLL.as_millis()
            )?;
            writeln!(w, "| measure | p50 / p99 / max |")?;
            writeln!(w, "| --- | --- |")?;
            writeln!(
                w,
                "| apply returned -> a proxy's ack ({} proxy x round samples) | {} |",
                per_proxy.len(),
                spread(per_proxy)
            )?;
            writeln!(
                w,
                "| apply returned -> every proxy acked ({} rounds) | {} |",
                all_acked.len(),
                spread(all_acked)
            )?;
        }
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&mut s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&mut s, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&mut s, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&mut [], 50.0), Duration::ZERO);
    }
}
