//! `dev.json`: what a running `ferrule dev up` started, so that `ferrule dev down` (and tests)
//! can find and stop it.
//!
//! The file is rewritten after every process starts, so a mesh that died half-way through
//! start-up can still be cleaned up, and removed when `dev up` stops cleanly. A PID alone is
//! not trusted: a process is only signalled while `/proc/<pid>/exe` is still the program that
//! was started, so a recycled PID is never hit.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};
use serde::{Deserialize, Serialize};

/// File name of the state inside the state dir.
pub const FILE: &str = "dev.json";

/// A running (or crashed) `ferrule dev up`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevState {
    /// The `ferrule dev up` process itself.
    pub supervisor: ProcessRecord,
    pub controller: SocketAddr,
    pub gateway: SocketAddr,
    /// Where the `--postgres` server listens (user `ferrule`, one database per service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<SocketAddr>,
    /// Children in start order.
    pub processes: Vec<ProcessRecord>,
    /// The trace API of `dev up`'s own OTLP receiver (what `ferrule traces` reads); absent
    /// with `--otlp`, when spans go to the user's collector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traces: Option<SocketAddr>,
    /// The OTLP/gRPC endpoint the proxies export to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp: Option<String>,
}

/// One process `ferrule dev up` started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub name: String,
    pub pid: u32,
    pub program: PathBuf,
    /// Its log file (absent for the supervisor, which writes to the terminal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    /// A proxy's admin listener (`/ready`, `/metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// An app's SQLite database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<PathBuf>,
}

impl DevState {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE)
    }

    /// Reads `dev.json`; `Ok(None)` when there is none.
    pub fn load(state_dir: &Path) -> io::Result<Option<DevState>> {
        match std::fs::read(Self::path(state_dir)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a dev state file: {e}", FILE),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `dev.json` atomically (a reader never sees half a file).
    pub fn store(&self, state_dir: &Path) -> io::Result<()> {
        let tmp = state_dir.join(format!("{FILE}.tmp"));
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        std::fs::write(&tmp, json)?;
        std::fs::rename(tmp, Self::path(state_dir))
    }

    pub fn remove(state_dir: &Path) -> io::Result<()> {
        match std::fs::remove_file(Self::path(state_dir)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

impl ProcessRecord {
    /// True while the PID runs the program that was started under it.
    pub fn is_running(&self) -> bool {
        let Ok(exe) = std::fs::read_link(format!("/proc/{}/exe", self.pid)) else {
            return false;
        };
        // A binary rebuilt while it runs shows as "<path> (deleted)".
        let exe = exe.to_string_lossy();
        let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe);
        Path::new(exe) == self.program && !is_zombie(self.pid)
    }

    /// Sends `signal` if the process is still the one started; false when it is gone.
    pub fn signal(&self, signal: Signal) -> bool {
        let Some(pid) = i32::try_from(self.pid).ok().and_then(Pid::from_raw) else {
            return false;
        };
        self.is_running() && kill_process(pid, signal).is_ok()
    }

    /// Waits up to `within` for the process to go; true when it did.
    pub async fn wait_gone(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.is_running() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // Not our child (dev down runs in another process), so there is no exit event to
            // await: poll /proc.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

/// An exited child whose parent has not reaped it yet still has a `/proc` entry.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the parenthesised command name, which may itself hold spaces.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            == Some("Z")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32, program: PathBuf) -> ProcessRecord {
        ProcessRecord {
            name: "x".into(),
            pid,
            program,
            log: None,
            admin: None,
            database: None,
        }
    }

    #[test]
    fn a_pid_only_counts_while_it_runs_the_recorded_program() {
        let me = std::env::current_exe().unwrap();
        assert!(record(std::process::id(), me.clone()).is_running());
        assert!(!record(std::process::id(), "/usr/bin/other".into()).is_running());
        // PIDs are below 2^22 on Linux.
        assert!(!record(u32::MAX - 1, me).is_running());
    }

    #[test]
    fn round_trips_through_the_state_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert!(DevState::load(dir).unwrap().is_none());
        let state = DevState {
            supervisor: record(1, "/bin/ferrule".into()),
            controller: "127.0.0.1:1".parse().unwrap(),
            gateway: "127.0.0.1:2".parse().unwrap(),
            postgres: None,
            traces: None,
            otlp: None,
            processes: vec![ProcessRecord {
                admin: Some("127.0.0.1:3".parse().unwrap()),
                ..record(2, "/bin/ferrule-proxy".into())
            }],
        };
        state.store(dir).unwrap();
        let back = DevState::load(dir).unwrap().unwrap();
        assert_eq!(back.processes[0].admin, state.processes[0].admin);
        assert_eq!(back.gateway, state.gateway);
        DevState::remove(dir).unwrap();
        DevState::remove(dir).unwrap();
        assert!(DevState::load(dir).unwrap().is_none());
    }
}
