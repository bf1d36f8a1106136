//! Which of a host's epochs is newest, by position rather than by clock.
//!
//! A new epoch exists because the host's journal was recreated: the agent
//! of the old epoch is gone, so in every stream or partition (each one
//! append-ordered) all of the old epoch's messages come before the new
//! one's. Epochs are therefore ordered by where each first appears in a
//! lane both appear in. Only two epochs that share no lane in what was
//! read fall back to agent time (`observed_at` of their first message),
//! which a clock stepped backward across the journal recreation can get
//! wrong; on NATS every host's events share one stream and on Kafka a
//! domain's events stay in one partition, so a domain seen in both epochs
//! always decides it.
//!
//! Invariant: the order is total and deterministic whatever the order
//! records were noted in (ties end on the epoch string).

use std::collections::HashMap;

use super::record::{Lane, Position};

/// The epochs of one host, as read.
#[derive(Debug, Default, Clone)]
pub struct EpochOrder {
    /// Per lane, per epoch: the first position read there.
    first_pos: HashMap<Lane, HashMap<String, u64>>,
    /// Per epoch: the earliest agent time read (`i64::MAX`: none).
    first_time: HashMap<String, i64>,
}

impl EpochOrder {
    /// Notes one record of `epoch` read at `pos`.
    pub fn note(&mut self, epoch: &str, pos: &Position, observed: Option<i64>) {
        let lane = self.first_pos.entry(pos.lane()).or_default();
        match lane.get_mut(epoch) {
            Some(p) => *p = (*p).min(pos.offset),
            None => {
                lane.insert(epoch.to_owned(), pos.offset);
            }
        }
        let t = observed.unwrap_or(i64::MAX);
        match self.first_time.get_mut(epoch) {
            Some(f) => *f = (*f).min(t),
            None => {
                self.first_time.insert(epoch.to_owned(), t);
            }
        }
    }

    /// How many lanes show `a` before `b`, minus how many show the reverse.
    fn evidence(&self, a: &str, b: &str) -> i64 {
        let mut n = 0i64;
        for firsts in self.first_pos.values() {
            if let (Some(pa), Some(pb)) = (firsts.get(a), firsts.get(b)) {
                n += i64::from(pa < pb) - i64::from(pb < pa);
            }
        }
        n
    }

    /// Whether `b` is newer than `a`.
    fn newer(&self, a: &str, b: &str) -> bool {
        match self.evidence(a, b) {
            0 => {
                let t = |e: &str| self.first_time.get(e).copied().unwrap_or(i64::MAX);
                (t(a), a) < (t(b), b)
            }
            n => n > 0,
        }
    }

    /// The epochs, oldest first.
    pub fn oldest_first(&self) -> Vec<&str> {
        let epochs: Vec<&str> = self.first_time.keys().map(String::as_str).collect();
        // Rank each by how many others it is newer than: a total order
        // even if lanes were to disagree.
        let mut ranked: Vec<(usize, i64, &str)> = epochs
            .iter()
            .map(|e| {
                let wins = epochs
                    .iter()
                    .filter(|o| *o != e && self.newer(o, e))
                    .count();
                (wins, self.first_time[*e], *e)
            })
            .collect();
        ranked.sort();
        ranked.into_iter().map(|(_, _, e)| e).collect()
    }

    /// The newest epoch, if any was noted.
    pub fn newest(&self) -> Option<&str> {
        self.oldest_first().pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn at(src: &str, partition: Option<i32>, offset: u64) -> Position {
        Position {
            source: Arc::from(src),
            partition,
            offset,
            time_us: None,
        }
    }

    #[test]
    fn a_clock_stepped_back_does_not_make_the_new_epoch_old() {
        let mut o = EpochOrder::default();
        // The old epoch at 1000 s, then the journal is recreated and the
        // clock stepped back an hour: the new epoch stamps 1000 s - 3600 s.
        o.note("old", &at("EV", Some(0), 10), Some(1_000_000_000));
        o.note("new", &at("EV", Some(0), 11), Some(-2_600_000_000));
        assert_eq!(o.oldest_first(), ["old", "new"]);
        // Read in the other order (snapshots first, say): the same.
        let mut o = EpochOrder::default();
        o.note("new", &at("HS", Some(3), 7), Some(-2_600_000_000));
        o.note("old", &at("EV", Some(0), 10), Some(1_000_000_000));
        assert_eq!(o.newest(), Some("old"), "no shared lane yet: by time");
        o.note("new", &at("EV", Some(0), 12), Some(-2_599_000_000));
        assert_eq!(o.newest(), Some("new"), "the shared partition decides");
    }

    #[test]
    fn lanes_outvote_time_and_ties_are_deterministic() {
        let mut o = EpochOrder::default();
        for (e, off, t) in [("b", 5, 1), ("a", 1, 9), ("c", 9, 0)] {
            o.note(e, &at("S", None, off), Some(t));
        }
        assert_eq!(o.oldest_first(), ["a", "b", "c"]);
        let mut o = EpochOrder::default();
        o.note("y", &at("S", None, 1), None);
        o.note("x", &at("T", None, 1), None);
        assert_eq!(o.oldest_first(), ["x", "y"]);
    }
}
