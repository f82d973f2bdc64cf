//! What `record` steps may store, and the files they write.
//!
//! A flow's `[messages]` ([`Limits`]) bounds each call (`max_call_bytes`, every recording of
//! the call together) and `data_dir/messages` as a whole (`max_total_bytes`). The whole is
//! counted by one [`Store`] per data dir for the process, shared by every flow and every
//! reload: a recording *reserves* its largest size before it starts, so concurrent callers
//! can never together pass the cap; what it did not use is given back when it is written.
//! The count is the directory's size scanned when the store is opened, plus what callgate
//! wrote since; when a reservation does not fit, the directory is scanned again (at most once
//! every [`RESCAN_EVERY`]), so files deleted with their calls make room.
//!
//! Files are created `0600` and directories `0700` whatever the umask: a message is the
//! caller's voice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::Error;
use crate::metrics::FlowMetrics;

/// The default `max_call_bytes`: 2 MiB, 65 s of 16 kHz audio (131 s at 8 kHz).
pub const DEFAULT_MAX_CALL_BYTES: u64 = 2 * 1024 * 1024;
/// The default `max_total_bytes`: 256 MiB.
pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 256 * 1024 * 1024;
/// A recording's WAV header.
pub const WAV_HEADER_BYTES: u64 = 44;
/// The longest a full store waits before counting the directory again.
pub const RESCAN_EVERY: Duration = Duration::from_secs(10);

/// A flow's `[messages]`: what its `record` steps may store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Bytes one call's recordings may take together (WAV headers included).
    pub max_call_bytes: u64,
    /// Bytes `data_dir/messages` may hold: at this, `record` steps store nothing.
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_call_bytes: DEFAULT_MAX_CALL_BYTES,
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
        }
    }
}

/// The bytes counted in one `data_dir/messages`.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    usage: Mutex<Usage>,
    metrics: Arc<FlowMetrics>,
}

#[derive(Debug)]
struct Usage {
    /// Files on disk (scanned, plus written since).
    stored: u64,
    /// Held by recordings not written yet.
    reserved: u64,
    scanned_at: Instant,
}

impl Store {
    /// The store of `data_dir/messages` for this process (opened, and the directory counted,
    /// on first use; blocking file I/O).
    #[allow(clippy::disallowed_methods)] // the rescan timer: housekeeping, not the engine
    pub fn shared(data_dir: &Path, metrics: Arc<FlowMetrics>) -> Arc<Self> {
        static STORES: OnceLock<Mutex<HashMap<PathBuf, Weak<Store>>>> = OnceLock::new();
        let dir = data_dir.join("messages");
        let mut stores = STORES
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(store) = stores.get(&dir).and_then(Weak::upgrade) {
            return store;
        }
        stores.retain(|_, s| s.strong_count() > 0);
        let stored = scan(&dir);
        metrics.messages_stored_bytes.set(gauge(stored));
        let store = Arc::new(Self {
            dir: dir.clone(),
            usage: Mutex::new(Usage {
                stored,
                reserved: 0,
                scanned_at: Instant::now(),
            }),
            metrics,
        });
        stores.insert(dir, Arc::downgrade(&store));
        store
    }

    /// Reserves up to `want` bytes (at least `min`) under `cap` for the directory: `None` when
    /// less than `min` is left.
    pub fn try_reserve(self: &Arc<Self>, want: u64, min: u64, cap: u64) -> Option<Reservation> {
        let mut usage = self.lock();
        let room = cap.saturating_sub(usage.stored + usage.reserved);
        let bytes = want.min(room);
        if bytes < min || bytes == 0 {
            return None;
        }
        usage.reserved += bytes;
        Some(Reservation {
            store: self.clone(),
            bytes,
        })
    }

    /// Whether a full store should count the directory again ([`RESCAN_EVERY`]); `true`
    /// claims the rescan (the caller then runs [`Store::rescan`]), so many callers meeting a
    /// full store at once start one scan, not one each.
    #[allow(clippy::disallowed_methods)] // the rescan timer: housekeeping, not the engine
    pub fn claim_rescan(&self) -> bool {
        let mut usage = self.lock();
        if usage.scanned_at.elapsed() < RESCAN_EVERY {
            return false;
        }
        usage.scanned_at = Instant::now();
        true
    }

    /// Counts the directory again (blocking file I/O): files deleted with their calls make
    /// room.
    pub fn rescan(&self) {
        let stored = scan(&self.dir);
        let mut usage = self.lock();
        usage.stored = stored;
        self.metrics.messages_stored_bytes.set(gauge(stored));
    }

    /// Bytes counted: on disk and reserved.
    pub fn used(&self) -> (u64, u64) {
        let usage = self.lock();
        (usage.stored, usage.reserved)
    }

