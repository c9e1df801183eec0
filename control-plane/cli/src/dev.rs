//! `ferrule dev up` and `ferrule dev down`: the whole sample shop as a local mesh, with one
//! command and no setup.
//!
//! `dev up` starts the binaries that sit next to `ferrule` (it builds nothing; `make demo`
//! does): [`plan`] says what each process is started with, [`supervisor`] runs them, reads
//! the ports they bound from their ready lines and streams their logs, [`state`] records them
//! in `<state dir>/dev.json`, and [`walkthrough`] is what it prints once everything is ready. It
//! runs until Ctrl-C or SIGTERM.
//!
//! Start-up order follows who needs whose address: the controller; with `--postgres`, the
//! PostgreSQL server ([`postgres`]), its databases and its sidecar; the apps; each app's
//! sidecar (pointed at the ports its app reported); the gateway; then `dev up` waits until
//! every sidecar and the gateway answer `/ready`.
//! `dev down` stops a mesh that is still running from a state dir, through `dev.json`.

mod plan;
mod postgres;
pub mod state;
mod supervisor;
mod walkthrough;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use rustix::process::Signal;
use tokio::signal::unix::{SignalKind, signal};

use self::plan::{App, AppAddrs, BINARIES, ControllerAddrs, Options, POSTGRES_SERVICE, ProxyAddrs};
use self::postgres::Cluster;
use self::state::{DevState, ProcessRecord};
use self::supervisor::{StartupError, Supervisor};

/// How long each process gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of a failed process's log shown when start-up fails.
const LOG_TAIL: usize = 25;
/// Starts of a process whose ports had to be chosen before it started, when they were taken.
const PORT_ATTEMPTS: usize = 3;

#[derive(Debug, Args)]
pub struct DevArgs {
    #[command(subcommand)]
    command: DevCommand,
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Start a local mesh: a controller, the sample shop (two user replicas, order, payment)
    /// with a sidecar proxy each, and the gateway, all on loopback. Runs until Ctrl-C.
    Up(UpArgs),
    /// Stop a mesh `ferrule dev up` left running.
    Down(DownArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "The binaries are taken from the folder `ferrule` is in: build them \
                        first (`make demo` builds and runs this)."
)]
struct UpArgs {
    /// Where the gateway listens for clients.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    gateway_addr: SocketAddr,

    /// Keep the controller's state in this etcd (e.g. http://127.0.0.1:2379) instead of the
    /// embedded in-memory store.
    #[arg(long, value_name = "URL")]
    etcd: Option<String>,

    /// Folder for the databases, logs/, gateway.yaml and dev.json.
    #[arg(long, value_name = "DIR", default_value = ".ferrule/dev")]
    state_dir: PathBuf,

    /// Write the processes' output only to their log files, not also to this terminal.
    #[arg(long, short)]
    quiet: bool,

    /// How long every process gets to become ready.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,

    /// Export every proxy's trace spans to this OTLP/gRPC collector (e.g. Jaeger's
    /// http://127.0.0.1:4317) instead of `dev up`'s own receiver, which keeps the last
    /// traces for `ferrule traces` and `ferrule trace ID`.
    #[arg(long, value_name = "URL", value_parser = parse_otlp_url)]
    otlp: Option<String>,

    /// Keep the shop's data in one PostgreSQL server (one database per service, in the state
    /// dir) instead of SQLite files; the apps reach it through their sidecars as the mesh
    /// service `postgres`. Needs Debian's `postgresql` package (`make deps`).
    #[arg(long)]
    postgres: bool,

    /// Run without identity: no mesh CA, plaintext between the proxies. By default `dev up`
    /// makes a mesh CA in `<state dir>/identity` and every proxy-to-proxy hop is mutual TLS.
    #[arg(long)]
    no_identity: bool,
}

#[derive(Debug, Args)]
struct DownArgs {
    /// The state dir `ferrule dev up` ran with.
    #[arg(long, value_name = "DIR", default_value = ".ferrule/dev")]
    state_dir: PathBuf,
}

/// How many traces `dev up`'s own receiver keeps (the oldest is forgotten first).
const KEPT_TRACES: usize = 500;

