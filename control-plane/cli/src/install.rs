//! `ferrule install`, `ferrule uninstall` and `ferrule check`: the control plane on Kubernetes.
//!
//! `install` prints the manifests of `k8s/base` (embedded in the binary, in the order of its
//! kustomization) with a fresh certificate for the injection webhook filled in and the mesh CA
//! from `ferrule identity init`'s directory as the Secret `ferrule-identity`, for
//! `| kubectl apply -f -`. It never makes a CA itself: without `--identity-dir` it refuses,
//! unless told `--identity=none` (then the controller is no CA and proxies get no token). `uninstall` prints the same objects in
//! reverse order (the webhook first, so no pod creation waits on a controller going away), for
//! `| kubectl delete -f -`. `check` asks the cluster through `kubectl` (the CLI has no
//! Kubernetes client of its own), and each check that fails says how to fix it.

use std::process::Command;

use anyhow::Context;
use base64::Engine;
use ferrule_inject::InjectConfig;
use serde_json::{Value, json};

/// `k8s/base`, file by file, in the order of `k8s/base/kustomization.yaml` (a test checks it),
/// with the webhook's certificate and mesh CA Secrets (placeholders the kustomization leaves
/// out).
const BASE: &[(&str, &str)] = &[
    (
        "namespace.yaml",
        include_str!("../../../k8s/base/namespace.yaml"),
    ),
    ("rbac.yaml", include_str!("../../../k8s/base/rbac.yaml")),
    ("etcd.yaml", include_str!("../../../k8s/base/etcd.yaml")),
    (
        "webhook-tls.yaml",
        include_str!("../../../k8s/base/webhook-tls.yaml"),
    ),
    (
        "identity.yaml",
        include_str!("../../../k8s/base/identity.yaml"),
    ),
    (
        "controller.yaml",
        include_str!("../../../k8s/base/controller.yaml"),
    ),
    (
        "webhook.yaml",
        include_str!("../../../k8s/base/webhook.yaml"),
    ),
];

const NAMESPACE: &str = "ferrule-system";
/// The name the API server calls the webhook by (its Service), which the certificate names.
const WEBHOOK_HOST: &str = "ferrule-webhook.ferrule-system.svc";

const INSTALL_EXAMPLES: &str = "Examples:
  ferrule identity init --dir ./mesh-ca          # once per mesh; keep anchor.key offline
  ferrule install --identity-dir ./mesh-ca | kubectl apply -f -
  ferrule install --identity-dir ./mesh-ca --sidecar classic | kubectl apply -f -   # < 1.29
  ferrule install --identity=none | kubectl apply -f -     # no mesh CA: proxies talk plaintext
  ferrule install --identity-dir ./mesh-ca --proxy-image registry.example/ferrule/proxy:0.1.0 \\
      --controller-image registry.example/ferrule/controller:0.1.0 > ferrule.yaml

Prints the control plane (namespace ferrule-system: a 3-member etcd, the controller with the
injection webhook and the mesh CA, RBAC) with a new self-signed certificate for the webhook,
made now, and the mesh CA of --identity-dir as the Secret ferrule-identity (trust-anchors.pem,
issuer.pem, issuer.key; never anchor.key). The controller checks injected proxies' projected
service-account tokens with a TokenReview and gives each the identity
spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>; proxies talk mutual TLS.
Running it again makes a new webhook certificate; applying that replaces the old one. Then label
a namespace for injection: kubectl label namespace NAME ferrule.io/inject=enabled.

A mesh CA is never made silently: without --identity-dir install refuses (--identity=none
installs without one). See docs/kubernetes.md and docs/identity.md.";

const UNINSTALL_EXAMPLES: &str = "Examples:
  ferrule uninstall | kubectl delete -f -

Prints the objects `ferrule install` creates, the webhook first and the namespace last. Pods injected
earlier keep their proxies until they are recreated (kubectl rollout restart) after
uninstalling; deleting the namespace ferrule-system also deletes etcd's volumes (its data).";

const CHECK_EXAMPLES: &str = "Examples:
  ferrule check --pre      # before install: cluster version, permissions, other injectors
  ferrule check            # after install: control plane, mesh CA, webhook, injected proxies
                           # and their certificates

Asks the cluster through kubectl (its current context; --kubectl to use another binary);
proxies' certificates come from the controller's overview through the API server's service
proxy (kubectl get --raw .../services/ferrule-controller:admin/proxy/api/v1/overview).
Exit status 1 when a check fails; each failure says how to fix it.";

#[derive(Debug, clap::Args)]
#[command(after_help = INSTALL_EXAMPLES)]
pub struct InstallArgs {
    /// The proxy image injected pods run (the controller's --proxy-image).
    #[arg(long, default_value_t = InjectConfig::default().proxy_image)]
    proxy_image: String,

    /// The controller image.
    #[arg(long, default_value_t = format!("ferrule/controller:{}", ferrule_inject::pod::VERSION))]
    controller_image: String,

    /// How injected proxies run: `native` (init container with restartPolicy Always,
    /// Kubernetes 1.29+) or `classic` (a regular container, older clusters).
    #[arg(long, default_value = "native", value_parser = ["native", "classic"])]
    sidecar: String,

    /// The mesh CA to install: a directory `ferrule identity init` wrote (trust-anchors.pem,
    /// issuer.pem, issuer.key). Required unless --identity=none.
    #[arg(long, value_name = "DIR", conflicts_with = "identity")]
    identity_dir: Option<std::path::PathBuf>,

    /// `none`: install without a mesh CA (no Secret; injected proxies get no identity and talk
    /// plaintext). The only value; give --identity-dir for a mesh with mutual TLS.
    #[arg(long, value_name = "none", value_parser = ["none"])]
    identity: Option<String>,

    /// The mesh's trust domain; the CA's issuer must be made for it (`ferrule identity init
    /// --trust-domain`). The controller passes it on to the proxies it injects.
    #[arg(long, default_value = ferrule_proto::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
}

#[derive(Debug, clap::Args)]
#[command(after_help = UNINSTALL_EXAMPLES)]
pub struct UninstallArgs {}

#[derive(Debug, clap::Args)]
#[command(after_help = CHECK_EXAMPLES)]
pub struct CheckArgs {
    /// Check that the cluster is ready for `ferrule install`, instead of the installation.
    #[arg(long)]
    pre: bool,

