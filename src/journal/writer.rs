//! The journal's writer thread: the one owner of write transactions.
//! It drains the operations the tracker and the sinks queue into group
//! commits, publishes the committed head, trims what every sink has
//! acknowledged, and rotates the epoch of a journal found behind the bus.
//!
//! Invariants (the journal's, see its header): entries are committed
//! before any sink sees them; a failed commit is retried with the same
//! operations; cursor-only groups are fsync'd within `CURSOR_SYNC_MAX`.

use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use redb::{Durability, ReadableTable};

use super::{
    storage, JournalError, JournalWriter, Op, Recovered, COMMIT_SPACING, CURSORS, CURSOR_SYNC_MAX,
    DOMAINS, ENTRIES, META, SINK_STATE,
};

impl JournalWriter {
    /// Starts a new epoch in this journal, before [`JournalWriter::run`]:
    /// a new epoch id, `host_seq` 0, no domain records, no entries, no
    /// sink cursors or sink states, in one transaction. For a journal
    /// found to be behind the bus (restored from a backup or a VM
    /// snapshot): its backlog is a prefix of what the bus already holds,
    /// and its `host_seq` values are taken there. `rec` is updated to what
    /// a fresh journal of the new epoch holds; returns the old epoch.
    pub fn rotate_epoch(&mut self, rec: &mut Recovered) -> Result<String, JournalError> {
        let epoch = uuid::Uuid::new_v4().simple().to_string();
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert("epoch", epoch.as_bytes()).map_err(storage)?;
            meta.insert("host_seq", 0u64.to_le_bytes().as_slice())
                .map_err(storage)?;
            meta.insert("trimmed", 0u64.to_le_bytes().as_slice())
                .map_err(storage)?;
            txn.open_table(ENTRIES)
                .map_err(storage)?
                .retain(|_, _| false)
                .map_err(storage)?;
            txn.open_table(DOMAINS)
                .map_err(storage)?
                .retain(|_, _| false)
                .map_err(storage)?;
            txn.open_table(CURSORS)
                .map_err(storage)?
                .retain(|_, _| false)
                .map_err(storage)?;
            txn.open_table(SINK_STATE)
                .map_err(storage)?
                .retain(|_, _| false)
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        self.last_host_seq = 0;
        self.shared.trimmed.store(0, Ordering::Relaxed);
        self.shared.backlog_bytes.store(0, Ordering::Relaxed);
        self.shared.backlog_entries.store(0, Ordering::Relaxed);
        self.committed.send_replace(0);
        let old = std::mem::replace(&mut rec.epoch, epoch);
        rec.host_seq = 0;
        rec.domains.clear();
        rec.backlog_entries = 0;
        Ok(old)
    }

