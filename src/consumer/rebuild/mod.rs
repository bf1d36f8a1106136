//! The fleet-state rebuild of DESIGN §6, as a pure state machine: feed it
//! records in the order they were read (any mix of events, snapshot
//! records, heartbeats and tombstones, from any number of streams or
//! partitions), then read the state of every (host, domain).
//!
//! Rules:
//! - per host, the newest **complete** snapshot round is the base. A round
//!   is complete when its `ROUND_END` (or a heartbeat naming it as the last
//!   complete round) was read and all of its `domain_count` domain records
//!   are at hand, which also works on compacted streams where the round's
//!   begin/end records were replaced by later heartbeats;
//! - a record only ever replaces older information of its domain (by
//!   `host_seq` within the host's epoch), so duplicates and records that
//!   arrive after newer ones change nothing;
//! - a domain event applies when its `seq` follows the domain's; a jump
//!   applies too (the event carries the full state after it) but makes the
//!   domain stale; a gap marker, a hole in a stream's or partition's
//!   positions and an epoch change make the whole host stale;
//! - stale lasts until a complete round that began after the loss (a loss
//!   is bounded by the `host_seq` of the first record that revealed it);
//! - a domain absent from a complete round, or tombstoned, is deleted; a
//!   transient domain that stopped is gone.
//! - each epoch of a host is rebuilt on its own; the newest by stream
//!   position (see `epochs`, never by agent time alone) is shown, and until
//!   it has a complete round, domains it has said nothing of are shown from
//!   older epochs, stale;
//! - with [`Fleet::with_liveness`], a host silent at the given time (see
//!   `liveness`) makes all its domains stale.
//!
//! Invariant: the result never depends on how many times a record was
//! read, and a record that lost nothing never makes anything stale.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::epochs::EpochOrder;
use super::liveness::{LastWord, Liveness};
use super::record::{Body, Lane, Position, Record, Tombstone};
use crate::model::{
    parse_event_id, DomainEvent, DomainSnapshot, DomainState, EventType, HostSnapshot,
    HostSnapshotKind, StateReason,
};

/// One domain on one host, as rebuilt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DomainView {
    pub host_id: String,
    pub uuid: String,
    pub name: String,
    /// libvirt state name, e.g. `RUNNING`.
    pub state: String,
    pub reason: String,
    pub persistent: bool,
    pub autostart: Option<bool>,
    pub vcpus: Option<i32>,
    pub memory_kib: Option<i64>,
    pub config_hash: Option<String>,
    /// The domain's `seq` this state reflects.
    pub seq: u64,
    pub epoch: String,
    /// Agent time of the information (µs).
    pub observed_at: i64,
    /// Messages may be missing: this may not be the current state.
    pub stale: bool,
    /// Why it is stale (the first cause seen).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_reason: Option<String>,
}

/// Counters of one rebuild.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RebuildStats {
    pub records: u64,
    /// Records that carried nothing newer (duplicates, late arrivals).
    pub ignored: u64,
    /// Records of an epoch older than the host's newest (kept: a domain
    /// the newest epoch has said nothing of yet is shown from them).
    pub old_epoch: u64,
    pub rounds_applied: u64,
}

