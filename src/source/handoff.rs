//! The hand-off contract between the source stages (libvirt callbacks,
//! the source thread, the enricher) and the tracker: the items on the
//! queue, what they carry, and the listing requests that flow back.
//!
//! Invariants:
//! - data flows one way, source → tracker: these types are defined here
//!   and the tracker only consumes them (this module imports nothing of
//!   the tracker);
//! - the queue is bounded and preallocated, so `Item` stays small (an
//!   event is boxed);
//! - items are consumed in queue order; the order is the contract (a
//!   `ListingBegin` precedes the `Resync` it announces, a `Disconnected`
//!   precedes the listing after a reconnect);
//! - listing requests merge instead of queueing: a full request absorbs a
//!   light one and is never lost behind it.

use std::time::Duration;

use crate::model::{HostInfo, StateReason};

/// What the libvirt callback hands over. Built without calling libvirt.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    pub uuid: String,
    pub name: String,
    /// libvirt domain id, when the domain object carried one.
    pub id: Option<i32>,
    /// `VIR_DOMAIN_EVENT_ID_*`.
    pub event_id: i32,
    /// Lifecycle event type integer (-1 for other event ids).
    pub type_code: i32,
    /// Lifecycle detail integer (-1 for other event ids).
    pub detail_code: i32,
    /// Agent receive time (µs since the Unix epoch).
    pub observed_at: i64,
    /// What the enricher fetched for this event (see `source::enrich`):
    /// only for a DEFINED, a domain not known to exist, or when every
    /// message carries the XML. `None` otherwise, or when libvirt could
    /// not tell: the event is published with what is known.
    pub facts: Option<Box<Facts>>,
}

/// What a lookup or listing tells about a domain.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub name: String,
    pub id: Option<i32>,
    pub state: StateReason,
    pub persistent: bool,
    pub autostart: Option<bool>,
    pub vcpus: Option<i32>,
    pub memory_kib: Option<i64>,
    pub config_hash: Option<String>,
    pub xml: Option<String>,
}

/// One call of libvirt's qemu hook script, forwarded by `virtstream hook`
/// (see `source::hooks`, which also gives it its wire and spool form: one
/// JSON line). Carries no state: the tracker journals it with the state it
/// knows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HookPhase {
    pub uuid: String,
    /// The GUEST argument (the domain's name).
    pub name: String,
    pub operation: String,
    pub sub_operation: String,
    pub extra: String,
    /// When the hook ran (µs since the Unix epoch).
    pub observed_at: i64,
}

/// Items on the hand-off queue, in the order the tracker must see them.
#[derive(Debug, Clone)]
pub enum Item {
    /// Boxed so the queue's slots stay small (the queue preallocates).
    Event(Box<RawEvent>),
    /// A qemu hook call, queued by the hook listener before the hook
    /// returns to libvirt, so it precedes the events libvirt emits after it.
    Hook(Box<HookPhase>),
    /// The barrier of a list + watch: the source is about to take a
    /// listing. Every event after this item on the queue was delivered
    /// after the listing began, so the listing that follows may be older
    /// than it and must not undo it. `dropped` is the callback's count of
    /// events dropped on a full queue when the barrier was queued: a drop
    /// after it may be newer than the listing.
    ListingBegin { dropped: u64 },
    /// A complete listing of the host's domains (after connect, or on
    /// request), taken after the last `ListingBegin`; the tracker emits
    /// RECONCILE events for every difference it may repair.
    Resync {
        listing: Vec<(String, Facts)>,
        observed_at: i64,
        /// What the connection's libvirt is (carried by HostSnapshot).
        info: HostInfo,
    },
    /// The libvirt connection was lost: events may be missing from here on.
    Disconnected { observed_at: i64 },
    /// Domains whose latest snapshot record on a bus is from another
    /// (earlier) epoch of this host and not a tombstone: the next complete
    /// round tombstones those it does not contain (see `tracker::stale`).
    StaleSnapshots(Vec<String>),
}

/// Listing requests from the tracker to the source. Requests merge (a
/// full one absorbs a light one) instead of queueing, so a full listing
/// asked for after a gap is never lost behind a pending light one.
#[derive(Debug, Default)]
pub struct ResyncRequests {
    pending: std::sync::Mutex<Option<bool>>,
    wake: std::sync::Condvar,
}

impl ResyncRequests {
    /// Asks for a listing; `full` for one with config hashes.
    pub fn request(&self, full: bool) {
        let mut p = self.pending.lock().expect("resync requests");
        *p = Some(p.unwrap_or(false) || full);
        self.wake.notify_one();
    }

    /// Waits up to `timeout` for a request; `Some(full)` takes it.
    pub fn wait(&self, timeout: Duration) -> Option<bool> {
        let p = self.pending.lock().expect("resync requests");
        let (mut p, _) = self
            .wake
            .wait_timeout_while(p, timeout, |p| p.is_none())
            .expect("resync requests");
        p.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_requests_merge_and_a_full_one_is_never_lost() {
        let r = ResyncRequests::default();
        assert_eq!(r.wait(Duration::from_millis(1)), None);
        r.request(true);
        r.request(false);
        assert_eq!(r.wait(Duration::from_millis(1)), Some(true));
        assert_eq!(r.wait(Duration::from_millis(1)), None);
        r.request(false);
        assert_eq!(r.wait(Duration::from_millis(1)), Some(false));
    }
}
