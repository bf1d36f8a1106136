//! One run of one cell: a fresh private libvirtd, the process under test
//! (the agent or a bridge), the load, the drain, the checks.

use std::time::{Duration, Instant};

use crate::bus::{self, Bus, Place};
use crate::{common, load, procs, Cell, Measured, Who};

const DOMAINS_PER_SESSION: usize = 8;
/// The bus must not stand still for this long while load events are
/// missing.
const STALL: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

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

/// Runs `who` on `cell`; `run_no` names the run's Kafka topic and NATS
/// subjects.
pub fn run(bus: &Bus, cell: Cell, who: Who, run_no: usize) -> Measured {
    let label = who.label();
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
        Who::Pipelined | Who::Awaited => {
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
                who == Who::Awaited,
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
    let allowed = who.deadline(n);
    let deadline = load_end + allowed;
    let mut last = Vec::new();
    let mut moved = Instant::now();
    let mut stalled = false;
    let complete = loop {
        let counts: Vec<u64> = places.iter().map(|p| bus.count(p)).collect();
        if counts.iter().zip(&base).all(|(c, b)| c - b >= n) {
            break true;
        }
        if counts != last {
            moved = Instant::now();
        }
        stalled = moved.elapsed() > STALL;
        if Instant::now() > deadline || stalled {
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
        who,
        cpu_us_per_event: (cpu1 - cpu0) * 1e6 / n as f64,
        drain_s: match missing {
            None => (drained - load_end).as_secs_f64(),
            Some(_) => f64::NAN,
        },
        missing,
        stalled,
        deadline: allowed,
        peak_rss_mib: peak as f64 / 1024.0,
        libvirtd_rate: rate,
        notes: notes.join(", "),
    };
    println!(
        "{label:<16} s={} n={n:>5} {:<5}: load {:.2} s, CPU {:.2} s = {} µs/event, drain {} s, \
         peak RSS {:.1} MiB, libvirtd {:.0} events/s, load avg {} | CPU s by thread: {threads} \
         | {stopped}{}",
        cell.sessions,
        cell.sinks.name(),
        (load_end - t0).as_secs_f64(),
        cpu1 - cpu0,
        m.cpu(),
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
    procs::settle("the bus", || {
        places.iter().map(|p| bus.count(p)).collect::<Vec<u64>>()
    })
}

fn describe(places: &[Place], counts: &[u64], base: &[u64], n: u64) -> String {
    places
        .iter()
        .zip(counts.iter().zip(base))
        .map(|(p, (c, b))| format!("{} has {} of {n}", p.name(), c - b))
        .collect::<Vec<_>>()
        .join(", ")
}
