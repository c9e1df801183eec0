//! The configuration centre's verbs: `apply`, `get config`, `delete`, `diff`, `history`,
//! `rollback` and `status`.
//!
//! Files are parsed here with `ferrule-config` so that a mistake is reported with the file, the
//! document and the field before anything is sent; the controller validates again (it is the
//! authority: references to services, rules across stored resources) and stores all or nothing.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use ferrule_config::{Kind, Resource};
use ferrule_proto::v1::admin_client::AdminClient;
use ferrule_proto::v1::{
    self as pb, ApplyConfigRequest, ConfigHistoryRequest, DeleteConfigRequest, GetConfigRequest,
    ListUnreadableRequest, RollbackConfigRequest,
};
use serde::Serialize;

use crate::client::{self, ControllerAddr};
use crate::output::{self, Format, Render, write_table};

/// `-f FILE|DIR|-`, shared by apply and diff.
#[derive(Debug, Args)]
pub struct FileArgs {
    /// A YAML or JSON file of one or more resources, a directory of them (*.yaml, *.yml,
    /// *.json, read in name order), or `-` for standard input.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR|-",
        required = true
    )]
    files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    files: FileArgs,
    /// Validate with the controller and report what would change, storing nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// ServicePolicy, HTTPRoute or Gateway (case-insensitive, plural accepted).
    #[arg(value_parser = parse_kind)]
    kind: Kind,
    name: String,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// KIND, KIND/NAME or KIND/NAMESPACE/NAME; every config change when omitted.
    #[arg(value_name = "KIND[/NAME]")]
    target: Option<String>,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The config version to restore (see `ferrule history`).
    #[arg(long = "to", value_name = "VERSION", value_parser = clap::value_parser!(i64).range(1..))]
    to: i64,
}

/// `ferrule get config [KIND [NAME]]`.
#[derive(Debug, Args)]
pub struct GetConfigArgs {
    /// ServicePolicy, HTTPRoute or Gateway (case-insensitive, plural accepted); every kind
    /// when omitted.
    #[arg(value_parser = parse_kind)]
    kind: Option<Kind>,
    /// One resource of that kind.
    name: Option<String>,
    /// Namespace (every namespace when omitted and no NAME is given).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    s.parse::<Kind>().map_err(|e| e.to_string())
}

/// Reads and parses every resource named by `-f`, naming the file on error.
fn read_resources(args: &FileArgs) -> anyhow::Result<Vec<Resource>> {
    let mut files = Vec::new();
    for path in &args.files {
        if path.as_os_str() == "-" {
            files.push(path.clone());
        } else if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read directory {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                })
                .collect();
            entries.sort();
            if entries.is_empty() {
                bail!("{} holds no *.yaml, *.yml or *.json file", path.display());
            }
            files.extend(entries);
        } else {
            files.push(path.clone());
        }
    }
    let mut resources = Vec::new();
    for file in files {
        let text = read_text(&file)?;
        let parsed =
            Resource::parse_documents(&text).with_context(|| format!("{}", file.display()))?;
        if parsed.is_empty() {
            bail!("{}: no resource in it", file.display());
        }
        resources.extend(parsed);
    }
    Ok(resources)
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

fn to_proto(r: &Resource) -> pb::Resource {
    pb::Resource {
        kind: r.kind.to_string(),
        namespace: r.metadata.namespace.clone(),
        name: r.metadata.name.clone(),
        spec_json: r.spec_json(),
        revision: 0,
    }
}

fn from_proto(r: &pb::Resource) -> anyhow::Result<Resource> {
    Resource::from_parts(&r.kind, &r.namespace, &r.name, &r.spec_json)
        .with_context(|| format!("the controller sent {}/{}/{}", r.kind, r.namespace, r.name))
}

#[derive(Debug, Serialize)]
struct ApplyResult {
    version: i64,
    dry_run: bool,
    resources: Vec<ResourceOutcome>,
}

#[derive(Debug, Serialize)]
struct ResourceOutcome {
    resource: String,
    outcome: String,
}

impl Render for ApplyResult {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
        let suffix = if self.dry_run { " (dry run)" } else { "" };
        for r in &self.resources {
            writeln!(out, "{} {}{suffix}", r.resource, r.outcome)?;
        }
        if self.dry_run {
            writeln!(out, "config version stays {}", self.version)
        } else {
            writeln!(out, "config version {}", self.version)
        }
    }
}

