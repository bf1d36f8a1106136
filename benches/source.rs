//! Source benchmark: the real source path under real libvirtd load,
//! end to end — libvirtd test driver → agent (release binary) → NATS
//! JetStream and/or Kafka (tansu) — beside a baseline run in the same
//! invocation: `benches/bridge/bridge.py`, the bridge a user writes in an
//! afternoon (libvirt-python lifecycle callback → json.dumps → nats-py
//! JetStream publish / confluent-kafka produce; no journal, no sequence,
//! no enrichment).
//!
//! Every cell is sessions ∈ {1, 2, 4} × events ∈ {4,000, 16,000} × sinks
//! ∈ {nats, kafka, both}, run once for the agent and once for the bridge,
//! each against a fresh private libvirtd (`tests/common/libvirt_host.rs`)
//! with 8 persistent running test-driver domains per session. The load is
//! one interactive `virsh -c URI` per session reading `suspend dN` /
//! `resume dN` lines round-robin over its domains (one lifecycle event
//! each), the events split evenly across sessions. A plain `virsh event
//! --loop --all --timestamp` started before the load is the reference:
//! it must print every load event, and its first-to-last rate is
//! libvirtd's delivery rate. The agent is started (journal in a temporary
//! directory) and its initial snapshot round is on the bus before the load
//! begins. Measured for each process:
//!
//! - CPU per event: utime + stime (/proc/PID/stat) from the start of the
//!   load until every load event is on the bus, divided by the events;
//! - drain: seconds from the end of the load (every virsh session exited)
//!   until every load event is acknowledged on the bus, polled on the bus
//!   itself (JetStream per-subject counts of the run's subjects, Kafka
//!   high watermarks of the topic) every 10 ms;
//! - peak RSS (VmHWM), and the ratios agent / bridge.
//!
//! The agent's messages are then decoded with virtstream's codec: every
//! load event must be there as a SUSPENDED/RESUMED event with origin
//! LIBVIRT; gap markers (by cause) and events the agent dropped on queue
//! overflow are reported. A load event missing on any bus 60 s after the
//! load ended (or after 10 s without progress on the bus) marks the cell
//! MISSING, keeps the agent's log, and fails the benchmark (non-zero exit,
//! naming every such run) once the table is printed; an event missing
//! from the reference fails it at once.
//!
//! Run: `cargo bench --bench source` (root: private libvirtd; needs
//! nats-server, tansu, libvirtd and the venv with libvirt-python,
//! nats-py and confluent-kafka: `bash deploy/local-env.sh start`).
//! Subsets: `BENCH_ONLY=nats|kafka|both` (or a comma-separated list),
//! `BENCH_SESSIONS=1,2,4`, `BENCH_EVENTS=4000,16000`; `BENCH_PYTHON`
//! picks another interpreter for the bridge. The machine's load average is
//! printed with every run: other work on it shows in the figures.
//!
//! Targets: the agent spends ≤ 100 µs CPU per event (and ≥ 4× less than
//! the bridge), drains ≤ 0.2 s after a 16,000-event load, and sustains
//! libvirtd's delivery rate with 4 sessions with no queue overflow.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

#[path = "source/bus.rs"]
mod bus;
#[path = "source/load.rs"]
mod load;
#[path = "source/procs.rs"]
mod procs;

use std::time::{Duration, Instant};

use bus::{Bus, Place};

const DOMAINS_PER_SESSION: usize = 8;
/// Every load event must be on the bus this long after the load ended,
/// and the bus must not stand still for `STALL` while some are missing.
const DEADLINE: Duration = Duration::from_secs(60);
const STALL: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sinks {
    Nats,
    Kafka,
    Both,
}

impl Sinks {
    fn name(self) -> &'static str {
        match self {
            Sinks::Nats => "nats",
            Sinks::Kafka => "kafka",
            Sinks::Both => "both",
        }
    }
    fn nats(self) -> bool {
        self != Sinks::Kafka
    }
    fn kafka(self) -> bool {
        self != Sinks::Nats
    }
}

#[derive(Clone, Copy, Debug)]
struct Cell {
    sessions: usize,
    events: u64,
    sinks: Sinks,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    Agent,
    Bridge,
}

/// What one run measured.
struct Measured {
    cpu_us_per_event: f64,
    drain_s: f64,
    peak_rss_mib: f64,
    /// The reference client's first-to-last rate during this run.
    libvirtd_rate: f64,
    /// Load events not on the bus at the end (which bus, how many).
    missing: Option<String>,
    /// Gap markers, dropped events, late verification (agent).
    notes: String,
}

