//! The tracker's thread: takes the source's items off the queue in order,
//! applies them to the `Tracker`, appends what it produces to the journal,
//! and keeps the timers (periodic listing requests, heartbeats, sweeps).
//! The only part of the tracker that touches the queue, the journal, the
//! clock and the heap.
//!
//! Invariants:
//! - items are applied one at a time, in queue order;
//! - while the journal is over its bound nothing new is journaled (events
//!   are dropped and counted); a JOURNAL_FULL gap marker and a full
//!   listing follow once there is space;
//! - one QUEUE_OVERFLOW marker per listing cycle; a loss while a listing is
//!   under way gets a marker after its round, and another listing;
//! - a gone domain the tracker forgot is recalled from the journal before
//!   an event or listing about it is applied, so its `seq` continues;
//! - once `stop` is set, the queue is drained until the stage before hangs
//!   up (at most `STOP_WAIT`), then the journal is synced.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::now_micros;
use crate::codec;
use crate::journal::{Entry, Journal, Kind};
use crate::model::{HostInfo, HOST_UUID};
use crate::source::{Item, ResyncRequests};
use crate::telemetry::Metrics;

use super::state::Tracker;
use super::types::{DomainRecord, GapCause, Output, Snap};

/// The tracker's thread: queue in, journal out.
pub struct TrackerTask {
    pub tracker: Tracker,
    pub items: Receiver<Item>,
    /// Set by the libvirt callback when the queue was full.
    pub overflow: Arc<AtomicBool>,
    /// Asks the source for a fresh listing (after overflow or a full journal).
    pub resync: Arc<ResyncRequests>,
    pub journal: Journal,
    pub metrics: Arc<Metrics>,
    /// Emit a gap marker (AGENT_RESTART detail) with this cause first: the
    /// journal existed, or was found restored and a new epoch began.
    pub restarted: Option<GapCause>,
    /// Set at shutdown: drain what is queued, then return.
    pub stop: Arc<AtomicBool>,
    /// Round and heartbeat periods.
    pub snapshot: SnapshotOptions,
}

/// How long a stopping tracker waits for the stage before it to hang up.
const STOP_WAIT: Duration = Duration::from_secs(60);

/// How often the tracker forgets gone domains (`Tracker::sweep`).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// When snapshot rounds and heartbeats happen (besides the rounds after
/// every libvirt listing: at start, after reconnects and after gaps).
#[derive(Debug, Clone, Copy)]
pub struct SnapshotOptions {
    pub interval: Duration,
    pub heartbeat: Duration,
}

