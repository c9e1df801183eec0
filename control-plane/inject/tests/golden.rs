//! Golden files: `ferrule inject`'s output and the webhook's AdmissionReview response for the
//! pods under `tests/golden/input/` must match `tests/golden/expected/`, and the webhook's
//! patch applied to each pod must give exactly the pod `ferrule inject` wrote.
//!
//! After an intended change, re-bless with `FERRULE_BLESS=1 cargo test -p ferrule-inject
//! --test golden` and review the diff. `make test` also validates the expected YAML against
//! the Kubernetes schemas (kubernetes-validate, see k8s/validate.sh).

use std::path::{Path, PathBuf};

use ferrule_inject::manifest;
use ferrule_inject::review::{decode_patch, review};
use ferrule_inject::{InjectConfig, Injector};
use serde_json::{Value, json};

/// A mesh's trust anchor (`ferrule identity init`'s trust-anchors.pem, certificate only),
/// fixed so the golden files are.
const ANCHORS: &str = include_str!("golden/trust-anchors.pem");

fn injector() -> Injector {
    Injector::new(InjectConfig {
        proxy_image: "ferrule/proxy:golden".into(),
        proxy_version: "golden".into(),
        trust_anchors_pem: Some(ANCHORS.into()),
        ..InjectConfig::default()
    })
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compares `actual` with the expected file, or writes it when blessing.
fn check(name: &str, actual: &str) {
    let path = golden_dir().join("expected").join(name);
    if std::env::var_os("FERRULE_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with FERRULE_BLESS=1 to create it",
            path.display()
        )
    });
    pretty_assertions::assert_eq!(
        expected,
        actual,
        "{name} differs from its golden file; if the change is intended, re-bless with \
         FERRULE_BLESS=1"
    );
}

/// The injected proxy (a native sidecar: an init container) of `pod`.
fn proxy_container(pod: &Value) -> &Value {
    pod["spec"]["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .find(|c| c["name"] == ferrule_inject::pod::PROXY_CONTAINER)
        .expect("the proxy container")
}

/// Every pod (template) in a document stream, with the namespace it would be created in.
fn pods(yaml: &str) -> Vec<(String, Value)> {
    fn walk(doc: &Value, out: &mut Vec<(String, Value)>) {
        let kind = doc["kind"].as_str().unwrap_or("");
        let ns = doc
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let template = match kind {
            "List" => {
                for item in doc["items"].as_array().unwrap() {
                    walk(item, out);
                }
                return;
            }
            "Pod" => "",
            "CronJob" => "/spec/jobTemplate/spec/template",
            "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => "/spec/template",
            _ => return,
        };
        let mut pod = doc.pointer(template).unwrap().clone();
        if kind != "Pod" {
            // What the API server hands the webhook: a pod made from the template.
            pod["metadata"]["generateName"] = json!(format!("{name}-"));
        }
        out.push((ns, pod));
    }
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
        if !doc.is_null() {
            walk(&doc, &mut out);
        }
    }
    out
}

fn admission_review(uid: &str, namespace: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": { "apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions" },
        }
    })
}

fn run_golden(input: &str) {
    let stem = input.trim_end_matches(".yaml");
    let yaml = std::fs::read_to_string(golden_dir().join("input").join(input)).unwrap();
    let injector = injector();

    let (out, reports) = manifest::inject(&injector, &yaml).unwrap();
    check(&format!("{stem}.yaml"), &out);
    let report: String = reports.iter().map(|r| format!("{r}\n")).collect();
    check(&format!("{stem}.report.txt"), &report);

    let before = pods(&yaml);
    let after = pods(&out);
    assert_eq!(before.len(), after.len());
    let mut responses = Vec::new();
    for (i, ((ns, pod), (_, injected))) in before.iter().zip(&after).enumerate() {
        let body = admission_review(&format!("{stem}-{i}"), ns, pod);
        let response = review(&injector, body.to_string().as_bytes()).unwrap();
        assert_eq!(response["response"]["uid"], json!(format!("{stem}-{i}")));
        assert_eq!(response["response"]["allowed"], json!(true), "{response}");
        let mut patched = pod.clone();
        if let Some(patch) = decode_patch(&response) {
            json_patch::patch(&mut patched, &patch).unwrap();
        }
        pretty_assertions::assert_eq!(
            &patched,
            injected,
            "the webhook's patch and `ferrule inject` disagree on pod {i} of {input}"
        );
        // Show the patch decoded: base64 hides what changed.
        let mut shown = response.clone();
        if let Some(patch) = decode_patch(&response) {
            shown["response"]["patch"] = serde_json::to_value(patch).unwrap();
        }
        responses.push(shown);
    }
    check(
        &format!("{stem}.review.json"),
        &(serde_json::to_string_pretty(&responses).unwrap() + "\n"),
    );
}

#[test]
fn deployment() {
    run_golden("deployment.yaml");
}

#[test]
fn statefulset() {
    run_golden("statefulset.yaml");
}

#[test]
fn pod_with_probes() {
    run_golden("pod-probes.yaml");
}

#[test]
fn pod_with_named_ports_classic() {
    run_golden("pod-named-ports.yaml");
}

#[test]
fn already_injected_is_left_alone() {
    run_golden("pod-injected.yaml");
    let yaml = std::fs::read_to_string(golden_dir().join("input/pod-injected.yaml")).unwrap();
    let (out, _) = manifest::inject(&injector(), &yaml).unwrap();
    let again = manifest::inject(&injector(), &out).unwrap().0;
    assert_eq!(out, again, "a second injection changes nothing");
}

