//! The NATS sink's per-subject scheduling, as pure logic (no I/O, no
//! clock: callers pass `now`): which entry may be published next, what
//! each subject's position on the broker is known to be, and when
//! publishing waits (a retry backoff, a stale position, a deleted stream).
//!
//! Invariants:
//! - at most one entry per subject is handed out at a time: a subject is
//!   handed out again only after [`Scheduler::stored`],
//!   [`Scheduler::skipped`] or [`Scheduler::failed`] for it;
//! - within a subject entries go out in the order they were pushed; a
//!   failed entry goes back to the front of its subject, which waits for
//!   the retry (it is never overtaken by a later entry of the subject);
//! - a subject with nothing queued and nothing out holds no memory (its
//!   queue is dropped; a domain that left the host drops its position);
//! - a failed subject's position is forgotten (re-read before the next
//!   publish); after a stream is provisioned again every position is;
//! - `buffered` counts entries queued plus handed out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::journal::Entry;

/// First retry delay after a failed publish; it doubles up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Wait before re-reading a position found stale.
const STALE_WAIT: Duration = Duration::from_millis(5);

/// What the broker holds for one subject, as far as this sink knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Position {
    pub stream_seq: u64,
    /// `host_seq` of that message when it is this host's and epoch's.
    pub ours: Option<u64>,
}

/// Why a publish did not store its entry, as far as scheduling goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    /// The expected last sequence was stale: re-read it shortly.
    StalePosition,
    /// No stream takes the subject: wait until it is provisioned again.
    StreamGone,
    /// Anything else: back off, doubling.
    Backoff,
}

/// Per-subject queues, positions and the publish gate.
#[derive(Debug)]
pub(super) struct Scheduler {
    queues: HashMap<String, VecDeque<Entry>>,
    /// Subjects that are ready, handed out or waiting for a retry.
    scheduled: HashSet<String>,
    ready: VecDeque<String>,
    /// Subjects waiting for the retry.
    retry: Vec<String>,
    positions: HashMap<String, Position>,
    buffered: usize,
    /// No publishing before this (a retry backoff or a stale position).
    backoff_until: Option<Instant>,
    backoff: Duration,
    /// A stream was deleted: publishing waits until it is provisioned.
    reprovision: bool,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler {
            queues: HashMap::new(),
            scheduled: HashSet::new(),
            ready: VecDeque::new(),
            retry: Vec::new(),
            positions: HashMap::new(),
            buffered: 0,
            backoff_until: None,
            backoff: FIRST_DELAY,
            reprovision: false,
        }
    }
}

impl Scheduler {
    /// Entries queued plus handed out.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Queues an entry read from the journal under its subject.
    pub fn push(&mut self, subject: String, entry: Entry) {
        if self.scheduled.insert(subject.clone()) {
            self.ready.push_back(subject.clone());
        }
        self.queues.entry(subject).or_default().push_back(entry);
        self.buffered += 1;
    }

    fn backing_off(&self, now: Instant) -> bool {
        self.backoff_until.is_some_and(|t| now < t)
    }

    /// Whether the deleted stream should be provisioned again now: not
    /// backing off, and nothing in flight (`idle`: a late ack from the
    /// deleted stream must not set a position in the new one).
    pub fn wants_reprovision(&self, now: Instant, idle: bool) -> bool {
        self.reprovision && !self.backing_off(now) && idle
    }

    /// Whether entries may be handed out now. A retry wait that has ended
    /// puts its subjects back in line.
    pub fn open(&mut self, now: Instant) -> bool {
        if self.backing_off(now) || self.reprovision {
            return false;
        }
        if self.backoff_until.take().is_some() {
            self.ready.extend(self.retry.drain(..));
        }
        true
    }

    /// The next entry to publish and its subject; `None` when no subject
    /// is ready. Its subject is out until it is reported back.
    pub fn next(&mut self) -> Option<(String, Entry)> {
        loop {
            let subject = self.ready.pop_front()?;
            match self.queues.get_mut(&subject).and_then(|q| q.pop_front()) {
                Some(entry) => return Some((subject, entry)),
                None => {
                    self.scheduled.remove(&subject);
                }
            }
        }
    }

    /// What the broker is known to hold for `subject`.
    pub fn position(&self, subject: &str) -> Option<Position> {
        self.positions.get(subject).copied()
    }

    /// The entry handed out for `subject` is dropped without publishing.
    pub fn skipped(&mut self, subject: String) {
        self.buffered -= 1;
        self.ready.push_back(subject);
    }

    /// The entry handed out for `subject` is on the broker; `tail` is the
    /// subject's last message there (`None`: unknown, or not worth keeping).
    pub fn stored(&mut self, subject: String, tail: Option<Position>) {
        self.buffered -= 1;
        match tail {
            Some(p) => self.positions.insert(subject.clone(), p),
            None => self.positions.remove(&subject),
        };
        self.backoff = FIRST_DELAY;
        if self.queues.get(&subject).is_some_and(|q| !q.is_empty()) {
            self.ready.push_back(subject);
        } else {
            self.scheduled.remove(&subject);
            self.queues.remove(&subject);
        }
    }

