//! The consumer tools (`state`, `audit`, `usage`) against real servers: an
//! agent on the real libvirtd test driver publishes to a real nats-server
//! and a real Kafka-protocol broker (tansu); the tools read them back.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::Value;
use virt::connect::Connect;

fn tool(agent: &Agent, args: &[&str]) -> Output {
    Command::new(Agent::bin())
        .args(args)
        .arg("--config")
        .arg(&agent.config)
        .output()
        .expect("run virtstream")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What `virsh list --all` and `virsh domstate --reason` say of `name`:
/// (STATE, REASON, persistent), or None when virsh does not list it.
fn virsh_state(name: &str) -> Option<(String, String, bool)> {
    let list = |flag: &str| -> Vec<String> {
        let o = Command::new("virsh")
            .args(["-c", TEST_URI, "list", "--all", "--name", flag])
            .output()
            .expect("virsh list");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    };
    let persistent = list("--persistent").iter().any(|n| n == name);
    if !persistent && !list("--transient").iter().any(|n| n == name) {
        return None;
    }
    let o = Command::new("virsh")
        .args(["-c", TEST_URI, "domstate", "--reason", name])
        .output()
        .expect("virsh domstate");
    let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
    // e.g. "running (booted)", "shut off (destroyed)", "paused (user)"
    let (state, reason) = text
        .split_once(" (")
        .map(|(s, r)| (s, r.trim_end_matches(')')))
        .unwrap_or((&text, "unknown"));
    let state = match state {
        "running" => "RUNNING",
        "paused" => "PAUSED",
        "shut off" => "SHUTOFF",
        "idle" => "BLOCKED",
        "in shutdown" => "SHUTDOWN",
        "crashed" => "CRASHED",
        "pmsuspended" => "PMSUSPENDED",
        other => panic!("virsh domstate said `{other}`"),
    };
    Some((
        state.to_string(),
        reason.to_uppercase().replace(' ', "_"),
        persistent,
    ))
}

/// `state --format json` for one host, by domain name.
fn state_of(agent: &Agent, bus: &str) -> BTreeMap<String, Value> {
    let o = tool(agent, &["state", "--bus", bus]);
    assert!(o.status.success(), "state --bus {bus}: {}", stderr(&o));
    let all: Vec<Value> = serde_json::from_str(&stdout(&o)).expect("state prints JSON");
    all.into_iter()
        .filter(|d| d["host_id"] == agent.host_id.as_str())
        .map(|d| (d["name"].as_str().unwrap().to_string(), d))
        .collect()
}

/// A libvirt call with the wall-clock time just before and after it.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let a = now_s();
    let r = f();
    (r, a, now_s())
}

