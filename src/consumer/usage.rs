//! Billable usage over a time window, from the events (and snapshot
//! records) of every host: per (host, domain) running and paused seconds,
//! vCPU·seconds and GiB·seconds of memory.
//!
//! Rules:
//! - a domain's timeline is its events and snapshot records ordered by
//!   `host_seq`; the state between two of them is the earlier one's state,
//!   from its `observed_at` to the next one's;
//! - running = RUNNING, BLOCKED or SHUTDOWN (shutting down); paused =
//!   PAUSED or PMSUSPENDED; `vcpu_seconds` and `memory_gib_seconds` accrue
//!   while running (memory in GiB = memory_kib / 2^20);
//! - billed once: at any instant a domain (uuid) is billed on at most one
//!   host. Running beats paused; among hosts where it runs, the one where
//!   it started running last wins, so a migration bills the source until
//!   the destination's RESUMED/MIGRATED (docs/contract.md §4), and the destination's
//!   PAUSED/MIGRATION time while the source still runs is not billed;
//! - intervals are clipped to `[from, to)`; the state after a domain's last
//!   record lasts until `to`, unless its host fell silent (see `liveness`,
//!   judged at the earlier of `to` and now): from its last word plus the
//!   allowance on, the time is unknown, never billed;
//! - where messages are missing (a seq jump, a gap marker, a hole in a
//!   stream, an epoch change) nothing is guessed: that stretch counts as
//!   `unknown_seconds` and the row is `stale`, until the next record that
//!   states the domain's state again.
//!
//! - a host's epochs are ordered by stream position (see `epochs`), not by
//!   agent time; an epoch's timelines end where the next one begins.
//!
//! - with a tenant rule (`with_tenants`), each row names the tenant found
//!   in the domain's newest XML on the bus (see `tenant`).
//!
//! Usage is a `Feed`: holes in positions come from the lanes stage.
//!
//! Invariant: usage does not depend on the order or multiplicity in which
//! records were read (they are deduplicated and ordered by `host_seq`).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::epochs::EpochOrder;
use super::feed::Feed;
use super::hole::{Hole, HoleKind};
use super::liveness::{LastWord, Liveness};
use super::record::{Body, Lane, Record};
use super::tenant::{TenantRule, Tenants};
use crate::model::{DomainState, EventType};

/// One (host, domain) row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    pub host_id: String,
    pub uuid: String,
    pub name: String,
    pub running_seconds: f64,
    pub paused_seconds: f64,
    pub vcpu_seconds: f64,
    pub memory_gib_seconds: f64,
    /// Seconds in the window whose state is not known (messages missing).
    pub unknown_seconds: f64,
    pub stale: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_reason: Option<String>,
    /// The tenant found in the domain's newest XML (only with a tenant
    /// rule; see `tenant`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Running,
    Paused,
    Off,
}

fn kind(s: DomainState) -> Kind {
    match s {
        DomainState::RUNNING | DomainState::BLOCKED | DomainState::SHUTDOWN => Kind::Running,
        DomainState::PAUSED | DomainState::PMSUSPENDED => Kind::Paused,
        _ => Kind::Off,
    }
}

/// One known state of a domain.
#[derive(Debug, Clone)]
struct Point {
    /// The domain's seq; `from_snapshot` says whether this point is a
    /// snapshot (which repeats its seq) or an event (which bumps it).
    seq: u64,
    from_snapshot: bool,
    t: i64,
    kind: Kind,
    vcpus: Option<i32>,
    memory_kib: Option<i64>,
    name: String,
}

#[derive(Debug, Default)]
struct HostEpoch {
    first_seen: i64,
    last_seen: i64,
    /// Gap markers: host_seq and why.
    gaps: Vec<(u64, String)>,
    /// Holes read past: a message of this host with host_seq in (lo, hi)
    /// may be missing.
    holes: Vec<(u64, u64, String)>,
    /// Per lane: last host_seq of this host there and how many of the
    /// lane's holes it has read past.
    lane_last: HashMap<Lane, (u64, usize)>,
    last_word: LastWord,
}

/// A hole a host has no message after: its last host_seq in that lane,
/// the hole's time, and why.
type OpenHole = (u64, Option<i64>, String);

