//! What the Kafka sink keeps in the journal beside its cursor: per topic,
//! the offset past this host's last acknowledged record in each partition
//! (where recovery starts reading back), written in the same transaction
//! as the cursor.
//!
//! Invariant: offsets that cannot be trusted (unreadable, or of a topic
//! created again) are dropped, never guessed: those partitions are read
//! back from their start.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::KafkaSinkError;
use crate::journal::Journal;

/// What the journal keeps, per topic, besides the sink's cursor.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicOffsets {
    /// Partition count the offsets were recorded under.
    pub partitions: i32,
    /// Per partition: the offset past this host's last record at or below
    /// the cursor (or past a stretch read back and found free of this
    /// host's records above the cursor).
    pub next: BTreeMap<i32, i64>,
    /// After a partition count change: the previous count, and the
    /// `host_seq` up to which entries may have been placed under it.
    #[serde(default)]
    pub prior: Option<(i32, u64)>,
}

/// [`TopicOffsets`] by topic name.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offsets {
    pub topics: BTreeMap<String, TopicOffsets>,
}

impl Offsets {
    /// The cursor and the offsets recorded with it (one read, after
    /// everything queued for the journal is committed). Unreadable offsets
    /// (another format) are dropped: partitions are then read back from
    /// their start, which is slower but equally correct.
    pub(super) fn load(journal: &Journal, sink: &str) -> Result<(u64, Offsets), KafkaSinkError> {
        let err = |e: crate::journal::JournalError| KafkaSinkError::Journal(e.to_string());
        journal.sync().map_err(err)?;
        let (cursor, state) = journal.cursor_and_state(sink).map_err(err)?;
        let offsets = match state {
            None => Offsets::default(),
            Some(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "stored Kafka offsets are unreadable; reading back from the start of each partition");
                Offsets::default()
            }),
        };
        Ok((cursor, offsets))
    }
}

/// Drops the recorded offsets of topics created just now: they belonged
/// to a deleted topic of the same name (its partitions start again at 0),
/// so those partitions are read back from their start.
pub(super) fn forget_offsets(offsets: &mut Offsets, created: &[String]) {
    for t in created {
        if offsets.topics.remove(t).is_some_and(|o| !o.next.is_empty()) {
            tracing::warn!(topic = %t, "topic was created again; its recorded offsets are void, reading it back from the start");
        }
    }
}
