//! The report stage of the consumer pipeline: every rendering of what the
//! tools found, as text. Nothing here reads a bus or decides anything;
//! the binary only writes these out.
//!
//! Invariants: outputs are stable (the tools' documented formats): JSON is
//! pretty-printed and newline-terminated; the state table's columns are
//! padded to their widest cell, two spaces apart, with no trailing blanks;
//! usage CSV numbers have six decimals and text fields are quoted.

use std::fmt::Write as _;

use serde::Serialize;

use super::audit::{AuditReport, DomainLabel, Finding, HostSummary, Problem, ProblemKind};
use super::bus::Message;
use super::rebuild::{DomainView, HostView};
use super::usage::UsageRow;
use super::ReadOutcome;

/// Pretty JSON and a newline (`--format json` of every tool).
pub fn json<T: Serialize + ?Sized>(value: &T) -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(value).unwrap_or_default()
    )
}

/// Undecodable messages of a read, one diagnostic each.
pub fn undecodable(out: &ReadOutcome) -> Vec<String> {
    out.undecodable
        .iter()
        .map(|(pos, why)| format!("{pos}: cannot decode: {why}"))
        .collect()
}

/// Stale hosts, one diagnostic each.
pub fn stale_hosts(hosts: &[HostView]) -> Vec<String> {
    hosts
        .iter()
        .filter(|h| h.stale)
        .map(|h| {
            format!(
                "host {} is stale: {}",
                h.host_id,
                h.stale_reason.as_deref().unwrap_or("")
            )
        })
        .collect()
}

/// Migrations under way, one diagnostic per domain.
pub fn migrations(domains: &[DomainView]) -> Vec<String> {
    domains
        .iter()
        .filter_map(|d| d.migration.as_ref().map(|m| (d, m)))
        .filter(|(d, m)| d.host_id == m.to)
        .map(|(d, m)| {
            format!(
                "domain {} ({}) is migrating from {} to {} since {}",
                d.name,
                d.uuid,
                m.from,
                m.to,
                crate::codec::rfc3339_micros(m.since)
            )
        })
        .collect()
}

/// `state --format table`.
pub fn state_table(domains: &[DomainView]) -> String {
    let mut rows = vec![[
        "HOST",
        "NAME",
        "UUID",
        "STATE",
        "REASON",
        "PERSISTENT",
        "VCPUS",
        "MEMORY_KIB",
        "SEQ",
        "STALE",
    ]
    .map(String::from)];
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for d in domains {
        rows.push([
            d.host_id.clone(),
            d.name.clone(),
            d.uuid.clone(),
            d.state.clone(),
            d.reason.clone(),
            d.persistent.to_string(),
            opt(d.vcpus.map(|v| v.to_string())),
            opt(d.memory_kib.map(|v| v.to_string())),
            d.seq.to_string(),
            if d.stale { "yes" } else { "no" }.into(),
        ]);
    }
    let widths: Vec<usize> = (0..10)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// `usage --format csv`.
pub fn usage_csv(rows: &[UsageRow]) -> String {
    let mut text = String::from(
        "host_id,uuid,name,running_seconds,paused_seconds,vcpu_seconds,memory_gib_seconds,unknown_seconds,stale,stale_reason\n",
    );
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    for r in rows {
        text.push_str(&format!(
            "{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{},{}\n",
            quote(&r.host_id),
            r.uuid,
            quote(&r.name),
            r.running_seconds,
            r.paused_seconds,
            r.vcpu_seconds,
            r.memory_gib_seconds,
            r.unknown_seconds,
            r.stale,
            quote(r.stale_reason.as_deref().unwrap_or(""))
        ));
    }
    text
}

/// The CloudEvents `type` of a usage record.
pub const CE_TYPE_USAGE: &str = "io.virtstream.usage.v1";

/// One usage CloudEvent, rendered, with what publishing it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    /// `usage:<host>:<uuid>:<from_us>:<to_us>`: the same for the same
    /// host, domain and window on every run.
    pub id: String,
    /// The tenant when a tenant rule found one, else the domain uuid.
    pub subject: String,
    pub host_id: String,
    pub uuid: String,
    /// The event in structured JSON mode, one line without its newline.
    pub json: String,
}

