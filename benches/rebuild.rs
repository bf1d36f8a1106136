//! Rebuild benchmark: 1,000,000 events already on the bus (a real
//! nats-server, and the tansu Kafka-protocol broker), 20 hosts × 500
//! domains: per host a reconcile event per domain and a complete snapshot
//! round, then 99 suspend/resume events per domain.
//!
//! Reports:
//! 1. decode + apply, one core: the messages' bytes (fetched beforehand)
//!    decoded and applied to the rebuild on one thread (events/s; median
//!    of 3 runs). Target ≥ 200,000 events/s.
//! 2. end to end, `virtstream state` as the tool runs it: fetch from the
//!    bus + decode + apply on one thread (events/s, and that thread's CPU
//!    seconds), on NATS and on Kafka.
//! 3. usage and audit over the same records (decode + add, one core).
//!
//! Run: `cargo bench --bench rebuild` (needs nats-server and tansu:
//! `bash deploy/local-env.sh start`). `BENCH_ONLY=nats|kafka` runs one bus.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use virtstream::bus::wire::subject_token;
use virtstream::codec;
use virtstream::config::{Config, NatsConfig};
use virtstream::consumer::audit::{AuditOptions, Auditor};
use virtstream::consumer::bus::StartAt;
use virtstream::consumer::rebuild::Fleet;
use virtstream::consumer::record::{self, Headers, Position, Record};
use virtstream::consumer::usage::Usage;
use virtstream::model::{
    event_id, Detail, DomainEvent, DomainRef, DomainSnapshot, DomainState, EventType, HostInfo,
    HostSnapshot, HostSnapshotKind, Origin, StateReason, AGENT_VERSION,
};

const HOSTS: usize = 20;
const DOMAINS: usize = 500;
const EVENTS: usize = 1_000_000;

fn uuid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

/// The messages, in publish order: per host a complete round, then the
/// events round-robin over hosts and domains (suspend/resume).
fn messages() -> Vec<(String, Vec<u8>)> {
    let epoch = "0123456789abcdef0123456789abcdef";
    let t0 = 1_800_000_000_000_000i64;
    let mut out = Vec::with_capacity(EVENTS + HOSTS * (DOMAINS + 2));
    let mut host_seq = [0u64; HOSTS];
    let info = HostInfo {
        libvirt_uri: "qemu:///system".into(),
        libvirt_driver: "QEMU".into(),
        libvirt_version: "9.0.0".into(),
        accepted_event_ids: vec!["LIFECYCLE".into(), "REBOOT".into()],
    };
    for (h, hs) in host_seq.iter_mut().enumerate() {
        let host = format!("hv{h:03}");
        let tok = subject_token(&host);
        let round = event_id(&host, epoch, 1);
        let host_rec = |kind, hs: u64| HostSnapshot {
            event_id: event_id(&host, epoch, hs),
            host_id: host.clone(),
            epoch: epoch.into(),
            host_seq: hs,
            kind,
            snapshot_id: Some(round.clone()),
            domain_count: DOMAINS as i32,
            host_seq_watermark: hs - 1,
            info: info.clone(),
            agent_version: AGENT_VERSION.into(),
            observed_at: t0,
        };
        // What an agent starts with: one reconcile event per domain, then
        // a complete round.
        for d in 0..DOMAINS {
            *hs += 1;
            let e = event(&host, epoch, *hs, d, 1, 0, t0);
            out.push((subject(&host, d), codec::encode_event(&e)));
        }
        let round = event_id(&host, epoch, *hs + 1);
        let host_rec = |kind, hs: u64| HostSnapshot {
            snapshot_id: Some(round.clone()),
            ..host_rec(kind, hs)
        };
        *hs += 1;
        out.push((
            format!("virt.hosts.v1.{tok}"),
            codec::encode_host_snapshot(&host_rec(HostSnapshotKind::ROUND_BEGIN, *hs)),
        ));
        for d in 0..DOMAINS {
            *hs += 1;
            let u = uuid(d);
            let snap = DomainSnapshot {
                event_id: event_id(&host, epoch, *hs),
                host_id: host.clone(),
                epoch: epoch.into(),
                host_seq: *hs,
                snapshot_id: round.clone(),
                seq: 1,
                domain: DomainRef {
                    uuid: u.clone(),
                    name: format!("vm-{d}"),
                    id: Some(d as i32 + 1),
                },
                state: StateReason::named(DomainState::RUNNING, "BOOTED"),
                persistent: true,
                autostart: Some(false),
                vcpus: Some(2),
                memory_kib: Some(2_097_152),
                config_hash: Some("sha256:0123456789abcdef".into()),
                observed_at: t0,
                xml: None,
            };
            out.push((
                format!("virt.snapshots.v1.{tok}.{u}"),
                codec::encode_domain_snapshot(&snap),
            ));
        }
        *hs += 1;
        out.push((
            format!("virt.hosts.v1.{tok}"),
            codec::encode_host_snapshot(&host_rec(HostSnapshotKind::ROUND_END, *hs)),
        ));
    }
    for n in 0..EVENTS - HOSTS * DOMAINS {
        let h = n % HOSTS;
        let d = (n / HOSTS) % DOMAINS;
        let round_no = n / (HOSTS * DOMAINS);
        let host = format!("hv{h:03}");
        host_seq[h] += 1;
        let e = event(
            &host,
            epoch,
            host_seq[h],
            d,
            round_no as u64 + 2,
            round_no % 2 + 1,
            t0 + n as i64 * 1000,
        );
        out.push((subject(&host, d), codec::encode_event(&e)));
    }
    out
}

