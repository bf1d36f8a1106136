//! The tracker: one state machine per (host, domain). Turns raw libvirt
//! callbacks, reconcile listings and connection changes into `DomainEvent`
//! messages with state-after, sequence numbers and enrichment, and hands
//! them to the journal. It never calls libvirt: the facts an event cannot
//! tell come attached to it (`source::enrich`) or from what it knew.
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
//!   (`Tracker::sweep`), restored from there when it returns.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::config::XmlMode;
use crate::journal::{Entry, Journal, Kind};
use crate::model::{
    event_id, Detail, DomainEvent, DomainRef, DomainSnapshot, DomainState, EventType, HostInfo,
    HostSnapshot, HostSnapshotKind, Origin, StateReason, AGENT_VERSION, HOST_UUID,
};
use crate::telemetry::Metrics;

mod stale;

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

/// Why a gap marker is emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapCause {
    Disconnected,
    QueueOverflow,
    JournalFull,
    AgentRestart,
    /// The journal was found behind the bus (restored from a backup or a
    /// VM snapshot) and a new epoch began. Same `Detail` as
    /// `AgentRestart` (no new schema symbol); its own metric label.
    JournalRestored,
}

impl GapCause {
    fn detail(self) -> Detail {
        match self {
            GapCause::Disconnected => Detail::DISCONNECTED,
            GapCause::QueueOverflow => Detail::QUEUE_OVERFLOW,
            GapCause::JournalFull => Detail::JOURNAL_FULL,
            GapCause::AgentRestart | GapCause::JournalRestored => Detail::AGENT_RESTART,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            GapCause::Disconnected => "disconnected",
            GapCause::QueueOverflow => "queue_overflow",
            GapCause::JournalFull => "journal_full",
            GapCause::AgentRestart => "agent_restart",
            GapCause::JournalRestored => "journal_restored",
        }
    }
}

/// Items on the hand-off queue, in the order the tracker must see them.
#[derive(Debug, Clone)]
pub enum Item {
    /// Boxed so the queue's slots stay small (the queue preallocates).
    Event(Box<RawEvent>),
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
    /// round tombstones those it does not contain (see `stale.rs`).
    StaleSnapshots(Vec<String>),
}

/// What the events applied since a listing began settled about one
/// domain: the listing may be older than them, so it does not override
/// what they settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Touch {
    /// An event fixed the state (STARTED, SUSPENDED, STOPPED, …).
    pub state: bool,
    /// DEFINED or UNDEFINED fixed the persistence.
    pub persistence: bool,
    /// DEFINED showed the domain exists.
    pub defined: bool,
    /// DEFINED's lookup fixed the configuration (hash, sizes, autostart).
    pub config: bool,
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

/// The tracker's memory of one domain (persisted in the journal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainRecord {
    pub name: String,
    pub id: Option<i32>,
    pub state_code: i32,
    pub reason_code: i32,
    pub persistent: bool,
    pub autostart: Option<bool>,
    pub vcpus: Option<i32>,
    pub memory_kib: Option<i64>,
    pub config_hash: Option<String>,
    pub seq: u64,
    /// In the last complete snapshot round and not tombstoned since: a
    /// round that no longer finds the domain publishes its tombstone.
    #[serde(default)]
    pub in_round: bool,
}

impl DomainRecord {
    pub fn state(&self) -> StateReason {
        StateReason::from_codes(self.state_code, self.reason_code)
    }
    /// Shut off and not persistent: the domain no longer exists on the host.
    pub fn gone(&self) -> bool {
        !self.persistent && DomainState::from_code(self.state_code) == DomainState::SHUTOFF
    }
}

/// The (state, reason) an event leads to, from the event alone. `None`
/// means the event does not change the state (DEFINED, UNDEFINED, REBOOT)
/// or cannot tell it (unknown type). A `None` reason is left to the lookup.
pub fn derive_state(
    event: EventType,
    detail: Detail,
) -> Option<(DomainState, Option<&'static str>)> {
    use Detail as D;
    use DomainState as S;
    // Where libvirt names the reason like the detail (STOPPED/DESTROYED →
    // SHUTOFF/DESTROYED), the detail is the reason; other pairs are listed.
    let named = |s: S| -> (S, Option<&'static str>) {
        let r = detail.as_str();
        let known = detail != D::UNKNOWN && StateReason::named(s, r).reason_code >= 0;
        (s, known.then_some(r))
    };
    let r = match (event, detail) {
        // The destination of an incoming migration is paused until
        // RESUMED/MIGRATED: billing must not count it twice.
        (EventType::STARTED, D::MIGRATED) => (S::PAUSED, Some("MIGRATION")),
        (EventType::STARTED, _) => named(S::RUNNING),
        (EventType::SUSPENDED, D::PAUSED) => (S::PAUSED, Some("USER")),
        (EventType::SUSPENDED, D::MIGRATED) => (S::PAUSED, Some("MIGRATION")),
        (EventType::SUSPENDED, _) => named(S::PAUSED),
        (EventType::RESUMED, _) => named(S::RUNNING),
        (EventType::STOPPED, _) => named(S::SHUTOFF),
        (EventType::SHUTDOWN, _) => (S::SHUTDOWN, Some("USER")),
        (EventType::PMSUSPENDED, _) => (S::PMSUSPENDED, None),
        (EventType::CRASHED, D::CRASHLOADED) => (S::RUNNING, Some("CRASHED")),
        (EventType::CRASHED, _) => named(S::CRASHED),
        (
            EventType::DEFINED
            | EventType::UNDEFINED
            | EventType::REBOOT
            | EventType::GAP
            | EventType::UNKNOWN,
            _,
        ) => return None,
    };
    Some(r)
}

/// A listing's facts for a domain that events touched since the listing
/// began: what those events settled (state, persistence) is the tracker's,
/// the rest is the listing's.
fn merge_touched(rec: &DomainRecord, listed: &Facts, touch: Touch) -> Facts {
    let mut f = listed.clone();
    if touch.state {
        f.state = rec.state();
        f.id = rec.id;
    }
    if touch.persistence {
        f.persistent = rec.persistent;
        if !rec.persistent {
            f.autostart = Some(false);
        }
    }
    if touch.config {
        // A (re)definition after the listing read: its configuration is
        // newer than the listed one.
        f.config_hash = rec.config_hash.clone();
        f.vcpus = rec.vcpus;
        f.memory_kib = rec.memory_kib;
        f.autostart = rec.autostart;
        f.xml = None;
    }
    f
}

