//! Pipeline benchmark: synthetic libvirt events through tracker → journal
//! (fsync on) → sinks → real brokers on loopback (nats-server, and the
//! tansu Kafka-protocol broker), in three configurations: NATS only,
//! Kafka only, both sinks at once.
//!
//! Reports, per configuration:
//! 1. sustained throughput (events/s acknowledged by every enabled sink)
//!    for 150,000-event floods over 1,000 domains (median of 3 rounds);
//! 2. hand-off → broker ack latency (p50/p99/max) at 1,000 events/s;
//!
//! and then 3. RSS of the real agent binary tracking 1,000 domains on the
//! libvirtd test driver (NATS sink; and with both sinks).
//!
//! Run: `cargo bench --bench pipeline` (needs nats-server, tansu and
//! libvirtd: `bash deploy/local-env.sh start`). Targets on a 2-core
//! machine: ≥ 20,000 events/s; p99 ≤ 10 ms (NATS) and ≤ 15 ms (Kafka) at
//! 1,000 events/s; RSS ≤ 30 MiB (NATS only).
//!
//! `BENCH_ONLY=nats|kafka|both|rss` runs one part.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use virtstream::clock::now_micros;
use virtstream::config::{KafkaConfig, NatsConfig, XmlMode};
use virtstream::journal::{Journal, OpenOptions};
use virtstream::model::{DomainState, StateReason};
use virtstream::sinks::kafka::service::KafkaSink;
use virtstream::sinks::nats::encoding::EncodingContext;
use virtstream::sinks::nats::service::NatsSink;
use virtstream::source::enrich::{EnrichOptions, EnrichTask, Enricher, Inspector, LookupError};
use virtstream::source::{Facts, Item, RawEvent};
use virtstream::telemetry::{Health, Metrics};
use virtstream::tracker::{Tracker, TrackerOptions, TrackerTask};

const DOMAINS: usize = 1000;
const FLOOD: u64 = 150_000;
const FLOOD_ROUNDS: usize = 3;
const PACED_RATE: u64 = 1000;
const PACED_SECS: u64 = 10;

struct Table(HashMap<String, Facts>);

impl Inspector for Table {
    fn inspect(&self, uuid: &str, _xml: bool) -> Result<Facts, LookupError> {
        self.0.get(uuid).cloned().ok_or(LookupError::NoDomain)
    }
}

fn uuid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

/// Acknowledgements and latencies of one sink.
#[derive(Default)]
struct Acks {
    count: AtomicU64,
    latencies: Mutex<Vec<i64>>,
}

