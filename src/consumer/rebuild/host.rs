//! One epoch of one host in the rebuild: its domains, its snapshot
//! rounds, and what it may have lost; and how each kind of record changes
//! them (the rules are in the `rebuild` module documentation).
//!
//! Invariants: a record only ever replaces older information of its
//! domain (by `host_seq`); a complete round is applied at most once and
//! clears only the staleness bounded before it began.

use std::collections::{BTreeMap, HashMap};

use crate::consumer::liveness::LastWord;
use crate::consumer::record::{Lane, Position, Tombstone};
use crate::model::{
    parse_event_id, Detail, DomainEvent, DomainSnapshot, DomainState, EventType, HostSnapshot,
    HostSnapshotKind, StateReason,
};

#[derive(Debug, Clone)]
pub(super) struct Dom {
    pub(super) name: String,
    pub(super) id: Option<i32>,
    pub(super) state: StateReason,
    pub(super) persistent: bool,
    pub(super) autostart: Option<bool>,
    pub(super) vcpus: Option<i32>,
    pub(super) memory_kib: Option<i64>,
    pub(super) config_hash: Option<String>,
    pub(super) seq: u64,
    /// `host_seq` of the information held (0: none in this epoch).
    pub(super) host_seq: u64,
    pub(super) observed_at: i64,
    /// Not on the host (undefined, transient and stopped, or absent from
    /// a complete round). Kept so older records cannot bring it back.
    pub(super) deleted: bool,
    /// Whether `seq` is the domain's current seq (false after a deletion
    /// by a round or an epoch change: the next event may carry any seq).
    pub(super) seq_known: bool,
    /// Stale until a complete round that began after this host_seq.
    pub(super) stale_bound: Option<u64>,
    pub(super) stale_reason: Option<String>,
    /// Agent time of the `STARTED/MIGRATED` that made this host a
    /// migration's destination, while the domain waits here paused for it
    /// to finish (docs/consumers.md "Migrations").
    pub(super) incoming_since: Option<i64>,
}

/// Paused reasons of a destination waiting for its migration to finish.
fn waiting_for_migration(s: &StateReason) -> bool {
    s.state == DomainState::PAUSED
        && matches!(s.reason.as_str(), "MIGRATION" | "POSTCOPY" | "STARTING_UP")
}

impl Dom {
    fn blank() -> Dom {
        Dom {
            name: String::new(),
            id: None,
            state: StateReason::named(DomainState::NOSTATE, "UNKNOWN"),
            persistent: false,
            autostart: None,
            vcpus: None,
            memory_kib: None,
            config_hash: None,
            seq: 0,
            host_seq: 0,
            observed_at: 0,
            deleted: true,
            seq_known: false,
            stale_bound: None,
            stale_reason: None,
            incoming_since: None,
        }
    }

    fn gone(&self) -> bool {
        !self.persistent && self.state.state == DomainState::SHUTOFF
    }

    fn mark_stale(&mut self, bound: u64, reason: impl FnOnce() -> String) {
        self.stale_bound = Some(self.stale_bound.map_or(bound, |b| b.max(bound)));
        if self.stale_reason.is_none() {
            self.stale_reason = Some(reason());
        }
    }
}

/// What is known of one round of one host.
#[derive(Debug, Default)]
pub(super) struct Round {
    /// host_seq of its ROUND_BEGIN (from the snapshot id).
    pub(super) begin: u64,
    /// Agent time of the round (from its begin/end or domain records).
    pub(super) observed_at: Option<i64>,
    pub(super) count: Option<usize>,
    pub(super) ended: bool,
    pub(super) members: BTreeMap<u64, DomainSnapshot>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Applied {
    pub(super) begin: u64,
    pub(super) end: u64,
    pub(super) observed_at: Option<i64>,
}

/// A hole as it concerns one host whose next message after it was read:
/// a lost message of this host has a lower `host_seq` than that message
/// (kept order) and was emitted before the hole's time.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) bound: u64,
    pub(super) time: Option<i64>,
    pub(super) reason: String,
}

/// One epoch of one host.
#[derive(Debug)]
pub(super) struct Host {
    pub(super) epoch: String,
    /// Records read of this epoch.
    pub(super) records: u64,
    /// The host's last word in this epoch (see `liveness`).
    pub(super) last_word: LastWord,
    pub(super) domains: HashMap<String, Dom>,
    pub(super) rounds: HashMap<String, Round>,
    pub(super) last_round: Option<Applied>,
    /// Host-wide loss: stale until a complete round beginning after it.
    pub(super) loss_bound: Option<u64>,
    pub(super) loss_reason: Option<String>,
    /// Per lane, how many position holes of that lane this host has
    /// accounted for (holes after its last record there are open).
    pub(super) holes_seen: HashMap<Lane, usize>,
    /// Holes this host read past, until a complete round covers them.
    pub(super) pending: Vec<Pending>,
    pub(super) last_heartbeat: Option<HostSnapshot>,
}