/// The event a reconcile emits to bring a consumer to `facts`' state.
fn reconcile_event(prev: Option<&DomainRecord>, facts: &Facts) -> Option<(EventType, Detail)> {
    let live = prev.filter(|p| !p.gone());
    let target = facts.state.state;
    let by_state = || -> (EventType, Detail) {
        let reason = facts.state.reason.as_str();
        match target {
            DomainState::RUNNING | DomainState::BLOCKED | DomainState::NOSTATE => {
                let d = match reason {
                    "MIGRATED" => Detail::MIGRATED,
                    "RESTORED" => Detail::RESTORED,
                    "FROM_SNAPSHOT" => Detail::FROM_SNAPSHOT,
                    "WAKEUP" => Detail::WAKEUP,
                    "UNPAUSED" | "MIGRATION_CANCELED" | "SAVE_CANCELED" => Detail::UNPAUSED,
                    _ => Detail::BOOTED,
                };
                let from_paused = live.is_some_and(|p| {
                    matches!(DomainState::from_code(p.state_code), DomainState::PAUSED)
                });
                if from_paused {
                    (
                        EventType::RESUMED,
                        if d == Detail::MIGRATED {
                            d
                        } else {
                            Detail::UNPAUSED
                        },
                    )
                } else {
                    (
                        EventType::STARTED,
                        if d == Detail::UNPAUSED {
                            Detail::BOOTED
                        } else {
                            d
                        },
                    )
                }
            }
            DomainState::PAUSED => (
                EventType::SUSPENDED,
                match reason {
                    "MIGRATION" => Detail::MIGRATED,
                    "IOERROR" => Detail::IOERROR,
                    "WATCHDOG" => Detail::WATCHDOG,
                    "FROM_SNAPSHOT" => Detail::FROM_SNAPSHOT,
                    "API_ERROR" => Detail::API_ERROR,
                    "POSTCOPY" => Detail::POSTCOPY,
                    "POSTCOPY_FAILED" => Detail::POSTCOPY_FAILED,
                    _ => Detail::PAUSED,
                },
            ),
            DomainState::SHUTDOWN => (EventType::SHUTDOWN, Detail::FINISHED),
            DomainState::SHUTOFF => (
                EventType::STOPPED,
                match reason {
                    "SHUTDOWN" => Detail::SHUTDOWN,
                    "DESTROYED" => Detail::DESTROYED,
                    "CRASHED" => Detail::CRASHED,
                    "MIGRATED" => Detail::MIGRATED,
                    "SAVED" => Detail::SAVED,
                    "FAILED" | "DAEMON" => Detail::FAILED,
                    "FROM_SNAPSHOT" => Detail::FROM_SNAPSHOT,
                    _ => Detail::UNKNOWN,
                },
            ),
            DomainState::CRASHED => (EventType::CRASHED, Detail::PANICKED),
            DomainState::PMSUSPENDED => (EventType::PMSUSPENDED, Detail::MEMORY),
            DomainState::UNKNOWN => (EventType::UNKNOWN, Detail::UNKNOWN),
        }
    };
    match live {
        None if target == DomainState::SHUTOFF => Some((EventType::DEFINED, Detail::ADDED)),
        None => Some(by_state()),
        Some(p) if DomainState::from_code(p.state_code) != target => Some(by_state()),
        Some(p) if p.persistent != facts.persistent => Some(if facts.persistent {
            (EventType::DEFINED, Detail::ADDED)
        } else {
            (EventType::UNDEFINED, Detail::REMOVED)
        }),
        Some(p) if facts.config_hash.is_some() && p.config_hash != facts.config_hash => {
            Some((EventType::DEFINED, Detail::UPDATED))
        }
        Some(_) => None,
    }
}

/// Tracker settings.
#[derive(Debug, Clone)]
pub struct TrackerOptions {
    pub xml: XmlMode,
    /// Journal payload bound; new events are not journaled beyond it.
    pub max_journal_bytes: u64,
}

/// One message produced by the tracker, with the domain record it leaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub event: DomainEvent,
    pub record: Option<(String, DomainRecord)>,
}

/// The per-host state machine (pure logic; `run` adds the queue and journal).
pub struct Tracker {
    host_id: String,
    epoch: String,
    host_seq: u64,
    domains: HashMap<String, DomainRecord>,
    opts: TrackerOptions,
    /// snapshot_id and domain count of the last complete round (carried
    /// by heartbeats, so a reader of the compacted snapshot stream can tell
    /// whether it holds all of that round).
    last_round: Option<(String, usize)>,
    /// Between `begin_listing` and the round after the listing: the
    /// domains events touched since the listing began.
    barrier: Option<HashMap<String, Touch>>,
    /// Gone domains (not in a round, so no tombstone pending) seen by the
    /// last sweep, with their seq, and the host_seq every write of their
    /// records is at or below: forgotten from memory once the journal has
    /// committed that far (`sweep`).
    forget: (Vec<(String, u64)>, u64),
    /// Domains an earlier epoch left as the latest snapshot record on a
    /// bus (`Item::StaleSnapshots`), waiting for the next complete round.
    stale: HashSet<String>,
}

/// A snapshot-round or heartbeat record, with the domain record it updates.
#[derive(Debug, Clone, PartialEq)]
pub enum Snap {
    Host(HostSnapshot),
    Domain(DomainSnapshot, Option<(String, DomainRecord)>),
    /// The domain left the host (seen by a complete round): its snapshot is
    /// deleted (null value on Kafka, tombstone header on NATS). No record
    /// for a domain only an earlier epoch knew (`Item::StaleSnapshots`).
    Tombstone {
        uuid: String,
        host_seq: u64,
        observed_at: i64,
        record: Option<(String, DomainRecord)>,
    },
}

impl Snap {
    pub fn host_seq(&self) -> u64 {
        match self {
            Snap::Host(h) => h.host_seq,
            Snap::Domain(d, _) => d.host_seq,
            Snap::Tombstone { host_seq, .. } => *host_seq,
        }
    }
}

impl Tracker {
    pub fn new(
        host_id: String,
        epoch: String,
        host_seq: u64,
        domains: HashMap<String, DomainRecord>,
        opts: TrackerOptions,
    ) -> Self {
        Tracker {
            host_id,
            epoch,
            host_seq,
            domains,
            opts,
            last_round: None,
            barrier: None,
            forget: (Vec::new(), 0),
            stale: HashSet::new(),
        }
    }

