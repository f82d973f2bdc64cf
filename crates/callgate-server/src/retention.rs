//! Data retention: call records (with their events, transcripts and files) older than
//! `retention` are deleted by a background task, in small batches so the store writer never
//! holds a long transaction, and `DELETE /api/calls/{id}` deletes one ended call at once.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use callgate_store::{CallId, UnixMillis};

use crate::Shared;
use crate::call::media::recording_path;

/// Calls deleted per store transaction.
pub(crate) const BATCH: u32 = 200;
/// How often the task looks for expired calls (at most; shorter for short retentions).
pub(crate) const SWEEP: Duration = Duration::from_secs(600);

/// Deletes the files a call owns: its recording and the messages its flow recorded
/// (`messages/<id>/`, the directory included). A file already gone is fine.
pub(crate) async fn delete_files(data_dir: &Path, id: &CallId) {
    let recording = recording_path(&data_dir.join("recordings"), id.as_str());
    match tokio::fs::remove_file(&recording).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(%error, path = %recording.display(), "Could not delete a recording.")
        }
    }
    // The id is a checked call id (no separators), so this names one directory of `messages`.
    let messages = data_dir.join("messages").join(id.as_str());
    match tokio::fs::remove_dir_all(&messages).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(%error, path = %messages.display(), "Could not delete a call's messages.")
        }
    }
}

/// Runs until shutdown: every sweep, deletes every call that ended more than `retention` ago.
pub(crate) async fn run(shared: Arc<Shared>, retention: Duration) {
    let every = SWEEP.min(retention / 10).max(Duration::from_secs(1));
    loop {
        let cutoff = UnixMillis::now().0 - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let mut deleted = 0u64;
        loop {
            match shared
                .call
                .store
                .delete_ended_before(UnixMillis(cutoff), BATCH)
                .await
            {
                Ok(ids) => {
                    for id in &ids {
                        delete_files(&shared.config.data_dir, id).await;
                    }
                    deleted += ids.len() as u64;
                    shared.call.metrics.calls_expired.inc_by(ids.len() as u64);
                    if ids.len() < BATCH as usize || shared.call.cancel.is_cancelled() {
                        break;
                    }
                }
                Err(error) => {
                    shared.call.metrics.store_errors.inc();
                    tracing::warn!(%error, "Retention: could not delete expired calls.");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(
                deleted,
                ?retention,
                "Deleted call records past their retention."
            );
        }
        tokio::select! {
            _ = shared.call.cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
