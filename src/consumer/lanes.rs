//! The lanes stage of the consumer pipeline: where messages are missing
//! from a contiguous lane (the events stream, an events partition), found
//! once for every tool and handed on as [`Hole`]s, each just before the
//! record (or at the lane end) that revealed it.
//!
//! Two views of one lane are kept, because the tools count differently:
//! - by position (rebuild, usage): positions after the last message read,
//!   decoded or not, are missing; an undecodable message is itself a
//!   loss; a lane whose first message read is past its origin lost its
//!   head ([`Hole::missing_from_lane`]);
//! - by record (audit): positions between two records read are missing,
//!   whatever was read between them (an undecodable message is reported
//!   by the audit on its own), and the lane's end is checked against the
//!   last record read ([`Hole::after`]).
//!
//! Invariants: a hole is handed on before the record that revealed it, so
//! a feed sees every hole of a lane before any later record of that lane;
//! nothing is handed on for lanes that are not contiguous (compacted
//! snapshot streams, whose holes are superseded records).

use std::collections::HashMap;

use super::feed::Feed;
use super::hole::{Hole, HoleKind};
use super::record::{Lane, Position, Record, RecordError};

/// The first position of a lane that never lost anything: stream
/// sequence 1 on NATS, offset 0 on Kafka.
pub fn lane_origin(pos: &Position) -> u64 {
    if pos.partition.is_some() {
        0
    } else {
        1
    }
}

/// What was read of one contiguous lane.
#[derive(Debug, Default)]
struct LaneState {
    /// The highest position read, decoded or not.
    last_read: Option<u64>,
    /// The last record read.
    last_record: Option<Position>,
}

/// The lanes stage: finds holes, and hands records, undecodable messages
/// and holes to a [`Feed`] in the order they were read.
#[derive(Debug, Default)]
pub struct Lanes {
    lanes: HashMap<Lane, LaneState>,
}

impl Lanes {
    pub fn new() -> Lanes {
        Lanes::default()
    }

    /// Hands on one record, after the hole before it, if any.
    /// `contiguous`: whether positions in the record's lane are contiguous
    /// when nothing is lost (true for the events stream and topic; false
    /// for compacted snapshot streams).
    pub fn record(&mut self, rec: &Record, contiguous: bool, feed: &mut (impl Feed + ?Sized)) {
        if contiguous {
            let pos = &rec.pos;
            let lane = self.lanes.entry(pos.lane()).or_default();
            let by_position = match lane.last_read {
                None => pos.offset > lane_origin(pos),
                Some(last) => pos.offset > last.saturating_add(1),
            };
            let by_record = lane
                .last_record
                .as_ref()
                .is_some_and(|prev| pos.offset > prev.offset.saturating_add(1));
            if by_position || by_record {
                let kind = if lane.last_read.is_none() {
                    HoleKind::Head { next: pos.clone() }
                } else {
                    HoleKind::Before {
                        next: pos.clone(),
                        unread: by_position,
                    }
                };
                feed.hole(&Hole {
                    lane: pos.lane(),
                    kind,
                    time: pos.time_us,
                    after: lane.last_record.clone(),
                });
            }
            lane.last_read = Some(lane.last_read.map_or(pos.offset, |l| l.max(pos.offset)));
            lane.last_record = Some(pos.clone());
        }
        feed.record(rec, contiguous);
    }

    /// Hands on a message that could not be decoded; in a contiguous lane
    /// it is a hole too (its content is lost).
    pub fn undecodable(
        &mut self,
        pos: &Position,
        error: &RecordError,
        contiguous: bool,
        feed: &mut (impl Feed + ?Sized),
    ) {
        feed.undecodable(pos, error);
        if contiguous {
            let lane = self.lanes.entry(pos.lane()).or_default();
            feed.hole(&Hole {
                lane: pos.lane(),
                kind: HoleKind::Undecodable { at: pos.clone() },
                time: pos.time_us,
                after: lane.last_record.clone(),
            });
            lane.last_read = Some(lane.last_read.map_or(pos.offset, |l| l.max(pos.offset)));
        }
    }

