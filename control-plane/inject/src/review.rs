//! The admission webhook's logic: an `admission.k8s.io/v1` AdmissionReview in, one out.
//!
//! What each request gets (the HTTP server around it is the controller's `webhook` module):
//!
//! * a body that is not an AdmissionReview v1 with a request uid: [`BadReview`], which the
//!   server answers with HTTP 400 and the reason (no review can be answered without the uid;
//!   the API server then applies the webhook's `failurePolicy`);
//! * a review of anything but a Pod, or without a pod object: `allowed: false` with a
//!   status message naming the problem (a misconfigured webhook should be noticed);
//! * operations other than CREATE: allowed, unchanged;
//! * a pod with bad `ferrule.io/` annotations (an unknown value, conflicting annotations):
//!   `allowed: false`, code 400, the message naming the annotation. Refusing is deliberate: a
//!   pod admitted without its proxy would run outside the mesh with nobody told;
//! * a pod left alone ([`crate::Skip`]): allowed, unchanged;
//! * otherwise allowed with the JSON Patch of [`crate::Injector::plan`] and its warnings.

use base64::Engine;
use serde_json::{Value, json};

use crate::pod::{Injector, Outcome};

pub const API_VERSION: &str = "admission.k8s.io/v1";

/// A body no AdmissionReview response can be made for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed AdmissionReview: {0}")]
pub struct BadReview(pub String);

/// Answers one AdmissionReview body.
pub fn review(injector: &Injector, body: &[u8]) -> Result<Value, BadReview> {
    let review: Value = serde_json::from_slice(body)
        .map_err(|e| BadReview(format!("the body is not JSON: {e}")))?;
    let field = |name: &str| review.get(name).and_then(Value::as_str);
    match field("apiVersion") {
        Some(API_VERSION) => {}
        other => {
            return Err(BadReview(format!(
                "apiVersion is {other:?}; this webhook speaks {API_VERSION} (set \
                 admissionReviewVersions: [v1])"
            )));
        }
    }
    if field("kind") != Some("AdmissionReview") {
        return Err(BadReview(format!(
            "kind is {:?}, not AdmissionReview",
            field("kind")
        )));
    }
    let request = review
        .get("request")
        .filter(|r| r.is_object())
        .ok_or_else(|| BadReview("request is missing".into()))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| BadReview("request.uid is missing".into()))?;
    Ok(wrap(respond(injector, request, uid)))
}

fn respond(injector: &Injector, request: &Value, uid: &str) -> Value {
    let kind = request.pointer("/kind/kind").and_then(Value::as_str);
    let group = request
        .pointer("/kind/group")
        .and_then(Value::as_str)
        .unwrap_or("");
    if kind != Some("Pod") || !group.is_empty() {
        return deny(
            uid,
            &format!(
                "request.kind is {}, but the ferrule injector only handles core/v1 Pod: check \
                 the rules of the MutatingWebhookConfiguration",
                request
                    .get("kind")
                    .map(Value::to_string)
                    .unwrap_or_else(|| "missing".into())
            ),
        );
    }
    let operation = request.get("operation").and_then(Value::as_str);
    if operation != Some("CREATE") {
        return allow(uid);
    }
    let Some(pod) = request.get("object").filter(|o| o.is_object()) else {
        return deny(
            uid,
            "request.object is missing or not an object: no pod to inject",
        );
    };
    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .or_else(|| pod.pointer("/metadata/namespace").and_then(Value::as_str))
        .unwrap_or("default");
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            pod.pointer("/metadata/generateName")
                .and_then(Value::as_str)
                .map(|g| format!("{g}*"))
        })
        .unwrap_or_else(|| "(unnamed)".into());
    match injector.plan(pod) {
        Ok(Outcome::Skip(_)) => allow(uid),
        Ok(Outcome::Inject { patch, warnings }) => {
            let patch = serde_json::to_vec(&patch).expect("a JSON Patch serializes");
            let mut response = allow(uid);
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
            if !warnings.is_empty() {
                response["warnings"] = json!(warnings);
            }
            response
        }
        Err(e) => deny(
            uid,
            &format!("ferrule injection refused pod {namespace}/{name}: {e}"),
        ),
    }
}

fn allow(uid: &str) -> Value {
    json!({ "uid": uid, "allowed": true })
}

fn deny(uid: &str, message: &str) -> Value {
    json!({
        "uid": uid,
        "allowed": false,
        "status": { "status": "Failure", "code": 400, "reason": "BadRequest", "message": message },
    })
}

fn wrap(response: Value) -> Value {
    json!({ "apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response })
}

/// The patch of a response, decoded (for tests and `ferrule check`).
pub fn decode_patch(response: &Value) -> Option<json_patch::Patch> {
    let text = response.pointer("/response/patch")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}