/// `usage --format cloudevents`: one CloudEvent in structured JSON mode per
/// (host, domain) row and window. The `id` is made of the host, the
/// domain and the window, so running the same window again gives the same
/// ids and a metering system that deduplicates by `source` + `id`
/// (OpenMeter does) counts each window once. `time` is the window's end;
/// `data` holds the figures with `window_start` inclusive and `window_end`
/// exclusive (RFC 3339, µs).
///
/// With `tenants` (a tenant rule is configured), `subject` is the row's
/// tenant when one was found, else the domain uuid, and `data.tenant` is
/// the tenant or null; without, `subject` is the domain uuid and `data`
/// has no `tenant`.
pub fn usage_events(rows: &[UsageRow], from_us: i64, to_us: i64, tenants: bool) -> Vec<UsageEvent> {
    let start = crate::codec::rfc3339_micros(from_us);
    let end = crate::codec::rfc3339_micros(to_us);
    rows.iter()
        .map(|r| {
            let id = format!("usage:{}:{}:{}:{}", r.host_id, r.uuid, from_us, to_us);
            let subject = match (tenants, &r.tenant) {
                (true, Some(t)) => t.clone(),
                _ => r.uuid.clone(),
            };
            let mut data = serde_json::json!({
                "host_id": r.host_id,
                "domain_uuid": r.uuid,
                "domain_name": r.name,
                "running_seconds": r.running_seconds,
                "paused_seconds": r.paused_seconds,
                "vcpu_seconds": r.vcpu_seconds,
                "memory_gib_seconds": r.memory_gib_seconds,
                "unknown_seconds": r.unknown_seconds,
                "stale": r.stale,
                "window_start": start,
                "window_end": end,
            });
            if tenants {
                data["tenant"] = r.tenant.clone().into();
            }
            let event = serde_json::json!({
                "specversion": "1.0",
                "type": CE_TYPE_USAGE,
                "id": id,
                "source": format!("virtstream://{}", r.host_id),
                "subject": subject,
                "time": end,
                "datacontenttype": "application/json",
                "data": data,
            });
            UsageEvent {
                id,
                subject,
                host_id: r.host_id.clone(),
                uuid: r.uuid.clone(),
                json: event.to_string(),
            }
        })
        .collect()
}

/// [`usage_events`] as text, one event per line.
pub fn usage_cloudevents(events: &[UsageEvent]) -> String {
    let mut text = String::new();
    for e in events {
        text.push_str(&e.json);
        text.push('\n');
    }
    text
}

/// `audit --format json`: the report, each finding with its sentence as
/// `message`.
pub fn audit_json(report: &AuditReport) -> String {
    #[derive(Serialize)]
    struct Report<'a> {
        continuous: bool,
        records: u64,
        hosts: &'a [HostSummary],
        problems: Vec<Entry<'a>>,
        notices: Vec<Entry<'a>>,
    }
    #[derive(Serialize)]
    struct Entry<'a> {
        kind: ProblemKind,
        #[serde(skip_serializing_if = "Option::is_none")]
        host_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        uuid: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        at: Option<&'a str>,
        message: String,
    }
    fn entries(list: &[Problem]) -> Vec<Entry<'_>> {
        list.iter()
            .map(|p| Entry {
                kind: p.kind,
                host_id: p.host_id.as_deref(),
                epoch: p.epoch.as_deref(),
                uuid: p.uuid.as_deref(),
                at: p.at.as_deref(),
                message: sentence(&p.finding),
            })
            .collect()
    }
    json(&Report {
        continuous: report.continuous,
        records: report.records,
        hosts: &report.hosts,
        problems: entries(&report.problems),
        notices: entries(&report.notices),
    })
}

