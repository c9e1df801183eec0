//! `ferrule-proxy init`: the init container's job. Writes the NAT rules that send a pod's TCP
//! through its sidecar, in the network namespace it runs in.
//!
//! The rules live in chains of Ferrule's own in the `nat` table, reached by one jump each
//! from the built-in chains:
//!
//! * `PREROUTING → FERRULE_INBOUND`: TCP arriving at the pod is redirected to the inbound
//!   listener, except the skipped inbound ports (the admin port always).
//! * `OUTPUT → FERRULE_OUTPUT`: TCP the pod sends is redirected to the outbound listener,
//!   except the proxy's own (its UID), anything leaving through loopback, and the skipped
//!   outbound ports and CIDRs.
//!
//! Running it again leaves exactly the same rules: the chains are declared (so created or
//! flushed) and refilled in one `iptables-restore --noflush`, and a jump is added only when
//! `iptables -C` does not find it. `--clean` removes the jumps and the chains. The rules are
//! written for IPv4 and, unless `--disable-ipv6` or the host has no IPv6, for IPv6.
//!
//! Nodes run one of two iptables back ends, and rules written to the other one are ignored:
//! `--iptables-mode auto` (the default) uses the one that already holds Ferrule's chains, else
//! the one holding more rules, else nft, the way Istio and Linkerd choose.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use clap::ValueEnum;
use ferrule_proto::ports;

/// The chain `PREROUTING` jumps to.
pub const INBOUND_CHAIN: &str = "FERRULE_INBOUND";
/// The chain `OUTPUT` jumps to.
pub const OUTPUT_CHAIN: &str = "FERRULE_OUTPUT";

const EXAMPLE: &str = "Example (the init container of a pod whose proxy runs as UID 2102):\n  \
ferrule-proxy init --proxy-uid 2102 --skip-inbound-ports 9090 --skip-outbound-ports 5432 \
--skip-outbound-cidrs 169.254.169.254/32\n\
Needs CAP_NET_ADMIN (and CAP_NET_RAW for the legacy back end) and the iptables package. \
`--dry-run` prints the rules without writing them; `--clean` removes them. See docs/transparent.md.";

/// Which iptables back end the rules are written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The back end that already holds Ferrule's chains, else the one with more rules, else nft.
    Auto,
    /// `iptables-nft`: the kernel's nf_tables (Debian 10+, RHEL 8+, recent kind nodes).
    Nft,
    /// `iptables-legacy`: the older x_tables interface (some older nodes still use it).
    Legacy,
}

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = EXAMPLE)]
pub struct InitArgs {
    /// UID the proxy runs as: its own connections are never redirected.
    #[arg(long, env = "FERRULE_INIT_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: u32,

    /// Port of the proxy's inbound listener (`--inbound-addr`).
    #[arg(long, env = "FERRULE_INIT_INBOUND_PORT", default_value_t = ports::PROXY_INBOUND)]
    pub inbound_port: u16,

    /// Port of the proxy's transparent outbound listener (`--outbound-addr`).
    #[arg(long, env = "FERRULE_INIT_OUTBOUND_PORT", default_value_t = ports::PROXY_OUTBOUND)]
    pub outbound_port: u16,

    /// Port of the proxy's admin listener: never redirected, so probes and scrapes reach it.
    #[arg(long, env = "FERRULE_INIT_ADMIN_PORT", default_value_t = ports::PROXY_ADMIN)]
    pub admin_port: u16,

    /// Inbound destination ports not redirected (PORT or FIRST-LAST), added to the admin port.
    #[arg(long, env = "FERRULE_INIT_SKIP_INBOUND_PORTS", value_delimiter = ',', value_parser = parse_port_range)]
    pub skip_inbound_ports: Vec<PortRange>,

    /// Outbound destination ports not redirected (PORT or FIRST-LAST).
    #[arg(long, env = "FERRULE_INIT_SKIP_OUTBOUND_PORTS", value_delimiter = ',', value_parser = parse_port_range)]
    pub skip_outbound_ports: Vec<PortRange>,

