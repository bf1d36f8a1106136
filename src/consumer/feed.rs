//! The `Feed` stage of the consumer pipeline: what a tool takes from a
//! read. Every tool (rebuild for `state`, usage, audit, replay) is a
//! [`Feed`]; the bus and lanes stages call it, in the order messages were
//! read.
//!
//! Invariants: a feed never reads a bus itself and never looks for holes
//! itself (the lanes stage hands them over); the methods it does not need
//! do nothing by default.

use super::bus::Message;
use super::lanes::{Hole, Lanes};
use super::record::{Lane, Position, Record, RecordError};

/// A consumer of what was read.
pub trait Feed {
    /// Whether messages are to be decoded into records for this feed
    /// (false: only [`Feed::message`] is called).
    fn wants_records(&self) -> bool {
        true
    }

    /// Whether the feed wants nothing more: the read stops.
    fn done(&self) -> bool {
        false
    }

    /// Every message as it was read, before decoding.
    fn message(&mut self, _msg: &Message<'_>) {}

    /// A decoded record; `contiguous` tells whether its lane's positions
    /// are contiguous when nothing is lost.
    fn record(&mut self, _rec: &Record, _contiguous: bool) {}

    /// A message that is not a record of a shipped schema (in a
    /// contiguous lane, a [`Hole`] follows).
    fn undecodable(&mut self, _pos: &Position, _error: &RecordError) {}

    /// Messages missing from a contiguous lane (see `lanes`).
    fn hole(&mut self, _hole: &Hole) {}
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
