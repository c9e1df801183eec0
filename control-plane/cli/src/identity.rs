//! `ferrule identity`: the mesh CA's files and credentials.
//!
//! * `init` creates a new mesh's trust anchor and issuer in a directory (nothing is ever
//!   generated silently elsewhere: the controller only loads what this wrote, or what the
//!   user's own PKI made), and the local user's admin credentials for the controller's API:
//!   a client certificate for `spiffe://<td>/ns/ferrule-system/sa/ferrule-admin` and a token.
//! * `issuer` makes a new issuer from an existing anchor (issuer rotation).
//! * `token create` asks the controller for a join token for one service.
//! * `status` shows the CA's anchors and issuer, with expiry, and each proxy's certificate
//!   (as the proxy reported it with its announce): identity, expiry, the anchor it chains to,
//!   and what is wrong with it (`ferrule_proto::certificate`).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ferrule_proto::certificate::{CertificateProblem, certificate_problem};
use ferrule_proto::identity::DEFAULT_TRUST_DOMAIN;
use ferrule_proto::v1::{
    CreateJoinTokenRequest, IdentityStatusRequest, identity_client::IdentityClient,
};
use serde::Serialize;

use crate::client::{self, ControllerAddr};
use crate::output::{self, Format, Render};

/// Files `init` writes, as the controller's `--identity-dir` expects them.
pub const TRUST_ANCHORS: &str = "trust-anchors.pem";
pub const ANCHOR_KEY: &str = "anchor.key";
pub const ISSUER_CERT: &str = "issuer.pem";
pub const ISSUER_KEY: &str = "issuer.key";
/// The administrator's client certificate (with the issuer after it) and key, and the admin
/// token: the local user's credentials for the controller's protected API.
pub const ADMIN_CERT: &str = "admin.pem";
pub const ADMIN_KEY: &str = "admin.key";
pub const ADMIN_TOKEN: &str = "admin-token";

#[derive(Debug, Args)]
pub struct IdentityArgs {
    #[command(subcommand)]
    command: IdentityCommand,
}

