//! `ferrule`: the command-line tool of the Ferrule service mesh.
//!
//! It talks to `ferrule-controller` only through the `ferrule.v1` gRPC API, never to the store.
//! This file holds the top-level flags and dispatch; each verb group has its own module
//! ([`config`], [`dev`], [`get`], [`identity`], [`register`], [`traces`], [`version`]; Kubernetes:
//! [`inject`] and [`install`] with `uninstall` and `check`), [`client`] connects to the controller and
//! turns its failures into one readable line, [`output`] renders tables, JSON and YAML, and
//! [`parse`] holds the argument parsers that refuse bad input before anything is sent.

mod client;
mod config;
mod dev;
mod get;
mod identity;
mod inject;
mod install;
mod output;
mod parse;
mod register;
mod traces;
mod version;
// The golden-metrics views (issue #11): stat, top, tap, and what they share.
mod stat;
mod tap;
mod top;
mod views;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::client::ControllerAddr;
use crate::output::Format;

/// The ferrule service mesh's command-line tool.
#[derive(Debug, Parser)]
#[command(name = "ferrule", version, propagate_version = true)]
struct Cli {
    /// Address of ferrule-controller's gRPC API: HOST:PORT or http://HOST:PORT.
    #[arg(
        long,
        global = true,
        env = "FERRULE_CONTROLLER",
        value_name = "ADDR",
        default_value = "127.0.0.1:8086",
        value_parser = ControllerAddr::parse
    )]
    controller: ControllerAddr,

    #[command(flatten)]
    auth: client::AuthArgs,

    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    output: Format,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate config resources (ServicePolicy, HTTPRoute, Gateway, AuthorizationPolicy) with
    /// the controller and store them, all or nothing.
    Apply(config::ApplyArgs),
    /// Delete one config resource.
    Delete(config::DeleteArgs),
    /// Show how config files differ from what is stored (exit status 1 when they differ).
    Diff(config::FileArgs),
    /// List config changes, oldest first, with the version each made.
    History(config::HistoryArgs),
    /// Restore the config as it was at an earlier version, as one new version.
    Rollback(config::RollbackArgs),
    /// Show each connected proxy and whether it runs the current config version.
    Status,
    /// Run the sample shop as a local mesh (`dev up`), or stop one (`dev down`).
    Dev(dev::DevArgs),
    /// List what the controller knows: services, endpoints or proxies.
    Get(get::GetArgs),
    /// The mesh CA: create its files, join tokens, status (docs/identity.md).
    Identity(identity::IdentityArgs),
    /// Register an endpoint that runs without a ferrule proxy (a database, say) and keep it
    /// registered until interrupted.
    Register(register::RegisterArgs),
    /// List the last traces the dev mesh's own OTLP receiver kept, newest first.
    Traces(traces::TracesArgs),
    /// Draw one trace as a waterfall: service, span, start offset, duration, status.
    Trace(traces::TraceArgs),
    /// Print the version of this client.
    Version,
    /// Add the Ferrule proxy to the workloads in Kubernetes YAML (file or stdin), offline.
    Inject(inject::InjectArgs),
    /// Print the control plane's Kubernetes manifests, for `| kubectl apply -f -`.
    Install(install::InstallArgs),
    /// Print what `ferrule install` created, for `| kubectl delete -f -`.
    Uninstall(install::UninstallArgs),
    /// Check a cluster before (--pre) or after installing Ferrule, through kubectl.
    Check(install::CheckArgs),
    /// Golden metrics per service, per edge caller→callee or per path: success rate, requests
    /// per second, p50/p95/p99 latency, measured from the proxies over a window.
    Stat(stat::StatArgs),
    /// The busiest paths of the mesh, refreshed in place.
    Top(top::TopArgs),
    /// Stream the metadata of live requests through one proxy (never bodies).
    Tap(tap::TapArgs),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut cli = Cli::parse();
    cli.controller = match cli.controller.clone().with_auth(&cli.auth) {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Apply(args) => config::apply(args, &cli.controller, cli.output).await,
        Command::Delete(args) => config::delete(args, &cli.controller).await,
        Command::Diff(args) => match config::diff(args, &cli.controller).await {
            Ok(true) => return ExitCode::from(1),
            other => other.map(|_| ()),
        },
        Command::History(args) => config::history(args, &cli.controller, cli.output).await,
        Command::Rollback(args) => config::rollback(args, &cli.controller, cli.output).await,
        Command::Status => config::status(&cli.controller, cli.output).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Get(args) => get::run(args, &cli.controller, cli.output).await,
        Command::Identity(args) => identity::run(args, &cli.controller, cli.output).await,
        Command::Register(args) => {
            if let Err(conflict) = args.check() {
                let mut cmd = Cli::command();
                cmd.build();
                cmd.find_subcommand_mut("register")
                    .expect("`register` is a subcommand of Cli")
                    .error(clap::error::ErrorKind::ArgumentConflict, conflict)
                    .exit();
            }
            register::run(args, &cli.controller).await
        }
        Command::Traces(args) => traces::list(args, cli.output).await,
        Command::Trace(args) => traces::show(args, cli.output).await,
        Command::Version => version::run(cli.output),
        Command::Inject(args) => inject::run(args),
        Command::Install(args) => install::install(args),
        Command::Uninstall(args) => install::uninstall(args),
        Command::Check(args) => match install::check(args) {
            Ok(false) => return ExitCode::from(1),
            other => other.map(|_| ()),
        },
        Command::Stat(args) => stat::run(args, &cli.controller, cli.output).await,
        Command::Top(args) => top::run(args, &cli.controller, cli.output).await,
        Command::Tap(args) => tap::run(args, &cli.controller, cli.output).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `ferrule get ... | head` closing the pipe early is not an error worth a message.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn controller_defaults_and_global_output() {
        let cli = Cli::try_parse_from(["ferrule", "get", "services", "-o", "json"]).unwrap();
        assert_eq!(cli.output, Format::Json);
        assert_eq!(cli.controller.to_string(), "127.0.0.1:8086");
    }

    #[test]
    fn stat_by_route_is_by_path() {
        let cli = Cli::try_parse_from(["ferrule", "stat", "--by", "route"]).unwrap();
        assert!(matches!(cli.command, Command::Stat(_)), "{cli:?}");
        assert!(Cli::try_parse_from(["ferrule", "stat", "--by", "rule"]).is_err());
    }

    #[test]
    fn bad_input_is_a_usage_error_naming_the_argument() {
        let cases: &[(&[&str], &str)] = &[
            (&["register", "user", "127.0.0.1"], "<ADDR:PORT>"),
            (
                &["register", "user", "127.0.0.1:9001", "--ttl", "3x"],
                "--ttl",
            ),
            (
                &["register", "user", "127.0.0.1:9001", "--ttl", "0s"],
                "--ttl",
            ),
            (
                &["register", "user", "127.0.0.1:9001", "--label", "novalue"],
                "--label",
            ),
            (&["register", "User", "127.0.0.1:9001"], "<SERVICE>"),
            (&["get", "endpoints", "a/b"], "<SERVICE>"),
            (
                &["--controller", "127.0.0.1", "get", "services"],
                "--controller",
            ),
        ];
        for (args, named) in cases {
            let err = Cli::try_parse_from(std::iter::once("ferrule").chain(args.iter().copied()))
                .expect_err(&format!("{args:?} should be refused"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
            let text = err.to_string();
            assert!(text.contains(named), "{args:?}: {text}");
        }
    }
}
