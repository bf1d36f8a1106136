//! `virsh event` as the independent oracle: what libvirt emitted, and the
//! comparison of one domain's published events with it.
//!
//! Invariants:
//! - the oracle is subscribed before it returns (a sentinel domain's
//!   events have been seen), and its connection keeps test-driver domains
//!   alive until it is dropped;
//! - a `virsh event` line it does not understand fails the test.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtstream::model::{DomainState, Origin};

use super::libvirtd::{new_uuid, qemu_domain_xml, test_domain_xml};
use super::records::Stored;
use super::unique;

/// A libvirt event as `virsh event` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleEvent {
    pub domain: String,
    /// `EventType` symbol, e.g. `STARTED`, or `REBOOT`.
    pub event: String,
    /// `Detail` symbol, e.g. `BOOTED`.
    pub detail: String,
}

/// `virsh event --all --loop --timestamp` as a record of what libvirt
/// emitted. It also keeps a connection open (the test driver forgets its
/// domains when the last connection closes).
pub struct Oracle {
    child: Child,
    pub events: Arc<Mutex<Vec<OracleEvent>>>,
}

fn map_virsh(ty: &str, detail: &str) -> Option<(String, String)> {
    let (event, details): (&str, &[(&str, &str)]) = match ty {
        "Defined" => (
            "DEFINED",
            &[
                ("Added", "ADDED"),
                ("Updated", "UPDATED"),
                ("Renamed", "RENAMED"),
                ("Snapshot", "FROM_SNAPSHOT"),
            ],
        ),
        "Undefined" => (
            "UNDEFINED",
            &[("Removed", "REMOVED"), ("Renamed", "RENAMED")],
        ),
        "Started" => (
            "STARTED",
            &[
                ("Booted", "BOOTED"),
                ("Migrated", "MIGRATED"),
                ("Restored", "RESTORED"),
                ("Snapshot", "FROM_SNAPSHOT"),
                ("Event wakeup", "WAKEUP"),
            ],
        ),
        "Suspended" => (
            "SUSPENDED",
            &[
                ("Paused", "PAUSED"),
                ("Migrated", "MIGRATED"),
                ("I/O Error", "IOERROR"),
                ("Watchdog", "WATCHDOG"),
                ("Restored", "RESTORED"),
                ("Snapshot", "FROM_SNAPSHOT"),
                ("API error", "API_ERROR"),
                ("Post-copy", "POSTCOPY"),
                ("Post-copy Error", "POSTCOPY_FAILED"),
            ],
        ),
        "Resumed" => (
            "RESUMED",
            &[
                ("Unpaused", "UNPAUSED"),
                ("Migrated", "MIGRATED"),
                ("Snapshot", "FROM_SNAPSHOT"),
                ("Post-copy", "POSTCOPY"),
                ("Post-copy Error", "POSTCOPY_FAILED"),
            ],
        ),
        "Stopped" => (
            "STOPPED",
            &[
                ("Shutdown", "SHUTDOWN"),
                ("Destroyed", "DESTROYED"),
                ("Crashed", "CRASHED"),
                ("Migrated", "MIGRATED"),
                ("Saved", "SAVED"),
                ("Failed", "FAILED"),
                ("Snapshot", "FROM_SNAPSHOT"),
            ],
        ),
        "Shutdown" => (
            "SHUTDOWN",
            &[
                ("Finished", "FINISHED"),
                ("Finished after guest request", "GUEST"),
                ("Finished after host request", "HOST"),
            ],
        ),
        "PMSuspended" => ("PMSUSPENDED", &[("Memory", "MEMORY"), ("Disk", "DISK")]),
        "Crashed" => (
            "CRASHED",
            &[("Panicked", "PANICKED"), ("Crashloaded", "CRASHLOADED")],
        ),
        _ => return None,
    };
    let d = details
        .iter()
        .find(|(s, _)| *s == detail)
        .map(|(_, d)| *d)?;
    Some((event.to_string(), d.to_string()))
}

fn parse_oracle_line(line: &str) -> Option<OracleEvent> {
    // 2026-11-22 02:45:38.454+0000: event 'lifecycle' for domain 'probe-t': Defined Added
    let rest = line.split_once("event '")?.1;
    let (kind, rest) = rest.split_once('\'')?;
    let rest = rest.split_once("for domain '")?.1;
    let (name, rest) = rest.rsplit_once('\'')?;
    match kind {
        "lifecycle" => {
            let text = rest.trim_start_matches(':').trim();
            let (ty, detail) = text.split_once(' ')?;
            let (event, detail) = map_virsh(ty, detail.trim())
                .unwrap_or_else(|| panic!("oracle line not understood: {line}"));
            Some(OracleEvent {
                domain: name.to_string(),
                event,
                detail,
            })
        }
        "reboot" => Some(OracleEvent {
            domain: name.to_string(),
            event: "REBOOT".into(),
            detail: "NONE".into(),
        }),
        _ => None,
    }
}

