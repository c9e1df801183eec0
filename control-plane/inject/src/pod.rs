//! The pod patch: what injection adds to a pod, and when it leaves one alone.
//!
//! An injected pod gets, at the head of `spec.initContainers`:
//!
//! 1. `ferrule-init`: `ferrule-proxy init --inbound-port 4143 --outbound-port 4140
//!    --proxy-uid 2102 --skip-inbound-ports LIST [--skip-outbound-ports LIST]`, as root with
//!    `NET_ADMIN` and `NET_RAW` only, writing the pod's iptables rules (an `emptyDir` on `/run`
//!    holds the xtables lock, the root filesystem stays read-only);
//! 2. `ferrule-proxy`, the proxy as a native sidecar (`restartPolicy: Always`) with a
//!    `startupProbe` on its `/ready`, so the app's containers start only once the proxy is
//!    ready. In classic mode (`--classic`, `ferrule.io/sidecar: classic`, for clusters older
//!    than 1.29) the proxy is instead the first entry of `spec.containers`.
//!
//! The proxy is configured through environment variables (the contract with `ferrule-proxy`):
//! `FERRULE_CONTROLLER`, `FERRULE_PROXY_TRANSPARENT=true`, `FERRULE_PROXY_NAMESPACE` and
//! `FERRULE_PROXY_SERVICE_ACCOUNT` from the downward API (the identity the proxy asks a
//! certificate for), `FERRULE_PROXY_ID` (`<pod>.<namespace>`), `FERRULE_PROXY_ADVERTISE_IP`
//! (the pod IP), `FERRULE_PROXY_SERVICE`, `FERRULE_PROXY_APP_PORTS` (the app containers' TCP
//! ports, by their names) and `FERRULE_PROXY_OPAQUE_PORTS`.
//!
//! With identity ([`InjectConfig::token_audience`]), the pod also gets a projected
//! service-account token for that audience (a volume the kubelet refreshes), mounted
//! read-only into the proxy only, `FERRULE_TRUST_DOMAIN`, and `FERRULE_IDENTITY_TOKEN_FILE`
//! naming the token: the proxy's
//! bootstrap credential, which the controller checks with a TokenReview. The app's containers
//! never see it.
//!
//! The app's probes are left as they are: the kubelet's probe connections are redirected to
//! the proxy's inbound listener like any other, and it forwards them to the app's port, so an
//! `httpGet` probe still asks the app. A `tcpSocket` probe would only reach the proxy, which
//! accepts whether the app listens or not; injection says so in a warning.

use std::collections::BTreeSet;

use ferrule_proto::ports;
use serde_json::{Value, json};

use crate::annotations::{self, Annotations};

/// UID the proxy runs as; the iptables rules let its own traffic out unredirected.
pub const PROXY_UID: u32 = 2102;
/// Inbound ports never redirected to the proxy: its admin listener (the kubelet probes it).
pub const DEFAULT_SKIP_INBOUND_PORTS: &[u16] = &[ports::PROXY_ADMIN];
/// Outbound ports never redirected: none by default (the proxy's own traffic is exempt by UID).
pub const DEFAULT_SKIP_OUTBOUND_PORTS: &[u16] = &[];
/// Server-speaks-first ports: SMTP, submission, MySQL, PostgreSQL, Redis, memcached.
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 5432, 6379, 11211];
/// The names injection gives the containers it adds.
pub const PROXY_CONTAINER: &str = "ferrule-proxy";
pub const INIT_CONTAINER: &str = "ferrule-init";
const XTABLES_VOLUME: &str = "ferrule-init-xtables";
/// The projected service-account token volume, and where the proxy finds the token.
pub const TOKEN_VOLUME: &str = "ferrule-identity-token";
pub const TOKEN_DIR: &str = "/var/run/secrets/ferrule.io/identity";
pub const TOKEN_FILE: &str = "/var/run/secrets/ferrule.io/identity/token";
/// The audience of the proxies' tokens unless configured otherwise (the controller's
/// `--token-audience`).
pub const DEFAULT_TOKEN_AUDIENCE: &str = "ferrule";
/// How long a projected token is valid; the kubelet replaces it at 80 % of that. The proxy
/// needs it only for its first certificate (renewals prove the identity with the current one).
pub const TOKEN_EXPIRATION_SECONDS: u32 = 24 * 3600;

