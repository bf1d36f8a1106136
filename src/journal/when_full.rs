//! What the journal does with new entries once its unpublished backlog
//! reaches `journal.max_bytes`: the one place the [`WhenFull`] policy
//! (configured in `config`) is applied, [`Journal::rejects_new`].
//!
//! Invariants:
//! - every policy is handled in `rejects_new` (an exhaustive `match`), so
//!   a new variant cannot be configured without deciding what it does;
//! - under `reject-new` (the one policy) entries already accepted are never
//!   dropped; new ones are refused while the backlog is at the bound, and
//!   the caller records a gap marker and reconciles once space is free.

use super::Journal;
use crate::config::WhenFull;

impl Journal {
    /// Whether a new entry offered now is to be refused: the unpublished
    /// backlog has reached `max_bytes` and the configured policy refuses
    /// new entries then.
    pub fn rejects_new(&self, max_bytes: u64) -> bool {
        if self.backlog_bytes() < max_bytes {
            return false;
        }
        match self.when_full {
            WhenFull::RejectNew => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::OpenOptions;

    #[test]
    fn reject_new_refuses_only_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, writer, _) = Journal::open(OpenOptions {
            dir: dir.path(),
            host_id: Some("h"),
            default_host_id: &|| "unused".into(),
            sinks: vec![],
            group_commit_max: 1,
            queue: 1,
            when_full: WhenFull::RejectNew,
        })
        .unwrap();
        assert_eq!(journal.backlog_bytes(), 0);
        assert!(!journal.rejects_new(1), "below the bound");
        assert!(journal.rejects_new(0), "at the bound");
        drop(writer);
    }
}
