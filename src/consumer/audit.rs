//! Continuity audit: proves that what was read is every message the hosts
//! emitted, or names what is not and where.
//!
//! Checks, per (host_id, epoch) and per domain:
//! - positions: a contiguous lane (the events stream, an events partition)
//!   whose positions jump lost messages (`stream_hole`);
//! - `host_seq`: read twice (`duplicate`). Holes in `host_seq` alone are
//!   not losses: snapshot records and heartbeats take `host_seq` too, and
//!   the compacted snapshot stream keeps only the latest of them. Nor is
//!   `host_seq` order across domains a promise: the NATS sink publishes
//!   different subjects concurrently, so only each domain's order is;
//! - `seq`, per domain over events: a jump (`gap`, naming the missing
//!   seqs and the position of the event after them), a repeat or a step
//!   back (`duplicate`, `reordering`); a domain's first seq must be 1 when
//!   its lane was read from its very beginning; a snapshot carrying a seq
//!   beyond the domain's last event before it reveals missing events too;
//! - epochs: a host with more than one epoch (`epoch_change`), ordered by
//!   stream position (see `epochs`), not by agent time;
//! - gap markers: a problem (`reported_gap`) unless a complete snapshot
//!   round of the same epoch follows, which repairs it (then a notice);
//! - heartbeats: a host of its newest epoch silent at the end of the
//!   audit (see `liveness`: no heartbeat or round for more than the
//!   configured multiple of the heartbeat period), or the same silence
//!   between two consecutive heartbeats by `host_seq`
//!   (`missing_heartbeat`).
//!
//! The audit is a `Feed`: holes in positions come from the lanes stage
//! (the audit counts by record: see `lanes`). It states each problem as
//! a [`Finding`] with the facts it rests on; `report` writes the
//! sentences, the JSON and the text. The findings are declared in
//! `findings`.
//!
//! Invariant: every problem names the host (and domain) and the position
//! of the message where it was found.

use std::collections::{HashMap, HashSet};

mod findings;

pub use findings::{AuditReport, DomainLabel, Finding, HostSummary, Problem, ProblemKind};

use super::epochs::EpochOrder;
use super::feed::Feed;
use super::hole::{Hole, HoleKind};
use super::lanes::lane_origin;
use super::liveness::{LastWord, Liveness};
use super::record::{Body, Lane, Position, Record, RecordError};
use crate::model::{parse_event_id, EventType, HostSnapshotKind};

/// Settings of an audit.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// When a host is silent (`snapshot.heartbeat` and the multiple).
    pub liveness: Liveness,
    /// End of the audited period (µs; normally now).
    pub now_us: i64,
    /// Lanes were read from their first retained message.
    pub from_start: bool,
}

#[derive(Debug, Default)]
struct DomainTrack {
    name: String,
    /// (seq, host_seq) of the last event read.
    last: Option<(u64, u64)>,
    /// Events read, by host_seq → seq (to check snapshots against).
    seqs: Vec<(u64, u64)>,
    first_lane_origin: bool,
}

#[derive(Debug, Default)]
struct HostTrack {
    events: u64,
    snapshot_records: u64,
    first_host_seq: u64,
    last_host_seq: u64,
    last_word: LastWord,
    seen: HashMap<u64, Position>,
    domains: HashMap<String, DomainTrack>,
    /// Newest DomainSnapshot per domain: (host_seq, seq, position).
    snapshots: HashMap<String, (u64, u64, Position)>,
    gaps: Vec<(u64, Position, String)>,
    /// ROUND_BEGIN host_seq of rounds known complete.
    complete_rounds: Vec<u64>,
    /// (host_seq, agent time, position) of heartbeats and round records.
    heartbeats: Vec<(u64, i64, Position)>,
}

/// Feed records with [`Auditor::add`], then [`Auditor::finish`].
#[derive(Debug)]
pub struct Auditor {
    opts: AuditOptions,
    hosts: HashMap<(String, String), HostTrack>,
    epochs: HashMap<String, EpochOrder>,
    /// Contiguous lanes a record was read in.
    lanes_read: HashSet<Lane>,
    lane_origin: HashSet<Lane>,
    problems: Vec<Problem>,
    records: u64,
}