pub async fn apply(args: ApplyArgs, addr: &ControllerAddr, format: Format) -> anyhow::Result<()> {
    let resources = read_resources(&args.files)?;
    let mut admin = AdminClient::new(client::connect(addr).await?);
    let resp = client::call(
        addr,
        "Admin/ApplyConfig",
        admin.apply_config(ApplyConfigRequest {
            resources: resources.iter().map(to_proto).collect(),
            dry_run: args.dry_run,
        }),
    )
    .await?;
    let doc = ApplyResult {
        version: resp.version,
        dry_run: args.dry_run,
        resources: resources
            .iter()
            .zip(resp.outcomes)
            .map(|(r, outcome)| ResourceOutcome {
                resource: r.id().to_string(),
                outcome,
            })
            .collect(),
    };
    output::render(&doc, format, &mut io::stdout().lock())
}

async fn fetch(
    addr: &ControllerAddr,
    kind: Option<Kind>,
    namespace: &str,
    name: &str,
) -> anyhow::Result<(Vec<(Resource, i64)>, i64)> {
    let (resources, _, version) = fetch_all(addr, kind, namespace, name).await?;
    Ok((resources, version))
}

/// [`fetch`], and the stored values under the same keys the controller cannot read.
async fn fetch_all(
    addr: &ControllerAddr,
    kind: Option<Kind>,
    namespace: &str,
    name: &str,
) -> anyhow::Result<(Vec<(Resource, i64)>, Vec<Unreadable>, i64)> {
    let mut admin = AdminClient::new(client::connect(addr).await?);
    let resp = client::call(
        addr,
        "Admin/GetConfig",
        admin.get_config(GetConfigRequest {
            kind: kind.map(|k| k.to_string()).unwrap_or_default(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }),
    )
    .await?;
    let resources = resp
        .resources
        .iter()
        .map(|r| Ok((from_proto(r)?, r.revision)))
        .collect::<anyhow::Result<_>>()?;
    let unreadable = resp
        .unreadable
        .into_iter()
        .map(|u| Unreadable::new("config", u))
        .collect();
    Ok((resources, unreadable, resp.version))
}

/// A stored value the controller skips because it cannot read it.
#[derive(Debug, Serialize)]
pub struct Unreadable {
    /// `config` or `registry`.
    area: &'static str,
    key: String,
    reason: String,
    revision: i64,
}

impl Unreadable {
    fn new(area: &'static str, u: pb::UnreadableKey) -> Self {
        Self {
            area,
            key: u.key,
            reason: u.reason,
            revision: u.revision,
        }
    }
}

/// Writes the unreadable values as a table under a heading that says what they are.
fn write_unreadable(out: &mut dyn Write, unreadable: &[Unreadable]) -> io::Result<()> {
    if unreadable.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "\n{} stored value(s) cannot be read and are skipped by the controller:",
        unreadable.len()
    )?;
    let rows: Vec<Vec<String>> = unreadable
        .iter()
        .map(|u| vec![u.key.clone(), u.reason.clone(), u.revision.to_string()])
        .collect();
    write_table(out, &["UNREADABLE KEY", "REASON", "WRITTEN-AT"], &rows)
}

