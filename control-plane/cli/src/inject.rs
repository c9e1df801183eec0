//! `ferrule inject`: adds the Ferrule proxy to the workloads in Kubernetes YAML, offline,
//! with the very patch the injection webhook applies (crate `ferrule-inject`). With identity
//! (the default) the proxies need the mesh's trust anchors to verify the controller: the
//! webhook passes the controller's bundle, `ferrule inject` the one given with
//! `--identity-dir` or `--trust-anchors`, and refuses to guess when neither is.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ferrule_inject::{InjectConfig, Injector, SidecarMode};

const EXAMPLES: &str = "Examples:
  ferrule inject --identity-dir ./mesh-ca deploy.yaml | kubectl apply -f -
  kubectl get deploy -n shop -o yaml | ferrule inject --identity-dir ./mesh-ca - | kubectl apply -f -
  ferrule inject --trust-anchors trust-anchors.pem --classic job.yaml   # clusters older than 1.29
  ferrule inject --no-identity deploy.yaml   # for a control plane installed --identity=none

The anchors of the installed mesh, when ferrule identity init's directory is not at hand:
  kubectl -n ferrule-system get secret ferrule-identity \\
    -o jsonpath='{.data.trust-anchors\\.pem}' | base64 -d > trust-anchors.pem

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

    /// The mesh CA's directory (`ferrule identity init --dir`): its trust-anchors.pem goes to
    /// each proxy, which verifies the controller with it. E.g. --identity-dir ./mesh-ca
    #[arg(long, value_name = "DIR", conflicts_with_all = ["no_identity", "trust_anchors"])]
    identity_dir: Option<PathBuf>,

    /// The mesh's trust anchors (PEM) for each proxy, instead of --identity-dir; e.g. the
    /// Secret's copy: --trust-anchors trust-anchors.pem
    #[arg(long, value_name = "FILE", conflicts_with = "no_identity")]
    trust_anchors: Option<PathBuf>,
}

impl InjectArgs {
    /// The trust anchors for the proxies (PEM): none without identity; with identity, from
    /// --identity-dir or --trust-anchors, which must hold certificates of --trust-domain.
    fn anchors(&self) -> anyhow::Result<Option<String>> {
        if self.no_identity {
            return Ok(None);
        }
        let (flag, path) = match (&self.identity_dir, &self.trust_anchors) {
            (Some(dir), _) => ("--identity-dir", dir.join(crate::identity::TRUST_ANCHORS)),
            (None, Some(file)) => ("--trust-anchors", file.clone()),
            (None, None) => anyhow::bail!(
                "injected proxies need the mesh's trust anchors to verify the controller \
                 (docs/kubernetes.md, Trust anchors): give --identity-dir DIR (the directory of \
                 ferrule identity init) or --trust-anchors FILE (e.g. from the cluster: kubectl \
                 -n ferrule-system get secret ferrule-identity -o \
                 jsonpath='{{.data.trust-anchors\\.pem}}' | base64 -d > trust-anchors.pem), or \
                 --no-identity for a control plane installed with --identity=none"
            ),
        };
        anchors_from(&path, &self.trust_domain)
            .with_context(|| format!("{flag}: {}", path.display()))
            .map(Some)
    }
}

/// The certificates of the PEM file at `path`, checked to parse and to belong to
/// `trust_domain` (a mesh's anchors carry a `spiffe://<trust-domain>` name).
fn anchors_from(path: &Path, trust_domain: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).context("reading the trust anchors")?;
    let pem = ferrule_inject::anchors::certificates_pem(&text)?;
    let certs = ferrule_channel::certificates_from_pem(pem.as_bytes(), "the trust anchors")?;
    for cert in &certs {
        if let Some(domain) = ferrule_channel::trust_domain_of(cert)
            && domain != trust_domain
        {
            anyhow::bail!(
                "an anchor is for trust domain {domain}, not {trust_domain}: pass \
                 --trust-domain {domain} (the controller's --trust-domain), or the right anchors"
            );
        }
    }
    Ok(pem)
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
    let trust_anchors_pem = args.anchors()?;
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
        trust_anchors_pem,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: InjectArgs,
    }

    fn args(flags: &[&str]) -> InjectArgs {
        Cli::try_parse_from(std::iter::once("inject").chain(flags.iter().copied()))
            .unwrap()
            .args
    }

    fn mesh_ca(trust_domain: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        crate::identity::create_ca(
            dir.path(),
            trust_domain,
            std::time::Duration::from_secs(3600 * 24),
            std::time::Duration::from_secs(3600),
            false,
        )
        .unwrap();
        dir
    }

    /// With identity on and no anchors given, inject refuses and says where to get them.
    #[test]
    fn identity_without_anchors_is_refused_with_the_way_out() {
        let e = format!("{:#}", args(&[]).anchors().unwrap_err());
        for needle in [
            "verify the controller",
            "--identity-dir DIR",
            "--trust-anchors FILE",
            "secret ferrule-identity",
            "--no-identity",
        ] {
            assert!(e.contains(needle), "{needle:?} missing in: {e}");
        }
        assert_eq!(args(&["--no-identity"]).anchors().unwrap(), None);
    }

    #[test]
    fn anchors_come_from_the_ca_directory_or_a_file() {
        let ca = mesh_ca("cluster.local");
        let dir = ca.path().to_str().unwrap();
        let from_dir = args(&["--identity-dir", dir]).anchors().unwrap().unwrap();
        assert!(
            from_dir.starts_with("-----BEGIN CERTIFICATE-----"),
            "{from_dir}"
        );
        let file = ca.path().join(crate::identity::TRUST_ANCHORS);
        let from_file = args(&["--trust-anchors", file.to_str().unwrap()])
            .anchors()
            .unwrap();
        assert_eq!(from_file.as_deref(), Some(from_dir.as_str()));
        assert!(
            Cli::try_parse_from(["inject", "--no-identity", "--identity-dir", dir]).is_err(),
            "no identity and anchors contradict each other"
        );
    }

    #[test]
    fn bad_anchors_are_refused_naming_the_flag() {
        let ca = mesh_ca("example.org");
        let dir = ca.path().to_str().unwrap();
        let e = format!(
            "{:#}",
            args(&["--identity-dir", dir]).anchors().unwrap_err()
        );
        assert!(
            e.starts_with("--identity-dir") && e.contains("trust domain example.org"),
            "{e}"
        );
        assert!(
            args(&["--identity-dir", dir, "--trust-domain", "example.org"])
                .anchors()
                .is_ok()
        );

        let key = ca.path().join(crate::identity::ISSUER_KEY);
        let e = format!(
            "{:#}",
            args(&["--trust-anchors", key.to_str().unwrap()])
                .anchors()
                .unwrap_err()
        );
        assert!(
            e.starts_with("--trust-anchors") && e.contains("no PEM CERTIFICATE"),
            "{e}"
        );
        let missing = ca.path().join("missing.pem");
        let e = format!(
            "{:#}",
            args(&["--trust-anchors", missing.to_str().unwrap()])
                .anchors()
                .unwrap_err()
        );
        assert!(e.contains("missing.pem"), "{e}");
    }
}