/// One finding of the audit as a sentence (the `message` of its JSON
/// entry and its line in the text).
pub fn sentence(finding: &Finding) -> String {
    let label = |d: &DomainLabel| format!("domain {} ({}) on {}", d.uuid, d.name, d.host);
    let time = crate::codec::rfc3339_micros;
    match finding {
        Finding::Undecodable { at, why } => format!("message at {at} cannot be decoded: {why}"),
        Finding::LaneHole {
            lane,
            first,
            last,
            prev,
            next,
        } => {
            let what = if first == last {
                format!("{first} is")
            } else {
                format!("{first}..={last} are")
            };
            format!("{lane}: position {what} missing (deleted or lost), between {prev} and {next}")
        }
        Finding::LaneEnd {
            lane,
            first,
            last,
            read,
        } => format!(
            "{lane}: positions {first}..={last} are missing at its end (deleted or lost){}",
            read.map(|r| format!(", after position {r}"))
                .unwrap_or_default()
        ),
        Finding::HostSeqAgain {
            host,
            epoch,
            host_seq,
            at,
            first,
        } => format!("host {host} epoch {epoch}: host_seq {host_seq} read again at {at} (first at {first})"),
        Finding::SeqAfterOrigin { domain, seq, at } => format!(
            "{}: seq 1..={} missing before {at} (the stream was read from its beginning)",
            label(domain),
            seq.saturating_sub(1)
        ),
        Finding::SeqMissing {
            domain,
            last,
            seq,
            at,
        } => {
            let missing = if *seq == last.saturating_add(2) {
                format!("seq {} is", last.saturating_add(1))
            } else {
                format!("seq {}..={} are", last.saturating_add(1), seq.saturating_sub(1))
            };
            format!("{}: {missing} missing before {at} (seq {seq})", label(domain))
        }
        Finding::SeqAgain { domain, seq, at } => {
            format!("{}: seq {seq} read again at {at}", label(domain))
        }
        Finding::SeqBack {
            domain,
            seq,
            last,
            at,
        } => format!("{}: seq {seq} at {at} comes after seq {last}", label(domain)),
        Finding::SnapshotAhead {
            domain,
            at,
            snap_seq,
            events_end,
        } => format!(
            "{}: the snapshot at {at} reflects seq {snap_seq}, but events read before it end at seq {events_end}",
            label(domain)
        ),
        Finding::EpochReplaced { host, old, new } => format!(
            "host {host}: epoch {old} replaced by {new} (journal recreated; counters restarted, state is known again from its next complete round)"
        ),
        Finding::ReportedGap {
            host,
            cause,
            at,
            repaired,
        } => format!(
            "host {host}: the agent reported lost libvirt events ({cause}) at {at}{}",
            if *repaired {
                "; a complete snapshot round followed"
            } else {
                "; no complete snapshot round after it was read"
            }
        ),
        Finding::SilenceBetween { host, from, to } => format!(
            "host {host}: no heartbeat between {} ({}) and {} ({})",
            time(from.0),
            from.1,
            time(to.0),
            to.1
        ),
        Finding::SilentSince {
            host,
            last_us,
            at,
            now_us,
            rule,
        } => format!(
            "host {host}: last heartbeat at {} ({at}), {} s before the audit; expected every {} s, silent after {} missed",
            time(*last_us),
            now_us.saturating_sub(*last_us) / 1_000_000,
            rule.heartbeat_us as f64 / 1e6,
            rule.multiple
        ),
        Finding::NoHeartbeat { host } => format!("host {host}: no heartbeat or snapshot round read"),
    }
}