impl Auditor {
    pub fn new(opts: AuditOptions) -> Auditor {
        Auditor {
            opts,
            hosts: HashMap::new(),
            epochs: HashMap::new(),
            lanes_read: HashSet::new(),
            lane_origin: HashSet::new(),
            problems: Vec::new(),
            records: 0,
        }
    }

    /// Notes a message that could not be decoded (always a problem: its
    /// content, hence what it would have told, is lost).
    pub fn undecodable(&mut self, pos: &Position, why: &str) {
        self.problems.push(Problem {
            kind: ProblemKind::Gap,
            host_id: None,
            epoch: None,
            uuid: None,
            at: Some(pos.to_string()),
            finding: Finding::Undecodable {
                at: pos.clone(),
                why: why.to_owned(),
            },
        });
    }

    /// Notes records missing from a contiguous lane (see `lanes`):
    /// positions between two records read, or after the last record read
    /// at the lane's end (e.g. a deleted last message). Messages that could
    /// not be decoded are reported by [`Auditor::undecodable`] instead; a
    /// lane's head gone is not a problem here (a domain's first seq is
    /// checked instead).
    pub fn hole(&mut self, hole: &Hole) {
        let lane = &hole.lane;
        match (&hole.kind, &hole.after) {
            (HoleKind::Before { next: pos, .. }, Some(prev)) => {
                self.problems.push(Problem {
                    kind: ProblemKind::StreamHole,
                    host_id: None,
                    epoch: None,
                    uuid: None,
                    at: Some(pos.to_string()),
                    finding: Finding::LaneHole {
                        lane: lane.clone(),
                        first: prev.offset + 1,
                        last: pos.offset - 1,
                        prev: prev.clone(),
                        next: pos.clone(),
                    },
                });
            }
            (HoleKind::End { last, .. }, after) => {
                let read = after.as_ref().map(|p| p.offset);
                self.problems.push(Problem {
                    kind: ProblemKind::StreamHole,
                    host_id: None,
                    epoch: None,
                    uuid: None,
                    at: None,
                    finding: Finding::LaneEnd {
                        lane: lane.clone(),
                        first: read.map_or(0, |r| r + 1),
                        last: *last,
                        read,
                    },
                });
            }
            _ => {}
        }
    }

