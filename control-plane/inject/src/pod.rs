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
//! never see it. With trust anchors ([`InjectConfig::trust_anchors_pem`]: the webhook passes
//! the controller's current bundle, `ferrule inject` the one it was given) the proxy gets
//! them as PEM text in `FERRULE_IDENTITY_TRUST_ANCHORS_PEM`, to verify the controller with
//! (a ConfigMap in `ferrule-system` could not be mounted from other namespaces). They are
//! fixed when the pod is created: after an anchor rotation, pods made before it keep the
//! anchors they were given (docs/kubernetes.md, "Trust anchors").
//!
//! `ferrule.io/inject: identity` is for a pod that is a Ferrule proxy itself (the shop's
//! gateway): its one container gets only the identity parts (the token volume and mount,
//! `FERRULE_IDENTITY_TOKEN_FILE`, `FERRULE_TRUST_DOMAIN`, the anchors, and
//! `FERRULE_PROXY_NAMESPACE` and `FERRULE_PROXY_SERVICE_ACCOUNT` unless it sets them) and the
//! marker annotation; no sidecar, no rules.
//!
//! The app's probes are left as they are: the kubelet's probe connections are redirected to
//! the proxy's inbound listener like any other, and it forwards them to the app's port, so an
//! `httpGet` probe still asks the app. A `tcpSocket` probe would only reach the proxy, which
//! accepts whether the app listens or not; injection says so in a warning.

use std::collections::BTreeSet;

use ferrule_proto::ports;
use serde_json::{Value, json};