/// Collects records; [`Usage::compute`] then gives the rows.
#[derive(Debug, Default)]
pub struct Usage {
    /// (host, epoch, uuid) → host_seq → point.
    timelines: HashMap<(String, String, String), BTreeMap<u64, Point>>,
    hosts: HashMap<(String, String), HostEpoch>,
    /// Holes in lanes' positions (see `lanes`), in the order found. A
    /// lane's head gone (retention) is handled per domain instead (see
    /// `compute`).
    holes: Vec<Hole>,
    /// Per host, its epochs' order.
    epochs: HashMap<String, EpochOrder>,
    /// The silence rule and the time it is judged at (µs).
    liveness: Option<(Liveness, i64)>,
    /// The latest tenant per (host, domain), with a tenant rule.
    tenants: Option<Tenants>,
}

impl Usage {
    pub fn new() -> Usage {
        Usage::default()
    }

    /// Judges hosts silent by `liveness` at the earlier of `to` and
    /// `now_us`: a silent host's time after its last word plus the
    /// allowance is unknown.
    pub fn with_liveness(mut self, liveness: Liveness, now_us: i64) -> Usage {
        self.liveness = Some((liveness, now_us));
        self
    }

    /// Names each row's tenant, found by `rule` in the domain XML of the
    /// events and snapshot records read.
    pub fn with_tenants(mut self, rule: TenantRule) -> Usage {
        self.tenants = Some(Tenants::new(rule));
        self
    }

    /// Notes messages missing from a lane (see `lanes`). Holes only in
    /// the records between two read (the audit's view) are not losses
    /// here.
    pub fn hole(&mut self, hole: &Hole) {
        if hole.missing_from_lane() {
            self.holes.push(hole.clone());
        }
    }

    /// Adds one record, after the holes found before it; `contiguous` as
    /// for [`super::rebuild::Fleet::apply`].
    pub fn add(&mut self, rec: &Record, contiguous: bool) {
        let lane = rec.pos.lane();
        let (host, epoch, host_seq) = rec.body.origin();
        self.epochs.entry(host.to_owned()).or_default().note(
            epoch,
            &rec.pos,
            rec.body.observed_at(),
        );
        let he = self
            .hosts
            .entry((host.to_owned(), epoch.to_owned()))
            .or_insert_with(|| HostEpoch {
                first_seen: i64::MAX,
                last_seen: i64::MIN,
                ..HostEpoch::default()
            });
        if let Some(t) = rec.body.observed_at() {
            he.first_seen = he.first_seen.min(t);
            he.last_seen = he.last_seen.max(t);
        }
        he.last_word.note(
            host_seq,
            rec.body.observed_at(),
            matches!(rec.body, Body::Host(_)),
        );
        if contiguous {
            let (last, seen) = he.lane_last.get(&lane).cloned().unwrap_or((0, 0));
            let mut n = seen;
            for (i, hole) in self.holes.iter().filter(|h| h.lane == lane).enumerate() {
                n = i + 1;
                if i >= seen && !is_head(hole) {
                    he.holes.push((last, host_seq, hole.reason()));
                }
            }
            he.lane_last.insert(lane, (last.max(host_seq), n));
        }
        match &rec.body {
            Body::Event(e) if e.event == EventType::GAP => {
                he.gaps.push((
                    e.host_seq,
                    format!("the agent reported a gap ({}) at {}", e.detail, rec.pos),
                ));
            }
            Body::Event(e) => {
                if let Some(t) = &mut self.tenants {
                    t.note(
                        &e.host_id,
                        &e.epoch,
                        &e.domain.uuid,
                        e.host_seq,
                        e.xml.as_deref(),
                    );
                }
                self.timelines
                    .entry((e.host_id.clone(), e.epoch.clone(), e.domain.uuid.clone()))
                    .or_default()
                    .entry(e.host_seq)
                    .or_insert_with(|| Point {
                        seq: e.seq,
                        from_snapshot: false,
                        t: e.observed_at,
                        kind: kind(e.state_after.state),
                        vcpus: e.vcpus,
                        memory_kib: e.memory_kib,
                        name: e.domain.name.clone(),
                    });
            }
            Body::Domain(d) => {
                if let Some(t) = &mut self.tenants {
                    t.note(
                        &d.host_id,
                        &d.epoch,
                        &d.domain.uuid,
                        d.host_seq,
                        d.xml.as_deref(),
                    );
                }
                self.timelines
                    .entry((d.host_id.clone(), d.epoch.clone(), d.domain.uuid.clone()))
                    .or_default()
                    .entry(d.host_seq)
                    .or_insert_with(|| Point {
                        seq: d.seq,
                        from_snapshot: true,
                        t: d.observed_at,
                        kind: kind(d.state.state),
                        vcpus: d.vcpus,
                        memory_kib: d.memory_kib,
                        name: d.domain.name.clone(),
                    });
            }
            Body::Host(_) | Body::Tombstone(_) => {}
        }
    }