#[derive(Debug, Subcommand)]
enum IdentityCommand {
    /// Create a new mesh's trust anchor and issuer in a directory.
    ///
    /// Writes trust-anchors.pem, anchor.key, issuer.pem and issuer.key (keys readable by the
    /// owner only). Start the controller with `--identity-dir DIR`. Keep anchor.key offline:
    /// the controller needs only the issuer's key; the anchor's makes the next issuer.
    ///
    /// Also writes the admin's credentials for the controller's API: admin.pem and admin.key
    /// (a client certificate for spiffe://<td>/ns/ferrule-system/sa/ferrule-admin) and
    /// admin-token (read by the controller from the same directory). Use them with
    /// `ferrule --ca-file DIR/trust-anchors.pem --cert DIR/admin.pem --key DIR/admin.key ...`
    /// or `--token "$(cat DIR/admin-token)"`.
    ///
    /// Example: ferrule identity init --dir ./mesh-ca --trust-domain cluster.local
    Init(InitArgs),
    /// Make a new issuer signed by an existing trust anchor (issuer rotation).
    ///
    /// Writes issuer.pem and issuer.key, and admin.pem and admin.key: a new admin client
    /// certificate signed by the new issuer (the old one stops working once its issuer's anchor
    /// leaves the bundle).
    ///
    /// Example: ferrule identity issuer --anchor-dir ./mesh-ca --out-dir ./next-issuer
    Issuer(IssuerArgs),
    /// Join tokens: bootstrap credentials for workloads outside Kubernetes.
    Token(TokenArgs),
    /// Show the mesh CA: trust anchors, the issuer and when it expires, and each proxy's
    /// certificate.
    ///
    /// For every proxy: its identity, when its certificate expires, the anchor it chains to
    /// (the first 16 hex digits of the fingerprint) and a problem, if any: no certificate
    /// yet, expired, expires soon (less than 10 % of its lifetime left: renewal is failing),
    /// or chains to an anchor not in the trust bundle. During a trust anchor rotation, remove
    /// the old anchor only once every proxy shows the new one.
    ///
    /// Example: ferrule identity status -o json
    Status,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to write the files into (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The mesh's trust domain: the `<trust-domain>` in `spiffe://<trust-domain>/ns/...`.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// How long the trust anchor is valid.
    #[arg(long, default_value = "10years", value_parser = humantime::parse_duration)]
    anchor_lifetime: Duration,
    /// How long the issuer is valid (rotate it before; the controller warns).
    #[arg(long, default_value = "365days", value_parser = humantime::parse_duration)]
    issuer_lifetime: Duration,
    /// Replace files that already exist (an existing mesh's CA would be lost).
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct IssuerArgs {
    /// Directory holding the anchor to sign with (trust-anchors.pem's first certificate must be
    /// the anchor whose key is anchor.key).
    #[arg(long, value_name = "DIR")]
    anchor_dir: PathBuf,
    /// Where to write issuer.pem and issuer.key.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// How long the issuer is valid.
    #[arg(long, default_value = "365days", value_parser = humantime::parse_duration)]
    issuer_lifetime: Duration,
    /// Replace files that already exist.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a join token for one service; print it once (the controller keeps only a hash).
    ///
    /// Start the service's proxy with `--identity-token TOKEN` (or FERRULE_IDENTITY_TOKEN).
    ///
    /// Example: ferrule identity token create --service payment -n shop --ttl 1h
    Create(TokenCreateArgs),
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// The service the token proves (its identity is spiffe://<domain>/ns/<ns>/sa/<service>).
    #[arg(long)]
    service: String,
    /// The service's namespace.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// How long the token may be used to get a first certificate (renewals need no token).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

pub async fn run(args: IdentityArgs, addr: &ControllerAddr, format: Format) -> anyhow::Result<()> {
    match args.command {
        IdentityCommand::Init(args) => init(args),
        IdentityCommand::Issuer(args) => issuer(args),
        IdentityCommand::Token(TokenArgs {
            command: TokenCommand::Create(args),
        }) => token_create(args, addr, format).await,
        IdentityCommand::Status => status(addr, format).await,
    }
}

/// Writes a new mesh CA (anchor and issuer) into `dir`; refuses to replace one unless `force`.
pub fn create_ca(
    dir: &Path,
    trust_domain: &str,
    anchor_lifetime: Duration,
    issuer_lifetime: Duration,
    force: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let anchor = ferrule_ca::new_trust_anchor(trust_domain, anchor_lifetime)?;
    let issuer = ferrule_ca::new_issuer(
        &anchor.cert_pem,
        &anchor.key_pem,
        trust_domain,
        issuer_lifetime,
    )?;
    let admin = admin_credentials(trust_domain, &anchor.cert_pem, &issuer)?;
    let token = admin_token()?;
    let files = [
        (TRUST_ANCHORS, &anchor.cert_pem, false),
        (ANCHOR_KEY, &anchor.key_pem, true),
        (ISSUER_CERT, &issuer.cert_pem, false),
        (ISSUER_KEY, &issuer.key_pem, true),
        (ADMIN_CERT, &admin.cert_pem, false),
        (ADMIN_KEY, &admin.key_pem, true),
        (ADMIN_TOKEN, &token, true),
    ];
    refuse_overwrite(dir, files.iter().map(|f| f.0), force)?;
    for (name, text, secret) in files {
        write_file(&dir.join(name), text, secret)?;
    }
    Ok(())
}

/// The admin's client certificate (followed by the issuer) and key, signed by `issuer` for
/// as long as the issuer lives.
fn admin_credentials(
    trust_domain: &str,
    anchors_pem: &str,
    issuer: &ferrule_ca::Generated,
) -> anyhow::Result<ferrule_ca::Generated> {
    let ca = ferrule_ca::Ca::from_pem(
        trust_domain,
        anchors_pem.as_bytes(),
        issuer.cert_pem.as_bytes(),
        &issuer.key_pem,
    )?;
    let identity = ferrule_proto::identity::admin_identity(trust_domain)?;
    let key = rcgen::KeyPair::generate().context("making the admin's key")?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .context("making the admin's CSR")?;
    let now = time::OffsetDateTime::now_utc();
    let lifetime = (ca.issuer_info().not_after - now).unsigned_abs();
    let leaf = ca.sign(csr.der(), &identity, lifetime, now)?;
    let mut cert_pem = pem("CERTIFICATE", &leaf);
    cert_pem.push_str(&issuer.cert_pem);
    Ok(ferrule_ca::Generated {
        cert_pem,
        key_pem: key.serialize_pem(),
    })
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A new admin token: its prefix and 32 random bytes in hex.
fn admin_token() -> anyhow::Result<String> {
    use rand::Rng;
    let mut bytes = [0u8; 32];
    // ThreadRng: a CSPRNG seeded from the operating system.
    rand::rng().fill(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}{hex}\n",
        ferrule_proto::identity::ADMIN_TOKEN_PREFIX
    ))
}

/// A join token for each of `services` (namespace `default`), from the controller at `addr`.
pub async fn join_tokens(
    addr: &ControllerAddr,
    services: &[&str],
    ttl: Duration,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut identity = IdentityClient::new(client::connect(addr).await?);
    let mut tokens = std::collections::BTreeMap::new();
    for service in services {
        let rsp = client::call(
            addr,
            "Identity/CreateJoinToken",
            identity.create_join_token(CreateJoinTokenRequest {
                service: service.to_string(),
                namespace: String::new(),
                ttl_seconds: ttl.as_secs().max(1),
            }),
        )
        .await?;
        tokens.insert(service.to_string(), rsp.token);
    }
    Ok(tokens)
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    create_ca(
        &args.dir,
        &args.trust_domain,
        args.anchor_lifetime,
        args.issuer_lifetime,
        args.force,
    )?;
    println!(
        "mesh CA for trust domain {td} written to {dir}:\n  {TRUST_ANCHORS}  trust bundle (give to every controller, and to proxies as --identity-trust-anchors)\n  {ISSUER_CERT}, {ISSUER_KEY}  issuer (the controller signs with it)\n  {ANCHOR_KEY}  the anchor's key: move it offline, it is needed only to make the next issuer\n  {ADMIN_CERT}, {ADMIN_KEY}, {ADMIN_TOKEN}  your admin credentials for the controller's API\nstart the controller with: ferrule-controller --identity-dir {dir} --trust-domain {td}\nthen: ferrule --ca-file {dir}/{TRUST_ANCHORS} --cert {dir}/{ADMIN_CERT} --key {dir}/{ADMIN_KEY} get services",
        td = args.trust_domain,
        dir = args.dir.display(),
    );
    Ok(())
}

fn issuer(args: IssuerArgs) -> anyhow::Result<()> {
    let read = |name: &str| {
        let path = args.anchor_dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let issuer = ferrule_ca::new_issuer(
        &read(TRUST_ANCHORS)?,
        &read(ANCHOR_KEY)?,
        &args.trust_domain,
        args.issuer_lifetime,
    )?;
    // The admin's certificate lives as long as its issuer: a new one comes with each issuer.
    let admin = admin_credentials(&args.trust_domain, &read(TRUST_ANCHORS)?, &issuer)?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let files = [
        (ISSUER_CERT, &issuer.cert_pem, false),
        (ISSUER_KEY, &issuer.key_pem, true),
        (ADMIN_CERT, &admin.cert_pem, false),
        (ADMIN_KEY, &admin.key_pem, true),
    ];
    refuse_overwrite(&args.out_dir, files.iter().map(|f| f.0), args.force)?;
    for (name, text, secret) in files {
        write_file(&args.out_dir.join(name), text, secret)?;
    }
    println!(
        "new issuer written to {dir}: copy {ISSUER_KEY}, then {ISSUER_CERT}, over the controller's; it reloads them by itself\n  {ADMIN_CERT}, {ADMIN_KEY}  your admin credentials signed by the new issuer: use them once the old anchor is gone",
        dir = args.out_dir.display()
    );
    Ok(())
}

fn refuse_overwrite<'a>(
    dir: &Path,
    names: impl Iterator<Item = &'a str>,
    force: bool,
) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    let existing: Vec<&str> = names.filter(|n| dir.join(n).exists()).collect();
    if !existing.is_empty() {
        bail!(
            "{} already holds {}: refusing to replace a mesh's CA (use --force if you mean it)",
            dir.display(),
            existing.join(", ")
        );
    }
    Ok(())
}

/// Writes `text` to `path`; a secret is readable by its owner only from the moment it exists.
fn write_file(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    options.mode(if secret { 0o600 } else { 0o644 });
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[derive(Debug, Serialize)]
struct Token {
    token: String,
    identity: String,
    expires_at: i64,
}

impl Render for Token {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "{}", self.token)?;
        // The token alone goes to stdout so `$(ferrule identity token create ...)` works.
        eprintln!(
            "join token for {}, usable until {} (unix {})",
            self.identity,
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_secs(self.expires_at.max(0) as u64)
            ),
            self.expires_at
        );
        Ok(())
    }
}

