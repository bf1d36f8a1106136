//! The `Feed` stage of the consumer pipeline: what a tool takes from a
//! read. Every tool (rebuild for `state`, usage, audit, replay) is a
//! [`Feed`]; the bus and lanes stages call it, in the order messages were
//! read.
//!
//! Invariants: a feed never reads a bus itself and never looks for holes
//! itself (the lanes stage hands them over); the methods it does not need
//! do nothing by default.

use super::bus::Message;
use super::hole::Hole;
use super::record::{Position, Record, RecordError};

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
