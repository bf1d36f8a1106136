//! Gaps the agent knows about are announced, then repaired: a hand-off
//! queue overflow (tiny queue) and a full journal (tiny bound while NATS is
//! down) each give a gap marker followed by a reconcile that brings the
//! stream back to libvirt's state; a complete snapshot round follows each
//! marker, and nothing (no heartbeat, no round) is journaled while full.
//! With two sinks, a frozen Kafka broker fills the journal and new events
//! stop for the healthy NATS sink too; both get the marker and the repair.

mod common;

use std::time::{Duration, Instant};

use common::*;
use virt::connect::Connect;
use virtstream::model::{DomainState, Origin};

/// The tests of this file run one at a time: each agent journals every
/// domain on the shared test driver, so one test's burst (the overflow
/// test's 401 events included) would fill another's tiny journal, and the
/// gap listing that follows would race that test's own domain's events.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Destroys and undefines a test domain also when the test fails: a
/// leftover on the shared test driver grows every other agent's rounds.
struct Undefine(String);

impl Drop for Undefine {
    fn drop(&mut self) {
        for cmd in ["destroy", "undefine"] {
            let _ = std::process::Command::new("virsh")
                .args(["-c", TEST_URI, cmd, &self.0])
                .output();
        }
    }
}

#[test]
fn queue_overflow_gives_gap_marker_then_reconcile() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    ensure_libvirtd();
    let nats = NatsServer::start();
    let _oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::new(TEST_URI, Some(&nats.url()), "");
    // A one-slot queue: a burst cannot fit.
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        cfg.replace("[libvirt]\n", "[libvirt]\nqueue_capacity = 1\n"),
    )
    .unwrap();
    agent.start();
    agent.wait_ready(Duration::from_secs(30));

    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let name = unique("overflow");
    let d = conn
        .define_domain_xml(&test_domain_xml(&name, &new_uuid()))
        .unwrap();
    d.create().unwrap();
    for _ in 0..200 {
        d.suspend().unwrap();
        d.resume().unwrap();
    }
    d.suspend().unwrap(); // final state: paused

    let msgs = wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(60),
        "overflow repaired",
        |m| {
            m.iter()
                .rfind(|s| s.event.domain.name == name)
                .is_some_and(|s| s.event.state_after.state == DomainState::PAUSED)
                && m.iter()
                    .any(|s| s.event.detail.as_str() == "QUEUE_OVERFLOW")
        },
    );
    assert_contiguous(&msgs);
    assert!(agent.metric("virtstream_libvirt_events_dropped_total") > 0.0);
    let gap = msgs
        .iter()
        .find(|s| s.event.detail.as_str() == "QUEUE_OVERFLOW")
        .unwrap();
    assert_eq!(gap.event.origin, Origin::AGENT);
    // A complete snapshot round follows the gap marker.
    wait_round_after(&agent.host_id, gap.event.host_seq, Duration::from_secs(30));
    // Dropped events are not published, so the domain has fewer messages
    // than libvirt emitted; the stream still ends in libvirt's state.
    let count = msgs.iter().filter(|s| s.event.domain.name == name).count();
    assert!(
        count < 2 + 400 + 1,
        "some events were dropped ({count} published)"
    );
    assert_eq!(
        d.state().unwrap().0,
        virt::domain::DomainStateEnum::Known(virt::domain::DomainState::Paused)
    );
    d.destroy().unwrap();
    d.undefine().unwrap();
}