/// An OTLP endpoint: `http://host:port`.
fn parse_otlp_url(s: &str) -> Result<String, String> {
    let uri: hyper::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() || uri.port().is_none() {
        return Err(format!(
            "{s:?}: expected http://HOST:PORT of an OTLP/gRPC collector (e.g. http://127.0.0.1:4317)"
        ));
    }
    Ok(s.to_string())
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    match args.command {
        DevCommand::Up(args) => up(args).await,
        DevCommand::Down(args) => down(&args.state_dir).await,
    }
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("finding the ferrule executable")?;
    let bin_dir = me
        .parent()
        .context("the ferrule executable has no folder")?
        .to_path_buf();
    for name in BINARIES {
        if !bin_dir.join(name).is_file() {
            bail!(
                "{name} is not in {} next to ferrule: build the workspace binaries first \
                 (`cargo build --workspace --bins`, or `make demo` which builds and runs this)",
                bin_dir.display()
            );
        }
    }
    let state_dir = std::path::absolute(&args.state_dir)
        .with_context(|| format!("--state-dir {}", args.state_dir.display()))?;
    std::fs::create_dir_all(state_dir.join("logs"))
        .with_context(|| format!("creating {}", state_dir.join("logs").display()))?;
    refuse_running_mesh(&state_dir)?;
    supervisor::check_free(args.gateway_addr).with_context(|| {
        format!(
            "the gateway cannot listen on {}: pass another --gateway-addr",
            args.gateway_addr
        )
    })?;

    let postgres = if args.postgres {
        Some(Cluster::prepare(&state_dir).context("--postgres")?)
    } else {
        None
    };
    // Without --otlp, the mesh's own receiver; it lives as long as `dev up`.
    let receiver = match &args.otlp {
        Some(_) => None,
        None => Some(
            ferrule_trace::receiver::Receiver::start(plan::ANY_PORT, plan::ANY_PORT, KEPT_TRACES)
                .await
                .context("starting the trace receiver")?,
        ),
    };
    let otlp = args
        .otlp
        .clone()
        .or_else(|| receiver.as_ref().map(|r| format!("http://{}", r.otlp)));
    // A fresh mesh CA per run: the state dir is dev up's own, nothing else trusts it.
    let identity = match args.no_identity {
        true => None,
        false => {
            let dir = state_dir.join("identity");
            crate::identity::create_ca(
                &dir,
                ferrule_proto::identity::DEFAULT_TRUST_DOMAIN,
                Duration::from_secs(365 * 24 * 3600),
                Duration::from_secs(30 * 24 * 3600),
                true,
            )
            .context("making the dev mesh's CA")?;
            Some(dir)
        }
    };
    let opts = Options {
        identity,
        tokens: Default::default(),
        otlp: otlp.clone(),
        traces_api: receiver.as_ref().map(|r| r.api),
        bin_dir,
        state_dir: state_dir.clone(),
        gateway: args.gateway_addr,
        etcd: args.etcd,
        jwt_secret: random_secret(),
        postgres,
    };
    let gateway_config = plan::gateway_config(&opts);
    std::fs::write(&gateway_config, plan::gateway_yaml(opts.gateway))
        .with_context(|| format!("writing {}", gateway_config.display()))?;

    // Installed before anything starts, so a Ctrl-C during start-up still stops cleanly.
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut stop_signal = async move || {
        tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        }
    };

    let state = DevState {
        supervisor: ProcessRecord {
            name: "ferrule dev up".into(),
            pid: std::process::id(),
            program: me,
            log: None,
            admin: None,
            database: None,
        },
        // Both known once they have started.
        controller: plan::ANY_PORT,
        gateway: opts.gateway,
        postgres: None,
        processes: Vec::new(),
        traces: receiver.as_ref().map(|r| r.api),
        otlp,
    };
    let apps = plan::apps(&opts, supervisor::chosen_addrs()?);
    let mut names = vec!["controller".to_string(), "gateway".to_string()];
    if opts.postgres.is_some() {
        names.extend([
            POSTGRES_SERVICE.to_string(),
            format!("{POSTGRES_SERVICE}-proxy"),
        ]);
    }
    names.extend(
        apps.iter()
            .flat_map(|a| [a.instance.clone(), a.sidecar_name()]),
    );
    let mut sup = Supervisor::new(
        state,
        &state_dir,
        args.quiet,
        names.iter().map(String::as_str),
    );
    println!(
        "starting {} processes; logs in {}",
        names.len(),
        state_dir.join("logs").display()
    );

    let started = tokio::select! {
        started = start(&mut sup, &opts, apps, args.ready_timeout) => started,
        signal = stop_signal() => {
            println!("{signal} received during start-up: stopping");
            sup.stop(STOP_GRACE).await;
            return Ok(());
        }
    };
    if let Err(err) = started {
        sup.stop(STOP_GRACE).await;
        if let Some(err) = err.downcast_ref::<StartupError>() {
            for name in err.names() {
                eprintln!(
                    "--- last lines of {name}'s log ---\n{}",
                    sup.log_tail(&name, LOG_TAIL)
                );
            }
        }
        return Err(err.context(format!(
            "the mesh did not start; every log is in {}",
            state_dir.join("logs").display()
        )));
    }

    print!("{}", walkthrough::render(sup.state(), &state_dir));
    sup.watch(async {
        let signal = stop_signal().await;
        println!("{signal} received: stopping the mesh");
    })
    .await;
    sup.stop(STOP_GRACE).await;
    crate::client::forget_dev_mesh(&sup.state().controller.to_string(), &state_dir);
    println!("stopped");
    Ok(())
}