/// How the proxy runs beside the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29 and later).
    #[default]
    Native,
    /// A regular container listed first (older clusters; the app may start before the proxy).
    Classic,
}

/// What every injected pod shares: set by the webhook's flags or `ferrule inject`'s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The image of `ferrule-proxy` (it also runs `ferrule-proxy init`).
    pub proxy_image: String,
    pub image_pull_policy: String,
    /// The controller's gRPC address(es) as proxies in the cluster dial them.
    pub controller: String,
    /// The default sidecar mode; `ferrule.io/sidecar` overrides it per pod.
    pub mode: SidecarMode,
    /// Written to `ferrule.io/proxy-version`.
    pub proxy_version: String,
    /// With identity: the audience of the projected service-account token the proxy gets as
    /// its bootstrap credential. `None`: no token, the proxy runs without identity (for a
    /// controller that is no CA or does not check service-account tokens).
    pub token_audience: Option<String>,
    /// The mesh's trust domain (the controller's `--trust-domain`), passed to the proxy as
    /// `FERRULE_TRUST_DOMAIN` with the token: the identity it asks for is in it.
    pub trust_domain: String,
}

/// The version of this build: the default image tag and `ferrule.io/proxy-version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            proxy_image: format!("ferrule/proxy:{VERSION}"),
            image_pull_policy: "IfNotPresent".into(),
            controller: format!(
                "ferrule-controller.ferrule-system.svc:{}",
                ports::CONTROLLER_GRPC
            ),
            mode: SidecarMode::Native,
            proxy_version: VERSION.into(),
            token_audience: Some(DEFAULT_TOKEN_AUDIENCE.into()),
            trust_domain: ferrule_proto::identity::DEFAULT_TRUST_DOMAIN.into(),
        }
    }
}

/// Why a pod was left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `ferrule.io/inject: disabled`.
    Disabled,
    /// It already carries `ferrule.io/proxy-version` or a container injection adds.
    AlreadyInjected,
    /// It shares the node's network namespace: rules written there would capture the node's
    /// traffic.
    HostNetwork,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::Disabled => "ferrule.io/inject is disabled",
            Skip::AlreadyInjected => "already injected",
            Skip::HostNetwork => "hostNetwork pods are never injected (the iptables rules would capture the node's traffic)",
        })
    }
}

/// What to do with one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Apply `patch` (paths relative to the pod: `/metadata/...`, `/spec/...`).
    Inject {
        patch: json_patch::Patch,
        /// Things the user should know (a `tcpSocket` probe, an unknown annotation...).
        warnings: Vec<String>,
    },
    Skip(Skip),
}

/// A pod injection refuses, with the field or annotation at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("annotation {annotation}: {value:?}: {reason}")]
    BadAnnotation {
        annotation: &'static str,
        value: String,
        reason: String,
    },
    #[error("annotations {first} and {second} conflict: {reason}")]
    Conflict {
        first: &'static str,
        second: &'static str,
        reason: String,
    },
    #[error("{field} {reason}")]
    Malformed { field: String, reason: String },
}

/// Decides and builds the patch for pods, with one [`InjectConfig`].
#[derive(Debug, Clone, Default)]
pub struct Injector {
    config: InjectConfig,
}

