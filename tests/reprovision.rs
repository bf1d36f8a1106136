//! A stream or topic deleted while the agent runs: provisioned again when
//! the agent may create it, and publishing resumes in order with nothing
//! the broker had not acknowledged lost; otherwise `/readyz` is not ready
//! and names what is missing, until the operator creates it again.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;

fn delete_stream(url: &str, name: &str) {
    rt().block_on(async {
        let js = jetstream::new(async_nats::connect(url).await.unwrap());
        assert!(js.delete_stream(name).await.unwrap().success);
    })
}

fn stream_exists(url: &str, name: &str) -> bool {
    rt().block_on(async {
        let js = jetstream::new(async_nats::connect(url).await.unwrap());
        js.get_stream(name).await.is_ok()
    })
}

/// Creates both streams as the agent would (an operator's provisioning).
fn create_streams(url: &str) {
    let cfg: virtstream::config::NatsConfig = toml::from_str(&format!("url = \"{url}\"")).unwrap();
    rt().block_on(async {
        let js = jetstream::new(async_nats::connect(url).await.unwrap());
        js.get_or_create_stream(virtstream::sinks::nats::events_stream_config(&cfg))
            .await
            .unwrap();
        js.get_or_create_stream(virtstream::sinks::nats::snapshots_stream_config(&cfg))
            .await
            .unwrap();
    })
}

