//! Ferrule's sidecar injection: what a pod gets to join the mesh, decided in one place.
//!
//! [`Injector::plan`] looks at one pod (its `metadata` and `spec`, as the API server holds it)
//! and answers either why it is left alone ([`Skip`]) or the JSON Patch (RFC 6902) that adds the
//! proxy, the init container that writes the iptables rules, and the marker annotation. Bad
//! annotations are an [`InjectError`] naming the annotation, the value and what was expected.
//!
//! Two front ends share it: [`review`] answers an `admission.k8s.io/v1` AdmissionReview (the
//! controller's webhook serves it over HTTPS), and [`manifest`] rewrites YAML offline for
//! `ferrule inject` by applying the very same patch to each pod template it finds. The
//! contract with the proxy (its environment variables) and with `ferrule-proxy init` (its
//! flags) is written down in [`pod`] and in docs/kubernetes.md. [`anchors`] turns a trust
//! bundle file into the PEM text proxies get to verify the controller with.

pub mod anchors;
pub mod annotations;
pub mod manifest;
pub mod pod;
pub mod review;

pub use annotations::Annotations;
pub use pod::{InjectConfig, InjectError, Injector, Outcome, SidecarMode, Skip};
