//! Property tests of the consumer tools' pure logic (`consumer::rebuild`,
//! `consumer::usage`) against a simulated fleet whose messages come from
//! the agent's real tracker.
//!
//! A simulation plays random lifecycle histories on several hosts
//! (define, start, pause, resume, stop, undefine, transient domains,
//! migrations between hosts, undefine and redefine, snapshot rounds,
//! heartbeats, agent-detected gaps, journal resets), keeping libvirt's
//! truth and the true state timeline. The tracker turns each libvirt event
//! into the message the agent would publish. The messages are then
//! delivered to the consumer with drops, duplicates and reorderings, in
//! three ways: interleaved as emitted, snapshot stream first, and the
//! snapshot stream compacted (latest record per subject) first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use virtstream::config::XmlMode;
use virtstream::consumer::lanes::Piped;
use virtstream::consumer::rebuild::Fleet;
use virtstream::consumer::record::{Body, Lane, Position, Record, Tombstone};
use virtstream::consumer::usage::Usage;
use virtstream::model::{DomainState, HostInfo, HostSnapshotKind, StateReason};
use virtstream::source::enrich::{EnrichOptions, Enricher, Inspector, LookupError};
use virtstream::source::{Facts, Item, RawEvent};
use virtstream::tracker::{GapCause, Snap, Tracker, TrackerOptions};

type Table = Arc<Mutex<HashMap<String, Facts>>>;

struct Truth(Table);

impl Inspector for Truth {
    fn inspect(&self, uuid: &str, _xml: bool) -> Result<Facts, LookupError> {
        self.0
            .lock()
            .unwrap()
            .get(uuid)
            .cloned()
            .ok_or(LookupError::NoDomain)
    }
}

const SEC: i64 = 1_000_000;
const UUIDS: [&str; 6] = [
    "00000000-0000-4000-8000-000000000001",
    "00000000-0000-4000-8000-000000000002",
    "00000000-0000-4000-8000-000000000003",
    "00000000-0000-4000-8000-000000000004",
    "00000000-0000-4000-8000-000000000005",
    "00000000-0000-4000-8000-000000000006",
];

/// One abstract step; indexes are taken modulo the pools.
#[derive(Debug, Clone)]
enum Op {
    Define(usize, usize, u8),
    Start(usize, usize),
    CreateTransient(usize, usize),
    Pause(usize, usize),
    Resume(usize, usize),
    Stop(usize, usize, bool),
    Undefine(usize, usize),
    Migrate(usize, usize, usize, bool),
    Round(usize),
    Heartbeat(usize),
    /// libvirt events lost by the agent (it knows): a silent change, then
    /// gap marker, reconcile and round.
    AgentGap(usize, usize),
    /// The journal is recreated: a new epoch.
    Reset(usize),
    Wait(u8),
}

fn op(hosts: usize, gaps: bool) -> impl Strategy<Value = Op> {
    let h = 0..hosts;
    let u = 0..UUIDS.len();
    let mut ops = vec![
        (
            3,
            (h.clone(), u.clone(), 1u8..8)
                .prop_map(|(h, u, c)| Op::Define(h, u, c))
                .boxed(),
        ),
        (
            4,
            (h.clone(), u.clone())
                .prop_map(|(h, u)| Op::Start(h, u))
                .boxed(),
        ),
        (
            1,
            (h.clone(), u.clone())
                .prop_map(|(h, u)| Op::CreateTransient(h, u))
                .boxed(),
        ),
        (
            2,
            (h.clone(), u.clone())
                .prop_map(|(h, u)| Op::Pause(h, u))
                .boxed(),
        ),
        (
            2,
            (h.clone(), u.clone())
                .prop_map(|(h, u)| Op::Resume(h, u))
                .boxed(),
        ),
        (
            2,
            (h.clone(), u.clone(), any::<bool>())
                .prop_map(|(h, u, d)| Op::Stop(h, u, d))
                .boxed(),
        ),
        (
            1,
            (h.clone(), u.clone())
                .prop_map(|(h, u)| Op::Undefine(h, u))
                .boxed(),
        ),
        (
            2,
            (u.clone(), h.clone(), h.clone(), any::<bool>())
                .prop_map(|(u, a, b, p)| Op::Migrate(u, a, b, p))
                .boxed(),
        ),
        (2, h.clone().prop_map(Op::Round).boxed()),
        (1, h.clone().prop_map(Op::Heartbeat).boxed()),
        (1, (1u8..30).prop_map(Op::Wait).boxed()),
    ];
    if gaps {
        ops.push((
            1,
            (h.clone(), u).prop_map(|(h, u)| Op::AgentGap(h, u)).boxed(),
        ));
        ops.push((1, h.prop_map(Op::Reset).boxed()));
    }
    proptest::strategy::Union::new_weighted(ops)
}

