//! The Kafka sink against a real Kafka-protocol broker (tansu) and the
//! real libvirtd test driver: the scripted lifecycle matches `virsh event`,
//! both sinks carry the same messages, and effectively-once holds across
//! an agent `kill -9` and a frozen broker; bad input is refused clearly.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use virt::connect::Connect;
use virtstream::bus::kafka::partition_for;
use virtstream::model::DomainState;

const EVENTS: &str = "virt.domain.events.v1";

/// Waits until `name`'s last record is its UNDEFINED and the topic has
/// stopped growing for 2 s.
fn settle_kafka(bootstrap: &str, agent: &Agent, name: &str) -> Vec<Stored> {
    let mut last_len = usize::MAX;
    let mut stable_since = Instant::now();
    wait_for_kafka(
        bootstrap,
        &agent.host_id,
        Duration::from_secs(120),
        "the Kafka topic to settle",
        |m| {
            let done = m
                .iter()
                .filter(|s| s.event.domain.name == name)
                .max_by_key(|s| s.event.host_seq)
                .is_some_and(|s| s.event.event.as_str() == "UNDEFINED");
            if m.len() != last_len {
                last_len = m.len();
                stable_since = Instant::now();
            }
            done && stable_since.elapsed() > Duration::from_secs(2)
        },
    )
}

/// Stops the agent cleanly and checks that the topic holds exactly the
/// journal's entries: host_seq 1..=N, each once, in order per key.
fn assert_topic_is_journal(bootstrap: &str, agent: &mut Agent) -> Vec<Stored> {
    assert_eq!(agent.terminate(), Some(0), "SIGTERM is a clean exit");
    let n = journal_host_seq(agent);
    let all = fetch_kafka(bootstrap, EVENTS, &agent.host_id);
    let snaps = snapshot_seqs(&agent.host_id).len() as u64;
    assert_eq!(
        all.len() as u64 + snaps,
        n,
        "the topics hold exactly the journal's {n} entries ({snaps} of them snapshot records)"
    );
    assert_contiguous(&all);
    all
}

