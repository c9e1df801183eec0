//! A cluster made of network namespaces, as Kubernetes would lay it out, for testing
//! transparent mode for real: a "node" namespace with a bridge, and one namespace per pod
//! joined to the bridge by a veth pair.
//!
//! * The node namespace holds the control plane (etcd and a `ferrule-controller`), reachable
//!   from every pod at [`NODE_IP`], as a cluster's control plane is reachable from its pods.
//! * A pod ([`Cluster::pod`]) gets `10.77.0.N/24` and `fd77::N/64` on its `eth0`, loopback,
//!   a default route to the node, and a hosts file (`/etc/netns/NS/hosts`, which
//!   `ip netns exec` bind-mounts over `/etc/hosts`) naming each service's virtual IP, as
//!   cluster DNS would. Its sidecar ([`Cluster::sidecar`]) runs as [`PROXY_UID`] through
//!   `setpriv`, after [`Cluster::init`] ran the real `ferrule-proxy init` inside the pod.
//! * Everything it creates (processes, namespaces, hosts files) is removed when the guard
//!   drops, also when the test fails; a failing test's output gets the end of every log.
//!
//! Names are unique per test process, so concurrent runs never meet. Needs root, iproute2,
//! iptables, util-linux's `setpriv` and etcd.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::netns::{self, Ran, ip};
use crate::{Process, binary};

/// The node namespace's address on the bridge: the control plane listens here.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The controller's gRPC port on [`NODE_IP`].
pub const CONTROLLER_PORT: u16 = 8086;
/// The UID every sidecar runs as, and `init`'s default `--proxy-uid`.
pub const PROXY_UID: u32 = 2102;

static NEXT: AtomicU8 = AtomicU8::new(0);

/// One pod: its namespace and addresses.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