struct SimHost {
    id: String,
    table: Table,
    /// The agent's two stages: facts are attached before the tracker.
    enricher: Enricher<Truth>,
    tracker: Tracker,
    epoch: String,
}

fn info() -> HostInfo {
    HostInfo {
        libvirt_uri: "test:///default".into(),
        libvirt_driver: "TEST".into(),
        libvirt_version: "9.0.0".into(),
        accepted_event_ids: vec!["LIFECYCLE".into()],
    }
}

fn new_tracker(host: &str, epoch: &str) -> Tracker {
    Tracker::new(
        host.into(),
        epoch.into(),
        0,
        HashMap::new(),
        TrackerOptions {
            xml: XmlMode::Off,
            max_journal_bytes: u64::MAX,
        },
    )
}

fn new_enricher(table: &Table) -> Enricher<Truth> {
    Enricher::new(
        Truth(table.clone()),
        EnrichOptions {
            xml: XmlMode::Off,
            lookup_attempts: 1,
        },
    )
}

/// A state change on the true timeline: (time, host, uuid, state or None
/// when the domain left the host, vcpus, memory).
type Change = (i64, usize, String, Option<(DomainState, i32, i64)>);

struct Sim {
    hosts: Vec<SimHost>,
    now: i64,
    /// Emitted messages, in emission order.
    out: Vec<Body>,
    changes: Vec<Change>,
}

fn facts(name: &str, state: DomainState, reason: &str, persistent: bool, vcpus: i32) -> Facts {
    Facts {
        name: name.into(),
        id: None,
        state: StateReason::named(state, reason),
        persistent,
        autostart: Some(false),
        vcpus: Some(vcpus),
        memory_kib: Some(vcpus as i64 * 524_288),
        config_hash: Some(format!("sha256:{vcpus}")),
        xml: None,
    }
}

impl Sim {
    fn new(hosts: usize) -> Sim {
        let mut sim = Sim {
            hosts: Vec::new(),
            now: 1_800_000_000 * SEC,
            out: Vec::new(),
            changes: Vec::new(),
        };
        for i in 0..hosts {
            let id = format!("host-{i}");
            let table: Table = Arc::default();
            let epoch = format!("{i:02}{:030}", 0);
            sim.hosts.push(SimHost {
                tracker: new_tracker(&id, &epoch),
                enricher: new_enricher(&table),
                id,
                table,
                epoch,
            });
            sim.round(i);
        }
        sim
    }

    fn tick(&mut self, secs: i64) {
        self.now += secs * SEC;
    }

    fn get(&self, h: usize, u: &str) -> Option<Facts> {
        self.hosts[h].table.lock().unwrap().get(u).cloned()
    }

    fn running_anywhere(&self, u: &str) -> bool {
        (0..self.hosts.len()).any(|h| {
            self.get(h, u).is_some_and(|f| {
                matches!(f.state.state, DomainState::RUNNING | DomainState::PAUSED)
            })
        })
    }

    /// Sets libvirt's truth (None: gone) and records the change.
    fn set(&mut self, h: usize, u: &str, f: Option<Facts>) {
        let entry = f.as_ref().map(|f| {
            (
                f.state.state,
                f.vcpus.unwrap_or(0),
                f.memory_kib.unwrap_or(0),
            )
        });
        let mut t = self.hosts[h].table.lock().unwrap();
        match f {
            Some(f) => t.insert(u.to_string(), f),
            None => t.remove(u),
        };
        drop(t);
        self.changes.push((self.now, h, u.to_string(), entry));
    }

    /// Delivers a libvirt lifecycle event to the host's tracker.
    fn event(&mut self, h: usize, u: &str, name: &str, ty: i32, detail: i32) {
        let raw = RawEvent {
            uuid: u.into(),
            name: name.into(),
            id: None,
            event_id: 0,
            type_code: ty,
            detail_code: detail,
            observed_at: self.now,
            facts: None,
        };
        let host = &mut self.hosts[h];
        let mut items = [Item::Event(Box::new(raw))];
        host.enricher.enrich(&mut items);
        let [Item::Event(raw)] = items else {
            unreachable!()
        };
        let o = host.tracker.on_event(&raw);
        self.out.push(Body::Event(o.event));
    }