    /// The entry handed out for `subject` was not stored: it goes back to
    /// the front of its subject, which waits for the retry. Returns the
    /// backoff applied (for [`Retry::Backoff`]) and, for
    /// [`Retry::StreamGone`], whether the stream was already known gone.
    pub fn failed(&mut self, subject: String, entry: Entry, why: Retry, now: Instant) -> Failed {
        self.positions.remove(&subject);
        self.queues
            .entry(subject.clone())
            .or_default()
            .push_front(entry);
        self.retry.push(subject);
        match why {
            Retry::StalePosition => {
                self.backoff_until.get_or_insert(now + STALE_WAIT);
                Failed::Retrying
            }
            Retry::StreamGone => {
                let known = std::mem::replace(&mut self.reprovision, true);
                Failed::Reprovision { known }
            }
            Retry::Backoff => Failed::BackingOff {
                retry_in: self.back_off(now),
            },
        }
    }

    /// Provisioning the stream again failed: wait; returns the wait.
    pub fn reprovision_failed(&mut self, now: Instant) -> Duration {
        self.back_off(now)
    }

    /// The streams exist again: positions read before are void, and the
    /// waiting subjects go back in line.
    pub fn reprovisioned(&mut self) {
        self.positions.clear();
        self.reprovision = false;
        self.backoff = FIRST_DELAY;
        self.backoff_until = None;
        self.ready.extend(self.retry.drain(..));
    }

    /// The end of a wait, when waiting; else `tick`.
    pub fn wake(&self, tick: Instant) -> Instant {
        self.backoff_until.unwrap_or(tick)
    }

    fn back_off(&mut self, now: Instant) -> Duration {
        let wait = self.backoff;
        self.backoff_until = Some(now + wait);
        self.backoff = (wait * 2).min(MAX_DELAY);
        wait
    }
}

/// What [`Scheduler::failed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failed {
    /// Retrying shortly.
    Retrying,
    /// Waiting for the streams; `known` when they were known gone before.
    Reprovision { known: bool },
    /// Backing off for `retry_in`.
    BackingOff { retry_in: Duration },
}