    /// Outbound destinations not redirected, as CIDRs (IPv4 or IPv6).
    #[arg(long, env = "FERRULE_INIT_SKIP_OUTBOUND_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub skip_outbound_cidrs: Vec<Cidr>,

    /// The iptables back end.
    #[arg(long, env = "FERRULE_INIT_IPTABLES_MODE", value_enum, default_value_t = Mode::Auto)]
    pub iptables_mode: Mode,

    /// Write IPv4 rules only (by default ip6tables gets the same rules where the host has
    /// IPv6).
    #[arg(long, env = "FERRULE_INIT_DISABLE_IPV6")]
    pub disable_ipv6: bool,

    /// Remove Ferrule's jumps and chains instead of writing them.
    #[arg(long)]
    pub clean: bool,

    /// Print what would be written, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `PORT` or `FIRST-LAST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange(u16, u16);

fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a > b {
                return Err(format!("port range {s:?} ends before it starts"));
            }
            Ok(PortRange(a, b))
        }
        None => port(s).map(|p| PortRange(p, p)),
    }
}

impl PortRange {
    /// As iptables' `--dport` takes it.
    fn iptables(&self) -> String {
        match self.0 == self.1 {
            true => self.0.to_string(),
            false => format!("{}:{}", self.0, self.1),
        }
    }
}

/// `ADDRESS/PREFIX` (a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("{addr:?} in {s:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix {p:?} in {s:?} is not 0-{max}"))?,
        None => max,
    };
    Ok(Cidr { addr, prefix })
}

/// IPv4 or IPv6: which of `iptables` / `ip6tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// The `nat` table's part that is Ferrule's, for one family, as `iptables-restore` reads it:
/// the chain declarations (which create or flush them) and their rules. The jumps from the
/// built-in chains are added separately, once.
pub fn ruleset(args: &InitArgs, family: Family) -> String {
    let mut out = String::from("*nat\n");
    let _ = writeln!(out, ":{INBOUND_CHAIN} - [0:0]");
    let _ = writeln!(out, ":{OUTPUT_CHAIN} - [0:0]");
    let mut skip_in = vec![PortRange(args.admin_port, args.admin_port)];
    skip_in.extend(args.skip_inbound_ports.iter().copied());
    for range in skip_in {
        let _ = writeln!(
            out,
            "-A {INBOUND_CHAIN} -p tcp --dport {} -j RETURN",
            range.iptables()
        );
    }
    let _ = writeln!(
        out,
        "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        args.inbound_port
    );
    let _ = writeln!(
        out,
        "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
        args.proxy_uid
    );
    let _ = writeln!(out, "-A {OUTPUT_CHAIN} -o lo -j RETURN");
    for cidr in &args.skip_outbound_cidrs {
        if cidr.addr.is_ipv4() == (family == Family::V4) {
            let _ = writeln!(
                out,
                "-A {OUTPUT_CHAIN} -d {}/{} -j RETURN",
                cidr.addr, cidr.prefix
            );
        }
    }
    for range in &args.skip_outbound_ports {
        let _ = writeln!(
            out,
            "-A {OUTPUT_CHAIN} -p tcp --dport {} -j RETURN",
            range.iptables()
        );
    }
    let _ = writeln!(
        out,
        "-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        args.outbound_port
    );
    out.push_str("COMMIT\n");
    out
}

/// The back end of a plain `iptables` with no `-nft` or `-legacy` beside it.
const UNNAMED: &str = "";

/// The jumps from the built-in chains: (built-in chain, Ferrule's chain).
const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN)];

/// One family's binaries of one back end.
#[derive(Debug, Clone)]
struct Tools {
    family: Family,
    /// `iptables-nft`, `ip6tables-legacy`...
    iptables: PathBuf,
    restore: PathBuf,
    save: PathBuf,
}

impl Tools {
    /// The tools of `backend` (`nft`, `legacy`, or [`UNNAMED`]: plain `iptables`, for
    /// distributions that ship one back end without the suffixed names).
    fn find(family: Family, backend: &str) -> Option<Tools> {
        let base = match backend {
            UNNAMED => family.tool().to_string(),
            named => format!("{}-{named}", family.tool()),
        };
        let find = |suffix: &str| which(&format!("{base}{suffix}"));
        Some(Tools {
            family,
            iptables: find("")?,
            restore: find("-restore")?,
            save: find("-save")?,
        })
    }