    /// Rows for `[from, to)` (µs since the Unix epoch), sorted by host,
    /// name and uuid. Domains with no time in the window are left out.
    pub fn compute(&self, from: i64, to: i64) -> Vec<UsageRow> {
        self.compute_with_skew(from, to, super::rebuild::DEFAULT_CLOCK_SKEW_US)
    }

    /// [`Self::compute`] with the clock skew allowed between agents and
    /// brokers when a hole is placed in time (µs).
    pub fn compute_with_skew(&self, from: i64, to: i64, skew: i64) -> Vec<UsageRow> {
        // The epochs of each host, oldest first (by position): an epoch's
        // timelines end where the next one begins.
        let epochs: HashMap<&str, Vec<&str>> = self
            .epochs
            .iter()
            .map(|(h, o)| (h.as_str(), o.oldest_first()))
            .collect();
        let next_epoch = |host: &str, epoch: &str| -> Option<i64> {
            let list = epochs.get(host)?;
            let i = list.iter().position(|e| *e == epoch)?;
            let next = list.get(i + 1)?;
            self.hosts
                .get(&(host.to_owned(), (*next).to_owned()))
                .map(|he| he.first_seen)
        };
        // Silent hosts (their newest epoch): since when, and why.
        let silent = |host: &str, epoch: &str| -> Option<(i64, String)> {
            let (rule, now) = self.liveness?;
            if epochs.get(host)?.last() != Some(&epoch) {
                return None;
            }
            let last = self.hosts[&(host.to_owned(), epoch.to_owned())]
                .last_word
                .time()?;
            let since = rule.silent_since(last, now.min(to))?;
            Some((since, rule.reason(host, last, since)))
        };
        // Per (host, uuid): the stretches of known state and of unknown.
        let mut spans: HashMap<(String, String), HostSpans> = HashMap::new();
        // Holes each host has no message after, in their lanes: its lost
        // message there would come after its last one and before the
        // hole's time. Once per host and epoch, not per domain.
        let open: HashMap<&(String, String), Vec<OpenHole>> = self
            .hosts
            .iter()
            .map(|(key, he)| {
                let mut per_lane: HashMap<&Lane, usize> = HashMap::new();
                let list = self
                    .holes
                    .iter()
                    .filter(|hole| {
                        let i = per_lane.entry(&hole.lane).or_insert(0);
                        *i += 1;
                        !is_head(hole) && he.lane_last.get(&hole.lane).map_or(0, |l| l.1) < *i
                    })
                    .map(|hole| {
                        (
                            he.lane_last.get(&hole.lane).map_or(0, |l| l.0),
                            hole.time,
                            hole.reason(),
                        )
                    })
                    .collect();
                (key, list)
            })
            .collect();
        for ((host, epoch, uuid), points) in &self.timelines {
            let key = (host.clone(), epoch.clone());
            let he = &self.hosts[&key];
            let open = &open[&key];
            let epoch_end = next_epoch(host, epoch);
            let silence = silent(host, epoch);
            let out = spans.entry((host.clone(), uuid.clone())).or_default();
            let pts: Vec<(&u64, &Point)> = points.iter().collect();
            if let Some((_, first)) = pts.first() {
                // History before the first record is known only when that
                // record is the domain's first event of the epoch.
                if (first.from_snapshot || first.seq != 1) && first.t > from {
                    out.unknown.push((from, first.t));
                    out.stale_reason.get_or_insert_with(|| {
                        format!(
                            "history on {host} before seq {} is not on the bus",
                            first.seq
                        )
                    });
                }
            }
            for (i, (hs, p)) in pts.iter().enumerate() {
                let next = pts.get(i + 1);
                let end_hs = next.map_or(u64::MAX, |(h, _)| **h);
                out.name.clone_from(&p.name);
                let doubt = match next {
                    Some((_, q)) => {
                        let expected = if q.from_snapshot {
                            p.seq
                        } else {
                            p.seq.saturating_add(1)
                        };
                        (q.seq != expected).then(|| {
                            format!("seq {} to {} on {host}: events missing", p.seq, q.seq)
                        })
                    }
                    None => None,
                }
                .or_else(|| he.loss_between(**hs, end_hs, p.t, open, skew));
                let mut push = |start: i64, end: i64, doubt: Option<String>| match doubt {
                    _ if end <= start => {}
                    Some(reason) => {
                        out.unknown.push((start, end));
                        out.stale_reason.get_or_insert(reason);
                    }
                    None => out.known.push(Span {
                        start,
                        end,
                        kind: p.kind,
                        vcpus: p.vcpus.unwrap_or(0),
                        memory_kib: p.memory_kib.unwrap_or(0),
                    }),
                };
                match (next, epoch_end) {
                    (Some((_, q)), _) => push(p.t, q.t, doubt),
                    (None, None) => match &silence {
                        // The host fell silent: known until its last word
                        // plus the allowance, unknown after.
                        Some((since, why)) => {
                            let since = (*since).max(p.t);
                            push(p.t, since, doubt);
                            push(since, to, Some(why.clone()));
                        }
                        None => push(p.t, to, doubt),
                    },
                    (None, Some(new_epoch)) => {
                        // The journal was recreated: this epoch's agent
                        // vouches for the state until its last message; what
                        // happened until the new epoch began is not known.
                        // (With a clock stepped back across the recreation,
                        // the new epoch may seem to begin before this point:
                        // nothing is billed for such an overlap.)
                        let vouched = he.last_seen.min(new_epoch).max(p.t);
                        push(p.t, vouched, doubt);
                        push(
                            vouched,
                            new_epoch.max(vouched),
                            Some(format!(
                                "the journal of {host} was recreated (epoch {epoch} ended)"
                            )),
                        );
                    }
                }
            }
        }
        let mut rows = bill(spans, from, to);
        if let Some(t) = &self.tenants {
            for r in &mut rows {
                let mut newest_first = epochs.get(r.host_id.as_str()).cloned().unwrap_or_default();
                newest_first.reverse();
                r.tenant = t.of(&r.host_id, &r.uuid, &newest_first);
            }
        }
        rows
    }
}

