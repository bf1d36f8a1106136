//! What the rebuild shows: per host its newest epoch (older epochs fill
//! in domains the newest has said nothing of until its first complete
//! round), and why a host or domain is stale.
//!
//! Invariant: views are computed on demand from the rebuild's state and
//! never change it; they are sorted (hosts by id; domains by host, name
//! and uuid), so the same records always give the same views.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::host::{Dom, Host};
use super::{DomainView, Epochs, Fleet, Migration};
use crate::consumer::record::Lane;

impl Fleet {
    /// A host's newest epoch and the one before it, if any.
    fn newest(epochs: &Epochs) -> Option<(&Host, Option<&str>)> {
        let order = epochs.order.oldest_first();
        let (newest, older) = order.split_last()?;
        Some((&epochs.epochs[*newest], older.last().copied()))
    }

    /// Why a host (its newest epoch `host`) is stale, if it is.
    fn host_stale(
        &self,
        id: &str,
        epochs: &Epochs,
        host: &Host,
        prev: Option<&str>,
    ) -> Option<String> {
        if let (Some((rule, now)), Some(last)) = (self.liveness, host.last_word.time()) {
            if let Some(since) = rule.silent_since(last, now) {
                return Some(rule.reason(id, last, since));
            }
        }
        if let (Some(old), None) = (prev, host.last_round) {
            return Some(format!(
                "epoch changed from {old} to {}; waiting for a complete snapshot round",
                host.epoch
            ));
        }
        if let Some(r) = &host.loss_reason {
            return Some(r.clone());
        }
        if let Some(p) = host.pending.first() {
            return Some(p.reason.clone());
        }
        // Holes this host has no message after (in any of its epochs: an
        // older epoch's loss is closed with it): a lost message of its
        // would have been emitted before the hole's time, so a round taken
        // after that covers it.
        let mut per_lane: HashMap<&Lane, usize> = HashMap::new();
        for hole in &self.holes {
            let i = per_lane.entry(&hole.lane).or_insert(0);
            *i += 1;
            let seen = epochs
                .epochs
                .values()
                .filter_map(|h| h.holes_seen.get(&hole.lane).copied())
                .max()
                .unwrap_or(0);
            if *i > seen && !host.covered_since(hole.time, self.clock_skew_us) {
                return Some(format!(
                    "messages missing from {} {}, and no complete snapshot round of this host since",
                    hole.lane,
                    hole.at()
                ));
            }
        }
        None
    }

    /// Every domain present on some host, sorted by host, name and uuid.
    /// Until a host's newest epoch has a complete round, the domains it
    /// has said nothing of are shown from its older epochs (stale).
    pub fn domains(&self) -> Vec<DomainView> {
        let mut out = Vec::new();
        // Per view, when its host is a migration's waiting destination.
        let mut incoming: Vec<Option<i64>> = Vec::new();
        for (host_id, epochs) in &self.hosts {
            let Some((host, prev)) = Self::newest(epochs) else {
                continue;
            };
            let host_stale = self.host_stale(host_id, epochs, host, prev);
            let mut shown: Vec<(&String, &Dom, bool)> =
                host.domains.iter().map(|(u, d)| (u, d, false)).collect();
            if host.last_round.is_none() {
                // Newest epoch first, so the newest word on a domain wins.
                let mut older = epochs.order.oldest_first();
                older.pop();
                let mut seen: HashSet<&String> = host.domains.keys().collect();
                for e in older.iter().rev() {
                    for (u, d) in &epochs.epochs[*e].domains {
                        if seen.insert(u) {
                            shown.push((u, d, true));
                        }
                    }
                }
            }
            for (uuid, d, carried) in shown {
                if d.deleted {
                    continue;
                }
                let own = if carried {
                    None
                } else {
                    d.stale_reason.clone()
                };
                let stale_reason = own.or_else(|| host_stale.clone());
                out.push(DomainView {
                    host_id: host_id.clone(),
                    uuid: uuid.clone(),
                    name: d.name.clone(),
                    state: d.state.state.as_str().to_owned(),
                    reason: d.state.reason.clone(),
                    persistent: d.persistent,
                    autostart: d.autostart,
                    vcpus: d.vcpus,
                    memory_kib: d.memory_kib,
                    config_hash: d.config_hash.clone(),
                    seq: d.seq,
                    epoch: host.epoch.clone(),
                    observed_at: d.observed_at,
                    stale: stale_reason.is_some(),
                    stale_reason,
                    migration: None,
                });
                incoming.push(d.incoming_since);
            }
        }
        mark_migrations(&mut out, &incoming);
        out.sort_by(|a, b| (&a.host_id, &a.name, &a.uuid).cmp(&(&b.host_id, &b.name, &b.uuid)));
        out
    }

    /// Hosts seen, with their newest epoch and whether they are stale.
    pub fn hosts(&self) -> Vec<HostView> {
        let mut out: Vec<HostView> = self
            .hosts
            .iter()
            .filter_map(|(id, epochs)| {
                let (h, prev) = Self::newest(epochs)?;
                let stale_reason = self.host_stale(id, epochs, h, prev);
                Some(HostView {
                    host_id: id.clone(),
                    epoch: h.epoch.clone(),
                    complete_round: h.last_round.is_some(),
                    last_heartbeat: h.last_heartbeat.as_ref().map(|b| b.observed_at),
                    stale: stale_reason.is_some(),
                    stale_reason,
                })
            })
            .collect();
        out.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        out
    }
}

/// States in which a domain exists and runs or could run on its host.
fn active(state: &str) -> bool {
    matches!(
        state,
        "RUNNING" | "BLOCKED" | "PAUSED" | "SHUTDOWN" | "PMSUSPENDED"
    )
}

/// Marks the views of a domain under migration: a destination waiting
/// for it (`incoming[i]`) and another host where the domain is active.
/// With more than one active source (impossible in libvirt, but a stale
/// host could show one), the first by host id is named.
fn mark_migrations(views: &mut [DomainView], incoming: &[Option<i64>]) {
    let mut found = Vec::new();
    for (i, since) in incoming.iter().enumerate() {
        let Some(since) = since else { continue };
        let to = &views[i];
        let from = views
            .iter()
            .enumerate()
            .filter(|(j, v)| *j != i && v.uuid == to.uuid && active(&v.state))
            .map(|(j, v)| (j, v.host_id.clone()))
            .min_by(|a, b| a.1.cmp(&b.1));
        if let Some((j, from)) = from {
            let m = Migration {
                from,
                to: to.host_id.clone(),
                since: *since,
            };
            found.push((i, j, m));
        }
    }
    for (i, j, m) in found {
        views[j].migration = Some(m.clone());
        views[i].migration = Some(m);
    }
}

/// One host, as rebuilt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostView {
    pub host_id: String,
    pub epoch: String,
    /// A complete snapshot round was found.
    pub complete_round: bool,
    /// Agent time of the newest heartbeat read (µs).
    pub last_heartbeat: Option<i64>,
    pub stale: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_reason: Option<String>,
}