impl Oracle {
    pub fn start(uri: &str) -> Oracle {
        let mut child = Command::new("virsh")
            .args(["-c", uri, "event", "--all", "--loop", "--timestamp"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("virsh (libvirt-clients) must be installed: bash deploy/local-env.sh start");
        let events = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let ev = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(e) = parse_oracle_line(&line) {
                    ev.lock().unwrap().push(e);
                }
            }
        });
        let o = Oracle { child, events };
        // Sync: a sentinel domain's events prove virsh has registered.
        let conn = virt::connect::Connect::open(Some(uri)).unwrap();
        let name = unique("oracle-sync");
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let d = conn
                .define_domain_xml(&if uri.starts_with("test") {
                    test_domain_xml(&name, &new_uuid())
                } else {
                    qemu_domain_xml(&name, &new_uuid())
                })
                .unwrap();
            d.undefine().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            if o.events.lock().unwrap().iter().any(|e| e.domain == name) {
                break;
            }
            assert!(
                Instant::now() < end,
                "virsh event did not report anything within 20 s"
            );
        }
        o
    }

    /// The events for `domain`, in order.
    pub fn for_domain(&self, domain: &str) -> Vec<OracleEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.domain == domain)
            .cloned()
            .collect()
    }
}

impl Drop for Oracle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The state an oracle event leaves a domain in (independent of the
/// agent's table), given the previous state.
pub fn expected_state(event: &str, prev: DomainState) -> DomainState {
    match event {
        "STARTED" | "RESUMED" => DomainState::RUNNING,
        "SUSPENDED" => DomainState::PAUSED,
        "STOPPED" => DomainState::SHUTOFF,
        "SHUTDOWN" => DomainState::SHUTDOWN,
        "DEFINED" | "UNDEFINED" | "REBOOT" => prev,
        other => panic!("unexpected oracle event {other}"),
    }
}

/// Compares one domain's messages with the oracle, event by event.
pub fn check_domain(
    oracle: &Oracle,
    msgs: &[Stored],
    name: &str,
    persistent_until_undefine: bool,
    memory_kib: i64,
) {
    let want = oracle.for_domain(name);
    let got: Vec<&Stored> = msgs
        .iter()
        .filter(|m| m.event.domain.name == name && m.event.origin == Origin::LIBVIRT)
        .collect();
    let got_pairs: Vec<(String, String)> = got
        .iter()
        .map(|m| (m.event.event.to_string(), m.event.detail.to_string()))
        .collect();
    let want_pairs: Vec<(String, String)> = want
        .iter()
        .map(|e| (e.event.clone(), e.detail.clone()))
        .collect();
    assert_eq!(
        got_pairs, want_pairs,
        "events of {name} differ from virsh event"
    );
    assert!(
        msgs.iter()
            .filter(|m| m.event.domain.name == name)
            .all(|m| m.event.origin == Origin::LIBVIRT),
        "no reconcile events expected for {name}"
    );
    let mut state = DomainState::SHUTOFF;
    let mut persistent = false;
    for (i, m) in got.iter().enumerate() {
        let e = &m.event;
        assert_eq!(e.seq, i as u64 + 1, "{name}: seq contiguous from 1");
        state = expected_state(e.event.as_str(), state);
        assert_eq!(
            e.state_after.state,
            state,
            "{name} #{}: state_after after {}/{}",
            i + 1,
            e.event,
            e.detail
        );
        match e.event.as_str() {
            "DEFINED" => persistent = true,
            "UNDEFINED" => persistent = false,
            _ if i == 0 => persistent = persistent_until_undefine,
            _ => {}
        }
        assert_eq!(
            e.persistent,
            persistent,
            "{name} #{}: persistent after {}",
            i + 1,
            e.event
        );
        // Enrichment comes from lookups, which fail once a fast script has
        // already removed the domain: then the event is published with what
        // is known. What is there must be right.
        assert!(
            e.vcpus.is_none_or(|v| v == 1),
            "{name} #{}: vcpus {:?}",
            i + 1,
            e.vcpus
        );
        assert!(
            e.memory_kib.is_none_or(|m| m == memory_kib),
            "{name} #{}: memory {:?}",
            i + 1,
            e.memory_kib
        );
        assert!(e
            .config_hash
            .as_deref()
            .is_none_or(|h| h.starts_with("sha256:") && h.len() == 71));
        if state != DomainState::SHUTOFF {
            assert!(
                e.domain.id.is_some(),
                "{name} #{}: running domains carry their id",
                i + 1
            );
        } else {
            assert_eq!(e.domain.id, None);
        }
        // Subject, message id and CloudEvents headers.
        assert!(m.subject.ends_with(&e.domain.uuid));
        let h: HashMap<&str, &str> = m
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if m.subject.starts_with("kafka:") {
            // Kafka: keyed by the domain UUID.
            assert!(!h.contains_key("Nats-Msg-Id"));
        } else {
            assert_eq!(h.get("Nats-Msg-Id"), Some(&e.event_id.as_str()));
        }
        assert_eq!(h.get("ce_id"), Some(&e.event_id.as_str()));
        assert_eq!(h.get("ce_specversion"), Some(&"1.0"));
        assert_eq!(h.get("ce_type"), Some(&"io.virtstream.domain.event.v1"));
        assert_eq!(h.get("ce_subject"), Some(&e.domain.uuid.as_str()));
        assert_eq!(
            h.get("ce_source").map(|s| s.to_string()),
            Some(format!("virtstream://{}", e.host_id))
        );
        assert!(h.contains_key("ce_time") && h.contains_key("virtstream-schema-fingerprint"));
        assert_eq!(h.get("content-type"), Some(&"application/avro"));
    }
}