    fn round(&mut self, h: usize) {
        let listing: Vec<(String, Facts)> = {
            let t = self.hosts[h].table.lock().unwrap();
            let mut l: Vec<_> = t.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            l.sort_by(|a, b| a.0.cmp(&b.0));
            l
        };
        let now = self.now;
        let host = &mut self.hosts[h];
        host.enricher.enrich(&mut [
            Item::ListingBegin { dropped: 0 },
            Item::Resync {
                listing: listing.clone(),
                observed_at: now,
                info: info(),
            },
        ]);
        for o in host.tracker.on_resync(&listing, now) {
            self.out.push(Body::Event(o.event));
        }
        let (host_id, epoch) = (host.id.clone(), host.epoch.clone());
        for s in host.tracker.round(&listing, &info(), now) {
            self.out.push(match s {
                Snap::Host(x) => Body::Host(x),
                Snap::Domain(d, _) => Body::Domain(d),
                Snap::Tombstone { uuid, host_seq, .. } => Body::Tombstone(Tombstone {
                    host_id: host_id.clone(),
                    epoch: epoch.clone(),
                    host_seq,
                    uuid,
                }),
            });
        }
    }

    fn apply(&mut self, op: &Op) {
        let n = self.hosts.len();
        self.tick(1);
        match *op {
            Op::Wait(s) => self.tick(s as i64),
            Op::Define(h, u, vcpus) => {
                let (h, u) = (h % n, UUIDS[u]);
                let name = format!("vm{}", &u[u.len() - 1..]);
                match self.get(h, u) {
                    None => {
                        self.set(
                            h,
                            u,
                            Some(facts(
                                &name,
                                DomainState::SHUTOFF,
                                "UNKNOWN",
                                true,
                                vcpus as i32,
                            )),
                        );
                        self.event(h, u, &name, 0, 0);
                    }
                    Some(f) if f.state.state == DomainState::SHUTOFF => {
                        let mut g = facts(
                            &f.name,
                            DomainState::SHUTOFF,
                            &f.state.reason,
                            true,
                            vcpus as i32,
                        );
                        g.state = f.state.clone();
                        self.set(h, u, Some(g));
                        self.event(h, u, &f.name, 0, 1);
                    }
                    Some(_) => {}
                }
            }
            Op::Start(h, u) => {
                let (h, u) = (h % n, UUIDS[u]);
                if let Some(f) = self.get(h, u) {
                    if f.state.state == DomainState::SHUTOFF && !self.running_anywhere(u) {
                        let g = Facts {
                            state: StateReason::named(DomainState::RUNNING, "BOOTED"),
                            ..f.clone()
                        };
                        self.set(h, u, Some(g));
                        self.event(h, u, &f.name, 2, 0);
                    }
                }
            }
            Op::CreateTransient(h, u) => {
                let (h, u) = (h % n, UUIDS[u]);
                if self.get(h, u).is_none() && !self.running_anywhere(u) {
                    let name = format!("t{}", &u[u.len() - 1..]);
                    self.set(
                        h,
                        u,
                        Some(facts(&name, DomainState::RUNNING, "BOOTED", false, 2)),
                    );
                    self.event(h, u, &name, 2, 0);
                }
            }
            Op::Pause(h, u) => {
                let (h, u) = (h % n, UUIDS[u]);
                if let Some(f) = self
                    .get(h, u)
                    .filter(|f| f.state.state == DomainState::RUNNING)
                {
                    let g = Facts {
                        state: StateReason::named(DomainState::PAUSED, "USER"),
                        ..f.clone()
                    };
                    self.set(h, u, Some(g));
                    self.event(h, u, &f.name, 3, 0);
                }
            }
            Op::Resume(h, u) => {
                let (h, u) = (h % n, UUIDS[u]);
                if let Some(f) = self
                    .get(h, u)
                    .filter(|f| f.state.state == DomainState::PAUSED && f.state.reason == "USER")
                {
                    let g = Facts {
                        state: StateReason::named(DomainState::RUNNING, "UNPAUSED"),
                        ..f.clone()
                    };
                    self.set(h, u, Some(g));
                    self.event(h, u, &f.name, 4, 0);
                }
            }
            Op::Stop(h, u, destroy) => {
                let (h, u) = (h % n, UUIDS[u]);
                if let Some(f) = self.get(h, u).filter(|f| {
                    matches!(f.state.state, DomainState::RUNNING | DomainState::PAUSED)
                        && f.state.reason != "MIGRATION"
                }) {
                    let reason = if destroy { "DESTROYED" } else { "SHUTDOWN" };
                    let g = f.persistent.then(|| Facts {
                        state: StateReason::named(DomainState::SHUTOFF, reason),
                        ..f.clone()
                    });
                    self.set(h, u, g);
                    self.event(h, u, &f.name, 5, if destroy { 1 } else { 0 });
                }
            }
            Op::Undefine(h, u) => {
                let (h, u) = (h % n, UUIDS[u]);
                if let Some(f) = self.get(h, u).filter(|f| f.persistent) {
                    let g = (f.state.state != DomainState::SHUTOFF).then(|| Facts {
                        persistent: false,
                        ..f.clone()
                    });
                    self.set(h, u, g);
                    self.event(h, u, &f.name, 1, 0);
                }
            }
            Op::Migrate(u, a, b, persist) => {
                let (a, b, u) = (a % n, b % n, UUIDS[u]);
                let Some(f) = self.get(a, u) else { return };
                if a == b || f.state.state != DomainState::RUNNING || self.get(b, u).is_some() {
                    return;
                }
                let dest = Facts {
                    state: StateReason::named(DomainState::PAUSED, "MIGRATION"),
                    persistent: persist,
                    ..f.clone()
                };
                self.set(b, u, Some(dest.clone()));
                self.event(b, u, &f.name, 2, 1); // STARTED/MIGRATED
                self.tick(2);
                let src_paused = Facts {
                    state: StateReason::named(DomainState::PAUSED, "MIGRATION"),
                    ..f.clone()
                };
                self.set(a, u, Some(src_paused));
                self.event(a, u, &f.name, 3, 1); // SUSPENDED/MIGRATED
                self.tick(1);
                self.set(
                    b,
                    u,
                    Some(Facts {
                        state: StateReason::named(DomainState::RUNNING, "MIGRATED"),
                        ..dest.clone()
                    }),
                );
                self.event(b, u, &f.name, 4, 1); // RESUMED/MIGRATED
                if persist {
                    self.event(b, u, &f.name, 0, 0); // DEFINED/ADDED
                }
                self.tick(1);
                let src_after = f.persistent.then(|| Facts {
                    state: StateReason::named(DomainState::SHUTOFF, "MIGRATED"),
                    ..f.clone()
                });
                self.set(a, u, src_after);
                self.event(a, u, &f.name, 5, 3); // STOPPED/MIGRATED
            }
            Op::Round(h) => self.round(h % n),
            Op::Heartbeat(h) => {
                let now = self.now;
                let hb = self.hosts[h % n].tracker.heartbeat(&info(), now);
                self.out.push(Body::Host(hb));
            }
            Op::AgentGap(h, u) => {
                let (h, u) = (h % n, UUIDS[u]);
                // A change libvirt made while the agent was not listening.
                if let Some(f) = self
                    .get(h, u)
                    .filter(|f| f.state.state == DomainState::RUNNING)
                {
                    let g = Facts {
                        state: StateReason::named(DomainState::PAUSED, "USER"),
                        ..f
                    };
                    self.set(h, u, Some(g));
                }
                self.tick(1);
                let now = self.now;
                let g = self.hosts[h].tracker.gap(GapCause::QueueOverflow, now);
                self.out.push(Body::Event(g.event));
                self.round(h);
            }
            Op::Reset(h) => {
                let h = h % n;
                let host = &mut self.hosts[h];
                let n: u64 = host.epoch[2..].parse().unwrap();
                host.epoch = format!("{h:02}{:030}", n + 1);
                host.tracker = new_tracker(&host.id, &host.epoch);
                host.enricher = new_enricher(&host.table);
                self.round(h);
            }
        }
    }
}

