//! Runs the mesh's processes: starts them with their output going to one log file each,
//! follows those files to the terminal (each line prefixed with `[name]`), reads the addresses
//! they bound from their ready lines, waits until they are ready, notices when one exits, and
//! stops them all.
//!
//! A child writes straight to its file, never to a pipe `dev up` reads: were `dev up` killed, a
//! pipe would break under the child, and a process whose logger panics on a broken stdout never
//! finishes its graceful shutdown.
//!
//! No child may outlive `ferrule dev up`. Each runs in its own process group, so a Ctrl-C in
//! the terminal reaches only `dev up`, which then stops them in order: everything else first
//! (sidecars deregister while the controller still answers), the controller last, each with
//! SIGTERM, a bounded wait, then SIGKILL. If `dev up` itself is killed, the kernel sends each
//! child SIGTERM (`PR_SET_PDEATHSIG`), and `ferrule dev down` finds whatever is left through
//! `dev.json`.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustix::process::{Pid, Signal, getpid, getppid, kill_process};
use tokio::time::{Instant, timeout, timeout_at};

use serde::de::DeserializeOwned;

use super::plan::Spec;
use super::state::{DevState, ProcessRecord};

/// How long one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between rounds of readiness probes and exit checks.
const POLL: Duration = Duration::from_millis(100);
/// How long the log followers get to print a stopped process's last lines.
const LOG_DRAIN: Duration = Duration::from_secs(2);
/// How often a starting process's log is read for its ready line.
const READY_LINE_POLL: Duration = Duration::from_millis(25);
/// Lines at the end of a log where a failed bind shows.
const LOG_TAIL_FOR_BIND: usize = 10;
/// How often a log follower looks for new lines at the end of its file.
const FOLLOW_POLL: Duration = Duration::from_millis(50);

/// A started process.
struct Child {
    record: ProcessRecord,
    /// The ready line's program name, from its [`Spec`].
    ready_line: Option<&'static str>,
    /// What asks it to stop, from its [`Spec`].
    stop_signal: Signal,
    /// The admin listener whose `GET /ready` tells that the process is ready, once known.
    probe: Option<SocketAddr>,
    process: tokio::process::Child,
    /// Set once the exit has been seen, so it is reported once and never signalled again.
    exited: Option<ExitStatus>,
    /// Prints the log to the terminal; `None` with `--quiet`.
    follower: Option<Follower>,
}

/// A thread printing the lines appended to one log file.
struct Follower {
    thread: JoinHandle<()>,
    /// Set once the process has exited: the thread prints what is left and ends.
    done: Arc<AtomicBool>,
}

/// Why start-up failed.
#[derive(Debug)]
pub enum StartupError {
    /// A process exited before the mesh was ready.
    Exited { name: String, status: ExitStatus },
    /// These processes were not ready in time.
    NotReady {
        names: Vec<String>,
        within: Duration,
    },
    /// A process printed a ready line `dev up` cannot read.
    BadReadyLine { name: String, error: String },
}

impl StartupError {
    /// The processes whose logs explain the failure.
    pub fn names(&self) -> Vec<String> {
        match self {
            Self::Exited { name, .. } | Self::BadReadyLine { name, .. } => vec![name.clone()],
            Self::NotReady { names, .. } => names.clone(),
        }
    }
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited { name, status } => {
                write!(f, "{name} exited during start-up ({})", describe(*status))
            }
            Self::NotReady { names, within } => write!(
                f,
                "not ready after {}: {}",
                humantime::format_duration(*within),
                names.join(", ")
            ),
            Self::BadReadyLine { name, error } => write!(f, "{name}'s ready line: {error}"),
        }
    }
}

impl std::error::Error for StartupError {}

/// The processes of one `ferrule dev up`, and its `dev.json`.
pub struct Supervisor {
    children: Vec<Child>,
    state: DevState,
    state_dir: PathBuf,
    logs: PathBuf,
    /// Log lines are followed to the terminal unless `--quiet`.
    echo: bool,
    /// Width of the `[name]` column, so the lines after it align.
    width: usize,
    http: Client<HttpConnector, Empty<Bytes>>,
}