#[test]
fn kafka_scripted_lifecycle_matches_the_oracle() {
    ensure_libvirtd();
    let kafka = KafkaBroker::start();
    let oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::ready(TEST_URI, None, &kafka_section(&kafka.bootstrap()));

    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let p_name = unique("kpersist");
    scripted_lifecycle(&conn, &p_name);
    let t_name = unique("ktransient");
    let t = conn
        .create_domain_xml(&test_domain_xml(&t_name, &new_uuid()), 0)
        .unwrap();
    t.suspend().unwrap();
    t.resume().unwrap();
    t.destroy().unwrap();
    let b_name = unique("kburst");
    let b = conn
        .define_domain_xml(&test_domain_xml(&b_name, &new_uuid()))
        .unwrap();
    b.create().unwrap();
    for _ in 0..100 {
        b.suspend().unwrap();
        b.resume().unwrap();
    }
    b.destroy().unwrap();
    b.undefine().unwrap();

    let names = [p_name.clone(), t_name.clone(), b_name.clone()];
    let end = Instant::now() + Duration::from_secs(30);
    while oracle.for_domain(&b_name).last().map(|e| e.event.as_str()) != Some("UNDEFINED") {
        assert!(
            Instant::now() < end,
            "oracle never saw the burst domain undefined"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let expected: usize = names.iter().map(|n| oracle.for_domain(n).len()).sum();
    assert!(expected >= 8 + 4 + 204, "oracle saw only {expected} events");
    let mut msgs = wait_for_kafka(
        &kafka.bootstrap(),
        &agent.host_id,
        Duration::from_secs(60),
        "all scripted events on Kafka",
        |m| {
            m.iter()
                .filter(|s| names.contains(&s.event.domain.name))
                .count()
                >= expected
        },
    );
    assert_contiguous(&msgs);
    // Each domain's records are in one partition: the key's partition.
    for name in &names {
        let parts: BTreeSet<&str> = msgs
            .iter()
            .filter(|m| &m.event.domain.name == name)
            .map(|m| m.subject.as_str())
            .collect();
        assert_eq!(parts.len(), 1, "{name} spans {parts:?}");
        let uuid = &msgs
            .iter()
            .find(|m| &m.event.domain.name == name)
            .unwrap()
            .event
            .domain
            .uuid;
        let want = format!("kafka:{}:{uuid}", partition_for(uuid, 4));
        assert_eq!(parts.into_iter().next().unwrap(), want);
    }
    // check_domain wants the records in order: offsets within a partition
    // (host_seq order within one key is asserted by assert_contiguous).
    msgs.sort_by_key(|m| m.event.host_seq);
    check_domain(&oracle, &msgs, &p_name, true, 8192);
    check_domain(&oracle, &msgs, &t_name, false, 8192);
    check_domain(&oracle, &msgs, &b_name, true, 8192);
    let last_t = msgs
        .iter()
        .rfind(|m| m.event.domain.name == t_name)
        .unwrap();
    assert_eq!(last_t.event.state_after.state, DomainState::SHUTOFF);
    assert!(!last_t.event.persistent);

    // replay --bus kafka decodes the same records with partition/offset.
    let t_msgs: Vec<&Stored> = msgs
        .iter()
        .filter(|m| m.event.domain.name == t_name)
        .collect();
    let out = std::process::Command::new(Agent::bin())
        .args(["replay", "--bus", "kafka", "--config"])
        .arg(&agent.config)
        .args(["--domain", &t_msgs[0].event.domain.uuid])
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
    assert_eq!(lines.len(), t_msgs.len());
    for (l, m) in lines.iter().zip(&t_msgs) {
        assert_eq!(l["offset"], m.stream_seq);
        assert_eq!(l["topic"], EVENTS);
        assert_eq!(l["event_id"], m.event.event_id.as_str());
    }
    // --from-offset reads one partition from an offset.
    let (p, o) = {
        let mut it = t_msgs[1].subject.split(':');
        (it.nth(1).unwrap().to_string(), t_msgs[1].stream_seq)
    };
    let out = std::process::Command::new(Agent::bin())
        .args(["replay", "--bus", "kafka", "--config"])
        .arg(&agent.config)
        .args(["--from-offset", &format!("{p}:{o}")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let first: serde_json::Value = serde_json::from_str(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["offset"], o);
    assert_eq!(first["event_id"], t_msgs[1].event.event_id.as_str());

    let (_, metrics) = agent.http("/metrics").unwrap();
    assert!(
        metrics.contains("virtstream_sink_published_total{sink=\"kafka\"}"),
        "{metrics}"
    );
    assert_eq!(agent.terminate(), Some(0), "SIGTERM is a clean exit");
}

#[test]
fn both_sinks_carry_the_same_messages() {
    ensure_libvirtd();
    let kafka = KafkaBroker::start();
    let nats = NatsServer::start();
    let _oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::ready(
        TEST_URI,
        Some(&nats.url()),
        &kafka_section(&kafka.bootstrap()),
    );
    let name = unique("both");
    burst(name.clone(), 150, Duration::from_millis(1))
        .join()
        .unwrap();
    settle_kafka(&kafka.bootstrap(), &agent, &name);
    let on_kafka = assert_topic_is_journal(&kafka.bootstrap(), &mut agent);
    let on_nats = fetch(&nats.url(), "VIRT_EVENTS", &agent.filter());
    assert_contiguous(&on_nats);
    let ids = |m: &[Stored]| -> BTreeSet<(String, String, u64)> {
        m.iter()
            .map(|s| {
                (
                    s.event.host_id.clone(),
                    s.event.epoch.clone(),
                    s.event.host_seq,
                )
            })
            .collect()
    };
    assert!(on_kafka.len() > 300);
    assert_eq!(ids(&on_kafka), ids(&on_nats));
    // The same records, field for field.
    let by_seq = |m: &[Stored]| -> Vec<String> {
        let mut v: Vec<&Stored> = m.iter().collect();
        v.sort_by_key(|s| s.event.host_seq);
        v.iter().map(|s| format!("{:?}", s.event)).collect()
    };
    assert_eq!(by_seq(&on_kafka), by_seq(&on_nats));
}

#[test]
fn agent_kill_9_mid_burst_kafka_loses_and_duplicates_nothing() {
    ensure_libvirtd();
    let kafka = KafkaBroker::start();
    let _oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::ready(TEST_URI, None, &kafka_section(&kafka.bootstrap()));
    let name = unique("kkill9");
    let b = burst(name.clone(), 400, Duration::from_millis(2));
    std::thread::sleep(Duration::from_millis(500));
    agent.kill9();
    std::thread::sleep(Duration::from_millis(300));
    agent.start();
    b.join().unwrap();
    agent.wait_ready(Duration::from_secs(60));
    let before = settle_kafka(&kafka.bootstrap(), &agent, &name);
    assert!(
        before.len() > 100,
        "the burst was journaled before the kill"
    );
    let log = agent.log();
    assert!(
        log.contains("reading back this host's records"),
        "the restart read back what the killed agent stored:\n{log}"
    );
    let all = assert_topic_is_journal(&kafka.bootstrap(), &mut agent);
    assert!(all
        .iter()
        .any(|m| m.event.detail.as_str() == "AGENT_RESTART"));
}

/// The NATS wide-window case on Kafka: the broker frozen while one domain
/// gets 800 events, the agent killed 50 ms after it thaws (mid-drain),
/// restarted 3 s later. Kafka has no de-duplication window to fall back
/// on: only the read-back keeps each host_seq once.
#[test]
fn kafka_restart_mid_drain_after_outage_stores_each_entry_once() {
    ensure_libvirtd();
    let kafka = KafkaBroker::start();
    let oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::ready(TEST_URI, None, &kafka_section(&kafka.bootstrap()));
    kafka.pause();
    let name = unique("kwide");
    burst(name.clone(), 400, Duration::ZERO).join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    kafka.unpause();
    std::thread::sleep(Duration::from_millis(50));
    agent.kill9();
    std::thread::sleep(Duration::from_secs(3));
    agent.start();
    agent.wait_ready(Duration::from_secs(60));
    settle_kafka(&kafka.bootstrap(), &agent, &name);
    let all = assert_topic_is_journal(&kafka.bootstrap(), &mut agent);
    let got = all.iter().filter(|m| m.event.domain.name == name).count();
    assert_eq!(
        got,
        oracle.for_domain(&name).len(),
        "every event of the burst, once"
    );
}

#[test]
fn kafka_frozen_10s_mid_burst_delivers_once_and_nats_keeps_going() {
    ensure_libvirtd();
    let kafka = KafkaBroker::start();
    let nats = NatsServer::start();
    let oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::ready(
        TEST_URI,
        Some(&nats.url()),
        &kafka_section(&kafka.bootstrap()),
    );
    let name = unique("kfrozen");
    let b = burst(name.clone(), 300, Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(1000));
    kafka.pause();
    std::thread::sleep(Duration::from_secs(1));
    let nats_at_pause = fetch(&nats.url(), "VIRT_EVENTS", &agent.filter()).len();
    std::thread::sleep(Duration::from_secs(8));
    let nats_later = fetch(&nats.url(), "VIRT_EVENTS", &agent.filter()).len();
    // A broker that holds connections open but answers nothing is
    // reported: not ready, the Kafka sink named, NATS still fine.
    let (code, body) = agent.http("/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("sink kafka: failing") && body.contains("sink nats: ready"),
        "{body}"
    );
    std::thread::sleep(Duration::from_secs(1));
    kafka.unpause();
    assert!(
        nats_later > nats_at_pause + 100,
        "NATS kept publishing while Kafka was frozen ({nats_at_pause} → {nats_later})"
    );
    b.join().unwrap();
    agent.wait_ready(Duration::from_secs(30));
    settle_kafka(&kafka.bootstrap(), &agent, &name);
    let on_kafka = assert_topic_is_journal(&kafka.bootstrap(), &mut agent);
    let on_nats = fetch(&nats.url(), "VIRT_EVENTS", &agent.filter());
    assert_eq!(on_nats.len(), on_kafka.len());
    // Exactly what libvirt emitted, in order, on Kafka.
    let want: Vec<(String, String)> = oracle
        .for_domain(&name)
        .iter()
        .map(|e| (e.event.clone(), e.detail.clone()))
        .collect();
    let got: Vec<(String, String)> = on_kafka
        .iter()
        .filter(|m| m.event.domain.name == name)
        .map(|m| (m.event.event.to_string(), m.event.detail.to_string()))
        .collect();
    assert_eq!(want.len(), 2 + 600 + 2);
    assert_eq!(got, want);
}

#[test]
fn unreachable_brokers_at_start_journal_then_deliver() {
    ensure_libvirtd();
    let _oracle = Oracle::start(TEST_URI);
    let port = free_port();
    let mut agent = Agent::new(TEST_URI, None, &kafka_section(&format!("127.0.0.1:{port}")));
    agent.start();
    // Up, serving, but not ready: the Kafka sink cannot connect, and
    // /readyz says so, naming the brokers.
    let end = Instant::now() + Duration::from_secs(30);
    let broker = format!("127.0.0.1:{port}");
    loop {
        match agent.http("/readyz") {
            Some((503, body))
                if body.contains("sink kafka: failing")
                    && body.contains(&broker)
                    && body.contains("libvirt: connected") =>
            {
                break
            }
            Some((200, body)) => panic!("ready without a broker: {body}"),
            _ => {}
        }
        assert!(
            Instant::now() < end,
            "/readyz never reported the Kafka sink failing: {:?}",
            agent.http("/readyz")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let name = unique("kdown");
    burst(name.clone(), 20, Duration::from_millis(1))
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (_, metrics) = agent.http("/metrics").unwrap();
    let backlog: f64 = metrics
        .lines()
        .find(|l| l.starts_with("virtstream_sink_backlog{sink=\"kafka\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        backlog >= 44.0,
        "the events are journaled: backlog {backlog}\n{metrics}"
    );
    let kafka = KafkaBroker::start_on(port);
    agent.wait_ready(Duration::from_secs(60));
    settle_kafka(&kafka.bootstrap(), &agent, &name);
    assert_topic_is_journal(&kafka.bootstrap(), &mut agent);
}

#[test]
fn a_non_compacted_snapshot_topic_is_refused() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    ensure_libvirtd();
    let kafka = KafkaBroker::start();
    let admin: AdminClient<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()
        .unwrap();
    rt().block_on(async {
        let r = admin
            .create_topics(
                [&NewTopic::new(
                    "virt.domain.snapshots.v1",
                    1,
                    TopicReplication::Fixed(1),
                )],
                &AdminOptions::new(),
            )
            .await
            .unwrap();
        assert!(r[0].is_ok(), "{r:?}");
    });
    let mut agent = Agent::new(TEST_URI, None, &kafka_section(&kafka.bootstrap()));
    agent.start();
    let end = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(code) = agent.try_exit() {
            break code;
        }
        assert!(
            Instant::now() < end,
            "the agent kept running:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, Some(1));
    let log = agent.log();
    assert!(
        log.contains("virt.domain.snapshots.v1") && log.contains("cleanup.policy"),
        "the refusal names the topic and the setting:\n{log}"
    );
}

/// The read-back's end of a partition under a clock stepped backward: this
/// host stamped its records an hour ahead of its clock now. Records of the
/// reading host (marked `Flow::Earlier`) or the newest time it stamped
/// (`not_before_ms`) keep them from looking "appended after the read began".
#[test]
fn read_back_reaches_own_records_stamped_before_a_clock_step_back() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::message::Message;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use virtstream::bus::kafka::reader::{read_to_end, Flow, ReadOptions, Start};

    let kafka = KafkaBroker::start();
    let mut base = rdkafka::ClientConfig::new();
    base.set("bootstrap.servers", kafka.bootstrap());
    let topic = "clock.step.v1";
    let admin: AdminClient<_> = base.create().unwrap();
    rt().block_on(async {
        let r = admin
            .create_topics(
                [&NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .unwrap();
        assert!(r[0].is_ok(), "{r:?}");
    });
    let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let ahead = now_ms + 3_600_000;
    let producer: BaseProducer = base.create().unwrap();
    let mut keys: Vec<(String, i64)> = (0..5).map(|i| (format!("own-{i}"), ahead + i)).collect();
    // Another host's record in between, stamped 2 s after ours.
    keys.push(("other".into(), ahead + 2_000));
    keys.extend((5..10).map(|i| (format!("own-{i}"), ahead + i)));
    for (k, ts) in &keys {
        producer
            .send(
                BaseRecord::to(topic)
                    .key(k.as_str())
                    .payload("x")
                    .timestamp(*ts),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let read = |mark_own: bool, not_before_ms: Option<i64>| -> Vec<String> {
        let mut seen = Vec::new();
        read_to_end(
            &base,
            ReadOptions {
                topic,
                starts: vec![(0, Start::Earliest)],
                idle: Duration::from_secs(2),
                max_clock_skew: Duration::from_secs(10),
                not_before_ms,
                stall: Duration::from_secs(30),
                stop: None,
                lookback: 0,
            },
            |m| {
                let k = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let done = k == "own-9";
                let own = k.starts_with("own-");
                seen.push(k);
                match () {
                    _ if done => Flow::PartitionDone,
                    _ if own && mark_own => Flow::Earlier,
                    _ => Flow::Continue,
                }
            },
        )
        .unwrap();
        seen
    };
    let all: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
    // What the read-back did before: its own records looked late, and the
    // partition ended at the first one (the rest would be sent again).
    assert_eq!(
        read(false, None),
        ["own-0"],
        "unmarked future stamps end it"
    );
    // Its own records marked: read to the last one.
    assert_eq!(read(true, None), all);
    // The newest time it stamped given up front: the same.
    assert_eq!(read(false, Some(ahead + 9)), all);
}

/// Where confluent-kafka (librdkafka) puts keyed records with
/// `partitioner = murmur2_random`, the Java client's default placement, is
/// where the agent puts them: 500 UUID keys into a 7-partition topic on a
/// real broker. The same keys under librdkafka's default partitioner
/// (`consistent_random`, CRC32) land elsewhere, so the check can tell.
#[test]
fn partitions_match_a_murmur2_random_producer() {
    let broker = KafkaBroker::start();
    let keys: Vec<String> = (0..500).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let script = r#"
import json, sys
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
bootstrap, partitioner, topic = sys.argv[1:4]
keys = sys.stdin.read().split()
admin = AdminClient({"bootstrap.servers": bootstrap})
for f in admin.create_topics([NewTopic(topic, num_partitions=7, replication_factor=1)]).values():
    f.result(30)
p = Producer({"bootstrap.servers": bootstrap, "partitioner": partitioner})
out = {}
def done(err, msg):
    if err is not None:
        raise SystemExit(f"delivery failed: {err}")
    out[msg.key().decode()] = msg.partition()
for k in keys:
    p.produce(topic, key=k, value=b"x", on_delivery=done)
    p.poll(0)
if p.flush(60) != 0:
    raise SystemExit("not every record was delivered")
print(json.dumps(out))
"#;
    let place = |partitioner: &str| -> std::collections::HashMap<String, i32> {
        let topic = format!("keys-{partitioner}");
        let out = run_python(
            &format!("confluent-kafka producer ({partitioner})"),
            script,
            &[&broker.bootstrap(), partitioner, &topic],
            keys.join("\n").as_bytes(),
        );
        serde_json::from_slice(&out).unwrap()
    };
    let theirs = place("murmur2_random");
    assert_eq!(theirs.len(), keys.len());
    let wrong: Vec<_> = keys
        .iter()
        .filter(|k| theirs[*k] != partition_for(k, 7))
        .collect();
    assert!(
        wrong.is_empty(),
        "keys placed elsewhere than the agent places them: {wrong:?}"
    );
    let used: BTreeSet<i32> = theirs.values().copied().collect();
    assert_eq!(used.len(), 7, "500 keys over 7 partitions use them all");
    let crc = place("consistent_random");
    let moved = keys.iter().filter(|k| crc[*k] != theirs[*k]).count();
    assert!(
        moved > 100,
        "consistent_random placed only {moved} keys differently"
    );
}