/// How messages reach the consumer.
#[derive(Debug, Clone, Copy)]
enum Delivery {
    Interleaved,
    SnapshotsFirst,
    CompactedSnapshotsFirst,
}

#[derive(Debug, Clone, Default)]
struct Faults {
    drops: Vec<usize>,
    snap_drops: Vec<usize>,
    dups: Vec<usize>,
    swaps: Vec<usize>,
}

impl Faults {
    fn none() -> Faults {
        Faults::default()
    }
}

struct Delivered {
    records: Vec<(Record, bool)>,
    /// The events lane and its last position (what a reader learns from
    /// the stream's state).
    end: (Lane, u64, Option<i64>),
    /// Emitted events that were dropped (true) or whose order with another
    /// event of the same domain was changed (false): (host, uuid,
    /// (epoch, host_seq)).
    touched: Vec<(String, String, (String, u64), bool)>,
    /// Hosts two of whose events were swapped. Both buses keep each host's
    /// messages in host_seq order within a stream or partition, and the
    /// rebuild bounds a loss by that order; where a test breaks it, only
    /// the state (not the stale flags) is checked for that host.
    order_broken: HashSet<String>,
}

fn is_snapshot(b: &Body) -> bool {
    !matches!(b, Body::Event(_))
}

fn deliver(sim: &Sim, how: Delivery, f: &Faults) -> Delivered {
    // (slot in emission order, body) per lane.
    let events: Vec<(usize, &Body)> = sim
        .out
        .iter()
        .enumerate()
        .filter(|(_, b)| !is_snapshot(b))
        .collect();
    let mut snaps: Vec<(usize, &Body)> = sim
        .out
        .iter()
        .enumerate()
        .filter(|(_, b)| is_snapshot(b))
        .collect();
    if let Delivery::CompactedSnapshotsFirst = how {
        // Keep the latest record per subject: per (host, uuid) for domain
        // snapshots and tombstones, per host for host records.
        let mut last: HashMap<(String, String), usize> = HashMap::new();
        for (i, (_, b)) in snaps.iter().enumerate() {
            let key = match b {
                Body::Domain(d) => (d.host_id.clone(), d.domain.uuid.clone()),
                Body::Tombstone(t) => (t.host_id.clone(), t.uuid.clone()),
                Body::Host(h) => (h.host_id.clone(), String::new()),
                Body::Event(_) => unreachable!(),
            };
            last.insert(key, i);
        }
        let keep: HashSet<usize> = last.into_values().collect();
        snaps = snaps
            .into_iter()
            .enumerate()
            .filter(|(i, _)| keep.contains(i))
            .map(|(_, b)| b)
            .collect();
    }
    let snap_drop: HashSet<usize> = f
        .snap_drops
        .iter()
        .map(|i| i % snaps.len().max(1))
        .collect();
    let snaps: Vec<(usize, &Body)> = snaps
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !snap_drop.contains(i))
        .map(|(_, b)| b)
        .collect();

    // The events lane; a dropped message leaves a hole in its positions,
    // a swapped one takes the other's place.
    let slots: Vec<usize> = events.iter().map(|(s, _)| *s).collect();
    let mut lane: Vec<Option<&Body>> = events.iter().map(|(_, b)| Some(*b)).collect();
    let mut touched = Vec::new();
    let mut order_broken = HashSet::new();
    let origin = |b: &Body| {
        let (h, epoch, hs) = b.origin();
        let uuid = match b {
            Body::Event(e) => e.domain.uuid.clone(),
            _ => String::new(),
        };
        (h.to_string(), uuid, (epoch.to_string(), hs))
    };
    for &s in &f.swaps {
        if lane.len() < 2 {
            break;
        }
        let i = s % (lane.len() - 1);
        if let (Some(a), Some(b)) = (lane[i], lane[i + 1]) {
            let (oa, ob) = (origin(a), origin(b));
            if oa.0 == ob.0 && oa.2 .0 != ob.2 .0 {
                // Not a fault either bus can produce: a new epoch exists
                // because the old epoch's agent is gone, so every lane
                // holds all of a host's older epoch before its newer one
                // (the order `consumer::epochs` relies on).
                continue;
            }
            if oa.0 == ob.0 {
                order_broken.insert(oa.0.clone());
            }
            if oa.0 == ob.0 && oa.1 == ob.1 {
                touched.push((oa.0, oa.1, oa.2, false));
                touched.push((ob.0, ob.1, ob.2, false));
            }
        }
        lane.swap(i, i + 1);
    }
    // The broker's store time of each position: no earlier than any
    // message stored at or before it (dropped ones included).
    let mut store_time = Vec::with_capacity(lane.len());
    let mut t = i64::MIN;
    for b in lane.iter().flatten() {
        t = t.max(b.observed_at().unwrap_or(i64::MIN));
        store_time.push(t);
    }
    for &d in &f.drops {
        if lane.is_empty() {
            break;
        }
        let i = d % lane.len();
        if let Some(b) = lane[i].take() {
            let o = origin(b);
            touched.push((o.0, o.1, o.2, true));
        }
    }
    let dups: HashSet<usize> = f.dups.iter().map(|i| i % lane.len().max(1)).collect();
    let events_src: Arc<str> = Arc::from("VIRT_EVENTS");
    let snaps_src: Arc<str> = Arc::from("VIRT_SNAPSHOTS");
    let mut ev_records: Vec<(usize, Record, bool)> = Vec::new();
    let mut pos = 0u64;
    for (i, slot) in lane.iter().enumerate() {
        let copies = if dups.contains(&i) { 2 } else { 1 };
        for _ in 0..copies {
            pos += 1;
            if let Some(b) = slot {
                let pos = Position {
                    source: events_src.clone(),
                    partition: None,
                    offset: pos,
                    time_us: Some(store_time[i]),
                };
                ev_records.push((
                    slots[i],
                    Record {
                        body: (*b).clone(),
                        pos,
                    },
                    true,
                ));
            }
        }
    }
    let snap_records: Vec<(usize, Record, bool)> = snaps
        .iter()
        .enumerate()
        .map(|(i, (slot, b))| {
            let pos = Position {
                source: snaps_src.clone(),
                partition: None,
                offset: i as u64 + 1,
                time_us: b.observed_at(),
            };
            (
                *slot,
                Record {
                    body: (*b).clone(),
                    pos,
                },
                false,
            )
        })
        .collect();
    let mut all: Vec<(usize, Record, bool)> = snap_records;
    match how {
        Delivery::SnapshotsFirst | Delivery::CompactedSnapshotsFirst => all.extend(ev_records),
        Delivery::Interleaved => {
            // A live consumer of both streams: emission order.
            all.extend(ev_records);
            all.sort_by_key(|(slot, ..)| *slot);
        }
    }
    Delivered {
        records: all.into_iter().map(|(_, r, c)| (r, c)).collect(),
        end: (
            Lane {
                source: events_src,
                partition: None,
            },
            pos,
            store_time.last().copied(),
        ),
        touched,
        order_broken,
    }
}

