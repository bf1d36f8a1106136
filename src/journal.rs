//! The journal: an embedded, crash-safe outbox (redb) holding every message
//! the host emits until every configured sink acknowledged it, plus the
//! sequence counters and the tracker's per-domain state.
//!
//! Invariants:
//! - an entry, the `host_seq` counter and the domain record it updates are
//!   committed in one transaction; commits are fsync'd (redb `Immediate`
//!   durability) and grouped: one writer thread drains whatever is queued
//!   (up to `group_commit_max`) into a single transaction;
//! - sinks only ever see committed entries (`committed()` watch);
//! - an entry is deleted only once every configured sink's cursor is at or
//!   past it; a sink's cursor only moves forward;
//! - a commit that fails is retried with the same operations: nothing the
//!   tracker handed over is dropped;
//! - a group of sink cursor updates alone is committed without fsync
//!   (redb `Durability::None`) and becomes durable with the next group
//!   that appends, once the writer is idle, or within 1 s: a crash may
//!   forget the latest cursors, which only
//!   means re-publishing what the buses already hold (de-duplicated as
//!   after any crash between a broker's ack and the cursor's commit).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::Duration;

pub use crate::config::WhenFull;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const DOMAINS: TableDefinition<&str, &[u8]> = TableDefinition::new("domains");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
/// Per-sink opaque state written atomically with the sink's cursor (the
/// Kafka sink keeps its acknowledged partition offsets here).
const SINK_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("sink_state");

/// On-disk format version; a newer file is refused, not guessed at.
pub const FORMAT_VERSION: u32 = 1;
const FILE_NAME: &str = "journal.redb";
/// Least time between the starts of two group commits under load. Each
/// commit costs page writes and an fsync whatever its size; at a few
/// thousand events/s, spacing them gathers a dozen entries per commit for
/// at most this much latency (measured: see docs/journal.md).
const COMMIT_SPACING: Duration = Duration::from_millis(5);
/// Longest time sink cursors stay committed without fsync.
const CURSOR_SYNC_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal {path} cannot be opened: {source}")]
    Open {
        path: PathBuf,
        source: Box<redb::DatabaseError>,
    },
    #[error("journal {path} was written by format version {found}; this build reads up to {FORMAT_VERSION}")]
    Format { path: PathBuf, found: u32 },
    #[error("journal {path} belongs to host `{recorded}`, but the configured host id is `{configured}`; use a new journal path for a new host identity")]
    HostMismatch {
        path: PathBuf,
        recorded: String,
        configured: String,
    },
    #[error("journal storage error: {0}")]
    Storage(String),
    #[error("journal entry {host_seq} is corrupt: {reason}")]
    Corrupt { host_seq: u64, reason: String },
    #[error("journal writer has stopped")]
    Closed,
}

fn storage(e: impl std::fmt::Display) -> JournalError {
    JournalError::Storage(e.to_string())
}

/// What an entry carries, so a sink can route it without decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    DomainEvent = 1,
    DomainSnapshot = 2,
    HostSnapshot = 3,
    /// A domain left the host: its snapshot is deleted. Empty payload.
    DomainTombstone = 4,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::DomainEvent),
            2 => Some(Kind::DomainSnapshot),
            3 => Some(Kind::HostSnapshot),
            4 => Some(Kind::DomainTombstone),
            _ => None,
        }
    }
}

/// One journaled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub host_seq: u64,
    pub kind: Kind,
    /// The domain UUID the message is about (the host UUID for host-level).
    pub key: String,
    /// Agent receive time of the underlying event (µs), for latency metrics.
    pub observed_at: i64,
    /// Avro single-object encoded message.
    pub payload: Vec<u8>,
}

/// Bytes before the key in a stored entry: version, kind, observed_at, key length.
const ENTRY_HEADER: usize = 11;

impl Entry {
    /// Size of the stored form (what `journal.max_bytes` counts).
    fn stored_len(&self) -> usize {
        ENTRY_HEADER + self.key.len() + self.payload.len()
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.stored_len());
        v.push(1u8);
        v.push(self.kind as u8);
        v.extend_from_slice(&self.observed_at.to_le_bytes());
        v.push(self.key.len() as u8);
        v.extend_from_slice(self.key.as_bytes());
        v.extend_from_slice(&self.payload);
        v
    }

    fn decode(host_seq: u64, b: &[u8]) -> Result<Entry, JournalError> {
        let corrupt = |reason: &str| JournalError::Corrupt {
            host_seq,
            reason: reason.to_string(),
        };
        if b.len() < ENTRY_HEADER || b[0] != 1 {
            return Err(corrupt("bad header"));
        }
        let kind = Kind::from_u8(b[1]).ok_or_else(|| corrupt("unknown kind"))?;
        let observed_at = i64::from_le_bytes(b[2..10].try_into().expect("8 bytes"));
        let klen = b[10] as usize;
        let key = b
            .get(ENTRY_HEADER..ENTRY_HEADER + klen)
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or_else(|| corrupt("bad key"))?
            .to_string();
        Ok(Entry {
            host_seq,
            kind,
            key,
            observed_at,
            payload: b[ENTRY_HEADER + klen..].to_vec(),
        })
    }
}

