//! How a running proxy (sidecar or gateway) serves its admin listener and stops, in one place.
//!
//! Shutdown order, once the shutdown token is cancelled: the mode's own first step (the sidecar
//! deregisters its app), stop accepting, drain open connections for at most the grace period,
//! then stop the admin listener, so `/live` answers until the very end.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running admin server: stopped last, after the drain. `stop` ends its accept loop,
/// `tracker` follows its connections, `task` is the accept loop itself.
pub struct AdminServer {
    pub stop: CancellationToken,
    pub tracker: TaskTracker,
    pub task: JoinHandle<()>,
}

/// The listeners' side of a drain: cancelling `serving` stops the accept loops; `tracker`
/// follows every connection they accepted.
pub struct Drain {
    pub serving: CancellationToken,
    pub tracker: TaskTracker,
    pub grace: Duration,
}

/// A started proxy's admin server and shutdown task.
pub struct Lifecycle {
    shutdown: CancellationToken,
    done: JoinHandle<()>,
}

impl Lifecycle {
    /// Arms the shutdown sequence on `shutdown` for a proxy serving `admin`; `before_drain`
    /// runs first when shutdown starts.
    pub fn start(
        shutdown: CancellationToken,
        admin: AdminServer,
        drain: Drain,
        before_drain: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        let AdminServer {
            stop: admin_stop,
            tracker: admin_tracker,
            task: admin_task,
        } = admin;
        let signal = shutdown.clone();
        let done = tokio::spawn(async move {
            signal.cancelled().await;
            before_drain.await;
            let Drain {
                serving,
                tracker,
                grace,
            } = drain;
            tracing::info!(?grace, "shutting down: draining connections");
            serving.cancel();
            tracker.close();
            if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
                tracing::warn!(?grace, "connections still open after the grace period");
            }
            admin_stop.cancel();
            admin_tracker.close();
            admin_tracker.wait().await;
            if let Err(error) = admin_task.await {
                tracing::warn!(%error, "admin server task failed");
            }
            tracing::info!("shut down");
        });
        Self { shutdown, done }
    }

    /// Cancelling this token starts the graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until shutdown has finished (after it was started).
    pub async fn wait(self) {
        if let Err(error) = self.done.await {
            tracing::warn!(%error, "shutdown task failed");
        }
    }

    /// Starts the graceful shutdown and waits for it.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}