/// Starts the mesh in the order the module documentation gives, and waits until it is ready.
async fn start(
    sup: &mut Supervisor,
    opts: &Options,
    apps: Vec<App>,
    within: Duration,
) -> anyhow::Result<()> {
    sup.spawn(&plan::controller(opts))?;
    let addrs = sup
        .ready_line::<ControllerAddrs>("controller", within)
        .await?;
    let controller = addrs.grpc;
    sup.set_admin("controller", addrs.admin)?;
    sup.set_addresses(controller, opts.gateway)?;
    // Each proxy's bootstrap credential; it only has to last until the first certificate.
    let opts = &match &opts.identity {
        Some(dir) => {
            // `ferrule --controller ADDR ...` finds the admin credentials from this note.
            crate::client::note_dev_mesh(&controller.to_string(), &opts.state_dir)?;
            let addr = crate::client::ControllerAddr::parse(&controller.to_string())
                .map_err(anyhow::Error::msg)?
                .with_identity_dir(dir)?;
            let tokens =
                crate::identity::join_tokens(&addr, &plan::IDENTITIES, Duration::from_secs(3600))
                    .await
                    .context("making the proxies' join tokens")?;
            Options {
                tokens,
                ..opts.clone()
            }
        }
        None => opts.clone(),
    };
    if let Some(cluster) = &opts.postgres {
        start_postgres(sup, opts, cluster, controller, within).await?;
    }
    for app in &apps {
        sup.spawn(&app.spec(opts))?;
    }
    for app in &apps {
        let bound = sup.ready_line(&app.instance, within).await?;
        sup.spawn(&app.sidecar(opts, controller, bound))?;
    }
    for app in &apps {
        let mut app = app.clone();
        let mut attempt = 1;
        // Only `order`'s sidecar binds ports chosen before it started; if one was taken
        // meanwhile, `order` and its sidecar start again on new ones.
        loop {
            match sup
                .ready_line::<ProxyAddrs>(&app.sidecar_name(), within)
                .await
            {
                Ok(proxy) => {
                    sup.set_admin(&app.sidecar_name(), proxy.admin)?;
                    break;
                }
                Err(StartupError::Exited { .. })
                    if app.has_chosen_ports()
                        && attempt < PORT_ATTEMPTS
                        && sup.lost_a_port(&app.sidecar_name()) =>
                {
                    println!(
                        "{}: a chosen port was taken; starting it again",
                        app.instance
                    );
                    attempt += 1;
                    sup.discard(&app.sidecar_name()).await;
                    sup.discard(&app.instance).await;
                    app = plan::apps(opts, supervisor::chosen_addrs()?)
                        .into_iter()
                        .find(|a| a.instance == app.instance)
                        .context("the app is still in the plan")?;
                    sup.spawn(&app.spec(opts))?;
                    let bound: AppAddrs = sup.ready_line(&app.instance, within).await?;
                    sup.spawn(&app.sidecar(opts, controller, bound))?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let gateway = start_gateway(sup, opts, controller, within).await?;
    sup.set_addresses(controller, gateway)?;
    sup.wait_ready(within).await?;
    Ok(())
}

/// Starts the PostgreSQL server (on a port chosen up front, again if it was taken), creates
/// the services' databases, and starts the sidecar that registers it as `postgres`.
async fn start_postgres(
    sup: &mut Supervisor,
    opts: &Options,
    cluster: &Cluster,
    controller: SocketAddr,
    within: Duration,
) -> anyhow::Result<()> {
    let mut attempt = 1;
    let addr = loop {
        let [addr] = supervisor::chosen_addrs()?;
        sup.spawn(&plan::postgres(cluster, addr))?;
        match sup
            .log_line(POSTGRES_SERVICE, postgres::READY_LINE, within)
            .await
        {
            Ok(()) => break addr,
            Err(StartupError::Exited { .. })
                if attempt < PORT_ATTEMPTS && sup.lost_a_port(POSTGRES_SERVICE) =>
            {
                println!("postgres: its port was taken; starting it again");
                attempt += 1;
                sup.discard(POSTGRES_SERVICE).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    for database in ["user", "order", "payment"] {
        cluster.create_database(addr.port(), database).await?;
    }
    sup.set_postgres(addr)?;
    let sidecar = format!("{POSTGRES_SERVICE}-proxy");
    sup.spawn(&plan::postgres_sidecar(opts, controller, addr))?;
    let proxy = sup.ready_line::<ProxyAddrs>(&sidecar, within).await?;
    sup.set_admin(&sidecar, proxy.admin)?;
    Ok(())
}

/// Starts the gateway and returns the address it listens on. It prints no ready line, so its
/// admin port is chosen up front (and chosen again if it was taken).
async fn start_gateway(
    sup: &mut Supervisor,
    opts: &Options,
    controller: SocketAddr,
    within: Duration,
) -> anyhow::Result<SocketAddr> {
    let mut attempt = 1;
    loop {
        let [admin] = supervisor::chosen_addrs()?;
        sup.spawn(&plan::gateway(opts, controller, admin))?;
        match gateway_listening(sup, opts, admin, within).await {
            Ok(listen) => {
                sup.set_admin("gateway", admin)?;
                return Ok(listen);
            }
            Err(StartupError::Exited { .. })
                if attempt < PORT_ATTEMPTS && sup.lost_a_port("gateway") =>
            {
                println!("gateway: its admin port was taken; starting it again");
                attempt += 1;
                sup.discard("gateway").await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until the gateway's `/config` on `admin` shows that this admin port is really its own
/// (and not another process's that took the port first), and returns where its client
/// listener is bound.
async fn gateway_listening(
    sup: &mut Supervisor,
    opts: &Options,
    admin: SocketAddr,
    within: Duration,
) -> Result<SocketAddr, StartupError> {
    let config_file = plan::gateway_config(opts);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(config) = sup.get_json(admin, "/config").await
            && plan::is_our_gateway(&config, &config_file, admin)
            && let Some(listen) = config["listeners"]["listen"]
                .as_str()
                .and_then(|a| a.parse().ok())
        {
            return Ok(listen);
        }
        if let Some(status) = sup.exit_status("gateway") {
            return Err(StartupError::Exited {
                name: "gateway".into(),
                status,
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StartupError::NotReady {
                names: vec!["gateway".into()],
                within,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A state dir serves one mesh at a time.
fn refuse_running_mesh(state_dir: &Path) -> anyhow::Result<()> {
    let Some(old) = DevState::load(state_dir)? else {
        return Ok(());
    };
    let running: Vec<&ProcessRecord> = std::iter::once(&old.supervisor)
        .chain(&old.processes)
        .filter(|p| p.is_running())
        .collect();
    if !running.is_empty() {
        bail!(
            "a mesh from {} is still running ({} processes, `ferrule dev up` pid {}): stop it \
             with `ferrule dev down --state-dir {}`, or use another --state-dir",
            state_dir.display(),
            running.len(),
            old.supervisor.pid,
            state_dir.display()
        );
    }
    DevState::remove(state_dir)?;
    Ok(())
}

/// 32 random bytes, hex: the demo's JWT signing key, new on every start.
fn random_secret() -> String {
    rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `ferrule dev down`: asks `ferrule dev up` to stop its mesh; if it is gone (killed), stops
/// whatever it left.
async fn down(state_dir: &Path) -> anyhow::Result<()> {
    let state_dir = std::path::absolute(state_dir)
        .with_context(|| format!("--state-dir {}", state_dir.display()))?;
    let Some(state) = DevState::load(&state_dir)? else {
        println!("no mesh is running from {}", state_dir.display());
        return Ok(());
    };
    let supervisor = &state.supervisor;
    if supervisor.signal(Signal::TERM) {
        println!(
            "stopping the mesh of `ferrule dev up` (pid {})",
            supervisor.pid
        );
        // dev up stops its children one grace period apart: clients, then the controller.
        if !supervisor
            .wait_gone(STOP_GRACE * 2 + Duration::from_secs(5))
            .await
        {
            supervisor.signal(Signal::KILL);
        }
    }
    let left: Vec<&ProcessRecord> = state
        .processes
        .iter()
        .filter(|p| p.signal(Signal::TERM))
        .collect();
    for process in &left {
        if !process.wait_gone(STOP_GRACE).await {
            eprintln!("{} ignored SIGTERM; killing it", process.name);
            process.signal(Signal::KILL);
        }
    }
    let stopped = left.len();
    if stopped > 0 {
        println!("stopped {stopped} processes `ferrule dev up` left behind");
    }
    crate::client::forget_dev_mesh(&state.controller.to_string(), &state_dir);
    DevState::remove(&state_dir)?;
    println!("the mesh from {} is stopped", state_dir.display());
    Ok(())
}