/// What the journal held when it was opened.
#[derive(Debug, Clone)]
pub struct Recovered {
    pub host_id: String,
    pub epoch: String,
    /// Last `host_seq` assigned (0 in a fresh epoch).
    pub host_seq: u64,
    /// Tracker records by domain UUID (opaque bytes owned by the tracker).
    pub domains: HashMap<String, Vec<u8>>,
    /// True when the journal was created by this open (new epoch).
    pub fresh: bool,
    /// Entries retained (not yet acknowledged by every sink).
    pub backlog_entries: u64,
}

enum Op {
    Append {
        entry: Entry,
        domain: Option<(String, Vec<u8>)>,
    },
    Cursor {
        sink: String,
        acked: u64,
        state: Option<Vec<u8>>,
    },
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// Shared, cloneable handle: appends go to the writer thread, reads go
/// straight to the database.
#[derive(Clone)]
pub struct Journal {
    db: Arc<Database>,
    ops: SyncSender<Op>,
    committed: watch::Receiver<u64>,
    shared: Arc<Shared>,
    when_full: WhenFull,
}

struct Shared {
    backlog_bytes: AtomicU64,
    backlog_entries: AtomicU64,
    writable: AtomicBool,
    commits: AtomicU64,
    trimmed: AtomicU64,
}

/// The writer half; run it on its own thread with [`JournalWriter::run`].
pub struct JournalWriter {
    db: Arc<Database>,
    ops: Receiver<Op>,
    committed: watch::Sender<u64>,
    shared: Arc<Shared>,
    sinks: Vec<String>,
    group_max: usize,
    last_host_seq: u64,
}

/// Open parameters.
pub struct OpenOptions<'a> {
    pub dir: &'a Path,
    /// Configured host id, if any.
    pub host_id: Option<&'a str>,
    /// Host id for a fresh journal when none is configured.
    pub default_host_id: &'a dyn Fn() -> String,
    /// Names of the configured sinks (the journal trims behind all of them).
    pub sinks: Vec<String>,
    pub group_commit_max: usize,
    /// Capacity of the queue in front of the writer.
    pub queue: usize,
    /// What new entries meet once the backlog is at its bound.
    pub when_full: WhenFull,
}

fn meta_get(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    k: &str,
) -> Result<Option<Vec<u8>>, JournalError> {
    Ok(t.get(k).map_err(storage)?.map(|v| v.value().to_vec()))
}

