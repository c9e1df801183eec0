//! A real, throw-away PostgreSQL server for tests: `initdb` into a temporary folder, `postgres`
//! on a loopback port, stopped and removed when the [`PgServer`] guard is dropped (also when
//! the test panics).
//!
//! It uses Debian's `postgresql` package (`/usr/lib/postgresql/<version>/bin`). PostgreSQL
//! refuses to run as root, so as root the server runs as the package's `postgres` user. A test
//! that needs the server fails when it is missing, saying how to install it: it never passes
//! without having run.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::DatabaseUrl;

/// What `make deps` installs; said whenever the server cannot be found.
const INSTALL: &str = "install PostgreSQL with `make deps` (or `apt-get install postgresql`)";
/// The superuser `initdb` creates; the tests connect as it, without a password.
pub const USER: &str = "shop";
/// How long the server gets to start or stop.
const WITHIN: Duration = Duration::from_secs(30);
/// Starts on a newly chosen port after the last one was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// A running PostgreSQL server; stopped, and its folder removed, on drop.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    owner: Option<(u32, u32)>,
    port: u16,
    child: Option<Child>,
}

impl PgServer {
    /// Creates a cluster in a temporary folder and starts a server on a free loopback port.
    pub fn start() -> Result<Self, String> {
        let bin = bin_dir()?;
        let owner = unprivileged_owner()?;
        let dir = tempfile::Builder::new()
            .prefix("shop-pg-")
            .tempdir()
            .map_err(|e| format!("creating a folder for PostgreSQL: {e}"))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| format!("handing {} to postgres: {e}", dir.path().display()))?;
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut server = Self {
            bin,
            dir,
            owner,
            port: 0,
            child: None,
        };
        let mut attempt = 1;
        loop {
            server.port = free_port()?;
            match server.run() {
                Err(e) if e.contains("already in use") && attempt < PORT_ATTEMPTS => attempt += 1,
                other => return other.map(|()| server),
            }
        }
    }

    /// The server's loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of `database` on this server (see [`PgServer::create_database`]).
    pub fn url(&self, database: &str) -> DatabaseUrl {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
            .parse()
            .expect("a well-formed URL")
    }

    /// Creates `database`.
    pub async fn create_database(&self, database: &str) -> Result<DatabaseUrl, String> {
        let admin = format!(
            "host=127.0.0.1 port={} user={USER} dbname=postgres",
            self.port
        );
        let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connecting to the test server: {e}"))?;
        let connection = tokio::spawn(connection);
        let created = client
            .batch_execute(&format!("CREATE DATABASE \"{database}\""))
            .await
            .map_err(|e| format!("creating database {database}: {e}"));
        drop(client);
        let _ = connection.await;
        created.map(|()| self.url(database))
    }

    /// Stops the server at once, as a crash would (immediate shutdown): its clients lose their
    /// connections mid-use.
    pub fn kill(&mut self) -> Result<(), String> {
        self.stop("QUIT")
    }

    /// Sends `sig` and waits (bounded) for the server to exit; kills it if it does not.
    fn stop(&mut self, sig: &str) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        signal(&child, sig);
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "PostgreSQL ignored SIG{sig} for {WITHIN:?}; killed"
                ));
            }
            // The server is not a tokio child: there is no exit event to await.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again, on the same port, after [`PgServer::kill`].
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill()?;
        self.run()
    }

    /// Runs `postgres` on `self.port` and waits until it accepts connections.
    fn run(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("postgres.log");
        let log = File::create(&log_path).map_err(|e| format!("creating the log: {e}"))?;
        let mut postgres = Command::new(self.bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            // Durability is not what a throw-away server is for.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        if let Some((uid, gid)) = self.owner {
            postgres.uid(uid).gid(gid);
        }
        let mut child = postgres
            .spawn()
            .map_err(|e| format!("starting postgres: {e}"))?;
        let deadline = Instant::now() + WITHIN;
        loop {
            let text = read(&log_path);
            if text.contains("database system is ready to accept connections") {
                self.child = Some(child);
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("postgres exited ({status}) at start:\n{text}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("postgres not ready within {WITHIN:?}:\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // A fast shutdown, which (unlike the immediate one of `kill`) releases the server's
        // shared memory.
        if let Err(e) = self.stop("INT") {
            eprintln!("stopping the test PostgreSQL server: {e}");
        }
        // Then `dir` removes the cluster.
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `postgres`.
pub fn bin_dir() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .map_err(|_| {
            format!(
                "PostgreSQL is not installed ({} is missing): {INSTALL}",
                root.display()
            )
        })?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        format!(
            "no PostgreSQL server under {} (initdb and postgres): {INSTALL}",
            root.display()
        )
    })
}

/// As root, the uid and gid of the `postgres` user (PostgreSQL refuses to run as root);
/// otherwise `None`: the server runs as whoever runs the test.
fn unprivileged_owner() -> Result<Option<(u32, u32)>, String> {
    let me = read("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse::<u32>().ok());
    if me != Some(0) {
        return Ok(None);
    }
    read("/etc/passwd")
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres") && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))?
        })
        .map(Some)
        .ok_or_else(|| {
            format!(
                "running as root, and PostgreSQL refuses root, but there is no `postgres` user \
                 to run it as: {INSTALL} (the package creates the user)"
            )
        })
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

fn read(path: impl AsRef<Path>) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    text
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

/// Which backend a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, empty database for one test: a SQLite file in a temporary folder, or a database on
/// its own [`PgServer`]. Removed on drop.
pub struct TestDb {
    url: DatabaseUrl,
    _dir: Option<tempfile::TempDir>,
    server: Option<PgServer>,
}

impl TestDb {
    /// A database called `name` (the file's stem for SQLite).
    pub async fn new(backend: Backend, name: &str) -> Result<Self, String> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
                Ok(Self {
                    url: DatabaseUrl::sqlite(dir.path().join(format!("{name}.db"))),
                    _dir: Some(dir),
                    server: None,
                })
            }
            Backend::Postgres => {
                let server = tokio::task::spawn_blocking(PgServer::start)
                    .await
                    .map_err(|e| format!("starting PostgreSQL: {e}"))??;
                Ok(Self {
                    url: server.create_database(name).await?,
                    _dir: None,
                    server: Some(server),
                })
            }
        }
    }

    pub fn url(&self) -> &DatabaseUrl {
        &self.url
    }

    /// Another fresh database beside this one (on the same server, or in the same folder),
    /// for a test that runs several apps.
    pub async fn sibling(&self, name: &str) -> Result<DatabaseUrl, String> {
        match (&self.server, &self._dir) {
            (Some(server), _) => server.create_database(name).await,
            (None, Some(dir)) => Ok(DatabaseUrl::sqlite(dir.path().join(format!("{name}.db")))),
            (None, None) => Err("a test database has a server or a folder".into()),
        }
    }

    /// The server, for tests that stop and restart it; `None` for SQLite.
    pub fn server(&mut self) -> Option<&mut PgServer> {
        self.server.as_mut()
    }

    /// Runs `sql` (one or more statements) with a connection of its own.
    pub async fn execute(&self, sql: &str) -> Result<(), String> {
        match &self.url {
            DatabaseUrl::Sqlite(path) => rusqlite::Connection::open(path)
                .and_then(|conn| conn.execute_batch(sql))
                .map_err(|e| format!("{sql}: {e}")),
            DatabaseUrl::Postgres { config, .. } => {
                let (client, connection) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| format!("connecting to {}: {e}", self.url))?;
                let connection = tokio::spawn(connection);
                let done = client
                    .batch_execute(sql)
                    .await
                    .map_err(|e| format!("{sql}: {e}"));
                drop(client);
                let _ = connection.await;
                done
            }
        }
    }

    /// The integer the query `sql` (e.g. `SELECT COUNT(*) FROM users`) returns, read with a
    /// connection of its own.
    pub async fn scalar(&self, sql: &str) -> Result<i64, String> {
        match &self.url {
            DatabaseUrl::Sqlite(path) => rusqlite::Connection::open(path)
                .and_then(|conn| conn.query_row(sql, [], |row| row.get(0)))
                .map_err(|e| format!("{sql}: {e}")),
            DatabaseUrl::Postgres { config, .. } => {
                let (client, connection) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| format!("connecting to {}: {e}", self.url))?;
                let connection = tokio::spawn(connection);
                let value = client
                    .query_one(sql, &[])
                    .await
                    .map(|row| row.get(0))
                    .map_err(|e| format!("{sql}: {e}"));
                drop(client);
                let _ = connection.await;
                value
            }
        }
    }
}

/// Runs each named `async fn(Backend) -> anyhow::Result<()>` of the calling module as two
/// tests, `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() -> anyhow::Result<()> {
                    super::$name($crate::test_server::Backend::Sqlite).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() -> anyhow::Result<()> {
                    super::$name($crate::test_server::Backend::Postgres).await
                }
            )+
        }
    };
}
