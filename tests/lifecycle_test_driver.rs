//! Scripted lifecycles on libvirtd's test driver (`test+unix:///default`):
//! what JetStream holds matches `virsh event` (the oracle) one to one, in
//! order per domain, with contiguous seq, unique host_seq, the right
//! state_after and persistence, and CloudEvents headers.

mod common;

use std::time::Duration;

use common::*;
use virt::connect::Connect;
use virtstream::model::DomainState;

#[test]
fn scripted_lifecycle_matches_the_oracle() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::ready(TEST_URI, Some(&nats.url()), "");

    let conn = Connect::open(Some(TEST_URI)).unwrap();
    // Persistent domain: the full lifecycle.
    let p_name = unique("persist");
    scripted_lifecycle(&conn, &p_name);
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
    check_domain(&oracle, &msgs, &p_name, true, 8192);
    check_domain(&oracle, &msgs, &t_name, false, 8192);
    check_domain(&oracle, &msgs, &b_name, true, 8192);
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
