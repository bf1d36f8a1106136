//! Chaos soak: randomized lifecycle load on a private libvirtd, one fault
//! per run, on each bus; after quiescence the bus is checked against
//! libvirt with an independent reader (see tests/soak/check.rs).
//!
//! Not part of the plain `cargo test` run (`test = false` in Cargo.toml);
//! CI runs it as its own step:
//!
//!   cargo test --locked --test soak -- --nocapture
//!
//! SOAK_SEED=N replays a seed, SOAK_CELLS=fault:bus,... selects cells
//! (faults: kill9-late kill9-backlog broker-stop libvirtd-restart
//! queue-overflow journal-full; buses: nats kafka; `fault` alone = both
//! buses). Every cell prints one line
//! `soak: fault=… bus=… seed=… domains=… wrong_last_words=… …`.

#[path = "soak/check.rs"]
mod check;
mod common;
#[path = "soak/load.rs"]
mod load;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::libvirt_host::LibvirtHost;
use common::{Agent, KafkaBroker, NatsServer, Oracle};
use load::{Load, Plan, Rng};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill9Late,
    Kill9Backlog,
    BrokerStop,
    LibvirtdRestart,
    QueueOverflow,
    JournalFull,
}

const FAULTS: [Fault; 6] = [
    Fault::Kill9Late,
    Fault::Kill9Backlog,
    Fault::BrokerStop,
    Fault::LibvirtdRestart,
    Fault::QueueOverflow,
    Fault::JournalFull,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill9Late => "kill9-late",
            Fault::Kill9Backlog => "kill9-backlog",
            Fault::BrokerStop => "broker-stop",
            Fault::LibvirtdRestart => "libvirtd-restart",
            Fault::QueueOverflow => "queue-overflow",
            Fault::JournalFull => "journal-full",
        }
    }
}

/// The load: persistent domains, transient slots, parallel sessions,
/// seconds of load.
const PERSISTENT: usize = 40;
const TRANSIENT: usize = 12;
const SESSIONS: usize = 4;
const LOAD_SECS: u64 = 12;
const BACKGROUND: usize = 1500;
const QUIET_TIMEOUT: Duration = Duration::from_secs(90);

/// The broker of one cell.
enum Broker {
    Nats(NatsServer),
    Kafka(KafkaBroker),
}

impl Broker {
    fn start(bus: &str) -> Broker {
        match bus {
            "nats" => Broker::Nats(NatsServer::start()),
            _ => Broker::Kafka(KafkaBroker::start()),
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Broker::Nats(n) => n.pid(),
            Broker::Kafka(k) => k.pid(),
        }
    }

    /// SIGSTOP: connections stay open, nothing answers.
    fn pause(&self) {
        common::unsafe_kill(self.pid(), libc::SIGSTOP);
    }

    fn unpause(&self) {
        common::unsafe_kill(self.pid(), libc::SIGCONT);
    }

