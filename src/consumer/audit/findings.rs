//! What the audit reports: each problem as a [`Finding`] with the facts
//! it rests on, where it was found, and the per-host totals. Data only;
//! `report` turns findings into sentences, JSON and text.
//!
//! Invariant: a finding holds every value its sentence names, so the
//! report never looks anything up.

use serde::Serialize;

use crate::consumer::liveness::Liveness;
use crate::consumer::record::{Lane, Position};

/// What kind of problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    StreamHole,
    Gap,
    Duplicate,
    Reordering,
    EpochChange,
    ReportedGap,
    MissingHeartbeat,
}

/// One problem (or notice) and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub host_id: Option<String>,
    pub epoch: Option<String>,
    pub uuid: Option<String>,
    /// Position of the message where it was found.
    pub at: Option<String>,
    pub finding: Finding,
}

/// A domain as a finding names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainLabel {
    pub uuid: String,
    pub name: String,
    pub host: String,
}

/// What was found, with the facts its sentence names (`report` writes
/// the sentence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The message at `at` cannot be decoded.
    Undecodable { at: Position, why: String },
    /// `lane` positions `first..=last` missing between `prev` and `next`.
    LaneHole {
        lane: Lane,
        first: u64,
        last: u64,
        prev: Position,
        next: Position,
    },
    /// `lane` positions `first..=last` missing at its end, after the
    /// last position read (`read`, when any was).
    LaneEnd {
        lane: Lane,
        first: u64,
        last: u64,
        read: Option<u64>,
    },
    /// A `host_seq` read at `at` after `first`.
    HostSeqAgain {
        host: String,
        epoch: String,
        host_seq: u64,
        at: Position,
        first: Position,
    },
    /// A domain's first event, at `at`, carries `seq`, but its lane was
    /// read from its very beginning.
    SeqAfterOrigin {
        domain: DomainLabel,
        seq: u64,
        at: Position,
    },
    /// `seq` at `at` follows `last`: the seqs between are missing.
    SeqMissing {
        domain: DomainLabel,
        last: u64,
        seq: u64,
        at: Position,
    },
    /// `seq` read again at `at`.
    SeqAgain {
        domain: DomainLabel,
        seq: u64,
        at: Position,
    },
    /// `seq` at `at` comes after the later `last`.
    SeqBack {
        domain: DomainLabel,
        seq: u64,
        last: u64,
        at: Position,
    },
    /// The snapshot at `at` carries `snap_seq`; events read before it end
    /// at `events_end`.
    SnapshotAhead {
        domain: DomainLabel,
        at: Position,
        snap_seq: u64,
        events_end: u64,
    },
    /// A host's epoch `old` followed by `new`.
    EpochReplaced {
        host: String,
        old: String,
        new: String,
    },
    /// A gap marker at `at`; `repaired` when a complete snapshot round
    /// of its epoch followed.
    ReportedGap {
        host: String,
        cause: String,
        at: Position,
        repaired: bool,
    },
    /// Two consecutive heartbeats (agent time µs, position) with a
    /// silence between them.
    SilenceBetween {
        host: String,
        from: (i64, Position),
        to: (i64, Position),
    },
    /// The newest heartbeat, at `at` (agent time `last_us`), is older than
    /// the liveness rule allows at `now_us`.
    SilentSince {
        host: String,
        last_us: i64,
        at: Position,
        now_us: i64,
        rule: Liveness,
    },
    /// A host with neither heartbeat nor snapshot round read.
    NoHeartbeat { host: String },
}

/// Per (host, epoch) totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostSummary {
    pub host_id: String,
    pub epoch: String,
    pub events: u64,
    pub snapshot_records: u64,
    pub domains: usize,
    pub first_host_seq: u64,
    pub last_host_seq: u64,
    /// Agent time of the newest heartbeat read (µs).
    pub last_heartbeat: Option<i64>,
}

/// The audit's result.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditReport {
    pub continuous: bool,
    pub records: u64,
    pub hosts: Vec<HostSummary>,
    pub problems: Vec<Problem>,
    pub notices: Vec<Problem>,
}