/// `audit --format text`.
pub fn audit_text(report: &AuditReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "records read: {}", report.records);
    for h in &report.hosts {
        let _ = writeln!(
            s,
            "host {} epoch {}: {} events, {} snapshot records, {} domains, host_seq {}..={}",
            h.host_id,
            h.epoch,
            h.events,
            h.snapshot_records,
            h.domains,
            h.first_host_seq,
            h.last_host_seq
        );
    }
    for n in &report.notices {
        let _ = writeln!(s, "notice {:?}: {}", n.kind, sentence(&n.finding));
    }
    for p in &report.problems {
        let _ = writeln!(s, "PROBLEM {:?}: {}", p.kind, sentence(&p.finding));
    }
    let _ = writeln!(
        s,
        "{}",
        if report.continuous {
            "continuous: no gaps, duplicates, reorderings or epoch changes".to_string()
        } else {
            format!("NOT continuous: {} problem(s)", report.problems.len())
        }
    );
    s
}

/// One line of `replay` (without its newline): the decoded message and
/// where it was read (`stream_seq` and `subject` on NATS; `topic`,
/// `partition` and `offset` on Kafka).
pub fn replay_line(mut json: serde_json::Value, msg: &Message<'_>) -> String {
    if let Some(obj) = json.as_object_mut() {
        let pos = msg.pos;
        match (pos.partition, msg.subject) {
            (Some(p), _) => {
                obj.insert("topic".into(), pos.source.as_ref().into());
                obj.insert("partition".into(), p.into());
                obj.insert("offset".into(), pos.offset.into());
            }
            (None, subject) => {
                obj.insert("stream_seq".into(), pos.offset.into());
                obj.insert("subject".into(), subject.unwrap_or_default().into());
            }
        }
    }
    json.to_string()
}