pub async fn get(args: GetConfigArgs, addr: &ControllerAddr, format: Format) -> anyhow::Result<()> {
    if args.name.is_some() && args.kind.is_none() {
        bail!("a NAME needs a KIND before it");
    }
    let namespace = args.namespace.clone().unwrap_or_default();
    let (resources, unreadable, version) = fetch_all(
        addr,
        args.kind,
        &namespace,
        args.name.as_deref().unwrap_or(""),
    )
    .await?;
    if let Some(name) = &args.name
        && resources.is_empty()
        && unreadable.is_empty()
    {
        bail!(
            "{}/{}/{name} not found",
            args.kind.map(|k| k.to_string()).unwrap_or_default(),
            args.namespace.as_deref().unwrap_or("default")
        );
    }
    let mut out = io::stdout().lock();
    match format {
        // YAML output is the resources themselves, ready to edit and apply again; what cannot
        // be read is said on stderr.
        Format::Yaml => {
            for (i, (r, _)) in resources.iter().enumerate() {
                if i > 0 {
                    writeln!(out, "---")?;
                }
                write!(out, "{}", r.to_yaml())?;
            }
            write_unreadable(&mut io::stderr().lock(), &unreadable)?;
            Ok(())
        }
        Format::Json => {
            let docs: Vec<&Resource> = resources.iter().map(|(r, _)| r).collect();
            let doc = serde_json::json!({
                "version": version,
                "resources": docs,
                "unreadable": unreadable,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
            Ok(())
        }
        Format::Table => {
            if resources.is_empty() && unreadable.is_empty() {
                eprintln!("no config resources (config version {version})");
                return Ok(());
            }
            if resources.is_empty() {
                writeln!(out, "no readable config resources")?;
            } else {
                let rows: Vec<Vec<String>> = resources
                    .iter()
                    .map(|(r, rev)| {
                        vec![
                            r.kind.to_string(),
                            r.metadata.namespace.clone(),
                            r.metadata.name.clone(),
                            // A Gateway configures the gateway its name names, not a service.
                            r.spec.service().unwrap_or("-").to_string(),
                            rev.to_string(),
                        ]
                    })
                    .collect();
                write_table(
                    &mut out,
                    &["KIND", "NAMESPACE", "NAME", "SERVICE", "CHANGED-AT"],
                    &rows,
                )?;
            }
            writeln!(out, "config version {version}")?;
            write_unreadable(&mut out, &unreadable)?;
            Ok(())
        }
    }
}

pub async fn delete(args: DeleteArgs, addr: &ControllerAddr) -> anyhow::Result<()> {
    let mut admin = AdminClient::new(client::connect(addr).await?);
    let resp = client::call(
        addr,
        "Admin/DeleteConfig",
        admin.delete_config(DeleteConfigRequest {
            kind: args.kind.to_string(),
            namespace: args.namespace.clone(),
            name: args.name.clone(),
        }),
    )
    .await?;
    println!(
        "{}/{}/{} deleted\nconfig version {}",
        args.kind, args.namespace, args.name, resp.version
    );
    Ok(())
}

/// Prints, per resource in the files, how it differs from what is stored. Exits with status 1
/// when anything differs (as `diff` and `kubectl diff` do), 0 when all is in sync.
pub async fn diff(args: FileArgs, addr: &ControllerAddr) -> anyhow::Result<bool> {
    let resources = read_resources(&args)?;
    let mut out = io::stdout().lock();
    let mut differs = false;
    for r in &resources {
        let (stored, _) =
            fetch(addr, Some(r.kind), &r.metadata.namespace, &r.metadata.name).await?;
        let before = stored.first().map(|(s, _)| s.to_yaml()).unwrap_or_default();
        let after = r.to_yaml();
        if before == after {
            continue;
        }
        differs = true;
        let id = r.id();
        let from = if stored.is_empty() {
            "/dev/null".to_string()
        } else {
            format!("stored/{id}")
        };
        writeln!(out, "--- {from}\n+++ file/{id}")?;
        let text = similar::TextDiff::from_lines(&before, &after);
        write!(out, "{}", text.unified_diff().context_radius(3))?;
    }
    Ok(differs)
}

#[derive(Debug, Serialize)]
struct History {
    changes: Vec<Change>,
}

#[derive(Debug, Serialize)]
struct Change {
    version: i64,
    resource: String,
    change: &'static str,
}

impl Render for History {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
        let rows: Vec<Vec<String>> = self
            .changes
            .iter()
            .map(|c| {
                vec![
                    c.version.to_string(),
                    c.resource.clone(),
                    c.change.to_string(),
                ]
            })
            .collect();
        write_table(out, &["VERSION", "RESOURCE", "CHANGE"], &rows)
    }
}

pub async fn history(
    args: HistoryArgs,
    addr: &ControllerAddr,
    format: Format,
) -> anyhow::Result<()> {
    let (kind, namespace, name) = match args.target.as_deref() {
        None => (String::new(), String::new(), String::new()),
        Some(t) => {
            let parts: Vec<&str> = t.split('/').collect();
            let kind = parse_kind(parts[0]).map_err(|e| anyhow::anyhow!("KIND[/NAME]: {e}"))?;
            match parts[1..] {
                [] => (kind.to_string(), String::new(), String::new()),
                [name] => (kind.to_string(), "default".to_string(), name.to_string()),
                [ns, name] => (kind.to_string(), ns.to_string(), name.to_string()),
                _ => {
                    bail!("KIND[/NAME]: expected KIND, KIND/NAME or KIND/NAMESPACE/NAME, got {t:?}")
                }
            }
        }
    };
    let mut admin = AdminClient::new(client::connect(addr).await?);
    let resp = client::call(
        addr,
        "Admin/ConfigHistory",
        admin.config_history(ConfigHistoryRequest {
            kind,
            namespace,
            name,
        }),
    )
    .await?;
    let mut seen: BTreeMap<String, ()> = BTreeMap::new();
    let changes = resp
        .changes
        .into_iter()
        .filter_map(|c| {
            let r = c.resource?;
            let id = format!("{}/{}/{}", r.kind, r.namespace, r.name);
            let change = if c.deleted {
                "deleted"
            } else if seen.insert(id.clone(), ()).is_some() {
                "configured"
            } else {
                "created"
            };
            if c.deleted {
                seen.remove(&id);
            }
            Some(Change {
                version: c.version,
                resource: id,
                change,
            })
        })
        .collect();
    let doc = History { changes };
    if doc.changes.is_empty() && format == Format::Table {
        eprintln!("no config changes in the store's history");
    }
    output::render(&doc, format, &mut io::stdout().lock())
}

pub async fn rollback(
    args: RollbackArgs,
    addr: &ControllerAddr,
    format: Format,
) -> anyhow::Result<()> {
    let mut admin = AdminClient::new(client::connect(addr).await?);
    let resp = client::call(
        addr,
        "Admin/RollbackConfig",
        admin.rollback_config(RollbackConfigRequest {
            to_version: args.to,
        }),
    )
    .await?;
    let doc = serde_json::json!({
        "restored": args.to,
        "version": resp.version,
        "changes": resp.outcomes,
    });
    match format {
        Format::Table => {
            let mut out = io::stdout().lock();
            for change in &resp.outcomes {
                writeln!(out, "{change}")?;
            }
            if resp.outcomes.is_empty() {
                writeln!(out, "config already matches version {}", args.to)?;
            }
            writeln!(
                out,
                "restored version {} as config version {}",
                args.to, resp.version
            )?;
            Ok(())
        }
        Format::Json => {
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(())
        }
        Format::Yaml => {
            print!("{}", serde_yaml::to_string(&doc)?);
            Ok(())
        }
    }
}

#[derive(Debug, Serialize)]
struct Status {
    config_version: i64,
    proxies: Vec<ProxyConfigStatus>,
    /// Stored values (config and registry) the controller skips because it cannot read them.
    unreadable: Vec<Unreadable>,
}

#[derive(Debug, Serialize)]
struct ProxyConfigStatus {
    proxy_id: String,
    service: String,
    address: String,
    mode: String,
    acked_version: i64,
    nacked_version: i64,
    nack_reason: String,
    in_sync: bool,
    last_seen: i64,
}

impl Render for Status {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
        let rows: Vec<Vec<String>> = self
            .proxies
            .iter()
            .map(|p| {
                let state = if p.in_sync {
                    "in sync".to_string()
                } else if p.nacked_version > p.acked_version {
                    format!("nacked {}: {}", p.nacked_version, p.nack_reason)
                } else {
                    "behind".to_string()
                };
                vec![
                    p.proxy_id.clone(),
                    p.service.clone(),
                    p.address.clone(),
                    p.mode.clone(),
                    p.acked_version.to_string(),
                    state,
                ]
            })
            .collect();
        write_table(
            out,
            &["PROXY", "SERVICE", "ADDRESS", "MODE", "CONFIG", "STATE"],
            &rows,
        )?;
        writeln!(out, "config version {}", self.config_version)?;
        write_unreadable(out, &self.unreadable)
    }
}