fn subject(host: &str, d: usize) -> String {
    format!("virt.events.v1.{}.{}", subject_token(host), uuid(d))
}

/// Domain `d`'s event: `kind` 0 = reconcile STARTED, 1 = SUSPENDED,
/// 2 = RESUMED.
fn event(host: &str, epoch: &str, hs: u64, d: usize, seq: u64, kind: usize, t: i64) -> DomainEvent {
    let (event, detail, state, reason, origin) = match kind {
        0 => (
            EventType::STARTED,
            Detail::BOOTED,
            DomainState::RUNNING,
            "BOOTED",
            Origin::RECONCILE,
        ),
        1 => (
            EventType::SUSPENDED,
            Detail::PAUSED,
            DomainState::PAUSED,
            "USER",
            Origin::LIBVIRT,
        ),
        _ => (
            EventType::RESUMED,
            Detail::UNPAUSED,
            DomainState::RUNNING,
            "UNPAUSED",
            Origin::LIBVIRT,
        ),
    };
    DomainEvent {
        event_id: event_id(host, epoch, hs),
        host_id: host.into(),
        epoch: epoch.into(),
        host_seq: hs,
        seq,
        domain: DomainRef {
            uuid: uuid(d),
            name: format!("vm-{d}"),
            id: Some(d as i32 + 1),
        },
        event,
        libvirt_event_id: 0,
        event_code: event.lifecycle_code().unwrap(),
        detail,
        detail_code: detail.code(event),
        origin,
        state_after: StateReason::named(state, reason),
        persistent: true,
        autostart: Some(false),
        vcpus: Some(2),
        memory_kib: Some(2_097_152),
        config_hash: Some("sha256:0123456789abcdef".into()),
        observed_at: t,
        xml: None,
        hook: None,
    }
}

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which lives on this stack.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Positions as on NATS: the snapshot records and the events each in a
/// stream of their own, numbered from 1.
fn positions(raw: &[(bool, Vec<u8>)]) -> Vec<Position> {
    let (ev, sn): (Arc<str>, Arc<str>) = (Arc::from("VIRT_EVENTS"), Arc::from("VIRT_SNAPSHOTS"));
    let (mut e, mut s) = (0, 0);
    raw.iter()
        .map(|(is_event, _)| {
            let (source, n) = if *is_event {
                e += 1;
                (ev.clone(), e)
            } else {
                s += 1;
                (sn.clone(), s)
            };
            Position {
                source,
                partition: None,
                offset: n,
                time_us: None,
            }
        })
        .collect()
}

