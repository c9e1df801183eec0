//! The webhook's answers to bad input: each names the problem, none panics.

use ferrule_inject::Injector;
use ferrule_inject::review::review;
use serde_json::{Value, json};

fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "generateName": "web-", "labels": { "app": "web" }, "annotations": annotations },
        "spec": { "containers": [{ "name": "web", "image": "example/web:1" }] },
    })
}

fn request(object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "object": object,
        }
    })
}

fn answer(body: &Value) -> Value {
    review(&Injector::default(), body.to_string().as_bytes())
        .expect("a review with a uid is answered")
}

fn denied_message(response: &Value) -> String {
    assert_eq!(
        response["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(response["response"]["allowed"], false, "{response}");
    assert_eq!(response["response"]["status"]["code"], 400);
    assert!(response["response"].get("patch").is_none());
    response["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn malformed_reviews_are_refused_with_the_reason() {
    let cases: &[(&[u8], &str)] = &[
        (b"not json", "not JSON"),
        (b"{}", "apiVersion"),
        (br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#, "v1beta1"),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"Pod"}"#, "not AdmissionReview"),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#, "request is missing"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"kind":{}}}"#,
            "request.uid",
        ),
    ];
    for (body, named) in cases {
        let err = review(&Injector::default(), body).unwrap_err().to_string();
        assert!(err.contains("malformed AdmissionReview"), "{err}");
        assert!(
            err.contains(named),
            "{}: {err}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn a_review_without_a_pod_is_denied_naming_the_field() {
    let mut body = request(json!(null));
    body["request"].as_object_mut().unwrap().remove("object");
    assert!(denied_message(&answer(&body)).contains("request.object"));

    let mut body = request(pod(json!({})));
    body["request"]["kind"] = json!({ "group": "apps", "version": "v1", "kind": "Deployment" });
    let message = denied_message(&answer(&body));
    assert!(message.contains("only handles core/v1 Pod"), "{message}");

    let mut no_spec = pod(json!({}));
    no_spec.as_object_mut().unwrap().remove("spec");
    let message = denied_message(&answer(&request(no_spec)));
    assert!(message.contains("spec is missing"), "{message}");
}

#[test]
fn an_unknown_annotation_value_is_denied_naming_it() {
    let message = denied_message(&answer(&request(pod(
        json!({ "ferrule.io/inject": "yes" }),
    ))));
    assert!(message.contains("ferrule.io/inject"), "{message}");
    assert!(message.contains("\"yes\""), "{message}");
    assert!(
        message.contains("enabled, disabled or identity"),
        "{message}"
    );
    assert!(message.contains("shop/web-*"), "names the pod: {message}");
}

#[test]
fn conflicting_annotations_are_denied_naming_both() {
    let message = denied_message(&answer(&request(pod(json!({
        "ferrule.io/skip-inbound-ports": "5432",
        "ferrule.io/opaque-ports": "5432,6379",
    })))));
    assert!(
        message.contains("ferrule.io/skip-inbound-ports"),
        "{message}"
    );
    assert!(message.contains("ferrule.io/opaque-ports"), "{message}");
    assert!(message.contains("5432"), "{message}");
}

#[test]
fn other_operations_and_skipped_pods_are_allowed_unchanged() {
    let mut update = request(pod(json!({})));
    update["request"]["operation"] = json!("UPDATE");
    let skipped = request(pod(json!({ "ferrule.io/inject": "disabled" })));
    let mut host = pod(json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    for body in [update, skipped, request(host)] {
        let response = answer(&body);
        assert_eq!(response["response"]["allowed"], true, "{response}");
        assert!(response["response"].get("patch").is_none(), "{response}");
    }
}

#[test]
fn an_injected_pod_carries_warnings() {
    let response = answer(&request(pod(json!({ "ferrule.io/injct": "enabled" }))));
    assert_eq!(response["response"]["allowed"], true);
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let warnings = response["response"]["warnings"].to_string();
    assert!(warnings.contains("ferrule.io/injct"), "{warnings}");
}