impl Journal {
    /// Opens (or creates) the journal in `opts.dir`.
    pub fn open(
        opts: OpenOptions<'_>,
    ) -> Result<(Journal, JournalWriter, Recovered), JournalError> {
        crate::config::create_private_dir(opts.dir).map_err(|source| JournalError::Dir {
            path: opts.dir.to_path_buf(),
            source,
        })?;
        let path = opts.dir.join(FILE_NAME);
        let existed = path.exists();
        if !existed {
            // Created 0600 before redb opens it, so the journal (domain
            // names, XML) is never readable by others, not even briefly.
            create_private_file(&path).map_err(|source| JournalError::Dir {
                path: opts.dir.to_path_buf(),
                source,
            })?;
        }
        let db = {
            let mut b = Database::builder();
            b.set_cache_size(1 << 20);
            b.create(&path).map_err(|source| JournalError::Open {
                path: path.clone(),
                source: Box::new(source),
            })?
        };
        restrict_permissions(&path);
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let (rec, trimmed) = {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let _ = txn.open_table(ENTRIES).map_err(storage)?;
            let _ = txn.open_table(DOMAINS).map_err(storage)?;
            let _ = txn.open_table(CURSORS).map_err(storage)?;
            let _ = txn.open_table(SINK_STATE).map_err(storage)?;
            let format = meta_get(&meta, "format")?;
            let fresh = format.is_none();
            if let Some(f) = &format {
                let found = u32::from_le_bytes(f.as_slice().try_into().map_err(|_| {
                    JournalError::Format {
                        path: path.clone(),
                        found: u32::MAX,
                    }
                })?);
                if found > FORMAT_VERSION {
                    return Err(JournalError::Format { path, found });
                }
            }
            if fresh {
                let host = opts
                    .host_id
                    .map(str::to_string)
                    .unwrap_or_else(|| (opts.default_host_id)());
                let epoch = uuid::Uuid::new_v4().simple().to_string();
                meta.insert("format", FORMAT_VERSION.to_le_bytes().as_slice())
                    .map_err(storage)?;
                meta.insert("host_id", host.as_bytes()).map_err(storage)?;
                meta.insert("epoch", epoch.as_bytes()).map_err(storage)?;
                meta.insert("host_seq", 0u64.to_le_bytes().as_slice())
                    .map_err(storage)?;
                meta.insert("trimmed", 0u64.to_le_bytes().as_slice())
                    .map_err(storage)?;
            }
            let text = |k: &str| -> Result<String, JournalError> {
                let v =
                    meta_get(&meta, k)?.ok_or_else(|| storage(format!("meta key {k} missing")))?;
                String::from_utf8(v).map_err(|_| storage(format!("meta key {k} is not UTF-8")))
            };
            let num = |k: &str| -> Result<u64, JournalError> {
                let v =
                    meta_get(&meta, k)?.ok_or_else(|| storage(format!("meta key {k} missing")))?;
                Ok(u64::from_le_bytes(v.as_slice().try_into().map_err(
                    |_| storage(format!("meta key {k} is not a u64")),
                )?))
            };
            let host_id = text("host_id")?;
            if let Some(cfg) = opts.host_id {
                if cfg != host_id {
                    return Err(JournalError::HostMismatch {
                        path,
                        recorded: host_id,
                        configured: cfg.to_string(),
                    });
                }
            }
            let rec = Recovered {
                host_id,
                epoch: text("epoch")?,
                host_seq: num("host_seq")?,
                domains: HashMap::new(),
                fresh: fresh || !existed,
                backlog_entries: 0,
            };
            (rec, num("trimmed")?)
        };
        txn.commit().map_err(storage)?;

        let mut rec = rec;
        let read = db.begin_read().map_err(storage)?;
        let mut backlog_bytes = 0u64;
        {
            let entries = read.open_table(ENTRIES).map_err(storage)?;
            for item in entries.iter().map_err(storage)? {
                let (_, v) = item.map_err(storage)?;
                backlog_bytes += v.value().len() as u64;
                rec.backlog_entries += 1;
            }
            let domains = read.open_table(DOMAINS).map_err(storage)?;
            for item in domains.iter().map_err(storage)? {
                let (k, v) = item.map_err(storage)?;
                rec.domains
                    .insert(k.value().to_string(), v.value().to_vec());
            }
        }
        drop(read);

        let db = Arc::new(db);
        let shared = Arc::new(Shared {
            backlog_bytes: AtomicU64::new(backlog_bytes),
            backlog_entries: AtomicU64::new(rec.backlog_entries),
            writable: AtomicBool::new(true),
            commits: AtomicU64::new(0),
            trimmed: AtomicU64::new(trimmed),
        });
        let (tx, rx) = std::sync::mpsc::sync_channel(opts.queue.max(1));
        let (ctx, crx) = watch::channel(rec.host_seq);
        let journal = Journal {
            db: db.clone(),
            ops: tx,
            committed: crx,
            shared: shared.clone(),
            when_full: opts.when_full,
        };
        let writer = JournalWriter {
            db,
            ops: rx,
            committed: ctx,
            shared,
            sinks: opts.sinks,
            group_max: opts.group_commit_max.max(1),
            last_host_seq: rec.host_seq,
        };
        Ok((journal, writer, rec))
    }

    /// Queues an entry (and the domain record it updates) for the next
    /// group commit. Blocks when the writer's queue is full (backpressure).
    pub fn append(
        &self,
        entry: Entry,
        domain: Option<(String, Vec<u8>)>,
    ) -> Result<(), JournalError> {
        self.shared
            .backlog_bytes
            .fetch_add(entry.stored_len() as u64, Ordering::Relaxed);
        self.shared.backlog_entries.fetch_add(1, Ordering::Relaxed);
        self.ops
            .send(Op::Append { entry, domain })
            .map_err(|_| JournalError::Closed)
    }