/// Decode + apply of raw messages on this thread; events/s.
fn decode_apply(raw: &[(bool, Vec<u8>)], pos: &[Position]) -> (f64, Fleet) {
    let start = Instant::now();
    let mut fleet = Fleet::new();
    for ((contiguous, body), pos) in raw.iter().zip(pos) {
        let body = record::decode(body, Headers::default()).expect("decodes");
        fleet.apply(
            &Record {
                body,
                pos: pos.clone(),
            },
            *contiguous,
        );
    }
    (EVENTS as f64 / start.elapsed().as_secs_f64(), fleet)
}

fn check(fleet: &Fleet) {
    let domains = fleet.domains();
    assert_eq!(domains.len(), HOSTS * DOMAINS);
    assert!(
        domains.iter().all(|d| !d.stale),
        "nothing lost, nothing stale"
    );
    let last_round = ((EVENTS - HOSTS * DOMAINS) / (HOSTS * DOMAINS) - 1) % 2;
    let want = if last_round == 0 { "PAUSED" } else { "RUNNING" };
    assert!(domains.iter().all(|d| d.state == want));
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("rebuild benchmark: run with `cargo bench --bench rebuild`");
        return;
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let t = Instant::now();
    let msgs = messages();
    println!(
        "generated {} messages ({} events) in {:.1} s",
        msgs.len(),
        EVENTS,
        t.elapsed().as_secs_f64()
    );

    // 1. decode + apply on one core.
    let raw: Vec<(bool, Vec<u8>)> = msgs
        .iter()
        .map(|(s, b)| (s.starts_with("virt.events"), b.clone()))
        .collect();
    let pos = positions(&raw);
    let mut rates = Vec::new();
    for _ in 0..3 {
        let (rate, fleet) = decode_apply(&raw, &pos);
        check(&fleet);
        rates.push(rate);
    }
    println!(
        "decode + apply, one core: {:.0} events/s (runs: {:?})",
        median(rates.clone()),
        rates.iter().map(|r| *r as u64).collect::<Vec<_>>()
    );
    let records: Vec<(Record, bool)> = raw
        .iter()
        .zip(&pos)
        .map(|((c, b), pos)| {
            let body = record::decode(b, Headers::default()).unwrap();
            (
                Record {
                    body,
                    pos: pos.clone(),
                },
                *c,
            )
        })
        .collect();
    let start = Instant::now();
    let mut u = Usage::new();
    for (r, c) in &records {
        u.add(r, *c);
    }
    let rows = u.compute(1_800_000_000_000_000, 1_800_000_000_000_000 + 3_600_000_000);
    assert_eq!(rows.len(), HOSTS * DOMAINS);
    println!(
        "usage (add + compute, decoded records), one core: {:.0} events/s",
        EVENTS as f64 / start.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    let mut a = Auditor::new(AuditOptions {
        liveness: virtstream::consumer::liveness::Liveness::new(Duration::from_secs(30), 3),
        now_us: 1_800_000_000_000_000,
        from_start: true,
    });
    for (r, c) in &records {
        a.add(r, *c);
    }
    let report = a.finish();
    assert!(report
        .problems
        .iter()
        .all(|p| p.kind != virtstream::consumer::audit::ProblemKind::Gap));
    println!(
        "audit (add + finish, decoded records), one core: {:.0} events/s",
        EVENTS as f64 / start.elapsed().as_secs_f64()
    );
    drop(records);

    if only.is_empty() || only == "nats" {
        let nats = common::NatsServer::start();
        let cfg: NatsConfig = toml::from_str(&format!("url = \"{}\"", nats.url())).unwrap();
        publish_nats(&cfg, &msgs);
        let full = config(&format!("[nats]\nurl = \"{}\"\n", nats.url()));
        end_to_end("nats", &full, virtstream::consumer::BusKind::Nats);
    }
    if only.is_empty() || only == "kafka" {
        let kafka = common::KafkaBroker::start();
        let section = common::kafka_section(&kafka.bootstrap());
        let full = config(&section);
        publish_kafka(full.kafka.as_ref().unwrap(), &msgs);
        end_to_end("kafka", &full, virtstream::consumer::BusKind::Kafka);
    }
}

fn config(section: &str) -> Config {
    let dir = std::env::temp_dir();
    let text = format!(
        "[journal]\npath = \"{}\"\n{section}",
        dir.join("virtstream-bench-unused").display()
    );
    let path = dir.join(format!("virtstream-bench-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(&path, std::iter::empty()).unwrap();
    let _ = std::fs::remove_file(&path);
    cfg
}

fn end_to_end(name: &str, cfg: &Config, bus: virtstream::consumer::BusKind) {
    let cpu0 = thread_cpu_seconds();
    let start = Instant::now();
    let mut fleet = Fleet::new();
    let out =
        virtstream::consumer::read(cfg, bus, &StartAt::Start, &mut fleet).expect("read the bus");
    let wall = start.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds() - cpu0;
    assert_eq!(out.totals.events as usize, EVENTS);
    assert!(out.undecodable.is_empty());
    check(&fleet);
    println!(
        "{name}: state end to end (fetch + decode + apply on one thread): {:.0} events/s, {wall:.2} s wall, {cpu:.2} s CPU on that thread",
        EVENTS as f64 / wall
    );
}

fn publish_nats(cfg: &NatsConfig, msgs: &[(String, Vec<u8>)]) {
    let t = Instant::now();
    common::rt().block_on(async {
        let client = async_nats::connect(cfg.url.as_str()).await.unwrap();
        let js = jetstream::new(client);
        virtstream::bus::nats::ensure_streams(&js, cfg)
            .await
            .unwrap();
        let mut acks = futures::stream::FuturesUnordered::new();
        for (subject, body) in msgs {
            // Publish in order; acks are awaited in a bounded window.
            let ack = js
                .publish(subject.clone(), body.clone().into())
                .await
                .unwrap();
            acks.push(std::future::IntoFuture::into_future(ack));
            while acks.len() >= 4096 {
                acks.next().await.unwrap().unwrap();
            }
        }
        while let Some(a) = acks.next().await {
            a.unwrap();
        }
    });
    println!(
        "published {} messages to NATS in {:.1} s",
        msgs.len(),
        t.elapsed().as_secs_f64()
    );
}

fn publish_kafka(cfg: &virtstream::config::KafkaConfig, msgs: &[(String, Vec<u8>)]) {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let t = Instant::now();
    let admin = virtstream::bus::kafka::admin_client(cfg, "bench").unwrap();
    common::rt()
        .block_on(virtstream::bus::kafka::ensure_topics(&admin, cfg))
        .unwrap();
    let producer: ThreadedProducer<DefaultProducerContext> =
        virtstream::bus::kafka::client_config(cfg, "bench")
            .unwrap()
            .set("linger.ms", "20")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .unwrap();
    for (subject, body) in msgs {
        let (topic, key) = if let Some(rest) = subject.strip_prefix("virt.events.v1.") {
            (
                &cfg.events_topic,
                rest.rsplit('.').next().unwrap().to_string(),
            )
        } else if let Some(rest) = subject.strip_prefix("virt.snapshots.v1.") {
            let (h, u) = rest.split_once('.').unwrap();
            (&cfg.domain_snapshots_topic, format!("{h}/{u}"))
        } else {
            (
                &cfg.host_snapshots_topic,
                subject.rsplit('.').next().unwrap().to_string(),
            )
        };
        let n = cfg.partitions;
        let rec = BaseRecord::to(topic)
            .key(&key)
            .payload(body)
            .partition(virtstream::bus::kafka::partition_for(&key, n));
        let mut rec = rec;
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(300)).unwrap();
    println!(
        "published {} messages to Kafka in {:.1} s",
        msgs.len(),
        t.elapsed().as_secs_f64()
    );
}