#[test]
fn full_journal_keeps_what_it_accepted_then_gap_and_reconcile() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    ensure_libvirtd();
    let _oracle = Oracle::start(TEST_URI);
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    // Room for a handful of entries while NATS is unreachable.
    // Fast rounds and heartbeats: none of them may be journaled while the
    // journal is full.
    let mut agent = Agent::new(
        TEST_URI,
        Some(&url),
        "[snapshot]\ninterval = \"1s\"\nheartbeat = \"1s\"\n",
    );
    // The start-up round is journaled too (≈420 B per domain on the
    // shared test driver, which other tests also use).
    let max_bytes = 3000 + 450 * domains_on_test_driver();
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        cfg.replace(
            "[journal]\n",
            &format!("[journal]\nmax_bytes = {max_bytes}\n"),
        ),
    )
    .unwrap();
    agent.start();
    let end = Instant::now() + Duration::from_secs(30);
    while !agent
        .http("/readyz")
        .is_some_and(|(_, b)| b.contains("libvirt: connected"))
    {
        assert!(Instant::now() < end, "agent never connected to libvirt");
        std::thread::sleep(Duration::from_millis(50));
    }
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let name = unique("full");
    let _cleanup = Undefine(name.clone());
    let d = conn
        .define_domain_xml(&test_domain_xml(&name, &new_uuid()))
        .unwrap();
    d.create().unwrap();
    for _ in 0..20 {
        d.suspend().unwrap();
        d.resume().unwrap();
    }
    let end = Instant::now() + Duration::from_secs(20);
    while agent.metric("virtstream_journal_full_drops_total") == 0.0 {
        assert!(Instant::now() < end, "journal never reported full");
        std::thread::sleep(Duration::from_millis(50));
    }
    // While full, nothing new is journaled: no heartbeats, no rounds.
    let held = agent.metric("virtstream_journal_backlog_entries");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        agent.metric("virtstream_journal_backlog_entries"),
        held,
        "heartbeats or rounds were journaled into a full journal"
    );
    // A change while the journal is full: only the reconcile can tell it
    // (the tracker last saw the domain running or paused, never shut off).
    d.destroy().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let nats = NatsServer::start_on(port);
    let msgs = wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(60),
        "journal drained and repaired",
        |m| {
            m.iter().any(|s| s.event.detail.as_str() == "JOURNAL_FULL")
                && m.iter()
                    .rfind(|s| s.event.domain.name == name)
                    .is_some_and(|s| s.event.state_after.state == DomainState::SHUTOFF)
        },
    );
    assert_contiguous(&msgs);
    let gap = msgs
        .iter()
        .find(|s| s.event.detail.as_str() == "JOURNAL_FULL")
        .unwrap();
    let repaired = msgs.iter().rfind(|s| s.event.domain.name == name).unwrap();
    assert_eq!(
        repaired.event.origin,
        Origin::RECONCILE,
        "the final state came from the reconcile"
    );
    assert!(
        repaired.event.host_seq > gap.event.host_seq,
        "reconcile follows the gap marker"
    );
    // And a complete round after it.
    wait_round_after(&agent.host_id, gap.event.host_seq, Duration::from_secs(30));
    // What was accepted before the journal filled was all delivered: the
    // domain's first events are its DEFINED and STARTED.
    let first: Vec<&str> = msgs
        .iter()
        .filter(|s| s.event.domain.name == name)
        .take(2)
        .map(|s| s.event.event.as_str())
        .collect();
    assert_eq!(first, vec!["DEFINED", "STARTED"]);
    d.undefine().unwrap();
}

fn domains_on_test_driver() -> usize {
    Connect::open(Some(TEST_URI))
        .unwrap()
        .list_all_domains(0)
        .unwrap()
        .len()
}

/// libvirt's own view of a domain's state, from `virsh domstate`.
fn virsh_domstate(name: &str) -> DomainState {
    let out = std::process::Command::new("virsh")
        .args(["-c", TEST_URI, "domstate", name])
        .output()
        .expect("virsh");
    match String::from_utf8_lossy(&out.stdout).trim() {
        "running" => DomainState::RUNNING,
        "paused" => DomainState::PAUSED,
        "shut off" => DomainState::SHUTOFF,
        other => panic!("virsh domstate {name}: {other:?}"),
    }
}