pub async fn status(addr: &ControllerAddr, format: Format) -> anyhow::Result<()> {
    let (_, config_version) = fetch(addr, None, "", "").await?;
    let mut proxies: Vec<ProxyConfigStatus> = client::list_proxies(addr)
        .await?
        .into_iter()
        .map(|p| {
            let info = p.proxy.unwrap_or_default();
            ProxyConfigStatus {
                proxy_id: info.proxy_id,
                service: info.service,
                address: info.address,
                mode: info.mode,
                acked_version: p.acked_version,
                nacked_version: p.nacked_version,
                nack_reason: p.nack_reason,
                in_sync: p.acked_version == config_version,
                last_seen: p.last_seen,
            }
        })
        .collect();
    proxies.sort_by(|a, b| (&a.service, &a.proxy_id).cmp(&(&b.service, &b.proxy_id)));
    let mut admin = AdminClient::new(client::connect(addr).await?);
    let resp = client::call(
        addr,
        "Admin/ListUnreadable",
        admin.list_unreadable(ListUnreadableRequest {}),
    )
    .await?;
    let unreadable = resp
        .config
        .into_iter()
        .map(|u| Unreadable::new("config", u))
        .chain(
            resp.registry
                .into_iter()
                .map(|u| Unreadable::new("registry", u)),
        )
        .collect();
    let doc = Status {
        config_version,
        proxies,
        unreadable,
    };
    if doc.proxies.is_empty() && format == Format::Table {
        eprintln!("no proxies are connected");
    }
    output::render(&doc, format, &mut io::stdout().lock())
}
