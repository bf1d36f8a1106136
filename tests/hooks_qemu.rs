//! libvirt's qemu hook forwarded by `virtstream hook` on a private
//! libvirtd (its `/etc/libvirt/hooks/qemu` installed before the daemon
//! starts) running a QEMU/TCG domain: the hook calls are journaled as HOOK
//! records interleaved with the lifecycle events in the order libvirt made
//! them (each call is queued before the hook returns), in the domain's
//! `seq`, with no state change; the hook returns fast with the agent
//! running and stopped; what it spooled while the agent was down is
//! journaled when the agent starts. The hook script also appends each call
//! to a log, the oracle of which calls libvirt made. The agent publishes to
//! NATS and Kafka: both buses carry the same records in the same order,
//! each HOOK record under its domain's subject and its domain's key.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::libvirt_host::LibvirtHost;
use common::*;
use virt::connect::Connect;
use virtstream::model::{EventType, Origin};

/// The label of a journaled record: `hook:<operation>` or the event type.
fn label(s: &Stored) -> String {
    match s.event.origin {
        Origin::HOOK => format!("hook:{}", s.event.hook.as_ref().unwrap().operation),
        _ => s.event.event.as_str().to_string(),
    }
}

fn of_domain(msgs: &[Stored], uuid: &str) -> Vec<Stored> {
    let mut v: Vec<Stored> = msgs
        .iter()
        .filter(|m| m.event.domain.uuid == uuid)
        .cloned()
        .collect();
    v.sort_by_key(|m| m.event.seq);
    v
}

/// The small hook binary (links only glibc and libgcc_s).
const HOOK_BIN: &str = env!("CARGO_BIN_EXE_virtstream-hook");

/// The domain's records as the bus holds them (stream or partition
/// order) are in `seq` order: no sorting hides a reordering.
fn assert_stored_in_seq_order(msgs: &[Stored], uuid: &str, bus: &str) {
    let seqs: Vec<u64> = msgs
        .iter()
        .filter(|m| m.event.domain.uuid == uuid)
        .map(|m| m.event.seq)
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{bus} holds the domain's records out of order: {seqs:?}"
    );
}

/// One direct hook call, `virtstream hook qemu …` or (`lean`)
/// `virtstream-hook qemu …`; its wall time.
fn call_hook(lean: bool, socket: &Path, spool: &Path, uuid: &str, op: &str) -> Duration {
    let xml = qemu_domain_xml("direct", uuid);
    let t = Instant::now();
    let mut c = if lean {
        Command::new(HOOK_BIN)
    } else {
        let mut c = Command::new(Agent::bin());
        c.arg("hook");
        c
    };
    let mut c = c
        .args(["qemu", "direct", op, "begin", "-", "--socket"])
        .arg(socket)
        .arg("--spool")
        .arg(spool)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(xml.as_bytes()).unwrap();
    let st = c.wait().unwrap();
    let took = t.elapsed();
    assert!(st.success(), "the hook always exits 0");
    took
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (p(0.50), p(0.99))
}

