//! Call-scoped tasks: an agent's work off the call task (backend connections, synthesis,
//! decoding), tracked by the server so shutdown waits for them, and cancelled when the call
//! ends so none outlives its call.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Starts an agent's tasks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Spawner {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Spawner {
    /// Tasks tracked by `tracker` (the server's) and cancelled by `cancel` (the call's).
    pub fn new(tracker: TaskTracker, cancel: CancellationToken) -> Self {
        Self { tracker, cancel }
    }

    /// A spawner of its own, tracked by nobody and never cancelled (tests, tools).
    pub fn detached() -> Self {
        Self::new(TaskTracker::new(), CancellationToken::new())
    }

    /// Runs `task` on the runtime until it finishes (`Some(output)`) or the call ends
    /// (`None`: it was dropped wherever it was waiting).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => None,
                output = task => Some(output),
            }
        })
    }

    /// Runs blocking or CPU-heavy `work` on the runtime's blocking pool. It cannot be
    /// interrupted; check [`Spawner::is_cancelled`] between steps of long work.
    pub fn spawn_blocking<F, R>(&self, work: F) -> JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        self.tracker.spawn_blocking(work)
    }

    /// Whether the call has ended.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the call ends.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_end_with_the_call_and_are_tracked() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let spawner = Spawner::new(tracker.clone(), cancel.clone());
        let done = spawner.spawn(async { 7 });
        assert_eq!(done.await.unwrap(), Some(7));
        let forever = spawner.spawn(std::future::pending::<()>());
        assert_eq!(tracker.len(), 1);
        cancel.cancel();
        assert_eq!(forever.await.unwrap(), None);
        tracker.close();
        tracker.wait().await;
    }
}