impl Supervisor {
    /// `names` are all the processes to come, for the width of the log prefix.
    pub fn new<'a>(
        state: DevState,
        state_dir: &Path,
        quiet: bool,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let width = names.into_iter().map(|n| n.len() + 2).max().unwrap_or(0);
        Self {
            children: Vec::new(),
            state,
            state_dir: state_dir.to_path_buf(),
            logs: state_dir.join("logs"),
            echo: !quiet,
            width,
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// What was started, as written to `dev.json`.
    pub fn state(&self) -> &DevState {
        &self.state
    }

    /// Starts `spec` with its output going to `logs/<name>.log`, and records it in `dev.json`.
    pub fn spawn(&mut self, spec: &Spec) -> anyhow::Result<()> {
        let log_path = self.logs.join(format!("{}.log", spec.name));
        // stdout and stderr share one open file, so their lines stay in order.
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            // Log files are read with less and grep, not a terminal.
            .env("NO_COLOR", "1")
            // The key comes from USER_JWT_SECRET; a file from the caller's shell would clash.
            .env_remove("USER_JWT_SECRET_FILE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating a file handle")?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        if let Some((uid, gid)) = spec.run_as {
            cmd.uid(uid).gid(gid);
        }
        let parent = getpid();
        // SAFETY: the closure runs in the forked child before exec (after any change of user,
        // which would clear the death signal), where only
        // async-signal-safe calls are allowed: it makes two raw system calls (prctl, getppid)
        // and builds an io::Error from an errno, none of which allocates or takes a lock. The
        // death signal is tied to the thread that forks: `ferrule` runs a current-thread tokio
        // runtime, so that is the main thread, which lives as long as the process.
        unsafe {
            cmd.pre_exec(move || {
                rustix::process::set_parent_process_death_signal(Some(Signal::TERM))?;
                // Had `dev up` died between fork and prctl, the signal would never come.
                if getppid() != Some(parent) {
                    return Err(rustix::io::Errno::SRCH.into());
                }
                Ok(())
            });
        }
        let process = cmd
            .spawn()
            .with_context(|| format!("starting {} ({})", spec.name, spec.program.display()))?;
        let pid = process.id().context("a just-started process has a PID")?;
        let follower = if self.echo {
            Some(follow_log(&spec.name, &log_path, self.width)?)
        } else {
            None
        };
        let record = ProcessRecord {
            name: spec.name.clone(),
            pid,
            program: spec.program.clone(),
            log: Some(log_path),
            admin: None,
            database: spec.database.clone(),
        };
        self.state.processes.push(record.clone());
        self.store()?;
        self.children.push(Child {
            record,
            ready_line: spec.ready_line,
            stop_signal: spec.stop_signal,
            probe: None,
            process,
            exited: None,
            follower,
        });
        Ok(())
    }

    /// Probes every started process until all are ready, one exits, or `within` passes.
    pub async fn wait_ready(&mut self, within: Duration) -> Result<(), StartupError> {
        let deadline = Instant::now() + within;
        let mut pending: Vec<(String, SocketAddr)> = self
            .children
            .iter()
            .filter_map(|c| c.probe.map(|p| (c.record.name.clone(), p)))
            .collect();
        loop {
            if let Some((name, status)) = self.reap().into_iter().next() {
                return Err(StartupError::Exited { name, status });
            }
            let mut still = Vec::new();
            for (name, probe) in pending {
                if !self.probe(probe).await {
                    still.push((name, probe));
                }
            }
            pending = still;
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartupError::NotReady {
                    names: pending.into_iter().map(|(name, _)| name).collect(),
                    within,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `GET /ready` on the admin listener `admin` answers 200.
    async fn probe(&self, admin: SocketAddr) -> bool {
        let uri = format!("http://{admin}/ready")
            .parse()
            .expect("a socket address makes a valid URI");
        matches!(
            timeout(PROBE_TIMEOUT, self.http.get(uri)).await,
            Ok(Ok(resp)) if resp.status() == hyper::StatusCode::OK
        )
    }

    /// `GET <path>` on `addr` as JSON; `None` unless it answers 200 with JSON in time.
    pub async fn get_json(&self, addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
        let uri = format!("http://{addr}{path}").parse().ok()?;
        let resp = timeout(PROBE_TIMEOUT, self.http.get(uri))
            .await
            .ok()?
            .ok()?;
        if resp.status() != hyper::StatusCode::OK {
            return None;
        }
        let body = timeout(PROBE_TIMEOUT, resp.into_body().collect())
            .await
            .ok()?
            .ok()?
            .to_bytes();
        serde_json::from_slice(&body).ok()
    }

    /// Waits for the ready line of `name` (`<program> ready: {JSON}`, printed once its
    /// listeners are bound) and returns its JSON: the addresses the process bound.
    pub async fn ready_line<T: DeserializeOwned>(
        &mut self,
        name: &str,
        within: Duration,
    ) -> Result<T, StartupError> {
        let child = self.child(name);
        let prefix = format!("{} ready: ", child.ready_line.unwrap_or(name));
        let json = self
            .watch_log(name, within, |whole| {
                whole
                    .lines()
                    .find_map(|l| l.strip_prefix(&prefix))
                    .map(str::to_string)
            })
            .await?;
        serde_json::from_str(&json).map_err(|e| StartupError::BadReadyLine {
            name: name.to_string(),
            error: format!("{json:?}: {e}"),
        })
    }

    /// Waits until a line of `name`'s log contains `needle`, for a process that prints no
    /// ready line (PostgreSQL).
    pub async fn log_line(
        &mut self,
        name: &str,
        needle: &str,
        within: Duration,
    ) -> Result<(), StartupError> {
        self.watch_log(name, within, |whole| whole.contains(needle).then_some(()))
            .await
    }

    /// Reads `name`'s log (its whole lines: the last one may still be being written) until
    /// `found` finds what it looks for, the process exits, or `within` passes.
    async fn watch_log<T>(
        &mut self,
        name: &str,
        within: Duration,
        found: impl Fn(&str) -> Option<T>,
    ) -> Result<T, StartupError> {
        let deadline = Instant::now() + within;
        let log = self.child(name).record.log.clone();
        loop {
            let text = log
                .as_deref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(value) = found(whole) {
                return Ok(value);
            }
            if let Some(status) = self.exit_status(name) {
                return Err(StartupError::Exited {
                    name: name.to_string(),
                    status,
                });
            }
            if Instant::now() >= deadline {
                return Err(StartupError::NotReady {
                    names: vec![name.to_string()],
                    within,
                });
            }
            tokio::time::sleep(READY_LINE_POLL).await;
        }
    }

    /// Records where the `--postgres` server listens, in `dev.json`.
    pub fn set_postgres(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        self.state.postgres = Some(addr);
        self.store()
    }

    /// How `name` exited, once it has.
    pub fn exit_status(&mut self, name: &str) -> Option<ExitStatus> {
        let child = self.child_mut(name);
        if child.exited.is_none()
            && let Ok(Some(status)) = child.process.try_wait()
        {
            child.exited(status);
        }
        child.exited
    }

    /// Records `name`'s admin listener in `dev.json`; [`Supervisor::wait_ready`] then waits
    /// for its `GET /ready`.
    pub fn set_admin(&mut self, name: &str, admin: SocketAddr) -> anyhow::Result<()> {
        let child = self.child_mut(name);
        child.probe = Some(admin);
        child.record.admin = Some(admin);
        let record = child.record.clone();
        if let Some(r) = self.state.processes.iter_mut().find(|r| r.name == name) {
            *r = record;
        }
        self.store()
    }

    /// Records where the controller and the gateway listen, in `dev.json`.
    pub fn set_addresses(
        &mut self,
        controller: SocketAddr,
        gateway: SocketAddr,
    ) -> anyhow::Result<()> {
        self.state.controller = controller;
        self.state.gateway = gateway;
        self.store()
    }

    /// Stops `name` (SIGKILL) and forgets it, for a start-up step to be tried again.
    pub async fn discard(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|c| c.record.name == name) {
            let mut child = self.children.remove(i);
            if child.exited.is_none() {
                let _ = child.process.start_kill();
                if let Ok(status) = child.process.wait().await {
                    child.exited(status);
                }
            }
            self.state.processes.retain(|r| r.name != name);
        }
    }

    /// True when `name`'s log says a port it was told to bind was taken.
    pub fn lost_a_port(&self, name: &str) -> bool {
        self.log_tail(name, LOG_TAIL_FOR_BIND)
            .to_lowercase()
            .contains("address already in use")
    }

    fn store(&self) -> anyhow::Result<()> {
        self.state
            .store(&self.state_dir)
            .context("writing dev.json")
    }

    fn child(&self, name: &str) -> &Child {
        self.children
            .iter()
            .find(|c| c.record.name == name)
            .expect("only started processes are asked for")
    }

    fn child_mut(&mut self, name: &str) -> &mut Child {
        self.children
            .iter_mut()
            .find(|c| c.record.name == name)
            .expect("only started processes are asked for")
    }

    /// Processes that exited since the last call, with their status.
    pub fn reap(&mut self) -> Vec<(String, ExitStatus)> {
        let mut gone = Vec::new();
        for child in &mut self.children {
            if child.exited.is_none()
                && let Ok(Some(status)) = child.process.try_wait()
            {
                child.exited(status);
                gone.push((child.record.name.clone(), status));
            }
        }
        gone
    }

    /// Reports processes that exit while the mesh runs; the rest keep running (a replica that
    /// dies is what a mesh is for). Returns when `stop` resolves.
    pub async fn watch(&mut self, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {
                    for (name, status) in self.reap() {
                        println!("{name} exited ({}); the rest of the mesh keeps running", describe(status));
                    }
                }
            }
        }
    }

    /// Stops everything: the controller's clients first, then the controller; each gets
    /// SIGTERM and `grace` to exit before SIGKILL. Removes `dev.json`.
    pub async fn stop(&mut self, grace: Duration) {
        // The controller is started first; its clients deregister through it while stopping.
        let split = 1.min(self.children.len());
        let (controller, clients) = self.children.split_at_mut(split);
        terminate(clients, grace).await;
        terminate(controller, grace).await;
        let deadline = std::time::Instant::now() + LOG_DRAIN;
        for follower in self.children.iter().filter_map(|c| c.follower.as_ref()) {
            while !follower.thread.is_finished() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if let Err(e) = DevState::remove(&self.state_dir) {
            eprintln!(
                "could not remove {}: {e}",
                DevState::path(&self.state_dir).display()
            );
        }
    }

    /// The last `lines` lines of `name`'s log.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let Some(child) = self.children.iter().find(|c| c.record.name == name) else {
            return String::new();
        };
        let text = child
            .record
            .log
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Its stop signal (SIGTERM, SIGINT for PostgreSQL) to every running process of `children`,
/// then waits until `grace` has passed and kills what is left.
async fn terminate(children: &mut [Child], grace: Duration) {
    for child in children.iter() {
        // An unreaped child keeps its PID, so this cannot hit a recycled one.
        if child.exited.is_none()
            && let Some(pid) = child.process.id().and_then(|p| Pid::from_raw(p as i32))
        {
            let _ = kill_process(pid, child.stop_signal);
        }
    }
    let deadline = Instant::now() + grace;
    for child in children.iter_mut() {
        if child.exited.is_some() {
            continue;
        }
        let status = match timeout_at(deadline, child.process.wait()).await {
            Ok(status) => status,
            Err(_) => {
                eprintln!(
                    "{} ignored SIGTERM for {}; killing it",
                    child.record.name,
                    humantime::format_duration(grace)
                );
                let _ = child.process.start_kill();
                child.process.wait().await
            }
        };
        if let Ok(status) = status {
            child.exited(status);
        }
    }
}

impl Child {
    fn exited(&mut self, status: ExitStatus) {
        self.exited = Some(status);
        if let Some(follower) = &self.follower {
            follower.done.store(true, Ordering::Release);
        }
    }
}

/// Prints the lines appended to `path` as `[name] line`, on a thread of its own, until the
/// process is marked done and the end of the file is reached.
fn follow_log(name: &str, path: &Path, width: usize) -> io::Result<Follower> {
    let mut reader = BufReader::new(File::open(path)?);
    let done = Arc::new(AtomicBool::new(false));
    let prefix = format!("{:<width$}", format!("[{name}]"));
    let finished = Arc::clone(&done);
    let thread = std::thread::Builder::new()
        .name(format!("log-{name}"))
        .spawn(move || {
            let mut buf = Vec::new();
            loop {
                // Checked before reading, so the lines written before the exit all get printed.
                let last_round = finished.load(Ordering::Acquire);
                match reader.read_until(b'\n', &mut buf) {
                    Ok(n) if n > 0 && buf.ends_with(b"\n") => {
                        let line = String::from_utf8_lossy(&buf);
                        // A closed terminal is no reason to stop: the file has everything.
                        let _ = writeln!(io::stdout().lock(), "{prefix} {}", line.trim_end());
                        buf.clear();
                    }
                    // At the end of the file, maybe mid-line: wait for more.
                    Ok(_) if !last_round => std::thread::sleep(FOLLOW_POLL),
                    _ => {
                        if !buf.is_empty() {
                            let line = String::from_utf8_lossy(&buf);
                            let _ = writeln!(io::stdout().lock(), "{prefix} {line}");
                        }
                        break;
                    }
                }
            }
        })?;
    Ok(Follower { thread, done })
}

/// "exit status 1", "killed by signal 9".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The address the mesh's gateway listens on is free now (it may still be taken before the
/// gateway binds it, which the gateway's own error then says).
pub fn check_free(addr: SocketAddr) -> io::Result<()> {
    std::net::TcpListener::bind(addr).map(drop)
}

/// `N` loopback addresses that were free a moment ago (bound to port 0 together, then
/// released), for the few listeners that must be named before their process starts. The caller
/// starts again on new ones when a process finds one taken ([`Supervisor::lost_a_port`]).
pub fn chosen_addrs<const N: usize>() -> io::Result<[SocketAddr; N]> {
    let held = (0..N)
        .map(|_| std::net::TcpListener::bind(super::plan::ANY_PORT))
        .collect::<io::Result<Vec<_>>>()?;
    let addrs = held
        .iter()
        .map(std::net::TcpListener::local_addr)
        .collect::<io::Result<Vec<_>>>()?;
    Ok(addrs.try_into().expect("N addresses for N listeners"))
}
