//! Schema-registry framing end to end: the agent registers its schemas in
//! a Confluent-API registry (the test fixture: no Confluent-API registry
//! can be installed from the package registries we reach) and publishes
//! byte 0 + schema id + datum; confluent-kafka's `SchemaRegistryClient` +
//! `AvroDeserializer` (a client we did not write) decodes what it
//! published, matching `virsh event`; our tools read both framings; an
//! unreachable registry keeps the agent not ready with events journaled;
//! a registry that refuses our schema or our credentials stops the sink
//! with its reason.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::registry::{Behaviour, Registry};
use common::*;
use virt::connect::Connect;

const EVENTS_TOPIC: &str = "virt.domain.events.v1";

/// A scripted lifecycle of a persistent and a transient domain; returns
/// their names once `virsh event` saw the last event of both.
fn lifecycle(oracle: &Oracle, tag: &str) -> [String; 2] {
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let p = unique(&format!("{tag}p"));
    let d = conn
        .define_domain_xml(&test_domain_xml(&p, &new_uuid()))
        .unwrap();
    d.create().unwrap();
    d.suspend().unwrap();
    d.resume().unwrap();
    d.destroy().unwrap();
    d.undefine().unwrap();
    let t = unique(&format!("{tag}t"));
    let dt = conn
        .create_domain_xml(&test_domain_xml(&t, &new_uuid()), 0)
        .unwrap();
    dt.suspend().unwrap();
    dt.resume().unwrap();
    dt.destroy().unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while oracle.for_domain(&p).len() < 6 || oracle.for_domain(&t).len() < 4 {
        assert!(Instant::now() < end, "virsh event never saw the lifecycle");
        std::thread::sleep(Duration::from_millis(100));
    }
    [p, t]
}

