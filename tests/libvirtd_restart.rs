//! libvirtd restarted while domains change: the agent keeps its stream,
//! announces the gap, reconnects, and the changes it could not see arrive
//! as RECONCILE events after the gap marker, followed by a complete
//! snapshot round. (Own test binary: it restarts
//! the system libvirtd, so nothing else may run beside it.)

mod common;

use std::time::Duration;

use common::*;
use virt::connect::Connect;
use virtstream::model::{DomainState, Origin};

#[test]
fn libvirtd_restart_gives_gap_then_reconcile() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let agent = Agent::ready(TEST_URI, Some(&nats.url()), "");

    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let running = unique("rst-run");
    let defined = unique("rst-def");
    let r = conn
        .define_domain_xml(&test_domain_xml(&running, &new_uuid()))
        .unwrap();
    r.create().unwrap();
    conn.define_domain_xml(&test_domain_xml(&defined, &new_uuid()))
        .unwrap();
    wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(30),
        "domains defined",
        |m| {
            m.iter()
                .filter(|s| s.event.domain.name == running || s.event.domain.name == defined)
                .count()
                >= 3
        },
    );
    drop(r);
    drop(conn);

    // The test driver's state lives in the daemon: a restart loses both
    // domains. That is the change the agent cannot see as events.
    restart_libvirtd(Duration::from_secs(1));
    // A domain defined right after the restart: seen either as an event or
    // by the reconcile, depending on when the agent reconnects.
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let late = unique("rst-late");
    conn.define_domain_xml(&test_domain_xml(&late, &new_uuid()))
        .unwrap();

    let msgs = wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(60),
        "gap + reconcile",
        |m| {
            let gap = m.iter().find(|s| s.event.detail.as_str() == "DISCONNECTED");
            gap.is_some()
                && [&running, &defined, &late].iter().all(|n| {
                    m.iter().any(|s| {
                        &s.event.domain.name == *n && s.event.host_seq > gap.unwrap().event.host_seq
                    })
                })
        },
    );
    agent.wait_ready(Duration::from_secs(30));
    assert_contiguous(&msgs);
    let gap = msgs
        .iter()
        .find(|s| s.event.detail.as_str() == "DISCONNECTED")
        .unwrap();
    assert_eq!(gap.event.origin, Origin::AGENT);
    // A complete snapshot round follows the gap marker.
    wait_round_after(&agent.host_id, gap.event.host_seq, Duration::from_secs(30));
    for name in [&running, &defined] {
        let after: Vec<&Stored> = msgs
            .iter()
            .filter(|s| &s.event.domain.name == name && s.event.host_seq > gap.event.host_seq)
            .collect();
        assert_eq!(after.len(), 1, "{name}: one reconcile event");
        let e = &after[0].event;
        assert_eq!(e.origin, Origin::RECONCILE, "{name}");
        assert_eq!(
            e.event.as_str(),
            "UNDEFINED",
            "{name}: vanished persistent domain"
        );
        assert_eq!(e.state_after.state, DomainState::SHUTOFF);
        assert!(!e.persistent, "{name}: gone");
    }
    let late_msg = msgs.iter().find(|s| s.event.domain.name == late).unwrap();
    assert_eq!(late_msg.event.event.as_str(), "DEFINED");
    let (_, metrics) = agent.http("/metrics").unwrap();
    assert!(
        metrics.contains("virtstream_libvirt_reconnects_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("virtstream_gap_markers_total{cause=\"disconnected\"} 1"),
        "{metrics}"
    );
    conn.lookup_domain_by_name(&late)
        .unwrap()
        .undefine()
        .unwrap();
}