use crate::annotations::{self, Annotations, Inject};

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
/// The environment variable that carries the trust anchors (PEM) to the proxy.
pub const TRUST_ANCHORS_ENV: &str = "FERRULE_IDENTITY_TRUST_ANCHORS_PEM";
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
    /// The mesh's trust anchors (PEM), passed to the proxy as
    /// `FERRULE_IDENTITY_TRUST_ANCHORS_PEM` so that it verifies the controller it dials.
    /// `None`: the proxy gets none and talks plaintext to the controller (a control plane
    /// without a mesh CA). Callers check the PEM; this crate passes it on as it is.
    pub trust_anchors_pem: Option<String>,
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
            trust_anchors_pem: None,
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
    /// `ferrule.io/inject: identity`, and injection gives no identity (a control plane
    /// installed with `--identity=none`, `ferrule inject --no-identity`).
    NoIdentity,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::Disabled => "ferrule.io/inject is disabled",
            Skip::AlreadyInjected => "already injected",
            Skip::HostNetwork => "hostNetwork pods are never injected (the iptables rules would capture the node's traffic)",
            Skip::NoIdentity => "ferrule.io/inject is identity, and injection gives no identity (the control plane has no mesh CA)",
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

        if annotations.inject == Some(Inject::Disabled) {
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
        if annotations.inject == Some(Inject::Identity) {
            return self.identity_only(metadata, spec, containers, &annotations);
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
        let mut ops = vec![self.marker(metadata)];
        let mut volumes = vec![json!({ "name": XTABLES_VOLUME, "emptyDir": {} })];
        volumes.extend(self.token_volume());
        add_to_list(&mut ops, spec.get("volumes"), "/spec/volumes", volumes);
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

    /// `ferrule.io/inject: identity`: the pod's one container (a Ferrule proxy itself) gets
    /// the identity parts of the sidecar's patch, and nothing else.
    fn identity_only(
        &self,
        metadata: Option<&Value>,
        spec: &serde_json::Map<String, Value>,
        containers: &[Value],
        annotations: &Annotations,
    ) -> Result<Outcome, InjectError> {
        let Some(token_volume) = self.token_volume() else {
            return Ok(Outcome::Skip(Skip::NoIdentity));
        };
        if containers.len() != 1 {
            return Err(InjectError::BadAnnotation {
                annotation: annotations::INJECT,
                value: "identity".into(),
                reason: format!(
                    "the pod has {} containers; identity is for a pod whose one container is a \
                     Ferrule proxy (such as the gateway), so no app ever sees the token: use \
                     enabled for an app",
                    containers.len()
                ),
            });
        }
        let container = &containers[0];
        let existing = list(container, "env", "spec.containers[0].env")?;
        let sets = |name: &str| existing.iter().any(|e| e["name"] == name);
        // The pod's namespace and service account, unless the manifest tells the proxy
        // already (the shop's gateway does, to have its namespace without identity too).
        let mut env: Vec<Value> = [
            ("FERRULE_PROXY_NAMESPACE", "metadata.namespace"),
            ("FERRULE_PROXY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ]
        .into_iter()
        .filter(|(name, _)| !sets(name))
        .map(|(name, path)| json!({ "name": name, "valueFrom": field_ref(path) }))
        .collect();
        // What only the control plane knows is never left to the manifest.
        for var in self.identity_env() {
            let name = var["name"].as_str().unwrap_or_default();
            if sets(name) {
                return Err(malformed(
                    "spec.containers[0].env",
                    format!(
                        "sets {name}, which ferrule.io/inject: identity sets from the control \
                         plane; remove it"
                    ),
                ));
            }
            env.push(var);
        }
        list(container, "volumeMounts", "spec.containers[0].volumeMounts")?;

        let mut warnings: Vec<String> = annotations
            .unknown
            .iter()
            .map(|a| format!("annotation {a} is not one Ferrule knows; it was ignored"))
            .collect();
        let sidecar_only = [
            (annotations::SIDECAR, annotations.sidecar.is_some()),
            (
                annotations::OPAQUE_PORTS,
                !annotations.opaque_ports.is_empty(),
            ),
            (
                annotations::SKIP_INBOUND_PORTS,
                !annotations.skip_inbound_ports.is_empty(),
            ),
            (
                annotations::SKIP_OUTBOUND_PORTS,
                !annotations.skip_outbound_ports.is_empty(),
            ),
            (annotations::SERVICE, annotations.service.is_some()),
        ];
        for (annotation, set) in sidecar_only {
            if set {
                warnings.push(format!(
                    "annotation {annotation} does nothing with ferrule.io/inject: identity (no \
                     sidecar is added); it was ignored"
                ));
            }
        }

        let mut ops = vec![self.marker(metadata)];
        add_to_list(
            &mut ops,
            spec.get("volumes"),
            "/spec/volumes",
            vec![token_volume],
        );
        add_to_list(
            &mut ops,
            container.get("env"),
            "/spec/containers/0/env",
            env,
        );
        add_to_list(
            &mut ops,
            container.get("volumeMounts"),
            "/spec/containers/0/volumeMounts",
            vec![token_mount()],
        );
        let patch = serde_json::from_value(Value::Array(ops))
            .expect("the ops built above are valid JSON Patch operations");
        Ok(Outcome::Inject { patch, warnings })
    }

    /// The `ferrule.io/proxy-version` marker, added to whatever metadata the pod has.
    fn marker(&self, metadata: Option<&Value>) -> Value {
        let (key, value) = (
            annotations::PROXY_VERSION,
            self.config.proxy_version.clone(),
        );
        match metadata {
            None => add("/metadata", json!({ "annotations": { key: value } })),
            Some(m) if m.get("annotations").is_none_or(Value::is_null) => {
                add("/metadata/annotations", json!({ key: value }))
            }
            Some(_) => add(
                &format!("/metadata/annotations/{}", escape(key)),
                json!(value),
            ),
        }
    }

    /// With identity, the projected service-account token volume.
    fn token_volume(&self) -> Option<Value> {
        self.config.token_audience.as_ref().map(|audience| {
            json!({
                "name": TOKEN_VOLUME,
                "projected": { "sources": [{ "serviceAccountToken": {
                    "audience": audience,
                    "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                    "path": "token",
                } }] },
            })
        })
    }

    /// What a proxy needs to get its identity and verify the controller: the token file and
    /// trust domain (with identity), the trust anchors (when given).
    fn identity_env(&self) -> Vec<Value> {
        let mut env = Vec::new();
        if self.config.token_audience.is_some() {
            env.push(json!({ "name": "FERRULE_IDENTITY_TOKEN_FILE", "value": TOKEN_FILE }));
            env.push(json!({ "name": "FERRULE_TRUST_DOMAIN", "value": self.config.trust_domain }));
        }
        if let Some(pem) = &self.config.trust_anchors_pem {
            env.push(json!({ "name": TRUST_ANCHORS_ENV, "value": pem }));
        }
        env
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
        let mut env = vec![
            json!({ "name": "FERRULE_CONTROLLER", "value": self.config.controller }),
            json!({ "name": "FERRULE_PROXY_TRANSPARENT", "value": "true" }),
            json!({ "name": "FERRULE_POD_NAME", "valueFrom": field_ref("metadata.name") }),
            json!({ "name": "FERRULE_PROXY_NAMESPACE", "valueFrom": field_ref("metadata.namespace") }),
            json!({ "name": "FERRULE_PROXY_SERVICE_ACCOUNT", "valueFrom": field_ref("spec.serviceAccountName") }),
            json!({ "name": "FERRULE_PROXY_ID", "value": "$(FERRULE_POD_NAME).$(FERRULE_PROXY_NAMESPACE)" }),
            json!({ "name": "FERRULE_PROXY_ADVERTISE_IP", "valueFrom": field_ref("status.podIP") }),
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
        env.extend(self.identity_env());

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
            proxy["volumeMounts"] = json!([token_mount()]);
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

/// Adds `items` to the list at `path`, whose current value is `current`: appended one by one
/// to a list, or the whole list where there is none.
fn add_to_list(ops: &mut Vec<Value>, current: Option<&Value>, path: &str, items: Vec<Value>) {
    match current {
        Some(Value::Array(_)) => {
            ops.extend(items.into_iter().map(|v| add(&format!("{path}/-"), v)))
        }
        _ => ops.push(add(path, Value::Array(items))),
    }
}

/// `object[key]` as a list (absent or null: empty), or an error naming `field`.
fn list<'a>(object: &'a Value, key: &str, field: &str) -> Result<&'a [Value], InjectError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(malformed(field, "is not a list")),
    }
}

fn field_ref(path: &str) -> Value {
    json!({ "fieldRef": { "fieldPath": path } })
}

/// The token volume, read-only where the proxy looks for it.
fn token_mount() -> Value {
    json!({ "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true })
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