    /// Adds one record, after the holes found before it; `contiguous` as
    /// for `rebuild::Fleet::apply`.
    pub fn add(&mut self, rec: &Record, contiguous: bool) {
        self.records += 1;
        let pos = &rec.pos;
        let lane = pos.lane();
        // The lane's first record at its origin, read from the start: the
        // lane was read from its very beginning.
        if contiguous
            && self.lanes_read.insert(lane.clone())
            && self.opts.from_start
            && pos.offset == lane_origin(pos)
        {
            self.lane_origin.insert(lane.clone());
        }
        let (host, epoch, host_seq) = rec.body.origin();
        let key = (host.to_owned(), epoch.to_owned());
        self.epochs
            .entry(key.0.clone())
            .or_default()
            .note(epoch, pos, rec.body.observed_at());
        let h = self.hosts.entry(key.clone()).or_insert_with(|| HostTrack {
            first_host_seq: u64::MAX,
            ..HostTrack::default()
        });
        let problem = |kind, uuid: Option<&str>, finding| Problem {
            kind,
            host_id: Some(key.0.clone()),
            epoch: Some(key.1.clone()),
            uuid: uuid.map(str::to_owned),
            at: Some(pos.to_string()),
            finding,
        };
        if let Some(first) = h.seen.get(&host_seq) {
            self.problems.push(problem(
                ProblemKind::Duplicate,
                None,
                Finding::HostSeqAgain {
                    host: host.to_owned(),
                    epoch: epoch.to_owned(),
                    host_seq,
                    at: pos.clone(),
                    first: first.clone(),
                },
            ));
            return;
        }
        h.seen.insert(host_seq, pos.clone());
        h.last_word.note(
            host_seq,
            rec.body.observed_at(),
            matches!(rec.body, Body::Host(_)),
        );
        h.first_host_seq = h.first_host_seq.min(host_seq);
        h.last_host_seq = h.last_host_seq.max(host_seq);
        match &rec.body {
            Body::Event(e) if e.event == EventType::GAP => {
                h.events += 1;
                h.gaps.push((host_seq, pos.clone(), e.detail.to_string()));
            }
            Body::Event(e) => {
                h.events += 1;
                let origin = self.lane_origin.contains(&lane);
                let d = h.domains.entry(e.domain.uuid.clone()).or_default();
                d.name.clone_from(&e.domain.name);
                let uuid = Some(e.domain.uuid.as_str());
                // Built only for a problem: most events have none.
                let domain = || DomainLabel {
                    uuid: e.domain.uuid.clone(),
                    name: e.domain.name.clone(),
                    host: host.to_owned(),
                };
                match d.last {
                    None if origin && e.seq > 1 => {
                        self.problems.push(problem(
                            ProblemKind::Gap,
                            uuid,
                            Finding::SeqAfterOrigin {
                                domain: domain(),
                                seq: e.seq,
                                at: pos.clone(),
                            },
                        ));
                    }
                    None => d.first_lane_origin = origin,
                    Some((last, last_hs))
                        if Some(e.seq) == last.checked_add(1) && host_seq > last_hs => {}
                    Some((last, _)) if e.seq > last.saturating_add(1) => {
                        self.problems.push(problem(
                            ProblemKind::Gap,
                            uuid,
                            Finding::SeqMissing {
                                domain: domain(),
                                last,
                                seq: e.seq,
                                at: pos.clone(),
                            },
                        ));
                    }
                    Some((last, _)) if e.seq == last => {
                        self.problems.push(problem(
                            ProblemKind::Duplicate,
                            uuid,
                            Finding::SeqAgain {
                                domain: domain(),
                                seq: e.seq,
                                at: pos.clone(),
                            },
                        ));
                    }
                    Some((last, _)) => {
                        self.problems.push(problem(
                            ProblemKind::Reordering,
                            uuid,
                            Finding::SeqBack {
                                domain: domain(),
                                seq: e.seq,
                                last,
                                at: pos.clone(),
                            },
                        ));
                    }
                }
                if d.last.is_none_or(|(s, _)| e.seq > s) {
                    d.last = Some((e.seq, host_seq));
                }
                d.seqs.push((host_seq, e.seq));
            }
            Body::Domain(s) => {
                h.snapshot_records += 1;
                let e = h
                    .snapshots
                    .entry(s.domain.uuid.clone())
                    .or_insert((0, 0, pos.clone()));
                if host_seq > e.0 {
                    *e = (host_seq, s.seq, pos.clone());
                }
            }
            Body::Host(hs) => {
                h.snapshot_records += 1;
                if let Some(begin) = hs
                    .snapshot_id
                    .as_deref()
                    .and_then(parse_event_id)
                    .map(|(_, _, b)| b)
                {
                    if matches!(
                        hs.kind,
                        HostSnapshotKind::ROUND_END | HostSnapshotKind::HEARTBEAT
                    ) {
                        h.complete_rounds.push(begin);
                    }
                }
                h.heartbeats.push((host_seq, hs.observed_at, pos.clone()));
            }
            Body::Tombstone(_) => h.snapshot_records += 1,
        }
    }