#[derive(Debug, Clone)]
struct Dom {
    name: String,
    id: Option<i32>,
    state: StateReason,
    persistent: bool,
    autostart: Option<bool>,
    vcpus: Option<i32>,
    memory_kib: Option<i64>,
    config_hash: Option<String>,
    seq: u64,
    /// `host_seq` of the information held (0: none in this epoch).
    host_seq: u64,
    observed_at: i64,
    /// Not on the host (undefined, transient and stopped, or absent from
    /// a complete round). Kept so older records cannot bring it back.
    deleted: bool,
    /// Whether `seq` is the domain's current seq (false after a deletion
    /// by a round or an epoch change: the next event may carry any seq).
    seq_known: bool,
    /// Stale until a complete round that began after this host_seq.
    stale_bound: Option<u64>,
    stale_reason: Option<String>,
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
struct Round {
    /// host_seq of its ROUND_BEGIN (from the snapshot id).
    begin: u64,
    /// Agent time of the round (from its begin/end or domain records).
    observed_at: Option<i64>,
    count: Option<usize>,
    ended: bool,
    members: BTreeMap<u64, DomainSnapshot>,
}

#[derive(Debug, Clone, Copy)]
struct Applied {
    begin: u64,
    end: u64,
    observed_at: Option<i64>,
}

/// Messages missing from a lane at a position.
#[derive(Debug)]
struct Hole {
    lane: Lane,
    /// Broker time of the first message after the hole (or of the lane's
    /// end): every lost message was emitted before it.
    time: Option<i64>,
    /// Where, for the report ("before <position>").
    at: String,
}

/// A hole as it concerns one host whose next message after it was read:
/// a lost message of this host has a lower `host_seq` than that message
/// (kept order) and was emitted before the hole's time.
#[derive(Debug)]
struct Pending {
    bound: u64,
    time: Option<i64>,
    reason: String,
}

/// One epoch of one host.
#[derive(Debug)]
struct Host {
    epoch: String,
    /// Records read of this epoch.
    records: u64,
    /// The host's last word in this epoch (see `liveness`).
    last_word: LastWord,
    domains: HashMap<String, Dom>,
    rounds: HashMap<String, Round>,
    last_round: Option<Applied>,
    /// Host-wide loss: stale until a complete round beginning after it.
    loss_bound: Option<u64>,
    loss_reason: Option<String>,
    /// Per lane, how many position holes of that lane this host has
    /// accounted for (holes after its last record there are open).
    holes_seen: HashMap<Lane, usize>,
    /// Holes this host read past, until a complete round covers them.
    pending: Vec<Pending>,
    last_heartbeat: Option<HostSnapshot>,
}

impl Host {
    fn new(epoch: &str) -> Host {
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
    fn covered(&self, bound: u64) -> bool {
        self.last_round.is_some_and(|r| r.begin > bound)
    }

    /// A complete round was taken after `time` (plus the clock skew
    /// allowed between agents and brokers).
    fn covered_since(&self, time: Option<i64>, skew: i64) -> bool {
        match (self.last_round.and_then(|r| r.observed_at), time) {
            (Some(r), Some(t)) => r > t.saturating_add(skew),
            _ => false,
        }
    }

    fn host_loss(&mut self, bound: u64, reason: impl FnOnce() -> String) {
        if self.covered(bound) {
            return;
        }
        self.loss_bound = Some(self.loss_bound.map_or(bound, |b| b.max(bound)));
        if self.loss_reason.is_none() {
            self.loss_reason = Some(reason());
        }
    }
}

/// The first position of a lane that never lost anything: stream
/// sequence 1 on NATS, offset 0 on Kafka.
pub fn lane_origin(pos: &Position) -> u64 {
    if pos.partition.is_some() {
        0
    } else {
        1
    }
}

/// The rebuild. See the module documentation for the rules.
#[derive(Debug)]
pub struct Fleet {
    /// Per host, every epoch read (each rebuilt on its own) and their order.
    hosts: HashMap<String, Epochs>,
    /// Position holes (messages missing from a stream/partition).
    holes: Vec<Hole>,
    /// Last position read per contiguous lane.
    last_pos: HashMap<Lane, u64>,
    /// Largest difference allowed between an agent's clock and a broker's
    /// (µs), when a hole is placed in time.
    clock_skew_us: i64,
    /// The silence rule and the time it is judged at.
    liveness: Option<(Liveness, i64)>,
    stats: RebuildStats,
}

/// The epochs of one host.
#[derive(Debug, Default)]
struct Epochs {
    epochs: HashMap<String, Host>,
    order: EpochOrder,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            hosts: HashMap::new(),
            holes: Vec::new(),
            last_pos: HashMap::new(),
            clock_skew_us: DEFAULT_CLOCK_SKEW_US,
            liveness: None,
            stats: RebuildStats::default(),
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

/// Default clock skew allowed between agents and brokers: 10 s.
pub const DEFAULT_CLOCK_SKEW_US: i64 = 10_000_000;

impl Fleet {
    pub fn new() -> Fleet {
        Fleet::default()
    }

    /// The largest difference between an agent's clock and a broker's.
    pub fn with_clock_skew(mut self, skew: std::time::Duration) -> Fleet {
        self.clock_skew_us = i64::try_from(skew.as_micros()).unwrap_or(i64::MAX);
        self
    }

    /// Judges hosts silent by `liveness` at `now_us` (µs; the wall clock,
    /// or the end of the read): a silent host's domains are stale.
    pub fn with_liveness(mut self, liveness: Liveness, now_us: i64) -> Fleet {
        self.liveness = Some((liveness, now_us));
        self
    }

    pub fn stats(&self) -> RebuildStats {
        let mut s = self.stats;
        s.old_epoch = self
            .hosts
            .values()
            .flat_map(|e| {
                let newest = e.order.newest();
                e.epochs
                    .values()
                    .filter(move |h| Some(h.epoch.as_str()) != newest)
            })
            .map(|h| h.records)
            .sum();
        s
    }