impl Feed for Usage {
    fn record(&mut self, rec: &Record, contiguous: bool) {
        self.add(rec, contiguous)
    }
    fn hole(&mut self, hole: &Hole) {
        Usage::hole(self, hole)
    }
}

/// Before a lane's first message read: the missing history is handled
/// per domain (see `compute`).
fn is_head(hole: &Hole) -> bool {
    matches!(hole.kind, HoleKind::Head { .. })
}

impl HostEpoch {
    /// Why messages of this host with host_seq in (a, b), after time
    /// `a_time`, may be missing.
    fn loss_between(
        &self,
        a: u64,
        b: u64,
        a_time: i64,
        open: &[OpenHole],
        skew: i64,
    ) -> Option<String> {
        if let Some((_, why)) = self.gaps.iter().find(|(g, _)| *g > a && *g < b) {
            return Some(why.clone());
        }
        let open_hit = open.iter().find(|(last, time, _)| {
            *last < b && time.is_none_or(|t| a_time <= t.saturating_add(skew))
        });
        if let Some((_, _, why)) = open_hit {
            return Some(why.clone());
        }
        self.holes
            .iter()
            .find(|(lo, hi, _)| *lo < b && *hi > a)
            .map(|(_, _, why)| why.clone())
    }
}

#[derive(Debug, Clone, Copy)]
struct Span {
    start: i64,
    end: i64,
    kind: Kind,
    vcpus: i32,
    memory_kib: i64,
}