    /// The report.
    pub fn finish(mut self) -> AuditReport {
        let mut notices = Vec::new();
        // Epochs per host, oldest first.
        let mut newest: HashMap<&str, &str> = HashMap::new();
        for (host, order) in &self.epochs {
            let list = order.oldest_first();
            newest.insert(host, list.last().expect("non-empty"));
            for w in list.windows(2) {
                self.problems.push(Problem {
                    kind: ProblemKind::EpochChange,
                    host_id: Some((*host).to_owned()),
                    epoch: Some(w[1].to_owned()),
                    uuid: None,
                    at: None,
                    finding: Finding::EpochReplaced {
                        host: (*host).to_owned(),
                        old: w[0].to_owned(),
                        new: w[1].to_owned(),
                    },
                });
            }
        }
        let mut hosts = Vec::new();
        for ((host, epoch), h) in &self.hosts {
            let who = |uuid: Option<&str>, at: Option<&Position>, kind, finding| Problem {
                kind,
                host_id: Some(host.clone()),
                epoch: Some(epoch.clone()),
                uuid: uuid.map(str::to_owned),
                at: at.map(Position::to_string),
                finding,
            };
            // Snapshots that carry a seq beyond the events read before them.
            for (uuid, (snap_hs, snap_seq, pos)) in &h.snapshots {
                let Some(d) = h.domains.get(uuid) else {
                    continue;
                };
                let before = d
                    .seqs
                    .iter()
                    .filter(|(hs, _)| hs < snap_hs)
                    .map(|(_, s)| *s)
                    .max();
                if let Some(m) = before {
                    if m < *snap_seq {
                        self.problems.push(who(
                            Some(uuid),
                            Some(pos),
                            ProblemKind::Gap,
                            Finding::SnapshotAhead {
                                domain: DomainLabel {
                                    uuid: uuid.clone(),
                                    name: d.name.clone(),
                                    host: host.clone(),
                                },
                                at: pos.clone(),
                                snap_seq: *snap_seq,
                                events_end: m,
                            },
                        ));
                    }
                }
            }
            for (g, pos, cause) in &h.gaps {
                let repaired = h.complete_rounds.iter().any(|b| b > g);
                let msg = Finding::ReportedGap {
                    host: host.clone(),
                    cause: cause.clone(),
                    at: pos.clone(),
                    repaired,
                };
                if repaired {
                    notices.push(who(None, Some(pos), ProblemKind::ReportedGap, msg));
                } else {
                    self.problems
                        .push(who(None, Some(pos), ProblemKind::ReportedGap, msg));
                }
            }
            // In emission order (host_seq): a clock stepped back between
            // two heartbeats cannot pair the wrong ones.
            let mut beats = h.heartbeats.clone();
            beats.sort_by_key(|b| b.0);
            let rule = self.opts.liveness;
            for w in beats.windows(2) {
                if rule.silent_between(w[0].1, w[1].1) {
                    self.problems.push(who(
                        None,
                        Some(&w[1].2),
                        ProblemKind::MissingHeartbeat,
                        Finding::SilenceBetween {
                            host: host.clone(),
                            from: (w[0].1, w[0].2.clone()),
                            to: (w[1].1, w[1].2.clone()),
                        },
                    ));
                }
            }
            if newest.get(host.as_str()) == Some(&epoch.as_str()) {
                let silent = h
                    .last_word
                    .time()
                    .and_then(|t| rule.silent_since(t, self.opts.now_us).map(|_| t));
                match (beats.last(), silent) {
                    (Some((_, _, pos)), Some(t)) => {
                        self.problems.push(who(
                            None,
                            Some(pos),
                            ProblemKind::MissingHeartbeat,
                            Finding::SilentSince {
                                host: host.clone(),
                                last_us: t,
                                at: pos.clone(),
                                now_us: self.opts.now_us,
                                rule,
                            },
                        ));
                    }
                    (None, _) => self.problems.push(who(
                        None,
                        None,
                        ProblemKind::MissingHeartbeat,
                        Finding::NoHeartbeat { host: host.clone() },
                    )),
                    _ => {}
                }
            }
            hosts.push(HostSummary {
                host_id: host.clone(),
                epoch: epoch.clone(),
                events: h.events,
                snapshot_records: h.snapshot_records,
                domains: h.domains.len(),
                first_host_seq: if h.first_host_seq == u64::MAX {
                    0
                } else {
                    h.first_host_seq
                },
                last_host_seq: h.last_host_seq,
                last_heartbeat: beats.last().map(|b| b.1),
            });
        }
        hosts.sort_by(|a, b| (&a.host_id, &a.epoch).cmp(&(&b.host_id, &b.epoch)));
        self.problems
            .sort_by(|a, b| (a.kind, &a.host_id, &a.at).cmp(&(b.kind, &b.host_id, &b.at)));
        AuditReport {
            continuous: self.problems.is_empty(),
            records: self.records,
            hosts,
            problems: self.problems,
            notices,
        }
    }
}

