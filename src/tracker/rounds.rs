//! Listings and snapshot rounds (list + watch): the barrier a listing
//! begins, reconciling a listing into RECONCILE events, the complete round
//! that follows it, and heartbeats.
//!
//! Invariants:
//! - a listing never undoes what events applied after its barrier settled;
//!   it repairs only what those events could not tell;
//! - a round is ROUND_BEGIN, one snapshot per live domain, ROUND_END, then
//!   the tombstones, with contiguous `host_seq`; a snapshot carries its
//!   domain's `seq` without bumping it;
//! - a domain's snapshot is deleted (tombstone) once, and only after a
//!   complete round that no longer has it.

use std::collections::{HashMap, HashSet};

use crate::config::XmlMode;
use crate::model::{
    event_id, Detail, DomainEvent, DomainRef, DomainSnapshot, DomainState, EventType, HostInfo,
    HostSnapshot, HostSnapshotKind, Origin, StateReason, AGENT_VERSION,
};
use crate::source::Facts;

use super::derive::{merge_touched, reconcile_event};
use super::state::Tracker;
use super::types::{DomainRecord, Output, Snap, Touch};

impl Tracker {
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
        let made = Made {
            origin: Origin::RECONCILE,
            event,
            detail,
            observed_at,
            xml,
            hook: None,
        };
        self.made_event(uuid, record, made)
    }

    /// Journals an event the tracker makes itself (a reconcile's, a hook
    /// call's) with `record` as the domain's state after it, and keeps
    /// `record` as the domain's.
    pub(super) fn made_event(&mut self, uuid: &str, record: DomainRecord, m: Made) -> Output {
        let host_seq = self.next_host_seq();
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
            event: m.event,
            libvirt_event_id: crate::model::event_id::NONE,
            event_code: m.event.lifecycle_code().unwrap_or(-1),
            detail: m.detail,
            detail_code: m.detail.code(m.event),
            origin: m.origin,
            state_after: record.state(),
            persistent: record.persistent,
            autostart: record.autostart,
            vcpus: record.vcpus,
            memory_kib: record.memory_kib,
            config_hash: record.config_hash.clone(),
            observed_at: m.observed_at,
            xml: m.xml,
            hook: m.hook,
        };
        self.domains.insert(uuid.to_string(), record.clone());
        Output {
            event: ev,
            record: Some((uuid.to_string(), record)),
        }
    }
}

/// What an event the tracker makes itself says besides the domain's state.
pub(super) struct Made {
    pub origin: Origin,
    pub event: EventType,
    pub detail: Detail,
    pub observed_at: i64,
    pub xml: Option<String>,
    pub hook: Option<crate::model::HookCall>,
}
