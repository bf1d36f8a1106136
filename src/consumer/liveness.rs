//! When a host counts as silent (docs/contract.md §4): no heartbeat for a
//! configured multiple of the heartbeat interval. One rule for `audit`,
//! `state` and `usage`.
//!
//! - A host's last word is its newest `HostSnapshot` (heartbeat or round
//!   record) of its newest epoch, newest by `host_seq`, not by time; a host
//!   with none read falls back to its newest record of any kind.
//! - It is silent at `now` when `now` is more than `multiple` heartbeat
//!   periods after the last word's agent time; from the last word plus
//!   that allowance on, its state is unknown.
//!
//! The comparison is between the agent's clock (the last word's
//! `observed_at`) and the reader's: an agent clock running behind by more
//! than the allowance makes a live host look silent (its domains stale,
//! never billed wrongly); one running ahead hides silence by that much.

/// The number of heartbeat periods without a word after which a host is
/// silent, unless configured otherwise.
pub const DEFAULT_SILENT_AFTER_HEARTBEATS: u32 = 3;

/// The silence rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// The agents' heartbeat period (µs).
    pub heartbeat_us: i64,
    /// Heartbeat periods without a word before a host is silent.
    pub multiple: u32,
}

impl Liveness {
    pub fn new(heartbeat: std::time::Duration, multiple: u32) -> Liveness {
        Liveness {
            heartbeat_us: i64::try_from(heartbeat.as_micros()).unwrap_or(i64::MAX),
            multiple: multiple.max(1),
        }
    }

    /// How long a host may say nothing (µs).
    pub fn allowance_us(&self) -> i64 {
        self.heartbeat_us.saturating_mul(i64::from(self.multiple))
    }

    /// Whether two consecutive words `a` then `b` leave a silence.
    pub fn silent_between(&self, a: i64, b: i64) -> bool {
        b.saturating_sub(a) > self.allowance_us()
    }

    /// When a host whose last word was at `last` became silent, if it is
    /// silent at `now`: the last word plus the allowance.
    pub fn silent_since(&self, last: i64, now: i64) -> Option<i64> {
        self.silent_between(last, now)
            .then(|| last.saturating_add(self.allowance_us()))
    }

    /// The stale reason of a host silent since `since`, last heard at
    /// `last`.
    pub fn reason(&self, host: &str, last: i64, since: i64) -> String {
        format!(
            "host {host} is silent since {}: no heartbeat since {} (more than {} × {} s)",
            crate::codec::rfc3339_micros(since),
            crate::codec::rfc3339_micros(last),
            self.multiple,
            self.heartbeat_us as f64 / 1e6
        )
    }
}

/// A host's last word within one epoch: see the module documentation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LastWord {
    /// (host_seq, agent time) of the newest host snapshot.
    host: Option<(u64, i64)>,
    /// (host_seq, agent time) of the newest record of any kind.
    any: Option<(u64, i64)>,
}

impl LastWord {
    /// Notes a record of the epoch (`is_host`: a `HostSnapshot`).
    pub fn note(&mut self, host_seq: u64, time: Option<i64>, is_host: bool) {
        let Some(t) = time else { return };
        let newer = |slot: &Option<(u64, i64)>| slot.is_none_or(|(hs, _)| host_seq > hs);
        if is_host && newer(&self.host) {
            self.host = Some((host_seq, t));
        }
        if newer(&self.any) {
            self.any = Some((host_seq, t));
        }
    }

    /// Agent time of the last word, if anything with a time was read.
    pub fn time(&self) -> Option<i64> {
        self.host.or(self.any).map(|(_, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn silent_only_after_the_allowance() {
        let l = Liveness::new(std::time::Duration::from_secs(1), 3);
        assert_eq!(l.silent_since(10 * S, 13 * S), None, "exactly 3 s: not yet");
        assert_eq!(l.silent_since(10 * S, 13 * S + 1), Some(13 * S));
        assert_eq!(l.silent_since(10 * S, 5 * S), None, "now before the word");
        assert!(l.silent_between(0, 4 * S) && !l.silent_between(0, 3 * S));
    }

    #[test]
    fn the_last_word_is_the_newest_by_host_seq_not_by_time() {
        let mut w = LastWord::default();
        assert_eq!(w.time(), None);
        w.note(5, Some(100 * S), false);
        assert_eq!(w.time(), Some(100 * S), "no heartbeat yet: any record");
        w.note(3, Some(90 * S), true);
        assert_eq!(w.time(), Some(90 * S), "a heartbeat is preferred");
        // The clock stepped back: the newer heartbeat carries an older time.
        w.note(9, Some(40 * S), true);
        assert_eq!(w.time(), Some(40 * S));
        // A heartbeat read late (lower host_seq) does not replace it.
        w.note(7, Some(200 * S), true);
        assert_eq!(w.time(), Some(40 * S));
        w.note(12, None, true);
        assert_eq!(w.time(), Some(40 * S), "no time, nothing learnt");
    }

    #[test]
    fn hostile_numbers_saturate() {
        let l = Liveness::new(std::time::Duration::MAX, u32::MAX);
        assert_eq!(l.silent_since(i64::MIN, i64::MAX), None);
        let l = Liveness::new(std::time::Duration::from_secs(1), 0);
        assert_eq!(l.multiple, 1);
        assert_eq!(l.silent_since(i64::MAX, i64::MIN), None);
    }
}