impl Injector {
    pub fn new(config: InjectConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &InjectConfig {
        &self.config
    }

    /// Looks at one pod (or pod template: an object with `metadata` and `spec`).
    pub fn plan(&self, pod: &Value) -> Result<Outcome, InjectError> {
        let metadata = pod.get("metadata");
        if metadata.is_some_and(|m| !m.is_object()) {
            return Err(malformed("metadata", "is not an object"));
        }
        let annotations = Annotations::parse(metadata.and_then(|m| m.get("annotations")))?;
        let spec = pod
            .get("spec")
            .ok_or_else(|| malformed("spec", "is missing"))?;
        let spec = spec
            .as_object()
            .ok_or_else(|| malformed("spec", "is not an object"))?;
        let containers = match spec.get("containers") {
            Some(Value::Array(c)) if !c.is_empty() => c,
            Some(Value::Array(_)) | None => {
                return Err(malformed(
                    "spec.containers",
                    "is empty: a pod needs a container",
                ));
            }
            Some(_) => return Err(malformed("spec.containers", "is not a list")),
        };
        let init_containers = match spec.get("initContainers") {
            None | Some(Value::Null) => None,
            Some(Value::Array(c)) => Some(c),
            Some(_) => return Err(malformed("spec.initContainers", "is not a list")),
        };
        if spec
            .get("volumes")
            .is_some_and(|v| !v.is_array() && !v.is_null())
        {
            return Err(malformed("spec.volumes", "is not a list"));
        }

        if annotations.inject == Some(false) {
            return Ok(Outcome::Skip(Skip::Disabled));
        }
        let ours = |c: &Value| {
            matches!(
                c.get("name").and_then(Value::as_str),
                Some(PROXY_CONTAINER | INIT_CONTAINER)
            )
        };
        if annotations.proxy_version.is_some()
            || containers.iter().any(ours)
            || init_containers.is_some_and(|c| c.iter().any(ours))
        {
            return Ok(Outcome::Skip(Skip::AlreadyInjected));
        }
        if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
            return Ok(Outcome::Skip(Skip::HostNetwork));
        }

        let mut warnings: Vec<String> = annotations
            .unknown
            .iter()
            .map(|a| format!("annotation {a} is not one Ferrule knows; it was ignored"))
            .collect();
        let mode = annotations.sidecar.unwrap_or(self.config.mode);
        let service = self.service(metadata, &annotations, &mut warnings);
        let mut app_ports = app_ports(containers, &mut warnings)?;
        // A skipped port never reaches the proxy: it is not the proxy's to register.
        app_ports.retain(|(_, port)| !annotations.skip_inbound_ports.contains(port));
        for c in containers {
            tcp_probe_warnings(c, &mut warnings);
        }
        if mode == SidecarMode::Classic && init_containers.is_some_and(|c| !c.is_empty()) {
            warnings.push(
                "classic sidecar: the pod's own init containers run before the proxy, with \
                 their outbound TCP already redirected to it; list the ports they dial in \
                 ferrule.io/skip-outbound-ports"
                    .into(),
            );
        }

        let proxy = self.proxy_container(mode, service.as_deref(), &app_ports, &annotations);
        let init = self.init_container(&annotations);
        let mut ops = Vec::new();
        let marker = (
            annotations::PROXY_VERSION,
            self.config.proxy_version.clone(),
        );
        match metadata {
            None => ops.push(add(
                "/metadata",
                json!({ "annotations": { marker.0: marker.1 } }),
            )),
            Some(m) if m.get("annotations").is_none_or(Value::is_null) => {
                ops.push(add("/metadata/annotations", json!({ marker.0: marker.1 })))
            }
            Some(_) => ops.push(add(
                &format!("/metadata/annotations/{}", escape(marker.0)),
                json!(marker.1),
            )),
        }
        let mut volumes = vec![json!({ "name": XTABLES_VOLUME, "emptyDir": {} })];
        if let Some(audience) = &self.config.token_audience {
            volumes.push(json!({
                "name": TOKEN_VOLUME,
                "projected": { "sources": [{ "serviceAccountToken": {
                    "audience": audience,
                    "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                    "path": "token",
                } }] },
            }));
        }
        match spec.get("volumes") {
            Some(Value::Array(_)) => {
                ops.extend(volumes.into_iter().map(|v| add("/spec/volumes/-", v)))
            }
            _ => ops.push(add("/spec/volumes", Value::Array(volumes))),
        }
        match (init_containers, mode) {
            (None, SidecarMode::Native) => {
                ops.push(add("/spec/initContainers", json!([init, proxy])));
            }
            (Some(_), SidecarMode::Native) => {
                ops.push(add("/spec/initContainers/0", init));
                ops.push(add("/spec/initContainers/1", proxy));
            }
            (None, SidecarMode::Classic) => {
                ops.push(add("/spec/initContainers", json!([init])));
                ops.push(add("/spec/containers/0", proxy));
            }
            (Some(_), SidecarMode::Classic) => {
                ops.push(add("/spec/initContainers/0", init));
                ops.push(add("/spec/containers/0", proxy));
            }
        }
        let patch = serde_json::from_value(Value::Array(ops))
            .expect("the ops built above are valid JSON Patch operations");
        Ok(Outcome::Inject { patch, warnings })
    }