impl Host {
    pub(super) fn new(epoch: &str) -> Host {
        Host {
            epoch: epoch.to_owned(),
            records: 0,
            last_word: LastWord::default(),
            domains: HashMap::new(),
            rounds: HashMap::new(),
            last_round: None,
            loss_bound: None,
            loss_reason: None,
            holes_seen: HashMap::new(),
            pending: Vec::new(),
            last_heartbeat: None,
        }
    }

    /// A complete round began after `bound`.
    pub(super) fn covered(&self, bound: u64) -> bool {
        self.last_round.is_some_and(|r| r.begin > bound)
    }

    /// A complete round was taken after `time` (plus the clock skew
    /// allowed between agents and brokers).
    pub(super) fn covered_since(&self, time: Option<i64>, skew: i64) -> bool {
        match (self.last_round.and_then(|r| r.observed_at), time) {
            (Some(r), Some(t)) => r > t.saturating_add(skew),
            _ => false,
        }
    }

    pub(super) fn host_loss(&mut self, bound: u64, reason: impl FnOnce() -> String) {
        if self.covered(bound) {
            return;
        }
        self.loss_bound = Some(self.loss_bound.map_or(bound, |b| b.max(bound)));
        if self.loss_reason.is_none() {
            self.loss_reason = Some(reason());
        }
    }
}

/// Whether a complete round (beginning at `begin`, taken at `observed_at`)
/// covers a pending hole: it began after the message that bounds the hole,
/// or was taken after the hole's time.
fn host_covers(begin: u64, observed_at: Option<i64>, p: &Pending, skew: i64) -> bool {
    begin > p.bound
        || matches!((observed_at, p.time), (Some(r), Some(t)) if r > t.saturating_add(skew))
}

impl Host {
    pub(super) fn event(&mut self, e: &DomainEvent, pos: &Position) -> Step {
        let host = self;
        if e.event == EventType::GAP {
            let (detail, hs) = (e.detail, e.host_seq);
            host.host_loss(hs, || {
                format!("the agent reported a gap ({detail}) at {pos}")
            });
            return Step::Done;
        }
        let covered_after = host.last_round.map(|r| r.end);
        if host.last_round.is_some_and(|r| e.host_seq < r.begin)
            && host
                .domains
                .get(&e.domain.uuid)
                .is_none_or(|d| d.host_seq == 0)
        {
            // Older than the base round, which did not list the domain.
            return Step::Ignored;
        }
        let dom = host
            .domains
            .entry(e.domain.uuid.clone())
            .or_insert_with(Dom::blank);
        if dom.host_seq >= e.host_seq {
            return Step::Ignored;
        }
        let fresh = dom.host_seq == 0 && !dom.seq_known;
        let jump = if fresh {
            // Never seen in this epoch: fine from seq 1, or when a complete
            // round before this event did not list the domain.
            e.seq != 1 && covered_after.is_none_or(|end| e.host_seq < end)
        } else if !dom.seq_known {
            false
        } else if e.seq <= dom.seq {
            // Newer by host_seq but not by seq: inconsistent, keep what is
            // known and say so.
            let (seq, have) = (e.seq, dom.seq);
            dom.mark_stale(e.host_seq, || {
                format!("seq {seq} at {pos} does not follow seq {have}")
            });
            return Step::Ignored;
        } else {
            e.seq != dom.seq.saturating_add(1)
        };
        if jump {
            let (from, to) = (dom.seq, e.seq);
            let bound = e.host_seq;
            if host.last_round.is_none_or(|r| r.begin <= bound) {
                dom.mark_stale(bound, || {
                    if fresh {
                        format!("first seen at seq {to} ({pos}); earlier events missing")
                    } else {
                        format!("seq jumps from {from} to {to} at {pos}")
                    }
                });
            }
        }
        dom.name.clone_from(&e.domain.name);
        dom.id = e.domain.id;
        dom.state.clone_from(&e.state_after);
        dom.persistent = e.persistent;
        if e.autostart.is_some() {
            dom.autostart = e.autostart;
        }
        if e.vcpus.is_some() {
            dom.vcpus = e.vcpus;
        }
        if e.memory_kib.is_some() {
            dom.memory_kib = e.memory_kib;
        }
        if e.config_hash.is_some() {
            dom.config_hash.clone_from(&e.config_hash);
        }
        dom.seq = e.seq;
        dom.host_seq = e.host_seq;
        dom.observed_at = e.observed_at;
        dom.seq_known = true;
        dom.deleted = dom.gone();
        dom.incoming_since = if e.event == EventType::STARTED && e.detail == Detail::MIGRATED {
            Some(e.observed_at)
        } else if dom.deleted || !waiting_for_migration(&dom.state) {
            None
        } else {
            dom.incoming_since
        };
        Step::Done
    }