/// Waits for a complete snapshot round on the Kafka snapshot topics that
/// began after `host_seq`.
fn wait_kafka_round_after(bootstrap: &str, host_id: &str, host_seq: u64) {
    use virtstream::model::HostSnapshotKind;
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let recs = kafka_snapshot_records(bootstrap, host_id);
        let done = recs.iter().filter_map(|r| r.host.as_ref()).any(|h| {
            h.kind == HostSnapshotKind::ROUND_END
                && h.snapshot_id
                    .as_deref()
                    .and_then(virtstream::model::parse_event_id)
                    .is_some_and(|(_, _, begin)| {
                        begin > host_seq
                            && recs.iter().any(|b| {
                                b.host_seq == begin
                                    && b.host
                                        .as_ref()
                                        .is_some_and(|b| b.kind == HostSnapshotKind::ROUND_BEGIN)
                            })
                    })
        });
        if done {
            return;
        }
        assert!(
            Instant::now() < end,
            "no complete round after host_seq {host_seq} on Kafka"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Both sinks, Kafka frozen: the journal fills behind Kafka and then stops
/// taking new events for both sinks (nothing leaves the journal before
/// every sink acknowledged it). NATS gets everything journaled before the
/// bound and nothing after; once Kafka is back, both buses get the same
/// JOURNAL_FULL marker, the reconcile and a complete round, and end in
/// libvirt's state.
#[test]
fn full_journal_behind_a_frozen_broker_stops_intake_for_both_sinks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    ensure_libvirtd();
    let oracle = Oracle::start(TEST_URI);
    let nats = NatsServer::start();
    let kafka = KafkaBroker::start();
    let mut agent = Agent::new(
        TEST_URI,
        Some(&nats.url()),
        &kafka_section(&kafka.bootstrap()),
    );
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        cfg.replace("[journal]\n", "[journal]\nmax_bytes = 16000\n"),
    )
    .unwrap();
    agent.start();
    agent.wait_ready(Duration::from_secs(60));
    // Both sinks took the start-up round: the journal is empty.
    let end = Instant::now() + Duration::from_secs(30);
    while agent.metric("virtstream_journal_backlog_entries") != 0.0 {
        assert!(
            Instant::now() < end,
            "the start-up round was not acknowledged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let name = unique("full2");
    let _cleanup = Undefine(name.clone());
    let d = conn
        .define_domain_xml(&test_domain_xml(&name, &new_uuid()))
        .unwrap();
    d.create().unwrap();
    wait_for_kafka(
        &kafka.bootstrap(),
        &agent.host_id,
        Duration::from_secs(30),
        "the domain's start on Kafka",
        |m| {
            m.iter()
                .any(|s| s.event.domain.name == name && s.event.event.as_str() == "STARTED")
        },
    );

    kafka.pause();
    for _ in 0..40 {
        d.suspend().unwrap();
        d.resume().unwrap();
    }
    let end = Instant::now() + Duration::from_secs(30);
    while agent.metric("virtstream_journal_full_drops_total") == 0.0 {
        assert!(Instant::now() < end, "journal never reported full");
        std::thread::sleep(Duration::from_millis(50));
    }
    // NATS, the healthy sink, has everything the journal accepted.
    let end = Instant::now() + Duration::from_secs(30);
    while agent.metric("virtstream_sink_backlog{sink=\"nats\"}") != 0.0 {
        assert!(
            Instant::now() < end,
            "NATS never caught up with the journal"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.metric("virtstream_sink_backlog{sink=\"kafka\"}") > 0.0);
    let before = fetch(&nats.url(), "VIRT_EVENTS", &agent.filter());
    // Events and snapshot records (NATS tap; Kafka cannot be read while
    // frozen) cover host_seq 1..=N without holes.
    let mut hs: std::collections::BTreeSet<u64> = snapshot_records(&agent.host_id)
        .iter()
        .map(|r| r.host_seq)
        .collect();
    hs.extend(before.iter().map(|m| m.event.host_seq));
    assert!(
        hs.iter().enumerate().all(|(i, h)| *h == i as u64 + 1),
        "NATS has every entry journaled before the bound"
    );
    let want: Vec<(String, String)> = oracle
        .for_domain(&name)
        .iter()
        .map(|e| (e.event.clone(), e.detail.clone()))
        .collect();
    let got: Vec<(String, String)> = before
        .iter()
        .filter(|m| m.event.domain.name == name)
        .map(|m| (m.event.event.to_string(), m.event.detail.to_string()))
        .collect();
    assert!(
        got.len() < want.len() && want.starts_with(&got),
        "NATS holds libvirt's events up to the bound, in order ({} of {}): {got:?} vs {want:?}",
        got.len(),
        want.len()
    );

    // While full, new events reach neither bus: NATS too gets nothing.
    for _ in 0..5 {
        d.suspend().unwrap();
        d.resume().unwrap();
    }
    // A change only the reconcile can tell (never journaled as shut off).
    d.destroy().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let during = fetch(&nats.url(), "VIRT_EVENTS", &agent.filter());
    assert_eq!(
        during.len(),
        before.len(),
        "the healthy sink got events the full journal did not take"
    );
    let last_before = before.iter().map(|m| m.event.host_seq).max().unwrap();
    eprintln!(
        "journal full: NATS has {} of the domain's {} libvirt events before the bound \
         and {} messages in all, unchanged while full; {} drops",
        got.len(),
        oracle.for_domain(&name).len(),
        during.len(),
        agent.metric("virtstream_journal_full_drops_total")
    );

    kafka.unpause();
    let want_state = virsh_domstate(&name);
    assert_eq!(want_state, DomainState::SHUTOFF);
    let repaired = |m: &[Stored]| {
        m.iter()
            .any(|s| s.event.detail.as_str() == "JOURNAL_FULL" && s.event.host_seq > last_before)
            && m.iter()
                .rfind(|s| s.event.domain.name == name)
                .is_some_and(|s| s.event.state_after.state == want_state)
    };
    let on_nats = wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(90),
        "NATS repaired",
        repaired,
    );
    let on_kafka = wait_for_kafka(
        &kafka.bootstrap(),
        &agent.host_id,
        Duration::from_secs(90),
        "Kafka repaired",
        repaired,
    );
    let mut gap_seqs = Vec::new();
    for (bus, msgs) in [("NATS", &on_nats), ("Kafka", &on_kafka)] {
        assert_contiguous(msgs);
        let gap = msgs
            .iter()
            .find(|s| s.event.detail.as_str() == "JOURNAL_FULL" && s.event.host_seq > last_before)
            .unwrap();
        let last = msgs.iter().rfind(|s| s.event.domain.name == name).unwrap();
        assert_eq!(
            last.event.origin,
            Origin::RECONCILE,
            "{bus}: the final state came from the reconcile"
        );
        assert!(
            last.event.host_seq > gap.event.host_seq,
            "{bus}: reconcile follows the gap marker"
        );
        gap_seqs.push(gap.event.host_seq);
    }
    assert_eq!(gap_seqs[0], gap_seqs[1], "one marker, on both buses");
    wait_round_after(&agent.host_id, gap_seqs[0], Duration::from_secs(30));
    wait_kafka_round_after(&kafka.bootstrap(), &agent.host_id, gap_seqs[0]);
    assert!(agent.metric("virtstream_gap_markers_total{cause=\"journal_full\"}") >= 1.0);
    d.undefine().unwrap();
}
