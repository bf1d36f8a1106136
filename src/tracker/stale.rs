//! Snapshots an earlier epoch left behind.
//!
//! A new epoch (journal lost, recreated, or rotated because it was found
//! restored) knows nothing of the domains earlier epochs snapshotted. A
//! domain undefined while the agent was down would otherwise stay the
//! latest record of its subject / key forever. At start the agent reads
//! this host's latest snapshot records from the buses and hands the
//! tracker the UUIDs whose latest record is another epoch's and not a
//! tombstone (`Item::StaleSnapshots`); the next complete round tombstones
//! every one of them it does not contain (journaled like every other
//! tombstone, `host_seq` contiguous). A domain the round contains gets
//! this epoch's snapshot instead, which replaces the stale one.

use std::collections::HashSet;

use super::state::Tracker;
use super::types::Snap;

impl Tracker {
    /// Adds UUIDs whose latest snapshot record on a bus belongs to an
    /// earlier epoch; returns how many are new.
    pub fn seed_stale(&mut self, uuids: Vec<String>) -> usize {
        let before = self.stale.len();
        self.stale.extend(uuids);
        self.stale.len() - before
    }

    /// Domains waiting for a complete round to settle them.
    pub fn stale_pending(&self) -> usize {
        self.stale.len()
    }

    /// At the end of a complete round: a tombstone for every seeded UUID
    /// the round does not contain; all seeded UUIDs are settled.
    pub(super) fn stale_tombstones(
        &mut self,
        present: &HashSet<&str>,
        observed_at: i64,
        out: &mut Vec<Snap>,
    ) {
        if self.stale.is_empty() {
            return;
        }
        let mut left: Vec<String> = std::mem::take(&mut self.stale)
            .into_iter()
            .filter(|u| !present.contains(u.as_str()))
            .collect();
        left.sort();
        for uuid in left {
            // A tombstone the round just emitted for the same domain (it
            // left during this epoch) already deletes it.
            let done = out
                .iter()
                .any(|s| matches!(s, Snap::Tombstone { uuid: u, .. } if *u == uuid));
            if done {
                continue;
            }
            let host_seq = self.next_host_seq();
            out.push(Snap::Tombstone {
                uuid,
                host_seq,
                observed_at,
                record: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::testkit::facts;
    use super::super::types::TrackerOptions;
    use super::*;
    use crate::config::XmlMode;
    use crate::model::{DomainState, HostInfo};

    const A: &str = "aaaaaaaa-2222-0000-0000-000000000000";
    const X: &str = "eeeeeeee-2222-0000-0000-000000000000";

    fn tracker() -> Tracker {
        Tracker::new(
            "host-a".into(),
            "e2".into(),
            0,
            HashMap::new(),
            TrackerOptions {
                xml: XmlMode::Off,
                max_journal_bytes: u64::MAX,
            },
        )
    }

    fn kinds(snaps: &[Snap]) -> Vec<String> {
        snaps
            .iter()
            .map(|s| match s {
                Snap::Host(h) => h.kind.as_str().to_string(),
                Snap::Domain(d, _) => format!("DOMAIN {}", d.domain.uuid),
                Snap::Tombstone { uuid, record, .. } => {
                    format!("TOMBSTONE {uuid} record={}", record.is_some())
                }
            })
            .collect()
    }

    #[test]
    fn the_next_complete_round_tombstones_seeded_domains_it_does_not_contain() {
        let mut t = tracker();
        let info = HostInfo::default();
        let listing = vec![(A.to_string(), facts(DomainState::RUNNING, "BOOTED", true))];
        t.on_resync(&listing, 1);
        let first = t.round(&listing, &info, 1);
        assert!(!first.iter().any(|s| matches!(s, Snap::Tombstone { .. })));
        // An earlier epoch left A and X as their subjects' latest records.
        assert_eq!(t.seed_stale(vec![A.into(), X.into()]), 2);
        assert_eq!(t.seed_stale(vec![X.into()]), 0, "seeding is idempotent");
        let before = t.host_seq();
        t.on_resync(&listing, 2);
        let snaps = t.round(&listing, &info, 2);
        assert_eq!(
            kinds(&snaps),
            [
                "ROUND_BEGIN".to_string(),
                format!("DOMAIN {A}"),
                "ROUND_END".to_string(),
                format!("TOMBSTONE {X} record=false"),
            ]
        );
        // host_seq contiguous through the tombstone.
        let seqs: Vec<u64> = snaps.iter().map(Snap::host_seq).collect();
        assert_eq!(seqs, (before + 1..=before + 4).collect::<Vec<_>>());
        assert_eq!(t.stale_pending(), 0);
        // Settled once: the next round deletes nothing.
        let again = t.round(&listing, &info, 3);
        assert!(!again.iter().any(|s| matches!(s, Snap::Tombstone { .. })));
    }

    #[test]
    fn a_seeded_domain_that_left_in_this_epoch_gets_one_tombstone() {
        let mut t = tracker();
        let info = HostInfo::default();
        let both = vec![
            (A.to_string(), facts(DomainState::RUNNING, "BOOTED", true)),
            (X.to_string(), facts(DomainState::SHUTOFF, "SHUTDOWN", true)),
        ];
        t.on_resync(&both, 1);
        t.round(&both, &info, 1);
        t.seed_stale(vec![X.into()]);
        let only_a = vec![both[0].clone()];
        t.on_resync(&only_a, 2);
        let snaps = t.round(&only_a, &info, 2);
        let tombs: Vec<String> = kinds(&snaps)
            .into_iter()
            .filter(|k| k.starts_with("TOMBSTONE"))
            .collect();
        assert_eq!(tombs, [format!("TOMBSTONE {X} record=true")]);
    }
}