    pub(super) fn domain_snapshot(&mut self, d: &DomainSnapshot) -> Step {
        let host = self;
        let Some((_, _, begin)) = parse_event_id(&d.snapshot_id) else {
            return Step::Ignored;
        };
        if host.last_round.is_some_and(|r| r.begin >= begin) {
            return Step::Ignored;
        }
        let round = host
            .rounds
            .entry(d.snapshot_id.clone())
            .or_insert_with(|| Round {
                begin,
                ..Round::default()
            });
        if d.host_seq <= begin || round.members.contains_key(&d.host_seq) {
            return Step::Ignored;
        }
        round.observed_at.get_or_insert(d.observed_at);
        round.members.insert(d.host_seq, d.clone());
        Step::RoundMaybe(d.snapshot_id.clone())
    }

    pub(super) fn host_snapshot(&mut self, h: &HostSnapshot) -> Step {
        let host = self;
        if h.kind == HostSnapshotKind::HEARTBEAT
            && host
                .last_heartbeat
                .as_ref()
                .is_none_or(|b| b.host_seq < h.host_seq)
        {
            host.last_heartbeat = Some(h.clone());
        }
        let Some(id) = h.snapshot_id.as_deref() else {
            return Step::Done;
        };
        let Some((_, _, begin)) = parse_event_id(id) else {
            return Step::Ignored;
        };
        if host.last_round.is_some_and(|r| r.begin >= begin) {
            return Step::Done;
        }
        let round = host.rounds.entry(id.to_owned()).or_insert_with(|| Round {
            begin,
            ..Round::default()
        });
        let Ok(count) = usize::try_from(h.domain_count) else {
            return Step::Ignored; // a negative count: not a round we can use
        };
        round.count = Some(count);
        if h.kind != HostSnapshotKind::HEARTBEAT {
            // A heartbeat is later than the round it names.
            round.observed_at = Some(h.observed_at);
        }
        // A heartbeat names the last *complete* round.
        if matches!(
            h.kind,
            HostSnapshotKind::ROUND_END | HostSnapshotKind::HEARTBEAT
        ) {
            round.ended = true;
        }
        Step::RoundMaybe(id.to_owned())
    }

    pub(super) fn tombstone(&mut self, t: &Tombstone) -> Step {
        let host = self;
        let dom = host
            .domains
            .entry(t.uuid.clone())
            .or_insert_with(Dom::blank);
        if dom.host_seq >= t.host_seq {
            return Step::Ignored;
        }
        dom.host_seq = t.host_seq;
        dom.deleted = true;
        dom.seq_known = false;
        Step::Done
    }

    /// Applies round `id` when it is complete; true when it was.
    pub(super) fn try_complete(&mut self, id: &str, skew: i64) -> bool {
        let host = self;
        let Some(round) = host.rounds.get(id) else {
            return false;
        };
        let Some(count) = round.count else {
            return false;
        };
        let begin = round.begin;
        let Some(end) = begin.checked_add(count as u64 + 1) else {
            return false; // not a round any agent writes
        };
        let have = round.members.range(begin + 1..end).count();
        if !round.ended || have != count {
            return false;
        }
        let observed_at = round.observed_at;
        let round = host.rounds.remove(id).expect("present");
        // Older partial rounds can no longer become the base.
        host.rounds.retain(|_, r| r.begin > begin);
        for d in round.members.into_values() {
            let dom = host
                .domains
                .entry(d.domain.uuid.clone())
                .or_insert_with(Dom::blank);
            if dom.host_seq > d.host_seq {
                continue; // an event after the round is already applied
            }
            // A domain a round finds waiting for a migration it was not
            // known here before (the agent restarted meanwhile): incoming.
            let new_here = dom.host_seq == 0 || dom.deleted;
            dom.incoming_since = match waiting_for_migration(&d.state) {
                false => None,
                true if new_here => Some(d.observed_at),
                true => dom.incoming_since,
            };
            dom.name = d.domain.name;
            dom.id = d.domain.id;
            dom.state = d.state;
            dom.persistent = d.persistent;
            dom.autostart = d.autostart;
            dom.vcpus = d.vcpus;
            dom.memory_kib = d.memory_kib;
            dom.config_hash = d.config_hash;
            dom.seq = d.seq;
            dom.host_seq = d.host_seq;
            dom.observed_at = d.observed_at;
            dom.seq_known = true;
            dom.deleted = false;
        }
        for dom in host.domains.values_mut() {
            if dom.host_seq < begin {
                // Not in the round, and nothing newer: left the host.
                dom.deleted = true;
                dom.seq_known = false;
                dom.host_seq = end;
            }
            if dom.stale_bound.is_some_and(|b| b < begin) {
                dom.stale_bound = None;
                dom.stale_reason = None;
            }
        }
        if host.loss_bound.is_some_and(|b| b < begin) {
            host.loss_bound = None;
            host.loss_reason = None;
        }
        host.last_round = Some(Applied {
            begin,
            end,
            observed_at,
        });
        host.pending
            .retain(|p| !host_covers(begin, observed_at, p, skew));
        true
    }
}

pub(super) enum Step {
    Done,
    Ignored,
    /// A round record: the round may now be complete.
    RoundMaybe(String),
}