impl Measured {
    fn drain(&self) -> String {
        match &self.missing {
            None => format!("{:.3}", self.drain_s),
            Some(m) => format!("MISSING ({m})"),
        }
    }
}

enum Running {
    Agent(common::Agent),
    Bridge(procs::Bridge),
}

impl Running {
    /// The bridge's output (the agent's log is printed by its fixture
    /// when a run panics).
    fn log(&self) -> String {
        match self {
            Running::Agent(_) => String::new(),
            Running::Bridge(b) => b.log(),
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Running::Agent(a) => a.pid().expect("agent running"),
            Running::Bridge(b) => b.pid(),
        }
    }
}

fn env_list<T: std::str::FromStr + Clone>(key: &str, default: &[T]) -> Vec<T> {
    match std::env::var(key) {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{key}: cannot parse {x:?}"))
            })
            .collect(),
        _ => default.to_vec(),
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // and must not run the full benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("source benchmark: run with `cargo bench --bench source`");
        return;
    }
    virt::error::clear_error_callback();
    let sessions: Vec<usize> = env_list("BENCH_SESSIONS", &[1, 2, 4]);
    let events: Vec<u64> = env_list("BENCH_EVENTS", &[4000, 16000]);
    let only: Vec<String> = env_list("BENCH_ONLY", &[]);
    let sinks: Vec<Sinks> = [Sinks::Nats, Sinks::Kafka, Sinks::Both]
        .into_iter()
        .filter(|s| only.is_empty() || only.iter().any(|o| o == s.name()))
        .collect();
    assert!(!sinks.is_empty(), "BENCH_ONLY: nats, kafka or both");
    println!(
        "source benchmark: agent {}, {} CPUs, load average {}",
        procs::agent_binary().display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        procs::loadavg()
    );
    let nats = common::NatsServer::start();
    let kafka = common::KafkaBroker::start();
    let bus = Bus::new(nats.url(), kafka.bootstrap());
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut run_no = 0;
    for &s in &sinks {
        for &n in &sessions {
            for &e in &events {
                let cell = Cell {
                    sessions: n,
                    events: e,
                    sinks: s,
                };
                run_no += 1;
                let agent = run(&bus, cell, Who::Agent, run_no);
                let bridge = run(&bus, cell, Who::Bridge, run_no);
                rows.push((cell, agent, bridge));
            }
        }
    }
    print_table(&rows);
    println!(
        "\n{} cells in {:.0} s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    let failed: Vec<String> = rows
        .iter()
        .flat_map(|(c, a, b)| {
            [("agent", a), ("bridge", b)]
                .into_iter()
                .filter_map(move |(who, m)| {
                    let missing = m.missing.as_ref()?;
                    Some(format!(
                        "{who} s={} n={} {}: {missing}",
                        c.sessions,
                        c.events,
                        c.sinks.name()
                    ))
                })
        })
        .collect();
    assert!(
        failed.is_empty(),
        "load events missing on the bus (deadline {DEADLINE:?} after the load, or {STALL:?} without progress):\n{}",
        failed.join("\n")
    );
}

