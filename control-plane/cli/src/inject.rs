//! `ferrule inject`: adds the Ferrule proxy to the workloads in Kubernetes YAML, offline,
//! with the very patch the injection webhook applies (crate `ferrule-inject`).

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use ferrule_inject::{InjectConfig, Injector, SidecarMode};

const EXAMPLES: &str = "Examples:
  ferrule inject deploy.yaml | kubectl apply -f -
  kubectl get deploy -n shop -o yaml | ferrule inject - | kubectl apply -f -
  ferrule inject --classic job.yaml > job-injected.yaml   # clusters older than 1.29
  ferrule inject --no-identity deploy.yaml   # for a control plane installed --identity=none

Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs are injected
(multi-document YAML and Lists too); other resources pass through. Workloads annotated
ferrule.io/inject: disabled, or already injected, are left as they are. What happened to each
resource, and any warning, goes to standard error. Keys come out sorted and comments are
dropped, as `kubectl get -o yaml` prints them. See docs/kubernetes.md.";

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct InjectArgs {
    /// YAML file to read; `-` or none: standard input.
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,

    /// Run the proxy as a classic sidecar (first in `containers`) instead of a native one
    /// (an init container with restartPolicy Always, Kubernetes 1.29+); a pod's
    /// ferrule.io/sidecar annotation still wins.
    #[arg(long)]
    classic: bool,

    /// The proxy image (it also runs the init step).
    #[arg(long, default_value_t = InjectConfig::default().proxy_image)]
    proxy_image: String,

    /// The controller address injected proxies dial.
    #[arg(long, default_value_t = InjectConfig::default().controller)]
    proxy_controller: String,

    /// Give the proxy no identity: no service-account token volume, so it runs without a
    /// certificate and talks plaintext (for a control plane installed with --identity=none).
    #[arg(long)]
    no_identity: bool,

    /// The audience of the projected service-account token the proxy proves its identity
    /// with (the controller's --token-audience).
    #[arg(long, default_value = ferrule_inject::pod::DEFAULT_TOKEN_AUDIENCE, conflicts_with = "no_identity")]
    token_audience: String,

    /// The mesh's trust domain (the controller's --trust-domain).
    #[arg(long, default_value = ferrule_proto::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
}

pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let (yaml, source) = match args.file.as_deref() {
        None => (read_stdin()?, "standard input".to_string()),
        Some(p) if p.as_os_str() == "-" => (read_stdin()?, "standard input".to_string()),
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
    };
    let injector = Injector::new(InjectConfig {
        proxy_image: args.proxy_image,
        controller: args.proxy_controller,
        mode: if args.classic {
            SidecarMode::Classic
        } else {
            SidecarMode::Native
        },
        token_audience: (!args.no_identity).then_some(args.token_audience),
        trust_domain: args.trust_domain,
        ..InjectConfig::default()
    });
    let (out, reports) =
        ferrule_inject::manifest::inject(&injector, &yaml).with_context(|| source.clone())?;
    if reports.is_empty() {
        anyhow::bail!("{source} holds no Kubernetes resource");
    }
    for report in &reports {
        eprintln!("{report}");
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

fn read_stdin() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading standard input")?;
    Ok(s)
}
