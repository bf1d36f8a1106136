//! The fleet-state rebuild of docs/contract.md §4, as a pure state machine: feed it
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
//! The rebuild is a `Feed`: holes in positions come from the lanes stage,
//! records in read order. `host` holds one epoch of one host and how each
//! record changes it; `view` what is shown.
//!
//! Invariant: the result never depends on how many times a record was
//! read, and a record that lost nothing never makes anything stale.

use std::collections::HashMap;

use serde::Serialize;

use super::epochs::EpochOrder;
use super::feed::Feed;
use super::hole::Hole;
use super::liveness::Liveness;
use super::record::{Body, Record};
use host::{Host, Pending, Step};

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
    /// Set on both hosts' views while a migration of the domain is under
    /// way: the destination waits paused for it, the source still has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

/// A migration under way: from the destination's `STARTED/MIGRATED` until
/// it resumes (success) or stops (failure, abort).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Migration {
    pub from: String,
    pub to: String,
    /// Agent time (destination's clock) of its `STARTED/MIGRATED`, µs.
    pub since: i64,
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

/// The rebuild. See the module documentation for the rules.
#[derive(Debug)]
pub struct Fleet {
    /// Per host, every epoch read (each rebuilt on its own) and their order.
    hosts: HashMap<String, Epochs>,
    /// Holes in lanes' positions (see `lanes`), in the order found.
    holes: Vec<Hole>,
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
            clock_skew_us: DEFAULT_CLOCK_SKEW_US,
            liveness: None,
            stats: RebuildStats::default(),
        }
    }
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

    /// Notes messages missing from a lane (see `lanes`): any host may
    /// have lost one there. A lane whose head is gone (retention,
    /// deletion) counts too, until the next complete round of each host
    /// covers it. Holes only in the records between two read (the audit's
    /// view) are not losses here.
    pub fn hole(&mut self, hole: &Hole) {
        if hole.missing_from_lane() {
            self.holes.push(hole.clone());
        }
    }

    /// Applies one record, after the holes found before it. `contiguous`
    /// says whether positions in the record's lane are contiguous when
    /// nothing is lost (true for the events stream and topic; false for
    /// compacted snapshot streams, whose holes are superseded records).
    pub fn apply(&mut self, rec: &Record, contiguous: bool) {
        self.stats.records += 1;
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
                    reason: hole.reason(),
                };
                if !host.covered(pending.bound) && !host.covered_since(pending.time, skew) {
                    host.pending.push(pending);
                }
            }
            host.holes_seen.insert(lane.clone(), n);
        }
        let applied = match &rec.body {
            Body::Event(e) => host.event(e, &rec.pos),
            Body::Domain(d) => host.domain_snapshot(d),
            Body::Host(h) => host.host_snapshot(h),
            Body::Tombstone(t) => host.tombstone(t),
        };
        match applied {
            Step::Ignored => self.stats.ignored += 1,
            Step::Done => {}
            Step::RoundMaybe(id) => {
                if host.try_complete(&id, skew) {
                    self.stats.rounds_applied += 1;
                }
            }
        }
    }
}

impl Feed for Fleet {
    fn record(&mut self, rec: &Record, contiguous: bool) {
        self.apply(rec, contiguous)
    }
    fn hole(&mut self, hole: &Hole) {
        Fleet::hole(self, hole)
    }
}

mod host;
mod view;
pub use view::HostView;

#[cfg(test)]
pub(crate) mod tests;