/// One run: a fresh private libvirtd, the process under test, the load,
/// the drain, the checks.
fn run(bus: &Bus, cell: Cell, who: Who, run_no: usize) -> Measured {
    let label = match who {
        Who::Agent => "agent ",
        Who::Bridge => "bridge",
    };
    let host = common::libvirt_host::LibvirtHost::start();
    let uri = host.test_uri();
    let conn = virt::connect::Connect::open(Some(&uri)).unwrap();
    let domains = load::define(&conn, cell.sessions, DOMAINS_PER_SESSION);
    let reference = load::Reference::start(&uri);
    let mut places = Vec::new();
    // Each run has its own Kafka topic (read from its start) and NATS
    // subjects (the agent's host id is new every run).
    let proc = match who {
        Who::Agent => {
            let topic = format!("virt.domain.events.v1.r{run_no}");
            let a = procs::agent(
                &uri,
                cell.sinks.nats().then_some(bus.nats_url.as_str()),
                cell.sinks
                    .kafka()
                    .then_some((bus.bootstrap.as_str(), topic.as_str())),
            );
            a.wait_ready(Duration::from_secs(60));
            common::wait_round_after(&a.host_id, 0, Duration::from_secs(120));
            if cell.sinks.nats() {
                places.push(bus.nats(bus::AGENT_STREAM, a.filter()));
            }
            if cell.sinks.kafka() {
                places.push(bus.kafka(&topic, Some(&a.host_id)));
            }
            Running::Agent(a)
        }
        Who::Bridge => {
            let subject = format!("bridge.r{run_no}");
            if cell.sinks.kafka() {
                bus.create_topic(&subject);
                places.push(bus.kafka(&subject, None));
            }
            let b = procs::Bridge::start(
                &uri,
                cell.sinks
                    .nats()
                    .then_some((bus.nats_url.as_str(), subject.as_str())),
                cell.sinks
                    .kafka()
                    .then_some((bus.bootstrap.as_str(), subject.as_str())),
            );
            if cell.sinks.nats() {
                places.push(bus.nats(bus::BRIDGE_STREAM, format!("{subject}.>")));
            }
            Running::Bridge(b)
        }
    };
    // The agent's initial round (reconcile events) is on the bus: the
    // counts before the load.
    let base = settle(bus, &places);
    let pid = proc.pid();
    let n = cell.events;
    let logs = tempfile::tempdir().unwrap();

    let threads0 = procs::thread_cpu(pid);
    let cpu0 = procs::cpu_seconds(pid);
    let t0 = Instant::now();
    let errors = load::run(&uri, &domains, n, logs.path());
    let load_end = Instant::now();
    assert_eq!(
        errors,
        0,
        "{errors} virsh commands failed (see {})",
        logs.keep().display()
    );

    // Drain: every load event acknowledged on every bus; given up at the
    // deadline or when the bus stops moving.
    let deadline = load_end + DEADLINE;
    let mut last = Vec::new();
    let mut moved = Instant::now();
    let complete = loop {
        let counts: Vec<u64> = places.iter().map(|p| bus.count(p)).collect();
        if counts.iter().zip(&base).all(|(c, b)| c - b >= n) {
            break true;
        }
        if counts != last {
            moved = Instant::now();
        }
        if Instant::now() > deadline || moved.elapsed() > STALL {
            last = counts;
            break false;
        }
        last = counts;
        std::thread::sleep(POLL);
    };
    let mut drained = Instant::now();
    let mut cpu1 = procs::cpu_seconds(pid);
    let peak = procs::peak_rss_kib(pid);
    let threads = procs::top_threads(&threads0, &procs::thread_cpu(pid));

    let mut notes = Vec::new();
    let mut missing = (!complete).then(|| describe(&places, &last, &base, n));
    if let Running::Agent(a) = &proc {
        // Counts include gap markers and reconcile events: decode and
        // count the load's events themselves.
        let mut late = false;
        let tallies = loop {
            let checked = Instant::now();
            let tallies: Vec<bus::Tally> = places.iter().map(|p| bus.tally(p)).collect();
            let all = tallies.iter().all(|t| t.distinct() >= n);
            if all && late {
                drained = checked;
                cpu1 = procs::cpu_seconds(pid);
                notes.push("complete only after decoding".to_string());
            }
            if all || !complete || Instant::now() > deadline {
                break tallies;
            }
            late = true;
            std::thread::sleep(Duration::from_millis(200));
        };
        let short: Vec<String> = places
            .iter()
            .zip(&tallies)
            .filter(|(_, t)| t.distinct() < n)
            .map(|(p, t)| format!("{} has {} of {n}", p.name(), t.distinct()))
            .collect();
        missing = (!short.is_empty()).then(|| short.join(", "));
        for (p, t) in places.iter().zip(&tallies) {
            if t.duplicates() > 0 {
                notes.push(format!("{}: {} read twice", p.name(), t.duplicates()));
            }
            if t.distinct() > n {
                notes.push(format!("{}: {} EXTRA", p.name(), t.distinct() - n));
            }
            for (cause, k) in &t.gaps {
                notes.push(format!("{}: gap {cause}×{k}", p.name()));
            }
        }
        let dropped = a.metric("virtstream_libvirt_events_dropped");
        if dropped > 0.0 {
            notes.push(format!("{dropped} dropped"));
        }
        if missing.is_some() {
            let keep = std::env::temp_dir().join(format!("virtstream-bench-source-r{run_no}.log"));
            let _ = std::fs::copy(a.log_path(), &keep);
            notes.push(format!("agent log {}", keep.display()));
        }
    } else if missing.is_some() {
        notes.push(proc.log().replace('\n', " / "));
    }
    let rate = reference
        .rate(n as usize, Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "{label} s={} n={n}: the reference virsh event printed {} of {n} load events",
                cell.sessions,
                reference.count()
            )
        });
    let stopped = match proc {
        Running::Agent(mut a) => format!(
            "journal commits {} | agent exit {:?}",
            a.metric("virtstream_journal_commits"),
            a.terminate()
        ),
        Running::Bridge(mut b) => b.stop(),
    };
    let m = Measured {
        cpu_us_per_event: (cpu1 - cpu0) * 1e6 / n as f64,
        drain_s: match missing {
            None => (drained - load_end).as_secs_f64(),
            Some(_) => f64::NAN,
        },
        missing,
        peak_rss_mib: peak as f64 / 1024.0,
        libvirtd_rate: rate,
        notes: notes.join(", "),
    };
    println!(
        "{label} s={} n={n:>5} {:<5}: load {:.2} s, CPU {:.2} s = {:.0} µs/event, drain {} s, \
         peak RSS {:.1} MiB, libvirtd {:.0} events/s, load avg {} | CPU s by thread: {threads} \
         | {stopped}{}",
        cell.sessions,
        cell.sinks.name(),
        (load_end - t0).as_secs_f64(),
        cpu1 - cpu0,
        m.cpu_us_per_event,
        m.drain(),
        m.peak_rss_mib,
        m.libvirtd_rate,
        procs::loadavg(),
        if m.notes.is_empty() {
            String::new()
        } else {
            format!(" | {}", m.notes)
        }
    );
    drop(reference);
    drop(conn);
    drop(host);
    m
}

