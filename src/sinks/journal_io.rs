//! The sinks' journal I/O, off the async thread. The agent runs every sink
//! (and the telemetry endpoint) on one current-thread tokio runtime; a
//! journal read there (redb: a read transaction, file I/O) or a cursor
//! write (a send into the journal writer's bounded queue, which waits
//! while the writer fsyncs a full group) would stall all of them. Both run
//! on tokio's blocking pool instead, batched: one task per read-ahead
//! batch, and one task hands over every cursor write asked for while it
//! runs.
//!
//! Invariants:
//! - at most one read of a sink is under way, and the sink moves its
//!   position on only with the entries it got: read-ahead never skips or
//!   repeats an entry;
//! - cursor writes reach the journal one at a time, in the order asked
//!   for; a write asked for while another is handed over replaces one
//!   still waiting (a later write holds everything an earlier one did: the
//!   cursor only moves forward, and a state is the sink's whole state);
//! - after [`CursorWriter::flush`] every write asked for is in the
//!   journal's queue; a writer dropped without it still hands them over,
//!   in order, from the blocking pool.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::task::JoinHandle;

use crate::journal::{Entry, Journal, JournalError};

/// One journal read at a time, on the blocking pool.
pub(crate) struct ReadAhead {
    journal: Journal,
    job: Option<JoinHandle<Result<Vec<Entry>, JournalError>>>,
}

impl ReadAhead {
    pub(crate) fn new(journal: Journal) -> Self {
        ReadAhead { journal, job: None }
    }

    /// Whether a read is under way.
    pub(crate) fn busy(&self) -> bool {
        self.job.is_some()
    }

    /// Starts [`Journal::read_after`]`(after, max)`; only when not busy.
    pub(crate) fn start(&mut self, after: u64, max: usize) {
        debug_assert!(self.job.is_none(), "one read at a time");
        let journal = self.journal.clone();
        self.job = Some(tokio::task::spawn_blocking(move || {
            journal.read_after(after, max)
        }));
    }

    /// The entries of the read under way; never ready while none is.
    /// Cancel-safe: a `select!` that drops it keeps the read for later.
    pub(crate) async fn done(&mut self) -> Result<Vec<Entry>, JournalError> {
        let Some(job) = self.job.as_mut() else {
            return std::future::pending().await;
        };
        let r = job.await;
        self.job = None;
        r.map_err(|e| JournalError::Storage(format!("journal read failed: {e}")))?
    }
}

/// A cursor write: the cursor, and the sink's state when it keeps one.
type Write = (u64, Option<Vec<u8>>);

/// The cursor writes of one sink, handed to the journal in order from the
/// blocking pool.
pub(crate) struct CursorWriter {
    journal: Journal,
    sink: &'static str,
    /// The write waiting to be handed over, and whether a task is handing
    /// writes over (it runs until it finds no write waiting). Held only to
    /// swap these, never across journal calls.
    slot: Arc<Mutex<(Option<Write>, bool)>>,
    /// The task handing writes over, the last one started.
    job: Option<JoinHandle<()>>,
}

impl CursorWriter {
    pub(crate) fn new(journal: Journal, sink: &'static str) -> Self {
        CursorWriter {
            journal,
            sink,
            slot: Arc::default(),
            job: None,
        }
    }

    /// Records `acked` as the sink's cursor ([`Journal::ack`]; with a
    /// state, [`Journal::ack_with_state`]) after the writes asked for
    /// before. Never waits.
    pub(crate) fn write(&mut self, acked: u64, state: Option<Vec<u8>>) {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        slot.0 = Some((acked, state));
        if slot.1 {
            return;
        }
        slot.1 = true;
        let (journal, sink, shared) = (self.journal.clone(), self.sink, self.slot.clone());
        self.job = Some(tokio::task::spawn_blocking(move || loop {
            let next = {
                let mut slot = shared.lock().unwrap_or_else(PoisonError::into_inner);
                slot.1 = slot.0.is_some();
                slot.0.take()
            };
            let Some((acked, state)) = next else {
                return;
            };
            let r = match state {
                None => journal.ack(sink, acked),
                Some(state) => journal.ack_with_state(sink, acked, state),
            };
            if let Err(e) = r {
                tracing::warn!(sink, error = %e, "cannot record the sink's cursor");
            }
        }));
    }

    /// Waits until every write asked for is in the journal's queue.
    pub(crate) async fn flush(&mut self) {
        if let Some(job) = self.job.take() {
            let _ = job.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Kind, OpenOptions};

    #[test]
    fn reads_resume_and_writes_land_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, writer, _) = Journal::open(OpenOptions {
            dir: dir.path(),
            host_id: Some("h"),
            default_host_id: &|| "unused".into(),
            sinks: vec!["s".into()],
            group_commit_max: 64,
            queue: 128,
            when_full: crate::journal::WhenFull::RejectNew,
        })
        .unwrap();
        let writer = std::thread::spawn(move || writer.run());
        for n in 1..=100 {
            let entry = Entry {
                host_seq: n,
                kind: Kind::DomainEvent,
                key: "k".into(),
                observed_at: 0,
                payload: vec![],
            };
            journal.append(entry, None).unwrap();
        }
        journal.sync().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut reads = ReadAhead::new(journal.clone());
            let mut after = 0;
            let mut seen = Vec::new();
            while after < 100 {
                reads.start(after, 30);
                let batch = reads.done().await.unwrap();
                after = batch.last().unwrap().host_seq;
                seen.extend(batch.iter().map(|e| e.host_seq));
            }
            assert_eq!(seen, (1..=100).collect::<Vec<_>>());

            let mut acks = CursorWriter::new(journal.clone(), "s");
            for n in 1..=100u64 {
                acks.write(n, Some(n.to_string().into_bytes()));
            }
            acks.flush().await;
        });
        journal.sync().unwrap();
        let (cursor, state) = journal.cursor_and_state("s").unwrap();
        assert_eq!(cursor, 100);
        assert_eq!(state.as_deref(), Some(&b"100"[..]), "the last state wins");
        drop(journal);
        writer.join().unwrap();
    }
}
