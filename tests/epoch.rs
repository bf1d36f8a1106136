//! Epochs against what the buses hold (issue 12, "Truth under wide fault
//! windows"), on real nats-server, tansu and the libvirt test driver:
//! - a journal restored from a backup is found behind the bus at start
//!   and begins a new epoch with a gap marker: nothing is lost as
//!   "already stored", no (host, epoch, host_seq) appears twice;
//! - a new epoch deletes (tombstone) the latest snapshot record of a
//!   domain that left the host while the agent was down with its journal
//!   lost.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;
use virt::connect::Connect;

/// Fast rounds, no heartbeat in the way.
const SNAPSHOT: &str = "[snapshot]\ninterval = \"2s\"\nheartbeat = \"1h\"\n";
const EVENTS_TOPIC: &str = "virt.domain.events.v1";
const DOMAIN_SNAPSHOTS_TOPIC: &str = "virt.domain.snapshots.v1";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The events of `agent`'s host on both buses (NATS in stream order,
/// Kafka per partition in offset order).
fn both(nats: &str, kafka: &str, agent: &Agent) -> [(&'static str, Vec<Stored>); 2] {
    [
        ("NATS", fetch(nats, "VIRT_EVENTS", &agent.filter())),
        ("Kafka", fetch_kafka(kafka, EVENTS_TOPIC, &agent.host_id)),
    ]
}

/// The last event of domain `name` (bus order; one domain's events keep
/// their order on both buses).
fn last_of<'a>(msgs: &'a [Stored], name: &str) -> Option<&'a Stored> {
    msgs.iter().rfind(|m| m.event.domain.name == name)
}

