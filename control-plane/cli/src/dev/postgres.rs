//! `ferrule dev up --postgres`: the PostgreSQL server the shop's apps share, one database per
//! service, run from the state dir.
//!
//! It uses Debian's `postgresql` package (`/usr/lib/postgresql/<version>/bin`, installed by
//! `make deps`). The cluster lives in `<state dir>/postgres/data`, created by `initdb` on the
//! first start and kept, like the SQLite files, across runs. PostgreSQL refuses to run as root,
//! so when `dev up` runs as root the server (and `initdb`) run as the package's `postgres` user.
//! The server listens on loopback only, with no Unix socket, and trusts its clients: it is a
//! development database, reached by the apps only through their sidecars.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};

/// What `make deps` installs; said whenever PostgreSQL cannot be found.
const INSTALL: &str = "install it with `make deps` (or `apt-get install postgresql`)";
/// The superuser `initdb` creates and the apps connect as.
pub const USER: &str = "ferrule";
/// The line the server logs once it accepts connections.
pub const READY_LINE: &str = "database system is ready to accept connections";

/// An initialised cluster, ready to be started.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `/usr/lib/postgresql/<version>/bin`.
    pub bin: PathBuf,
    /// The data directory.
    pub data: PathBuf,
    /// The uid and gid the server runs as when `dev up` runs as root.
    pub run_as: Option<(u32, u32)>,
}

impl Cluster {
    /// Finds PostgreSQL and creates the cluster in `<state_dir>/postgres/data` unless it is
    /// there already.
    pub fn prepare(state_dir: &Path) -> anyhow::Result<Cluster> {
        let bin = bin_dir()?;
        let run_as = unprivileged_owner()?;
        let home = state_dir.join("postgres");
        let data = home.join("data");
        let cluster = Cluster { bin, data, run_as };
        if cluster.data.join("PG_VERSION").is_file() {
            return Ok(cluster);
        }
        std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&home, Some(uid), Some(gid))
                .with_context(|| format!("handing {} to the postgres user", home.display()))?;
        }
        let mut initdb = std::process::Command::new(cluster.bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&cluster.data)
            .args(["-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C"])
            .stdin(Stdio::null());
        if let Some((uid, gid)) = run_as {
            initdb.uid(uid).gid(gid);
        }
        println!(
            "creating a PostgreSQL cluster in {}",
            cluster.data.display()
        );
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            let mut message = format!(
                "initdb failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            if run_as.is_some() {
                message.push_str(&format!(
                    "\nPostgreSQL refuses root, so it runs as the `postgres` user, which must be \
                     able to reach {}: use a --state-dir it can (e.g. under /tmp)",
                    home.display()
                ));
            }
            bail!(message);
        }
        Ok(cluster)
    }

    /// The server's command line, listening on `port` of 127.0.0.1.
    pub fn server_args(&self, port: u16) -> Vec<String> {
        vec![
            "-D".into(),
            self.data.to_string_lossy().into_owned(),
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            // No Unix socket: a deep state dir would make its path too long, and the apps
            // only ever come over TCP (through their sidecars).
            "-k".into(),
            String::new(),
        ]
    }

    /// Creates `database` on the server at `port` unless it exists.
    pub async fn create_database(&self, port: u16, database: &str) -> anyhow::Result<()> {
        let out = tokio::process::Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                USER,
                database,
            ])
            .stdin(Stdio::null())
            .output()
            .await
            .context("running createdb")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || stderr.contains("already exists") {
            return Ok(());
        }
        bail!(
            "creating database {database}: createdb failed ({}): {}",
            out.status,
            stderr.trim()
        )
    }
}

/// The URL an app uses for its `database`, dialling `local` (its sidecar's port for
/// `postgres`).
pub fn url(local: std::net::SocketAddr, database: &str) -> String {
    format!("postgres://{USER}@{local}/{database}")
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding the server binaries.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .with_context(|| {
            format!(
                "--postgres needs PostgreSQL, which is not installed ({} is missing): {INSTALL}",
                root.display()
            )
        })?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            ["initdb", "postgres", "createdb"]
                .iter()
                .all(|b| bin.join(b).is_file())
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "--postgres needs PostgreSQL's server (initdb, postgres, createdb under {}): {INSTALL}",
            root.display()
        ),
    }
}

/// As root, the `postgres` user's uid and gid; otherwise `None` (the server runs as the user
/// running `dev up`).
fn unprivileged_owner() -> anyhow::Result<Option<(u32, u32)>> {
    let me = std::fs::metadata("/proc/self")
        .context("reading /proc/self")?
        .uid();
    if me != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    let owner = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() != Some(&"postgres") || fields.len() < 4 {
            return None;
        }
        Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
    });
    match owner {
        Some(owner) => Ok(Some(owner)),
        None => bail!(
            "dev up runs as root and PostgreSQL refuses root, but there is no `postgres` user to \
             run it as: {INSTALL} (the package creates the user)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_listens_on_loopback_only_and_apps_dial_their_sidecar() {
        let cluster = Cluster {
            bin: "/usr/lib/postgresql/15/bin".into(),
            data: "/state/postgres/data".into(),
            run_as: None,
        };
        assert_eq!(
            cluster.server_args(5433),
            [
                "-D",
                "/state/postgres/data",
                "-h",
                "127.0.0.1",
                "-p",
                "5433",
                "-k",
                ""
            ]
        );
        assert_eq!(
            url("127.0.0.1:20003".parse().unwrap(), "order"),
            "postgres://ferrule@127.0.0.1:20003/order"
        );
    }
}
