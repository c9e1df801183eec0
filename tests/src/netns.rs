//! A network namespace joined to the test's own by a veth pair, deleted on drop.
//!
//! For tests that need a peer which is not loopback: a process run inside the namespace
//! ([`NetNs::command`]) reaches the host side of the pair at [`NetNs::host_addr`] from
//! [`NetNs::ns_addr`], a private /30 that exists only between the two ends, so no traffic
//! leaves the machine. Creating one needs root (CAP_NET_ADMIN) and iproute2's `ip`. The guard
//! exists before the first `ip` call, so a namespace or link made by a setup that then fails
//! is removed too.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

/// What a command run in a namespace did: whether it succeeded, its stdout and stderr.
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args` inside the namespace `ns` (`ip netns exec`, which also bind-mounts
/// `/etc/netns/NS/*` over `/etc`), killed after 10 s.
pub async fn run_in(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<Ran> {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", ns, "timeout", "10", program])
        .args(args)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .with_context(|| format!("{program} in {ns} did not finish"))?
        .with_context(|| format!("running {program} in {ns}"))?;
    Ok(Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `curl -sS --max-time 5 -i ARGS` inside `ns`: the response head and body.
pub async fn curl_in(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["-sS", "--max-time", "5", "-i"];
    all.extend_from_slice(args);
    let ran = run_in(ns, "curl", &all).await?;
    if !ran.ok {
        bail!("curl {args:?} in {ns} failed: {}", ran.stderr.trim());
    }
    Ok(ran.stdout)
}

/// `binary` copied into `dir` (made world-readable), where a process that dropped root (the
/// proxy as its own UID) may run it; the build tree may not be reachable for it.
pub fn runnable_copy(dir: &Path, binary: &Path) -> anyhow::Result<PathBuf> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let name = binary
        .file_name()
        .context("a binary path has a file name")?;
    let copy = dir.join(name);
    std::fs::copy(binary, &copy)
        .with_context(|| format!("copying {} to {}", binary.display(), copy.display()))?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    Ok(copy)
}

/// Distinguishes the namespaces of one test process.
static NEXT: AtomicU8 = AtomicU8::new(0);

pub struct NetNs {
    name: String,
    /// The host-side end of the veth pair (its peer is moved into the namespace).
    veth: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
}

impl NetNs {
    /// Creates the namespace, the veth pair and their addresses (10.213.x.y/30), links up.
    pub fn create() -> anyhow::Result<NetNs> {
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Interface names have at most 15 bytes: "frt" + pid (≤ 7 digits) + n (≤ 3) + 1.
        let tag = format!("{pid}{n}");
        let subnet = Ipv4Addr::new(10, 213, (pid % 256) as u8, (n % 64) * 4);
        let [a, b, c, d] = subnet.octets();
        let ns = NetNs {
            name: format!("ferrule-test-{tag}"),
            veth: format!("frt{tag}h"),
            host_addr: Ipv4Addr::new(a, b, c, d + 1),
            ns_addr: Ipv4Addr::new(a, b, c, d + 2),
        };
        let peer = format!("frt{tag}n");
        ip(&["netns", "add", &ns.name])
            .context("creating a network namespace (needs root and iproute2)")?;
        ip(&[
            "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_addr),
            "dev",
            &ns.veth,
        ])?;
        ip(&["link", "set", &ns.veth, "up"])?;
        let inside = ["netns", "exec", &ns.name, "ip"];
        let ns_cidr = format!("{}/30", ns.ns_addr);
        ip(&[&inside[..], &["addr", "add", &ns_cidr, "dev", &peer]].concat())?;
        ip(&[&inside[..], &["link", "set", &peer, "up"]].concat())?;
        ip(&[&inside[..], &["link", "set", "lo", "up"]].concat())?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the peer end inside it, and with it the pair; the
        // host end is deleted explicitly for a setup that failed before the move.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
    }
}

/// Runs `ip ARGS...` (iproute2), failing with its stderr.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
