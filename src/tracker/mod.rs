//! The tracker: one state machine per (host, domain). Takes the items the
//! source hands over (`crate::source::Item`: libvirt callbacks with the
//! facts the enricher attached, listing barriers and listings,
//! disconnects) and turns them into `DomainEvent` messages with
//! state-after and sequence numbers, snapshot rounds and gap markers,
//! which it appends to the journal. It never calls libvirt: the facts an
//! event cannot tell come attached to it (`source::enrich`) or from what
//! it knew. It consumes the source's hand-off types and never defines
//! them (data flows source → tracker).
//!
//! Files: `types` (records, outputs, settings), `derive` (pure: the state
//! an event leads to, the event a listing difference needs), `state` (the
//! `Tracker`: records, counters, applying an event), `hook` (applying a
//! qemu hook call: a HOOK record with the state the tracker knows), `rounds` (listings,
//! snapshot rounds, heartbeats), `stale` (snapshots an earlier epoch left),
//! `task` (the thread: queue in, journal out, timers, stopping).
//!
//! Invariants:
//! - `state_after` is derived from (event, detail) and the domain's previous
//!   state; attached facts (which may already see a later state during a
//!   burst) never override it, they only fill what the event cannot tell
//!   (the reason where the event leaves it open, persistent for a domain
//!   never seen, autostart, vcpus, memory, config hash);
//! - `host_seq` grows by one per message, `seq` by one per message about a
//!   domain (gap markers carry seq 0); both continue across restarts from
//!   the journal and start at 1 in a new epoch;
//! - a domain without attached facts is still published with what is
//!   known;
//! - a domain record is kept for the whole epoch (a UUID that comes back
//!   continues its `seq`): in memory while the domain lives or a tombstone
//!   is pending, in the journal only once it is gone and that is durable
//!   (`Tracker::sweep`), restored from there when it returns;
//! - the `Tracker` itself is pure logic (no I/O, clock or sleeping); only
//!   `task` touches the queue, the journal, the clock and the heap.

mod derive;
mod hook;
mod rounds;
mod stale;
mod state;
mod task;
mod types;

pub use derive::derive_state;
pub use state::Tracker;
pub use task::{SnapshotOptions, TrackerTask};
pub use types::{decode_records, DomainRecord, GapCause, Output, Snap, Touch, TrackerOptions};

#[cfg(test)]
mod event_tests;
#[cfg(test)]
mod listing_tests;
#[cfg(test)]
mod round_tests;
#[cfg(test)]
pub(crate) mod testkit;