impl TrackerTask {
    /// Runs until every sender of the queue is gone.
    pub fn run(mut self) {
        let mut full_gap_pending = false;
        if let Some(cause) = self.restarted {
            let o = self.tracker.gap(cause, now_micros());
            self.emit_gap(o, cause);
        }
        // Known after the first listing; rounds and heartbeats wait for it.
        let mut info: Option<HostInfo> = None;
        let mut next_round = Instant::now() + self.snapshot.interval;
        let mut next_heartbeat = Instant::now() + self.snapshot.heartbeat;
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        // A queue-overflow marker was emitted and its listing has not
        // been applied yet.
        let mut overflow_marked = false;
        // While a listing is under way: the callback's drop count when its
        // barrier was queued, and whether a full journal dropped an event
        // since the barrier. Either loss may be newer than the listing, so
        // its round is followed by a marker and another listing.
        let mut barrier_drops: Option<u64> = None;
        let mut journal_loss_in_listing = false;
        loop {
            let now = Instant::now();
            // While the journal is full nothing new is journaled: no
            // periodic round, no heartbeat (the journal-full gap marker is
            // followed by a full listing and round once space is free).
            let full_now = self
                .journal
                .rejects_new(self.tracker.opts.max_journal_bytes);
            if now >= next_round {
                // The listing it asks for comes back as a Resync: reconcile,
                // then the round.
                if !full_now {
                    self.request_resync(false);
                }
                next_round = now + self.snapshot.interval;
            }
            if now >= next_heartbeat {
                next_heartbeat = now + self.snapshot.heartbeat;
                if let (Some(info), false) = (&info, full_now) {
                    let h = self.tracker.heartbeat(info, now_micros());
                    self.append_snap(Snap::Host(h));
                }
                // What a round's burst left behind (listing, records, sink
                // buffers) goes back to the system.
                crate::source::heap::trim();
            }
            if now >= next_sweep {
                next_sweep = now + SWEEP_EVERY;
                let committed = *self.journal.committed().borrow();
                let forgotten = self.tracker.sweep(committed);
                if forgotten > 0 {
                    tracing::debug!(
                        forgotten,
                        in_memory = self.tracker.records_in_memory(),
                        "forgot gone domains"
                    );
                }
            }
            if self.overflow.swap(false, Ordering::AcqRel) {
                // One marker per listing cycle: drops before the barrier
                // of the listing asked for are covered by this marker and
                // repaired by that listing; drops after the barrier was
                // queued are found when its listing arrives and get a
                // marker after that round (see `Item::Resync` below).
                if !overflow_marked {
                    overflow_marked = true;
                    let o = self.tracker.gap(GapCause::QueueOverflow, now_micros());
                    self.emit_gap(o, GapCause::QueueOverflow);
                }
                self.request_resync(true);
            }
            let full = self
                .journal
                .rejects_new(self.tracker.opts.max_journal_bytes);
            if !full && full_gap_pending {
                full_gap_pending = false;
                let o = self.tracker.gap(GapCause::JournalFull, now_micros());
                self.emit_gap(o, GapCause::JournalFull);
                self.request_resync(true);
            }
            let stopping = self.stop.load(Ordering::Relaxed);
            let item = if stopping {
                // The stage before passes on what it holds, then hangs up
                // (a fetch it is in ends at the latest when libvirt's
                // keepalive gives the connection up).
                match self.items.recv_timeout(STOP_WAIT) {
                    Ok(item) => item,
                    Err(RecvTimeoutError::Timeout) => {
                        tracing::warn!(waited = ?STOP_WAIT, "the enricher did not hand over its last items; stopping without them");
                        break;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match self.items.recv_timeout(Duration::from_millis(100)) {
                    Ok(item) => item,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            match item {
                Item::Event(raw) => {
                    if full {
                        if !full_gap_pending {
                            tracing::error!(
                                backlog_bytes = self.journal.backlog_bytes(),
                                max_bytes = self.tracker.opts.max_journal_bytes,
                                "journal full: not journaling new events until sinks catch up (a gap marker and a reconcile follow)"
                            );
                        }
                        full_gap_pending = true;
                        journal_loss_in_listing |= barrier_drops.is_some();
                        self.metrics.journal_full_drops.inc();
                        continue;
                    }
                    self.recall(&raw.uuid);
                    let o = self.tracker.on_event(&raw);
                    self.metrics.count_received(o.event.event.as_str());
                    self.append(o);
                }
                Item::Hook(hook) => {
                    if full {
                        full_gap_pending = true;
                        journal_loss_in_listing |= barrier_drops.is_some();
                        self.metrics.journal_full_drops.inc();
                        continue;
                    }
                    self.recall(&hook.uuid);
                    let o = self.tracker.on_hook(&hook);
                    self.metrics.count_received(o.event.event.as_str());
                    self.append(o);
                }
                Item::Resync {
                    listing,
                    observed_at,
                    info: host,
                } => {
                    if full {
                        // Reconcile and round wait for space: the gap marker
                        // that follows asks for a new listing then.
                        self.tracker.cancel_listing();
                        barrier_drops = None;
                        journal_loss_in_listing = false;
                        full_gap_pending = true;
                        self.metrics.journal_full_drops.inc();
                        info = Some(host);
                        continue;
                    }
                    let started = Instant::now();
                    for (uuid, _) in &listing {
                        self.recall(uuid);
                    }
                    let outs = self.tracker.on_resync(&listing, observed_at);
                    let changes = outs.len();
                    self.metrics.reconcile_events.inc_by(outs.len() as u64);
                    for o in outs {
                        self.append(o);
                    }
                    self.metrics
                        .domains_tracked
                        .set(self.tracker.domain_count() as i64);
                    // Every listing is followed by a complete round.
                    let snaps = self.tracker.round(&listing, &host, observed_at);
                    let domains = listing.len();
                    drop(listing);
                    let records = snaps.len();
                    for s in snaps {
                        self.append_snap(s);
                    }
                    crate::source::heap::trim();
                    self.metrics.snapshot_rounds.inc();
                    // Losses while the listing was under way: the round may
                    // miss them, so a marker follows it, and a new listing.
                    let dropped_since = barrier_drops
                        .take()
                        .is_some_and(|d| self.metrics.events_dropped.get() > d);
                    overflow_marked = dropped_since;
                    if dropped_since {
                        let o = self.tracker.gap(GapCause::QueueOverflow, now_micros());
                        self.emit_gap(o, GapCause::QueueOverflow);
                        self.request_resync(true);
                    }
                    if std::mem::take(&mut journal_loss_in_listing) {
                        full_gap_pending = true;
                    }
                    tracing::info!(
                        domains,
                        changes,
                        snapshot_records = records,
                        took = ?started.elapsed(),
                        "reconciled with libvirt listing; snapshot round journaled"
                    );
                    info = Some(host);
                    next_round = Instant::now() + self.snapshot.interval;
                    next_heartbeat = Instant::now() + self.snapshot.heartbeat;
                }
                Item::ListingBegin { dropped } => {
                    barrier_drops = Some(dropped);
                    journal_loss_in_listing = false;
                    self.tracker.begin_listing();
                }
                Item::StaleSnapshots(uuids) => {
                    if self.tracker.seed_stale(uuids) > 0 {
                        // The round that settles them comes soon.
                        self.request_resync(false);
                    }
                }
                Item::Disconnected { observed_at } => {
                    self.tracker.cancel_listing();
                    barrier_drops = None;
                    journal_loss_in_listing = false;
                    overflow_marked = false;
                    let o = self.tracker.gap(GapCause::Disconnected, observed_at);
                    self.emit_gap(o, GapCause::Disconnected);
                }
            }
        }
        if let Err(e) = self.journal.sync() {
            tracing::error!(error = %e, "final journal sync failed");
        }
    }

    /// Restores a domain's record from the journal when the tracker
    /// forgot it (see `Tracker::sweep`), so its `seq` continues.
    fn recall(&mut self, uuid: &str) {
        if self.tracker.knows(uuid) {
            return;
        }
        match self.journal.domain_record(uuid) {
            Ok(Some(raw)) => match serde_json::from_slice::<DomainRecord>(&raw) {
                Ok(r) => self.tracker.restore(uuid, r),
                Err(e) => {
                    tracing::warn!(uuid, error = %e, "unreadable tracker record in journal; domain seq restarts")
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(uuid, error = %e, "reading a tracker record from the journal failed")
            }
        }
    }

    /// Asks the source for a listing; `full` after gaps (config changes
    /// may have been missed), light for periodic rounds.
    fn request_resync(&self, full: bool) {
        self.resync.request(full);
    }

    fn emit_gap(&mut self, o: Output, cause: GapCause) {
        tracing::warn!(
            cause = cause.label(),
            host_seq = o.event.host_seq,
            "gap marker: events may have been lost"
        );
        self.metrics.count_gap(cause.label());
        self.append(o);
    }

    fn append_snap(&mut self, s: Snap) {
        let (entry, record) = match s {
            Snap::Host(h) => (
                Entry {
                    host_seq: h.host_seq,
                    kind: Kind::HostSnapshot,
                    key: HOST_UUID.to_string(),
                    observed_at: h.observed_at,
                    payload: codec::encode_host_snapshot(&h),
                },
                None,
            ),
            Snap::Domain(d, record) => (
                Entry {
                    host_seq: d.host_seq,
                    kind: Kind::DomainSnapshot,
                    key: d.domain.uuid.clone(),
                    observed_at: d.observed_at,
                    payload: codec::encode_domain_snapshot(&d),
                },
                record,
            ),
            Snap::Tombstone {
                uuid,
                host_seq,
                observed_at,
                record,
            } => (
                Entry {
                    host_seq,
                    kind: Kind::DomainTombstone,
                    key: uuid,
                    observed_at,
                    payload: Vec::new(),
                },
                record,
            ),
        };
        let host_seq = entry.host_seq;
        let record =
            record.map(|(uuid, r)| (uuid, serde_json::to_vec(&r).expect("record serializes")));
        if let Err(e) = self.journal.append(entry, record) {
            tracing::error!(error = %e, host_seq, "journal closed; entry not appended");
        }
    }

    fn append(&mut self, o: Output) {
        let entry = Entry {
            host_seq: o.event.host_seq,
            kind: Kind::DomainEvent,
            key: o.event.domain.uuid.clone(),
            observed_at: o.event.observed_at,
            payload: codec::encode_event(&o.event),
        };
        let record = o
            .record
            .map(|(uuid, r)| (uuid, serde_json::to_vec(&r).expect("record serializes")));
        if let Err(e) = self.journal.append(entry, record) {
            // Only happens when the writer thread is gone (shutdown).
            tracing::error!(error = %e, host_seq = o.event.host_seq, "journal closed; entry not appended");
        }
    }
}