/// Waits until the counts of `places` stop moving (500 ms); returns them.
fn settle(bus: &Bus, places: &[Place]) -> Vec<u64> {
    let end = Instant::now() + Duration::from_secs(60);
    let mut last: Vec<u64> = places.iter().map(|p| bus.count(p)).collect();
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now: Vec<u64> = places.iter().map(|p| bus.count(p)).collect();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(500) {
            return last;
        }
        assert!(Instant::now() < end, "the bus did not settle: {last:?}");
    }
}

fn describe(places: &[Place], counts: &[u64], base: &[u64], n: u64) -> String {
    places
        .iter()
        .zip(counts.iter().zip(base))
        .map(|(p, (c, b))| format!("{} has {} of {n}", p.name(), c - b))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_table(rows: &[(Cell, Measured, Measured)]) {
    let ratio = |a: f64, b: f64| {
        if b > 0.0 && a.is_finite() && b.is_finite() {
            format!("{:.2}", a / b)
        } else {
            "–".into()
        }
    };
    println!(
        "\n| sessions | events | sinks | libvirtd events/s (agent run / bridge run) \
         | agent CPU µs/event | bridge CPU µs/event | CPU ratio \
         | agent drain s | bridge drain s | drain ratio \
         | agent RSS MiB | bridge RSS MiB | RSS ratio | agent notes |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (c, a, b) in rows {
        println!(
            "| {} | {} | {} | {:.0} / {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} |",
            c.sessions,
            c.events,
            c.sinks.name(),
            a.libvirtd_rate,
            b.libvirtd_rate,
            a.cpu_us_per_event,
            b.cpu_us_per_event,
            ratio(a.cpu_us_per_event, b.cpu_us_per_event),
            a.drain(),
            b.drain(),
            ratio(a.drain_s, b.drain_s),
            a.peak_rss_mib,
            b.peak_rss_mib,
            ratio(a.peak_rss_mib, b.peak_rss_mib),
            if a.notes.is_empty() { "–" } else { &a.notes },
        );
    }
    // The targets, checked on what was measured.
    let cells = rows.len();
    let cpu_ok = rows
        .iter()
        .filter(|(_, a, b)| {
            a.cpu_us_per_event <= 100.0 && a.cpu_us_per_event * 4.0 <= b.cpu_us_per_event
        })
        .count();
    let big: Vec<_> = rows.iter().filter(|(c, _, _)| c.events >= 16000).collect();
    let drain_ok = big.iter().filter(|(_, a, _)| a.drain_s <= 0.2).count();
    let four: Vec<_> = rows.iter().filter(|(c, _, _)| c.sessions == 4).collect();
    let four_ok = four
        .iter()
        .filter(|(_, a, _)| a.notes.is_empty() && a.drain_s <= 0.2)
        .count();
    println!(
        "\ntargets: CPU ≤ 100 µs/event and ≥ 4× less than the bridge: {cpu_ok} of {cells} cells; \
         drain ≤ 0.2 s after 16,000 events: {drain_ok} of {}; \
         4 sessions kept up (drain ≤ 0.2 s, no gap or overflow): {four_ok} of {}",
        big.len(),
        four.len()
    );
}