    /// Records that `sink` has every entry up to `acked` acknowledged.
    pub fn ack(&self, sink: &str, acked: u64) -> Result<(), JournalError> {
        self.ops
            .send(Op::Cursor {
                sink: sink.to_string(),
                acked,
                state: None,
            })
            .map_err(|_| JournalError::Closed)
    }

    /// Like [`Journal::ack`], and replaces the sink's state in the same
    /// transaction (the state is written even when the cursor stays).
    pub fn ack_with_state(
        &self,
        sink: &str,
        acked: u64,
        state: Vec<u8>,
    ) -> Result<(), JournalError> {
        self.ops
            .send(Op::Cursor {
                sink: sink.to_string(),
                acked,
                state: Some(state),
            })
            .map_err(|_| JournalError::Closed)
    }

    /// The state last written with [`Journal::ack_with_state`].
    pub fn sink_state(&self, sink: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let read = self.db.begin_read().map_err(storage)?;
        let t = read.open_table(SINK_STATE).map_err(storage)?;
        Ok(t.get(sink).map_err(storage)?.map(|v| v.value().to_vec()))
    }

    /// Waits until everything queued before this call is committed.
    pub fn sync(&self) -> Result<(), JournalError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.ops
            .send(Op::Barrier(tx))
            .map_err(|_| JournalError::Closed)?;
        rx.recv().map_err(|_| JournalError::Closed)
    }

    /// Highest committed `host_seq`; changes after every commit.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Whether `sink` has a cursor (it acknowledged something before).
    pub fn has_cursor(&self, sink: &str) -> Result<bool, JournalError> {
        let read = self.db.begin_read().map_err(storage)?;
        let t = read.open_table(CURSORS).map_err(storage)?;
        t.get(sink).map(|c| c.is_some()).map_err(storage)
    }

    /// A sink's acknowledged position; a new sink's, or one behind the
    /// trimmed point (disabled for a while), is the trimmed point.
    pub fn cursor(&self, sink: &str) -> Result<u64, JournalError> {
        Ok(self.cursor_and_state(sink)?.0)
    }

    /// [`Journal::cursor`] and [`Journal::sink_state`] from one snapshot.
    pub fn cursor_and_state(&self, sink: &str) -> Result<(u64, Option<Vec<u8>>), JournalError> {
        let read = self.db.begin_read().map_err(storage)?;
        let cursors = read.open_table(CURSORS).map_err(storage)?;
        let states = read.open_table(SINK_STATE).map_err(storage)?;
        let trimmed = self.shared.trimmed.load(Ordering::Relaxed);
        let cursor = cursors
            .get(sink)
            .map_err(storage)?
            .map_or(trimmed, |v| v.value().max(trimmed));
        let state = states
            .get(sink)
            .map_err(storage)?
            .map(|v| v.value().to_vec());
        Ok((cursor, state))
    }

    /// The committed record of one domain (the tracker reads back a
    /// record it forgot from memory when the domain returns).
    pub fn domain_record(&self, uuid: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let read = self.db.begin_read().map_err(storage)?;
        let domains = read.open_table(DOMAINS).map_err(storage)?;
        Ok(domains
            .get(uuid)
            .map_err(storage)?
            .map(|v| v.value().to_vec()))
    }

    /// Up to `max` committed entries with `host_seq > after`, in order.
    pub fn read_after(&self, after: u64, max: usize) -> Result<Vec<Entry>, JournalError> {
        let read = self.db.begin_read().map_err(storage)?;
        let entries = read.open_table(ENTRIES).map_err(storage)?;
        let mut out = Vec::with_capacity(max.min(1024));
        for item in entries.range(after.saturating_add(1)..).map_err(storage)? {
            if out.len() >= max {
                break;
            }
            let (k, v) = item.map_err(storage)?;
            out.push(Entry::decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Bytes of retained entries (appended, not yet trimmed).
    pub fn backlog_bytes(&self) -> u64 {
        self.shared.backlog_bytes.load(Ordering::Relaxed)
    }

    /// Entries retained.
    pub fn backlog_entries(&self) -> u64 {
        self.shared.backlog_entries.load(Ordering::Relaxed)
    }

    /// False after a failed commit, until a commit succeeds again.
    pub fn writable(&self) -> bool {
        self.shared.writable.load(Ordering::Relaxed)
    }

    /// Group commits done since open.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }
}

/// Creates an empty file with mode 0600 (redb initializes an empty file).
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

/// A journal written by an older build may be more open: make it 0600.
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(path = %path.display(), error = %e, "cannot make the journal file mode 0600");
    }
}

mod when_full;
mod writer;

#[cfg(test)]
mod tests;