    /// The kubectl binary to ask the cluster with.
    #[arg(long, default_value = "kubectl", value_name = "PATH")]
    kubectl: String,
}

/// The base manifests as JSON values, document by document.
fn base_resources() -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for (file, text) in BASE {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value: Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("embedded k8s/base/{file}"))?;
            if !value.is_null() {
                out.push(value);
            }
        }
    }
    Ok(out)
}

/// The webhook's serving certificate: a CA made for it and a leaf for [`WEBHOOK_HOST`].
struct WebhookTls {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn webhook_tls() -> anyhow::Result<WebhookTls> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferrule-webhook-ca");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate()?;
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let mut params = rcgen::CertificateParams::new(vec![WEBHOOK_HOST.to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, WEBHOOK_HOST);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok(WebhookTls {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The Secret `ferrule-identity` holds these files of `ferrule identity init`'s directory.
const IDENTITY_FILES: [&str; 3] = [
    crate::identity::TRUST_ANCHORS,
    crate::identity::ISSUER_CERT,
    crate::identity::ISSUER_KEY,
];

/// The mesh CA's files, read from `dir` and checked the way the controller loads them, so a
/// CA that would stop the controller is refused here and not in the cluster.
fn read_identity(
    dir: &std::path::Path,
    trust_domain: &str,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut files = Vec::new();
    for name in IDENTITY_FILES {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "--identity-dir: reading {} (make a mesh CA with `ferrule identity init --dir {}`)",
                path.display(),
                dir.display()
            )
        })?;
        files.push((name, text));
    }
    ferrule_ca::Ca::from_pem(
        trust_domain,
        files[0].1.as_bytes(),
        files[1].1.as_bytes(),
        &files[2].1,
    )
    .with_context(|| {
        format!(
            "--identity-dir {}: the files do not make a mesh CA for trust domain {trust_domain}",
            dir.display()
        )
    })?;
    Ok(files)
}

/// What `install` was told about identity.
enum Identity {
    /// The mesh CA's files, by their names in the Secret.
    Ca(Vec<(&'static str, String)>),
    /// `--identity=none`.
    None,
}

impl InstallArgs {
    fn identity(&self) -> anyhow::Result<Identity> {
        match (&self.identity_dir, &self.identity) {
            (Some(dir), _) => Ok(Identity::Ca(read_identity(dir, &self.trust_domain)?)),
            (None, Some(_)) => Ok(Identity::None),
            (None, None) => anyhow::bail!(
                "ferrule install needs the mesh CA the controller signs proxies' certificates                  with, and never makes one silently. Make one and keep it (anchor.key makes the                  next issuer):\n  ferrule identity init --dir ./mesh-ca\n  ferrule install                  --identity-dir ./mesh-ca | kubectl apply -f -\nor install without mutual TLS:                  ferrule install --identity=none"
            ),
        }
    }
}

/// Controller flags that only a controller with a mesh CA gets (`--api-san`: the names of the
/// certificate it serves its API with).
const IDENTITY_ARGS: &[&str] = &[
    "--identity-dir=",
    "--kubernetes-api=",
    "--token-audience=",
    "--api-san=",
];

/// The install manifests with the certificate, images, sidecar mode and mesh CA filled in.
fn install_resources(
    args: &InstallArgs,
    tls: &WebhookTls,
    identity: &Identity,
) -> anyhow::Result<Vec<Value>> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut resources = base_resources()?;
    let (mut secret, mut webhook, mut controller) = (false, false, false);
    let mut identity_secret = false;
    for r in &mut resources {
        let kind = r["kind"].as_str().unwrap_or_default().to_string();
        let name = r["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match (kind.as_str(), name.as_str()) {
            ("Secret", "ferrule-webhook-tls") => {
                r["data"] = json!({ "tls.crt": b64(&tls.cert_pem), "tls.key": b64(&tls.key_pem) });
                secret = true;
            }
            ("MutatingWebhookConfiguration", "ferrule-injector") => {
                for hook in r["webhooks"].as_array_mut().into_iter().flatten() {
                    hook["clientConfig"]["caBundle"] = json!(b64(&tls.ca_pem));
                }
                webhook = true;
            }
            ("Deployment", "ferrule-controller") => {
                let container = r
                    .pointer_mut("/spec/template/spec/containers/0")
                    .context("the embedded controller Deployment has no container")?;
                container["image"] = json!(args.controller_image);
                let container_args = container["args"]
                    .as_array_mut()
                    .context("the embedded controller Deployment has no args")?;
                container_args.retain(|a| {
                    let a = a.as_str().unwrap_or_default();
                    !a.starts_with("--proxy-image=") && !a.starts_with("--sidecar=")
                });
                container_args.push(json!(format!("--proxy-image={}", args.proxy_image)));
                container_args.push(json!(format!("--sidecar={}", args.sidecar)));
                container_args.push(json!(format!("--trust-domain={}", args.trust_domain)));
                if let Identity::None = identity {
                    container_args.retain(|a| {
                        let a = a.as_str().unwrap_or_default();
                        !IDENTITY_ARGS.iter().any(|p| a.starts_with(p))
                    });
                    without_identity_volume(r)?;
                }
                controller = true;
            }
            ("Secret", "ferrule-identity") => {
                if let Identity::Ca(files) = identity {
                    r["data"] = files
                        .iter()
                        .map(|(name, text)| (name.to_string(), json!(b64(text))))
                        .collect::<serde_json::Map<_, _>>()
                        .into();
                }
                identity_secret = true;
            }
            _ => {}
        }
    }
    anyhow::ensure!(
        secret && webhook && controller && identity_secret,
        "the embedded manifests lack the webhook Secret, the webhook configuration, the \
         controller Deployment or the identity Secret"
    );
    if let Identity::None = identity {
        resources.retain(|r| !(r["kind"] == "Secret" && r["metadata"]["name"] == IDENTITY_SECRET));
    }
    Ok(resources)
}

/// The Secret the controller's `--identity-dir` is mounted from.
const IDENTITY_SECRET: &str = "ferrule-identity";

/// Removes the identity Secret's volume and mount from the controller Deployment `r`.
fn without_identity_volume(r: &mut Value) -> anyhow::Result<()> {
    let spec = r
        .pointer_mut("/spec/template/spec")
        .context("the embedded controller Deployment has no pod spec")?;
    let volume = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["secret"]["secretName"] == IDENTITY_SECRET)
        .and_then(|v| v["name"].as_str())
        .map(str::to_string)
        .context("the embedded controller Deployment does not mount the identity Secret")?;
    if let Some(volumes) = spec["volumes"].as_array_mut() {
        volumes.retain(|v| v["name"] != volume.as_str());
    }
    for container in spec["containers"].as_array_mut().into_iter().flatten() {
        if let Some(mounts) = container["volumeMounts"].as_array_mut() {
            mounts.retain(|m| m["name"] != volume.as_str());
        }
    }
    Ok(())
}

fn to_yaml(resources: &[Value], header: &str) -> String {
    let mut out = String::from(header);
    for r in resources {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(r).expect("JSON values serialize as YAML"));
    }
    out
}

