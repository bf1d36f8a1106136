//! Snapshot rounds on both buses: a consumer that starts late and reads
//! only the snapshot stream (NATS) or topic (Kafka) gets libvirt's truth
//! for every domain, and a domain that left the host is deleted
//! (tombstone) only after a complete round that no longer has it.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;
use futures::StreamExt;
use virt::connect::Connect;
use virtstream::model::{DomainSnapshot, DomainState};

/// Fast rounds, no heartbeat in the way of the round markers.
const SNAPSHOT: &str = "[snapshot]\ninterval = \"2s\"\nheartbeat = \"1h\"\n";

/// The late NATS consumer: the latest message of every domain subject of
/// `host_id` in VIRT_SNAPSHOTS (None = tombstone).
fn nats_snapshots(url: &str, host_id: &str) -> HashMap<String, Option<DomainSnapshot>> {
    let token = virtstream::bus::wire::subject_token(host_id);
    rt().block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let js = jetstream::new(client);
        let stream = js.get_stream("VIRT_SNAPSHOTS").await.unwrap();
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: format!("virt.snapshots.v1.{token}.*"),
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = consumer.messages().await.unwrap();
        let mut out = HashMap::new();
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), msgs.next()).await
        {
            let uuid = m.subject.rsplit_once('.').unwrap().1.to_string();
            let tomb = m
                .headers
                .as_ref()
                .and_then(|h| h.get(virtstream::bus::wire::TOMBSTONE_HEADER))
                .is_some();
            let snap = if tomb {
                assert!(m.payload.is_empty(), "a tombstone has an empty body");
                None
            } else {
                Some(virtstream::codec::decode_domain_snapshot(&m.payload).unwrap())
            };
            out.insert(uuid, snap);
            if m.info().unwrap().pending == 0 {
                break;
            }
        }
        out
    })
}

/// The late Kafka consumer: the latest record per key `<host>/<uuid>` in
/// virt.domain.snapshots.v1 (None = tombstone, a null value).
fn kafka_snapshots(bootstrap: &str, host_id: &str) -> HashMap<String, Option<DomainSnapshot>> {
    let mut out = HashMap::new();
    for r in read_topic(bootstrap, "virt.domain.snapshots.v1") {
        let Some((host, uuid)) = r.key.rsplit_once('/') else {
            panic!("snapshot key {} is not <host>/<uuid>", r.key)
        };
        if host != host_id {
            continue;
        }
        let snap = r
            .value
            .as_deref()
            .map(|v| virtstream::codec::decode_domain_snapshot(v).unwrap());
        out.insert(uuid.to_string(), snap);
    }
    out
}