/// Rounds of host `host` whose every record reached the consumer and
/// whose end is known: (epoch, begin host_seq). Epochs of the simulation
/// sort in the order they were created.
fn complete_delivered_rounds(d: &Delivered, host: &str) -> Vec<(String, u64)> {
    let mut count: HashMap<String, ((String, u64), usize, bool)> = HashMap::new();
    let mut members: HashMap<String, HashSet<u64>> = HashMap::new();
    for (r, _) in &d.records {
        match &r.body {
            Body::Host(h) if h.host_id == host => {
                if let Some(id) = &h.snapshot_id {
                    let begin: u64 = id.rsplit(':').next().unwrap().parse().unwrap();
                    let e = count
                        .entry(id.clone())
                        .or_insert(((h.epoch.clone(), begin), 0, false));
                    e.1 = h.domain_count as usize;
                    if matches!(
                        h.kind,
                        HostSnapshotKind::ROUND_END | HostSnapshotKind::HEARTBEAT
                    ) {
                        e.2 = true;
                    }
                }
            }
            Body::Domain(s) if s.host_id == host => {
                members
                    .entry(s.snapshot_id.clone())
                    .or_default()
                    .insert(s.host_seq);
            }
            _ => {}
        }
    }
    count
        .into_iter()
        .filter(|(id, (_, n, ended))| *ended && members.get(id).map_or(0, |m| m.len()) == *n)
        .map(|(_, (b, _, _))| b)
        .collect()
}

