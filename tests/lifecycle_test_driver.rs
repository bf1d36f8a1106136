//! Scripted lifecycles on libvirtd's test driver (`test+unix:///default`):
//! what JetStream holds matches `virsh event` (the oracle) one to one, in
//! order per domain, with contiguous seq, unique host_seq, the right
//! state_after and persistence, and CloudEvents headers.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use virt::connect::Connect;
use virtstream::model::{DomainState, Origin};

/// The state an oracle event leaves a domain in (independent of the
/// agent's table), given the previous state.
fn expected_state(event: &str, prev: DomainState) -> DomainState {
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
fn check_domain(oracle: &Oracle, msgs: &[Stored], name: &str, persistent_until_undefine: bool) {
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
            e.memory_kib.is_none_or(|m| m == 8192),
            "{name} #{}: memory",
            i + 1
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
        assert_eq!(h.get("Nats-Msg-Id"), Some(&e.event_id.as_str()));
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

#[test]
fn scripted_lifecycle_matches_the_oracle() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::new(TEST_URI, Some(&nats.url()), "");
    agent.start();
    agent.wait_ready(Duration::from_secs(30));

    let conn = Connect::open(Some(TEST_URI)).unwrap();
    // Persistent domain: the full lifecycle.
    let p_name = unique("persist");
    let d = conn
        .define_domain_xml(&test_domain_xml(&p_name, &new_uuid()))
        .unwrap();
    d.create().unwrap();
    d.suspend().unwrap();
    d.resume().unwrap();
    d.destroy().unwrap();
    d.create().unwrap();
    d.shutdown().unwrap();
    d.undefine().unwrap();
    // Transient domain.
    let t_name = unique("transient");
    let t = conn
        .create_domain_xml(&test_domain_xml(&t_name, &new_uuid()), 0)
        .unwrap();
    t.suspend().unwrap();
    t.resume().unwrap();
    t.destroy().unwrap();
    // Burst: 200 suspend/resume pairs.
    let b_name = unique("burst");
    let b = conn
        .define_domain_xml(&test_domain_xml(&b_name, &new_uuid()))
        .unwrap();
    b.create().unwrap();
    for _ in 0..200 {
        b.suspend().unwrap();
        b.resume().unwrap();
    }
    b.destroy().unwrap();
    b.undefine().unwrap();

    let names = [p_name.clone(), t_name.clone(), b_name.clone()];
    // Wait until the oracle saw everything (the last undefine) ...
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while oracle.for_domain(&b_name).last().map(|e| e.event.as_str()) != Some("UNDEFINED") {
        assert!(
            std::time::Instant::now() < end,
            "oracle never saw the burst domain undefined"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let expected: usize = names.iter().map(|n| oracle.for_domain(n).len()).sum();
    assert!(expected >= 8 + 4 + 404, "oracle saw only {expected} events");
    // ... and JetStream holds as many for these domains.
    let msgs = wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(60),
        "all scripted events",
        |m| {
            m.iter()
                .filter(|s| names.contains(&s.event.domain.name))
                .count()
                >= expected
        },
    );
    assert_contiguous(&msgs);
    check_domain(&oracle, &msgs, &p_name, true);
    check_domain(&oracle, &msgs, &t_name, false);
    check_domain(&oracle, &msgs, &b_name, true);
    // The transient domain ends gone: not persistent, shut off.
    let last_t = msgs
        .iter()
        .rfind(|m| m.event.domain.name == t_name)
        .unwrap();
    assert_eq!(last_t.event.state_after.state, DomainState::SHUTOFF);
    assert!(!last_t.event.persistent);

    // replay decodes the same messages to JSON lines with stream sequences.
    let out = std::process::Command::new(Agent::bin())
        .args(["replay", "--bus", "nats", "--config"])
        .arg(&agent.config)
        .args([
            "--domain",
            &msgs
                .iter()
                .find(|m| m.event.domain.name == t_name)
                .unwrap()
                .event
                .domain
                .uuid,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let t_msgs: Vec<&Stored> = msgs
        .iter()
        .filter(|m| m.event.domain.name == t_name)
        .collect();
    assert_eq!(lines.len(), t_msgs.len());
    for (l, m) in lines.iter().zip(t_msgs) {
        assert_eq!(l["stream_seq"], m.stream_seq);
        assert_eq!(l["event_id"], m.event.event_id.as_str());
        assert_eq!(
            l["state_after"]["state"],
            m.event.state_after.state.as_str()
        );
    }

    // Metrics reflect what happened.
    let (code, metrics) = agent.http("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("virtstream_libvirt_events_received_total{event=\"SUSPENDED\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("virtstream_libvirt_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("virtstream_sink_published_total{sink=\"nats\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("virtstream_publish_latency_seconds_count{sink=\"nats\"}"),
        "{metrics}"
    );
    assert_eq!(agent.terminate(), Some(0), "SIGTERM is a clean exit");
}
