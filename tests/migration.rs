//! Live migration between two real libvirt hosts on one machine: two
//! private libvirtd (+ virtlogd) in their own mount namespaces, each with
//! its own host UUID (`deploy/libvirt-host.sh`), QEMU under TCG, a 32 MiB
//! guest with no disk, migrated over loopback (`--migrateuri
//! tcp://127.0.0.1`). One agent per host, both publishing to the same
//! nats-server and the same Kafka-protocol broker. What each host's agent
//! published is read back by tests/oracle/read_events.py (fastavro, not our
//! decoder) and compared with that host's `virsh event --loop`; the fleet
//! view and the bill come from `virtstream state` and `usage`.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::libvirt_host::LibvirtHost;
use common::*;

/// Two hosts, one broker of each kind, an agent and an oracle per host.
struct Pair {
    // Dropped in order: agents, oracles, brokers, then the hosts.
    agents: [Agent; 2],
    oracles: [Oracle; 2],
    nats: NatsServer,
    kafka: KafkaBroker,
    hosts: [LibvirtHost; 2],
}

const A: usize = 0;
const B: usize = 1;

impl Pair {
    fn start() -> Pair {
        let hosts = [LibvirtHost::start(), LibvirtHost::start()];
        let nats = NatsServer::start();
        let kafka = KafkaBroker::start();
        let oracles = [
            Oracle::start(&hosts[A].qemu_uri()),
            Oracle::start(&hosts[B].qemu_uri()),
        ];
        let extra = format!(
            "{}[snapshot]\ninterval = \"3s\"\nheartbeat = \"1s\"\n",
            kafka_section(&kafka.bootstrap())
        );
        let agents = [
            Agent::ready(&hosts[A].qemu_uri(), Some(&nats.url()), &extra),
            Agent::ready(&hosts[B].qemu_uri(), Some(&nats.url()), &extra),
        ];
        Pair {
            agents,
            oracles,
            nats,
            kafka,
            hosts,
        }
    }

    fn uri(&self, h: usize) -> String {
        self.hosts[h].qemu_uri()
    }

    fn virsh(&self, h: usize, args: &[&str]) -> Output {
        Command::new("virsh")
            .arg("-c")
            .arg(self.uri(h))
            .args(args)
            .output()
            .unwrap()
    }