struct Pipeline {
    items: std::sync::mpsc::SyncSender<Item>,
    /// One per enabled sink, with its name.
    acks: Vec<(&'static str, Arc<Acks>)>,
    recording: Arc<AtomicBool>,
    shutdown: broadcast::Sender<()>,
    stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

fn pipeline(nats_url: Option<&str>, kafka: Option<&str>) -> Pipeline {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let (journal, writer, rec) = Journal::open(OpenOptions {
        dir: dir.path(),
        host_id: Some("bench-host"),
        default_host_id: &|| unreachable!(),
        sinks: [nats_url.map(|_| "nats"), kafka.map(|_| "kafka")]
            .into_iter()
            .flatten()
            .map(String::from)
            .collect(),
        group_commit_max: 1024,
        queue: 2048,
        when_full: virtstream::journal::WhenFull::RejectNew,
    })
    .unwrap();
    std::thread::Builder::new()
        .name("journal-writer".into())
        .spawn(move || writer.run())
        .unwrap();
    let facts: HashMap<String, Facts> = (0..DOMAINS)
        .map(|i| {
            (
                uuid(i),
                Facts {
                    name: format!("vm-{i}"),
                    id: Some(i as i32 + 1),
                    state: StateReason::named(DomainState::RUNNING, "BOOTED"),
                    persistent: true,
                    autostart: Some(false),
                    vcpus: Some(4),
                    memory_kib: Some(8 << 20),
                    config_hash: Some(format!("sha256:{:064x}", i)),
                    xml: None,
                },
            )
        })
        .collect();
    let tracker = Tracker::new(
        rec.host_id.clone(),
        rec.epoch.clone(),
        rec.host_seq,
        HashMap::new(),
        TrackerOptions {
            xml: XmlMode::Off,
            max_journal_bytes: u64::MAX,
        },
    );
    // As in the agent: the hand-off queue, the enricher (each domain's
    // first event is looked up), the tracker.
    let (items_tx, items_rx) = std::sync::mpsc::sync_channel(16384);
    let (enriched_tx, enriched_rx) = std::sync::mpsc::sync_channel(16384);
    let resync = std::sync::Arc::new(virtstream::source::ResyncRequests::default());
    let stop = Arc::new(AtomicBool::new(false));
    let enrich = EnrichTask {
        enricher: Enricher::new(
            Table(facts),
            EnrichOptions {
                xml: XmlMode::Off,
                lookup_attempts: 1,
            },
        ),
        input: items_rx,
        output: enriched_tx,
        stop: stop.clone(),
    };
    std::thread::Builder::new()
        .name("enricher".into())
        .spawn(move || enrich.run())
        .unwrap();
    let task = TrackerTask {
        tracker,
        items: enriched_rx,
        overflow: Arc::new(AtomicBool::new(false)),
        resync,
        journal: journal.clone(),
        metrics: metrics.clone(),
        restarted: None,
        stop: stop.clone(),
        // No libvirt here, so no listings: rounds are benchmarked separately.
        snapshot: virtstream::tracker::SnapshotOptions {
            interval: Duration::from_secs(3600),
            heartbeat: Duration::from_secs(3600),
        },
    };
    std::thread::Builder::new()
        .name("tracker".into())
        .spawn(move || task.run())
        .unwrap();

    let recording = Arc::new(AtomicBool::new(false));
    let observer = |acks: &Arc<Acks>| {
        let acks = acks.clone();
        let recording = recording.clone();
        Arc::new(move |e: &virtstream::journal::Entry| {
            acks.count.fetch_add(1, Ordering::Relaxed);
            if recording.load(Ordering::Relaxed) {
                acks.latencies
                    .lock()
                    .unwrap()
                    .push(now_micros() - e.observed_at);
            }
        })
    };
    let mut acks = Vec::new();
    let nats_sink = nats_url.map(|url| {
        let a = Arc::new(Acks::default());
        acks.push(("nats", a.clone()));
        let cfg: NatsConfig = toml::from_str(&format!("url = \"{url}\"")).unwrap();
        (cfg, observer(&a))
    });
    let kafka_sink = kafka.map(|bootstrap| {
        let a = Arc::new(Acks::default());
        acks.push(("kafka", a.clone()));
        let cfg: KafkaConfig = toml::from_str(&format!(
            "brokers = [\"{bootstrap}\"]\npartitions = 12\nreplication = 1\nreadback_idle = \"500ms\""
        ))
        .unwrap();
        KafkaSink {
            cfg,
            client_id: "bench".into(),
            host_id: rec.host_id.clone(),
            epoch: rec.epoch.clone(),
            journal: journal.clone(),
            health: health.clone(),
            metrics: metrics.clone(),
            observer: Some(observer(&a)),
            sent_upto: Arc::new(std::sync::atomic::AtomicU64::new(rec.host_seq)),
            registry: None,
        }
    });
    let (shutdown, _) = broadcast::channel(1);
    {
        let rx_nats = shutdown.subscribe();
        let rx_kafka = shutdown.subscribe();
        // Like the agent: both sinks on one current-thread runtime, here
        // on a thread of its own.
        std::thread::Builder::new()
            .name("sink-runtime".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut tasks = Vec::new();
                    if let Some((cfg, obs)) = nats_sink {
                        let client = virtstream::bus::nats::connect(&cfg, "bench").await.unwrap();
                        let sink = NatsSink {
                            encoding: Arc::new(EncodingContext::new(
                                &rec.host_id,
                                &rec.epoch,
                                &cfg,
                            )),
                            cfg,
                            client,
                            journal,
                            health,
                            metrics,
                            observer: Some(obs),
                            registry: None,
                        };
                        tasks.push(tokio::spawn(async move {
                            sink.run(rx_nats, Duration::from_secs(5)).await.unwrap()
                        }));
                    }
                    if let Some(sink) = kafka_sink {
                        tasks.push(tokio::spawn(async move {
                            sink.run(rx_kafka, Duration::from_secs(5)).await.unwrap()
                        }));
                    }
                    for t in tasks {
                        t.await.unwrap();
                    }
                })
            })
            .unwrap();
    }
    Pipeline {
        items: items_tx,
        acks,
        recording,
        shutdown,
        stop,
        _dir: dir,
    }
}