pub struct Cluster {
    node: String,
    pods: Vec<String>,
    /// `/etc/netns/NS` directories made for the pods' hosts files.
    etc_dirs: Vec<PathBuf>,
    /// Killed before the namespaces go.
    processes: Vec<Process>,
    /// Service name → virtual IP, for every pod's hosts file.
    services: Vec<(String, Ipv4Addr)>,
    proxy_bin: PathBuf,
    next_host: u8,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// The node namespace and its bridge (`10.77.0.1/24`, `fd77::1/64`); `services` are the
    /// names every pod resolves to virtual IPs.
    pub fn create(services: &[(&str, Ipv4Addr)]) -> anyhow::Result<Cluster> {
        let tag = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix("ferrule-cluster-")
            .tempdir()?;
        let proxy_bin = netns::runnable_copy(dir.path(), &binary("ferrule-proxy")?)?;
        let cluster = Cluster {
            node: format!("ferrule-node-{tag}"),
            pods: Vec::new(),
            etc_dirs: Vec::new(),
            processes: Vec::new(),
            services: services
                .iter()
                .map(|(name, vip)| (name.to_string(), *vip))
                .collect(),
            proxy_bin,
            next_host: 10,
            dir,
        };
        let node = cluster.node.as_str();
        ip(&["netns", "add", node]).context("creating a network namespace (needs root)")?;
        ip(&["-n", node, "link", "set", "lo", "up"])?;
        ip(&["-n", node, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "br0",
        ])?;
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            "fd77::1/64",
            "dev",
            "br0",
            "nodad",
        ])?;
        ip(&["-n", node, "link", "set", "br0", "up"])?;
        Ok(cluster)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// etcd and a controller on it, in the node namespace; the controller's URL for pods.
    pub async fn control_plane(&mut self) -> anyhow::Result<String> {
        let etcd = std::env::var("FERRULE_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let client = format!("http://{NODE_IP}:2379");
        let peer = "http://127.0.0.1:2380";
        let mut cmd = self.in_ns(&self.node, &etcd);
        cmd.arg("--name=node")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("etcd").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=node={peer}"))
            .args(["--logger=zap", "--log-level=info"])
            .env("ETCD_UNSUPPORTED_ARCH", "amd64");
        let mut etcd = Process::spawn("etcd", cmd, &self.dir.path().join("etcd.log"))
            .context("starting etcd (Debian's etcd-server; or set FERRULE_ETCD_BIN)")?;
        let waited = etcd
            .wait_for_line("serving client traffic", Duration::from_secs(20))
            .await;
        self.processes.push(etcd);
        waited?;

        // The mesh CA, so every hop between sidecars is mutual TLS.
        let identity = self.dir.path().join("identity");
        let mut init = std::process::Command::new(binary("ferrule")?);
        init.args(["identity", "init", "--dir"]).arg(&identity);
        let made = crate::output(init).await?;
        anyhow::ensure!(
            made.status.success(),
            "ferrule identity init: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        let controller = binary("ferrule-controller")?.display().to_string();
        let mut cmd = self.in_ns(&self.node, &controller);
        cmd.args(["--store", &format!("etcd://{NODE_IP}:2379")])
            .args(["--grpc-addr", &format!("{NODE_IP}:{CONTROLLER_PORT}")])
            .args(["--admin-addr", "127.0.0.1:0"])
            .arg("--identity-dir")
            .arg(&identity)
            .env("RUST_LOG", "info,ferrule_controller=debug");
        self.spawn_ready("ferrule-controller", cmd).await?;
        Ok(format!("http://{NODE_IP}:{CONTROLLER_PORT}"))
    }

    /// A join token for `service`'s sidecar, from the controller (asked from the node).
    pub async fn join_token(&self, service: &str) -> anyhow::Result<String> {
        let ferrule = binary("ferrule")?.display().to_string();
        let mut cmd = self.in_ns(&self.node, &ferrule);
        cmd.args(["--controller", &format!("{NODE_IP}:{CONTROLLER_PORT}")])
            .args(crate::admin_cli_args(&self.dir.path().join("identity")))
            .args(["identity", "token", "create", "--service", service]);
        let out = crate::output(cmd).await?;
        anyhow::ensure!(
            out.status.success(),
            "token for {service}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// A new pod named `name` (at most 12 bytes: its veth in the node is `v` + name).
    pub fn pod(&mut self, name: &str) -> anyhow::Result<Pod> {
        let host = self.next_host;
        self.next_host += 1;
        let pod = Pod {
            name: name.to_string(),
            ns: format!("{}-{name}", self.node.replacen("node", "pod", 1)),
            ip: Ipv4Addr::new(10, 77, 0, host),
            ip6: format!("fd77::{host}").parse()?,
        };
        // Registered for removal before anything exists, so a failed setup is undone too.
        self.pods.push(pod.ns.clone());
        let etc = Path::new("/etc/netns").join(&pod.ns);
        self.etc_dirs.push(etc.clone());
        std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
        let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
        for (service, vip) in &self.services {
            hosts.push_str(&format!("{vip} {service}\n"));
        }
        std::fs::write(etc.join("hosts"), hosts)?;

        let (node, ns) = (self.node.as_str(), pod.ns.as_str());
        let veth = format!("v{name}");
        ip(&["netns", "add", ns])?;
        ip(&[
            "-n", node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", node, "link", "set", &veth, "master", "br0", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", pod.ip),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/64", pod.ip6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        // Service VIPs are routed like any off-pod address; the pod's own rules redirect
        // them to the sidecar before they would leave.
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &NODE_IP.to_string(),
        ])?;
        Ok(pod)
    }

    /// Runs the real `ferrule-proxy init ARGS` inside `pod` (as root, as an init container
    /// with NET_ADMIN would); its report.
    pub async fn init(&self, pod: &Pod, args: &[&str]) -> anyhow::Result<String> {
        let proxy = self.proxy_bin.display().to_string();
        let mut all = vec!["init"];
        all.extend_from_slice(args);
        let ran = netns::run_in(&pod.ns, &proxy, &all).await?;
        if !ran.ok {
            bail!(
                "ferrule-proxy init {args:?} in {} failed: {}",
                pod.name,
                ran.stderr
            );
        }
        Ok(ran.stdout)
    }

    /// Starts `pod`'s sidecar in transparent mode as [`PROXY_UID`] with the default listeners
    /// (outbound 4140, inbound 4143, admin 4191) and `args`, and waits until its `/ready`
    /// answers 200 (every app port registered). It gets the mesh's trust anchors the way an
    /// injected pod does: as PEM text in `FERRULE_IDENTITY_TRUST_ANCHORS_PEM`.
    pub async fn sidecar(&mut self, pod: &Pod, args: &[&str]) -> anyhow::Result<()> {
        let anchors = self
            .dir
            .path()
            .join("identity")
            .join(crate::controller::TRUST_ANCHORS);
        let anchors = std::fs::read_to_string(&anchors)
            .with_context(|| format!("reading {}", anchors.display()))?;
        let mut cmd = self.in_ns(&pod.ns, "setpriv");
        cmd.args([
            &format!("--reuid={PROXY_UID}"),
            &format!("--regid={PROXY_UID}"),
            "--clear-groups",
            "--",
        ])
        .arg(&self.proxy_bin)
        .args(["--transparent", "--advertise-ip", &pod.ip.to_string()])
        // The controller's API is protected: the sidecar trusts it through the mesh's anchors,
        // given as an injected pod gets them (PEM text in the environment).
        .env("FERRULE_IDENTITY_TRUST_ANCHORS_PEM", anchors)
        .args(args)
        .env("RUST_LOG", "info,ferrule_proxy=debug");
        self.spawn_ready(&format!("{}-proxy", pod.name), cmd)
            .await?;
        let ns = pod.ns.clone();
        crate::eventually(
            Duration::from_secs(20),
            &format!("{}'s sidecar /ready", pod.name),
            || {
                let ns = ns.clone();
                async move {
                    let reply = netns::curl_in(&ns, &["http://127.0.0.1:4191/ready"]).await;
                    reply
                        .ok()
                        .filter(|r| r.starts_with("HTTP/1.1 200"))
                        .map(|_| ())
                }
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", self.log(&format!("{}-proxy", pod.name))))
    }

    /// Starts `program args` (with `env`) inside `pod` as root and waits for its ready line
    /// (`PROGRAM ready: ...`, the name of the file).
    pub async fn app(
        &mut self,
        pod: &Pod,
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let mut cmd = self.in_ns(&pod.ns, &program.display().to_string());
        cmd.args(args).current_dir(self.dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let ready = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = format!("{}-{ready}", pod.name);
        let log = self.dir.path().join(format!("{name}.log"));
        let mut process = Process::spawn(&name, cmd, &log)?;
        let waited = process
            .ready::<serde_json::Value>(&ready, Duration::from_secs(20))
            .await;
        self.processes.push(process);
        waited.map(|_| ())
    }

    /// `program args` inside `pod`, bounded.
    pub async fn run(&self, pod: &Pod, program: &str, args: &[&str]) -> anyhow::Result<Ran> {
        netns::run_in(&pod.ns, program, args).await
    }

    /// `iptables-save -t nat` (or `ip6tables-save`) inside `pod`, without comments and
    /// counters: the rules alone, to compare two runs.
    pub async fn nat_rules(&self, pod: &Pod, save: &str) -> anyhow::Result<String> {
        let ran = self.run(pod, save, &["-t", "nat"]).await?;
        if !ran.ok {
            bail!("{save} in {} failed: {}", pod.name, ran.stderr);
        }
        Ok(ran
            .stdout
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.split_once(" [") {
                Some((chain, _)) if l.starts_with(':') => chain,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// The log of the process started as `name`.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn in_ns(&self, ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }

    async fn spawn_ready(&mut self, name: &str, cmd: Command) -> anyhow::Result<()> {
        let log = self.dir.path().join(format!("{name}.log"));
        let mut process = Process::spawn(name, cmd, &log)?;
        let program = if name.ends_with("-proxy") {
            "ferrule-proxy"
        } else {
            name
        };
        let waited = process
            .ready::<serde_json::Value>(program, Duration::from_secs(20))
            .await;
        self.processes.push(process);
        waited.map(|_| ())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for process in &self.processes {
                let text = process.log();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!(
                    "--- {} (last 40 lines) ---\n{}",
                    process.log_path().display(),
                    lines[lines.len().saturating_sub(40)..].join("\n")
                );
            }
        }
        // Processes first: a namespace with a process in it outlives `ip netns del`.
        self.processes.clear();
        for ns in self.pods.iter().chain([&self.node]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for dir in &self.etc_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