async fn token_create(
    args: TokenCreateArgs,
    addr: &ControllerAddr,
    format: Format,
) -> anyhow::Result<()> {
    let mut identity = IdentityClient::new(client::connect(addr).await?);
    let rsp = client::call(
        addr,
        "Identity/CreateJoinToken",
        identity.create_join_token(CreateJoinTokenRequest {
            service: args.service,
            namespace: args.namespace,
            ttl_seconds: args.ttl.as_secs().max(1),
        }),
    )
    .await?;
    let doc = Token {
        token: rsp.token,
        identity: rsp.identity,
        expires_at: rsp.expires_at,
    };
    output::render(&doc, format, &mut io::stdout().lock())
}

#[derive(Debug, Serialize)]
struct Status {
    enabled: bool,
    trust_domain: String,
    trust_anchors: Vec<Cert>,
    issuer: Option<Cert>,
    /// Fingerprint of the anchor the issuer chains to.
    issuer_anchor: String,
    problem: Option<String>,
    /// Every proxy the controller knows of, with its certificate.
    proxies: Vec<ProxyCert>,
}

/// One proxy's certificate as `identity status` shows it.
#[derive(Debug, Serialize, PartialEq)]
struct ProxyCert {
    proxy_id: String,
    /// Qualified: `service` or `service.namespace`.
    service: String,
    /// False for a proxy that runs without identity (it reports no certificate).
    identity_enabled: bool,
    /// The SPIFFE id the certificate carries; `None` before the first certificate.
    identity: Option<String>,
    not_before: Option<String>,
    not_after: Option<String>,
    /// Fingerprint of the anchor the certificate chains to.
    anchor_fingerprint: Option<String>,
    /// `no_certificate`, `expired`, `unknown_anchor` or `expires_soon`.
    problem: Option<String>,
}