    fn host_snapshot(
        &mut self,
        kind: HostSnapshotKind,
        snapshot_id: Option<String>,
        domain_count: usize,
        info: &HostInfo,
        observed_at: i64,
    ) -> HostSnapshot {
        let host_seq = self.next_host_seq();
        HostSnapshot {
            event_id: event_id(&self.host_id, &self.epoch, host_seq),
            host_id: self.host_id.clone(),
            epoch: self.epoch.clone(),
            host_seq,
            kind,
            snapshot_id,
            domain_count: i32::try_from(domain_count).unwrap_or(i32::MAX),
            host_seq_watermark: host_seq - 1,
            info: info.clone(),
            agent_version: AGENT_VERSION.to_string(),
            observed_at,
        }
    }

    /// A heartbeat: the host_seq high-water mark and the last complete
    /// round (its snapshot_id and domain count; the current domain count
    /// before any round), so consumers notice silence and gaps on quiet
    /// hosts.
    pub fn heartbeat(&mut self, info: &HostInfo, observed_at: i64) -> HostSnapshot {
        let (last, n) = match self.last_round.clone() {
            Some((id, n)) => (Some(id), n),
            None => (None, self.domain_count()),
        };
        self.host_snapshot(HostSnapshotKind::HEARTBEAT, last, n, info, observed_at)
    }

    /// A complete snapshot round: ROUND_BEGIN, one DomainSnapshot per
    /// domain the tracker holds live, ROUND_END, then a tombstone for every
    /// domain of the previous complete round that this one no longer has.
    /// Call it right after [`Tracker::on_resync`] with the same listing:
    /// the records then are libvirt's truth as the listing + watch rule
    /// leaves it (a domain an event changed after the listing began is
    /// snapshotted as the event left it, not as listed). The listing
    /// supplies only the XML of domains no event touched. Ends the
    /// listing's barrier.
    pub fn round(
        &mut self,
        listing: &[(String, Facts)],
        info: &HostInfo,
        observed_at: i64,
    ) -> Vec<Snap> {
        let barrier = self.barrier.take().unwrap_or_default();
        let live = |d: &HashMap<String, DomainRecord>, u: &str| d.get(u).is_some_and(|r| !r.gone());
        // Listing order first, then live domains the listing could not
        // show (created after it was read).
        let listed: HashSet<&str> = listing.iter().map(|(u, _)| u.as_str()).collect();
        let mut uuids: Vec<(String, Option<&Facts>)> = listing
            .iter()
            .filter(|(u, _)| live(&self.domains, u))
            .map(|(u, f)| (u.clone(), (!barrier.contains_key(u)).then_some(f)))
            .collect();
        let mut extra: Vec<String> = self
            .domains
            .iter()
            .filter(|(u, r)| !r.gone() && !listed.contains(u.as_str()))
            .map(|(u, _)| u.clone())
            .collect();
        extra.sort();
        uuids.extend(extra.into_iter().map(|u| (u, None)));
        let mut out = Vec::with_capacity(uuids.len() + 2);
        let begin = self.host_snapshot(
            HostSnapshotKind::ROUND_BEGIN,
            None,
            uuids.len(),
            info,
            observed_at,
        );
        let snapshot_id = begin.event_id.clone();
        let mut begin = begin;
        begin.snapshot_id = Some(snapshot_id.clone());
        out.push(Snap::Host(begin));
        let mut present = HashSet::with_capacity(uuids.len());
        for (uuid, facts) in &uuids {
            present.insert(uuid.as_str());
            let host_seq = self.next_host_seq();
            let rec = self.domains.get_mut(uuid).expect("filtered above");
            let update = if rec.in_round {
                None
            } else {
                rec.in_round = true;
                Some((uuid.clone(), rec.clone()))
            };
            let snap = DomainSnapshot {
                event_id: event_id(&self.host_id, &self.epoch, host_seq),
                host_id: self.host_id.clone(),
                epoch: self.epoch.clone(),
                host_seq,
                snapshot_id: snapshot_id.clone(),
                seq: rec.seq,
                domain: DomainRef {
                    uuid: uuid.clone(),
                    name: facts.map_or_else(|| rec.name.clone(), |f| f.name.clone()),
                    id: facts.map_or(rec.id, |f| f.id),
                },
                // Untouched: the listing, which on_resync just matched.
                state: facts.map_or_else(|| rec.state(), |f| f.state.clone()),
                persistent: facts.map_or(rec.persistent, |f| f.persistent),
                autostart: facts.map_or(rec.autostart, |f| f.autostart),
                vcpus: facts.and_then(|f| f.vcpus).or(rec.vcpus),
                memory_kib: facts.and_then(|f| f.memory_kib).or(rec.memory_kib),
                config_hash: facts
                    .and_then(|f| f.config_hash.clone())
                    .or_else(|| rec.config_hash.clone()),
                observed_at,
                xml: if self.opts.xml == XmlMode::Off {
                    None
                } else {
                    facts.and_then(|f| f.xml.clone())
                },
            };
            out.push(Snap::Domain(snap, update));
        }
        let n = present.len();
        let end = self.host_snapshot(
            HostSnapshotKind::ROUND_END,
            Some(snapshot_id.clone()),
            n,
            info,
            observed_at,
        );
        out.push(Snap::Host(end));
        // The round is complete: what it no longer has has left the host.
        let mut left: Vec<String> = self
            .domains
            .iter()
            .filter(|(u, r)| r.in_round && !present.contains(u.as_str()))
            .map(|(u, _)| u.clone())
            .collect();
        left.sort();
        for uuid in left {
            let host_seq = self.next_host_seq();
            let rec = self.domains.get_mut(&uuid).expect("listed above");
            rec.in_round = false;
            let record = Some((uuid.clone(), rec.clone()));
            out.push(Snap::Tombstone {
                uuid,
                host_seq,
                observed_at,
                record,
            });
        }
        self.stale_tombstones(&present, observed_at, &mut out);
        self.last_round = Some((snapshot_id, n));
        out
    }

    pub fn host_seq(&self) -> u64 {
        self.host_seq
    }

    /// Whether the tracker holds `uuid` in memory.
    pub fn knows(&self, uuid: &str) -> bool {
        self.domains.contains_key(uuid)
    }

    /// Puts back the journaled record of a domain `sweep` forgot (it came
    /// back): its `seq` continues.
    pub fn restore(&mut self, uuid: &str, record: DomainRecord) {
        self.domains.entry(uuid.to_string()).or_insert(record);
    }