#[cfg(test)]
impl Scheduler {
    fn subjects_held(&self) -> usize {
        self.queues.len().max(self.scheduled.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Kind;

    fn entry(host_seq: u64) -> Entry {
        Entry {
            host_seq,
            kind: Kind::DomainEvent,
            key: String::new(),
            observed_at: 0,
            payload: vec![],
        }
    }

    fn sched(entries: &[(&str, u64)]) -> Scheduler {
        let mut s = Scheduler::default();
        for (subject, n) in entries {
            s.push(subject.to_string(), entry(*n));
        }
        s
    }

    fn next(s: &mut Scheduler) -> Option<(String, u64)> {
        s.next().map(|(subject, e)| (subject, e.host_seq))
    }

    fn pos(stream_seq: u64, ours: u64) -> Option<Position> {
        Some(Position {
            stream_seq,
            ours: Some(ours),
        })
    }

    #[test]
    fn one_entry_per_subject_at_a_time_in_order() {
        let mut s = sched(&[("a", 1), ("a", 2), ("b", 3), ("a", 4)]);
        assert_eq!(s.buffered(), 4);
        assert!(s.open(Instant::now()));
        assert_eq!(next(&mut s), Some(("a".into(), 1)));
        assert_eq!(next(&mut s), Some(("b".into(), 3)));
        assert_eq!(next(&mut s), None, "a is out; b is empty");
        s.stored("a".into(), pos(10, 1));
        assert_eq!(s.position("a"), pos(10, 1));
        assert_eq!(next(&mut s), Some(("a".into(), 2)));
        s.stored("b".into(), pos(11, 3));
        s.stored("a".into(), pos(12, 2));
        assert_eq!(next(&mut s), Some(("a".into(), 4)));
        s.stored("a".into(), pos(13, 4));
        assert_eq!(next(&mut s), None);
        assert_eq!(s.buffered(), 0);
        assert_eq!(s.subjects_held(), 0, "idle subjects hold no queue");
        assert_eq!(s.position("b"), pos(11, 3));
    }

    #[test]
    fn a_subject_that_left_drops_its_position() {
        let mut s = sched(&[("a", 1)]);
        s.next().unwrap();
        s.stored("a".into(), pos(5, 1));
        s.push("a".into(), entry(2));
        s.next().unwrap();
        s.stored("a".into(), None);
        assert_eq!(s.position("a"), None);
    }

    #[test]
    fn a_skipped_entry_frees_its_subject() {
        let mut s = sched(&[("a", 1), ("a", 2)]);
        s.next().unwrap();
        s.skipped("a".into());
        assert_eq!(s.buffered(), 1);
        assert_eq!(next(&mut s), Some(("a".into(), 2)));
    }

    #[test]
    fn a_failed_entry_is_retried_first_after_the_backoff() {
        let t0 = Instant::now();
        let mut s = sched(&[("a", 1), ("a", 2), ("b", 3)]);
        assert_eq!(next(&mut s), Some(("a".into(), 1)));
        s.stored("a".into(), pos(7, 1));
        let (subject, e) = s.next().unwrap();
        assert_eq!((subject.as_str(), e.host_seq), ("b", 3));
        let (subject, e) = s.next().unwrap();
        assert_eq!((subject.as_str(), e.host_seq), ("a", 2));
        let f = s.failed(subject, e, Retry::Backoff, t0);
        assert_eq!(
            f,
            Failed::BackingOff {
                retry_in: FIRST_DELAY
            }
        );
        assert_eq!(s.position("a"), None, "re-read before the retry");
        assert_eq!(s.buffered(), 2);
        assert!(!s.open(t0 + Duration::from_millis(50)));
        assert_eq!(s.wake(t0 + Duration::from_secs(9)), t0 + FIRST_DELAY);
        assert!(s.open(t0 + FIRST_DELAY));
        assert_eq!(next(&mut s), Some(("a".into(), 2)));
        assert_eq!(next(&mut s), None);
    }

    #[test]
    fn backoff_doubles_up_to_five_seconds_and_resets_on_success() {
        let t0 = Instant::now();
        let mut s = sched(&[("a", 1)]);
        let mut waits = Vec::new();
        for _ in 0..8 {
            let (subject, e) = s.next().unwrap_or_else(|| {
                assert!(s.open(t0 + Duration::from_secs(3600)));
                s.next().unwrap()
            });
            match s.failed(subject, e, Retry::Backoff, t0) {
                Failed::BackingOff { retry_in } => waits.push(retry_in.as_millis()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert!(s.open(t0 + Duration::from_secs(3600)));
        let (subject, _) = s.next().unwrap();
        s.stored(subject, pos(1, 1));
        assert_eq!(s.reprovision_failed(t0), FIRST_DELAY);
    }

    #[test]
    fn a_stale_position_waits_briefly_but_never_shortens_a_backoff() {
        let t0 = Instant::now();
        let mut s = sched(&[("a", 1), ("b", 2)]);
        let (a, ea) = s.next().unwrap();
        assert_eq!(s.failed(a, ea, Retry::StalePosition, t0), Failed::Retrying);
        assert!(!s.open(t0));
        assert!(s.open(t0 + STALE_WAIT));
        assert_eq!(next(&mut s), Some(("b".into(), 2)));
        assert_eq!(next(&mut s), Some(("a".into(), 1)));

        let mut s = sched(&[("a", 1), ("b", 2)]);
        let (a, ea) = s.next().unwrap();
        let (b, eb) = s.next().unwrap();
        s.failed(b, eb, Retry::Backoff, t0);
        s.failed(a, ea, Retry::StalePosition, t0);
        assert!(!s.open(t0 + STALE_WAIT), "the backoff stands");
        assert!(s.open(t0 + FIRST_DELAY));
        assert_eq!(next(&mut s), Some(("b".into(), 2)));
        assert_eq!(next(&mut s), Some(("a".into(), 1)));
    }

    #[test]
    fn a_deleted_stream_holds_publishing_until_provisioned_again() {
        let t0 = Instant::now();
        let mut s = sched(&[("a", 1), ("b", 2)]);
        let (a, _) = s.next().unwrap();
        s.stored(a, pos(3, 1));
        s.push("a".into(), entry(3));
        let (b, eb) = s.next().unwrap();
        assert_eq!(b, "b");
        assert_eq!(
            s.failed(b, eb, Retry::StreamGone, t0),
            Failed::Reprovision { known: false }
        );
        assert!(!s.wants_reprovision(t0, false), "not while in flight");
        let (a, e3) = s.next().unwrap();
        assert_eq!(
            s.failed(a, e3, Retry::StreamGone, t0),
            Failed::Reprovision { known: true }
        );
        assert!(!s.open(t0 + Duration::from_secs(60)));
        assert!(s.wants_reprovision(t0, true));
        assert_eq!(s.reprovision_failed(t0), FIRST_DELAY);
        assert!(!s.wants_reprovision(t0, true), "backing off");
        assert!(s.wants_reprovision(t0 + FIRST_DELAY, true));
        s.reprovisioned();
        assert!(s.open(t0));
        assert_eq!(
            s.position("a"),
            None,
            "positions of the old stream are void"
        );
        let mut got = vec![next(&mut s).unwrap(), next(&mut s).unwrap()];
        got.sort();
        assert_eq!(got, [("a".to_string(), 3), ("b".to_string(), 2)]);
    }
}