impl ProxyCert {
    /// `status`'s view of `proxy` against the trust bundle `bundle` (anchor fingerprints) at
    /// `now` (unix seconds).
    fn of(proxy: &ferrule_proto::v1::ProxyInfo, bundle: &[String], now: i64) -> Self {
        let cert = proxy.certificate.as_ref();
        let known = cert.filter(|c| !c.identity.is_empty());
        Self {
            proxy_id: proxy.proxy_id.clone(),
            service: ferrule_proto::names::qualified(&proxy.namespace, &proxy.service),
            identity_enabled: cert.is_some(),
            identity: known.map(|c| c.identity.clone()),
            not_before: known.map(|c| rfc3339(c.not_before)),
            not_after: known.map(|c| rfc3339(c.not_after)),
            anchor_fingerprint: known
                .map(|c| c.anchor_fingerprint.clone())
                .filter(|f| !f.is_empty()),
            problem: certificate_problem(cert, bundle, now).map(|p| p.code().to_string()),
        }
    }
}

#[derive(Debug, Serialize)]
struct Cert {
    subject: String,
    not_before: String,
    not_after: String,
    fingerprint: String,
}

fn rfc3339(unix: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64),
    )
    .to_string()
}

impl From<ferrule_proto::v1::CertificateSummary> for Cert {
    fn from(c: ferrule_proto::v1::CertificateSummary) -> Self {
        Self {
            subject: c.subject,
            not_before: rfc3339(c.not_before),
            not_after: rfc3339(c.not_after),
            fingerprint: c.fingerprint,
        }
    }
}

impl Render for Status {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
        if !self.enabled {
            writeln!(
                out,
                "identity: disabled ({})",
                self.problem.as_deref().unwrap_or("")
            )?;
            return Ok(());
        }
        writeln!(out, "trust domain: {}", self.trust_domain)?;
        let mut rows = Vec::new();
        for anchor in &self.trust_anchors {
            let used = if anchor.fingerprint == self.issuer_anchor {
                "yes"
            } else {
                "no"
            };
            rows.push(vec![
                "anchor".into(),
                anchor.subject.clone(),
                anchor.not_after.clone(),
                short(&anchor.fingerprint),
                used.into(),
            ]);
        }
        if let Some(issuer) = &self.issuer {
            rows.push(vec![
                "issuer".into(),
                issuer.subject.clone(),
                issuer.not_after.clone(),
                short(&issuer.fingerprint),
                "-".into(),
            ]);
        }
        output::write_table(
            out,
            &["KIND", "SUBJECT", "EXPIRES", "FINGERPRINT", "SIGNS ISSUER"],
            &rows,
        )?;
        if let Some(problem) = &self.problem {
            writeln!(out, "problem: {problem}")?;
        }
        writeln!(out)?;
        if self.proxies.is_empty() {
            return writeln!(out, "no proxies");
        }
        let rows: Vec<Vec<String>> = self
            .proxies
            .iter()
            .map(|p| {
                let identity = match (&p.identity, p.identity_enabled) {
                    (Some(id), _) => id.clone(),
                    (None, true) => String::new(),
                    (None, false) => "(no identity)".into(),
                };
                let problem = p
                    .problem
                    .as_deref()
                    .and_then(CertificateProblem::from_code)
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                vec![
                    p.proxy_id.clone(),
                    p.service.clone(),
                    identity,
                    p.not_after.clone().unwrap_or_default(),
                    p.anchor_fingerprint
                        .as_deref()
                        .map(short)
                        .unwrap_or_default(),
                    problem,
                ]
            })
            .collect();
        output::write_table(
            out,
            &[
                "PROXY", "SERVICE", "IDENTITY", "EXPIRES", "ANCHOR", "PROBLEM",
            ],
            &rows,
        )
    }
}