/// Polls both buses until `pred` holds on each, or fails.
fn wait_both(nats: &str, kafka: &str, agent: &Agent, what: &str, pred: impl Fn(&[Stored]) -> bool) {
    let end = Instant::now() + Duration::from_secs(40);
    loop {
        let got = both(nats, kafka, agent);
        if got.iter().all(|(_, m)| pred(m)) {
            return;
        }
        if Instant::now() > end {
            for (bus, m) in &got {
                eprintln!("{bus}: {} events of this host", m.len());
                for s in m {
                    eprintln!(
                        "  {} {} {} {}",
                        s.event.event_id,
                        s.event.domain.name,
                        s.event.event.as_str(),
                        s.event.detail.as_str()
                    );
                }
            }
            panic!("not on both buses within 40 s: {what}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn virsh_state(name: &str) -> Option<String> {
    let out = Command::new("virsh")
        .args(["-c", TEST_URI, "domstate", name])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn a_restored_journal_starts_a_new_epoch_with_a_gap_and_loses_nothing() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let kafka = KafkaBroker::start();
    let (n, k) = (nats.url(), kafka.bootstrap());
    // Holds the test driver's domains while the agent is down.
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let mut agent = Agent::ready(
        TEST_URI,
        Some(&n),
        &format!("{}{SNAPSHOT}", kafka_section(&k)),
    );
    let a = unique("epoch-a");
    let b = unique("epoch-b");
    let da = conn
        .define_domain_xml(&test_domain_xml(&a, &new_uuid()))
        .unwrap();
    wait_both(&n, &k, &agent, "a DEFINED", |m| {
        last_of(m, &a).is_some_and(|s| s.event.event.as_str() == "DEFINED")
    });
    assert_eq!(agent.terminate(), Some(0));

    // The backup, taken while the agent was stopped.
    let journal = agent.dir.path().join("journal");
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&journal, backup.path());

    // The bus moves ahead of the backup.
    agent.start();
    agent.wait_ready(Duration::from_secs(30));
    da.create().unwrap();
    let db = conn
        .define_domain_xml(&test_domain_xml(&b, &new_uuid()))
        .unwrap();
    wait_both(&n, &k, &agent, "a STARTED, b DEFINED", |m| {
        last_of(m, &a).is_some_and(|s| s.event.event.as_str() == "STARTED")
            && last_of(m, &b).is_some_and(|s| s.event.event.as_str() == "DEFINED")
    });
    assert_eq!(agent.terminate(), Some(0));
    let old_epoch = both(&n, &k, &agent)[0].1[0].event.epoch.clone();

    // Restore the backup and run again: what happens now must reach both
    // buses, under a new epoch.
    std::fs::remove_dir_all(&journal).unwrap();
    copy_dir(backup.path(), &journal);
    agent.start();
    agent.wait_ready(Duration::from_secs(40));
    da.destroy().unwrap();
    db.undefine().unwrap();
    wait_both(
        &n,
        &k,
        &agent,
        "a STOPPED, b UNDEFINED after the restore",
        |m| {
            last_of(m, &a).is_some_and(|s| s.event.event.as_str() == "STOPPED")
                && last_of(m, &b).is_some_and(|s| s.event.event.as_str() == "UNDEFINED")
        },
    );
    let metrics = agent.http("/metrics").map(|(_, b)| b).unwrap_or_default();
    assert_eq!(agent.terminate(), Some(0));

    for (bus, msgs) in both(&n, &k, &agent) {
        // No (host, epoch, host_seq) twice.
        let mut ids = HashSet::new();
        for m in &msgs {
            assert!(
                ids.insert(m.event.event_id.clone()),
                "{bus}: {} appears twice",
                m.event.event_id
            );
        }
        // Both restarts are marked by a gap on the bus: the one after the
        // restore is not taken for an entry the bus already holds.
        let restarts = msgs
            .iter()
            .filter(|m| m.event.event.as_str() == "GAP")
            .count();
        assert_eq!(restarts, 2, "{bus}: gap markers of the two restarts");
        // A new epoch, beginning with a gap marker.
        let new: Vec<&Stored> = msgs.iter().filter(|m| m.event.epoch != old_epoch).collect();
        let epochs: HashSet<&str> = new.iter().map(|m| m.event.epoch.as_str()).collect();
        assert_eq!(epochs.len(), 1, "{bus}: one new epoch");
        let first = new.iter().min_by_key(|m| m.event.host_seq).unwrap();
        assert_eq!(first.event.host_seq, 1, "{bus}");
        assert_eq!(first.event.event.as_str(), "GAP", "{bus}");
        assert_eq!(first.event.detail.as_str(), "AGENT_RESTART", "{bus}");
        // The events after the restore are there, in the new epoch.
        for (name, ev) in [(&a, "STOPPED"), (&b, "UNDEFINED")] {
            let last = last_of(&msgs, name).unwrap();
            assert_eq!(last.event.event.as_str(), ev, "{bus}: {name}");
            assert_ne!(last.event.epoch, old_epoch, "{bus}: {name}");
        }
        // The last word per domain is libvirt's.
        let a_last = last_of(&msgs, &a).unwrap();
        assert_eq!(virsh_state(&a).as_deref(), Some("shut off"));
        assert_eq!(a_last.event.state_after.state.as_str(), "SHUTOFF", "{bus}");
        assert_eq!(virsh_state(&b), None, "b is undefined");
    }
    assert!(
        metrics.contains("virtstream_gap_markers_total{cause=\"journal_restored\"} 1"),
        "the new epoch is counted:\n{metrics}"
    );
    assert!(
        agent.log().contains("the journal was restored"),
        "the restore is logged"
    );
    da.undefine().unwrap();
}

/// The latest message on `subject` in VIRT_SNAPSHOTS: (tombstone, epoch).
fn nats_latest(url: &str, subject: &str) -> Option<(bool, String)> {
    rt().block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let js = jetstream::new(client);
        let stream = js.get_stream("VIRT_SNAPSHOTS").await.unwrap();
        let m = stream.get_last_raw_message_by_subject(subject).await.ok()?;
        let tomb = m
            .headers
            .get(virtstream::bus::wire::TOMBSTONE_HEADER)
            .is_some_and(|v| v.as_str() == "true");
        let id = m.headers.get("Nats-Msg-Id")?.to_string();
        let epoch = virtstream::model::parse_event_id(&id)?.1.to_string();
        Some((tomb, epoch))
    })
}