#[test]
fn state_audit_and_usage_match_libvirt_on_both_buses() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let kafka = KafkaBroker::start();
    let extra = format!(
        "{}[snapshot]\nheartbeat = \"1s\"\n",
        kafka_section(&kafka.bootstrap())
    );
    let agent = Agent::ready(TEST_URI, Some(&nats.url()), &extra);
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let define = |name: &str| {
        conn.define_domain_xml(&test_domain_xml(name, &new_uuid()))
            .unwrap()
    };
    let t0 = now_s();
    // paused: started, then suspended.
    let paused = unique("paused");
    let d = define(&paused);
    let (_, p_start, _) = timed(|| d.create().unwrap());
    let (_, p_susp, _) = timed(|| d.suspend().unwrap());
    // running the whole time.
    let running = unique("running");
    let d = define(&running);
    let (_, r_start, _) = timed(|| d.create().unwrap());
    // started, then destroyed: shut off, persistent.
    let stopped = unique("stopped");
    let d = define(&stopped);
    let (_, s_start, _) = timed(|| d.create().unwrap());
    let (_, s_stop, _) = timed(|| d.destroy().unwrap());
    // defined, then undefined: gone.
    let undefined = unique("undefined");
    define(&undefined).undefine().unwrap();
    // running, then undefined: a running transient domain.
    let unpersisted = unique("unpersisted");
    let d = define(&unpersisted);
    d.create().unwrap();
    d.undefine().unwrap();
    // transient, destroyed: gone.
    let gone = unique("gone");
    conn.create_domain_xml(&test_domain_xml(&gone, &new_uuid()), 0)
        .unwrap()
        .destroy()
        .unwrap();
    // transient, running; the last action of the script.
    let transient = unique("transient");
    conn.create_domain_xml(&test_domain_xml(&transient, &new_uuid()), 0)
        .unwrap();
    let names = [
        &paused,
        &running,
        &stopped,
        &undefined,
        &unpersisted,
        &gone,
        &transient,
        &"test".to_string(),
    ];

    let last = |m: &[Stored]| m.iter().any(|s| s.event.domain.name == transient);
    wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(60),
        "the script on NATS",
        last,
    );
    wait_for_kafka(
        &kafka.bootstrap(),
        &agent.host_id,
        Duration::from_secs(60),
        "the script on Kafka",
        last,
    );
    let t_end = now_s();

    for bus in ["nats", "kafka"] {
        let state = state_of(&agent, bus);
        for name in names {
            let got = state.get(name.as_str());
            match (virsh_state(name), got) {
                (None, None) => {}
                (Some((st, reason, persistent)), Some(d)) => {
                    assert_eq!(d["state"], st.as_str(), "{bus}: {name}: {d}");
                    assert_eq!(d["reason"], reason.as_str(), "{bus}: {name}: {d}");
                    assert_eq!(d["persistent"], persistent, "{bus}: {name}: {d}");
                    assert_eq!(d["stale"], false, "{bus}: {name}: {d}");
                    if name != "test" {
                        assert_eq!(d["vcpus"], 1, "{bus}: {name}: {d}");
                        assert_eq!(d["memory_kib"], 8192, "{bus}: {name}: {d}");
                    }
                    assert!(d["seq"].as_u64().unwrap() >= 1);
                }
                (want, got) => panic!("{bus}: {name}: virsh says {want:?}, state says {got:?}"),
            }
        }
        assert!(
            virsh_state(&paused).is_some_and(|s| s.0 == "PAUSED"),
            "the scenario has a paused domain"
        );

        let o = tool(&agent, &["state", "--bus", bus, "--format", "table"]);
        let table = stdout(&o);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(table.starts_with("HOST "), "{table}");
        let row = table
            .lines()
            .find(|l| l.contains(&running))
            .expect("a row per domain");
        assert!(row.contains("RUNNING") && row.contains("BOOTED") && row.ends_with("no"));

        let o = tool(&agent, &["audit", "--bus", bus]);
        assert!(
            o.status.success(),
            "audit --bus {bus} exits 0 on a continuous stream:\n{}{}",
            stdout(&o),
            stderr(&o)
        );
        assert!(stdout(&o).contains("continuous"), "{}", stdout(&o));

        // Usage over [t0, t_end): the agent stamps events on receipt, so
        // its intervals match the calls' times within the tolerance.
        let (from, to) = (rfc3339(t0), rfc3339(t_end));
        let usage = ["usage", "--bus", bus, "--from", &from, "--to", &to];
        let o = tool(&agent, &usage);
        assert!(o.status.success(), "{}", stderr(&o));
        let rows: Vec<Value> = serde_json::from_str(&stdout(&o)).unwrap();
        let row = |name: &str| {
            rows.iter()
                .find(|r| r["host_id"] == agent.host_id.as_str() && r["name"] == name)
                .unwrap_or_else(|| panic!("{bus}: no usage row for {name}: {rows:?}"))
        };
        let close = |v: &Value, want: f64, what: &str| {
            let got = v.as_f64().unwrap();
            assert!(
                (got - want).abs() < 0.5,
                "{bus}: {what}: usage {got}, expected {want:.3} ± 0.5"
            );
        };
        let r = row(&running);
        close(
            &r["running_seconds"],
            t_end - r_start,
            "running domain, running s",
        );
        close(
            &r["vcpu_seconds"],
            t_end - r_start,
            "running domain, vCPU s",
        );
        close(
            &r["memory_gib_seconds"],
            (t_end - r_start) * 8192.0 / 1_048_576.0,
            "running domain, GiB s",
        );
        close(&r["paused_seconds"], 0.0, "running domain, paused s");
        let r = row(&paused);
        close(
            &r["running_seconds"],
            p_susp - p_start,
            "paused domain, running s",
        );
        close(
            &r["paused_seconds"],
            t_end - p_susp,
            "paused domain, paused s",
        );
        let r = row(&stopped);
        close(
            &r["running_seconds"],
            s_stop - s_start,
            "stopped domain, running s",
        );
        assert_eq!(r["stale"], false);

        let o = tool(&agent, &[&usage[..], &["--format", "csv"]].concat());
        let csv = stdout(&o);
        assert!(
            csv.starts_with("host_id,uuid,name,running_seconds,"),
            "{csv}"
        );
        assert!(csv.lines().any(|l| l.contains(&running)), "{csv}");

        // CloudEvents for a metering system: parsed by the CloudEvents
        // Python SDK (not ours), one event per JSON row, the same ids on a
        // second run of the same window.
        let ce = [&usage[..], &["--format", "cloudevents"]].concat();
        let o = tool(&agent, &ce);
        assert!(o.status.success(), "{}", stderr(&o));
        let events = stdout(&o);
        assert_eq!(events.lines().count(), rows.len(), "{events}");
        assert_eq!(
            stdout(&tool(&agent, &ce)),
            events,
            "{bus}: same window, same events"
        );
        let parsed = cloudevents_sdk_parse(&events);
        assert_eq!(parsed.len(), rows.len());
        for (e, row) in parsed.iter().zip(&rows) {
            assert_eq!(e["type"], "io.virtstream.usage.v1");
            assert_eq!(e["specversion"], "1.0");
            assert_eq!(
                e["source"],
                format!("virtstream://{}", row["host_id"].as_str().unwrap())
            );
            assert_eq!(e["subject"], row["uuid"]);
            assert_eq!(e["data"]["running_seconds"], row["running_seconds"]);
            assert_eq!(
                e["data"]["window_end"].as_str().unwrap(),
                e["time"].as_str().unwrap()
            );
        }
        let ids: std::collections::BTreeSet<&str> =
            parsed.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(
            ids.len(),
            parsed.len(),
            "ids are unique per host, domain and window"
        );
    }
    // Kafka: audit from given offsets.
    let o = tool(&agent, &["audit", "--bus", "kafka", "--from-offset", "0:0"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

#[test]
fn audit_names_a_message_deleted_from_the_stream() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let agent = Agent::ready(
        TEST_URI,
        Some(&nats.url()),
        "[snapshot]\nheartbeat = \"1s\"\n",
    );
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let name = unique("victim");
    let d = conn
        .define_domain_xml(&test_domain_xml(&name, &new_uuid()))
        .unwrap();
    d.create().unwrap();
    d.suspend().unwrap();
    d.resume().unwrap();
    d.destroy().unwrap();
    let msgs = wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(60),
        "the script",
        |m| {
            m.iter()
                .any(|s| s.event.domain.name == name && s.event.event.as_str() == "STOPPED")
        },
    );
    let o = tool(&agent, &["audit", "--bus", "nats", "--format", "json"]);
    assert!(
        o.status.success(),
        "continuous before the deletion: {}",
        stdout(&o)
    );

    // Delete the SUSPENDED event (seq 3 of the domain).
    let victim = msgs
        .iter()
        .find(|s| s.event.domain.name == name && s.event.event.as_str() == "SUSPENDED")
        .expect("the SUSPENDED event");
    assert_eq!(victim.event.seq, 3);
    let deleted = victim.stream_seq;
    rt().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let stream = js.get_stream("VIRT_EVENTS").await.unwrap();
        assert!(stream.delete_message(deleted).await.unwrap());
    });

    let o = tool(&agent, &["audit", "--bus", "nats", "--format", "json"]);
    assert_eq!(o.status.code(), Some(1), "audit fails: {}", stdout(&o));
    let report: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["continuous"], false);
    let problems = report["problems"].as_array().unwrap();
    let hole = problems
        .iter()
        .find(|p| p["kind"] == "stream_hole")
        .unwrap_or_else(|| panic!("a stream hole: {problems:?}"));
    assert!(
        hole["message"]
            .as_str()
            .unwrap()
            .contains(&format!("position {deleted} is missing")),
        "{hole}"
    );
    assert_eq!(
        hole["at"],
        format!("VIRT_EVENTS stream seq {}", deleted + 1)
    );
    let gap = problems
        .iter()
        .find(|p| p["kind"] == "gap")
        .unwrap_or_else(|| panic!("a domain seq gap: {problems:?}"));
    assert_eq!(gap["uuid"], victim.event.domain.uuid.as_str());
    assert_eq!(gap["host_id"], agent.host_id.as_str());
    assert!(
        gap["message"]
            .as_str()
            .unwrap()
            .contains("seq 3 is missing"),
        "{gap}"
    );
    assert_eq!(problems.len(), 2, "nothing else is wrong: {problems:?}");
    // The text report names it too.
    let o = tool(&agent, &["audit", "--bus", "nats"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains(&format!("VIRT_EVENTS: position {deleted} is missing")));

    // The rebuild knows the host may have lost something.
    let state = state_of(&agent, "nats");
    let v = &state[&name];
    assert_eq!(v["state"], "SHUTOFF", "the newest event still applies");
    assert_eq!(v["stale"], true, "{v}");
    // Auditing from after the hole is continuous again.
    let from = (deleted + 1).to_string();
    let o = tool(
        &agent,
        &["audit", "--bus", "nats", "--from-stream-seq", &from],
    );
    assert!(o.status.success(), "{}", stdout(&o));
}