#[derive(Debug, Default)]
struct HostSpans {
    name: String,
    known: Vec<Span>,
    unknown: Vec<(i64, i64)>,
    stale_reason: Option<String>,
}

/// Splits every domain's time among its hosts (billed once) and sums.
fn bill(spans: HashMap<(String, String), HostSpans>, from: i64, to: i64) -> Vec<UsageRow> {
    let mut by_uuid: HashMap<&str, Vec<(&str, &HostSpans)>> = HashMap::new();
    for ((host, uuid), s) in &spans {
        by_uuid.entry(uuid).or_default().push((host, s));
    }
    let mut rows = Vec::new();
    for (uuid, hosts) in by_uuid {
        // Run start per host span: the start of the unbroken running
        // stretch it belongs to (a vcpu change does not restart it).
        let mut runs: Vec<(usize, Span, i64)> = Vec::new();
        for (i, (_, s)) in hosts.iter().enumerate() {
            let mut known = s.known.clone();
            known.sort_by_key(|k| k.start);
            let mut run_start = i64::MIN;
            let mut last: Option<Span> = None;
            for k in known {
                let continues = last.is_some_and(|l| l.end == k.start && l.kind != Kind::Off);
                if !continues {
                    run_start = k.start;
                }
                last = Some(k);
                runs.push((i, k, run_start));
            }
        }
        let mut bounds: Vec<i64> = runs
            .iter()
            .flat_map(|(_, s, _)| [s.start, s.end])
            .chain([from, to])
            .filter(|t| *t >= from && *t <= to)
            .collect();
        bounds.sort_unstable();
        bounds.dedup();
        let mut acc = vec![[0f64; 4]; hosts.len()];
        for w in bounds.windows(2) {
            let (a, b) = (w[0], w[1]);
            let secs = (b as f64 - a as f64) / 1e6;
            let covering = runs.iter().filter(|(_, s, _)| s.start <= a && s.end >= b);
            let owner = covering
                .clone()
                .filter(|(_, s, _)| s.kind == Kind::Running)
                .max_by_key(|(i, _, r)| (*r, hosts[*i].0))
                .or_else(|| {
                    covering
                        .filter(|(_, s, _)| s.kind == Kind::Paused)
                        .max_by_key(|(i, _, r)| (*r, hosts[*i].0))
                });
            if let Some((i, s, _)) = owner {
                let a = &mut acc[*i];
                match s.kind {
                    Kind::Running => {
                        a[0] += secs;
                        a[2] += secs * s.vcpus as f64;
                        a[3] += secs * s.memory_kib as f64 / (1u64 << 20) as f64;
                    }
                    Kind::Paused => a[1] += secs,
                    Kind::Off => {}
                }
            }
        }
        for (i, (host, s)) in hosts.iter().enumerate() {
            let unknown: f64 = s
                .unknown
                .iter()
                .map(|(a, b)| ((*b).min(to) as f64 - (*a).max(from) as f64).max(0.0) / 1e6)
                // Not `sum()`: an empty f64 sum is -0.0, which JSON shows.
                .fold(0.0, |x, y| x + y);
            let a = acc[i];
            let in_window = s
                .known
                .iter()
                .any(|k| k.start < to && k.end > from && k.kind != Kind::Off);
            if !in_window && unknown == 0.0 {
                continue;
            }
            let stale = unknown > 0.0;
            rows.push(UsageRow {
                host_id: (*host).to_owned(),
                uuid: uuid.to_owned(),
                name: s.name.clone(),
                running_seconds: a[0],
                paused_seconds: a[1],
                vcpu_seconds: a[2],
                memory_gib_seconds: a[3],
                unknown_seconds: unknown,
                stale,
                stale_reason: if stale { s.stale_reason.clone() } else { None },
                tenant: None,
            });
        }
    }
    rows.sort_by(|a, b| (&a.host_id, &a.name, &a.uuid).cmp(&(&b.host_id, &b.name, &b.uuid)));
    rows
}

#[cfg(test)]
#[path = "usage_tests.rs"]
mod tests;