/// Polls the foreign reader until every domain in `names` has as many
/// events as `virsh event` printed, then checks they are the same, in
/// order, with per-domain `seq` contiguous.
fn assert_foreign_matches_oracle(
    read: impl Fn() -> Vec<serde_json::Value>,
    oracle: &Oracle,
    names: &[String],
) -> Vec<serde_json::Value> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = read();
        let of = |n: &str| -> Vec<&serde_json::Value> {
            rows.iter().filter(|r| r["name"] == n).collect()
        };
        if names
            .iter()
            .all(|n| of(n).len() >= oracle.for_domain(n).len())
        {
            for n in names {
                let got: Vec<(String, String)> = of(n)
                    .iter()
                    .map(|r| {
                        (
                            r["event"].as_str().unwrap().to_string(),
                            r["detail"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect();
                let want: Vec<(String, String)> = oracle
                    .for_domain(n)
                    .into_iter()
                    .map(|e| (e.event, e.detail))
                    .collect();
                assert_eq!(got, want, "{n}: decoded by confluent-kafka vs virsh event");
                let seqs: Vec<u64> = of(n).iter().map(|r| r["seq"].as_u64().unwrap()).collect();
                assert!(
                    seqs.windows(2).all(|w| w[1] == w[0] + 1),
                    "{n}: seq {seqs:?}"
                );
            }
            return rows;
        }
        assert!(
            Instant::now() < end,
            "the foreign reader did not find every event within 60 s ({} rows)",
            rows.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn registry_section(url: &str, extra: &str) -> String {
    format!("[schema_registry]\nurl = \"{url}\"\ntimeout = \"2s\"\n{extra}")
}

/// Runs a consumer tool; (exit code, stdout, stderr).
fn tool(agent: &Agent, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(Agent::bin())
        .args(args)
        .arg("--config")
        .arg(&agent.config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// How many `DomainEvent` versions this build ships (each is registered).
fn event_versions() -> usize {
    virtstream::codec::schemas()
        .iter()
        .filter(|s| s.name == "DomainEvent")
        .count()
}

#[test]
fn kafka_registry_framing_is_decoded_by_confluent_kafka_with_basic_auth() {
    ensure_libvirtd();
    let kafka = KafkaBroker::start();
    let registry = Registry::start(Behaviour {
        basic_auth: Some(("virtstream".into(), "s3cret".into())),
        ..Default::default()
    });
    let oracle = Oracle::start(TEST_URI);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("registry-password");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let auth = format!(
        "username = \"virtstream\"\npassword_file = \"{}\"\n",
        pw.display()
    );
    let agent = Agent::ready(
        TEST_URI,
        None,
        &format!(
            "{}{}",
            kafka_section(&kafka.bootstrap()),
            registry_section(&registry.url(), &auth)
        ),
    );
    let names = lifecycle(&oracle, "reg");
    let pw_arg = pw.to_str().unwrap();
    let url = registry.url();
    let args = [
        "--registry",
        url.as_str(),
        "--registry-user",
        "virtstream",
        "--registry-password-file",
        pw_arg,
    ];
    let rows = assert_foreign_matches_oracle(
        || read_events("kafka", &kafka.bootstrap(), &args),
        &oracle,
        &names,
    );
    // Registered under TopicNameStrategy subjects, one schema each; every
    // message carries the events subject's id.
    let ids = registry.versions(&format!("{EVENTS_TOPIC}-value"));
    assert_eq!(
        ids.len(),
        event_versions(),
        "every shipped DomainEvent version registered"
    );
    let newest = ids.last().unwrap();
    assert!(
        rows.iter().all(|r| r["schema_id"] == *newest),
        "schema ids: the newest version's"
    );
    for t in ["virt.domain.snapshots.v1", "virt.host.snapshots.v1"] {
        assert_eq!(registry.versions(&format!("{t}-value")).len(), 1, "{t}");
    }
    let calls = registry.calls();
    assert!(
        calls.iter().any(|c| c.starts_with("GET /config/")),
        "the compatibility level was read: {calls:?}"
    );
    // Our own tools read the registry framing too.
    let (code, out, err) = tool(&agent, &["replay", "--bus", "kafka"]);
    assert_eq!(code, 0, "replay: {err}");
    for n in &names {
        let lines = out.lines().filter(|l| l.contains(n.as_str())).count();
        assert_eq!(lines, oracle.for_domain(n).len(), "replay of {n}: {err}");
    }
    let (code, _, err) = tool(&agent, &["state", "--bus", "kafka", "--format", "json"]);
    assert_eq!(code, 0, "state: {err}");
    assert!(!err.contains("cannot decode"), "{err}");
}

#[test]
fn unreachable_registry_at_start_journals_then_publishes_everything() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let oracle = Oracle::start(TEST_URI);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut agent = Agent::new(TEST_URI, Some(&nats.url()), &registry_section(&url, ""));
    agent.start();
    // Not ready, naming the registry; libvirt's events are journaled.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((code, body)) = agent.http("/readyz") {
            if code == 503 && body.contains("schema registry") {
                break;
            }
        }
        assert!(Instant::now() < end, "/readyz never named the registry");
        std::thread::sleep(Duration::from_millis(100));
    }
    let names = lifecycle(&oracle, "down");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.http("/readyz").map(|r| r.0), Some(503));
    assert!(agent.try_exit().is_none(), "the agent keeps running");
    // The registry comes up: everything journaled is published, in order.
    let registry = Registry::start_on(port, Behaviour::default());
    agent.wait_ready(Duration::from_secs(20));
    let args = [
        "--registry",
        url.as_str(),
        "--registry-topic",
        "virt.events.v1",
    ];
    assert_foreign_matches_oracle(|| read_events("nats", &nats.url(), &args), &oracle, &names);
    assert_eq!(
        registry.versions("virt.events.v1-value").len(),
        event_versions()
    );
    assert_eq!(registry.versions("virt.snapshots.v1-value").len(), 1);
    assert_eq!(registry.versions("virt.hosts.v1-value").len(), 1);
    // A restart finds its schemas registered and does not check them again
    // (a later version registered meanwhile may not read them).
    registry.state.lock().unwrap().behaviour.incompatible = Some("newer schema".into());
    assert_eq!(agent.terminate(), Some(0));
    agent.start();
    agent.wait_ready(Duration::from_secs(20));
    assert_eq!(
        registry.versions("virt.events.v1-value").len(),
        event_versions()
    );
}

#[test]
fn consumer_tools_read_a_stream_holding_both_framings() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let registry = Registry::start(Behaviour::default());
    let oracle = Oracle::start(TEST_URI);
    // First without a registry (single-object), then with one, custom
    // subject names.
    let mut agent = Agent::ready(TEST_URI, Some(&nats.url()), "");
    let before = lifecycle(&oracle, "so");
    for n in &before {
        wait_until_published(&agent, &oracle, n);
    }
    assert_eq!(agent.terminate(), Some(0));
    let mut cfg = std::fs::read_to_string(&agent.config).unwrap();
    cfg.push_str(&registry_section(
        &registry.url(),
        "nats_events_subject = \"fleet-events\"\n",
    ));
    std::fs::write(&agent.config, cfg).unwrap();
    agent.start();
    agent.wait_ready(Duration::from_secs(30));
    let after = lifecycle(&oracle, "cf");
    for n in &after {
        wait_until_published(&agent, &oracle, n);
    }
    assert_eq!(registry.versions("fleet-events").len(), event_versions());
    assert!(registry.versions("virt.events.v1-value").is_empty());
    let (code, out, err) = tool(&agent, &["replay", "--bus", "nats"]);
    assert_eq!(code, 0, "replay: {err}");
    let out_replay = out.clone();
    for n in before.iter().chain(&after) {
        let got: Vec<String> = out
            .lines()
            .filter(|l| l.contains(n.as_str()))
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!(
                    "{}/{}",
                    v["event"].as_str().unwrap(),
                    v["detail"].as_str().unwrap()
                )
            })
            .collect();
        let want: Vec<String> = oracle
            .for_domain(n)
            .into_iter()
            .map(|e| format!("{}/{}", e.event, e.detail))
            .collect();
        assert_eq!(got, want, "replay of {n}");
    }
    let (code, out, err) = tool(&agent, &["audit", "--bus", "nats"]);
    assert_eq!(
        code, 0,
        "audit finds nothing wrong across the framings: {out}{err}"
    );
    // A message whose id the registry does not know is undecodable, named
    // by its id; the read goes on.
    rt().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        js.publish(
            format!("virt.events.v1.{}.{}", agent.host_id, new_uuid()),
            vec![0u8, 0, 0x0f, 0x42, 0x3f, 2, 4].into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    });
    let (code, out2, err) = tool(&agent, &["replay", "--bus", "nats"]);
    assert_eq!(code, 1, "replay counts the undecodable message: {err}");
    assert!(err.contains("999999"), "the unknown id is named: {err}");
    assert_eq!(out2, out_replay, "every other message still decoded");
    // Without [schema_registry] the tools name what is missing.
    let plain: String = std::fs::read_to_string(&agent.config)
        .unwrap()
        .split("[schema_registry]")
        .next()
        .unwrap()
        .to_string();
    std::fs::write(&agent.config, plain).unwrap();
    let (_, _, err) = tool(&agent, &["replay", "--bus", "nats"]);
    assert!(
        err.contains("configure [schema_registry]"),
        "a registry-framed message without a registry: {err}"
    );
}