    /// (nats url for the agent fixture, extra config, reader address)
    fn agent_config(&self) -> (Option<String>, String, String) {
        match self {
            // A 1 s duplicate window: restarts come later than it.
            Broker::Nats(n) => (Some(n.url()), "duplicate_window = \"1s\"\n".into(), n.url()),
            Broker::Kafka(k) => (None, common::kafka_section(&k.bootstrap()), k.bootstrap()),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.unpause();
    }
}

struct Cell {
    fault: Fault,
    bus: &'static str,
    seed: u64,
}

/// The metrics the quiescence wait looks at.
fn metric_sum(body: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in body.lines().filter(|l| !l.starts_with('#')) {
        let (k, v) = l.rsplit_once(' ')?;
        if k == name || k.starts_with(&format!("{name}{{")) {
            *found.get_or_insert(0.0) += v.parse::<f64>().ok()?;
        }
    }
    found
}

/// Waits until the agent is connected to libvirt, every sink's backlog
/// and the journal's are 0, and neither the journal nor `virsh event`
/// has seen anything new for 2 s.
fn quiesce(agent: &mut Agent, oracle: &Oracle) {
    let end = Instant::now() + QUIET_TIMEOUT;
    let mut last: Option<(String, usize)> = None;
    let mut since = Instant::now();
    loop {
        if let Some(code) = agent.try_exit() {
            panic!(
                "the agent exited (code {code:?}) before quiescence; its log (kept): {}",
                agent.log_path().display()
            );
        }
        let body = agent.http("/metrics").map(|(_, b)| b).unwrap_or_default();
        let connected = metric_sum(&body, "virtstream_libvirt_connected") == Some(1.0);
        let backlog = metric_sum(&body, "virtstream_sink_backlog");
        let journal = metric_sum(&body, "virtstream_journal_backlog_entries");
        let commits = metric_sum(&body, "virtstream_journal_commits");
        let events = oracle.events.lock().unwrap().len();
        let drained = connected && backlog == Some(0.0) && journal == Some(0.0);
        let now = (format!("{commits:?}"), events);
        if !drained || last.as_ref() != Some(&now) {
            since = Instant::now();
            last = Some(now);
        } else if since.elapsed() >= Duration::from_secs(2) {
            return;
        }
        assert!(
            Instant::now() < end,
            "no quiescence within {QUIET_TIMEOUT:?}: libvirt_connected={connected} \
             sink_backlog={backlog:?} journal_backlog_entries={journal:?} \
             journal_commits={commits:?} oracle events={events}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Summary {
    line: String,
    ok: bool,
    details: String,
}

fn run_cell(cell: &Cell) -> Summary {
    let Cell { fault, bus, seed } = *cell;
    let mut rng = Rng::new(seed);
    let mut host = LibvirtHost::start();
    let uri = host.test_uri();
    let work = tempfile::tempdir().unwrap();
    let prefix = format!("soak{:x}", seed & 0xffff_ffff);
    if fault == Fault::QueueOverflow {
        load::background(&uri, work.path(), &prefix, BACKGROUND);
    }
    let broker = Broker::start(bus);
    let (nats_url, extra, address) = broker.agent_config();
    let mut agent = Agent::new(&uri, nats_url.as_deref(), &extra);
    // Removed at the end of a cell that passed; kept when it failed.
    agent.dir.disable_cleanup(true);
    let mut cfg = std::fs::read_to_string(&agent.config).unwrap();
    match fault {
        Fault::QueueOverflow => {
            cfg = cfg.replace("[libvirt]\n", "[libvirt]\nqueue_capacity = 8\n");
        }
        Fault::JournalFull => {
            cfg = cfg.replace("[journal]\n", "[journal]\nmax_bytes = 16384\n");
        }
        _ => {}
    }
    std::fs::write(&agent.config, cfg).unwrap();
    // `virsh event --loop`: quiescence, and libvirt's own history of a
    // domain the checks find wrong. A libvirtd restart needs a new one.
    let mut oracles = vec![Oracle::start(&uri)];
    agent.start();
    agent.wait_ready(Duration::from_secs(60));

    let plan = Plan::new(work.path(), &prefix, PERSISTENT, TRANSIENT);
    load::define_all(&uri, &plan, &mut rng, &work.path().join("virsh-define.log"));
    let load = Load::start(&uri, &plan, rng.next(), SESSIONS, work.path());
    let started = Instant::now();
    // The fault strikes 3-6 s into the load.
    std::thread::sleep(Duration::from_millis(3000 + rng.below(3000)));
    eprintln!(
        "soak: {} at {:.1} s into the load",
        fault.name(),
        started.elapsed().as_secs_f64()
    );
    // The sink backlog at the end of a broker pause (proof it held).
    let mut paused_backlog = None;
    let backlog = |agent: &Agent| {
        agent
            .http("/metrics")
            .and_then(|(_, b)| metric_sum(&b, "virtstream_sink_backlog"))
    };
    match fault {
        Fault::Kill9Late => {
            agent.kill9();
            std::thread::sleep(Duration::from_secs(3));
            agent.start();
        }
        Fault::Kill9Backlog => {
            broker.pause();
            std::thread::sleep(Duration::from_secs(3));
            paused_backlog = backlog(&agent);
            broker.unpause();
            std::thread::sleep(Duration::from_millis(50));
            agent.kill9();
            std::thread::sleep(Duration::from_secs(3));
            agent.start();
        }
        Fault::BrokerStop => {
            broker.pause();
            std::thread::sleep(Duration::from_secs(8));
            paused_backlog = backlog(&agent);
            broker.unpause();
        }
        Fault::LibvirtdRestart => {
            host.restart(Duration::from_secs(1));
            // virsh event exits with the connection: a new oracle.
            oracles.push(Oracle::start(&uri));
            // The test driver forgets its domains with the daemon (QEMU's
            // persistent domains would come back): define them again.
            load::define_all(
                &uri,
                &plan,
                &mut rng,
                &work.path().join("virsh-redefine.log"),
            );
        }
        Fault::QueueOverflow => {}
        Fault::JournalFull => {
            broker.pause();
            std::thread::sleep(Duration::from_secs(5));
            paused_backlog = backlog(&agent);
            broker.unpause();
        }
    }
    let rest = Duration::from_secs(LOAD_SECS).saturating_sub(started.elapsed());
    std::thread::sleep(rest.max(Duration::from_secs(2)));
    let commands = load.stop();
    quiesce(&mut agent, oracles.last().unwrap());

    let truth = check::libvirt_truth(&uri);
    let msgs = check::read_bus(bus, &address);
    let plan_uuids: BTreeSet<String> = plan.all().map(|d| d.uuid.clone()).collect();
    let mut f = check::Findings::default();
    check::check_stream(&msgs, &agent.host_id, &truth, &plan_uuids, &mut f);
    for w in &mut f.wrong_last_words {
        let history: Vec<String> = oracles
            .iter()
            .flat_map(|o| o.for_domain(&w.name))
            .map(|e| format!("{}/{}", e.event, e.detail))
            .collect();
        w.history = history[history.len().saturating_sub(4)..].join(", ");
    }
    check::check_state(&agent.config, bus, &agent.host_id, &truth, &mut f);
    check::check_audit(&agent.config, bus, &mut f);
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut g = check::Findings::default();
        check::cross_check(bus, &address, &agent.host_id, &msgs, &mut g);
        g.decoder_mismatch
    }))
    .map(|v| f.decoder_mismatch.extend(v))
    {
        f.decoder_mismatch.push(format!(
            "the agent's codec could not read the stream: {}",
            panic_text(&*e)
        ));
    }
    // A fault that left no trace makes the cell vacuous: a failure too.
    let marker = |cause: &str| f.gap_causes.contains_key(cause);
    let held = paused_backlog.is_some_and(|b| b > 0.0);
    let effect = match fault {
        Fault::Kill9Late => marker("AGENT_RESTART"),
        Fault::Kill9Backlog => held && marker("AGENT_RESTART"),
        Fault::BrokerStop => held,
        Fault::LibvirtdRestart => marker("DISCONNECTED"),
        Fault::QueueOverflow => marker("QUEUE_OVERFLOW"),
        Fault::JournalFull => held && marker("JOURNAL_FULL"),
    };
    let ok = f.ok() && effect;
    let line = format!(
        "soak: fault={} bus={bus} seed={seed} commands={commands} messages={} domains={} \
         wrong_last_words={} duplicates={} losses={} seq_breaks={} gap_markers={} \
         gap_causes={} state_wrong={} audit_wrong={} decoder_mismatch={} fault_seen={effect} result={}",
        fault.name(),
        f.messages,
        f.domains,
        f.wrong_last_words.len(),
        f.duplicates.len(),
        f.losses,
        f.seq_breaks.len(),
        f.gap_markers.len(),
        f.causes(),
        f.state_wrong.len(),
        f.audit_wrong.len(),
        f.decoder_mismatch.len(),
        if ok { "ok" } else { "FAIL" }
    );
    let mut details = f.details();
    if !effect {
        details.push_str(&format!(
            "  the fault left no trace (gap markers: {}, sink backlog during the broker pause: \
             {paused_backlog:?})\n",
            f.causes()
        ));
    }
    if !ok {
        details.push_str(&format!(
            "  agent logs, journal and config: {} (kept)\n",
            agent.dir.path().display()
        ));
    }
    let _ = agent.terminate();
    // Kept when the cell failed or panicked, to look at.
    agent.dir.disable_cleanup(!ok);
    Summary { line, ok, details }
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn selected() -> Vec<(Fault, &'static str)> {
    let all: Vec<(Fault, &'static str)> = FAULTS
        .iter()
        .flat_map(|f| [(*f, "nats"), (*f, "kafka")])
        .collect();
    let Ok(filter) = std::env::var("SOAK_CELLS") else {
        return all;
    };
    let wanted: Vec<(String, Option<String>)> = filter
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.split_once(':') {
            Some((f, b)) => (f.to_string(), Some(b.to_string())),
            None => (s.to_string(), None),
        })
        .collect();
    for (f, b) in &wanted {
        assert!(
            FAULTS.iter().any(|x| x.name() == f),
            "SOAK_CELLS: unknown fault {f} (known: {})",
            FAULTS.map(|x| x.name()).join(" ")
        );
        assert!(
            b.as_deref().is_none_or(|b| b == "nats" || b == "kafka"),
            "SOAK_CELLS: unknown bus {b:?} (nats, kafka)"
        );
    }
    all.into_iter()
        .filter(|(f, b)| {
            wanted
                .iter()
                .any(|(wf, wb)| wf == f.name() && wb.as_deref().is_none_or(|wb| wb == *b))
        })
        .collect()
}

#[test]
fn soak() {
    common::is_root()
        .then_some(())
        .expect("the soak runs a private libvirtd: run it as root");
    let fixed: Option<u64> = std::env::var("SOAK_SEED").ok().map(|s| {
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("SOAK_SEED={s} is not a number"))
    });
    let base = fixed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let cells = selected();
    assert!(!cells.is_empty(), "SOAK_CELLS selects no cell");
    let mut failed = Vec::new();
    let mut lines = Vec::new();
    for (i, (fault, bus)) in cells.into_iter().enumerate() {
        let seed = match fixed {
            Some(s) => s,
            None => Rng::new(base.wrapping_add(i as u64)).next() % 1_000_000_000,
        };
        let replay = format!(
            "SOAK_SEED={seed} SOAK_CELLS={}:{bus} cargo test --locked --test soak -- --nocapture",
            fault.name()
        );
        eprintln!(
            "soak: cell fault={} bus={bus} seed={seed} (replay: {replay})",
            fault.name()
        );
        let cell = Cell { fault, bus, seed };
        let t0 = Instant::now();
        let s = match std::panic::catch_unwind(|| run_cell(&cell)) {
            Ok(s) => s,
            Err(e) => {
                let why = panic_text(&*e);
                Summary {
                    line: format!(
                        "soak: fault={} bus={bus} seed={seed} result=ERROR",
                        fault.name()
                    ),
                    ok: false,
                    details: format!("  error: {why}\n"),
                }
            }
        };
        println!("{} secs={}", s.line, t0.elapsed().as_secs());
        print!("{}", s.details);
        lines.push(s.line.clone());
        if !s.ok {
            // The details were printed above, with the cell.
            failed.push(format!(
                "{}\n  replay: {replay}",
                s.line.replacen("soak: ", "failed: ", 1)
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} soak cell(s) failed (details above):\n{}",
        failed.len(),
        failed.join("\n")
    );
}