pub fn install(args: InstallArgs) -> anyhow::Result<()> {
    let identity = args.identity()?;
    let tls = webhook_tls().context("making the webhook certificate")?;
    let resources = install_resources(&args, &tls, &identity)?;
    let identity_note = match identity {
        Identity::Ca(_) => format!(
            "# The mesh CA (trust domain {}) is in the Secret ferrule-identity: this output holds\n\
             # the issuer's private key; keep it as you keep that key.\n",
            args.trust_domain
        ),
        Identity::None => {
            "# Installed with --identity=none: no mesh CA; proxies talk plaintext.\n".into()
        }
    };
    let header = format!(
        "# Ferrule {} control plane, from `ferrule install` (k8s/base with a new webhook\n\
         # certificate). Apply with: kubectl apply -f -\n{identity_note}",
        ferrule_inject::pod::VERSION
    );
    print_all(&to_yaml(&resources, &header))
}

/// The objects to delete (as the embedded manifests: kubectl deletes by kind and name, and the
/// output stays schema-valid), the webhook configuration first and the namespace last.
fn uninstall_resources() -> anyhow::Result<Vec<Value>> {
    let mut resources = base_resources()?;
    resources.reverse();
    // The namespace takes everything in it along; delete it last so the rest goes first.
    resources.sort_by_key(|r| r["kind"] == "Namespace");
    Ok(resources)
}

pub fn uninstall(_args: UninstallArgs) -> anyhow::Result<()> {
    let header = "# What `ferrule install` created, for: ferrule uninstall | kubectl delete -f -\n";
    print_all(&to_yaml(&uninstall_resources()?, header))
}