    /// Bounds memory under transient-domain churn: forgets the gone domains
    /// found by the previous sweep once `committed` (the journal's durable
    /// host_seq) covers every write of their records, then notes the gone
    /// domains of now for the next sweep. A forgotten domain that returns
    /// is restored from the journal (`restore`), so its `seq` continues.
    /// Returns how many records were forgotten.
    pub fn sweep(&mut self, committed: u64) -> usize {
        let mut forgotten = 0;
        if committed >= self.forget.1 {
            for (uuid, seq) in std::mem::take(&mut self.forget.0) {
                let unchanged = self
                    .domains
                    .get(&uuid)
                    .is_some_and(|r| r.gone() && !r.in_round && r.seq == seq);
                if unchanged {
                    self.domains.remove(&uuid);
                    forgotten += 1;
                }
            }
            self.forget.0 = self
                .domains
                .iter()
                .filter(|(_, r)| r.gone() && !r.in_round)
                .map(|(u, r)| (u.clone(), r.seq))
                .collect();
            self.forget.1 = self.host_seq;
            if forgotten > 0 {
                self.domains.shrink_to_fit();
            }
        }
        forgotten
    }

    /// Domain records held in memory (live and not yet forgotten).
    pub fn records_in_memory(&self) -> usize {
        self.domains.len()
    }

    pub fn domain(&self, uuid: &str) -> Option<&DomainRecord> {
        self.domains.get(uuid)
    }

    pub fn domain_count(&self) -> usize {
        self.domains.values().filter(|d| !d.gone()).count()
    }

    fn next_host_seq(&mut self) -> u64 {
        self.host_seq += 1;
        self.host_seq
    }

    /// A gap marker: host-level, seq 0.
    pub fn gap(&mut self, cause: GapCause, observed_at: i64) -> Output {
        let host_seq = self.next_host_seq();
        Output {
            event: DomainEvent {
                event_id: event_id(&self.host_id, &self.epoch, host_seq),
                host_id: self.host_id.clone(),
                epoch: self.epoch.clone(),
                host_seq,
                seq: 0,
                domain: DomainRef {
                    uuid: HOST_UUID.to_string(),
                    name: String::new(),
                    id: None,
                },
                event: EventType::GAP,
                libvirt_event_id: crate::model::event_id::NONE,
                event_code: -1,
                detail: cause.detail(),
                detail_code: -1,
                origin: Origin::AGENT,
                state_after: StateReason::from_codes(-1, -1),
                persistent: false,
                autostart: None,
                vcpus: None,
                memory_kib: None,
                config_hash: None,
                observed_at,
                xml: None,
            },
            record: None,
        }
    }

    /// One libvirt callback.
    pub fn on_event(&mut self, raw: &RawEvent) -> Output {
        let (event, detail) = EventType::classify(raw.event_id, raw.type_code, raw.detail_code);
        let prev = self.domains.get(&raw.uuid).cloned();
        let live = prev.as_ref().filter(|p| !p.gone());
        let derived = derive_state(event, detail);

        // Persistence follows DEFINED/UNDEFINED; otherwise what we knew.
        let known_persistent = match event {
            EventType::DEFINED => Some(true),
            EventType::UNDEFINED => Some(false),
            _ => live.map(|p| p.persistent),
        };
        // Will the domain still exist after this event?
        let ends_up_gone = match (event, derived) {
            (EventType::UNDEFINED, _) => {
                live.is_none_or(|p| p.state().state == DomainState::SHUTOFF)
            }
            (_, Some((DomainState::SHUTOFF, _))) => known_persistent == Some(false),
            _ => false,
        };
        // What the enricher fetched (never for a known domain's plain
        // transition): it fills what the event cannot tell.
        let facts = if ends_up_gone {
            None
        } else {
            raw.facts.as_deref()
        };

        let state = match derived {
            Some((s, Some(reason))) => StateReason::named(s, reason),
            Some((s, None)) => match facts {
                Some(f) if f.state.state == s => f.state.clone(),
                _ => StateReason::named(s, "UNKNOWN"),
            },
            None => match (live, facts) {
                (Some(p), _) => p.state(),
                (None, _) if matches!(event, EventType::DEFINED | EventType::UNDEFINED) => {
                    StateReason::named(DomainState::SHUTOFF, "UNKNOWN")
                }
                (None, _) if event == EventType::REBOOT => {
                    StateReason::named(DomainState::RUNNING, "UNKNOWN")
                }
                (None, Some(f)) => f.state.clone(),
                (None, None) => StateReason::from_codes(-1, -1),
            },
        };
        let persistent = known_persistent
            .or(facts.map(|f| f.persistent))
            .unwrap_or(false);
        let id = if state.state == DomainState::SHUTOFF {
            None
        } else {
            raw.id.or(live.and_then(|p| p.id))
        };
        let pick = |f: Option<&Facts>,
                    p: Option<&DomainRecord>|
         -> (Option<bool>, Option<i32>, Option<i64>, Option<String>) {
            match (f, p) {
                (Some(f), p) => (
                    f.autostart,
                    f.vcpus,
                    f.memory_kib,
                    f.config_hash
                        .clone()
                        .or(p.and_then(|p| p.config_hash.clone())),
                ),
                (None, Some(p)) => (p.autostart, p.vcpus, p.memory_kib, p.config_hash.clone()),
                (None, None) => (None, None, None, None),
            }
        };
        let (autostart, vcpus, memory_kib, config_hash) = pick(facts, prev.as_ref());
        // A domain that is not persistent does not autostart (UNDEFINED of
        // a running domain carries no facts).
        let autostart = if persistent { autostart } else { Some(false) };
        let xml = self.xml_for(prev.as_ref(), facts, &config_hash);
        let seq = prev.as_ref().map_or(0, |p| p.seq) + 1;
        let record = DomainRecord {
            name: raw.name.clone(),
            id,
            state_code: state.state_code,
            reason_code: state.reason_code,
            persistent,
            autostart,
            vcpus,
            memory_kib,
            config_hash: config_hash.clone(),
            seq,
            in_round: prev.as_ref().is_some_and(|p| p.in_round),
        };
        let host_seq = self.next_host_seq();
        let out = DomainEvent {
            event_id: event_id(&self.host_id, &self.epoch, host_seq),
            host_id: self.host_id.clone(),
            epoch: self.epoch.clone(),
            host_seq,
            seq,
            domain: DomainRef {
                uuid: raw.uuid.clone(),
                name: raw.name.clone(),
                id,
            },
            event,
            libvirt_event_id: raw.event_id,
            event_code: raw.type_code,
            detail,
            detail_code: raw.detail_code,
            origin: Origin::LIBVIRT,
            state_after: state,
            persistent,
            autostart,
            vcpus,
            memory_kib,
            config_hash,
            observed_at: raw.observed_at,
            xml,
        };
        let had_facts = facts.is_some();
        self.domains.insert(raw.uuid.clone(), record.clone());
        if let Some(barrier) = self.barrier.as_mut() {
            let t = barrier.entry(raw.uuid.clone()).or_default();
            t.state |= derived.is_some();
            t.persistence |= matches!(event, EventType::DEFINED | EventType::UNDEFINED);
            t.defined |= event == EventType::DEFINED;
            t.config |= event == EventType::DEFINED && had_facts;
        }
        Output {
            event: out,
            record: Some((raw.uuid.clone(), record)),
        }
    }