/// The first 16 hex digits of a fingerprint, as tables show it.
fn short(fingerprint: &str) -> String {
    fingerprint.get(..16).unwrap_or(fingerprint).to_string()
}

async fn status(addr: &ControllerAddr, format: Format) -> anyhow::Result<()> {
    let mut identity = IdentityClient::new(client::connect(addr).await?);
    let rsp = client::call(
        addr,
        "Identity/Status",
        identity.status(IdentityStatusRequest {}),
    )
    .await?;
    let bundle: Vec<String> = rsp
        .trust_anchors
        .iter()
        .map(|a| a.fingerprint.clone())
        .collect();
    let now = ferrule_proto::certificate::unix_now();
    let mut proxies: Vec<ProxyCert> = client::list_proxies(addr)
        .await?
        .iter()
        .filter_map(|status| status.proxy.as_ref())
        .map(|proxy| ProxyCert::of(proxy, &bundle, now))
        .collect();
    proxies.sort_by(|a, b| (&a.service, &a.proxy_id).cmp(&(&b.service, &b.proxy_id)));
    let doc = Status {
        proxies,
        enabled: rsp.enabled,
        trust_domain: rsp.trust_domain,
        trust_anchors: rsp.trust_anchors.into_iter().map(Cert::from).collect(),
        issuer: rsp.issuer.map(Cert::from),
        issuer_anchor: rsp.issuer_anchor,
        problem: (!rsp.problem.is_empty()).then_some(rsp.problem),
    };
    output::render(&doc, format, &mut io::stdout().lock())
}

#[cfg(test)]
mod tests {
    use ferrule_proto::v1::{ProxyCertificate, ProxyInfo};

    use super::*;

    fn proxy(id: &str, certificate: Option<ProxyCertificate>) -> ProxyInfo {
        ProxyInfo {
            proxy_id: id.into(),
            service: "user".into(),
            namespace: "shop".into(),
            certificate,
            ..Default::default()
        }
    }

    #[test]
    fn each_proxy_shows_its_certificate_and_problem() {
        let anchor = "ab".repeat(32);
        let bundle = vec![anchor.clone()];
        let now = 1_000_000;
        let good = ProxyCertificate {
            identity: "spiffe://cluster.local/ns/shop/sa/user".into(),
            not_before: now - 100,
            not_after: now + 1000,
            anchor_fingerprint: anchor.clone(),
        };
        let old_anchor = ProxyCertificate {
            anchor_fingerprint: "cd".repeat(32),
            ..good.clone()
        };
        let views = [
            ProxyCert::of(&proxy("a", Some(good)), &bundle, now),
            ProxyCert::of(&proxy("b", Some(old_anchor)), &bundle, now),
            ProxyCert::of(&proxy("c", Some(ProxyCertificate::default())), &bundle, now),
            ProxyCert::of(&proxy("d", None), &bundle, now),
        ];
        assert_eq!(views[0].service, "user.shop");
        assert_eq!(
            views[0].anchor_fingerprint.as_deref(),
            Some(anchor.as_str())
        );
        assert_eq!(
            views[0].not_after.as_deref(),
            Some(rfc3339(now + 1000).as_str())
        );
        let problems: Vec<Option<&str>> = views.iter().map(|v| v.problem.as_deref()).collect();
        assert_eq!(
            problems,
            [None, Some("unknown_anchor"), Some("no_certificate"), None]
        );
        assert!(!views[3].identity_enabled && views[3].identity.is_none());

        let doc = Status {
            enabled: true,
            trust_domain: "cluster.local".into(),
            trust_anchors: Vec::new(),
            issuer: None,
            issuer_anchor: anchor.clone(),
            problem: None,
            proxies: views.into(),
        };
        let mut out = Vec::new();
        doc.write_human(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("PROXY"))
            .collect();
        assert!(
            lines[0].contains("ANCHOR") && lines[0].contains("PROBLEM"),
            "{text}"
        );
        assert!(
            lines[1].contains("abababababababab") && lines[1].ends_with('-'),
            "{text}"
        );
        assert!(
            lines[2].ends_with("chains to an anchor not in the trust bundle"),
            "{text}"
        );
        assert!(lines[3].ends_with("no certificate yet"), "{text}");
        assert!(lines[4].contains("(no identity)"), "{text}");
    }
}
