//! A child process owned by a guard: its output goes to a log file, it is killed on drop.
//!
//! Every wait here is async (it sleeps on the tokio clock between looks), so a test's
//! in-process backends keep serving while it waits, and bounded.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

/// Pause between two looks at a log file or a child's state.
const POLL: Duration = Duration::from_millis(20);

pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawn {name} ({cmd:?})"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far, for assertions and failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a log line contains `needle`; returns that line.
    pub async fn wait_for_line(
        &mut self,
        needle: &str,
        within: Duration,
    ) -> anyhow::Result<String> {
        self.wait_for(&format!("{needle:?}"), within, |line| {
            line.contains(needle).then(|| line.to_string())
        })
        .await
    }

    /// Waits for the ready line `<program> ready: {JSON}` that `ferrule-controller`,
    /// `ferrule-proxy` and the sample apps print once their listeners are bound, and returns
    /// the JSON: the addresses they actually bound.
    pub async fn ready<T: DeserializeOwned>(
        &mut self,
        program: &str,
        within: Duration,
    ) -> anyhow::Result<T> {
        let prefix = format!("{program} ready: ");
        let json = self
            .wait_for(&format!("its ready line {prefix:?}"), within, |line| {
                line.strip_prefix(&prefix).map(str::to_string)
            })
            .await?;
        serde_json::from_str(&json).with_context(|| {
            format!(
                "{}'s ready line {json:?} is not what was expected",
                self.name
            )
        })
    }

    /// Reads the log line by line until `matches` picks one; fails when the process exits
    /// first or `within` passes.
    async fn wait_for<T>(
        &mut self,
        what: &str,
        within: Duration,
        matches: impl Fn(&str) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + within;
        let mut reader = BufReader::new(File::open(&self.log)?);
        let mut line = String::new();
        loop {
            line.clear();
            let pos = reader.stream_position()?;
            if reader.read_line(&mut line)? > 0 && line.ends_with('\n') {
                if let Some(found) = matches(line.trim_end()) {
                    return Ok(found);
                }
                continue;
            }
            // Partial line: reread it once more output arrives.
            reader.seek(std::io::SeekFrom::Start(pos))?;
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before printing {what}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not print {what} within {within:?}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit; kills it if it does not go.
    pub async fn terminate(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("{} ignored SIGTERM for {within:?}; killed", self.name);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILL, and reap (a killed process is gone at once, so the wait does not block).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}