    /// Runs until every [`Journal`] handle is dropped, then commits what
    /// is left and returns.
    pub fn run(mut self) {
        let mut batch: Vec<Op> = Vec::with_capacity(self.group_max);
        // A commit without fsync is not durable yet.
        let mut pending_sync = false;
        let mut last_commit = Instant::now() - COMMIT_SPACING;
        let mut last_durable = Instant::now();
        loop {
            match self.ops.recv_timeout(Duration::from_millis(500)) {
                Ok(op) => batch.push(op),
                Err(e) => {
                    // Idle (or closing): cursors committed without fsync
                    // are made durable now.
                    if pending_sync {
                        match self.commit(&[], true) {
                            Ok(()) => {
                                pending_sync = false;
                                last_durable = Instant::now();
                                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "journal sync of sink cursors failed; retrying")
                            }
                        }
                    }
                    match e {
                        RecvTimeoutError::Timeout => continue,
                        RecvTimeoutError::Disconnected => return,
                    }
                }
            }
            // Under a steady stream of operations, at most one commit per
            // COMMIT_SPACING: what arrives meanwhile joins this group (an
            // operation after a quiet spell commits at once).
            let gather_until = last_commit + COMMIT_SPACING;
            while batch.len() < self.group_max {
                let wait = gather_until.saturating_duration_since(Instant::now());
                let next = if wait.is_zero() {
                    self.ops.try_recv().ok()
                } else {
                    self.ops.recv_timeout(wait).ok()
                };
                match next {
                    Some(op) => batch.push(op),
                    None => break,
                }
            }
            last_commit = Instant::now();
            // Only what was appended (and a caller waiting for a barrier)
            // needs the fsync; a batch of sink cursors alone is committed
            // without it and made durable by the next such commit.
            // (Nor longer than CURSOR_SYNC_MAX: while sinks drain a
            // backlog nothing is appended, and trimmed space is reusable
            // only after a durable commit.)
            let durable = batch
                .iter()
                .any(|op| matches!(op, Op::Append { .. } | Op::Barrier(_)))
                || last_durable.elapsed() >= CURSOR_SYNC_MAX;
            let mut delay = Duration::from_millis(50);
            loop {
                match self.commit(&batch, durable) {
                    Ok(()) => break,
                    Err(e) => {
                        self.shared.writable.store(false, Ordering::Relaxed);
                        tracing::error!(error = %e, retry_in = ?delay, "journal commit failed; retrying with the same entries");
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
            pending_sync = !durable;
            if durable {
                last_durable = Instant::now();
            }
            self.shared.writable.store(true, Ordering::Relaxed);
            self.shared.commits.fetch_add(1, Ordering::Relaxed);
            // Before the barriers: after `sync()` the watch shows the commit.
            self.committed.send_replace(self.last_host_seq);
            for op in batch.drain(..) {
                if let Op::Barrier(tx) = op {
                    let _ = tx.send(());
                }
            }
        }
    }

    fn commit(&mut self, batch: &[Op], durable: bool) -> Result<(), JournalError> {
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(storage)?;
        let mut last = self.last_host_seq;
        let mut trimmed_bytes = 0u64;
        let mut trimmed_entries = 0u64;
        let mut new_trimmed = None;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(storage)?;
            let mut domains = txn.open_table(DOMAINS).map_err(storage)?;
            let mut cursors = txn.open_table(CURSORS).map_err(storage)?;
            let mut sink_state = txn.open_table(SINK_STATE).map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut cursor_moved = false;
            for op in batch {
                match op {
                    Op::Append { entry, domain } => {
                        entries
                            .insert(entry.host_seq, entry.encode().as_slice())
                            .map_err(storage)?;
                        last = last.max(entry.host_seq);
                        if let Some((uuid, rec)) = domain {
                            domains
                                .insert(uuid.as_str(), rec.as_slice())
                                .map_err(storage)?;
                        }
                    }
                    Op::Cursor { sink, acked, state } => {
                        if let Some(st) = state {
                            sink_state
                                .insert(sink.as_str(), st.as_slice())
                                .map_err(storage)?;
                        }
                        let prev = cursors
                            .get(sink.as_str())
                            .map_err(storage)?
                            .map(|v| v.value());
                        if prev.is_none_or(|p| *acked > p) {
                            cursors.insert(sink.as_str(), *acked).map_err(storage)?;
                            cursor_moved = true;
                        }
                    }
                    Op::Barrier(_) => {}
                }
            }
            meta.insert("host_seq", last.to_le_bytes().as_slice())
                .map_err(storage)?;
            // Trim behind the slowest configured sink (everything, when no
            // sink is configured).
            let mut floor = last;
            for s in &self.sinks {
                let c = cursors
                    .get(s.as_str())
                    .map_err(storage)?
                    .map(|v| v.value())
                    .unwrap_or_else(|| self.shared.trimmed.load(Ordering::Relaxed));
                floor = floor.min(c);
            }
            let trimmed = self.shared.trimmed.load(Ordering::Relaxed);
            if floor > trimmed && (cursor_moved || self.sinks.is_empty()) {
                let range = trimmed + 1..=floor;
                for item in entries.range(range.clone()).map_err(storage)? {
                    let (_, v) = item.map_err(storage)?;
                    trimmed_bytes += v.value().len() as u64;
                    trimmed_entries += 1;
                }
                entries.retain_in(range, |_, _| false).map_err(storage)?;
                meta.insert("trimmed", floor.to_le_bytes().as_slice())
                    .map_err(storage)?;
                new_trimmed = Some(floor);
            }
        }
        txn.commit().map_err(storage)?;
        self.last_host_seq = last;
        if let Some(t) = new_trimmed {
            self.shared.trimmed.store(t, Ordering::Relaxed);
            self.shared.backlog_bytes.fetch_sub(
                trimmed_bytes.min(self.shared.backlog_bytes.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            self.shared.backlog_entries.fetch_sub(
                trimmed_entries.min(self.shared.backlog_entries.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
        }
        Ok(())
    }
}