    /// Writes a recording (mono 16-bit WAV) to `path` under the data dir, within its
    /// reservation (blocking file I/O): directories `0700`, the file `0600`. Returns the
    /// file's size.
    pub fn write(
        &self,
        reservation: Reservation,
        path: &Path,
        rate: u32,
        samples: &[i16],
    ) -> Result<u64, Error> {
        let bytes = WAV_HEADER_BYTES + 2 * samples.len() as u64;
        if bytes > reservation.bytes {
            return Err(Error::OverReservation {
                path: path.to_owned(),
                bytes,
                reserved: reservation.bytes,
            });
        }
        if let Some(parent) = path.parent() {
            private_dirs(&self.dir, parent)?;
        }
        write_wav(path, rate, samples)?;
        let mut usage = self.lock();
        usage.stored += bytes;
        self.metrics.messages_stored_bytes.set(gauge(usage.stored));
        drop(usage);
        self.metrics.messages_saved.inc();
        self.metrics.messages_saved_bytes.inc_by(bytes);
        // What the file took is now counted as stored; the reservation's share is released.
        drop(reservation);
        Ok(bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Bytes held for one recording; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    store: Arc<Store>,
    bytes: u64,
}

impl Reservation {
    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut usage = self.store.lock();
        usage.reserved = usage.reserved.saturating_sub(self.bytes);
    }
}

fn gauge(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// The size of the files in `dir` and its subdirectories (one level: `messages/<call>/`).
fn scan(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            if let Ok(files) = std::fs::read_dir(entry.path()) {
                total += files
                    .flatten()
                    .filter_map(|f| f.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum::<u64>();
            }
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}

pub use callgate_kit::files::{private_dirs, private_file, write_wav};

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::Permissions;
    use std::os::unix::fs::PermissionsExt;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "callgate-messages-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reservations_never_pass_the_cap_and_unused_bytes_come_back() {
        let dir = temp("reserve");
        std::fs::create_dir_all(dir.join("messages/old")).unwrap();
        std::fs::write(dir.join("messages/old/m.wav"), vec![0u8; 1000]).unwrap();
        let metrics = FlowMetrics::new();
        let store = Store::shared(&dir, metrics.clone());
        assert_eq!(store.used(), (1000, 0), "the directory is counted at open");
        assert!(Arc::ptr_eq(
            &store,
            &Store::shared(&dir, FlowMetrics::new())
        ));
        let a = store.try_reserve(3000, 100, 5000).expect("room for 3000");
        assert_eq!(a.bytes(), 3000);
        let b = store.try_reserve(3000, 100, 5000).expect("the 1000 left");
        assert_eq!(b.bytes(), 1000);
        assert!(store.try_reserve(3000, 1, 5000).is_none(), "full");
        drop(b);
        assert_eq!(store.used(), (1000, 3000));
        let samples = vec![7i16; 500];
        let path = dir.join("messages/c1/m.wav");
        assert_eq!(store.write(a, &path, 8000, &samples).unwrap(), 1044);
        assert_eq!(store.used(), (2044, 0), "written, the rest released");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1044);
        assert_eq!(metrics.messages_stored_bytes.get(), 2044);
        assert_eq!(metrics.messages_saved_bytes.get(), 1044);
        // Smaller than asked for but under the minimum: refused.
        assert!(store.try_reserve(5000, 3000, 5000).is_none());
        // Files deleted behind its back are found by a rescan, claimed by one caller at most
        // every RESCAN_EVERY.
        assert!(!store.claim_rescan(), "just scanned at open");
        std::fs::remove_dir_all(dir.join("messages/old")).unwrap();
        store.rescan();
        assert_eq!(store.used(), (1044, 0));
        // Too large for its reservation: refused, nothing written.
        let small = store.try_reserve(100, 1, 5000).unwrap();
        let refused = store.write(small, &dir.join("messages/c2/x.wav"), 8000, &samples);
        assert!(
            matches!(
                refused,
                Err(Error::OverReservation {
                    bytes: 1044,
                    reserved: 100,
                    ..
                })
            ),
            "{refused:?}"
        );
        assert_eq!(store.used(), (1044, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn files_are_0600_and_directories_0700_whatever_was_there() {
        let dir = temp("modes");
        let root = dir.join("messages");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, Permissions::from_mode(0o755)).unwrap();
        let call = root.join("c1");
        private_dirs(&root, &call).unwrap();
        let path = call.join("m.wav");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        write_wav(&path, 8000, &[1, 2, 3]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&call), 0o700);
        assert_eq!(mode(&path), 0o600);
        let audio = callgate_audio::wav::read_mono(&path).unwrap();
        assert_eq!((audio.rate, audio.samples), (8000, vec![1, 2, 3]));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