/// A private libvirtd with the qemu hook installed before it starts: the
/// hook script logs each call's operation (the oracle of which calls
/// libvirt made) and runs `virtstream-hook` against `socket`/`spool`.
struct HookedHost {
    host: LibvirtHost,
    socket: PathBuf,
    spool: PathBuf,
    calls_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl HookedHost {
    fn start() -> HookedHost {
        let dir = tempfile::tempdir().unwrap();
        let socket: PathBuf = dir.path().join("hooks.sock");
        let spool: PathBuf = dir.path().join("spool/hooks.spool");
        let calls_log: PathBuf = dir.path().join("calls.log");
        let host = LibvirtHost::start_with(|root| {
            let hooks = root.join("etc/hooks");
            std::fs::create_dir_all(&hooks).unwrap();
            let script = format!(
                "#!/bin/sh\necho \"$2\" >> '{}'\nexec '{}' --socket '{}' --spool '{}' -- qemu \"$@\"\n",
                calls_log.display(),
                HOOK_BIN,
                socket.display(),
                spool.display()
            );
            let path = hooks.join("qemu");
            std::fs::write(&path, script).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        });
        HookedHost {
            host,
            socket,
            spool,
            calls_log,
            _dir: dir,
        }
    }

    /// The agent's `[hooks]` section for this host.
    fn hooks_section(&self) -> String {
        format!(
            "[hooks]\nsocket = \"{}\"\nspool = \"{}\"\n",
            self.socket.display(),
            self.spool.display()
        )
    }

    /// The hook calls libvirt made, as `hook:<operation>`.
    fn called(&self) -> Vec<String> {
        std::fs::read_to_string(&self.calls_log)
            .unwrap_or_default()
            .lines()
            .map(|l| format!("hook:{l}"))
            .collect()
    }
}

#[test]
fn qemu_hook_calls_are_journaled_in_order_with_the_lifecycle_events() {
    let nats = NatsServer::start();
    let kafka = KafkaBroker::start();
    let hh = HookedHost::start();
    let hk = tempfile::tempdir().unwrap();
    let (socket, spool, calls_log) = (&hh.socket, &hh.spool, &hh.calls_log);
    let uri = hh.host.qemu_uri();
    let extra = format!(
        "{}{}",
        hh.hooks_section(),
        kafka_section(&kafka.bootstrap())
    );
    let mut agent = Agent::ready(&uri, Some(&nats.url()), &extra);

    // 1. A start/stop cycle with the agent running.
    let conn = Connect::open(Some(&uri)).unwrap();
    let name = unique("vsh");
    let uuid = new_uuid();
    let d = conn
        .define_domain_xml(&qemu_domain_xml(&name, &uuid))
        .unwrap();
    d.create().unwrap();
    d.destroy().unwrap();
    let msgs = wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(60),
        "the domain's STOPPED and hook:release",
        |m| {
            let l: Vec<String> = of_domain(m, &uuid).iter().map(label).collect();
            l.iter().any(|x| x == "STOPPED") && l.iter().any(|x| x == "hook:release")
        },
    );
    assert_contiguous(&msgs);
    let dom = of_domain(&msgs, &uuid);
    let labels: Vec<String> = dom.iter().map(label).collect();
    eprintln!("journaled: {labels:?}");
    // seq is contiguous over hook records and events alike.
    for (i, m) in dom.iter().enumerate() {
        assert_eq!(m.event.seq, i as u64 + 1, "{labels:?}");
    }
    // The hook calls are the ones libvirt made (the script's log), in
    // that order.
    let called = hh.called();
    let hooks: Vec<String> = labels
        .iter()
        .filter(|l| l.starts_with("hook:"))
        .cloned()
        .collect();
    assert_eq!(hooks, called);
    // libvirt runs prepare, start and started before it emits STARTED;
    // stopped and release after the guest stopped, before it emits
    // STOPPED (qemuProcessStop runs both, its caller emits the event).
    let pos = |l: &str| {
        labels
            .iter()
            .position(|x| x == l)
            .unwrap_or_else(|| panic!("{l} missing: {labels:?}"))
    };
    assert!(pos("DEFINED") < pos("hook:prepare"), "{labels:?}");
    assert!(pos("hook:prepare") < pos("hook:start"), "{labels:?}");
    assert!(pos("hook:start") < pos("hook:started"), "{labels:?}");
    assert!(pos("hook:started") < pos("STARTED"), "{labels:?}");
    assert!(pos("STARTED") < pos("hook:stopped"), "{labels:?}");
    assert!(pos("hook:stopped") < pos("hook:release"), "{labels:?}");
    assert!(pos("hook:release") < pos("STOPPED"), "{labels:?}");
    // A hook record changes no state: it carries the state before it.
    for w in dom.windows(2) {
        if w[1].event.origin == Origin::HOOK {
            assert_eq!(w[1].event.event, EventType::HOOK);
            assert_eq!(w[1].event.state_after, w[0].event.state_after, "{labels:?}");
            assert_eq!(w[1].event.persistent, w[0].event.persistent);
            assert_eq!(
                w[1].subject, w[0].subject,
                "same subject as the domain's events"
            );
        }
    }

