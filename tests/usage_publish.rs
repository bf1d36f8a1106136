//! `virtstream usage --format cloudevents --publish` against real servers:
//! an agent on the libvirtd test driver with `xml = "on-change"` publishes
//! a domain whose XML carries Nova's `<metadata>` (defined with virsh) and
//! a domain without it; the tool publishes the usage of one window twice;
//! clients we did not write (nats-py, confluent-kafka) read the usage
//! stream/topic back and the CloudEvents Python SDK parses every message.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::Value;
use virt::connect::Connect;

const NOVA_NS: &str = "http://openstack.org/xmlns/libvirt/nova/1.1";

/// `[usage.tenant]` for Nova: the project id.
const NOVA_TENANT: &str = "[usage.tenant]\n\
     namespace = [\"http://openstack.org/xmlns/libvirt/nova/1.1\", \"http://openstack.org/xmlns/libvirt/nova/1.0\"]\n\
     element = \"owner/project\"\nattribute = \"uuid\"\n";

fn tool(agent: &Agent, args: &[&str]) -> Output {
    Command::new(Agent::bin())
        .args(args)
        .arg("--config")
        .arg(&agent.config)
        .envs(agent.env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run virtstream")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A test-driver domain with Nova's instance metadata (the layout of
/// nova/virt/libvirt/config.py: `<nova:instance>` under `<metadata>`, the
/// owner's project id in `<nova:project uuid=…>`).
fn nova_domain_xml(name: &str, uuid: &str, project: &str) -> String {
    format!(
        "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>\
         <metadata><nova:instance xmlns:nova=\"{NOVA_NS}\">\
         <nova:package version=\"29.0.1\"/><nova:name>web-1</nova:name>\
         <nova:flavor name=\"m1.tiny\"><nova:memory>8</nova:memory><nova:vcpus>1</nova:vcpus></nova:flavor>\
         <nova:owner><nova:user uuid=\"{}\">alice</nova:user>\
         <nova:project uuid=\"{project}\">acme</nova:project></nova:owner>\
         </nova:instance></metadata>\
         <memory>8192</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>",
        new_uuid()
    )
}

fn virsh(args: &[&str]) {
    let o = Command::new("virsh")
        .args(["-c", TEST_URI])
        .args(args)
        .output()
        .expect("virsh runs");
    assert!(
        o.status.success(),
        "virsh {args:?}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// The scenario both buses share, up to the window's end: the agent, the
/// Nova domain (uuid, project) and the plain domain (uuid), both running,
/// the window `[t0, t_end)`; `conn` keeps the test driver's domains.
struct Scenario {
    agent: Agent,
    nova: (String, String),
    plain: String,
    window: (String, String),
    _conn: Connect,
}

fn scenario(
    nats_url: Option<&str>,
    extra: &str,
    bus_has: impl Fn(&Agent, &str) -> bool,
) -> Scenario {
    let mut agent = Agent::new(
        TEST_URI,
        nats_url,
        &format!("{extra}[snapshot]\nheartbeat = \"1s\"\n{NOVA_TENANT}"),
    );
    agent
        .env
        .push(("VIRTSTREAM_LIBVIRT_XML".into(), "on-change".into()));
    agent.start();
    agent.wait_ready(Duration::from_secs(30));
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let t0 = now_s();

    let (nova_name, nova_uuid, project) = (unique("nova"), new_uuid(), new_uuid());
    let file = agent.dir.path().join("nova-domain.xml");
    std::fs::write(&file, nova_domain_xml(&nova_name, &nova_uuid, &project)).unwrap();
    virsh(&["define", file.to_str().unwrap()]);
    virsh(&["start", &nova_name]);
    let plain_name = unique("plain");
    let plain_uuid = new_uuid();
    conn.define_domain_xml(&test_domain_xml(&plain_name, &plain_uuid))
        .unwrap()
        .create()
        .unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(bus_has(&agent, &nova_uuid) && bus_has(&agent, &plain_uuid)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the two domains' events with their XML never reached the bus"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let t_end = now_s();
    Scenario {
        agent,
        nova: (nova_uuid, project),
        plain: plain_uuid,
        window: (rfc3339(t0), rfc3339(t_end)),
        _conn: conn,
    }
}

/// A domain's DEFINED event carrying its XML is among `events`.
fn has_xml(events: &[Stored], uuid: &str) -> bool {
    let started = events
        .iter()
        .any(|s| s.event.domain.uuid == uuid && s.event.event.as_str() == "STARTED");
    let xml = events
        .iter()
        .any(|s| s.event.domain.uuid == uuid && s.event.xml.is_some());
    started && xml
}

/// Runs `usage --format cloudevents --publish` twice over the scenario's
/// window: both succeed and print the same events. Returns them, parsed.
fn publish_twice(s: &Scenario, bus: &str) -> Vec<Value> {
    let (from, to) = (&s.window.0, &s.window.1);
    let args = [
        "usage",
        "--bus",
        bus,
        "--from",
        from,
        "--to",
        to,
        "--format",
        "cloudevents",
        "--publish",
    ];
    let first = tool(&s.agent, &args);
    assert!(
        first.status.success(),
        "{bus}: usage --publish: {}",
        text(&first.stderr)
    );
    let printed = text(&first.stdout);
    let lines: Vec<Value> = printed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        text(&first.stderr).contains(&format!("published {} usage event(s)", lines.len())),
        "{bus}: {}",
        text(&first.stderr)
    );
    let second = tool(&s.agent, &args);
    assert!(
        second.status.success(),
        "{bus}: second usage --publish: {}",
        text(&second.stderr)
    );
    assert_eq!(
        text(&second.stdout),
        printed,
        "{bus}: same window, same events"
    );
    lines
}

/// The checks common to both buses on what a foreign reader got:
/// `stored` maps each CloudEvent id (as parsed by the SDK) to the events
/// stored under it.
fn check_events(bus: &str, s: &Scenario, printed: &[Value], stored: &BTreeMap<String, Vec<Value>>) {
    let ours: Vec<&Value> = printed
        .iter()
        .filter(|e| e["source"] == format!("virtstream://{}", s.agent.host_id))
        .collect();
    assert_eq!(ours.len(), printed.len(), "{bus}: one host only");
    let printed_ids: BTreeSet<&str> = printed.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let stored_ids: BTreeSet<&str> = stored.keys().map(String::as_str).collect();
    assert_eq!(
        stored_ids, printed_ids,
        "{bus}: every printed event is stored, nothing else"
    );
    let by_uuid = |uuid: &str| -> &Vec<Value> {
        let id = printed
            .iter()
            .find(|e| e["data"]["domain_uuid"] == uuid)
            .unwrap_or_else(|| panic!("{bus}: no usage event for {uuid}: {printed:?}"))["id"]
            .as_str()
            .unwrap();
        &stored[id]
    };
    let (nova_uuid, project) = &s.nova;
    for e in by_uuid(nova_uuid) {
        assert_eq!(e["type"], "io.virtstream.usage.v1", "{bus}: {e}");
        assert_eq!(e["subject"], project.as_str(), "{bus}: the tenant: {e}");
        assert_eq!(e["data"]["tenant"], project.as_str(), "{bus}: {e}");
        assert_eq!(e["data"]["domain_uuid"], nova_uuid.as_str(), "{bus}: {e}");
        assert!(
            e["data"]["running_seconds"].as_f64().unwrap() > 0.0,
            "{bus}: {e}"
        );
    }
    for e in by_uuid(&s.plain) {
        assert_eq!(e["subject"], s.plain.as_str(), "{bus}: no tenant: {e}");
        assert!(e["data"]["tenant"].is_null(), "{bus}: {e}");
    }
}

/// The CloudEvents SDK's view of one event: attributes and data.
const SDK_EVENT: &str = r#"
from cloudevents.http import from_json
def sdk(value):
    e = from_json(value)
    out = dict(e.get_attributes())
    out["data"] = e.data
    return out
"#;

#[test]
fn usage_publish_to_nats_is_stored_once_per_window() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let url = nats.url();
    let s = scenario(Some(&url), "", |a, uuid| {
        has_xml(&fetch(&url, "VIRT_EVENTS", &a.filter()), uuid)
    });
    let printed = publish_twice(&s, "nats");

    // nats-py reads the whole usage stream, message by message.
    let script = format!(
        r#"
import asyncio, json, sys
import nats
{SDK_EVENT}
async def main(url, stream):
    nc = await nats.connect(url)
    js = nc.jetstream()
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        m = await js.get_msg(stream, seq=seq)
        out.append({{"subject": m.subject, "headers": dict(m.headers or {{}}), "event": sdk(m.data)}})
    print(json.dumps({{"messages": info.state.messages, "config": {{"subjects": info.config.subjects, "duplicate_window": info.config.duplicate_window}}, "list": out}}, default=str))
    await nc.close()
asyncio.run(main(sys.argv[1], sys.argv[2]))
"#
    );
    let out = run_python("nats-py on VIRT_USAGE", &script, &[&url, "VIRT_USAGE"], b"");
    let got: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        got["config"]["subjects"],
        serde_json::json!(["virt.usage.v1.>"])
    );
    let list = got["list"].as_array().unwrap();
    assert_eq!(
        got["messages"].as_u64().unwrap() as usize,
        printed.len(),
        "two runs of one window, each event stored once (Nats-Msg-Id): {list:?}"
    );
    let token = virtstream::bus::wire::subject_token(&s.agent.host_id);
    let mut stored: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for m in list {
        let e = &m["event"];
        let id = e["id"].as_str().unwrap();
        assert_eq!(m["headers"]["Nats-Msg-Id"], id, "{m}");
        assert_eq!(m["headers"]["content-type"], "application/cloudevents+json");
        let uuid = e["data"]["domain_uuid"].as_str().unwrap();
        assert_eq!(m["subject"], format!("virt.usage.v1.{token}.{uuid}"), "{m}");
        stored.entry(id.to_owned()).or_default().push(e.clone());
    }
    assert!(stored.values().all(|v| v.len() == 1), "{stored:?}");
    check_events("nats", &s, &printed, &stored);
}

#[test]
fn usage_publish_to_kafka_keys_by_tenant_with_equal_ids_per_window() {
    ensure_libvirtd();
    let kafka = KafkaBroker::start();
    let bootstrap = kafka.bootstrap();
    let s = scenario(None, &kafka_section(&bootstrap), |a, uuid| {
        has_xml(
            &fetch_kafka(&bootstrap, "virt.domain.events.v1", &a.host_id),
            uuid,
        )
    });
    let printed = publish_twice(&s, "kafka");

    // confluent-kafka reads every partition of the usage topic from the
    // start until it has both runs' records, then a little longer.
    let script = format!(
        r#"
import json, sys, time
from confluent_kafka import Consumer, TopicPartition
{SDK_EVENT}
bootstrap, topic, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = Consumer({{"bootstrap.servers": bootstrap, "group.id": "usage-oracle", "enable.auto.commit": False}})
parts = c.list_topics(topic, timeout=10).topics[topic].partitions
c.assign([TopicPartition(topic, p, 0) for p in parts])
out, end, extra = [], time.time() + 60, None
while time.time() < end and (extra is None or time.time() < extra):
    m = c.poll(0.5)
    if m is None:
        continue
    if m.error():
        raise SystemExit(f"consumer error: {{m.error()}}")
    out.append({{"key": m.key().decode(), "partition": m.partition(),
                 "headers": {{k: v.decode() for k, v in (m.headers() or [])}},
                 "event": sdk(m.value())}})
    if len(out) >= want and extra is None:
        extra = time.time() + 2
c.close()
print(json.dumps({{"partitions": len(parts), "list": out}}, default=str))
"#
    );
    let want = (2 * printed.len()).to_string();
    let out = run_python(
        "confluent-kafka on virt.usage.v1",
        &script,
        &[&bootstrap, "virt.usage.v1", &want],
        b"",
    );
    let got: Value = serde_json::from_slice(&out).unwrap();
    let partitions = got["partitions"].as_i64().unwrap() as i32;
    assert_eq!(partitions, 4, "created with kafka.partitions");
    let list = got["list"].as_array().unwrap();
    assert_eq!(
        list.len(),
        2 * printed.len(),
        "both runs' records are on the topic: {list:?}"
    );
    let mut stored: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for m in list {
        let e = &m["event"];
        assert_eq!(m["key"], e["subject"], "key = subject: {m}");
        assert_eq!(m["headers"]["content-type"], "application/cloudevents+json");
        let key = m["key"].as_str().unwrap();
        assert_eq!(
            m["partition"].as_i64().unwrap() as i32,
            virtstream::bus::kafka::partition_for(key, partitions),
            "murmur2 placement of the key: {m}"
        );
        stored
            .entry(e["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(e.clone());
    }
    for (id, v) in &stored {
        assert_eq!(v.len(), 2, "{id}: one record per run");
        assert_eq!(v[0], v[1], "{id}: the same event both times");
    }
    check_events("kafka", &s, &printed, &stored);
}

#[test]
fn publish_needs_the_cloudevents_format() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[journal]\npath = \"{}\"\n[nats]\nurl = \"nats://127.0.0.1:1\"\n",
            dir.path().join("journal").display()
        ),
    )
    .unwrap();
    for format in [None, Some("json"), Some("csv")] {
        let mut cmd = Command::new(Agent::bin());
        cmd.args([
            "usage",
            "--bus",
            "nats",
            "--from",
            "2026-01-01T00:00:00Z",
            "--to",
            "2026-01-01T01:00:00Z",
            "--publish",
            "--config",
        ])
        .arg(&config);
        if let Some(f) = format {
            cmd.args(["--format", f]);
        }
        let o = cmd.output().unwrap();
        assert_eq!(o.status.code(), Some(64), "{format:?}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains("--publish")
                && text(&o.stderr).contains("--format cloudevents"),
            "{format:?}: {}",
            text(&o.stderr)
        );
        assert!(o.stdout.is_empty(), "nothing read, nothing printed");
    }
}