fn rebuild(d: &Delivered) -> Fleet {
    let mut f = Piped::new(Fleet::new());
    for (r, c) in &d.records {
        f.record(r, *c);
    }
    f.lane_end(&d.end.0, d.end.1, d.end.2);
    f.into_inner()
}

/// Checks the rebuilt state of every host against libvirt's truth where
/// the properties require it; returns a description of the first failure.
fn check_state(sim: &Sim, d: &Delivered, lossless: bool) -> Result<(), String> {
    let fleet = rebuild(d);
    let views = fleet.domains();
    let hosts = fleet.hosts();
    for (hi, h) in sim.hosts.iter().enumerate() {
        let last_loss = d
            .touched
            .iter()
            .filter(|t| t.0 == h.id)
            .map(|t| t.2.clone())
            .max();
        let current_epoch = h.epoch.clone();
        let rounds: Vec<(String, u64)> = complete_delivered_rounds(d, &h.id);
        let recovered = match last_loss {
            None => true,
            Some(x) => rounds.iter().any(|b| *b > x),
        };
        let truth = sim.hosts[hi].table.lock().unwrap().clone();
        let mine: BTreeMap<&str, _> = views
            .iter()
            .filter(|v| v.host_id == h.id)
            .map(|v| (v.uuid.as_str(), v))
            .collect();
        let host_view = hosts.iter().find(|v| v.host_id == h.id);
        if recovered {
            let want: BTreeMap<&str, &Facts> = truth.iter().map(|(k, v)| (k.as_str(), v)).collect();
            if want.keys().collect::<Vec<_>>() != mine.keys().collect::<Vec<_>>() {
                return Err(format!(
                    "{}: domains {:?}, truth {:?}",
                    h.id,
                    mine.keys().collect::<Vec<_>>(),
                    want.keys().collect::<Vec<_>>()
                ));
            }
            for (u, f) in want {
                let v = mine[u];
                let got = (
                    v.state.as_str(),
                    v.reason.as_str(),
                    v.persistent,
                    v.vcpus,
                    v.memory_kib,
                    v.name.as_str(),
                );
                let exp = (
                    f.state.state.as_str(),
                    f.state.reason.as_str(),
                    f.persistent,
                    f.vcpus,
                    f.memory_kib,
                    f.name.as_str(),
                );
                if got != exp {
                    return Err(format!("{} {u}: rebuilt {got:?}, truth {exp:?}", h.id));
                }
                if v.epoch != current_epoch {
                    return Err(format!(
                        "{} {u}: epoch {} not {current_epoch}",
                        h.id, v.epoch
                    ));
                }
            }
        }
        // Every domain touched by a loss is stale until a complete round
        // that began after the loss. (A reordering loses nothing: the
        // state must come out right, stale or not.)
        let checked = !d.order_broken.contains(&h.id);
        for (th, tu, ths, _) in d.touched.iter().filter(|t| checked && t.0 == h.id && t.3) {
            if rounds.iter().any(|b| b > ths) {
                continue;
            }
            // A host the consumer never saw at all is not reported on, so
            // nothing is claimed about it.
            let flagged = match mine.get(tu.as_str()) {
                Some(v) => v.stale,
                None => host_view.is_none_or(|v| v.stale),
            };
            if !flagged {
                return Err(format!("{th} {tu}: lost (epoch, host_seq) {ths:?} but not stale; host {host_view:?}; records {:#?}", d.records.iter().map(|(r, _)| (r.pos.to_string(), r.body.origin().1.to_string(), r.body.origin().2, match &r.body { Body::Event(e) => format!("{} {} seq {}", e.event, e.domain.uuid, e.seq), Body::Host(h) => format!("{} {:?} n={}", h.kind, h.snapshot_id, h.domain_count), Body::Domain(d) => format!("snap {} {}", d.domain.uuid, d.snapshot_id), Body::Tombstone(t) => format!("tomb {}", t.uuid) })).collect::<Vec<_>>()));
            }
        }
        if lossless {
            // Nothing lost: stale only where the agent itself reported a
            // gap or a new epoch that no complete round followed.
            let marker_after_round = sim.out.iter().any(|b| match b {
                Body::Event(e)
                    if e.host_id == h.id && e.event == virtstream::model::EventType::GAP =>
                {
                    !rounds.iter().any(|r| *r > (e.epoch.clone(), e.host_seq))
                }
                _ => false,
            });
            if !marker_after_round {
                if let Some(v) = mine.values().find(|v| v.stale) {
                    return Err(format!(
                        "{} {}: stale without a loss: {:?}",
                        h.id, v.uuid, v.stale_reason
                    ));
                }
            }
        }
    }
    Ok(())
}