    // Kafka carries the same records in the same order, every one of the
    // domain's under its key (one partition).
    let on_kafka = wait_for_kafka(
        &kafka.bootstrap(),
        &agent.host_id,
        Duration::from_secs(60),
        "the same records on Kafka",
        |m| of_domain(m, &uuid).len() >= dom.len(),
    );
    assert_stored_in_seq_order(&msgs, &uuid, "NATS");
    assert_stored_in_seq_order(&on_kafka, &uuid, "Kafka");
    let kdom = of_domain(&on_kafka, &uuid);
    let klabels: Vec<String> = kdom.iter().take(dom.len()).map(label).collect();
    assert_eq!(klabels, labels, "Kafka vs NATS");
    for (k, n) in kdom.iter().zip(&dom) {
        assert_eq!(k.event.event_id, n.event.event_id);
        assert_eq!(k.event.hook, n.event.hook);
    }
    let keys: std::collections::BTreeSet<&str> = kdom.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(keys.len(), 1, "one partition and key per domain: {keys:?}");
    assert!(keys.iter().all(|k| k.ends_with(&uuid)), "{keys:?}");

    // 2. Latency of the hook, agent running: acknowledged calls.
    let direct = new_uuid();
    let spool_direct = hk.path().join("direct.spool");
    let running: Vec<Duration> = (0..50)
        .map(|_| call_hook(false, socket, &spool_direct, &direct, "started"))
        .collect();
    let lean: Vec<Duration> = (0..50)
        .map(|_| call_hook(true, socket, &spool_direct, &direct, "started"))
        .collect();
    assert!(!spool_direct.exists(), "the agent took every call");
    let (lp50, lp99) = percentiles(lean);
    eprintln!("virtstream-hook with the agent running: p50 {lp50:?} p99 {lp99:?}");
    assert!(
        lp99 < Duration::from_secs(1),
        "a virtstream-hook call blocked: p99 {lp99:?}"
    );
    let (p50, p99) = percentiles(running);
    eprintln!("virtstream hook with the agent running: p50 {p50:?} p99 {p99:?}");
    // Figures are printed, not asserted against the 50 ms target (a
    // timed test would only measure this machine's load; the target is
    // for a benchmark). What a test can say: no call waits on the agent
    // beyond the hook's own acknowledgement timeout plus process start.
    assert!(
        p99 < Duration::from_secs(1),
        "a hook call blocked: p99 {p99:?}"
    );

    // 3. Agent stopped: the hook spools, as fast; a domain cycle too.
    assert_eq!(agent.terminate(), Some(0));
    let stopped: Vec<Duration> = (0..50)
        .map(|i| call_hook(i % 2 == 0, socket, spool, &direct, "release"))
        .collect();
    let (p50, p99) = percentiles(stopped);
    eprintln!("hook with the agent stopped: p50 {p50:?} p99 {p99:?}");
    assert!(
        p99 < Duration::from_secs(1),
        "a hook call blocked: p99 {p99:?}"
    );
    let before = called.len();
    d.create().unwrap();
    d.destroy().unwrap();
    let spooled = std::fs::read_to_string(spool).unwrap();
    assert_eq!(spooled.lines().count(), 50 + 5, "{spooled}");
    let called_now = std::fs::read_to_string(calls_log).unwrap().lines().count();
    assert_eq!(called_now - before, 5);

    // 4. The agent journals the spool when it starts.
    agent.start();
    agent.wait_ready(Duration::from_secs(30));
    let msgs = wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(60),
        "the spooled hook calls",
        |m| {
            of_domain(m, &direct).len() == 150
                && of_domain(m, &uuid)
                    .iter()
                    .filter(|s| s.event.origin == Origin::HOOK)
                    .count()
                    == 10
        },
    );
    assert_contiguous(&msgs);
    let dm = of_domain(&msgs, &direct);
    assert!(dm
        .iter()
        .enumerate()
        .all(|(i, m)| m.event.seq == i as u64 + 1));
    assert!(dm[100..]
        .iter()
        .all(|m| m.event.hook.as_ref().unwrap().operation == "release"));
    assert!(!spool.exists(), "a drained spool is removed");
    let on_kafka = wait_for_kafka(
        &kafka.bootstrap(),
        &agent.host_id,
        Duration::from_secs(60),
        "the spooled hook calls on Kafka",
        |m| of_domain(m, &direct).len() == 150,
    );
    let kdm = of_domain(&on_kafka, &direct);
    let ids = |v: &[Stored]| {
        v.iter()
            .map(|m| m.event.event_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&kdm), ids(&dm), "Kafka vs NATS, spooled calls");
    d.undefine().unwrap();
    assert_eq!(agent.terminate(), Some(0));
}