fn wait_readyz(agent: &Agent, timeout: Duration, what: &str, pred: impl Fn(u16, &str) -> bool) {
    let end = Instant::now() + timeout;
    loop {
        if let Some((code, body)) = agent.http("/readyz") {
            if pred(code, &body) {
                return;
            }
            assert!(
                Instant::now() < end,
                "{what} within {timeout:?}; /readyz is {code}: {body}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the stream holds after the deletion must be every journal entry
/// from the first one it holds to the journal's last, once each, in order
/// per subject, and the burst's events from that point must be what
/// libvirt emitted from that point (the oracle).
fn assert_suffix_of_journal(url: &str, agent: &mut Agent, oracle: &Oracle, name: &str) {
    assert_eq!(agent.terminate(), Some(0), "SIGTERM is a clean exit");
    let n = journal_host_seq(agent);
    let msgs = fetch(url, "VIRT_EVENTS", &agent.filter());
    let first = msgs
        .iter()
        .map(|m| m.event.host_seq)
        .min()
        .expect("events after the deletion");
    let mut hs: Vec<u64> = msgs.iter().map(|m| m.event.host_seq).collect();
    hs.sort_unstable();
    let events = hs.len();
    hs.dedup();
    assert_eq!(hs.len(), events, "an event host_seq is stored twice");
    let mut all: BTreeSet<u64> = hs.into_iter().collect();
    all.extend(
        snapshot_seqs(&agent.host_id)
            .into_iter()
            .filter(|s| *s >= first),
    );
    assert_eq!(
        all.into_iter().collect::<Vec<_>>(),
        (first..=n).collect::<Vec<_>>(),
        "the re-created stream holds every entry from {first} to the journal's {n}"
    );
    let mut per_subject = std::collections::HashMap::new();
    for m in &msgs {
        let last = per_subject.entry(m.subject.clone()).or_insert(0);
        assert!(m.event.host_seq > *last, "out of order on {}", m.subject);
        *last = m.event.host_seq;
    }
    let got: Vec<(String, String)> = msgs
        .iter()
        .filter(|m| m.event.domain.name == name)
        .map(|m| (m.event.event.to_string(), m.event.detail.to_string()))
        .collect();
    let want: Vec<(String, String)> = oracle
        .for_domain(name)
        .iter()
        .map(|e| (e.event.clone(), e.detail.clone()))
        .collect();
    assert!(!got.is_empty(), "the burst's later events were published");
    assert!(
        want.ends_with(&got),
        "the stream holds the tail of what libvirt emitted, in order ({} of {})",
        got.len(),
        want.len()
    );
    // Per-domain seq continues without a hole in what is stored.
    let seqs: Vec<u64> = msgs
        .iter()
        .filter(|m| m.event.domain.name == name)
        .map(|m| m.event.seq)
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "seq contiguous");
}

/// Waits until the stream's last message of `name` is its UNDEFINED.
fn wait_undefined(url: &str, agent: &Agent, name: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let m = fetch(url, "VIRT_EVENTS", &agent.filter());
        if m.iter()
            .rfind(|s| s.event.domain.name == name)
            .is_some_and(|s| s.event.event.as_str() == "UNDEFINED")
        {
            return;
        }
        assert!(
            Instant::now() < end,
            "the burst's UNDEFINED not in the stream within 60 s ({} messages); /readyz: {:?}",
            m.len(),
            agent.http("/readyz")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn nats_stream_deleted_while_running_is_created_again() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::ready(TEST_URI, Some(&nats.url()), "");

    let name = unique("delstream");
    let b = burst(name.clone(), 150, Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(800));
    delete_stream(&nats.url(), "VIRT_EVENTS");
    delete_stream(&nats.url(), "VIRT_SNAPSHOTS");
    b.join().unwrap();
    wait_undefined(&nats.url(), &agent, &name);
    assert!(stream_exists(&nats.url(), "VIRT_SNAPSHOTS"));
    wait_readyz(&agent, Duration::from_secs(10), "ready again", |c, _| {
        c == 200
    });
    assert!(agent.log().contains("provisioned again"));
    assert_suffix_of_journal(&nats.url(), &mut agent, &oracle, &name);
}

#[test]
fn nats_stream_deleted_without_create_streams_fails_readiness_until_recreated() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    create_streams(&nats.url());
    let oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::ready(TEST_URI, Some(&nats.url()), "create_streams = false\n");

    delete_stream(&nats.url(), "VIRT_EVENTS");
    let name = unique("nocreate");
    let b = burst(name.clone(), 20, Duration::from_millis(10));
    wait_readyz(
        &agent,
        Duration::from_secs(20),
        "/readyz fails naming the missing stream",
        |c, body| c == 503 && body.contains("VIRT_EVENTS") && body.contains("create_streams"),
    );
    b.join().unwrap();
    // Still not ready, still running, nothing created behind the
    // operator's back.
    std::thread::sleep(Duration::from_secs(2));
    let (code, body) = agent.http("/readyz").expect("agent still serves /readyz");
    assert_eq!(code, 503, "{body}");
    assert!(!stream_exists(&nats.url(), "VIRT_EVENTS"));
    assert!(agent.try_exit().is_none(), "the agent keeps running");
    // The operator creates it: what was journaled meanwhile is published.
    create_streams(&nats.url());
    wait_undefined(&nats.url(), &agent, &name);
    wait_readyz(&agent, Duration::from_secs(10), "ready again", |c, _| {
        c == 200
    });
    assert_suffix_of_journal(&nats.url(), &mut agent, &oracle, &name);
    let stored = fetch(&nats.url(), "VIRT_EVENTS", &agent.filter());
    assert_eq!(
        stored
            .iter()
            .filter(|m| m.event.domain.name == name)
            .count(),
        2 + 40 + 2,
        "every event of the burst, all journaled while the stream was missing"
    );
}

// ---------------------------------------------------------------- Kafka

const EVENTS_TOPIC: &str = "virt.domain.events.v1";

fn admin(bootstrap: &str) -> rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap()
}

fn delete_topic(bootstrap: &str, topic: &str) {
    let a = admin(bootstrap);
    let r = rt().block_on(a.delete_topics(&[topic], &rdkafka::admin::AdminOptions::new()));
    assert!(
        r.unwrap().iter().all(|r| r.is_ok()),
        "topic {topic} deleted"
    );
}

/// Creates the events topic as the agent would (an operator's provisioning).
fn create_events_topic(bootstrap: &str) {
    let a = admin(bootstrap);
    let t =
        rdkafka::admin::NewTopic::new(EVENTS_TOPIC, 4, rdkafka::admin::TopicReplication::Fixed(1))
            .set("cleanup.policy", "delete");
    let r = rt().block_on(a.create_topics(&[t], &rdkafka::admin::AdminOptions::new()));
    assert!(r.unwrap().iter().all(|r| r.is_ok()), "topic created");
}

/// Waits until the events topic's last record of `name` is its UNDEFINED.
fn wait_undefined_kafka(bootstrap: &str, agent: &Agent, name: &str) {
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let m = fetch_kafka(bootstrap, EVENTS_TOPIC, &agent.host_id);
        if m.iter()
            .filter(|s| s.event.domain.name == name)
            .max_by_key(|s| s.event.host_seq)
            .is_some_and(|s| s.event.event.as_str() == "UNDEFINED")
        {
            return;
        }
        assert!(
            Instant::now() < end,
            "the burst's UNDEFINED not in the topic within 90 s ({} records); /readyz: {:?}",
            m.len(),
            agent.http("/readyz")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The events topic after the deletion: every journal entry from the
/// first one it holds to the journal's last, once each (snapshot records
/// are on the snapshot topics), in order per partition; the burst's
/// records are the tail of what libvirt emitted.
fn assert_topic_suffix_of_journal(bootstrap: &str, agent: &mut Agent, oracle: &Oracle, name: &str) {
    assert_eq!(agent.terminate(), Some(0), "SIGTERM is a clean exit");
    let n = journal_host_seq(agent);
    let msgs = fetch_kafka(bootstrap, EVENTS_TOPIC, &agent.host_id);
    let first = msgs
        .iter()
        .map(|m| m.event.host_seq)
        .min()
        .expect("records after the deletion");
    let mut hs: Vec<u64> = msgs.iter().map(|m| m.event.host_seq).collect();
    hs.sort_unstable();
    let records = hs.len();
    hs.dedup();
    assert_eq!(hs.len(), records, "a host_seq is stored twice");
    let mut all: BTreeSet<u64> = hs.into_iter().collect();
    all.extend(
        snapshot_seqs(&agent.host_id)
            .into_iter()
            .filter(|s| *s >= first),
    );
    assert_eq!(
        all.into_iter().collect::<Vec<_>>(),
        (first..=n).collect::<Vec<_>>(),
        "the re-created topic holds every entry from {first} to the journal's {n}"
    );
    let mut ours: Vec<&Stored> = msgs
        .iter()
        .filter(|m| m.event.domain.name == name)
        .collect();
    ours.sort_by_key(|m| m.stream_seq); // one key: one partition, offset order
    let got: Vec<(String, String)> = ours
        .iter()
        .map(|m| (m.event.event.to_string(), m.event.detail.to_string()))
        .collect();
    let want: Vec<(String, String)> = oracle
        .for_domain(name)
        .iter()
        .map(|e| (e.event.clone(), e.detail.clone()))
        .collect();
    assert!(!got.is_empty());
    assert!(
        want.ends_with(&got),
        "the tail of what libvirt emitted, in order"
    );
    assert!(ours
        .windows(2)
        .all(|w| w[1].event.host_seq > w[0].event.host_seq));
}

#[test]
fn kafka_topic_deleted_while_running_is_created_again() {
    ensure_libvirtd();
    let kafka = KafkaBroker::start();
    let oracle = Oracle::start(TEST_URI);
    let mut agent = Agent::ready(TEST_URI, None, &kafka_section(&kafka.bootstrap()));

    let name = unique("deltopic");
    let b = burst(name.clone(), 150, Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(800));
    delete_topic(&kafka.bootstrap(), EVENTS_TOPIC);
    b.join().unwrap();
    wait_undefined_kafka(&kafka.bootstrap(), &agent, &name);
    wait_readyz(&agent, Duration::from_secs(10), "ready again", |c, _| {
        c == 200
    });
    assert_topic_suffix_of_journal(&kafka.bootstrap(), &mut agent, &oracle, &name);
}

#[test]
fn kafka_topic_deleted_without_create_topics_fails_readiness_until_recreated() {
    ensure_libvirtd();
    let kafka = KafkaBroker::start();
    let oracle = Oracle::start(TEST_URI);
    // The first run creates the topics; the agent then runs without the
    // right to create them.
    let mut agent = Agent::ready(TEST_URI, None, &kafka_section(&kafka.bootstrap()));
    assert_eq!(agent.terminate(), Some(0));
    let mut toml = std::fs::read_to_string(&agent.config).unwrap();
    toml.push_str("create_topics = false\n");
    std::fs::write(&agent.config, toml).unwrap();
    agent.start();
    agent.wait_ready(Duration::from_secs(30));

    delete_topic(&kafka.bootstrap(), EVENTS_TOPIC);
    let name = unique("nocreatek");
    let b = burst(name.clone(), 20, Duration::from_millis(10));
    wait_readyz(
        &agent,
        Duration::from_secs(60),
        "/readyz fails naming the missing topic",
        |c, body| c == 503 && body.contains(EVENTS_TOPIC) && body.contains("create_topics"),
    );
    b.join().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (code, body) = agent.http("/readyz").expect("agent still serves /readyz");
    assert_eq!(code, 503, "{body}");
    assert!(agent.try_exit().is_none(), "the agent keeps running");
    create_events_topic(&kafka.bootstrap());
    wait_undefined_kafka(&kafka.bootstrap(), &agent, &name);
    wait_readyz(&agent, Duration::from_secs(30), "ready again", |c, _| {
        c == 200
    });
    assert_topic_suffix_of_journal(&kafka.bootstrap(), &mut agent, &oracle, &name);
    let stored = fetch_kafka(&kafka.bootstrap(), EVENTS_TOPIC, &agent.host_id);
    assert_eq!(
        stored
            .iter()
            .filter(|m| m.event.domain.name == name)
            .count(),
        2 + 40 + 2,
        "every event of the burst, all journaled while the topic was missing"
    );
}