/// Waits until `replay` shows as many events of `name` as `virsh event`
/// printed.
fn wait_until_published(agent: &Agent, oracle: &Oracle, name: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out, err) = tool(agent, &["replay", "--bus", "nats"]);
        let n = out.lines().filter(|l| l.contains(name)).count();
        if n >= oracle.for_domain(name).len() {
            return;
        }
        assert!(Instant::now() < end, "{name}: {n} events replayed; {err}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_registry_that_refuses_our_schema_or_credentials_stops_the_sink_with_its_reason() {
    ensure_libvirtd();
    let kafka = KafkaBroker::start();
    // The events subject already holds a schema the registry says ours
    // is incompatible with.
    let reason = "READER_FIELD_MISSING_DEFAULT_VALUE: tenant";
    let registry = Registry::start(Behaviour {
        incompatible: Some(reason.into()),
        ..Default::default()
    });
    registry
        .state
        .lock()
        .unwrap()
        .subjects
        .insert(format!("{EVENTS_TOPIC}-value"), vec![]);
    let wait_exit = |agent: &mut Agent| -> i32 {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(code) = agent.try_exit() {
                return code.unwrap_or(-1);
            }
            assert!(
                Instant::now() < end,
                "the agent kept running: {}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let kafka_agent = |url: &str, extra: &str| {
        Agent::new(
            TEST_URI,
            None,
            &format!(
                "{}{}",
                kafka_section(&kafka.bootstrap()),
                registry_section(url, extra)
            ),
        )
    };
    let mut agent = kafka_agent(&registry.url(), "");
    agent.start();
    assert_ne!(wait_exit(&mut agent), 0);
    let log = agent.log();
    assert!(
        log.contains(reason) && log.contains("virt.domain.events.v1-value"),
        "the refusal names the subject and the registry's reason: {log}"
    );
    // Wrong credentials: refused with the registry's answer.
    let auth = Registry::start(Behaviour {
        basic_auth: Some(("virtstream".into(), "right".into())),
        ..Default::default()
    });
    let mut agent = kafka_agent(&auth.url(), "username = \"virtstream\"\n");
    agent.env.push((
        "VIRTSTREAM_SCHEMA_REGISTRY_PASSWORD".into(),
        "pw-wrong-7731".into(),
    ));
    agent.start();
    assert_ne!(wait_exit(&mut agent), 0);
    let log = agent.log();
    assert!(
        log.contains("401") && log.contains("Unauthorized") && !log.contains("pw-wrong-7731"),
        "the refusal is the registry's answer, without the password: {log}"
    );
}

#[test]
fn a_registry_behind_mutual_tls_is_reached_with_the_configured_ca_and_client_certificate() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let registry = Registry::start(Behaviour::default());
    let pki = tls::Pki::new("registry");
    let tunnel = tls::Stunnel::start(&pki, free_port(), registry.port);
    let url = format!("https://localhost:{}", tunnel.port);
    // Without a client certificate the handshake fails: not ready, retried.
    let plain = format!("tls_ca_file = \"{}\"\n", pki.ca.display());
    let mut agent = Agent::new(TEST_URI, Some(&nats.url()), &registry_section(&url, &plain));
    agent.start();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((503, body)) = agent.http("/readyz") {
            if body.contains("schema registry") {
                let b = body.to_lowercase();
                assert!(
                    b.contains("certificate") || b.contains("handshake") || b.contains("tls"),
                    "the cause is the TLS handshake: {body}"
                );
                break;
            }
        }
        assert!(Instant::now() < end, "/readyz never named the registry");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(registry.calls().is_empty(), "nothing got through");
    assert_eq!(agent.terminate(), Some(0));
    // With the CA and the client certificate it registers and publishes.
    let mutual = format!(
        "{plain}tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let agent = Agent::ready(
        TEST_URI,
        Some(&nats.url()),
        &registry_section(&url, &mutual),
    );
    assert_eq!(
        registry.versions("virt.events.v1-value").len(),
        event_versions()
    );
    let oracle = Oracle::start(TEST_URI);
    let names = lifecycle(&oracle, "tls");
    for n in &names {
        wait_until_published(&agent, &oracle, n);
    }
}