fn faults() -> impl Strategy<Value = Faults> {
    (
        prop::collection::vec(any::<usize>(), 0..4),
        prop::collection::vec(any::<usize>(), 0..3),
        prop::collection::vec(any::<usize>(), 0..4),
        prop::collection::vec(any::<usize>(), 0..3),
    )
        .prop_map(|(drops, snap_drops, dups, swaps)| Faults {
            drops,
            snap_drops,
            dups,
            swaps,
        })
}

fn delivery() -> impl Strategy<Value = Delivery> {
    prop_oneof![
        Just(Delivery::Interleaved),
        Just(Delivery::SnapshotsFirst),
        Just(Delivery::CompactedSnapshotsFirst),
    ]
}

fn play(hosts: usize, ops: &[Op]) -> Sim {
    let mut sim = Sim::new(hosts);
    for o in ops {
        sim.apply(o);
    }
    sim
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Nothing lost (duplicates allowed): the rebuild is libvirt's truth on
    /// every host, and nothing is stale that the agent did not report.
    #[test]
    fn rebuild_equals_truth_without_losses(
        hosts in 2usize..4,
        ops in prop::collection::vec(op(3, true), 1..60),
        how in delivery(),
        dups in prop::collection::vec(any::<usize>(), 0..5),
        tail_round in any::<bool>(),
    ) {
        let mut sim = play(hosts, &ops);
        if tail_round {
            for h in 0..hosts { sim.round(h); }
        }
        let d = deliver(&sim, how, &Faults { dups, ..Faults::none() });
        prop_assert!(d.touched.is_empty());
        if let Err(e) = check_state(&sim, &d, true) {
            prop_assert!(false, "{}", e);
        }
    }

    /// With drops, duplicates and reorderings: every host whose last loss
    /// is followed by a complete round is rebuilt exactly, and every
    /// domain touched by a loss is stale until such a round.
    #[test]
    fn rebuild_recovers_after_a_complete_round_and_flags_losses(
        hosts in 2usize..4,
        ops in prop::collection::vec(op(3, true), 1..60),
        how in delivery(),
        f in faults(),
        more in prop::collection::vec(op(3, false), 0..15),
        rounds_after in any::<bool>(),
    ) {
        let mut sim = play(hosts, &ops);
        if rounds_after {
            for h in 0..hosts { sim.round(h); }
        }
        for o in &more { sim.apply(o); }
        let d = deliver(&sim, how, &f);
        if let Err(e) = check_state(&sim, &d, false) {
            prop_assert!(false, "{}", e);
        }
    }

    /// Loss-free histories: usage per (host, domain) equals the truth's,
    /// second by second, billed once across migrations, in any window.
    #[test]
    fn usage_equals_truth_without_losses(
        hosts in 2usize..4,
        ops in prop::collection::vec(op(3, false), 1..60),
        how in delivery(),
        dups in prop::collection::vec(any::<usize>(), 0..5),
        window in (0i64..400, 1i64..400),
    ) {
        let sim = play(hosts, &ops);
        let d = deliver(&sim, how, &Faults { dups, ..Faults::none() });
        let start = 1_800_000_000 * SEC;
        let (from, to) = (start + window.0 * SEC, start + (window.0 + window.1) * SEC);
        let mut u = Piped::new(Usage::new());
        for (r, c) in &d.records { u.record(r, *c); }
        u.lane_end(&d.end.0, d.end.1, d.end.2);
        let rows = u.feed.compute(from, to);
        let truth = true_usage(&sim, from, to);
        let got: BTreeMap<(String, String), [f64; 4]> = rows
            .iter()
            .inspect(|r| assert!(!r.stale, "stale without a loss: {r:?}"))
            .map(|r| ((r.host_id.clone(), r.uuid.clone()), [r.running_seconds, r.paused_seconds, r.vcpu_seconds, r.memory_gib_seconds]))
            .collect();
        let keys: HashSet<&(String, String)> = got.keys().chain(truth.keys()).collect();
        for k in keys {
            let a = got.get(k).copied().unwrap_or_default();
            let b = truth.get(k).copied().unwrap_or_default();
            for i in 0..4 {
                prop_assert!((a[i] - b[i]).abs() < 1e-6, "{:?}: usage {:?}, truth {:?}", k, a, b);
            }
        }
    }
}