    /// The barrier of a list + watch: a listing begins now. Events applied
    /// from here on until the round after the listing are remembered, and
    /// the listing does not override what they settled.
    pub fn begin_listing(&mut self) {
        self.barrier = Some(HashMap::new());
    }

    /// The listing that began will not come (disconnect, full journal).
    pub fn cancel_listing(&mut self) {
        self.barrier = None;
    }

    /// What events settled about `uuid` since the listing began.
    fn touch(&self, uuid: &str) -> Option<Touch> {
        self.barrier.as_ref().and_then(|b| b.get(uuid)).copied()
    }

    fn xml_for(
        &self,
        prev: Option<&DomainRecord>,
        facts: Option<&Facts>,
        hash: &Option<String>,
    ) -> Option<String> {
        match self.opts.xml {
            XmlMode::Off => None,
            XmlMode::Always => facts.and_then(|f| f.xml.clone()),
            XmlMode::OnChange => {
                if prev.and_then(|p| p.config_hash.as_ref()) != hash.as_ref() {
                    facts.and_then(|f| f.xml.clone())
                } else {
                    None
                }
            }
        }
    }

    /// A complete listing: RECONCILE events for every difference from what
    /// the tracker last knew, including domains that vanished.
    ///
    /// The listing may be older than events applied since the listing
    /// began (`begin_listing`): for a domain they touched, the state an
    /// event fixed, and the persistence DEFINED/UNDEFINED fixed, are kept;
    /// the listing only repairs what those events could not tell. A domain
    /// the listing lacks is vanished unless such an event shows it exists
    /// (it came after the listing read).
    pub fn on_resync(&mut self, listing: &[(String, Facts)], observed_at: i64) -> Vec<Output> {
        let mut out = Vec::new();
        let mut seen = HashSet::with_capacity(listing.len());
        for (uuid, listed) in listing {
            seen.insert(uuid.as_str());
            let prev = self.domains.get(uuid).cloned();
            let merged;
            let facts = match (self.touch(uuid), prev.as_ref()) {
                (Some(t), Some(p)) => {
                    merged = merge_touched(p, listed, t);
                    &merged
                }
                _ => listed,
            };
            let target_gone = !facts.persistent && facts.state.state == DomainState::SHUTOFF;
            if target_gone {
                // Only a merge leads here (libvirt lists no gone domain):
                // an event after the listing ended what the listing showed.
                if let Some(p) = prev.filter(|p| !p.gone()) {
                    out.push(self.vanish(uuid, p, observed_at));
                }
                continue;
            }
            let Some((event, detail)) = reconcile_event(prev.as_ref(), facts) else {
                continue;
            };
            let xml = self.xml_for(prev.as_ref(), Some(facts), &facts.config_hash);
            let record = DomainRecord {
                name: facts.name.clone(),
                id: facts.id,
                state_code: facts.state.state_code,
                reason_code: facts.state.reason_code,
                persistent: facts.persistent,
                autostart: facts.autostart,
                vcpus: facts.vcpus.or(prev.as_ref().and_then(|p| p.vcpus)),
                memory_kib: facts
                    .memory_kib
                    .or(prev.as_ref().and_then(|p| p.memory_kib)),
                // A light listing has no config hash: keep the known one.
                config_hash: facts
                    .config_hash
                    .clone()
                    .or_else(|| prev.as_ref().and_then(|p| p.config_hash.clone())),
                seq: prev.as_ref().map_or(0, |p| p.seq) + 1,
                in_round: prev.as_ref().is_some_and(|p| p.in_round),
            };
            out.push(self.reconcile_output(uuid, record, event, detail, observed_at, xml));
        }
        let mut vanished: Vec<(String, DomainRecord)> = self
            .domains
            .iter()
            .filter(|(u, d)| !d.gone() && !seen.contains(u.as_str()))
            .filter(|(u, _)| !self.touch(u).is_some_and(|t| t.state || t.defined))
            .map(|(u, d)| (u.clone(), d.clone()))
            .collect();
        vanished.sort_by(|a, b| a.0.cmp(&b.0));
        for (uuid, prev) in vanished {
            out.push(self.vanish(&uuid, prev, observed_at));
        }
        out
    }

    /// The RECONCILE event of a domain that left the host.
    fn vanish(&mut self, uuid: &str, prev: DomainRecord, observed_at: i64) -> Output {
        let (event, detail) = if prev.persistent {
            (EventType::UNDEFINED, Detail::REMOVED)
        } else {
            (EventType::STOPPED, Detail::UNKNOWN)
        };
        let state = StateReason::named(DomainState::SHUTOFF, "UNKNOWN");
        let record = DomainRecord {
            id: None,
            state_code: state.state_code,
            reason_code: state.reason_code,
            persistent: false,
            seq: prev.seq + 1,
            ..prev
        };
        self.reconcile_output(uuid, record, event, detail, observed_at, None)
    }

    fn reconcile_output(
        &mut self,
        uuid: &str,
        record: DomainRecord,
        event: EventType,
        detail: Detail,
        observed_at: i64,
        xml: Option<String>,
    ) -> Output {
        let host_seq = self.next_host_seq();
        let state = record.state();
        let ev = DomainEvent {
            event_id: event_id(&self.host_id, &self.epoch, host_seq),
            host_id: self.host_id.clone(),
            epoch: self.epoch.clone(),
            host_seq,
            seq: record.seq,
            domain: DomainRef {
                uuid: uuid.to_string(),
                name: record.name.clone(),
                id: record.id,
            },
            event,
            libvirt_event_id: crate::model::event_id::NONE,
            event_code: event.lifecycle_code().unwrap_or(-1),
            detail,
            detail_code: detail.code(event),
            origin: Origin::RECONCILE,
            state_after: state,
            persistent: record.persistent,
            autostart: record.autostart,
            vcpus: record.vcpus,
            memory_kib: record.memory_kib,
            config_hash: record.config_hash.clone(),
            observed_at,
            xml,
        };
        self.domains.insert(uuid.to_string(), record.clone());
        Output {
            event: ev,
            record: Some((uuid.to_string(), record)),
        }
    }
}