    /// Notes that a message of a contiguous lane is lost at `pos` (it
    /// could not be decoded, say): any host may have lost one there.
    pub fn lost(&mut self, pos: &Position) {
        let lane = pos.lane();
        self.holes.push(Hole {
            lane: lane.clone(),
            time: pos.time_us,
            at: format!("at {pos}"),
        });
        let e = self.last_pos.entry(lane).or_insert(pos.offset);
        *e = (*e).max(pos.offset);
    }

    /// Notes where a contiguous lane ended when reading began (the NATS
    /// stream's last sequence and its time): positions after the last
    /// record read are lost messages (e.g. a deleted last message).
    pub fn lane_end(&mut self, lane: &Lane, last: u64, time_us: Option<i64>) {
        if self.last_pos.get(lane).is_none_or(|p| *p < last) {
            self.holes.push(Hole {
                lane: lane.clone(),
                time: time_us,
                at: format!("at its end (position {last})"),
            });
        }
    }

    /// Applies one record. `contiguous` says whether positions in the
    /// record's lane are contiguous when nothing is lost (true for the
    /// events stream and topic; false for compacted snapshot streams,
    /// whose holes are superseded records). A contiguous lane whose first
    /// record is past [`lane_origin`] lost its head (retention, deletion):
    /// that counts as a hole, which the next complete round of each host
    /// covers.
    pub fn apply(&mut self, rec: &Record, contiguous: bool) {
        self.stats.records += 1;
        if contiguous {
            self.track_position(&rec.pos);
        }
        let (host_id, epoch, host_seq) = rec.body.origin();
        let observed = rec.body.observed_at();
        let lane = rec.pos.lane();
        let skew = self.clock_skew_us;
        let epochs = self.hosts.entry(host_id.to_owned()).or_default();
        epochs.order.note(epoch, &rec.pos, observed);
        let host = epochs
            .epochs
            .entry(epoch.to_owned())
            .or_insert_with(|| Host::new(epoch));
        host.records += 1;
        host.last_word
            .note(host_seq, observed, matches!(rec.body, Body::Host(_)));
        if contiguous {
            // Holes of this lane read past for the first time: this host's
            // lost messages there, if any, come before this one.
            let seen = host.holes_seen.get(&lane).copied().unwrap_or(0);
            let mut n = seen;
            for (i, hole) in self.holes.iter().filter(|h| h.lane == lane).enumerate() {
                n = i + 1;
                if i < seen {
                    continue;
                }
                let pending = Pending {
                    bound: host_seq,
                    time: hole.time,
                    reason: format!("messages missing from {lane} {}", hole.at),
                };
                if !host.covered(pending.bound) && !host.covered_since(pending.time, skew) {
                    host.pending.push(pending);
                }
            }
            host.holes_seen.insert(lane.clone(), n);
        }
        let applied = match &rec.body {
            Body::Event(e) => Self::event(host, e, &rec.pos),
            Body::Domain(d) => Self::domain_snapshot(host, d),
            Body::Host(h) => Self::host_snapshot(host, h),
            Body::Tombstone(t) => Self::tombstone(host, t),
        };
        match applied {
            Step::Ignored => self.stats.ignored += 1,
            Step::Done => {}
            Step::RoundMaybe(id) => {
                if Self::try_complete(host, &id, skew) {
                    self.stats.rounds_applied += 1;
                }
            }
        }
    }

    fn track_position(&mut self, pos: &Position) {
        let lane = pos.lane();
        let hole = match self.last_pos.get(&lane) {
            None => pos.offset > lane_origin(pos),
            Some(last) => pos.offset > last.saturating_add(1),
        };
        if hole {
            self.holes.push(Hole {
                lane: lane.clone(),
                time: pos.time_us,
                at: format!("before {pos}"),
            });
        }
        let e = self.last_pos.entry(lane).or_insert(pos.offset);
        *e = (*e).max(pos.offset);
    }

    fn event(host: &mut Host, e: &DomainEvent, pos: &Position) -> Step {
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
        Step::Done
    }

    fn domain_snapshot(host: &mut Host, d: &DomainSnapshot) -> Step {
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

    fn host_snapshot(host: &mut Host, h: &HostSnapshot) -> Step {
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

    fn tombstone(host: &mut Host, t: &Tombstone) -> Step {
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
    fn try_complete(host: &mut Host, id: &str, skew: i64) -> bool {
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

enum Step {
    Done,
    Ignored,
    /// A round record: the round may now be complete.
    RoundMaybe(String),
}

mod view;
pub use view::HostView;

#[cfg(test)]
pub(crate) mod tests;