    /// The mesh service: `ferrule.io/service`, else the `app.kubernetes.io/name` or `app`
    /// label when it is a valid service name.
    fn service(
        &self,
        metadata: Option<&Value>,
        annotations: &Annotations,
        warnings: &mut Vec<String>,
    ) -> Option<String> {
        if let Some(s) = &annotations.service {
            return Some(s.clone());
        }
        let labels = metadata.and_then(|m| m.get("labels"));
        for label in ["app.kubernetes.io/name", "app"] {
            if let Some(name) = labels.and_then(|l| l.get(label)).and_then(Value::as_str) {
                if ferrule_proto::names::validate_service(name).is_ok() {
                    return Some(name.to_string());
                }
                warnings.push(format!(
                    "label {label}={name:?} is not a valid service name; set ferrule.io/service"
                ));
            }
        }
        warnings.push(
            "no ferrule.io/service annotation nor app.kubernetes.io/name or app label: the \
             proxy registers no service, so the mesh cannot route to this pod"
                .into(),
        );
        None
    }

    fn proxy_container(
        &self,
        mode: SidecarMode,
        service: Option<&str>,
        app_ports: &[(String, u16)],
        annotations: &Annotations,
    ) -> Value {
        let opaque: BTreeSet<u16> = DEFAULT_OPAQUE_PORTS
            .iter()
            .copied()
            .chain(annotations.opaque_ports.iter().copied())
            .collect();
        let field = |path: &str| json!({ "fieldRef": { "fieldPath": path } });
        let mut env = vec![
            json!({ "name": "FERRULE_CONTROLLER", "value": self.config.controller }),
            json!({ "name": "FERRULE_PROXY_TRANSPARENT", "value": "true" }),
            json!({ "name": "FERRULE_POD_NAME", "valueFrom": field("metadata.name") }),
            json!({ "name": "FERRULE_PROXY_NAMESPACE", "valueFrom": field("metadata.namespace") }),
            json!({ "name": "FERRULE_PROXY_SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName") }),
            json!({ "name": "FERRULE_PROXY_ID", "value": "$(FERRULE_POD_NAME).$(FERRULE_PROXY_NAMESPACE)" }),
            json!({ "name": "FERRULE_PROXY_ADVERTISE_IP", "valueFrom": field("status.podIP") }),
        ];
        if let Some(service) = service {
            env.push(json!({ "name": "FERRULE_PROXY_SERVICE", "value": service }));
        }
        if !app_ports.is_empty() {
            let list: Vec<String> = app_ports
                .iter()
                .map(|(name, port)| format!("{name}=127.0.0.1:{port}"))
                .collect();
            env.push(json!({ "name": "FERRULE_PROXY_APP_PORTS", "value": list.join(",") }));
        }
        env.push(json!({ "name": "FERRULE_PROXY_OPAQUE_PORTS", "value": join(&opaque) }));
        env.push(json!({ "name": "FERRULE_PROXY_LOG_FORMAT", "value": "json" }));
        if self.config.token_audience.is_some() {
            env.push(json!({ "name": "FERRULE_IDENTITY_TOKEN_FILE", "value": TOKEN_FILE }));
            env.push(json!({ "name": "FERRULE_TRUST_DOMAIN", "value": self.config.trust_domain }));
        }