/// The agent (heartbeat 1 s) is killed with SIGKILL and not restarted;
/// its domain keeps running in libvirt. After more than the allowance
/// (3 heartbeats), `state` shows the domain stale, naming the silent host,
/// and `usage` bills nothing of the silent time as running.
fn a_silent_host_is_stale_and_unbilled(bus: &str) {
    ensure_libvirtd();
    let nats = (bus == "nats").then(NatsServer::start);
    let kafka = (bus == "kafka").then(KafkaBroker::start);
    let mut extra = String::new();
    if let Some(k) = &kafka {
        extra.push_str(&kafka_section(&k.bootstrap()));
    }
    extra.push_str("[snapshot]\nheartbeat = \"1s\"\n");
    let mut agent = Agent::ready(TEST_URI, nats.as_ref().map(|n| n.url()).as_deref(), &extra);
    // Held open for the whole test: the test driver keeps the domain only
    // while a connection is open, and virsh reads it through it.
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let name = unique("silent");
    let d = conn
        .define_domain_xml(&test_domain_xml(&name, &new_uuid()))
        .unwrap();
    let t0 = now_s();
    let (_, started, _) = timed(|| d.create().unwrap());
    // Live: the domain is RUNNING and not stale once a round follows.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = state_of(&agent, bus);
        if s.get(&name)
            .is_some_and(|v| v["state"] == "RUNNING" && v["stale"] == false)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{bus}: never live and RUNNING: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (_, _, killed) = timed(|| agent.kill9());
    std::thread::sleep(Duration::from_secs(8));
    let t_end = now_s();
    assert_eq!(
        virsh_state(&name).map(|s| s.0),
        Some("RUNNING".into()),
        "libvirt still runs it"
    );

    let s = state_of(&agent, bus);
    let v = &s[&name];
    assert_eq!(v["state"], "RUNNING", "{bus}: the last known state: {v}");
    assert_eq!(v["stale"], true, "{bus}: a silent host's domain: {v}");
    let why = v["stale_reason"].as_str().unwrap();
    assert!(
        why.contains(&format!("host {} is silent since", agent.host_id)),
        "{bus}: {why}"
    );
    // A larger allowance: not silent yet.
    let o = tool(
        &agent,
        &["state", "--bus", bus, "--silent-after-heartbeats", "1000"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let all: Vec<Value> = serde_json::from_str(&stdout(&o)).unwrap();
    let v = all.iter().find(|d| d["name"] == name.as_str()).unwrap();
    assert_eq!(v["stale"], false, "{bus}: {v}");
    // audit agrees.
    let o = tool(&agent, &["audit", "--bus", bus, "--format", "json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("missing_heartbeat"), "{}", stdout(&o));

    // Usage over [t0, t_end): running until at most the kill plus the
    // allowance (3 s) and a tolerance; the rest is unknown.
    let (from, to) = (rfc3339(t0), rfc3339(t_end));
    let o = tool(
        &agent,
        &["usage", "--bus", bus, "--from", &from, "--to", &to],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<Value> = serde_json::from_str(&stdout(&o)).unwrap();
    let r = rows
        .iter()
        .find(|r| r["name"] == name.as_str())
        .unwrap_or_else(|| panic!("{bus}: no row: {rows:?}"));
    let running = r["running_seconds"].as_f64().unwrap();
    let unknown = r["unknown_seconds"].as_f64().unwrap();
    let billable = killed + 3.0 - started;
    assert!(
        running <= billable + 1.0 && running >= billable - 2.5,
        "{bus}: running {running} s, expected about {billable:.2} s (until the kill + 3 s): {r}"
    );
    let silent = t_end - (killed + 3.0);
    assert!(
        unknown >= silent - 1.0 && unknown <= silent + 2.5,
        "{bus}: unknown {unknown} s, expected about {silent:.2} s: {r}"
    );
    assert_eq!(r["stale"], true, "{r}");
    drop(conn);
}

#[test]
fn a_silent_host_is_stale_and_unbilled_on_nats() {
    a_silent_host_is_stale_and_unbilled("nats");
}

#[test]
fn a_silent_host_is_stale_and_unbilled_on_kafka() {
    a_silent_host_is_stale_and_unbilled("kafka");
}

/// Each line through the CloudEvents Python SDK (`cloudevents.http.from_json`,
/// which checks the required attributes), back as JSON with its attributes
/// and data.
fn cloudevents_sdk_parse(lines: &str) -> Vec<Value> {
    let script = r#"
import json, sys
from cloudevents.http import from_json
for line in sys.stdin:
    e = from_json(line)
    out = dict(e.get_attributes())
    out["data"] = e.data
    print(json.dumps(out, default=str))
"#;
    let out = run_python(
        "the CloudEvents SDK on the usage events",
        script,
        &[],
        lines.as_bytes(),
    );
    String::from_utf8_lossy(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