    fn name(&self) -> String {
        self.iptables
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// `iptables-save -t nat`'s text.
    fn save_nat(&self) -> anyhow::Result<String> {
        let out = run(Command::new(&self.save).args(["-t", "nat"]), None)?;
        Ok(out)
    }

    fn nat(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.iptables);
        cmd.args(["-t", "nat"]).args(args);
        run(&mut cmd, None)
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

fn failure(program: &Path, stderr: &[u8]) -> anyhow::Error {
    let stderr = String::from_utf8_lossy(stderr);
    let mut msg = format!("{} failed: {}", program.display(), stderr.trim());
    if stderr.contains("Permission denied") || stderr.contains("you must be root") {
        msg.push_str(
            "\n  hint: writing iptables rules needs CAP_NET_ADMIN (and CAP_NET_RAW for the \
             legacy back end): run init as root or grant them (Kubernetes: \
             securityContext.capabilities.add: [NET_ADMIN, NET_RAW])",
        );
    }
    anyhow::anyhow!(msg)
}

/// Runs `cmd` (feeding it `stdin`), its stdout on success, its stderr in the error otherwise.
fn run(cmd: &mut Command, stdin: Option<&str>) -> anyhow::Result<String> {
    let program = PathBuf::from(cmd.get_program());
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", program.display()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("writing to {}", program.display()))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {}", program.display()))?;
    if !out.status.success() {
        return Err(failure(&program, &out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How many rules `save`'s text holds, and whether Ferrule's chains are among them.
fn census(save: &str) -> (usize, bool) {
    let rules = save.lines().filter(|l| l.starts_with("-A ")).count();
    let ours = save
        .lines()
        .any(|l| l.starts_with(&format!(":{INBOUND_CHAIN} ")));
    (rules, ours)
}

/// How many times `iptables-save`'s text has the rule `-A builtin -j ours`.
fn jumps(save: &str, builtin: &str, ours: &str) -> usize {
    let rule = format!("-A {builtin} -j {ours}");
    save.lines().filter(|l| *l == rule).count()
}

/// The back end `mode` names, resolved for `auto` by looking at what each one holds.
fn backend(mode: Mode) -> anyhow::Result<&'static str> {
    const MISSING: &str = "no iptables found: install the iptables package (Debian/Ubuntu: \
         apt-get install iptables; Alpine: apk add iptables iptables-legacy; RHEL: dnf install \
         iptables-nft)";
    let (nft, legacy) = (
        Tools::find(Family::V4, "nft"),
        Tools::find(Family::V4, "legacy"),
    );
    Ok(match (mode, &nft, &legacy) {
        (Mode::Nft, None, _) => bail!("{MISSING}: iptables-nft not found"),
        (Mode::Legacy, _, None) => bail!("{MISSING}: iptables-legacy not found"),
        (Mode::Nft, Some(_), _) => "nft",
        (Mode::Legacy, _, Some(_)) => "legacy",
        (Mode::Auto, None, None) => match Tools::find(Family::V4, UNNAMED) {
            Some(_) => UNNAMED,
            None => bail!("{MISSING}"),
        },
        (Mode::Auto, Some(_), None) => "nft",
        (Mode::Auto, None, Some(_)) => "legacy",
        (Mode::Auto, Some(nft), Some(legacy)) => {
            // A back end that cannot be read (no permission, module missing) counts as empty.
            let look = |t: &Tools| t.save_nat().map(|s| census(&s)).unwrap_or((0, false));
            let ((nft_rules, nft_ours), (legacy_rules, legacy_ours)) = (look(nft), look(legacy));
            match (nft_ours, legacy_ours) {
                (true, _) => "nft",
                (false, true) => "legacy",
                _ if legacy_rules > nft_rules => "legacy",
                _ => "nft",
            }
        }
    })
}

/// Whether the process holds CAP_NET_ADMIN (bit 12 of the effective set).
fn has_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// Whether the host has IPv6 at all (a kernel booted with `ipv6.disable=1` has no
/// `/proc/net/if_inet6`).
fn host_has_ipv6() -> bool {
    Path::new("/proc/net/if_inet6").exists()
}

/// Runs `init` with `args`; prints what it did (or would do) to stdout, also the part done
/// before a failure.
pub fn run_init(args: &InitArgs) -> anyhow::Result<()> {
    let mut report = String::new();
    let result = init(args, &mut report);
    std::io::stdout().lock().write_all(report.as_bytes())?;
    result
}

/// What [`run_init`] does, writing the report into `report` instead of printing it.
pub fn init(args: &InitArgs, report: &mut String) -> anyhow::Result<()> {
    if !args.dry_run && !has_net_admin() {
        bail!(
            "ferrule-proxy init needs CAP_NET_ADMIN to write iptables rules (and CAP_NET_RAW for \
             the legacy back end): run it as root or grant them (Kubernetes: \
             securityContext.capabilities.add: [NET_ADMIN, NET_RAW]); --dry-run prints the \
             rules without them"
        );
    }
    let mut families = vec![Family::V4];
    if !args.disable_ipv6 {
        if host_has_ipv6() {
            families.push(Family::V6);
        } else {
            report.push_str("# IPv6 is disabled on this host: IPv4 rules only\n");
        }
    }
    let backends: Vec<&str> = match (args.clean, args.iptables_mode) {
        // Clean wherever Ferrule's chains are, so rules written by an earlier run in another
        // mode do not survive.
        (true, Mode::Auto) => {
            let found: Vec<&str> = ["nft", "legacy"]
                .into_iter()
                .filter(|b| Tools::find(Family::V4, b).is_some())
                .collect();
            match found.is_empty() {
                true => vec![backend(Mode::Auto)?],
                false => found,
            }
        }
        (_, mode) => vec![backend(mode)?],
    };
    if backends.is_empty() {
        bail!(
            "no iptables found: install the iptables package (Debian/Ubuntu: apt-get install iptables)"
        );
    }
    for backend in backends {
        for &family in &families {
            let Some(tools) = Tools::find(family, backend) else {
                let tool = match backend {
                    UNNAMED => family.tool().to_string(),
                    named => format!("{}-{named}", family.tool()),
                };
                if family == Family::V6 {
                    let _ = writeln!(
                        report,
                        "# {tool} not found: IPv6 rules skipped (install ip6tables, or pass --disable-ipv6)"
                    );
                    continue;
                }
                bail!(
                    "{tool}, {tool}-save or {tool}-restore not found: install the iptables package"
                );
            };
            if args.clean {
                clean(&tools, args.dry_run, report)?;
            } else {
                apply(&tools, args, report)?;
            }
        }
    }
    Ok(())
}

fn apply(tools: &Tools, args: &InitArgs, report: &mut String) -> anyhow::Result<()> {
    let rules = ruleset(args, tools.family);
    let verb = if args.dry_run { "would write" } else { "wrote" };
    let _ = writeln!(
        report,
        "# {} ({verb}, with iptables-restore --noflush):",
        tools.name()
    );
    report.push_str(&rules);
    let before = match args.dry_run {
        true => String::new(),
        false => tools.save_nat()?,
    };
    for (builtin, ours) in JUMPS {
        if jumps(&before, builtin, ours) > 0 {
            let _ = writeln!(report, "# -t nat -A {builtin} -j {ours}: already there");
        } else {
            let _ = writeln!(report, "-t nat -A {builtin} -j {ours}");
        }
    }
    if args.dry_run {
        return Ok(());
    }
    run(
        Command::new(&tools.restore).args(["--noflush"]),
        Some(&rules),
    )
    .with_context(|| format!("writing Ferrule's chains with {}", tools.restore.display()))?;
    for (builtin, ours) in JUMPS {
        if jumps(&before, builtin, ours) == 0 {
            tools.nat(&["-A", builtin, "-j", ours])?;
        }
    }
    Ok(())
}

fn clean(tools: &Tools, dry_run: bool, report: &mut String) -> anyhow::Result<()> {
    let save = tools.save_nat()?;
    let has_chain = |chain: &str| save.lines().any(|l| l.starts_with(&format!(":{chain} ")));
    let mut done = Vec::new();
    for (builtin, ours) in JUMPS {
        // A jump may have been added twice by hand; remove every copy.
        for _ in 0..jumps(&save, builtin, ours) {
            if !dry_run {
                tools.nat(&["-D", builtin, "-j", ours])?;
            }
            done.push(format!("-t nat -D {builtin} -j {ours}"));
        }
    }
    for chain in [INBOUND_CHAIN, OUTPUT_CHAIN] {
        if has_chain(chain) {
            if !dry_run {
                tools.nat(&["-F", chain])?;
                tools.nat(&["-X", chain])?;
            }
            done.push(format!("-t nat -F {chain}"));
            done.push(format!("-t nat -X {chain}"));
        }
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    if done.is_empty() {
        let _ = writeln!(report, "# {}: no Ferrule rules", tools.name());
    } else {
        let _ = writeln!(report, "# {} ({verb}):", tools.name());
        for line in done {
            let _ = writeln!(report, "{line}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn parse(args: &[&str]) -> Result<InitArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("init").chain(args.iter().copied())).map(|c| c.init)
    }

    #[test]
    fn rules_skip_admin_own_uid_loopback_and_what_is_listed() {
        let args = parse(&[
            "--proxy-uid=1234",
            "--skip-inbound-ports=22,9000-9010",
            "--skip-outbound-ports=5432",
            "--skip-outbound-cidrs=169.254.169.254/32,fd00::/8,10.1.0.0/16",
        ])
        .unwrap();
        let v4 = ruleset(&args, Family::V4);
        assert_eq!(
            v4,
            "*nat\n\
             :FERRULE_INBOUND - [0:0]\n\
             :FERRULE_OUTPUT - [0:0]\n\
             -A FERRULE_INBOUND -p tcp --dport 4191 -j RETURN\n\
             -A FERRULE_INBOUND -p tcp --dport 22 -j RETURN\n\
             -A FERRULE_INBOUND -p tcp --dport 9000:9010 -j RETURN\n\
             -A FERRULE_INBOUND -p tcp -j REDIRECT --to-ports 4143\n\
             -A FERRULE_OUTPUT -m owner --uid-owner 1234 -j RETURN\n\
             -A FERRULE_OUTPUT -o lo -j RETURN\n\
             -A FERRULE_OUTPUT -d 169.254.169.254/32 -j RETURN\n\
             -A FERRULE_OUTPUT -d 10.1.0.0/16 -j RETURN\n\
             -A FERRULE_OUTPUT -p tcp --dport 5432 -j RETURN\n\
             -A FERRULE_OUTPUT -p tcp -j REDIRECT --to-ports 4140\n\
             COMMIT\n"
        );
        let v6 = ruleset(&args, Family::V6);
        assert!(
            v6.contains("-A FERRULE_OUTPUT -d fd00::/8 -j RETURN\n"),
            "{v6}"
        );
        assert!(!v6.contains("169.254"), "{v6}");
    }

    #[test]
    fn bad_values_are_refused_naming_them() {
        let err = |args: &[&str]| parse(args).err().unwrap().to_string();
        assert!(err(&["--skip-inbound-ports=http"]).contains("\"http\" is not a port"));
        assert!(err(&["--skip-outbound-ports=0"]).contains("is not a port"));
        assert!(err(&["--skip-outbound-ports=90-80"]).contains("ends before it starts"));
        assert!(err(&["--skip-outbound-cidrs=10.0.0.0/33"]).contains("is not 0-32"));
        assert!(err(&["--skip-outbound-cidrs=example.com"]).contains("is not an IP address"));
        assert!(err(&["--iptables-mode=xt"]).contains("xt"));
    }

    #[test]
    fn census_finds_ferrule_chains() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:FERRULE_INBOUND - [0:0]\n-A PREROUTING -j FERRULE_INBOUND\nCOMMIT\n";
        assert_eq!(census(save), (1, true));
        assert_eq!(
            census("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"),
            (0, false)
        );
    }
}