impl Feed for Auditor {
    fn record(&mut self, rec: &Record, contiguous: bool) {
        self.add(rec, contiguous)
    }
    fn undecodable(&mut self, pos: &Position, error: &RecordError) {
        Auditor::undecodable(self, pos, &error.to_string())
    }
    fn hole(&mut self, hole: &Hole) {
        Auditor::hole(self, hole)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::lanes::Piped;
    use crate::consumer::rebuild::tests::{ev, pos, U1};
    use crate::model::DomainState;

    fn auditor() -> Auditor {
        Auditor::new(AuditOptions {
            liveness: Liveness::new(std::time::Duration::from_secs(1), 3),
            now_us: 0,
            from_start: true,
        })
    }

    #[test]
    fn a_deleted_last_message_is_a_hole_at_the_end() {
        let body = ev("e", 1, U1, 1, DomainState::RUNNING);
        let mut a = Piped::new(auditor());
        a.record(
            &Record {
                body,
                pos: pos("EV", 1),
            },
            true,
        );
        a.lane_end(&pos("EV", 1).lane(), 3, None);
        let r = a.into_inner().finish();
        let hole = r
            .problems
            .iter()
            .find(|p| p.kind == ProblemKind::StreamHole)
            .expect("a hole");
        assert!(
            matches!(
                hole.finding,
                Finding::LaneEnd {
                    first: 2,
                    last: 3,
                    read: Some(1),
                    ..
                }
            ),
            "{:?}",
            hole.finding
        );
    }

    #[test]
    fn heartbeats_pair_by_host_seq_when_the_clock_steps_back() {
        use crate::consumer::rebuild::tests::host_rec;
        use crate::model::HostSnapshotKind;
        let mut a = Auditor::new(AuditOptions {
            now_us: 7_000_000,
            ..auditor().opts
        });
        // host_seq 1 at 10 s, then the clock steps back: 2 at 5 s, 3 at 6 s.
        for (hs, t) in [(1u64, 10i64), (2, 5), (3, 6)] {
            let mut body = host_rec("e", hs, HostSnapshotKind::HEARTBEAT, 1, 0);
            if let Body::Host(h) = &mut body {
                h.observed_at = t * 1_000_000;
            }
            a.add(
                &Record {
                    body,
                    pos: pos("HS", hs),
                },
                false,
            );
        }
        let r = a.finish();
        assert!(
            r.problems
                .iter()
                .all(|p| p.kind != ProblemKind::MissingHeartbeat),
            "{:?}",
            r.problems
        );
        assert_eq!(
            r.hosts[0].last_heartbeat,
            Some(6_000_000),
            "newest by host_seq"
        );
    }

    #[test]
    fn hostile_numbers_are_reported_not_panics() {
        let mut a = auditor();
        for (i, (hs, seq)) in [(1, 0u64), (2, u64::MAX), (3, 1), (4, u64::MAX)]
            .iter()
            .enumerate()
        {
            let mut body = ev("e", *hs, U1, *seq, DomainState::RUNNING);
            if let Body::Event(e) = &mut body {
                e.observed_at = if i % 2 == 0 { i64::MIN } else { i64::MAX };
            }
            a.add(
                &Record {
                    body,
                    pos: pos("EV", u64::MAX - 3 + i as u64),
                },
                true,
            );
        }
        let r = a.finish();
        assert!(!r.continuous);
    }
}
