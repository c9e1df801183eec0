//! `ferrule inject`: YAML in, injected YAML out.
//!
//! Every document of a multi-document stream is read (a `List`'s items too); a Pod is patched
//! at its root, a Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController or Job
//! at `spec.template`, a CronJob at `spec.jobTemplate.spec.template`, each with the same
//! [`Injector::plan`] the webhook uses. Anything else passes through unchanged. The output is
//! the documents again, `---`-separated, with keys sorted as `kubectl get -o yaml` prints them;
//! comments do not survive. What happened to each document is reported separately.

use serde_json::Value;

use crate::pod::{Injector, Outcome, SidecarMode, Skip};

/// What happened to one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// `kind/name`, as kubectl names it (`deployment/user`).
    pub resource: String,
    pub result: ReportResult,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReportResult {
    Injected {
        warnings: Vec<String>,
    },
    Skipped(Skip),
    /// Not a workload (a Service, a ConfigMap...): passed through.
    NotAWorkload,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.result {
            ReportResult::Injected { warnings } => {
                write!(f, "{} injected", self.resource)?;
                for w in warnings {
                    write!(f, "\n  warning: {w}")?;
                }
                Ok(())
            }
            ReportResult::Skipped(why) => write!(f, "{} skipped: {why}", self.resource),
            ReportResult::NotAWorkload => write!(f, "{} unchanged (not a workload)", self.resource),
        }
    }
}

/// Input `ferrule inject` refuses, naming the document and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    // The causes are part of the message (not `source`s), so that `{:#}` shows them once.
    #[error("document {document}: not valid YAML: {error}")]
    Yaml {
        document: usize,
        error: serde_yaml::Error,
    },
    #[error("document {document} ({resource}): {error}")]
    Inject {
        document: usize,
        resource: String,
        error: crate::InjectError,
    },
    #[error("document {document} ({resource}): {reason}")]
    Malformed {
        document: usize,
        resource: String,
        reason: String,
    },
}

/// Injects every workload in `yaml`; returns the new YAML and one report per resource.
pub fn inject(injector: &Injector, yaml: &str) -> Result<(String, Vec<Report>), ManifestError> {
    let mut docs = Vec::new();
    let mut reports = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let document = i + 1;
        let value: Value = serde::Deserialize::deserialize(doc)
            .map_err(|error| ManifestError::Yaml { document, error })?;
        if value.is_null() {
            continue; // an empty document, e.g. a leading `---`
        }
        let mut value = value;
        inject_resource(injector, &mut value, document, &mut reports)?;
        docs.push(value);
    }
    let mut out = String::new();
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml::to_string(doc).expect("JSON values serialize as YAML"));
    }
    Ok((out, reports))
}

fn inject_resource(
    injector: &Injector,
    resource: &mut Value,
    document: usize,
    reports: &mut Vec<Report>,
) -> Result<(), ManifestError> {
    let kind = resource
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let name = resource
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)");
    let label = format!("{}/{name}", kind.to_ascii_lowercase());
    let malformed = |reason: String| ManifestError::Malformed {
        document,
        resource: label.clone(),
        reason,
    };
    if kind.is_empty() {
        return Err(malformed(
            "has no kind: is this a Kubernetes resource?".into(),
        ));
    }
    if kind == "List" || (kind.ends_with("List") && resource.get("items").is_some()) {
        let items = resource
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| malformed("items is not a list".into()))?;
        for item in items {
            inject_resource(injector, item, document, reports)?;
        }
        return Ok(());
    }
    let template = match kind.as_str() {
        "Pod" => "",
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => "/spec/template",
        "CronJob" => "/spec/jobTemplate/spec/template",
        _ => {
            reports.push(Report {
                resource: label,
                result: ReportResult::NotAWorkload,
            });
            return Ok(());
        }
    };
    let pod = resource
        .pointer_mut(template)
        .ok_or_else(|| malformed(format!("has no {} (its pod template)", dotted(template))))?;
    let outcome = injector.plan(pod).map_err(|error| ManifestError::Inject {
        document,
        resource: label.clone(),
        error,
    })?;
    let result = match outcome {
        Outcome::Skip(why) => ReportResult::Skipped(why),
        Outcome::Inject {
            patch,
            mut warnings,
        } => {
            json_patch::patch(pod, &patch).map_err(|e| malformed(format!("patch failed: {e}")))?;
            if mode_of(pod) == Some(SidecarMode::Classic)
                && matches!(kind.as_str(), "Job" | "CronJob")
            {
                warnings.push(format!(
                    "a {kind} with a classic sidecar never completes: the proxy keeps running \
                     after the app exits; use the native sidecar (Kubernetes 1.29+)"
                ));
            }
            ReportResult::Injected { warnings }
        }
    };
    reports.push(Report {
        resource: label,
        result,
    });
    Ok(())
}

fn dotted(pointer: &str) -> String {
    pointer.trim_start_matches('/').replace('/', ".")
}

/// The sidecar mode a pod template ended up with, for reports and tests.
pub fn mode_of(pod: &Value) -> Option<SidecarMode> {
    let named =
        |c: &Value| c.get("name").and_then(Value::as_str) == Some(crate::pod::PROXY_CONTAINER);
    if pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(named))
    {
        Some(SidecarMode::Native)
    } else if pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(named))
    {
        Some(SidecarMode::Classic)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_document_and_resource() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n---\n\
                    apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n\
                    spec:\n  template:\n    metadata:\n      annotations: {ferrule.io/sidecar: sidecar}\n\
                    \x20   spec: {containers: [{name: a, image: b}]}\n";
        let err = inject(&Injector::default(), yaml).unwrap_err().to_string();
        assert!(err.starts_with("document 2 (deployment/web): "), "{err}");
        assert!(err.contains("ferrule.io/sidecar"), "{err}");
        assert_eq!(err.matches("unknown value").count(), 1, "said once: {err}");

        let err = inject(
            &Injector::default(),
            "kind: Deployment\nmetadata: {name: d}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("spec.template"), "{err}");
        let err = inject(&Injector::default(), "a: [")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid YAML"), "{err}");
    }
}