/// Decodes the domain records the journal recovered. Gone domains with no
/// tombstone pending stay in the journal only (restored if they return).
pub fn decode_records(raw: &HashMap<String, Vec<u8>>) -> HashMap<String, DomainRecord> {
    raw.iter()
        .filter_map(|(k, v)| match serde_json::from_slice::<DomainRecord>(v) {
            Ok(r) if r.gone() && !r.in_round => None,
            Ok(r) => Some((k.clone(), r)),
            Err(e) => {
                // The domain's seq restarts from the journal's view; a
                // reconcile repairs its state. Never fatal.
                tracing::warn!(uuid = %k, error = %e, "unreadable tracker record in journal; domain will be reconciled");
                None
            }
        })
        .collect()
}

/// Current time in µs since the Unix epoch.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

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
                crate::source::ffi::trim_heap();
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
                    crate::source::ffi::trim_heap();
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::source::enrich::{EnrichOptions, Enricher, Inspector, LookupError};
    use std::sync::Mutex;

    /// An in-memory inspector for the pure state-machine tests.
    #[derive(Default, Clone)]
    pub struct TableInspector(pub Arc<Mutex<HashMap<String, Facts>>>);

    impl Inspector for TableInspector {
        fn inspect(&self, uuid: &str, _xml: bool) -> Result<Facts, LookupError> {
            self.0
                .lock()
                .unwrap()
                .get(uuid)
                .cloned()
                .ok_or(LookupError::NoDomain)
        }
    }

    /// The tracker behind the enricher, as the agent wires them: events
    /// and listings pass the enricher first.
    pub(crate) struct Enriched {
        pub tracker: Tracker,
        pub enricher: Enricher<TableInspector>,
    }

    impl Enriched {
        pub fn on_event(&mut self, raw: &RawEvent) -> Output {
            let mut items = [Item::Event(Box::new(raw.clone()))];
            self.enricher.enrich(&mut items);
            let [Item::Event(raw)] = items else {
                unreachable!()
            };
            self.tracker.on_event(&raw)
        }

        pub fn begin_listing(&mut self) {
            self.enricher
                .enrich(&mut [Item::ListingBegin { dropped: 0 }]);
            self.tracker.begin_listing();
        }

        pub fn on_resync(&mut self, listing: &[(String, Facts)], observed_at: i64) -> Vec<Output> {
            self.enricher.enrich(&mut [Item::Resync {
                listing: listing.to_vec(),
                observed_at,
                info: HostInfo::default(),
            }]);
            self.tracker.on_resync(listing, observed_at)
        }
    }

    impl std::ops::Deref for Enriched {
        type Target = Tracker;
        fn deref(&self) -> &Tracker {
            &self.tracker
        }
    }

    impl std::ops::DerefMut for Enriched {
        fn deref_mut(&mut self) -> &mut Tracker {
            &mut self.tracker
        }
    }

    pub fn facts(state: DomainState, reason: &str, persistent: bool) -> Facts {
        Facts {
            name: "vm".into(),
            id: Some(3),
            state: StateReason::named(state, reason),
            persistent,
            autostart: Some(false),
            vcpus: Some(2),
            memory_kib: Some(1024),
            config_hash: Some("sha256:aa".into()),
            xml: None,
        }
    }

    pub(crate) fn tracker(table: TableInspector) -> Enriched {
        Enriched {
            tracker: Tracker::new(
                "host-a".into(),
                "e1".into(),
                0,
                HashMap::new(),
                TrackerOptions {
                    xml: XmlMode::Off,
                    max_journal_bytes: u64::MAX,
                },
            ),
            enricher: Enricher::new(
                table,
                EnrichOptions {
                    xml: XmlMode::Off,
                    lookup_attempts: 1,
                },
            ),
        }
    }

    pub(crate) fn raw(uuid: &str, ty: i32, detail: i32) -> RawEvent {
        RawEvent {
            uuid: uuid.into(),
            name: "vm".into(),
            id: Some(3),
            event_id: 0,
            type_code: ty,
            detail_code: detail,
            observed_at: 1,
            facts: None,
        }
    }

    #[test]
    fn every_event_detail_pair_has_a_defined_state_after() {
        // The full table: for each libvirt (type, detail) integer pair, and
        // one past the end of each, the state after is what libvirt's own
        // domstate would report right after that event.
        use DomainState as S;
        let expect = |ty: EventType, d: Detail| -> Option<(S, &str)> {
            Some(match (ty, d) {
                (EventType::STARTED, Detail::MIGRATED) => (S::PAUSED, "MIGRATION"),
                (EventType::STARTED, Detail::BOOTED) => (S::RUNNING, "BOOTED"),
                (EventType::STARTED, Detail::RESTORED) => (S::RUNNING, "RESTORED"),
                (EventType::STARTED, Detail::FROM_SNAPSHOT) => (S::RUNNING, "FROM_SNAPSHOT"),
                (EventType::STARTED, Detail::WAKEUP) => (S::RUNNING, "WAKEUP"),
                (EventType::STARTED, _) => (S::RUNNING, "?"),
                (EventType::SUSPENDED, Detail::PAUSED) => (S::PAUSED, "USER"),
                (EventType::SUSPENDED, Detail::MIGRATED) => (S::PAUSED, "MIGRATION"),
                (EventType::SUSPENDED, Detail::RESTORED | Detail::UNKNOWN) => (S::PAUSED, "?"),
                (EventType::SUSPENDED, d) => (S::PAUSED, d.as_str()),
                (EventType::RESUMED, Detail::UNKNOWN) => (S::RUNNING, "?"),
                (EventType::RESUMED, d) => (S::RUNNING, d.as_str()),
                (EventType::STOPPED, Detail::RECREATED | Detail::UNKNOWN) => (S::SHUTOFF, "?"),
                (EventType::STOPPED, d) => (S::SHUTOFF, d.as_str()),
                (EventType::SHUTDOWN, _) => (S::SHUTDOWN, "USER"),
                (EventType::PMSUSPENDED, _) => (S::PMSUSPENDED, "?"),
                (EventType::CRASHED, Detail::PANICKED) => (S::CRASHED, "PANICKED"),
                (EventType::CRASHED, Detail::CRASHLOADED) => (S::RUNNING, "CRASHED"),
                (EventType::CRASHED, _) => (S::CRASHED, "?"),
                _ => return None,
            })
        };
        let mut checked = 0;
        for ty in 0..=9 {
            let e = EventType::from_lifecycle(ty);
            for dc in 0..=9 {
                let d = Detail::from_code(e, dc);
                let got = derive_state(e, d);
                let want = expect(e, d);
                match (got, want) {
                    (None, None) => {}
                    (Some((s, r)), Some((ws, wr))) => {
                        assert_eq!(s, ws, "{e}/{d}");
                        assert_eq!(r.unwrap_or("?"), wr, "{e}/{d}");
                        // Every named reason exists in libvirt's table for that state.
                        if let Some(r) = r {
                            assert!(StateReason::named(s, r).reason_code >= 0, "{e}/{d}: {r}");
                        }
                    }
                    (g, w) => panic!("{e}/{d}: got {g:?}, want {w:?}"),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 100);
    }

    #[test]
    fn lifecycle_sequence_gives_contiguous_seq_and_right_states() {
        let table = TableInspector::default();
        let mut t = tracker(table.clone());
        let u = "11111111-1111-1111-1111-111111111111";
        table
            .0
            .lock()
            .unwrap()
            .insert(u.into(), facts(DomainState::SHUTOFF, "UNKNOWN", true));
        let steps = [
            (0, 0, DomainState::SHUTOFF, true),  // DEFINED/ADDED
            (2, 0, DomainState::RUNNING, true),  // STARTED/BOOTED
            (3, 0, DomainState::PAUSED, true),   // SUSPENDED/PAUSED
            (4, 0, DomainState::RUNNING, true),  // RESUMED/UNPAUSED
            (5, 1, DomainState::SHUTOFF, true),  // STOPPED/DESTROYED
            (1, 0, DomainState::SHUTOFF, false), // UNDEFINED/REMOVED
        ];
        for (i, (ty, d, state, persistent)) in steps.iter().enumerate() {
            let o = t.on_event(&raw(u, *ty, *d));
            assert_eq!(o.event.seq, i as u64 + 1);
            assert_eq!(o.event.host_seq, i as u64 + 1);
            assert_eq!(o.event.state_after.state, *state, "step {i}");
            assert_eq!(o.event.persistent, *persistent, "step {i}");
            assert_eq!(o.event.origin, Origin::LIBVIRT);
        }
        assert!(t.domain(u).unwrap().gone());
        // The lookup table still says RUNNING-ish facts: they never override.
        table
            .0
            .lock()
            .unwrap()
            .insert(u.into(), facts(DomainState::RUNNING, "BOOTED", true));
        let o = t.on_event(&raw(u, 3, 0));
        assert_eq!(o.event.state_after.state, DomainState::PAUSED);
        assert_eq!(o.event.seq, 7, "a returning UUID continues its seq");
    }

    #[test]
    fn lookup_never_overrides_the_event_derived_state() {
        let table = TableInspector::default();
        let mut t = tracker(table.clone());
        let u = "22222222-2222-2222-2222-222222222222";
        // During a burst the lookup already sees the domain paused again.
        table
            .0
            .lock()
            .unwrap()
            .insert(u.into(), facts(DomainState::PAUSED, "USER", false));
        let o = t.on_event(&raw(u, 4, 0)); // RESUMED/UNPAUSED
        assert_eq!(o.event.state_after.state, DomainState::RUNNING);
        assert_eq!(o.event.state_after.reason, "UNPAUSED");
        assert!(
            !o.event.persistent,
            "persistent filled from the lookup for an unseen domain"
        );
        assert_eq!(o.event.vcpus, Some(2));
    }

    #[test]
    fn transient_stop_means_gone_and_unlookupable_domains_still_publish() {
        let table = TableInspector::default();
        let mut t = tracker(table.clone());
        let u = "33333333-3333-3333-3333-333333333333";
        // STARTED for a domain libvirt cannot find (yet): still published.
        let o = t.on_event(&raw(u, 2, 0));
        assert_eq!(o.event.state_after.state, DomainState::RUNNING);
        assert!(!o.event.persistent);
        assert_eq!(o.event.vcpus, None);
        let o = t.on_event(&raw(u, 5, 1));
        assert_eq!(o.event.state_after.state, DomainState::SHUTOFF);
        assert!(!o.event.persistent);
        assert_eq!(o.event.domain.id, None);
        assert!(t.domain(u).unwrap().gone());
    }

    #[test]
    fn unknown_integers_are_published_as_unknown_with_raw_values() {
        let mut t = tracker(TableInspector::default());
        let u = "44444444-4444-4444-4444-444444444444";
        let o = t.on_event(&raw(u, 42, 7));
        assert_eq!(o.event.event, EventType::UNKNOWN);
        assert_eq!(o.event.detail, Detail::UNKNOWN);
        assert_eq!((o.event.event_code, o.event.detail_code), (42, 7));
        let o = t.on_event(&raw(u, 2, 99)); // STARTED/<new detail>
        assert_eq!(o.event.event, EventType::STARTED);
        assert_eq!(o.event.detail, Detail::UNKNOWN);
        assert_eq!(o.event.detail_code, 99);
        assert_eq!(o.event.state_after.state, DomainState::RUNNING);
        let mut reboot = raw(u, -1, -1);
        reboot.event_id = 1;
        let o = t.on_event(&reboot);
        assert_eq!(
            (o.event.event, o.event.detail),
            (EventType::REBOOT, Detail::NONE)
        );
        assert_eq!(o.event.state_after.state, DomainState::RUNNING);
        let mut other = raw(u, -1, -1);
        other.event_id = 77;
        let o = t.on_event(&other);
        assert_eq!(
            (o.event.event, o.event.libvirt_event_id),
            (EventType::UNKNOWN, 77)
        );
    }

    #[test]
    fn migration_destination_is_paused_until_resumed() {
        let mut t = tracker(TableInspector::default());
        let u = "55555555-5555-5555-5555-555555555555";
        let o = t.on_event(&raw(u, 2, 1)); // STARTED/MIGRATED
        assert_eq!(o.event.state_after.state, DomainState::PAUSED);
        let o = t.on_event(&raw(u, 4, 1)); // RESUMED/MIGRATED
        assert_eq!(o.event.state_after.state, DomainState::RUNNING);
        assert_eq!(o.event.state_after.reason, "MIGRATED");
    }

    #[test]
    fn rounds_snapshot_every_domain_and_delete_only_after_a_complete_round() {
        let mut t = tracker(TableInspector::default());
        let info = HostInfo {
            libvirt_uri: "test:///default".into(),
            libvirt_driver: "TEST".into(),
            libvirt_version: "9.0.0".into(),
            accepted_event_ids: vec!["LIFECYCLE".into()],
        };
        let a = "aaaaaaaa-0000-0000-0000-000000000000".to_string();
        let b = "bbbbbbbb-0000-0000-0000-000000000000".to_string();
        let listing = vec![
            (a.clone(), facts(DomainState::RUNNING, "BOOTED", true)),
            (b.clone(), facts(DomainState::PAUSED, "USER", false)),
        ];
        let reconciled = t.on_resync(&listing, 5).len() as u64;
        let snaps = t.round(&listing, &info, 5);
        // BEGIN, a, b, END: consecutive host_seq after the reconcile.
        let seqs: Vec<u64> = snaps.iter().map(Snap::host_seq).collect();
        assert_eq!(seqs, (reconciled + 1..=reconciled + 4).collect::<Vec<_>>());
        let Snap::Host(begin) = &snaps[0] else {
            panic!("round starts with ROUND_BEGIN")
        };
        assert_eq!(begin.kind, HostSnapshotKind::ROUND_BEGIN);
        assert_eq!(begin.snapshot_id.as_deref(), Some(begin.event_id.as_str()));
        assert_eq!(begin.domain_count, 2);
        assert_eq!(begin.host_seq_watermark, begin.host_seq - 1);
        let Snap::Domain(sa, Some((_, rec))) = &snaps[1] else {
            panic!("a domain snapshot with its record update")
        };
        assert_eq!(sa.domain.uuid, a);
        assert_eq!(sa.seq, 1, "carries the domain's seq without bumping it");
        assert_eq!(sa.snapshot_id, begin.event_id);
        assert_eq!(sa.state.state, DomainState::RUNNING);
        assert!(rec.in_round && rec.seq == 1);
        let Snap::Host(end) = &snaps[3] else {
            panic!("round ends with ROUND_END")
        };
        assert_eq!(end.kind, HostSnapshotKind::ROUND_END);
        assert_eq!(end.snapshot_id, begin.snapshot_id);
        assert_eq!(end.domain_count, 2);
        // The heartbeat names the last complete round.
        let hb = t.heartbeat(&info, 6);
        assert_eq!(hb.kind, HostSnapshotKind::HEARTBEAT);
        assert_eq!(hb.snapshot_id, begin.snapshot_id);
        assert_eq!(hb.host_seq_watermark, end.host_seq + 1 - 1);
        // b (transient) stops: its event makes it gone, but only the next
        // complete round deletes its snapshot, after ROUND_END.
        let stop = t.on_event(&raw(&b, 5, 2));
        assert!(!stop.record.as_ref().unwrap().1.persistent);
        assert!(
            stop.record.as_ref().unwrap().1.in_round,
            "kept until a round"
        );
        let listing2 = vec![(a.clone(), facts(DomainState::RUNNING, "BOOTED", true))];
        assert!(t.on_resync(&listing2, 7).is_empty());
        let snaps = t.round(&listing2, &info, 7);
        let kinds: Vec<&str> = snaps
            .iter()
            .map(|s| match s {
                Snap::Host(h) => h.kind.as_str(),
                Snap::Domain(..) => "DOMAIN",
                Snap::Tombstone { .. } => "TOMBSTONE",
            })
            .collect();
        assert_eq!(kinds, ["ROUND_BEGIN", "DOMAIN", "ROUND_END", "TOMBSTONE"]);
        let Snap::Tombstone { uuid, record, .. } = &snaps[3] else {
            unreachable!()
        };
        assert_eq!(uuid, &b);
        assert!(!record.as_ref().unwrap().1.in_round);
        // a was already in a round: no record update needed.
        assert!(matches!(&snaps[1], Snap::Domain(_, None)));
        // Deleted once only.
        let snaps = t.round(&listing2, &info, 8);
        assert!(!snaps.iter().any(|s| matches!(s, Snap::Tombstone { .. })));
    }

    #[test]
    fn resync_emits_only_differences_and_vanished_domains() {
        let mut t = tracker(TableInspector::default());
        let a = "aaaaaaaa-0000-0000-0000-000000000000".to_string();
        let b = "bbbbbbbb-0000-0000-0000-000000000000".to_string();
        let c = "cccccccc-0000-0000-0000-000000000000".to_string();
        let listing = vec![
            (a.clone(), facts(DomainState::RUNNING, "BOOTED", true)),
            (b.clone(), facts(DomainState::SHUTOFF, "UNKNOWN", true)),
            (c.clone(), facts(DomainState::PAUSED, "USER", false)),
        ];
        let outs = t.on_resync(&listing, 5);
        let got: Vec<_> = outs
            .iter()
            .map(|o| (o.event.domain.uuid.clone(), o.event.event))
            .collect();
        assert_eq!(
            got,
            vec![
                (a.clone(), EventType::STARTED),
                (b.clone(), EventType::DEFINED),
                (c.clone(), EventType::SUSPENDED)
            ]
        );
        assert!(outs
            .iter()
            .all(|o| o.event.origin == Origin::RECONCILE && o.event.seq == 1));
        // Same listing again: nothing to say.
        assert!(t.on_resync(&listing, 6).is_empty());
        // a paused, b gone, c resumed.
        let listing2 = vec![
            (a.clone(), facts(DomainState::PAUSED, "USER", true)),
            (c.clone(), facts(DomainState::RUNNING, "UNPAUSED", false)),
        ];
        let outs = t.on_resync(&listing2, 7);
        let mut got: Vec<_> = outs
            .iter()
            .map(|o| {
                (
                    o.event.domain.uuid.clone(),
                    o.event.event,
                    o.event.seq,
                    o.event.persistent,
                )
            })
            .collect();
        got.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            got,
            vec![
                (a, EventType::SUSPENDED, 2, true),
                (b, EventType::UNDEFINED, 2, false),
                (c, EventType::RESUMED, 2, false)
            ]
        );
        let hs: Vec<u64> = outs.iter().map(|o| o.event.host_seq).collect();
        assert_eq!(hs, vec![4, 5, 6]);
    }

    #[test]
    fn gap_marker_is_host_level() {
        let mut t = tracker(TableInspector::default());
        let g = t.gap(GapCause::Disconnected, 9);
        assert_eq!(g.event.event, EventType::GAP);
        assert_eq!(g.event.detail, Detail::DISCONNECTED);
        assert_eq!(g.event.seq, 0);
        assert_eq!(g.event.host_seq, 1);
        assert_eq!(g.event.domain.uuid, HOST_UUID);
        assert_eq!(g.event.origin, Origin::AGENT);
    }
}

#[cfg(test)]
mod listing_tests;