        let probe = |path: &str, period: u32, failures: u32| {
            json!({
                "httpGet": { "path": path, "port": ports::PROXY_ADMIN },
                "periodSeconds": period,
                "failureThreshold": failures,
                "timeoutSeconds": 1,
            })
        };
        let mut proxy = json!({
            "name": PROXY_CONTAINER,
            "image": self.config.proxy_image,
            "imagePullPolicy": self.config.image_pull_policy,
            "env": env,
            "ports": [
                { "name": "ferrule-inbound", "containerPort": ports::PROXY_INBOUND, "protocol": "TCP" },
                { "name": "ferrule-admin", "containerPort": ports::PROXY_ADMIN, "protocol": "TCP" },
            ],
            "readinessProbe": probe("/ready", 10, 3),
            "livenessProbe": probe("/live", 10, 3),
            "resources": {
                "requests": { "cpu": "10m", "memory": "20Mi" },
                "limits": { "memory": "250Mi" },
            },
            "securityContext": {
                "runAsUser": PROXY_UID,
                "runAsGroup": PROXY_UID,
                "runAsNonRoot": true,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": { "drop": ["ALL"] },
                "seccompProfile": { "type": "RuntimeDefault" },
            },
        });
        if self.config.token_audience.is_some() {
            proxy["volumeMounts"] =
                json!([{ "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true }]);
        }
        if mode == SidecarMode::Native {
            proxy["restartPolicy"] = json!("Always");
            // Up to two minutes for the first controller connection before the kubelet
            // restarts the proxy; the app's containers wait for this probe.
            proxy["startupProbe"] = probe("/ready", 1, 120);
        }
        proxy
    }

    fn init_container(&self, annotations: &Annotations) -> Value {
        let union = |defaults: &[u16], extra: &BTreeSet<u16>| -> BTreeSet<u16> {
            defaults
                .iter()
                .copied()
                .chain(extra.iter().copied())
                .collect()
        };
        let skip_in = union(DEFAULT_SKIP_INBOUND_PORTS, &annotations.skip_inbound_ports);
        let skip_out = union(
            DEFAULT_SKIP_OUTBOUND_PORTS,
            &annotations.skip_outbound_ports,
        );
        let mut args = vec![
            "init".to_string(),
            "--inbound-port".into(),
            ports::PROXY_INBOUND.to_string(),
            "--outbound-port".into(),
            ports::PROXY_OUTBOUND.to_string(),
            "--proxy-uid".into(),
            PROXY_UID.to_string(),
            "--skip-inbound-ports".into(),
            join(&skip_in),
        ];
        if !skip_out.is_empty() {
            args.push("--skip-outbound-ports".into());
            args.push(join(&skip_out));
        }
        json!({
            "name": INIT_CONTAINER,
            "image": self.config.proxy_image,
            "imagePullPolicy": self.config.image_pull_policy,
            "args": args,
            "resources": {
                "requests": { "cpu": "10m", "memory": "10Mi" },
                "limits": { "memory": "50Mi" },
            },
            "securityContext": {
                "runAsUser": 0,
                "runAsNonRoot": false,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
            },
            "volumeMounts": [{ "name": XTABLES_VOLUME, "mountPath": "/run" }],
        })
    }
}

/// The app containers' TCP ports as `(name, port)`; unnamed ones are called `port-<number>`.
fn app_ports(
    containers: &[Value],
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, u16)>, InjectError> {
    let mut out: Vec<(String, u16)> = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        let Some(list) = c.get("ports") else { continue };
        let list = list
            .as_array()
            .ok_or_else(|| malformed(format!("spec.containers[{i}].ports"), "is not a list"))?;
        for (j, p) in list.iter().enumerate() {
            let field = || format!("spec.containers[{i}].ports[{j}]");
            let protocol = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            if protocol != "TCP" {
                continue;
            }
            let port = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    malformed(
                        format!("{}.containerPort", field()),
                        "is not a port (1-65535)",
                    )
                })?;
            if [
                ports::PROXY_INBOUND,
                ports::PROXY_OUTBOUND,
                ports::PROXY_ADMIN,
            ]
            .contains(&port)
            {
                return Err(malformed(
                    format!("{}.containerPort", field()),
                    format!("is {port}, a port the proxy listens on; the app must use another"),
                ));
            }
            let name = match p.get("name").and_then(Value::as_str) {
                Some(n) if ferrule_proto::names::validate_label("port name", n).is_ok() => {
                    n.to_string()
                }
                Some(n) => {
                    warnings.push(format!(
                        "port name {n:?} of {} is not a valid port name; registered as port-{port}",
                        field()
                    ));
                    format!("port-{port}")
                }
                None => format!("port-{port}"),
            };
            if out.iter().any(|(n, p)| *n == name || *p == port) {
                continue;
            }
            out.push((name, port));
        }
    }
    Ok(out)
}

fn tcp_probe_warnings(container: &Value, warnings: &mut Vec<String>) {
    let name = container.get("name").and_then(Value::as_str).unwrap_or("?");
    for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(port) = container
            .get(kind)
            .and_then(|p| p.get("tcpSocket"))
            .and_then(|t| t.get("port"))
        {
            warnings.push(format!(
                "container {name:?}'s {kind} is a tcpSocket probe on port {port}: the proxy accepts \
                 that connection even while the app does not listen; use an httpGet or exec \
                 probe, or list the port in ferrule.io/skip-inbound-ports"
            ));
        }
    }
}

fn add(path: &str, value: Value) -> Value {
    json!({ "op": "add", "path": path, "value": value })
}

/// Escapes a JSON Pointer token (RFC 6901).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn join(ports: &BTreeSet<u16>) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn malformed(field: impl Into<String>, reason: impl Into<String>) -> InjectError {
    InjectError::Malformed {
        field: field.into(),
        reason: reason.into(),
    }
}
