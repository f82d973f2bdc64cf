//! The PostgreSQL store's local journal: batches the database could not take, kept on disk
//! until it is back.
//!
//! # Format
//! One file, `store-journal.jsonl` in the data directory, append-only: one line per batch, a
//! JSON array of [`Op`]s, written with one `write` and made durable with `fsync` before the
//! batch's callers are answered. A line cut short by a crash (no newline, or not JSON) can only
//! be the last one; it is ignored, and its callers were never answered.
//!
//! # Bound
//! The file holds at most [`Journal::max_bytes`] bytes ([`JOURNAL_MAX_BYTES`] by default). A
//! batch that would pass it is refused: the store reports it as failed (awaited writes get
//! an error; progress updates and unawaited events are lost and counted) and logs at error.
//!
//! # Replay
//! Every [`Op`] is idempotent when replayed (inserts and entries keyed by call ID and
//! sequence number do nothing when present, an end applies once, updates set values), so a
//! batch whose commit was cut off, or a journal replayed again after a crash, writes each
//! record once. The file is emptied only after every batch in it has been committed.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{CallId, Counters, Ended, Error, NewCall, NewEvent, NewTranscriptEntry, UnixMillis};

/// The default bound of the journal file: 256 MiB. A live call writes a few hundred bytes per
/// progress interval (5 s), so this holds hours of a large call center's records.
pub const JOURNAL_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// The journal's file name in the data directory.
pub(crate) const FILE_NAME: &str = "store-journal.jsonl";

/// One write, as journaled: what the store methods were asked, with the sequence numbers
/// already given to event and transcript entries (`None`: unknown when journaled; the replay
/// numbers them after the call's last entry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Op {
    Insert {
        call: NewCall,
    },
    Answered {
        id: CallId,
        #[serde(with = "crate::record::millis")]
        at: UnixMillis,
    },
    Progress {
        id: CallId,
        counters: Counters,
        dtmf: String,
        usage: Option<String>,
    },
    End {
        id: CallId,
        ended: Ended,
    },
    Cdr {
        id: CallId,
        raw: String,
    },
    /// A call's usage replaced (after its end too).
    Usage {
        id: CallId,
        usage: String,
    },
    Events {
        id: CallId,
        first_seq: Option<u64>,
        events: Vec<NewEvent>,
    },
    Transcript {
        id: CallId,
        first_seq: Option<u64>,
        entries: Vec<NewTranscriptEntry>,
    },
    Delete {
        id: CallId,
    },
    /// Webhook outbox rows (inserted once, whatever the replays).
    Outbox {
        rows: Vec<crate::outbox::NewDelivery>,
    },
}

/// The journal file: its length and how much of it has been replayed.
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    len: u64,
    /// Batches in the file.
    batches: u64,
    /// Bytes at the start of the file already committed to the database by this process.
    replayed: u64,
    /// The bound.
    pub(crate) max_bytes: u64,
}

impl Journal {
    /// Opens (creating, 0600 whatever the umask) the journal in `dir`, counting the batches it already holds.
    pub(crate) fn open(dir: &Path, max_bytes: u64) -> Result<Self, Error> {
        let io = |source| Error::Journal {
            path: dir.join(FILE_NAME).display().to_string(),
            source,
        };
        crate::files::private_dir(dir).map_err(io)?;
        let path = dir.join(FILE_NAME);
        let file = private_options()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        let mut journal = Self {
            path,
            file,
            len: 0,
            batches: 0,
            replayed: 0,
            max_bytes,
        };
        let batches = journal.read_from(0)?;
        journal.batches = batches.len() as u64;
        journal.len = batches.last().map_or(0, |b| b.end);
        // Anything after the last whole line is a write a crash cut short: drop it, so the
        // next batch starts on a line of its own.
        let on_disk = journal.file.metadata().map_err(io)?.len();
        if on_disk != journal.len {
            tracing::warn!(
                path = %journal.path.display(),
                dropped = on_disk - journal.len,
                "Store journal ends with a partial batch (a crash while writing); dropped it."
            );
            journal.file.set_len(journal.len).map_err(io)?;
            journal.file.sync_data().map_err(io)?;
        }
        Ok(journal)
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::Journal {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Whether batches wait for the database.
    pub(crate) fn is_empty(&self) -> bool {
        self.batches == 0
    }

    /// Batches waiting.
    pub(crate) fn batches(&self) -> u64 {
        self.batches
    }

    /// Bytes waiting (including those replayed but not yet cleared).
    pub(crate) fn bytes(&self) -> u64 {
        self.len
    }

    /// Appends one batch and makes it durable; refused (nothing written) if it would take the
    /// file past its bound.
    pub(crate) fn append(&mut self, ops: &[Op]) -> Result<(), Error> {
        let mut line = serde_json::to_vec(ops).map_err(|e| self.io(std::io::Error::other(e)))?;
        line.push(b'\n');
        let len = line.len() as u64;
        if self.len.saturating_add(len) > self.max_bytes {
            return Err(Error::JournalFull {
                bytes: self.len,
                max: self.max_bytes,
            });
        }
        if let Err(e) = self
            .file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
        {
            // A partial line would corrupt the next one: cut back to the last whole batch.
            let _ = self.file.set_len(self.len);
            return Err(self.io(e));
        }
        self.len += len;
        self.batches += 1;
        Ok(())
    }

    /// The batches not yet replayed by this process, in order, each with the offset just past
    /// it (for [`Journal::replayed_to`]).
    pub(crate) fn pending(&mut self) -> Result<Vec<Batch>, Error> {
        self.read_from(self.replayed)
    }

    /// Notes that everything before `offset` is committed to the database.
    pub(crate) fn replayed_to(&mut self, offset: u64) {
        self.replayed = offset;
    }

    /// Empties the file once every batch in it is committed.
    pub(crate) fn clear(&mut self) -> Result<(), Error> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| self.io(e))?;
        self.len = 0;
        self.batches = 0;
        self.replayed = 0;
        Ok(())
    }

