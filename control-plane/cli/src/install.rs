//! `ferrule install`, `ferrule uninstall` and `ferrule check`: the control plane on Kubernetes.
//!
//! `install` prints the manifests of `k8s/base` (embedded in the binary, in the order of its
//! kustomization) with a fresh certificate for the injection webhook filled in, for
//! `| kubectl apply -f -`. `uninstall` prints the same objects in
//! reverse order (the webhook first, so no pod creation waits on a controller going away), for
//! `| kubectl delete -f -`. `check` asks the cluster through `kubectl` (the CLI has no
//! Kubernetes client of its own), and each check that fails says how to fix it.

use std::process::Command;

use anyhow::Context;
use base64::Engine;
use ferrule_inject::InjectConfig;
use serde_json::{Value, json};

/// `k8s/base`, file by file, in the order of `k8s/base/kustomization.yaml` (a test checks it),
/// with the webhook's certificate Secret (a placeholder the kustomization leaves out).
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
  ferrule install | kubectl apply -f -
  ferrule install --sidecar classic | kubectl apply -f -     # clusters older than 1.29
  ferrule install --proxy-image registry.example/ferrule/proxy:0.1.0 \\
      --controller-image registry.example/ferrule/controller:0.1.0 > ferrule.yaml

Prints the control plane (namespace ferrule-system: a 3-member etcd, the controller with the
injection webhook, RBAC) with a new self-signed certificate for the webhook, made now. Running
it again makes a new certificate; applying that replaces the old one. Then label a namespace
for injection: kubectl label namespace NAME ferrule.io/inject=enabled.

Identity is not installed yet: the mesh CA and mTLS between proxies exist (docs/identity.md),
but this does not yet make a trust anchor and issuer Secret, and the controller does not yet
accept service-account tokens, so injected proxies talk plaintext HTTP/2 to each other. See
docs/kubernetes.md.";

const UNINSTALL_EXAMPLES: &str = "Examples:
  ferrule uninstall | kubectl delete -f -

Prints the objects `ferrule install` creates, the webhook first and the namespace last. Pods injected
earlier keep their proxies until they are recreated (kubectl rollout restart) after
uninstalling; deleting the namespace ferrule-system also deletes etcd's volumes (its data).";

const CHECK_EXAMPLES: &str = "Examples:
  ferrule check --pre      # before install: cluster version, permissions, other injectors
  ferrule check            # after install: control plane, webhook, injected proxies

Asks the cluster through kubectl (its current context; --kubectl to use another binary).
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

/// The install manifests with the certificate, images and sidecar mode filled in.
fn install_resources(args: &InstallArgs, tls: &WebhookTls) -> anyhow::Result<Vec<Value>> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut resources = base_resources()?;
    let (mut secret, mut webhook, mut controller) = (false, false, false);
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
                controller = true;
            }
            _ => {}
        }
    }
    anyhow::ensure!(
        secret && webhook && controller,
        "the embedded manifests lack the webhook Secret, the webhook configuration or the \
         controller Deployment"
    );
    Ok(resources)
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
    let tls = webhook_tls().context("making the webhook certificate")?;
    let resources = install_resources(&args, &tls)?;
    let header = format!(
        "# Ferrule {} control plane, from `ferrule install` (k8s/base with a new webhook\n\
         # certificate). Apply with: kubectl apply -f -\n\
         # Identity is not installed yet: no trust anchor or issuer (docs/kubernetes.md).\n",
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
    out.push(Check::Warn(
        "proxy certificates are not checked: install does not set up identity in a cluster yet"
            .into(),
        "nothing to do".into(),
    ));
    out
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
    Ok(vec![check_ready(
        "controller (deployment ferrule-controller)",
        &controller,
        1,
        "kubectl -n ferrule-system logs deploy/ferrule-controller (an empty ferrule-webhook-tls \
         Secret stops it: install with `ferrule install`)",
    )])
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
            .filter(|f| *f != "webhook-tls.yaml")
            .collect();
        assert_eq!(
            listed, embedded,
            "ferrule install must print what kubectl kustomize k8s/base renders"
        );
    }

    #[test]
    fn install_fills_in_the_certificate_images_and_mode() {
        let args = InstallArgs {
            proxy_image: "r/proxy:1".into(),
            controller_image: "r/controller:1".into(),
            sidecar: "classic".into(),
        };
        let tls = webhook_tls().unwrap();
        let resources = install_resources(&args, &tls).unwrap();
        let find = |kind: &str| resources.iter().find(|r| r["kind"] == kind).unwrap();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(find("Secret")["data"]["tls.crt"], json!(b64(&tls.cert_pem)));
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

        assert_eq!(tls.cert_pem.matches("BEGIN CERTIFICATE").count(), 1);
        assert!(tls.key_pem.contains("PRIVATE KEY"));
        assert_ne!(tls.ca_pem, tls.cert_pem);
        // Two runs make two certificates.
        assert_ne!(webhook_tls().unwrap().key_pem, tls.key_pem);
    }

    #[test]
    fn uninstall_deletes_the_webhook_first_and_the_namespace_last() {
        let r = uninstall_resources().unwrap();
        assert_eq!(r.first().unwrap()["kind"], "MutatingWebhookConfiguration");
        assert_eq!(r.last().unwrap()["kind"], "Namespace");
        assert_eq!(r.len(), base_resources().unwrap().len());
        let secret = r.iter().find(|o| o["kind"] == "Secret").unwrap();
        assert_eq!(secret["data"]["tls.key"], "", "no key is made for deleting");
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