fn event(n: u64) -> Item {
    let d = (n as usize) % DOMAINS;
    // Alternate suspend / resume per domain.
    let ty = if (n / DOMAINS as u64) % 2 == 0 { 3 } else { 4 };
    Item::Event(Box::new(RawEvent {
        uuid: uuid(d),
        name: format!("vm-{d}"),
        id: Some(d as i32 + 1),
        event_id: 0,
        type_code: ty,
        detail_code: 0,
        observed_at: now_micros(),
        facts: None,
    }))
}

impl Pipeline {
    /// Entries every enabled sink has acknowledged.
    fn acked(&self) -> u64 {
        self.acks
            .iter()
            .map(|(_, a)| a.count.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }
}

fn wait_acked(p: &Pipeline, n: u64, timeout: Duration) {
    let end = Instant::now() + timeout;
    while p.acked() < n {
        assert!(
            Instant::now() < end,
            "only {} of {n} acknowledged by every sink",
            p.acked()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds per thread of a process (`/proc/<pid>/task/*/stat`).
fn thread_cpu(pid: &str) -> Vec<(String, f64)> {
    let tick = 100.0; // USER_HZ on Linux
    let mut out: HashMap<String, f64> = HashMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let cpu =
            (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / tick;
        *out.entry(name).or_default() += cpu;
    }
    let mut v: Vec<_> = out.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // and must not run the full benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("pipeline benchmark: run with `cargo bench --bench pipeline`");
        return;
    }
    // As the agent does at start.
    virtstream::source::ffi::limit_malloc_arenas();
    let nats = common::NatsServer::start();
    let kafka = common::KafkaBroker::start();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let configs: [(&str, Option<String>, Option<String>); 3] = [
        ("nats", Some(nats.url()), None),
        ("kafka", None, Some(kafka.bootstrap())),
        ("both", Some(nats.url()), Some(kafka.bootstrap())),
    ];
    for (name, n, k) in configs {
        if !only.is_empty() && only != name {
            continue;
        }
        println!("== {name}");
        run_config(n.as_deref(), k.as_deref(), &nats, &kafka);
    }
    if only.is_empty() || only == "rss" {
        rss(&nats, &kafka);
    }
    if only.is_empty() || only == "round" {
        round(&nats);
    }
}

/// A snapshot round over 10,000 domains on the libvirtd test driver:
/// from the listing's start (the round's observed_at) to its ROUND_END
/// arriving on NATS, for the round at start and a periodic one; and the
/// agent's RSS after them.
fn round(nats: &common::NatsServer) {
    const N: usize = 10_000;
    common::ensure_libvirtd();
    let conn = virt::connect::Connect::open(Some(common::TEST_URI)).unwrap();
    let t0 = Instant::now();
    let _doms = define_domains(&conn, "round", N);
    println!(
        "defined {N} domains (half running) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let mut agent = common::Agent::new(
        common::TEST_URI,
        Some(&nats.url()),
        "[snapshot]\ninterval = \"20s\"\nheartbeat = \"5s\"\n",
    );
    agent.start();
    let mut seen_rounds = 0;
    let mut last_end = 0u64;
    let deadline = Instant::now() + Duration::from_secs(180);
    while seen_rounds < 2 {
        assert!(Instant::now() < deadline, "rounds did not complete");
        let recs = common::snapshot_records(&agent.host_id);
        let arrived = now_micros();
        if let Some(end) = recs.iter().rev().find_map(|r| {
            r.host.as_ref().filter(|h| {
                h.kind == virtstream::model::HostSnapshotKind::ROUND_END && h.host_seq > last_end
            })
        }) {
            let begin = recs
                .iter()
                .find_map(|r| {
                    r.host
                        .as_ref()
                        .filter(|h| Some(&h.event_id) == end.snapshot_id.as_ref())
                })
                .expect("ROUND_BEGIN published");
            seen_rounds += 1;
            last_end = end.host_seq;
            println!(
                "round {seen_rounds} ({}): {} domains, listing start → ROUND_END on NATS {:.2} s",
                if seen_rounds == 1 {
                    "at start"
                } else {
                    "periodic"
                },
                end.domain_count,
                (arrived - begin.observed_at) as f64 / 1e6,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = agent.log();
    for l in log
        .lines()
        .filter(|l| l.contains("listed domains") || l.contains("snapshot round journaled"))
    {
        println!("  agent: {}", l.trim());
    }
    let pid = agent.pid().unwrap().to_string();
    println!(
        "agent RSS with {N} domains right after the rounds: {} KiB",
        rss_kib(&pid)
    );
    // Steady state: after a heartbeat, which returns freed heap memory.
    std::thread::sleep(Duration::from_secs(7));
    println!(
        "agent RSS with {N} domains after the next heartbeat: {} KiB",
        rss_kib(&pid)
    );
    agent.terminate();
}

/// Throughput and latency of one sink configuration.
fn run_config(
    nats_url: Option<&str>,
    kafka: Option<&str>,
    nats: &common::NatsServer,
    broker: &common::KafkaBroker,
) {
    let p = pipeline(nats_url, kafka);
    let cpu_before = thread_cpu("self");

    // Warm-up: every domain once (tracker records, subject positions).
    for n in 0..DOMAINS as u64 {
        p.items.send(event(n)).unwrap();
    }
    wait_acked(&p, DOMAINS as u64, Duration::from_secs(120));

    // 1. Sustained throughput: several rounds (this machine's CPU is
    // shared; the median is the figure, every round is printed).
    let mut rates = Vec::new();
    let mut sent = DOMAINS as u64;
    for round in 1..=FLOOD_ROUNDS {
        let base = p.acked();
        let t0 = Instant::now();
        for n in 0..FLOOD {
            p.items.send(event(sent + n)).unwrap();
        }
        sent += FLOOD;
        wait_acked(&p, base + FLOOD, Duration::from_secs(300));
        let secs = t0.elapsed().as_secs_f64();
        rates.push(FLOOD as f64 / secs);
        println!(
            "throughput round {round}: {FLOOD} events in {secs:.2} s = {:.0} events/s",
            FLOOD as f64 / secs
        );
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "throughput (median of {FLOOD_ROUNDS}): {:.0} events/s sustained, hand-off → ack by every sink, fsync on",
        rates[FLOOD_ROUNDS / 2]
    );
    let before: HashMap<String, f64> = cpu_before.into_iter().collect();
    let mut used: Vec<(String, f64)> = thread_cpu("self")
        .into_iter()
        .map(|(t, c)| {
            let b = before.get(&t).copied().unwrap_or(0.0);
            (t, c - b)
        })
        .filter(|(_, c)| *c >= 0.05)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("  CPU seconds by thread: {used:?}");
    for (name, pid) in [("nats-server", nats.pid()), ("tansu", broker.pid())] {
        println!(
            "  {name} CPU seconds so far: {:.2}",
            thread_cpu(&pid.to_string())
                .iter()
                .map(|t| t.1)
                .sum::<f64>()
        );
    }

    // 2. Latency at a steady 1,000 events/s.
    std::thread::sleep(Duration::from_millis(500));
    p.recording.store(true, Ordering::Relaxed);
    let base = p.acked();
    let total = PACED_RATE * PACED_SECS;
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_micros(i * 1_000_000 / PACED_RATE);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        p.items.send(event(i)).unwrap();
    }
    wait_acked(&p, base + total, Duration::from_secs(60));
    p.recording.store(false, Ordering::Relaxed);
    for (sink, acks) in &p.acks {
        let mut lat = acks.latencies.lock().unwrap().clone();
        lat.sort_unstable();
        let q = |f: f64| lat[((lat.len() as f64 * f) as usize).min(lat.len() - 1)] as f64 / 1000.0;
        println!(
            "latency {sink} at {PACED_RATE} events/s over {PACED_SECS} s ({} samples): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            lat.len(),
            q(0.50),
            q(0.99),
            *lat.last().unwrap() as f64 / 1000.0
        );
    }
    println!("bench process RSS after the runs: {} KiB", rss_kib("self"));
    p.stop.store(true, Ordering::Relaxed);
    let _ = p.shutdown.send(());
    drop(p.items);
    std::thread::sleep(Duration::from_secs(1));
}

/// Defines `n` test-driver domains, every other one running.
fn define_domains(
    conn: &virt::connect::Connect,
    label: &str,
    n: usize,
) -> Vec<virt::domain::Domain> {
    let prefix = common::unique(label);
    (0..n)
        .map(|i| {
            let d = conn
                .define_domain_xml(&common::test_domain_xml(
                    &format!("{prefix}-{i}"),
                    &common::new_uuid(),
                ))
                .unwrap();
            if i % 2 == 0 {
                d.create().unwrap();
            }
            d
        })
        .collect()
}

/// RSS of the real agent binary with 1,000 domains tracked: NATS sink
/// (the target), then both sinks (for reference).
fn rss(nats: &common::NatsServer, kafka: &common::KafkaBroker) {
    // 3. RSS of the real agent with 1,000 domains tracked.
    common::ensure_libvirtd();
    let _oracle_conn = virt::connect::Connect::open(Some(common::TEST_URI)).unwrap();
    let conn = virt::connect::Connect::open(Some(common::TEST_URI)).unwrap();
    let doms = define_domains(&conn, "rss", DOMAINS);
    for (label, extra) in [
        ("NATS sink", String::new()),
        (
            "NATS + Kafka sinks",
            common::kafka_section(&kafka.bootstrap()),
        ),
    ] {
        // Heartbeats (which return freed heap memory) every 3 s, so the
        // figure is the steady state after the round at start.
        let mut agent = common::Agent::new(
            common::TEST_URI,
            Some(&nats.url()),
            &format!("[log]\nlevel = \"warn\"\n[snapshot]\nheartbeat = \"3s\"\n{extra}"),
        );
        agent.start();
        agent.wait_ready(Duration::from_secs(60));
        common::wait_for(
            &nats.url(),
            &agent.filter(),
            Duration::from_secs(120),
            "1,000 reconcile events",
            |m| m.len() > DOMAINS,
        );
        std::thread::sleep(Duration::from_secs(4));
        let (_, metrics) = agent.http("/metrics").unwrap();
        let tracked = metrics
            .lines()
            .find(|l| l.starts_with("virtstream_domains_tracked "))
            .unwrap_or("?")
            .to_string();
        let pid = agent.pid().unwrap().to_string();
        let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Pss:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .map(String::from)
            })
            .unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("?")
                .to_string()
        };
        println!(
            "agent ({label}) with {tracked}: RSS {} KiB (anon {} KiB, file {} KiB), PSS {pss} KiB",
            rss_kib(&pid),
            field("RssAnon:"),
            field("RssFile:")
        );
        agent.terminate();
    }
    for d in doms {
        let _ = d.destroy();
        let _ = d.undefine();
    }
}