    /// Notes where a contiguous lane ended when reading began (the NATS
    /// stream's last sequence and when it was stored): positions after
    /// the last one read are missing (e.g. a deleted last message).
    pub fn lane_end(
        &mut self,
        lane: &Lane,
        last: u64,
        time_us: Option<i64>,
        feed: &mut (impl Feed + ?Sized),
    ) {
        let state = self.lanes.get(lane);
        let read = state.and_then(|s| s.last_read);
        let record = state.and_then(|s| s.last_record.clone());
        let unread = read.is_none_or(|p| p < last);
        if unread || record.as_ref().is_none_or(|r| r.offset < last) {
            feed.hole(&Hole {
                lane: lane.clone(),
                kind: HoleKind::End { last, unread },
                time: time_us,
                after: record,
            });
        }
    }
}

/// A feed behind a lanes stage of its own, for handing it records one at
/// a time (tests, or records from elsewhere than a bus).
#[derive(Debug, Default)]
pub struct Piped<F> {
    lanes: Lanes,
    pub feed: F,
}

impl<F: Feed> Piped<F> {
    pub fn new(feed: F) -> Piped<F> {
        Piped {
            lanes: Lanes::new(),
            feed,
        }
    }

    /// See [`Lanes::record`].
    pub fn record(&mut self, rec: &Record, contiguous: bool) {
        self.lanes.record(rec, contiguous, &mut self.feed);
    }

    /// See [`Lanes::undecodable`].
    pub fn undecodable(&mut self, pos: &Position, error: &RecordError, contiguous: bool) {
        self.lanes
            .undecodable(pos, error, contiguous, &mut self.feed);
    }

    /// See [`Lanes::lane_end`].
    pub fn lane_end(&mut self, lane: &Lane, last: u64, time_us: Option<i64>) {
        self.lanes.lane_end(lane, last, time_us, &mut self.feed);
    }

    pub fn into_inner(self) -> F {
        self.feed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::record::{Body, Tombstone};
    use std::sync::Arc;

    fn pos(src: &str, offset: u64) -> Position {
        Position {
            source: Arc::from(src),
            partition: None,
            offset,
            time_us: None,
        }
    }

    #[derive(Default)]
    struct Holes(Vec<Hole>);

    impl Feed for Holes {
        fn hole(&mut self, hole: &Hole) {
            self.0.push(hole.clone());
        }
    }

    fn rec(offset: u64) -> Record {
        Record {
            body: Body::Tombstone(Tombstone {
                host_id: "h".into(),
                epoch: "e".into(),
                host_seq: offset,
                uuid: "u".into(),
            }),
            pos: pos("EV", offset),
        }
    }

    #[test]
    fn holes_by_position_and_by_record() {
        let (mut lanes, mut h) = (Lanes::new(), Holes::default());
        lanes.record(&rec(2), true, &mut h);
        lanes.record(&rec(3), true, &mut h);
        let err = RecordError::Tombstone("ce_id");
        lanes.undecodable(&pos("EV", 4), &err, true, &mut h);
        lanes.record(&rec(5), true, &mut h);
        lanes.record(&rec(7), true, &mut h);
        lanes.lane_end(&pos("EV", 1).lane(), 7, None, &mut h);
        let at: Vec<(String, bool)> =
            h.0.iter()
                .map(|x| (x.at(), x.missing_from_lane()))
                .collect();
        assert_eq!(
            at,
            [
                ("before EV stream seq 2".to_string(), true),
                ("at EV stream seq 4".to_string(), true),
                ("before EV stream seq 5".to_string(), false),
                ("before EV stream seq 7".to_string(), true),
            ]
        );
        assert_eq!(h.0[2].after, Some(pos("EV", 3)));
    }

    #[test]
    fn an_undecodable_last_message_is_a_hole_in_the_records_only() {
        let (mut lanes, mut h) = (Lanes::new(), Holes::default());
        lanes.record(&rec(1), true, &mut h);
        let err = RecordError::Tombstone("ce_id");
        lanes.undecodable(&pos("EV", 2), &err, true, &mut h);
        lanes.lane_end(&pos("EV", 1).lane(), 2, None, &mut h);
        let end = h.0.last().unwrap();
        assert_eq!(
            end.kind,
            HoleKind::End {
                last: 2,
                unread: false
            }
        );
        assert!(!end.missing_from_lane());
        // Nothing read past the origin of a snapshot stream is no hole.
        let (mut lanes, mut h) = (Lanes::new(), Holes::default());
        lanes.record(&rec(9), false, &mut h);
        assert!(h.0.is_empty());
    }
}