/// `virsh domstate --reason` as (state, reason) symbols, and `dominfo`'s
/// Persistent.
fn virsh_truth(name: &str) -> (DomainState, String, bool) {
    let out = Command::new("virsh")
        .args(["-c", TEST_URI, "domstate", "--reason", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "virsh domstate {name}");
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.trim();
    let (state, reason) = line
        .split_once(" (")
        .map(|(s, r)| (s, r.trim_end_matches(')')))
        .unwrap_or((line, "unknown"));
    let state = match state {
        "running" => DomainState::RUNNING,
        "paused" => DomainState::PAUSED,
        "shut off" => DomainState::SHUTOFF,
        other => panic!("unexpected virsh state {other}"),
    };
    let reason = reason.to_uppercase().replace(' ', "_");
    let info = Command::new("virsh")
        .args(["-c", TEST_URI, "dominfo", name])
        .output()
        .unwrap();
    let info = String::from_utf8(info.stdout).unwrap();
    let persistent = info
        .lines()
        .find(|l| l.starts_with("Persistent:"))
        .map(|l| l.trim_end().ends_with("yes"))
        .unwrap();
    (state, reason, persistent)
}

/// The highest host_seq of the events of `names` on NATS, once all of
/// them have at least `min` events each.
fn last_event_seq(url: &str, agent: &Agent, names: &[&str], min: usize) -> u64 {
    let msgs = wait_for(
        url,
        &agent.filter(),
        Duration::from_secs(30),
        "scenario events",
        |m| {
            names
                .iter()
                .all(|n| m.iter().filter(|s| s.event.domain.name == *n).count() >= min)
        },
    );
    msgs.iter()
        .filter(|s| names.contains(&s.event.domain.name.as_str()))
        .map(|s| s.event.host_seq)
        .max()
        .unwrap()
}

#[test]
fn a_late_consumer_of_the_snapshots_gets_libvirts_truth_on_both_buses() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let kafka = KafkaBroker::start();
    let _oracle = Oracle::start(TEST_URI);
    let agent = Agent::ready(
        TEST_URI,
        Some(&nats.url()),
        &format!("{}{SNAPSHOT}", kafka_section(&kafka.bootstrap())),
    );
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let running = unique("snap-run");
    let paused = unique("snap-paused");
    let off = unique("snap-off");
    let transient = unique("snap-trans");
    let d = conn
        .define_domain_xml(&test_domain_xml(&running, &new_uuid()))
        .unwrap();
    d.create().unwrap();
    let p = conn
        .define_domain_xml(&test_domain_xml(&paused, &new_uuid()))
        .unwrap();
    p.create().unwrap();
    p.suspend().unwrap();
    let o = conn
        .define_domain_xml(&test_domain_xml(&off, &new_uuid()))
        .unwrap();
    o.create().unwrap();
    o.destroy().unwrap();
    let _t = conn
        .create_domain_xml(&test_domain_xml(&transient, &new_uuid()), 0)
        .unwrap();
    let names = [
        running.as_str(),
        paused.as_str(),
        off.as_str(),
        transient.as_str(),
    ];
    let last = last_event_seq(&nats.url(), &agent, &names, 1);
    // A round that began after the last scenario event, complete.
    wait_round_after(&agent.host_id, last, Duration::from_secs(30));
    // Kafka delivers it too (its own cursor).
    let end = Instant::now() + Duration::from_secs(30);
    let (on_nats, on_kafka) = loop {
        let n = nats_snapshots(&nats.url(), &agent.host_id);
        let k = kafka_snapshots(&kafka.bootstrap(), &agent.host_id);
        let seen = |m: &HashMap<String, Option<DomainSnapshot>>| {
            names.iter().all(|name| {
                m.values()
                    .flatten()
                    .any(|s| s.domain.name == *name && s.host_seq > last)
            })
        };
        if seen(&n) && seen(&k) {
            break (n, k);
        }
        assert!(Instant::now() < end, "the round never reached both buses");
        std::thread::sleep(Duration::from_millis(250));
    };
    for (bus, snaps) in [("NATS", &on_nats), ("Kafka", &on_kafka)] {
        for name in names {
            let s = snaps
                .values()
                .flatten()
                .find(|s| s.domain.name == name)
                .unwrap_or_else(|| panic!("{bus}: no snapshot of {name}"));
            let (state, reason, persistent) = virsh_truth(name);
            assert_eq!(s.state.state, state, "{bus} {name}: state");
            assert_eq!(s.state.reason, reason, "{bus} {name}: reason");
            assert_eq!(s.persistent, persistent, "{bus} {name}: persistent");
            assert_eq!(s.host_id, agent.host_id);
            assert!(s.seq >= 1, "{bus} {name}: carries the domain's seq");
            assert_eq!(s.vcpus, Some(1));
            assert_eq!(s.memory_kib, Some(8192));
        }
    }
    // The four cases are all there.
    let states: Vec<(DomainState, bool)> = names
        .iter()
        .map(|n| {
            let (s, _, p) = virsh_truth(n);
            (s, p)
        })
        .collect();
    assert_eq!(
        states,
        vec![
            (DomainState::RUNNING, true),
            (DomainState::PAUSED, true),
            (DomainState::SHUTOFF, true),
            (DomainState::RUNNING, false)
        ]
    );
    // Host records: the latest on each bus is a round marker or heartbeat
    // naming libvirt and what it accepted.
    let host = snapshot_records(&agent.host_id)
        .into_iter()
        .rev()
        .find_map(|r| r.host)
        .unwrap();
    assert_eq!(host.info.libvirt_uri, TEST_URI);
    assert_eq!(host.info.libvirt_driver, "TEST");
    assert!(host
        .info
        .accepted_event_ids
        .contains(&"LIFECYCLE".to_string()));
    assert!(!host.info.libvirt_version.is_empty());
    for n in [&running, &paused, &off] {
        let d = conn.lookup_domain_by_name(n).unwrap();
        let _ = d.destroy();
        d.undefine().unwrap();
    }
    let _ = conn.lookup_domain_by_name(&transient).unwrap().destroy();
}

