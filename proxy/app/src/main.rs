//! `ferrule-proxy`: parses the configuration, sets up logging, starts the proxy and shuts it
//! down gracefully on SIGTERM, SIGINT or the admin `/shutdown` endpoint.

use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches};
use ferrule_proxy::config::{Config, Mode};
use ferrule_proxy::discovery::Discovery;
use ferrule_proxy::sidecar::Proxy;

/// mimalloc instead of the system allocator (the default feature `mimalloc`): far fewer
/// instructions per allocation, and a request makes about 30 (bench/results/session7.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc.h (the same value in mimalloc 2 and 3; the
/// Rust bindings have no constant for it).
#[cfg(feature = "mimalloc")]
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Commits mimalloc's arenas as they are used instead of all at once: by default it commits
/// a whole arena on Linux, which cost a sidecar about 6 MiB of idle RSS. The environment
/// (`MIMALLOC_ARENA_EAGER_COMMIT`) still wins when set. It must run before the first Rust
/// allocation creates the first arena, so it runs as an ELF constructor, before `main`.
#[cfg(feature = "mimalloc")]
extern "C" fn tune_allocator() {
    // SAFETY: sets the default of a plain integer option (the environment's value, when
    // given, still wins), before any thread or allocation of ours.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

#[cfg(all(feature = "mimalloc", target_os = "linux"))]
#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

fn main() -> anyhow::Result<()> {
    let mut config = parse_config();
    match config.mode.take() {
        Some(Mode::Gateway(args)) => runtime(args.common.threads)?
            .block_on(ferrule_proxy::gateway::run(*args))
            .context("gateway"),
        Some(Mode::Init(args)) => ferrule_proxy::init::run_init(&args),
        None => runtime(config.common.threads)?.block_on(sidecar(config)),
    }
}

/// The tokio runtime: on the current thread for `threads == 1`, else a pool of `threads`
/// workers (0: one per CPU).
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            builder.worker_threads(threads);
        }
        builder
    };
    builder.enable_all().build().context("starting the runtime")
}

async fn sidecar(mut config: Config) -> anyhow::Result<()> {
    let proxy_id = config.proxy_id();
    ferrule_proxy::logging::init(config.common.log_format)
        .map_err(|e| anyhow::anyhow!("setting up logging: {e}"))?;
    if !config.common.controllers.is_empty() {
        config.common.parse_controllers()?;
    }
    let discovery = if config.static_endpoints.is_empty() {
        Discovery::with_controllers(
            config.common.controllers("discovery"),
            config.proxy_info(&proxy_id),
        )
    } else {
        Discovery::fixed(config.static_discovery())
    };
    let proxy = Proxy::start(config, discovery)
        .await
        .context("starting the proxy")?;
    ferrule_proxy::announce_ready(&proxy.addrs);
    ferrule_proxy::shutdown_on_signals(proxy.shutdown_token())
        .context("installing the SIGTERM handler")?;
    proxy.wait().await;
    Ok(())
}

const READY_HELP: &str = "Once every listener is bound the sidecar prints one line to stdout, \
`ferrule-proxy ready: {JSON}`, with the addresses actually bound (as /config shows them under \
`listeners`): start it with port 0 and read them from that line (docs/proxy.md).";

/// [`Config`] from the command line, with the ready line in `--help`.
fn parse_config() -> Config {
    let matches = Config::command().after_help(READY_HELP).get_matches();
    Config::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}