fn print_all(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

/// The outcome of one check.
#[derive(Debug, PartialEq)]
enum Check {
    Pass(String),
    /// What is wrong, and how to fix it.
    Fail(String, String),
    Warn(String, String),
}

/// Runs kubectl with `args`; its stdout, or an error with its stderr.
type Kubectl<'a> = dyn Fn(&[&str]) -> anyhow::Result<String> + 'a;

fn real_kubectl(bin: &str) -> impl Fn(&[&str]) -> anyhow::Result<String> + '_ {
    move |args: &[&str]| {
        let out = Command::new(bin).args(args).output().with_context(|| {
            format!("running {bin}: is kubectl installed? (--kubectl PATH names another binary)")
        })?;
        if !out.status.success() {
            // kubectl logs every retry before its verdict; the verdict is the last line.
            let stderr = String::from_utf8_lossy(&out.stderr);
            let verdict = stderr.lines().rev().find(|l| !l.trim().is_empty());
            anyhow::bail!(
                "{bin} {}: {}",
                args.join(" "),
                verdict.unwrap_or("failed with no message")
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn json_of(kubectl: &Kubectl<'_>, args: &[&str]) -> anyhow::Result<Value> {
    let text = kubectl(args)?;
    serde_json::from_str(&text)
        .with_context(|| format!("kubectl {} printed no JSON", args.join(" ")))
}

/// Kubernetes 1.29 runs native sidecars by default.
fn check_version(version: &Value) -> Check {
    let server = &version["serverVersion"];
    let part = |k: &str| {
        server[k]
            .as_str()
            .and_then(|s| s.trim_end_matches('+').parse::<u32>().ok())
    };
    match (part("major"), part("minor")) {
        (Some(1), Some(minor)) if minor >= 29 => Check::Pass(format!(
            "Kubernetes 1.{minor}: native sidecars are available"
        )),
        (Some(1), Some(minor)) => Check::Warn(
            format!("Kubernetes 1.{minor} has no native sidecars (1.29+)"),
            "install with `ferrule install --sidecar classic`".into(),
        ),
        _ => Check::Fail(
            format!("cannot tell the cluster's version from {server}"),
            "check that kubectl reaches the cluster: kubectl version".into(),
        ),
    }
}

/// What `ferrule install` needs to create, as `kubectl auth can-i` asks it.
const PERMISSIONS: &[(&str, &str)] = &[
    ("create", "namespaces"),
    ("create", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    (
        "create",
        "mutatingwebhookconfigurations.admissionregistration.k8s.io",
    ),
    ("create", "deployments.apps"),
    ("create", "statefulsets.apps"),
    ("create", "secrets"),
    ("create", "services"),
    ("create", "poddisruptionbudgets.policy"),
];

/// Another mesh's injector would give pods a second proxy.
fn check_other_injectors(webhooks: &Value) -> Check {
    let others: Vec<String> = webhooks["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["metadata"]["name"] != "ferrule-injector")
        .filter(|w| {
            w["webhooks"].as_array().into_iter().flatten().any(|h| {
                h["rules"].as_array().into_iter().flatten().any(|r| {
                    r["resources"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|res| matches!(res.as_str(), Some("pods" | "*" | "pods/*")))
                })
            })
        })
        .filter_map(|w| w["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    let meshes: Vec<&String> = others
        .iter()
        .filter(|n| {
            ["linkerd", "istio", "sidecar-injector", "kuma", "consul"]
                .iter()
                .any(|m| n.contains(m))
        })
        .collect();
    if !meshes.is_empty() {
        return Check::Fail(
            format!("another mesh's injector mutates pods: {meshes:?}"),
            "pods in a namespace both inject would get two proxies: uninstall the other mesh, \
             or never label the same namespace for both"
                .into(),
        );
    }
    if others.is_empty() {
        Check::Pass("no other webhook mutates pods".into())
    } else {
        Check::Warn(
            format!("other webhooks mutate pods: {others:?}"),
            "make sure none of them adds containers or rewrites init containers".into(),
        )
    }
}

fn check_ready(what: &str, object: &Value, want: u64, fix: &str) -> Check {
    let ready = object["status"]["readyReplicas"].as_u64().unwrap_or(0);
    if ready >= want {
        Check::Pass(format!("{what}: {ready} ready"))
    } else {
        Check::Fail(format!("{what}: {ready} of {want} ready"), fix.into())
    }
}

fn check_webhook(config: &Value, endpoints: &Value) -> Vec<Check> {
    let mut out = Vec::new();
    let ca = config
        .pointer("/webhooks/0/clientConfig/caBundle")
        .and_then(Value::as_str);
    out.push(match ca {
        Some(ca) if !ca.is_empty() => {
            Check::Pass("the webhook configuration has a caBundle".into())
        }
        _ => Check::Fail(
            "the webhook configuration ferrule-injector has no caBundle: the API server cannot \
             call it"
                .into(),
            "install with `ferrule install | kubectl apply -f -`, which fills it in".into(),
        ),
    });
    let ready = endpoints["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["addresses"].as_array().map_or(0, Vec::len))
        .sum::<usize>();
    out.push(if ready > 0 {
        Check::Pass(format!("the webhook Service has {ready} ready endpoint(s)"))
    } else {
        Check::Fail(
            "the webhook Service ferrule-webhook has no ready endpoint: pods start without a \
             proxy (failurePolicy Ignore)"
                .into(),
            "kubectl -n ferrule-system logs deploy/ferrule-controller; then recreate the pods \
             that started meanwhile"
                .into(),
        )
    });
    out
}

/// Proxies and their versions; pods of injection-enabled namespaces that have none.
fn check_proxies(pods: &Value, namespaces: &Value) -> Vec<Check> {
    let enabled: Vec<&str> = namespaces["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n.pointer("/metadata/labels/ferrule.io~1inject") == Some(&json!("enabled")))
        .filter_map(|n| n["metadata"]["name"].as_str())
        .collect();
    let mut injected = 0;
    let mut old = Vec::new();
    let mut missing = Vec::new();
    for pod in pods["items"].as_array().into_iter().flatten() {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let annotations = &pod["metadata"]["annotations"];
        match annotations
            .get("ferrule.io/proxy-version")
            .and_then(Value::as_str)
        {
            Some(v) => {
                injected += 1;
                if v != ferrule_inject::pod::VERSION {
                    old.push(format!("{ns}/{name} ({v})"));
                }
            }
            None if enabled.contains(&ns)
                && annotations.get("ferrule.io/inject").and_then(Value::as_str)
                    != Some("disabled") =>
            {
                missing.push(format!("{ns}/{name}"));
            }
            None => {}
        }
    }
    let mut out = vec![Check::Pass(format!("{injected} injected pod(s)"))];
    if !old.is_empty() {
        out.push(Check::Warn(
            format!(
                "proxies of another version than this CLI ({}): {old:?}",
                ferrule_inject::pod::VERSION
            ),
            "kubectl rollout restart the workloads to inject the current proxy".into(),
        ));
    }
    if !missing.is_empty() {
        out.push(Check::Fail(
            format!("pods in namespaces labelled for injection without a proxy: {missing:?}"),
            "they started while the webhook was unreachable: kubectl rollout restart their \
             workloads (or delete the pods)"
                .into(),
        ));
    }
    out
}

/// Below this much issuer lifetime left, `check` warns (Linkerd's check says 60 days too).
const ISSUER_WARN_SECONDS: i64 = 60 * 24 * 3600;

/// The mesh CA: the controller has one, its Secret exists and holds a CA that loads, and the
/// issuer is not about to expire. `secret` is `None` when there is no such Secret.
fn check_identity(deployment: &Value, secret: Option<&Value>, now: i64) -> Vec<Check> {
    let args: Vec<&str> = deployment
        .pointer("/spec/template/spec/containers/0/args")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let arg = |flag: &str| args.iter().find_map(|a| a.strip_prefix(flag));
    let fix = "ferrule identity init --dir ./mesh-ca, then ferrule install --identity-dir \
               ./mesh-ca | kubectl apply -f - (docs/kubernetes.md)";
    if arg("--identity-dir=").is_none() {
        return vec![Check::Warn(
            "the controller has no mesh CA (installed with --identity=none): proxies have no \
             identity and talk plaintext"
                .into(),
            fix.into(),
        )];
    }
    let Some(secret) = secret else {
        return vec![Check::Fail(
            format!("the Secret {IDENTITY_SECRET} is missing: the controller cannot start"),
            fix.into(),
        )];
    };
    let mut files = Vec::new();
    for name in IDENTITY_FILES {
        let text = secret["data"][name]
            .as_str()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|t| !t.trim().is_empty());
        let Some(text) = text else {
            return vec![Check::Fail(
                format!("the Secret {IDENTITY_SECRET} has no {name}: the controller cannot start"),
                fix.into(),
            )];
        };
        files.push(text);
    }
    let trust_domain =
        arg("--trust-domain=").unwrap_or(ferrule_proto::identity::DEFAULT_TRUST_DOMAIN);
    let ca = match ferrule_ca::Ca::from_pem(
        trust_domain,
        files[0].as_bytes(),
        files[1].as_bytes(),
        &files[2],
    ) {
        Ok(ca) => ca,
        Err(e) => {
            return vec![Check::Fail(
                format!("the Secret {IDENTITY_SECRET} holds no usable mesh CA: {e}"),
                "replace it with the files of ferrule identity init (docs/identity.md)".into(),
            )];
        }
    };
    let expires = ca.issuer_info().not_after;
    let left = expires.unix_timestamp() - now;
    let what = format!(
        "mesh CA: {} trust anchor(s), trust domain {trust_domain}, issuer valid until {expires}",
        ca.anchors().len()
    );
    let rotate = "rotate the issuer: ferrule identity issuer, then replace the Secret's \
                  issuer.pem and issuer.key (docs/identity.md, Rotation)";
    if left <= 0 {
        vec![Check::Fail(
            format!("{what}: the issuer has expired, no certificate can be issued"),
            rotate.into(),
        )]
    } else if left < ISSUER_WARN_SECONDS {
        vec![Check::Warn(
            format!("{what}: less than 60 days left"),
            rotate.into(),
        )]
    } else {
        vec![Check::Pass(what)]
    }
}

type CheckFn = fn(&Kubectl<'_>) -> anyhow::Result<Vec<Check>>;

fn version_checks(kubectl: &Kubectl<'_>) -> anyhow::Result<Vec<Check>> {
    Ok(vec![check_version(&json_of(
        kubectl,
        &["version", "-o", "json"],
    )?)])
}

fn permission_checks(kubectl: &Kubectl<'_>) -> anyhow::Result<Vec<Check>> {
    let mut out = Vec::new();
    for (verb, resource) in PERMISSIONS {
        let answer = kubectl(&["auth", "can-i", verb, resource])?;
        if answer.trim() != "yes" {
            out.push(Check::Fail(
                format!("you may not {verb} {resource}"),
                "install as a cluster administrator (cluster-admin)".into(),
            ));
        }
    }
    if out.is_empty() {
        out.push(Check::Pass(
            "you may create everything ferrule install creates".into(),
        ));
    }
    Ok(out)
}

fn injector_checks(kubectl: &Kubectl<'_>) -> anyhow::Result<Vec<Check>> {
    let hooks = json_of(
        kubectl,
        &["get", "mutatingwebhookconfigurations", "-o", "json"],
    )?;
    Ok(vec![check_other_injectors(&hooks)])
}

fn existing_checks(kubectl: &Kubectl<'_>) -> anyhow::Result<Vec<Check>> {
    let found = kubectl(&[
        "get",
        "namespace",
        NAMESPACE,
        "--ignore-not-found",
        "-o",
        "name",
    ])?;
    Ok(vec![if found.trim().is_empty() {
        Check::Pass(format!("no namespace {NAMESPACE} yet"))
    } else {
        Check::Warn(
            format!("namespace {NAMESPACE} exists already"),
            "ferrule install then updates that installation; `ferrule check` (without --pre) \
             shows its state"
                .into(),
        )
    }])
}

fn etcd_checks(kubectl: &Kubectl<'_>) -> anyhow::Result<Vec<Check>> {
    let etcd = json_of(
        kubectl,
        &[
            "-n",
            NAMESPACE,
            "get",
            "statefulset",
            "ferrule-etcd",
            "-o",
            "json",
        ],
    )?;
    Ok(vec![check_ready(
        "etcd (statefulset ferrule-etcd)",
        &etcd,
        2,
        "kubectl -n ferrule-system describe statefulset ferrule-etcd (each member needs its \
         volume; 2 of 3 make a quorum)",
    )])
}

/// The controller's readiness and its mesh CA, from one read of its Deployment.
fn controller_checks(kubectl: &Kubectl<'_>) -> anyhow::Result<Vec<Check>> {
    let controller = json_of(
        kubectl,
        &[
            "-n",
            NAMESPACE,
            "get",
            "deployment",
            "ferrule-controller",
            "-o",
            "json",
        ],
    )?;
    let mut checks = vec![check_ready(
        "controller (deployment ferrule-controller)",
        &controller,
        1,
        "kubectl -n ferrule-system logs deploy/ferrule-controller (an empty ferrule-webhook-tls \
         Secret stops it: install with `ferrule install`)",
    )];
    checks.extend(identity_checks(kubectl, &controller)?);
    Ok(checks)
}

fn webhook_checks(kubectl: &Kubectl<'_>) -> anyhow::Result<Vec<Check>> {
    let config = json_of(
        kubectl,
        &[
            "get",
            "mutatingwebhookconfiguration",
            "ferrule-injector",
            "-o",
            "json",
        ],
    )?;
    let endpoints = json_of(
        kubectl,
        &[
            "-n",
            NAMESPACE,
            "get",
            "endpoints",
            "ferrule-webhook",
            "-o",
            "json",
        ],
    )?;
    Ok(check_webhook(&config, &endpoints))
}

/// The mesh CA of the controller whose Deployment is `controller`.
fn identity_checks(kubectl: &Kubectl<'_>, controller: &Value) -> anyhow::Result<Vec<Check>> {
    let secret = kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "secret",
        IDENTITY_SECRET,
        "--ignore-not-found",
        "-o",
        "json",
    ])?;
    let secret: Option<Value> = if secret.trim().is_empty() {
        None
    } else {
        Some(serde_json::from_str(&secret).context("kubectl get secret printed no JSON")?)
    };
    let now = ferrule_proto::certificate::unix_now();
    Ok(check_identity(controller, secret.as_ref(), now))
}

/// The controller's dashboard overview, through the API server's service proxy (no
/// port-forward: what the user's kubectl may read, `ferrule check` reads).
const OVERVIEW: &str =
    "/api/v1/namespaces/ferrule-system/services/ferrule-controller:admin/proxy/api/v1/overview";

fn certificate_checks(kubectl: &Kubectl<'_>) -> anyhow::Result<Vec<Check>> {
    let overview = json_of(kubectl, &["get", "--raw", OVERVIEW])?;
    Ok(check_certificates(&overview))
}

/// Proxies' certificates as they reported them, judged by the controller against the trust
/// bundle in force (`proxies[].certificate.problem` of the overview): expired ones and ones
/// chaining to an anchor not in the bundle fail, ones near expiry or still without a
/// certificate warn.
fn check_certificates(overview: &Value) -> Vec<Check> {
    use ferrule_proto::certificate::CertificateProblem;

    let Some(proxies) = overview["proxies"].as_array() else {
        return vec![Check::Fail(
            "the controller's overview lists no proxies (is it a Ferrule controller of this \
             version?)"
                .into(),
            "kubectl -n ferrule-system logs deploy/ferrule-controller".into(),
        )];
    };
    let mut with_certificate = 0;
    let mut problems: Vec<(CertificateProblem, Vec<String>)> = Vec::new();
    for proxy in proxies {
        let certificate = &proxy["certificate"];
        if certificate.is_null() {
            continue; // No identity: nothing to judge.
        }
        with_certificate += 1;
        let Some(problem) = certificate["problem"]
            .as_str()
            .and_then(CertificateProblem::from_code)
        else {
            continue;
        };
        let name = format!(
            "{} ({})",
            proxy["proxy_id"].as_str().unwrap_or_default(),
            proxy["service"].as_str().unwrap_or_default()
        );
        match problems.iter_mut().find(|(p, _)| *p == problem) {
            Some((_, names)) => names.push(name),
            None => problems.push((problem, vec![name])),
        }
    }
    if problems.is_empty() {
        return vec![Check::Pass(format!(
            "{with_certificate} proxy certificate(s) valid and chaining to the trust bundle"
        ))];
    }
    problems
        .into_iter()
        .map(|(problem, names)| {
            let what = format!("proxy certificate(s) {problem}: {names:?}");
            let fix = problem.fix().to_string();
            match problem {
                CertificateProblem::Expired | CertificateProblem::UnknownAnchor => {
                    Check::Fail(what, fix)
                }
                CertificateProblem::ExpiresSoon | CertificateProblem::NoCertificate => {
                    Check::Warn(what, fix)
                }
            }
        })
        .collect()
}

fn proxy_checks(kubectl: &Kubectl<'_>) -> anyhow::Result<Vec<Check>> {
    let pods = json_of(kubectl, &["get", "pods", "--all-namespaces", "-o", "json"])?;
    let namespaces = json_of(kubectl, &["get", "namespaces", "-o", "json"])?;
    Ok(check_proxies(&pods, &namespaces))
}

fn run_checks(pre: bool, kubectl: &Kubectl<'_>) -> Vec<Check> {
    let list: &[(&str, CheckFn)] = if pre {
        &[
            ("cluster version", version_checks),
            ("permissions", permission_checks),
            ("other injectors", injector_checks),
            ("existing installation", existing_checks),
        ]
    } else {
        &[
            ("cluster version", version_checks),
            ("etcd", etcd_checks),
            ("controller", controller_checks),
            ("webhook", webhook_checks),
            ("proxies", proxy_checks),
            ("proxy certificates", certificate_checks),
        ]
    };
    let mut checks = Vec::new();
    for (i, (what, run)) in list.iter().enumerate() {
        match run(kubectl) {
            Ok(c) => checks.extend(c),
            Err(e) => checks.push(Check::Fail(
                format!("{what}: {e:#}"),
                "check that kubectl reaches the cluster (kubectl cluster-info) and that you \
                 may read it"
                    .into(),
            )),
        }
        // Without the cluster's version nothing else can be asked either.
        if i == 0 && matches!(checks.last(), Some(Check::Fail(..))) {
            break;
        }
    }
    checks
}

/// Prints each check; true when none failed.
fn report(checks: &[Check]) -> bool {
    let mut ok = true;
    for c in checks {
        match c {
            Check::Pass(what) => println!("√ {what}"),
            Check::Warn(what, fix) => println!("‼ {what}\n    see: {fix}"),
            Check::Fail(what, fix) => {
                ok = false;
                println!("× {what}\n    fix: {fix}");
            }
        }
    }
    ok
}

/// `ferrule check`: true when every check passed (warnings allowed).
pub fn check(args: CheckArgs) -> anyhow::Result<bool> {
    let kubectl = real_kubectl(&args.kubectl);
    let checks = run_checks(args.pre, &kubectl);
    let ok = report(&checks);
    println!(
        "{}",
        if ok {
            "Status check results are √"
        } else {
            "Status check results are ×: fix the failures above and run ferrule check again"
        }
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files of `k8s/base` the kustomization leaves out: Secrets install fills in.
    const PLACEHOLDERS: &[&str] = &["webhook-tls.yaml", "identity.yaml"];

    #[test]
    fn the_embedded_files_are_the_kustomization_s_resources_in_order() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../k8s/base/kustomization.yaml"
        );
        let k: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let listed: Vec<&str> = k["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        let embedded: Vec<&str> = BASE
            .iter()
            .map(|(f, _)| *f)
            .filter(|f| !PLACEHOLDERS.contains(f))
            .collect();
        assert_eq!(
            listed, embedded,
            "ferrule install must print what kubectl kustomize k8s/base renders"
        );
    }

    fn args(identity_dir: Option<&std::path::Path>) -> InstallArgs {
        InstallArgs {
            proxy_image: "r/proxy:1".into(),
            controller_image: "r/controller:1".into(),
            sidecar: "classic".into(),
            identity_dir: identity_dir.map(Into::into),
            identity: identity_dir.is_none().then(|| "none".into()),
            trust_domain: "cluster.local".into(),
        }
    }

    fn mesh_ca() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        crate::identity::create_ca(
            dir.path(),
            "cluster.local",
            std::time::Duration::from_secs(10 * 365 * 86400),
            std::time::Duration::from_secs(365 * 86400),
            false,
        )
        .unwrap();
        dir
    }

    #[test]
    fn install_fills_in_the_certificate_images_and_mode() {
        let ca = mesh_ca();
        let args = args(Some(ca.path()));
        let tls = webhook_tls().unwrap();
        let identity = args.identity().unwrap();
        let resources = install_resources(&args, &tls, &identity).unwrap();
        let find = |kind: &str| resources.iter().find(|r| r["kind"] == kind).unwrap();
        let secret = |name: &str| {
            resources
                .iter()
                .find(|r| r["kind"] == "Secret" && r["metadata"]["name"] == name)
                .unwrap()
        };
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            secret("ferrule-webhook-tls")["data"]["tls.crt"],
            json!(b64(&tls.cert_pem))
        );
        let hooks = find("MutatingWebhookConfiguration")["webhooks"].clone();
        assert_eq!(hooks.as_array().unwrap().len(), 2);
        for hook in hooks.as_array().unwrap() {
            assert_eq!(hook["clientConfig"]["caBundle"], json!(b64(&tls.ca_pem)));
        }
        let container = &find("Deployment")["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["image"], "r/controller:1");
        let args = container["args"].to_string();
        assert!(
            args.contains("--proxy-image=r/proxy:1") && args.contains("--sidecar=classic"),
            "{args}"
        );
        assert_eq!(args.matches("--proxy-image").count(), 1, "{args}");
        assert!(
            args.contains("--identity-dir=") && args.contains("--kubernetes-api="),
            "{args}"
        );
        // The Service names proxies dial, for TLS clients that check DNS names.
        assert!(
            args.contains("ferrule-controller.ferrule-system.svc,"),
            "{args}"
        );

        // The mesh CA's three files, never the anchor's key.
        let data = &secret("ferrule-identity")["data"];
        for name in IDENTITY_FILES {
            let file = std::fs::read_to_string(ca.path().join(name)).unwrap();
            assert_eq!(data[name], json!(b64(&file)), "{name}");
        }
        assert_eq!(data.as_object().unwrap().len(), 3, "{data}");
        assert!(!resources.iter().any(|r| r.to_string().contains(&b64(
            &std::fs::read_to_string(ca.path().join(crate::identity::ANCHOR_KEY)).unwrap()
        ))));

        assert_eq!(tls.cert_pem.matches("BEGIN CERTIFICATE").count(), 1);
        assert!(tls.key_pem.contains("PRIVATE KEY"));
        assert_ne!(tls.ca_pem, tls.cert_pem);
        // Two runs make two certificates.
        assert_ne!(webhook_tls().unwrap().key_pem, tls.key_pem);
    }

    #[test]
    fn without_a_mesh_ca_install_refuses_unless_told_none() {
        let mut none = args(None);
        none.identity = None;
        let err = none.identity().err().unwrap().to_string();
        assert!(
            err.contains("ferrule identity init --dir ./mesh-ca")
                && err.contains("--identity=none"),
            "{err}"
        );

        let empty = tempfile::tempdir().unwrap();
        let err = format!("{:#}", args(Some(empty.path())).identity().err().unwrap());
        assert!(err.contains("trust-anchors.pem"), "{err}");

        // A CA of another trust domain would stop the controller: refused here.
        let ca = mesh_ca();
        let mut other = args(Some(ca.path()));
        other.trust_domain = "example.org".into();
        let err = format!("{:#}", other.identity().err().unwrap());
        assert!(err.contains("example.org"), "{err}");

        // --identity=none: no Secret, and a controller that is no CA.
        let args = args(None);
        let identity = args.identity().unwrap();
        let resources = install_resources(&args, &webhook_tls().unwrap(), &identity).unwrap();
        assert!(
            !resources
                .iter()
                .any(|r| r["metadata"]["name"] == "ferrule-identity")
        );
        let deployment = resources
            .iter()
            .find(|r| r["kind"] == "Deployment")
            .unwrap();
        let text = deployment.to_string();
        assert!(
            !text.contains("identity")
                && !text.contains("--kubernetes-api")
                && !text.contains("--api-san"),
            "{text}"
        );
    }

    #[test]
    fn uninstall_deletes_the_webhook_first_and_the_namespace_last() {
        let r = uninstall_resources().unwrap();
        assert_eq!(r.first().unwrap()["kind"], "MutatingWebhookConfiguration");
        assert_eq!(r.last().unwrap()["kind"], "Namespace");
        assert_eq!(r.len(), base_resources().unwrap().len());
        for secret in r.iter().filter(|o| o["kind"] == "Secret") {
            for (_, value) in secret["data"].as_object().unwrap() {
                assert_eq!(value, "", "no key is made for deleting");
            }
        }
    }

    #[test]
    fn identity_check() {
        let deployment = |args: &[&str]| json!({"spec": {"template": {"spec": {"containers": [{"args": args}]}}}});
        let with_ca = deployment(&["--identity-dir=/var/run/ferrule/identity"]);
        let ca = mesh_ca();
        let b64 = |name: &str| {
            base64::engine::general_purpose::STANDARD
                .encode(std::fs::read_to_string(ca.path().join(name)).unwrap())
        };
        let secret = json!({"data": {
            "trust-anchors.pem": b64("trust-anchors.pem"),
            "issuer.pem": b64("issuer.pem"),
            "issuer.key": b64("issuer.key"),
        }});
        let now = 1_800_000_000;
        let real_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        match &check_identity(&with_ca, Some(&secret), real_now)[..] {
            [Check::Pass(what)] => assert!(what.contains("1 trust anchor"), "{what}"),
            other => panic!("{other:?}"),
        }
        // The issuer is valid for a year: near its end, a warning; after, a failure.
        let year = 365 * 86400;
        assert!(matches!(
            &check_identity(&with_ca, Some(&secret), real_now + year - 30 * 86400)[..],
            [Check::Warn(..)]
        ));
        assert!(matches!(
            &check_identity(&with_ca, Some(&secret), real_now + year + 86400)[..],
            [Check::Fail(what, _)] if what.contains("expired")
        ));
        match &check_identity(&with_ca, None, now)[..] {
            [Check::Fail(what, fix)] => {
                assert!(what.contains("ferrule-identity is missing"), "{what}");
                assert!(fix.contains("ferrule identity init"), "{fix}");
            }
            other => panic!("{other:?}"),
        }
        let mut half = secret.clone();
        half["data"]["issuer.key"] = json!("");
        assert!(matches!(
            &check_identity(&with_ca, Some(&half), now)[..],
            [Check::Fail(what, _)] if what.contains("issuer.key")
        ));
        assert!(matches!(
            &check_identity(&deployment(&[]), None, now)[..],
            [Check::Warn(what, _)] if what.contains("--identity=none")
        ));
    }

    #[test]
    fn proxy_certificates_check() {
        let overview = |certs: &[Value]| {
            let proxies: Vec<Value> = certs
                .iter()
                .enumerate()
                .map(|(i, c)| json!({"proxy_id": format!("p{i}"), "service": "user.shop", "certificate": c}))
                .collect();
            json!({ "proxies": proxies })
        };
        let fine = json!({"identity": "spiffe://cluster.local/ns/shop/sa/user", "not_after": 2_000_000_000, "problem": null});
        let problem = |code: &str| json!({"identity": "spiffe://cluster.local/ns/shop/sa/user", "problem": code});
        match &check_certificates(&overview(&[fine.clone(), Value::Null]))[..] {
            [Check::Pass(what)] => assert!(what.starts_with("1 proxy certificate"), "{what}"),
            other => panic!("{other:?}"),
        }
        let checks = check_certificates(&overview(&[
            fine,
            problem("expired"),
            problem("unknown_anchor"),
            problem("expires_soon"),
            problem("expired"),
        ]));
        match &checks[..] {
            [
                Check::Fail(expired, fix),
                Check::Fail(anchor, anchor_fix),
                Check::Warn(soon, _),
            ] => {
                assert!(
                    expired.contains("expired") && expired.contains("p1") && expired.contains("p4"),
                    "{expired}"
                );
                assert!(fix.contains("identity_renewal_failures"), "{fix}");
                assert!(
                    anchor.contains("anchor not in the trust bundle") && anchor.contains("p2"),
                    "{anchor}"
                );
                assert!(anchor_fix.contains("rotation"), "{anchor_fix}");
                assert!(
                    soon.contains("expires soon") && soon.contains("p3"),
                    "{soon}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &check_certificates(&json!({"error": "reading the store"}))[..],
            [Check::Fail(..)]
        ));
    }

    #[test]
    fn post_install_checks_read_the_controller_deployment_once() {
        let asked = std::cell::RefCell::new(Vec::new());
        let kubectl = |args: &[&str]| -> anyhow::Result<String> {
            let line = args.join(" ");
            asked.borrow_mut().push(line.clone());
            let answer = if line.starts_with("version") {
                json!({"serverVersion": {"major": "1", "minor": "31"}})
            } else if line.contains("deployment") || line.contains("statefulset") {
                json!({"status": {"readyReplicas": 3}, "spec": {"template": {"spec": {"containers": [{"args": []}]}}}})
            } else if line.contains("mutatingwebhookconfiguration") {
                json!({"webhooks": [{"clientConfig": {"caBundle": "LS0t"}}]})
            } else if line.contains("endpoints") {
                json!({"subsets": [{"addresses": [{"ip": "10.0.0.1"}]}]})
            } else if line.starts_with("get --raw") {
                json!({"proxies": [{"proxy_id": "p", "service": "user", "certificate": {"problem": "expired"}}]})
            } else {
                json!({"items": []})
            };
            Ok(answer.to_string())
        };
        let checks = run_checks(false, &kubectl);
        let asked = asked.into_inner();
        let deployments = asked.iter().filter(|a| a.contains("deployment")).count();
        assert_eq!(deployments, 1, "{asked:#?}");
        assert!(
            asked.contains(&format!("get --raw {OVERVIEW}")),
            "{asked:#?}"
        );
        assert!(
            checks
                .iter()
                .any(|c| matches!(c, Check::Fail(what, _) if what.contains("expired"))),
            "{checks:?}"
        );
    }

    #[test]
    fn version_check() {
        let v = |minor: &str| json!({"serverVersion": {"major": "1", "minor": minor, "gitVersion": "v1.x"}});
        assert!(matches!(check_version(&v("31")), Check::Pass(_)));
        assert!(matches!(check_version(&v("29+")), Check::Pass(_)));
        match check_version(&v("27")) {
            Check::Warn(_, fix) => assert!(fix.contains("--sidecar classic")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(check_version(&json!({})), Check::Fail(..)));
    }

    #[test]
    fn another_mesh_injector_fails_the_pre_check() {
        let hooks = |name: &str| {
            json!({"items": [{
                "metadata": {"name": name},
                "webhooks": [{"name": "x", "rules": [{"operations": ["CREATE"], "resources": ["pods"]}]}]
            }]})
        };
        assert!(matches!(
            check_other_injectors(&hooks("linkerd-proxy-injector-webhook-config")),
            Check::Fail(..)
        ));
        assert!(matches!(
            check_other_injectors(&hooks("ferrule-injector")),
            Check::Pass(_)
        ));
        assert!(matches!(
            check_other_injectors(&hooks("cert-thing")),
            Check::Warn(..)
        ));
        assert!(matches!(
            check_other_injectors(&json!({"items": []})),
            Check::Pass(_)
        ));
    }

    #[test]
    fn uninjected_pods_in_enabled_namespaces_fail() {
        let namespaces = json!({"items": [
            {"metadata": {"name": "shop", "labels": {"ferrule.io/inject": "enabled"}}},
            {"metadata": {"name": "other"}}
        ]});
        let pods = json!({"items": [
            {"metadata": {"namespace": "shop", "name": "user-1", "annotations": {"ferrule.io/proxy-version": ferrule_inject::pod::VERSION}}},
            {"metadata": {"namespace": "shop", "name": "user-2"}},
            {"metadata": {"namespace": "shop", "name": "gateway-1", "annotations": {"ferrule.io/inject": "disabled"}}},
            {"metadata": {"namespace": "other", "name": "x"}}
        ]});
        let checks = check_proxies(&pods, &namespaces);
        assert_eq!(checks[0], Check::Pass("1 injected pod(s)".into()));
        let fails: Vec<_> = checks
            .iter()
            .filter(|c| matches!(c, Check::Fail(..)))
            .collect();
        assert_eq!(fails.len(), 1);
        assert!(format!("{:?}", fails[0]).contains("shop/user-2"));
    }

    #[test]
    fn unreachable_cluster_fails_every_check_with_the_reason() {
        let kubectl = |_: &[&str]| -> anyhow::Result<String> {
            anyhow::bail!("The connection to the server localhost:8080 was refused")
        };
        let checks = run_checks(false, &kubectl);
        assert_eq!(checks.len(), 1, "one failure says it all: {checks:?}");
        for c in &checks {
            match c {
                Check::Fail(what, _) => assert!(what.contains("was refused"), "{what}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(!report(&checks));
    }

    #[test]
    fn webhook_without_ca_or_endpoints_fails() {
        let checks = check_webhook(
            &json!({"webhooks": [{"clientConfig": {}}]}),
            &json!({"subsets": []}),
        );
        assert!(
            checks.iter().all(|c| matches!(c, Check::Fail(..))),
            "{checks:?}"
        );
        let checks = check_webhook(
            &json!({"webhooks": [{"clientConfig": {"caBundle": "LS0t"}}]}),
            &json!({"subsets": [{"addresses": [{"ip": "10.0.0.1"}]}]}),
        );
        assert!(
            checks.iter().all(|c| matches!(c, Check::Pass(_))),
            "{checks:?}"
        );
    }
}