#[test]
fn deletion_comes_only_after_a_complete_round() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let kafka = KafkaBroker::start();
    let _oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::ready(
        TEST_URI,
        Some(&nats.url()),
        &format!("{}{SNAPSHOT}", kafka_section(&kafka.bootstrap())),
    );
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let gone = unique("snap-gone");
    let trans = unique("snap-trans-gone");
    let d = conn
        .define_domain_xml(&test_domain_xml(&gone, &new_uuid()))
        .unwrap();
    d.create().unwrap();
    let t = conn
        .create_domain_xml(&test_domain_xml(&trans, &new_uuid()), 0)
        .unwrap();
    let last = last_event_seq(&nats.url(), &agent, &[&gone, &trans], 1);
    let (_, end1) = wait_round_after(&agent.host_id, last, Duration::from_secs(30));
    // Both are in that round.
    let recs = snapshot_records(&agent.host_id);
    for n in [&gone, &trans] {
        assert!(
            recs.iter().any(
                |r| r.host_seq < end1 && r.domain.as_ref().is_some_and(|s| &s.domain.name == n)
            ),
            "{n} snapshotted"
        );
    }
    // The persistent one is undefined, the transient one stops.
    d.destroy().unwrap();
    d.undefine().unwrap();
    t.destroy().unwrap();
    let msgs = wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(30),
        "both domains gone",
        |m| {
            let last = |n: &str| {
                m.iter()
                    .rfind(|s| s.event.domain.name == n)
                    .map(|s| s.event.event.as_str())
            };
            last(&gone) == Some("UNDEFINED") && last(&trans) == Some("STOPPED")
        },
    );
    let left_at = msgs
        .iter()
        .filter(|s| s.event.domain.name == gone || s.event.domain.name == trans)
        .map(|s| s.event.host_seq)
        .max()
        .unwrap();
    let (begin2, end2) = wait_round_after(&agent.host_id, left_at, Duration::from_secs(30));

    // Give the next rounds time to pass too, then look at the order.
    std::thread::sleep(Duration::from_secs(3));
    let uuid_of = |name: &str| {
        recs.iter()
            .find_map(|r| r.domain.as_ref().filter(|s| s.domain.name == name))
            .unwrap()
            .domain
            .uuid
            .clone()
    };
    for (bus, recs) in [
        ("NATS", snapshot_records(&agent.host_id)),
        (
            "Kafka",
            kafka_snapshot_records(&kafka.bootstrap(), &agent.host_id),
        ),
    ] {
        for n in [&gone, &trans] {
            let uuid = uuid_of(n);
            let tombs: Vec<&SnapRecord> = recs
                .iter()
                .filter(|r| r.tombstone && r.uuid.as_deref() == Some(uuid.as_str()))
                .collect();
            assert_eq!(tombs.len(), 1, "{bus} {n}: one tombstone");
            let tomb = tombs[0];
            // Not before the first complete round without it …
            assert!(
                tomb.host_seq > end2,
                "{bus} {n}: tombstone after that round's end"
            );
            assert!(
                recs.iter()
                    .filter(|r| r.host_seq > begin2 && r.host_seq < end2)
                    .all(|r| r.domain.as_ref().is_none_or(|s| s.domain.uuid != uuid)),
                "{bus} {n}: the round that deletes it does not have it"
            );
            // … and right after it: only tombstones between END and it.
            assert!(
                recs.iter()
                    .filter(|r| r.host_seq > end2 && r.host_seq < tomb.host_seq)
                    .all(|r| r.tombstone),
                "{bus} {n}: tombstones follow the ROUND_END directly"
            );
            // No record of it after the tombstone.
            assert!(
                recs.iter()
                    .filter(|r| r.host_seq > tomb.host_seq)
                    .all(|r| r.domain.as_ref().is_none_or(|s| s.domain.uuid != uuid)),
                "{bus} {n}: nothing after its deletion"
            );
        }
    }
    // What a late consumer sees: the domains are deleted on both buses.
    for (bus, snaps) in [
        ("NATS", nats_snapshots(&nats.url(), &agent.host_id)),
        ("Kafka", kafka_snapshots(&kafka.bootstrap(), &agent.host_id)),
    ] {
        for n in [&gone, &trans] {
            assert_eq!(
                snaps.get(&uuid_of(n)),
                Some(&None),
                "{bus} {n}: tombstone last"
            );
        }
    }
    assert_eq!(agent.terminate(), Some(0));
}