    fn virsh_ok(&self, h: usize, args: &[&str]) {
        let out = self.virsh(h, args);
        assert!(
            out.status.success(),
            "virsh {args:?} on host {h}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `virsh migrate` from A to B (managed, over loopback), started.
    fn migrate(&self, name: &str, extra: &[&str]) -> Child {
        Command::new("virsh")
            .arg("-c")
            .arg(self.uri(A))
            .args(["migrate", name])
            .arg(self.uri(B))
            .args(["--migrateuri", &LibvirtHost::migrate_uri()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits until host `h`'s oracle printed `want` (event/detail pairs)
    /// for `name`, in order, as its last events.
    fn wait_oracle(&self, h: usize, name: &str, want: &[&str]) {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let got = pairs(&self.oracles[h].for_domain(name));
            if got.ends_with(&want.iter().map(|s| s.to_string()).collect::<Vec<_>>()) {
                return;
            }
            assert!(
                Instant::now() < end,
                "host {h}: virsh event for {name} printed {got:?}, waiting for {want:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Each host's LIBVIRT-origin events of `name` on both buses, as the
    /// independent reader decodes them, equal that host's oracle.
    fn assert_buses_match_oracles(&self, name: &str) {
        for (bus, address) in [("nats", self.nats.url()), ("kafka", self.kafka.bootstrap())] {
            let end = Instant::now() + Duration::from_secs(60);
            loop {
                let rows = read_events(bus, &address, &[]);
                let on = |h: usize| -> Vec<String> {
                    rows.iter()
                        .filter(|r| {
                            r["host_id"] == self.agents[h].host_id.as_str()
                                && r["name"] == name
                                && r["origin"] == "LIBVIRT"
                        })
                        .map(|r| {
                            format!(
                                "{}/{}",
                                r["event"].as_str().unwrap(),
                                r["detail"].as_str().unwrap()
                            )
                        })
                        .collect()
                };
                let want = |h: usize| pairs(&self.oracles[h].for_domain(name));
                if on(A) == want(A) && on(B) == want(B) {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "{bus}: host A published {:?}, virsh event printed {:?}; host B published {:?}, virsh event printed {:?}",
                    on(A),
                    want(A),
                    on(B),
                    want(B)
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    /// `virtstream <args> --bus <bus>`, parsed JSON; exit code 0.
    fn tool(&self, bus: &str, args: &[&str]) -> serde_json::Value {
        let out = Command::new(Agent::bin())
            .args(args)
            .args(["--bus", bus, "--config"])
            .arg(&self.agents[A].config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "virtstream {args:?} --bus {bus}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The state views of `uuid` (host index, state, migration), waiting
    /// up to 30 s for `done` to hold.
    fn state_of(
        &self,
        bus: &str,
        uuid: &str,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let all = self.tool(bus, &["state", "--format", "json"]);
            let views: Vec<serde_json::Value> = all
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["uuid"] == uuid)
                .cloned()
                .collect();
            if done(&views) {
                return views;
            }
            assert!(Instant::now() < end, "{bus}: state of {uuid}: {views:#?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn host_of(&self, v: &serde_json::Value) -> usize {
        if v["host_id"] == self.agents[A].host_id.as_str() {
            A
        } else {
            B
        }
    }

    /// Running, vCPU and GiB seconds of `uuid` over `[from, to)`, summed
    /// over the hosts, and the number of rows (hosts) billed.
    fn billed(&self, bus: &str, uuid: &str, from: &str, to: &str) -> (f64, f64, f64, usize) {
        let rows = self.tool(
            bus,
            &["usage", "--from", from, "--to", to, "--format", "json"],
        );
        let mine: Vec<&serde_json::Value> = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["uuid"] == uuid)
            .collect();
        assert!(
            mine.iter().all(|r| r["stale"] == false),
            "{bus}: nothing unknown: {mine:#?}"
        );
        let sum = |k: &str| mine.iter().map(|r| r[k].as_f64().unwrap()).sum::<f64>();
        (
            sum("running_seconds"),
            sum("vcpu_seconds"),
            sum("memory_gib_seconds"),
            mine.iter()
                .filter(|r| r["running_seconds"].as_f64().unwrap() > 0.0)
                .count(),
        )
    }
}

/// Creates on A a guest with 16 MiB of random bytes in its memory: at
/// 1 MiB/s its migration takes ~16 s, a wide window to act in.
fn create_slow_guest(p: &Pair, name: &str, uuid: &str) {
    let fill = p.hosts[A].dir.path().join("fill.bin");
    let mut bytes = vec![0u8; 16 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&fill, &bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        p.hosts[A].dir.path(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&fill, std::fs::Permissions::from_mode(0o644)).unwrap();
    let xml = qemu_domain_xml(name, uuid)
        .replacen(
            "<domain type='qemu'>",
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
            1,
        )
        .replace(
            "</devices></domain>",
            &format!(
                "</devices><qemu:commandline><qemu:arg value='-device'/>\
                 <qemu:arg value='loader,file={},addr=0x1000000'/></qemu:commandline></domain>",
                fill.display()
            ),
        );
    let file = p.hosts[A].dir.path().join("guest.xml");
    std::fs::write(&file, xml).unwrap();
    p.virsh_ok(A, &["create", file.to_str().unwrap()]);
}

fn pairs(events: &[OracleEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{}/{}", e.event, e.detail))
        .collect()
}

/// Running, vCPU·s and GiB·s over the window equal the wall time (× 1
/// vCPU, × 32 MiB) within 1 s: billed once across the two hosts.
fn assert_billed_once(p: &Pair, uuid: &str, from: &str, to: &str, wall: f64) {
    for bus in ["nats", "kafka"] {
        let (running, vcpu, gib, hosts) = p.billed(bus, uuid, from, to);
        eprintln!(
            "{bus}: window {wall:.3} s: running {running:.3} s on {hosts} host(s), {vcpu:.3} vCPU·s, {gib:.4} GiB·s"
        );
        assert!(
            (running - wall).abs() < 1.0,
            "{bus}: running {running:.3} s over a {wall:.3} s window"
        );
        assert!((vcpu - running).abs() < 1e-6, "{bus}: 1 vCPU: {vcpu}");
        assert!(
            (gib - running * 32.0 / 1024.0).abs() < 1e-6,
            "{bus}: 32 MiB: {gib}"
        );
        assert!(hosts >= 1, "{bus}: billed somewhere");
    }
}

#[test]
fn live_migration_moves_the_domain_once_and_bills_it_once() {
    let p = Pair::start();
    let (name, uuid) = (unique("mig"), new_uuid());
    let xml = p.hosts[A].dir.path().join("guest.xml");
    std::fs::write(&xml, qemu_domain_xml(&name, &uuid)).unwrap();
    p.virsh_ok(A, &["create", xml.to_str().unwrap()]);
    p.wait_oracle(A, &name, &["STARTED/BOOTED"]);
    std::thread::sleep(Duration::from_secs(1));
    let (from, t0) = (rfc3339(now_s()), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let out = p.migrate(&name, &["--live"]).wait_with_output().unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "virsh migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("live migration took {took:?}");
    p.wait_oracle(A, &name, &["SUSPENDED/MIGRATED", "STOPPED/MIGRATED"]);
    p.wait_oracle(B, &name, &["STARTED/MIGRATED", "RESUMED/MIGRATED"]);
    eprintln!(
        "oracle A: {:?}\noracle B: {:?}",
        pairs(&p.oracles[A].for_domain(&name)),
        pairs(&p.oracles[B].for_domain(&name))
    );
    std::thread::sleep(Duration::from_secs(2));
    let (to, wall) = (rfc3339(now_s()), t0.elapsed().as_secs_f64());
    p.assert_buses_match_oracles(&name);
    for bus in ["nats", "kafka"] {
        let views = p.state_of(bus, &uuid, |v| v.len() == 1);
        assert_eq!(p.host_of(&views[0]), B, "{bus}: on B only: {views:#?}");
        assert_eq!(views[0]["state"], "RUNNING", "{bus}");
        assert_eq!(views[0]["stale"], false, "{bus}");
        assert!(views[0].get("migration").is_none(), "{bus}: over");
    }
    assert_billed_once(&p, &uuid, &from, &to, wall);
}

#[test]
fn an_aborted_migration_leaves_the_domain_on_the_source_billed_once() {
    let p = Pair::start();
    let (name, uuid) = (unique("abort"), new_uuid());
    create_slow_guest(&p, &name, &uuid);
    p.wait_oracle(A, &name, &["STARTED/BOOTED"]);
    std::thread::sleep(Duration::from_secs(1));
    let (from, t0) = (rfc3339(now_s()), Instant::now());
    let child = p.migrate(&name, &["--live", "--bandwidth", "1"]);
    p.wait_oracle(B, &name, &["STARTED/MIGRATED"]);
    // Abort once memory is moving (not before QEMU's migration began).
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let info = String::from_utf8_lossy(&p.virsh(A, &["domjobinfo", &name]).stdout).into_owned();
        if info.contains("Data processed") && !info.contains("Data processed:   0.000 B") {
            break;
        }
        assert!(
            Instant::now() < end,
            "the migration never moved data: {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Meanwhile the fleet view says it is migrating, on both hosts' views.
    for bus in ["nats", "kafka"] {
        let views = p.state_of(bus, &uuid, |v| {
            v.len() == 2 && v.iter().all(|x| x.get("migration").is_some())
        });
        for v in &views {
            let m = &v["migration"];
            assert_eq!(m["from"], p.agents[A].host_id.as_str(), "{bus}: {v:#?}");
            assert_eq!(m["to"], p.agents[B].host_id.as_str(), "{bus}: {v:#?}");
        }
    }
    p.virsh_ok(A, &["domjobabort", &name]);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the migration was aborted");
    p.wait_oracle(B, &name, &["STARTED/MIGRATED", "STOPPED/FAILED"]);
    std::thread::sleep(Duration::from_secs(2));
    let (to, wall) = (rfc3339(now_s()), t0.elapsed().as_secs_f64());
    eprintln!(
        "oracle A: {:?}\noracle B: {:?}",
        pairs(&p.oracles[A].for_domain(&name)),
        pairs(&p.oracles[B].for_domain(&name))
    );
    p.assert_buses_match_oracles(&name);
    for bus in ["nats", "kafka"] {
        let views = p.state_of(bus, &uuid, |v| v.len() == 1);
        assert_eq!(p.host_of(&views[0]), A, "{bus}: on A only: {views:#?}");
        assert_eq!(views[0]["state"], "RUNNING", "{bus}");
        assert!(views[0].get("migration").is_none(), "{bus}");
    }
    assert_billed_once(&p, &uuid, &from, &to, wall);
    p.virsh_ok(A, &["destroy", &name]);
}

#[test]
fn persistent_undefinesource_moves_the_definition_and_the_snapshot_record() {
    let p = Pair::start();
    let (name, uuid) = (unique("def"), new_uuid());
    let xml = p.hosts[A].dir.path().join("guest.xml");
    std::fs::write(&xml, qemu_domain_xml(&name, &uuid)).unwrap();
    p.virsh_ok(A, &["define", xml.to_str().unwrap()]);
    p.virsh_ok(A, &["start", &name]);
    p.wait_oracle(A, &name, &["STARTED/BOOTED"]);
    // A complete round on A holds the domain's snapshot record.
    std::thread::sleep(Duration::from_secs(4));
    let out = p
        .migrate(&name, &["--live", "--persistent", "--undefinesource"])
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.wait_oracle(A, &name, &["SUSPENDED/MIGRATED", "STOPPED/MIGRATED"]);
    p.wait_oracle(
        B,
        &name,
        &["STARTED/MIGRATED", "DEFINED/ADDED", "RESUMED/MIGRATED"],
    );
    eprintln!(
        "oracle A: {:?}\noracle B: {:?}",
        pairs(&p.oracles[A].for_domain(&name)),
        pairs(&p.oracles[B].for_domain(&name))
    );
    p.assert_buses_match_oracles(&name);
    // The snapshot streams end with a tombstone on A (after A's next
    // complete round) and a record on B, persistent and running.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let a = snapshot_records(&p.agents[A].host_id);
        let b = snapshot_records(&p.agents[B].host_id);
        let last = |v: &[SnapRecord]| {
            v.iter()
                .rev()
                .find(|r| r.uuid.as_deref() == Some(uuid.as_str()))
                .cloned()
        };
        let (la, lb) = (last(&a), last(&b));
        if la.as_ref().is_some_and(|r| r.tombstone)
            && lb
                .as_ref()
                .is_some_and(|r| !r.tombstone && r.domain.as_ref().is_some_and(|d| d.persistent))
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "snapshot streams: last on A {la:?}, last on B {lb:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for bus in ["nats", "kafka"] {
        let views = p.state_of(bus, &uuid, |v| v.len() == 1);
        assert_eq!(p.host_of(&views[0]), B, "{bus}: {views:#?}");
        assert_eq!(views[0]["state"], "RUNNING");
        assert_eq!(views[0]["persistent"], true);
    }
    let listed =
        String::from_utf8_lossy(&p.virsh(A, &["list", "--all", "--name"]).stdout).into_owned();
    assert!(!listed.contains(&name), "undefined on A: {listed}");
    p.virsh_ok(B, &["destroy", &name]);
}

#[test]
fn the_destination_agent_restarted_mid_migration_ends_with_the_right_state() {
    let mut p = Pair::start();
    let (name, uuid) = (unique("rst"), new_uuid());
    create_slow_guest(&p, &name, &uuid);
    p.wait_oracle(A, &name, &["STARTED/BOOTED"]);
    let child = p.migrate(&name, &["--live", "--bandwidth", "4"]);
    p.wait_oracle(B, &name, &["STARTED/MIGRATED"]);
    p.agents[B].kill9();
    std::thread::sleep(Duration::from_secs(1));
    p.agents[B].start();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "virsh migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.wait_oracle(B, &name, &["STARTED/MIGRATED", "RESUMED/MIGRATED"]);
    p.wait_oracle(A, &name, &["SUSPENDED/MIGRATED", "STOPPED/MIGRATED"]);
    eprintln!(
        "oracle A: {:?}\noracle B: {:?}",
        pairs(&p.oracles[A].for_domain(&name)),
        pairs(&p.oracles[B].for_domain(&name))
    );
    // After B's reconcile and its next complete round: on B only,
    // running, not stale, not migrating.
    for bus in ["nats", "kafka"] {
        let views = p.state_of(bus, &uuid, |v| {
            v.len() == 1 && v[0]["stale"] == false && v[0]["state"] == "RUNNING"
        });
        assert_eq!(p.host_of(&views[0]), B, "{bus}: {views:#?}");
        assert!(views[0].get("migration").is_none(), "{bus}");
    }
    p.virsh_ok(B, &["destroy", &name]);
}