    fn read_from(&mut self, offset: u64) -> Result<Vec<Batch>, Error> {
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| self.io(e))?;
        let mut reader = BufReader::new(&self.file);
        let mut batches = Vec::new();
        let mut end = offset;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| Error::Journal {
                    path: self.path.display().to_string(),
                    source: e,
                })?;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            match serde_json::from_slice::<Vec<Op>>(&line) {
                Ok(ops) => {
                    end += n as u64;
                    batches.push(Batch { ops, end });
                }
                // Only a crash mid-write makes a bad line, and only the last one.
                Err(_) => break,
            }
        }
        Ok(batches)
    }

    /// Keeps a batch the database refused for good (a replay error other than the database
    /// being unavailable) in `store-journal.rejected.jsonl`, for the operator.
    pub(crate) fn reject(&self, ops: &[Op]) -> Result<(), Error> {
        let path = self.path.with_extension("rejected.jsonl");
        let io = |source| Error::Journal {
            path: path.display().to_string(),
            source,
        };
        let mut line = serde_json::to_vec(ops).map_err(|e| io(std::io::Error::other(e)))?;
        line.push(b'\n');
        let mut file = private_options()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        file.write_all(&line)
            .and_then(|()| file.sync_data())
            .map_err(io)
    }
}

/// One journaled batch.
#[derive(Debug)]
pub(crate) struct Batch {
    /// Its operations.
    pub(crate) ops: Vec<Op>,
    /// The file offset just past it.
    pub(crate) end: u64,
}

/// Options that create a file readable and writable by this user only (0600): journaled
/// batches hold call records.
fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("callgate-journal-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn op(i: u64) -> Op {
        Op::Cdr {
            id: CallId::from_string(format!("c{i}")),
            raw: "{}".into(),
        }
    }

    #[test]
    fn batches_survive_reopening_and_a_torn_tail_is_dropped() {
        let d = dir();
        let mut j = Journal::open(&d, JOURNAL_MAX_BYTES).unwrap();
        j.append(&[op(1), op(2)]).unwrap();
        j.append(&[op(3)]).unwrap();
        drop(j);
        // A crash in the middle of the third batch.
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.join(FILE_NAME))
            .unwrap();
        f.write_all(b"[{\"op\":\"cdr\",\"id\":").unwrap();
        let mut j = Journal::open(&d, JOURNAL_MAX_BYTES).unwrap();
        assert_eq!(j.batches(), 2);
        let pending = j.pending().unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].ops, [op(1), op(2)]);
        assert_eq!(pending[1].ops, [op(3)]);
        // The next batch starts on its own line.
        j.append(&[op(4)]).unwrap();
        j.replayed_to(pending[1].end);
        let rest = j.pending().unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].ops, [op(4)]);
        j.clear().unwrap();
        assert!(j.is_empty());
        assert_eq!(Journal::open(&d, JOURNAL_MAX_BYTES).unwrap().batches(), 0);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_batch_past_the_bound_is_refused_and_nothing_is_written() {
        let d = dir();
        let mut j = Journal::open(&d, 100).unwrap();
        j.append(&[op(1)]).unwrap();
        let before = j.bytes();
        let big: Vec<Op> = (0..10).map(op).collect();
        assert!(matches!(
            j.append(&big),
            Err(Error::JournalFull { max: 100, .. })
        ));
        assert_eq!(j.bytes(), before);
        assert_eq!(j.pending().unwrap().len(), 1);
        std::fs::remove_dir_all(d).unwrap();
    }
}