#[test]
fn heartbeats_carry_the_watermark_and_the_last_complete_round() {
    use virtstream::model::HostSnapshotKind;
    ensure_libvirtd();
    let nats = NatsServer::start();
    let kafka = KafkaBroker::start();
    let _oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::ready(
        TEST_URI,
        Some(&nats.url()),
        &format!(
            "{}[snapshot]\ninterval = \"1h\"\nheartbeat = \"1s\"\n",
            kafka_section(&kafka.bootstrap())
        ),
    );
    let end = Instant::now() + Duration::from_secs(20);
    let beats = loop {
        let beats: Vec<virtstream::model::HostSnapshot> = snapshot_records(&agent.host_id)
            .into_iter()
            .filter_map(|r| r.host)
            .filter(|h| h.kind == HostSnapshotKind::HEARTBEAT)
            .collect();
        if beats.len() >= 3 {
            break beats;
        }
        assert!(Instant::now() < end, "fewer than 3 heartbeats in 20 s");
        std::thread::sleep(Duration::from_millis(200));
    };
    let recs = snapshot_records(&agent.host_id);
    let round_end = recs
        .iter()
        .filter_map(|r| r.host.as_ref())
        .find(|h| h.kind == HostSnapshotKind::ROUND_END)
        .expect("the round at start");
    for b in &beats {
        assert_eq!(b.host_seq_watermark, b.host_seq - 1);
        assert_eq!(
            b.snapshot_id, round_end.snapshot_id,
            "names the last complete round"
        );
        assert_eq!(
            b.domain_count, round_end.domain_count,
            "and that round's domain count"
        );
        assert!(
            b.domain_count >= 1,
            "the test driver's default domain at least"
        );
        assert!(b.host_seq > round_end.host_seq);
    }
    // About one a second.
    let span = (beats[2].observed_at - beats[0].observed_at) as f64 / 1e6;
    assert!(
        (1.5..=4.0).contains(&span),
        "2 heartbeat periods took {span} s"
    );
    // Kafka carries them too, keyed by host.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let on_kafka = kafka_snapshot_records(&kafka.bootstrap(), &agent.host_id)
            .into_iter()
            .filter_map(|r| r.host)
            .filter(|h| h.kind == HostSnapshotKind::HEARTBEAT)
            .count();
        if on_kafka >= 3 {
            break;
        }
        assert!(Instant::now() < end, "heartbeats did not reach Kafka");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(agent.terminate(), Some(0));
}