/// `replay`'s diagnostic for a message it cannot decode.
pub fn replay_undecodable(msg: &Message<'_>, why: &str) -> String {
    let pos = msg.pos;
    match pos.partition {
        Some(p) => format!("partition {p} offset {}: cannot decode: {why}", pos.offset),
        None => format!(
            "stream_seq {} ({}): cannot decode: {why}",
            pos.offset,
            msg.subject.unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::liveness::Liveness;
    use crate::consumer::rebuild::tests::pos;

    #[test]
    fn every_audit_finding_reads_as_its_sentence() {
        let d = DomainLabel {
            uuid: "u1".into(),
            name: "vm-1".into(),
            host: "h".into(),
        };
        let host = || "h".to_string();
        let cases = [
            (
                Finding::Undecodable { at: pos("EV", 4), why: "bad magic".into() },
                "message at EV stream seq 4 cannot be decoded: bad magic",
            ),
            (
                Finding::LaneHole { lane: pos("EV", 1).lane(), first: 2, last: 2, prev: pos("EV", 1), next: pos("EV", 3) },
                "EV: position 2 is missing (deleted or lost), between EV stream seq 1 and EV stream seq 3",
            ),
            (
                Finding::LaneHole { lane: pos("EV", 1).lane(), first: 2, last: 5, prev: pos("EV", 1), next: pos("EV", 6) },
                "EV: position 2..=5 are missing (deleted or lost), between EV stream seq 1 and EV stream seq 6",
            ),
            (
                Finding::LaneEnd { lane: pos("EV", 1).lane(), first: 2, last: 3, read: Some(1) },
                "EV: positions 2..=3 are missing at its end (deleted or lost), after position 1",
            ),
            (
                Finding::LaneEnd { lane: pos("EV", 1).lane(), first: 0, last: 3, read: None },
                "EV: positions 0..=3 are missing at its end (deleted or lost)",
            ),
            (
                Finding::HostSeqAgain { host: host(), epoch: "e".into(), host_seq: 7, at: pos("EV", 9), first: pos("EV", 8) },
                "host h epoch e: host_seq 7 read again at EV stream seq 9 (first at EV stream seq 8)",
            ),
            (
                Finding::SeqAfterOrigin { domain: d.clone(), seq: 3, at: pos("EV", 1) },
                "domain u1 (vm-1) on h: seq 1..=2 missing before EV stream seq 1 (the stream was read from its beginning)",
            ),
            (
                Finding::SeqMissing { domain: d.clone(), last: 1, seq: 3, at: pos("EV", 5) },
                "domain u1 (vm-1) on h: seq 2 is missing before EV stream seq 5 (seq 3)",
            ),
            (
                Finding::SeqMissing { domain: d.clone(), last: 1, seq: 5, at: pos("EV", 5) },
                "domain u1 (vm-1) on h: seq 2..=4 are missing before EV stream seq 5 (seq 5)",
            ),
            (
                Finding::SeqAgain { domain: d.clone(), seq: 4, at: pos("EV", 6) },
                "domain u1 (vm-1) on h: seq 4 read again at EV stream seq 6",
            ),
            (
                Finding::SeqBack { domain: d.clone(), seq: 2, last: 4, at: pos("EV", 6) },
                "domain u1 (vm-1) on h: seq 2 at EV stream seq 6 comes after seq 4",
            ),
            (
                Finding::SnapshotAhead { domain: d, at: pos("SN", 2), snap_seq: 6, events_end: 4 },
                "domain u1 (vm-1) on h: the snapshot at SN stream seq 2 reflects seq 6, but events read before it end at seq 4",
            ),
            (
                Finding::EpochReplaced { host: host(), old: "e1".into(), new: "e2".into() },
                "host h: epoch e1 replaced by e2 (journal recreated; counters restarted, state is known again from its next complete round)",
            ),
            (
                Finding::ReportedGap { host: host(), cause: "QUEUE_OVERFLOW".into(), at: pos("EV", 3), repaired: true },
                "host h: the agent reported lost libvirt events (QUEUE_OVERFLOW) at EV stream seq 3; a complete snapshot round followed",
            ),
            (
                Finding::ReportedGap { host: host(), cause: "QUEUE_OVERFLOW".into(), at: pos("EV", 3), repaired: false },
                "host h: the agent reported lost libvirt events (QUEUE_OVERFLOW) at EV stream seq 3; no complete snapshot round after it was read",
            ),
            (
                Finding::SilenceBetween { host: host(), from: (1_000_000, pos("SN", 1)), to: (61_000_000, pos("SN", 2)) },
                "host h: no heartbeat between 1970-01-01T00:00:01.000000Z (SN stream seq 1) and 1970-01-01T00:01:01.000000Z (SN stream seq 2)",
            ),
            (
                Finding::SilentSince {
                    host: host(),
                    last_us: 1_000_000,
                    at: pos("SN", 1),
                    now_us: 91_500_000,
                    rule: Liveness::new(std::time::Duration::from_millis(2500), 3),
                },
                "host h: last heartbeat at 1970-01-01T00:00:01.000000Z (SN stream seq 1), 90 s before the audit; expected every 2.5 s, silent after 3 missed",
            ),
            (
                Finding::NoHeartbeat { host: host() },
                "host h: no heartbeat or snapshot round read",
            ),
        ];
        for (finding, want) in cases {
            assert_eq!(sentence(&finding), want, "{finding:?}");
        }
    }

    #[test]
    fn audit_json_gives_each_finding_its_sentence_and_omits_what_is_unknown() {
        let problem = Problem {
            kind: ProblemKind::Gap,
            host_id: Some("h".into()),
            epoch: Some("e".into()),
            uuid: None,
            at: Some("EV stream seq 4".into()),
            finding: Finding::NoHeartbeat { host: "h".into() },
        };
        let report = AuditReport {
            continuous: false,
            records: 3,
            hosts: vec![],
            problems: vec![problem.clone()],
            notices: vec![],
        };
        let out = audit_json(&report);
        assert!(out.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["continuous"], false);
        assert_eq!(v["records"], 3);
        assert_eq!(v["notices"], serde_json::json!([]));
        assert_eq!(
            v["problems"][0],
            serde_json::json!({
                "kind": "gap",
                "host_id": "h",
                "epoch": "e",
                "at": "EV stream seq 4",
                "message": "host h: no heartbeat or snapshot round read",
            })
        );
    }

    fn row(host: &str, name: &str, stale: Option<&str>) -> UsageRow {
        UsageRow {
            host_id: host.into(),
            uuid: "u".into(),
            name: name.into(),
            running_seconds: 1.5,
            paused_seconds: 0.0,
            vcpu_seconds: 3.0,
            memory_gib_seconds: 0.25,
            unknown_seconds: 0.0,
            stale: stale.is_some(),
            stale_reason: stale.map(str::to_owned),
            tenant: None,
        }
    }

    #[test]
    fn usage_cloudevents_ids_are_deterministic_per_host_domain_and_window() {
        let rows = [row("h1", "vm", None), row("h2", "vm", Some("silent"))];
        let a = usage_cloudevents(&usage_events(&rows, 1_000_000, 61_000_000, false));
        assert_eq!(
            a,
            usage_cloudevents(&usage_events(&rows, 1_000_000, 61_000_000, false))
        );
        let lines: Vec<serde_json::Value> = a
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let e = &lines[0];
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["type"], CE_TYPE_USAGE);
        assert_eq!(e["id"], "usage:h1:u:1000000:61000000");
        assert_eq!(e["source"], "virtstream://h1");
        assert_eq!(e["subject"], "u");
        assert_eq!(e["time"], "1970-01-01T00:01:01.000000Z");
        assert_eq!(e["data"]["window_start"], "1970-01-01T00:00:01.000000Z");
        assert_eq!(e["data"]["running_seconds"], 1.5);
        assert!(e["data"].get("tenant").is_none(), "no tenant rule");
        assert_ne!(lines[0]["id"], lines[1]["id"]);
        // Another window: other ids.
        let b = usage_cloudevents(&usage_events(&rows, 61_000_000, 121_000_000, false));
        assert!(!b.contains("usage:h1:u:1000000:61000000"));
    }

    #[test]
    fn with_a_tenant_rule_the_subject_is_the_tenant_or_the_uuid() {
        let mut found = row("h1", "vm", None);
        found.tenant = Some("project-1".into());
        let rows = [found, row("h2", "vm", None)];
        let events = usage_events(&rows, 0, 60_000_000, true);
        assert_eq!(events[0].subject, "project-1");
        assert_eq!(events[1].subject, "u");
        let e: serde_json::Value = serde_json::from_str(&events[0].json).unwrap();
        assert_eq!(e["subject"], "project-1");
        assert_eq!(e["data"]["tenant"], "project-1");
        assert_eq!(e["data"]["domain_uuid"], "u");
        let e: serde_json::Value = serde_json::from_str(&events[1].json).unwrap();
        assert_eq!(e["subject"], "u");
        assert!(e["data"]["tenant"].is_null());
        // The id does not depend on the tenant.
        assert_eq!(
            events[0].id,
            usage_events(&rows, 0, 60_000_000, false)[0].id
        );
    }

    #[test]
    fn usage_csv_quotes_text_and_fixes_decimals() {
        let csv = usage_csv(&[row("h", "a \"b\"", Some("why, then"))]);
        assert_eq!(
            csv.lines().nth(1).unwrap(),
            "\"h\",u,\"a \"\"b\"\"\",1.500000,0.000000,3.000000,0.250000,0.000000,true,\"why, then\""
        );
    }

    #[test]
    fn the_state_table_pads_columns_without_trailing_blanks() {
        let d = DomainView {
            host_id: "h".into(),
            uuid: "u".into(),
            name: "vm".into(),
            state: "RUNNING".into(),
            reason: "BOOTED".into(),
            persistent: true,
            autostart: None,
            vcpus: Some(2),
            memory_kib: None,
            config_hash: None,
            seq: 3,
            epoch: "e".into(),
            observed_at: 0,
            stale: false,
            stale_reason: None,
            migration: None,
        };
        let t = state_table(&[d]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "HOST  NAME  UUID  STATE    REASON  PERSISTENT  VCPUS  MEMORY_KIB  SEQ  STALE"
        );
        assert_eq!(
            lines[1],
            "h     vm    u     RUNNING  BOOTED  true        2      -           3    no"
        );
    }
}
