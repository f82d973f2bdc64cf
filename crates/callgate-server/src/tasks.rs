//! The only place that spawns tasks (a clippy ban on `tokio::spawn` enforces it elsewhere).
//! Every task is tracked, so shutdown can wait for all of them.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

/// The server's task tracker.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
}

impl Tasks {
    /// A new, open tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns a tracked task.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Runs blocking or CPU-heavy work on the blocking pool, tracked.
    pub fn spawn_blocking<F, R>(&self, work: F) -> JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        self.tracker.spawn_blocking(work)
    }

    /// The tracker itself, for spawners of tasks the server must wait for (agents' tasks).
    pub fn tracker(&self) -> TaskTracker {
        self.tracker.clone()
    }

    /// Stops counting new tasks as a reason to keep waiting; see [`TaskTracker::close`].
    pub fn close(&self) {
        self.tracker.close();
    }

    /// Waits until the tracker is closed and every task has finished.
    pub async fn wait(&self) {
        self.tracker.wait().await;
    }

    /// How many tracked tasks are running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether no tracked task is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}
