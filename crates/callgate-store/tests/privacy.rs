//! What the SQLite store leaves on disk: private files whatever the umask, and nothing of a
//! deleted call, neither in the database file nor in its WAL.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use callgate_store::{CallId, Counters, Ended, NewCall, NewEvent, SqliteStore, Store, UnixMillis};

/// A data directory removed at the end of the test.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> TempDir {
    TempDir(std::env::temp_dir().join(format!("callgate-{tag}-{}", uuid::Uuid::now_v7())))
}

const CALLER: &str = "010-SECRET-5550123";
const EVENT: &str = "SECRET-EVENT-TEXT-0123456789";

/// Inserts and ends one call that mentions [`CALLER`] and [`EVENT`].
fn one_call(store: &mut SqliteStore) -> CallId {
    let id = CallId::new();
    store
        .transaction(|s| {
            s.insert_call(&NewCall {
                id: id.clone(),
                protocol: "inbound".into(),
                caller: CALLER.into(),
                callee: "0700".into(),
                external_id: "private".into(),
                call_config: None,
                phone_output_audio_format: "PCM_8000".into(),
                phone_input_audio_format: "PCM_8000".into(),
                started_at: UnixMillis(1_000),
                recording: false,
                route: None,
                agent: None,
                key_name: None,
                node: None,
            })?;
            s.append_events(
                &id,
                &[NewEvent {
                    at: UnixMillis(1_500),
                    kind: "note".into(),
                    detail: format!("{{\"text\":\"{EVENT}\"}}"),
                }],
            )?;
            s.end_call(
                &id,
                &Ended {
                    at: UnixMillis(2_000),
                    reason: "peer_hangup".into(),
                    hangup_by: "peer".into(),
                    counters: Counters::default(),
                    dtmf: String::new(),
                    usage: None,
                },
            )
        })
        .expect("write the call");
    id
}

/// Whether any file in `dir` contains `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read the data dir") {
        let path = entry.expect("an entry").path();
        let bytes = std::fs::read(&path).expect("read a file");
        if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            found.push(path.display().to_string());
        }
    }
    found
}

#[test]
fn a_deleted_call_leaves_nothing_in_the_database_or_its_wal() {
    let dir = temp_dir("secure-delete");
    let mut store = SqliteStore::open(&dir.0).unwrap();
    let id = one_call(&mut store);
    let _kept = one_call(&mut store);
    assert!(!files_containing(&dir.0, CALLER).is_empty(), "written");
    // Delete one of the two: the other still mentions the same texts, so look for its id.
    let ids_before = files_containing(&dir.0, id.as_str());
    assert!(!ids_before.is_empty());
    assert!(store.transaction(|s| s.delete_call(&id)).unwrap());
    assert_eq!(
        files_containing(&dir.0, id.as_str()),
        Vec::<String>::new(),
        "the deleted call's id is in no file (database, WAL, shm)"
    );
    // The WAL was truncated after the delete.
    let wal = dir.0.join("callgate.db-wal");
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0);
    // Retention's batch delete too.
    let _ = store
        .transaction(|s| s.delete_ended_before(UnixMillis(10_000), 10))
        .unwrap();
    assert_eq!(files_containing(&dir.0, CALLER), Vec::<String>::new());
    assert_eq!(files_containing(&dir.0, EVENT), Vec::<String>::new());
}

#[test]
fn the_data_dir_and_its_files_are_private_whatever_the_umask() {
    let dir = temp_dir("private");
    // An existing, world-readable data dir is tightened too.
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut store = SqliteStore::open(&dir.0).unwrap();
    let _ = one_call(&mut store);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.0), 0o700);
    for entry in std::fs::read_dir(&dir.0).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    assert!(
        dir.0.join("callgate.db-wal").exists(),
        "the WAL was checked too"
    );
    drop(store);
    // At shutdown the WAL is emptied into the database.
    let wal = dir.0.join("callgate.db-wal");
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0);
}