/// The latest record of `key` on the domain snapshots topic: (tombstone, epoch).
fn kafka_latest(bootstrap: &str, key: &str) -> Option<(bool, String)> {
    let r = read_topic(bootstrap, DOMAIN_SNAPSHOTS_TOPIC)
        .into_iter()
        .rfind(|r| r.key == key)?;
    let id = &r.headers.iter().find(|(k, _)| k == "ce_id")?.1;
    let epoch = virtstream::model::parse_event_id(id)?.1.to_string();
    Some((r.value.is_none(), epoch))
}

#[test]
fn a_new_epoch_deletes_snapshots_of_domains_that_left_while_it_was_down() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let kafka = KafkaBroker::start();
    let (n, k) = (nats.url(), kafka.bootstrap());
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let mut agent = Agent::ready(
        TEST_URI,
        Some(&n),
        &format!("{}{SNAPSHOT}", kafka_section(&k)),
    );
    let (x, y) = (unique("epoch-x"), unique("epoch-y"));
    let (ux, uy) = (new_uuid(), new_uuid());
    let dx = conn.define_domain_xml(&test_domain_xml(&x, &ux)).unwrap();
    let dy = conn.define_domain_xml(&test_domain_xml(&y, &uy)).unwrap();
    let token = virtstream::bus::wire::subject_token(&agent.host_id);
    let subject = |u: &str| format!("virt.snapshots.v1.{token}.{u}");
    let host = agent.host_id.clone();
    let key = |u: &str| format!("{host}/{u}");
    let end = Instant::now() + Duration::from_secs(40);
    let old_epoch = loop {
        let got = [
            nats_latest(&n, &subject(&ux)),
            nats_latest(&n, &subject(&uy)),
            kafka_latest(&k, &key(&ux)),
            kafka_latest(&k, &key(&uy)),
        ];
        if got.iter().all(|g| g.as_ref().is_some_and(|(t, _)| !t)) {
            break got[0].clone().unwrap().1;
        }
        assert!(Instant::now() < end, "x and y snapshotted on both buses");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(agent.terminate(), Some(0));

    // x leaves while the agent is down, and the journal is lost.
    dx.undefine().unwrap();
    std::fs::remove_dir_all(agent.dir.path().join("journal")).unwrap();
    agent.start();
    agent.wait_ready(Duration::from_secs(30));

    let end = Instant::now() + Duration::from_secs(40);
    loop {
        let got = [
            ("NATS x", nats_latest(&n, &subject(&ux))),
            ("NATS y", nats_latest(&n, &subject(&uy))),
            ("Kafka x", kafka_latest(&k, &key(&ux))),
            ("Kafka y", kafka_latest(&k, &key(&uy))),
        ];
        let new = |g: &Option<(bool, String)>| g.as_ref().is_some_and(|(_, e)| *e != old_epoch);
        let ok = got
            .iter()
            .all(|(what, g)| new(g) && g.as_ref().unwrap().0 == what.ends_with('x'));
        if ok {
            break;
        }
        assert!(
            Instant::now() < end,
            "after the new epoch's rounds: x's latest record is a tombstone and y's is the new epoch's snapshot on both buses; got {got:?} (old epoch {old_epoch})"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(agent.terminate(), Some(0));
    dy.undefine().unwrap();
}

/// One bus, for the tests that need the other one absent.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bus {
    Nats,
    Kafka,
}

/// Polls one bus until `pred` holds, or fails.
fn wait_on(bus: Bus, addr: &str, agent: &Agent, what: &str, pred: impl Fn(&[Stored]) -> bool) {
    let end = Instant::now() + Duration::from_secs(40);
    loop {
        let m = match bus {
            Bus::Nats => fetch(addr, "VIRT_EVENTS", &agent.filter()),
            Bus::Kafka => fetch_kafka(addr, EVENTS_TOPIC, &agent.host_id),
        };
        if pred(&m) {
            return;
        }
        assert!(Instant::now() < end, "not on {bus:?} within 40 s: {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A restored journal with no broker reachable at start: the sink that
/// finds the bus ahead of the journal stops the agent (non-zero); the next
/// start, with the broker up, begins a new epoch.
fn late_detection(bus: Bus) {
    ensure_libvirtd();
    let mut nats = NatsServer::start();
    let kafka = KafkaBroker::start();
    let addr = match bus {
        Bus::Nats => nats.url(),
        Bus::Kafka => kafka.bootstrap(),
    };
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let mut agent = match bus {
        Bus::Nats => Agent::ready(TEST_URI, Some(&addr), SNAPSHOT),
        Bus::Kafka => Agent::ready(
            TEST_URI,
            None,
            &format!("{}{SNAPSHOT}", kafka_section(&addr)),
        ),
    };
    let a = unique("epoch-late");
    let da = conn
        .define_domain_xml(&test_domain_xml(&a, &new_uuid()))
        .unwrap();
    let last_is = |ev: &'static str, name: String| {
        move |m: &[Stored]| last_of(m, &name).is_some_and(|s| s.event.event.as_str() == ev)
    };
    wait_on(
        bus,
        &addr,
        &agent,
        "a DEFINED",
        last_is("DEFINED", a.clone()),
    );
    assert_eq!(agent.terminate(), Some(0));
    let journal = agent.dir.path().join("journal");
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&journal, backup.path());

    // The bus moves well ahead of the backup (events and several rounds).
    agent.start();
    agent.wait_ready(Duration::from_secs(30));
    da.create().unwrap();
    wait_on(
        bus,
        &addr,
        &agent,
        "a STARTED",
        last_is("STARTED", a.clone()),
    );
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(agent.terminate(), Some(0));

    // Restore; the broker does not answer at start, so the start cannot
    // tell. Rounds only at start from now on: the journal's head stays
    // behind the bus's.
    std::fs::remove_dir_all(&journal).unwrap();
    copy_dir(backup.path(), &journal);
    let config = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        config.replace("interval = \"2s\"", "interval = \"1h\""),
    )
    .unwrap();
    match bus {
        Bus::Nats => nats.stop(),
        Bus::Kafka => kafka.pause(),
    }
    agent.start();
    let up_after = match bus {
        Bus::Nats => Duration::from_secs(1),
        // Past the start's bounded Kafka check.
        Bus::Kafka => Duration::from_secs(20),
    };
    std::thread::sleep(up_after);
    match bus {
        Bus::Nats => nats.resume(),
        Bus::Kafka => kafka.unpause(),
    }
    let end = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(code) = agent.try_exit() {
            break code;
        }
        assert!(
            Instant::now() < end,
            "the agent keeps running on a journal behind the bus"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_ne!(code, Some(0), "a fatal sink error is a non-zero exit");
    let log = agent.log();
    assert!(
        log.contains("could not check the journal"),
        "the start says it could not check"
    );
    assert!(
        log.contains("beyond the journal's head"),
        "the cause is named"
    );

    // The next start (broker up) begins a new epoch with a gap marker,
    // and what happens then reaches the bus.
    agent.start();
    agent.wait_ready(Duration::from_secs(40));
    da.destroy().unwrap();
    let old_epoch = match bus {
        Bus::Nats => fetch(&addr, "VIRT_EVENTS", &agent.filter()),
        Bus::Kafka => fetch_kafka(&addr, EVENTS_TOPIC, &agent.host_id),
    }[0]
    .event
    .epoch
    .clone();
    let name = a.clone();
    wait_on(bus, &addr, &agent, "a STOPPED in a new epoch", move |m| {
        last_of(m, &name)
            .is_some_and(|s| s.event.event.as_str() == "STOPPED" && s.event.epoch != old_epoch)
            && m.iter().any(|s| {
                s.event.epoch != old_epoch
                    && s.event.host_seq == 1
                    && s.event.event.as_str() == "GAP"
            })
    });
    assert_eq!(agent.terminate(), Some(0));
    da.undefine().unwrap();
}

#[test]
fn nats_sink_stops_the_agent_on_a_restored_journal_and_the_next_start_rotates() {
    late_detection(Bus::Nats);
}

#[test]
fn kafka_sink_stops_the_agent_on_a_restored_journal_and_the_next_start_rotates() {
    late_detection(Bus::Kafka);
}
