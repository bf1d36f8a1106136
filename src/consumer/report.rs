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

use super::audit::AuditReport;
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
        let _ = writeln!(s, "notice {:?}: {}", n.kind, n.message);
    }
    for p in &report.problems {
        let _ = writeln!(s, "PROBLEM {:?}: {}", p.kind, p.message);
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
