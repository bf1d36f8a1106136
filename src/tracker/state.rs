//! The `Tracker`: the per-domain records and the host's counters, and
//! applying one libvirt event (or a gap marker) to them. Pure logic: no
//! I/O, no clock, no libvirt; times come with the items.
//!
//! Invariants:
//! - `host_seq` grows by one per message and only in `next_host_seq`; a
//!   domain's `seq` grows by one per message about it; gap markers carry
//!   seq 0;
//! - facts attached to an event fill only what the event cannot tell;
//!   they never override the state it leads to;
//! - while a listing is under way (`barrier`), every applied event notes
//!   what it settled about its domain (see `rounds`);
//! - memory stays bounded under churn: a gone record is forgotten only
//!   once the journal has committed every write of it (`sweep`), and put
//!   back from the journal when the domain returns (`restore`).

use std::collections::{HashMap, HashSet};

use crate::config::XmlMode;
use crate::model::{
    event_id, DomainEvent, DomainRef, DomainState, EventType, Origin, StateReason, HOST_UUID,
};
use crate::source::{Facts, RawEvent};

use super::derive::derive_state;
use super::types::{DomainRecord, GapCause, Output, Touch, TrackerOptions};

/// The per-host state machine (pure logic; `TrackerTask::run` adds the
/// queue, the journal and the timers).
pub struct Tracker {
    pub(super) host_id: String,
    pub(super) epoch: String,
    pub(super) host_seq: u64,
    pub(super) domains: HashMap<String, DomainRecord>,
    pub(super) opts: TrackerOptions,
    /// snapshot_id and domain count of the last complete round (carried
    /// by heartbeats, so a reader of the compacted snapshot stream can tell
    /// whether it holds all of that round).
    pub(super) last_round: Option<(String, usize)>,
    /// Between `begin_listing` and the round after the listing: the
    /// domains events touched since the listing began.
    pub(super) barrier: Option<HashMap<String, Touch>>,
    /// Gone domains (not in a round, so no tombstone pending) seen by the
    /// last sweep, with their seq, and the host_seq every write of their
    /// records is at or below: forgotten from memory once the journal has
    /// committed that far (`sweep`).
    pub(super) forget: (Vec<(String, u64)>, u64),
    /// Domains an earlier epoch left as the latest snapshot record on a
    /// bus (`Item::StaleSnapshots`), waiting for the next complete round.
    pub(super) stale: HashSet<String>,
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

    pub(super) fn next_host_seq(&mut self) -> u64 {
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
                hook: None,
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
            hook: None,
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

    pub(super) fn xml_for(
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
}