/// libvirtd waits for every hook call: the hook binary loads no library
/// the hook does not use (libvirt alone pulls in about 50).
#[test]
fn the_hook_binary_links_only_libc() {
    let out = Command::new("readelf")
        .args(["-d", HOOK_BIN])
        .output()
        .expect("readelf (binutils) runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next())
        .collect();
    assert!(!needed.is_empty(), "{text}");
    for lib in &needed {
        assert!(
            ["libc.so", "libgcc_s.so", "ld-linux", "libm.so"]
                .iter()
                .any(|ok| lib.starts_with(ok)),
            "virtstream-hook needs {lib}: {needed:?}"
        );
    }
    // The agent's binary does link libvirt (the check can tell them apart).
    let agent = Command::new("readelf")
        .args(["-d", Agent::bin()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&agent.stdout).contains("libvirt.so"));
}

/// A live migration between two hooked hosts: the destination's hook
/// calls (`migrate` with the incoming XML, then `prepare`, `start`,
/// `started`) and the source's (`stopped`, `release`) are journaled by
/// each host's agent, in the order each host's libvirt made them and
/// interleaved with that host's lifecycle events; the destination's
/// `migrate` comes before its first event of the domain, the source's
/// `release` before its `STOPPED/MIGRATED`.
#[test]
fn a_migration_shows_the_hook_phases_on_both_hosts() {
    let nats = NatsServer::start();
    let hosts = [HookedHost::start(), HookedHost::start()];
    let agents: Vec<Agent> = hosts
        .iter()
        .map(|h| Agent::ready(&h.host.qemu_uri(), Some(&nats.url()), &h.hooks_section()))
        .collect();
    let (name, uuid) = (unique("hmig"), new_uuid());
    let xml = hosts[0].host.dir.path().join("guest.xml");
    std::fs::write(&xml, qemu_domain_xml(&name, &uuid)).unwrap();
    let virsh = |h: usize, args: &[&str]| {
        let out = Command::new("virsh")
            .arg("-c")
            .arg(hosts[h].host.qemu_uri())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "virsh {args:?} on host {h}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    virsh(0, &["create", xml.to_str().unwrap()]);
    let before_a = hosts[0].called().len();
    virsh(
        0,
        &[
            "migrate",
            "--live",
            &name,
            &hosts[1].host.qemu_uri(),
            "--migrateuri",
            &LibvirtHost::migrate_uri(),
        ],
    );
    // Each host's records of the domain, once its last hook call is there.
    let on = |h: usize, last: &str| -> Vec<String> {
        let msgs = wait_for(
            &nats.url(),
            &agents[h].filter(),
            Duration::from_secs(60),
            &format!("host {h}'s {last}"),
            |m| {
                let l: Vec<String> = of_domain(m, &uuid).iter().map(label).collect();
                l.iter().any(|x| x == last) && l.iter().any(|x| x == "STOPPED" || x == "RESUMED")
            },
        );
        assert_contiguous(&msgs);
        of_domain(&msgs, &uuid).iter().map(label).collect()
    };
    let b = on(1, "hook:started");
    let a = on(0, "hook:release");
    eprintln!("source A journaled: {a:?}\ndestination B journaled: {b:?}");
    // Each agent journaled exactly the calls its host's libvirt made.
    let hooks_of = |l: &[String]| -> Vec<String> {
        l.iter()
            .filter(|x| x.starts_with("hook:"))
            .cloned()
            .collect()
    };
    assert_eq!(hooks_of(&b), hosts[1].called(), "destination");
    assert_eq!(hooks_of(&a), hosts[0].called(), "source");
    assert_eq!(
        hosts[0].called()[before_a..].to_vec(),
        vec!["hook:stopped", "hook:release"],
        "the source's calls for the migration"
    );
    assert_eq!(
        hooks_of(&b),
        vec!["hook:migrate", "hook:prepare", "hook:start", "hook:started"],
        "the destination's calls"
    );
    // The destination's first word on the domain is the migrate hook,
    // before libvirt's STARTED/MIGRATED; the source's release comes
    // before its STOPPED.
    assert_eq!(b[0], "hook:migrate", "{b:?}");
    let pos = |l: &[String], x: &str| l.iter().position(|y| y == x).unwrap();
    assert!(pos(&b, "hook:started") < pos(&b, "STARTED"), "{b:?}");
    assert!(pos(&b, "STARTED") < pos(&b, "RESUMED"), "{b:?}");
    assert!(pos(&a, "hook:release") < pos(&a, "STOPPED"), "{a:?}");
    virsh(1, &["destroy", &name]);
}