/// A domain's true state at one second: state, vcpus, memory and the time
/// it last became active (running or paused) on that host.
type Sample = (DomainState, i32, i64, i64);

/// Ground truth by sampling each second of the window: the state of every
/// (host, uuid) from the true timeline, billed once per uuid (running
/// beats paused; the host where it became active last wins).
fn true_usage(sim: &Sim, from: i64, to: i64) -> BTreeMap<(String, String), [f64; 4]> {
    let mut out: BTreeMap<(String, String), [f64; 4]> = BTreeMap::new();
    let mut t = from;
    while t < to {
        // State and active-since of every (host, uuid) at second t.
        let mut now: HashMap<(usize, String), Sample> = HashMap::new();
        for (ct, h, u, st) in sim.changes.iter().filter(|c| c.0 <= t) {
            let key = (*h, u.clone());
            match st {
                Some((s, v, m)) => {
                    let active = matches!(s, DomainState::RUNNING | DomainState::PAUSED);
                    let since = match now.get(&key) {
                        Some((ps, _, _, since))
                            if active
                                && matches!(ps, DomainState::RUNNING | DomainState::PAUSED) =>
                        {
                            *since
                        }
                        _ => *ct,
                    };
                    now.insert(key, (*s, *v, *m, since));
                }
                None => {
                    now.remove(&key);
                }
            }
        }
        let mut by_uuid: HashMap<&str, Vec<(usize, &Sample)>> = HashMap::new();
        for ((h, u), s) in &now {
            by_uuid.entry(u.as_str()).or_default().push((*h, s));
        }
        for (u, list) in by_uuid {
            let pick = |want: DomainState| {
                list.iter()
                    .filter(|(_, s)| s.0 == want)
                    .max_by_key(|(h, s)| (s.3, sim.hosts[*h].id.clone()))
            };
            if let Some((h, s)) = pick(DomainState::RUNNING) {
                let e = out
                    .entry((sim.hosts[*h].id.clone(), u.to_string()))
                    .or_default();
                e[0] += 1.0;
                e[2] += s.1 as f64;
                e[3] += s.2 as f64 / 1_048_576.0;
            } else if let Some((h, _)) = pick(DomainState::PAUSED) {
                let e = out
                    .entry((sim.hosts[*h].id.clone(), u.to_string()))
                    .or_default();
                e[1] += 1.0;
            }
        }
        t += SEC;
    }
    out
}