#[test]
fn opted_out_is_left_alone() {
    run_golden("pod-opted-out.yaml");
}

#[test]
fn list_job_cronjob_daemonset() {
    run_golden("list.yaml");
}

#[test]
fn gateway_gets_an_identity_only() {
    run_golden("gateway-identity.yaml");
}

/// The trust anchors reach the proxy alone, as PEM text the proxy reads
/// (`FERRULE_IDENTITY_TRUST_ANCHORS_PEM`); without anchors nothing of them is added.
#[test]
fn the_trust_anchors_reach_the_proxy() {
    let yaml = std::fs::read_to_string(golden_dir().join("input/deployment.yaml")).unwrap();
    let (out, _) = manifest::inject(&injector(), &yaml).unwrap();
    let (_, pod) = pods(&out).remove(0);
    let proxy = proxy_container(&pod);
    assert!(
        proxy["env"]
            .as_array()
            .unwrap()
            .contains(&json!({ "name": ferrule_inject::pod::TRUST_ANCHORS_ENV, "value": ANCHORS })),
        "{proxy}"
    );
    for app in pod["spec"]["containers"].as_array().unwrap() {
        assert!(!app.to_string().contains("TRUST_ANCHORS"), "{app}");
    }

    let without = Injector::new(InjectConfig::default());
    let (out, _) = manifest::inject(&without, &yaml).unwrap();
    assert!(
        !out.contains(ferrule_inject::pod::TRUST_ANCHORS_ENV),
        "{out}"
    );
}

/// `ferrule.io/inject: identity` is for a pod that is one proxy: a second container (an app
/// that would see the token) is refused naming the annotation; without identity the pod is
/// left alone; an env var the patch sets is not silently overridden.
#[test]
fn identity_only_needs_one_container_and_identity() {
    let pod = |containers: Value| {
        json!({
            "metadata": { "annotations": { "ferrule.io/inject": "identity" } },
            "spec": { "containers": containers },
        })
    };
    let one = pod(json!([{ "name": "gateway", "image": "ferrule/proxy:0.1.0" }]));
    let two = pod(json!([
        { "name": "gateway", "image": "ferrule/proxy:0.1.0" },
        { "name": "app", "image": "app:1" },
    ]));
    let e = injector().plan(&two).unwrap_err().to_string();
    assert!(
        e.contains("ferrule.io/inject") && e.contains("2 containers"),
        "{e}"
    );
    let plain = Injector::new(InjectConfig {
        token_audience: None,
        ..InjectConfig::default()
    });
    assert_eq!(
        plain.plan(&one).unwrap(),
        ferrule_inject::Outcome::Skip(ferrule_inject::Skip::NoIdentity)
    );
    let clash = pod(json!([{
        "name": "gateway",
        "image": "ferrule/proxy:0.1.0",
        "env": [{ "name": "FERRULE_TRUST_DOMAIN", "value": "other.org" }],
    }]));
    let e = injector().plan(&clash).unwrap_err().to_string();
    assert!(
        e.contains("spec.containers[0].env") && e.contains("FERRULE_TRUST_DOMAIN"),
        "{e}"
    );
}

#[test]
fn injecting_twice_changes_nothing() {
    let yaml = std::fs::read_to_string(golden_dir().join("input/deployment.yaml")).unwrap();
    let (once, _) = manifest::inject(&injector(), &yaml).unwrap();
    let (twice, reports) = manifest::inject(&injector(), &once).unwrap();
    assert_eq!(once, twice);
    assert!(
        reports[0].to_string().contains("already injected"),
        "{}",
        reports[0]
    );
}

/// With identity (the default), the projected service-account token reaches the proxy alone;
/// without, nothing of it is added.
#[test]
fn the_service_account_token_is_the_proxy_s_alone() {
    let yaml = std::fs::read_to_string(golden_dir().join("input/deployment.yaml")).unwrap();
    let (out, _) = manifest::inject(&injector(), &yaml).unwrap();
    let (_, pod) = pods(&out).remove(0);
    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == ferrule_inject::pod::TOKEN_VOLUME)
        .expect("a token volume");
    assert_eq!(
        volume["projected"]["sources"][0]["serviceAccountToken"],
        json!({ "audience": "ferrule", "expirationSeconds": 86400, "path": "token" })
    );
    let proxy = proxy_container(&pod);
    assert!(
        proxy["env"].as_array().unwrap().contains(
            &json!({ "name": "FERRULE_IDENTITY_TOKEN_FILE", "value": ferrule_inject::pod::TOKEN_FILE })
        ),
        "{proxy}"
    );
    assert_eq!(proxy["volumeMounts"][0]["readOnly"], json!(true));
    for app in pod["spec"]["containers"].as_array().unwrap() {
        assert!(
            !app.to_string().contains(ferrule_inject::pod::TOKEN_VOLUME),
            "an app container sees the token: {app}"
        );
    }

    let plain = Injector::new(InjectConfig {
        token_audience: None,
        ..InjectConfig::default()
    });
    let (out, _) = manifest::inject(&plain, &yaml).unwrap();
    assert!(!out.contains("ferrule-identity-token"), "{out}");
    assert!(!out.contains("FERRULE_IDENTITY_TOKEN_FILE"), "{out}");
}
