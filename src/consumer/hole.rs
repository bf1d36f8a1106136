//! The one hole type of the consumer pipeline: messages missing from a
//! contiguous lane, as the lanes stage finds them and every tool takes
//! them (see `lanes` for how they are found).
//!
//! Invariant: a hole names its lane and where it is, and says whether it
//! is a loss of positions or only of records (see
//! [`Hole::missing_from_lane`]).

use super::record::{Lane, Position};

/// Messages missing from a contiguous lane.
#[derive(Debug, Clone, PartialEq)]
pub struct Hole {
    pub lane: Lane,
    pub kind: HoleKind,
    /// Broker time of the message after the hole, of the undecodable
    /// message, or of the lane's end: every message lost there was emitted
    /// before it.
    pub time: Option<i64>,
    /// The last record read in the lane before the hole, if any.
    pub after: Option<Position>,
}

/// Where a hole is.
#[derive(Debug, Clone, PartialEq)]
pub enum HoleKind {
    /// Nothing was read in the lane before `next`, which is past the
    /// lane's origin: its head is gone (retention, deletion).
    Head { next: Position },
    /// Positions before `next` are missing. `unread`: some after the last
    /// message read (decoded or not); when false, only records are
    /// missing since [`Hole::after`] (messages read between could not be
    /// decoded).
    Before { next: Position, unread: bool },
    /// The message at `at` could not be decoded: its content is lost.
    Undecodable { at: Position },
    /// Positions up to `last`, where the lane ended when reading began,
    /// are missing at its end. `unread` as for [`HoleKind::Before`].
    End { last: u64, unread: bool },
}

impl Hole {
    /// Whether messages are missing from the lane's positions (never
    /// read, or read but undecodable): the holes rebuild and usage count.
    /// False for a hole only in the records between [`Hole::after`] and
    /// the next one, which the audit alone counts.
    pub fn missing_from_lane(&self) -> bool {
        match &self.kind {
            HoleKind::Head { .. } | HoleKind::Undecodable { .. } => true,
            HoleKind::Before { unread, .. } | HoleKind::End { unread, .. } => *unread,
        }
    }

    /// Where, for a report: `before <position>`, `at <position>` or
    /// `at its end (position <last>)`.
    pub fn at(&self) -> String {
        match &self.kind {
            HoleKind::Head { next } | HoleKind::Before { next, .. } => format!("before {next}"),
            HoleKind::Undecodable { at } => format!("at {at}"),
            HoleKind::End { last, .. } => format!("at its end (position {last})"),
        }
    }

    /// `messages missing from <lane> <where>`.
    pub fn reason(&self) -> String {
        format!("messages missing from {} {}", self.lane, self.at())
    }
}
