//! Fixtures for tests against real servers: nats-server on a random port
//! with a temporary store, the tansu Kafka-protocol broker on a random
//! port with in-memory storage (both killed on drop), the system libvirtd
//! (started when missing and allowed), the agent binary as a child
//! process, and `virsh event` as the independent oracle.
//!
//! A missing server is a failure with a message saying how to start it,
//! never a silent skip.
#![allow(dead_code)]

pub mod libvirt_host;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use std::collections::HashMap;

use virtstream::model::{DomainEvent, DomainState, Origin};

pub const TEST_URI: &str = "test+unix:///default";
pub const QEMU_URI: &str = "qemu:///system";

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Unique short name for this test run.
pub fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{:x}", std::process::id(), n % 0xffff_ffff)
}

// ---------------------------------------------------------------- NATS

pub struct NatsServer {
    pub port: u16,
    pub store: tempfile::TempDir,
    /// Extra command-line arguments (TLS, authentication).
    args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> NatsServer {
        Self::start_with(port, Vec::new())
    }

    /// A server with extra arguments, e.g. `--tls ...` or `-c auth.conf`.
    pub fn start_with(port: u16, args: Vec<String>) -> NatsServer {
        let store = tempfile::tempdir().unwrap();
        let mut s = NatsServer {
            port,
            store,
            args,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args(["-js", "-sd"])
            .arg(self.store.path())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.store.path().join("server.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nats-server ({e}): install and start the test environment with \
                     `bash deploy/local-env.sh start` (Debian package nats-server)"
                )
            });
        self.child = Some(child);
        assert!(
            wait_port(self.port, Duration::from_secs(10)),
            "nats-server did not listen on 127.0.0.1:{} within 10 s: {}",
            self.port,
            std::fs::read_to_string(self.store.path().join("server.log")).unwrap_or_default()
        );
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Stops the server (SIGTERM, wait); the store is kept.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_kill(c.id(), libc::SIGTERM);
            let _ = c.wait();
        }
    }

    /// Starts again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn resume(&mut self) {
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn unsafe_kill(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// One message read back from JetStream.
#[derive(Debug, Clone)]
pub struct Stored {
    pub stream_seq: u64,
    pub subject: String,
    pub event: DomainEvent,
    pub headers: Vec<(String, String)>,
}

/// Every message on `filter` in the stream, in stream order.
pub fn fetch(url: &str, stream: &str, filter: &str) -> Vec<Stored> {
    fetch_with(async_nats::ConnectOptions::new(), url, stream, filter)
}

/// [`fetch`] with connect options (TLS, credentials).
pub fn fetch_with(
    opts: async_nats::ConnectOptions,
    url: &str,
    stream: &str,
    filter: &str,
) -> Vec<Stored> {
    rt().block_on(async {
        let client = opts.connect(url).await.expect("connect to nats");
        let js = jetstream::new(client);
        let mut st = match js.get_stream(stream).await {
            Ok(s) => s,
            Err(_) => return Vec::new(),
        };
        let last = st.info().await.unwrap().state.last_sequence;
        if last == 0 {
            return Vec::new();
        }
        let consumer = st
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.to_string(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = consumer.messages().await.unwrap();
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(2), msgs.next()).await;
            let m = match next {
                Ok(Some(Ok(m))) => m,
                _ => break,
            };
            let info = m.info().unwrap();
            let (seq, pending) = (info.stream_sequence, info.pending);
            let headers = m
                .headers
                .as_ref()
                .map(|h| {
                    h.iter()
                        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Stored {
                stream_seq: seq,
                subject: m.subject.to_string(),
                event: virtstream::codec::decode_event(&m.payload).expect("decodes"),
                headers,
            });
            if pending == 0 || seq >= last {
                break;
            }
        }
        out
    })
}

// ---------------------------------------------------------------- Kafka

/// The tansu binary: on PATH, else where `cargo install` puts it.
fn tansu_bin() -> PathBuf {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("tansu");
            if p.is_file() {
                return p;
            }
        }
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let p = home.join("bin/tansu");
    assert!(
        p.is_file(),
        "the tansu Kafka-protocol broker is not installed: run `bash deploy/local-env.sh install` \
         (it runs `cargo install tansu --version 0.6.0 --locked --features dynostore`)"
    );
    p
}

/// A tansu broker on 127.0.0.1 with in-memory storage.
pub struct KafkaBroker {
    pub port: u16,
    /// The port advertised to clients in metadata (a TLS terminator's).
    pub advertised: u16,
    log: tempfile::NamedTempFile,
    child: Option<Child>,
}

impl KafkaBroker {
    pub fn start() -> KafkaBroker {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> KafkaBroker {
        Self::start_advertised(port, port)
    }

    /// A broker listening on `port` that tells clients to connect to
    /// `advertised` (where a TLS terminator forwards to `port`).
    pub fn start_advertised(port: u16, advertised: u16) -> KafkaBroker {
        let mut b = KafkaBroker {
            port,
            advertised,
            log: tempfile::NamedTempFile::new().unwrap(),
            child: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised);
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .env_remove("CLUSTER_ID")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .stdout(Stdio::null())
            .stderr(self.log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run tansu ({e}): bash deploy/local-env.sh install"));
        self.child = Some(child);
        assert!(
            wait_port(self.port, Duration::from_secs(30)),
            "tansu did not listen on 127.0.0.1:{} within 30 s: {}",
            self.port,
            std::fs::read_to_string(self.log.path()).unwrap_or_default()
        );
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        unsafe_kill(self.pid(), libc::SIGSTOP);
    }

    pub fn unpause(&self) {
        unsafe_kill(self.pid(), libc::SIGCONT);
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_kill(c.id(), libc::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `[kafka]` section for a test broker (one replica, few partitions,
/// short read-back idle time).
pub fn kafka_section(bootstrap: &str) -> String {
    format!(
        "[kafka]\nbrokers = [\"{bootstrap}\"]\npartitions = 4\nreplication = 1\nreadback_idle = \"1s\"\n"
    )
}

/// One record as read from a test topic.
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub headers: Vec<(String, String)>,
    /// None for a tombstone.
    pub value: Option<Vec<u8>>,
    /// From the `ce_id` header.
    pub host_id: String,
    pub host_seq: u64,
}

/// Every record of `topic`, partition by partition in offset order.
pub fn read_topic(bootstrap: &str, topic: &str) -> Vec<KafkaRecord> {
    let mut base = rdkafka::ClientConfig::new();
    base.set("bootstrap.servers", bootstrap);
    read_topic_with(&base, topic)
}

/// [`read_topic`] with a client configuration (TLS, SASL).
pub fn read_topic_with(base: &rdkafka::ClientConfig, topic: &str) -> Vec<KafkaRecord> {
    use rdkafka::message::{Headers, Message};
    use virtstream::sinks::kafka::reader::{read_to_end, Flow, ReadOptions, Start};
    let probe: rdkafka::consumer::BaseConsumer = base.create().unwrap();
    let md =
        rdkafka::consumer::Consumer::fetch_metadata(&probe, Some(topic), Duration::from_secs(10))
            .expect("metadata from the test broker");
    let partitions = md
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0);
    let mut out = Vec::new();
    read_to_end(
        base,
        ReadOptions {
            topic,
            starts: (0..partitions).map(|p| (p, Start::Earliest)).collect(),
            idle: Duration::from_millis(800),
            max_clock_skew: Duration::from_secs(10),
            not_before_ms: None,
            stall: Duration::from_secs(20),
            stop: None,
            lookback: 0,
        },
        |m| {
            let headers: Vec<(String, String)> = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let (host_id, host_seq) = headers
                .iter()
                .find(|(k, _)| k == "ce_id")
                .and_then(|(_, v)| virtstream::model::parse_event_id(v))
                .map(|(h, _, s)| (h.to_string(), s))
                .expect("every record carries ce_id");
            out.push(KafkaRecord {
                partition: m.partition(),
                offset: m.offset(),
                key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                headers,
                value: m.payload().map(|p| p.to_vec()),
                host_id,
                host_seq,
            });
            Flow::Continue
        },
    )
    .expect("reading the test topic");
    out
}

/// Every event of `host_id` in `topic`, partition by partition in offset
/// order. `subject` is `kafka:<partition>:<key>`, `stream_seq` the offset.
pub fn fetch_kafka(bootstrap: &str, topic: &str, host_id: &str) -> Vec<Stored> {
    read_topic(bootstrap, topic)
        .into_iter()
        .filter(|r| r.host_id == host_id)
        .map(|r| Stored {
            stream_seq: r.offset as u64,
            subject: format!("kafka:{}:{}", r.partition, r.key),
            event: virtstream::codec::decode_event(r.value.as_deref().unwrap_or_default())
                .expect("Kafka record decodes"),
            headers: r.headers,
        })
        .collect()
}

/// Polls the Kafka events topic until `pred` holds on a snapshot of one
/// host's records without holes in host_seq, or fails after `timeout`.
pub fn wait_for_kafka(
    bootstrap: &str,
    host_id: &str,
    timeout: Duration,
    what: &str,
    pred: impl FnMut(&[Stored]) -> bool,
) -> Vec<Stored> {
    poll_until(timeout, what, "Kafka records", pred, || {
        fetch_kafka(bootstrap, "virt.domain.events.v1", host_id)
    })
}

/// Fetches until `pred` holds on a snapshot without holes in host_seq
/// (see [`contiguous`]; duplicates are left for the caller's exact checks
/// to report), or fails after `timeout`.
fn poll_until(
    timeout: Duration,
    what: &str,
    unit: &str,
    mut pred: impl FnMut(&[Stored]) -> bool,
    mut fetch: impl FnMut() -> Vec<Stored>,
) -> Vec<Stored> {
    let end = Instant::now() + timeout;
    loop {
        let got = fetch();
        if contiguous(&got) && pred(&got) {
            return got;
        }
        if Instant::now() > end {
            panic!(
                "timed out after {timeout:?} waiting for {what}; have {} {unit}",
                got.len()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ------------------------------------------------ snapshot-record ledger
//
// host_seq counts every record a host emits, snapshot records included,
// and those live on compacted streams/topics that keep only the latest
// per key. To check that events + snapshot records cover 1..=N exactly,
// the tests collect the host_seqs of snapshot records as they are
// published: on NATS with a core subscription started before the agent,
// on Kafka by reading the snapshot topics (the test broker does not
// compact).

/// One snapshot-stream record as published (NATS) or stored (Kafka).
#[derive(Debug, Clone)]
pub struct SnapRecord {
    pub host_seq: u64,
    /// A deleted domain snapshot (empty/null value, tombstone header).
    pub tombstone: bool,
    /// The domain UUID of a domain snapshot or tombstone.
    pub uuid: Option<String>,
    pub host: Option<virtstream::model::HostSnapshot>,
    pub domain: Option<virtstream::model::DomainSnapshot>,
}

impl SnapRecord {
    fn decode(headers: &[(String, String)], value: &[u8], uuid: Option<String>) -> SnapRecord {
        let host_seq = headers
            .iter()
            .find(|(k, _)| k == "ce_id")
            .and_then(|(_, v)| virtstream::model::parse_event_id(v))
            .map(|(_, _, s)| s)
            .expect("snapshot records carry ce_id");
        let tombstone = headers
            .iter()
            .any(|(k, v)| k == virtstream::sinks::TOMBSTONE_HEADER && v == "true");
        let (mut host, mut domain) = (None, None);
        if !tombstone {
            match virtstream::codec::decode_json(value)
                .expect("snapshot record decodes")
                .0
            {
                "HostSnapshot" => host = virtstream::codec::decode_host_snapshot(value).ok(),
                "DomainSnapshot" => domain = virtstream::codec::decode_domain_snapshot(value).ok(),
                other => panic!("unexpected {other} on a snapshot stream"),
            }
        }
        SnapRecord {
            host_seq,
            tombstone,
            uuid,
            host,
            domain,
        }
    }
}

type Records = Arc<Mutex<Vec<SnapRecord>>>;

#[derive(Default, Clone)]
struct HostTaps {
    nats: Option<Records>,
    kafka: Option<String>,
}

fn ledger() -> &'static Mutex<HashMap<String, HostTaps>> {
    static L: std::sync::OnceLock<Mutex<HashMap<String, HostTaps>>> = std::sync::OnceLock::new();
    L.get_or_init(Default::default)
}

/// Starts collecting the snapshot records `host_id` publishes to NATS.
pub fn tap_nats(url: &str, host_id: &str) {
    let records: Records = Default::default();
    let token = virtstream::sinks::subject_token(host_id);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let url = url.to_string();
    let out = records.clone();
    std::thread::spawn(move || {
        rt().block_on(async move {
            let client = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .reconnect_delay_callback(|_| Duration::from_millis(10))
                .connect(url.as_str())
                .await
                .unwrap();
            let mut a = client
                .subscribe(format!("virt.snapshots.v1.{token}.>"))
                .await
                .unwrap();
            let mut b = client
                .subscribe(format!("virt.hosts.v1.{token}"))
                .await
                .unwrap();
            let _ = client.flush().await;
            let _ = ready_tx.send(());
            loop {
                let m = tokio::select! {
                    Some(m) = a.next() => m,
                    Some(m) = b.next() => m,
                    else => return,
                };
                let headers: Vec<(String, String)> = m
                    .headers
                    .as_ref()
                    .map(|h| {
                        h.iter()
                            .flat_map(|(k, vs)| {
                                vs.iter().map(move |v| (k.to_string(), v.to_string()))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let uuid = m
                    .subject
                    .strip_prefix("virt.snapshots.v1.")
                    .and_then(|r| r.rsplit_once('.'))
                    .map(|(_, u)| u.to_string());
                out.lock()
                    .unwrap()
                    .push(SnapRecord::decode(&headers, &m.payload, uuid));
            }
        })
    });
    // Up when the server is; a server started later is joined within ms.
    let _ = ready_rx.recv_timeout(Duration::from_secs(5));
    ledger()
        .lock()
        .unwrap()
        .entry(host_id.to_string())
        .or_default()
        .nats = Some(records);
}

/// Snapshot records of `host_id` are to be read from this Kafka broker.
pub fn tap_kafka(bootstrap: &str, host_id: &str) {
    ledger()
        .lock()
        .unwrap()
        .entry(host_id.to_string())
        .or_default()
        .kafka = Some(bootstrap.to_string());
}

/// Every snapshot record (round markers, domain snapshots, tombstones,
/// heartbeats) `host_id` has published so far, in host_seq order: from
/// the NATS tap when there is one, else from the Kafka snapshot topics.
pub fn snapshot_records(host_id: &str) -> Vec<SnapRecord> {
    let taps = ledger()
        .lock()
        .unwrap()
        .get(host_id)
        .cloned()
        .unwrap_or_default();
    let mut out = match (&taps.nats, &taps.kafka) {
        (Some(r), _) => r.lock().unwrap().clone(),
        (None, Some(b)) => kafka_snapshot_records(b, host_id),
        (None, None) => Vec::new(),
    };
    out.sort_by_key(|r| r.host_seq);
    out
}

/// The snapshot records of `host_id` on the Kafka snapshot topics.
pub fn kafka_snapshot_records(bootstrap: &str, host_id: &str) -> Vec<SnapRecord> {
    let mut out = Vec::new();
    for topic in ["virt.domain.snapshots.v1", "virt.host.snapshots.v1"] {
        for r in read_topic(bootstrap, topic) {
            if r.host_id == host_id {
                let uuid = r.key.rsplit_once('/').map(|(_, u)| u.to_string());
                out.push(SnapRecord::decode(
                    &r.headers,
                    r.value.as_deref().unwrap_or_default(),
                    uuid,
                ));
            }
        }
    }
    out.sort_by_key(|r| r.host_seq);
    out
}

/// Waits until a complete snapshot round (ROUND_BEGIN … ROUND_END) of
/// `host_id` began after `host_seq`; returns (begin, end) host_seqs and
/// checks that the round holds `domain_count` DomainSnapshot records.
pub fn wait_round_after(host_id: &str, host_seq: u64, timeout: Duration) -> (u64, u64) {
    use virtstream::model::HostSnapshotKind;
    let end = Instant::now() + timeout;
    loop {
        let recs = snapshot_records(host_id);
        for r in &recs {
            let Some(h) = &r.host else { continue };
            if h.kind != HostSnapshotKind::ROUND_END {
                continue;
            }
            let sid = h.snapshot_id.as_deref().expect("ROUND_END names its round");
            let (_, _, begin) = virtstream::model::parse_event_id(sid).unwrap();
            if begin > host_seq {
                let b = recs
                    .iter()
                    .find(|x| x.host_seq == begin)
                    .and_then(|x| x.host.as_ref())
                    .expect("the round's ROUND_BEGIN was published");
                assert_eq!(b.kind, HostSnapshotKind::ROUND_BEGIN);
                let inside: Vec<&SnapRecord> = recs
                    .iter()
                    .filter(|x| x.host_seq > begin && x.host_seq < h.host_seq)
                    .collect();
                assert!(
                    inside
                        .iter()
                        .all(|x| x.domain.as_ref().is_some_and(|d| d.snapshot_id == sid)),
                    "a round holds only its own DomainSnapshot records"
                );
                assert_eq!(
                    inside.len() as i32,
                    h.domain_count,
                    "ROUND_END counts its records"
                );
                assert_eq!(b.domain_count, h.domain_count);
                return (begin, h.host_seq);
            }
        }
        assert!(
            Instant::now() < end,
            "no complete snapshot round began after host_seq {host_seq} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// host_seqs of the snapshot records `host_id` has published so far.
pub fn snapshot_seqs(host_id: &str) -> std::collections::BTreeSet<u64> {
    let taps = ledger()
        .lock()
        .unwrap()
        .get(host_id)
        .cloned()
        .unwrap_or_default();
    let mut out: std::collections::BTreeSet<u64> = taps
        .nats
        .map(|r| r.lock().unwrap().iter().map(|r| r.host_seq).collect())
        .unwrap_or_default();
    if let Some(b) = taps.kafka {
        out.extend(
            kafka_snapshot_records(&b, host_id)
                .iter()
                .map(|r| r.host_seq),
        );
    }
    out
}

/// Is the host's `host_seq` set, with its snapshot records, exactly
/// 1..=n? Subjects are published in parallel, so a snapshot of a live
/// stream can have holes that later fill.
pub fn contiguous(msgs: &[Stored]) -> bool {
    let Some(first) = msgs.first() else {
        return true;
    };
    let mut hs: std::collections::BTreeSet<u64> = snapshot_seqs(&first.event.host_id);
    hs.extend(msgs.iter().map(|m| m.event.host_seq));
    hs.iter().enumerate().all(|(i, h)| *h == i as u64 + 1)
}

/// Polls until `pred(messages)` holds on a hole-free snapshot of one
/// host's stream (see [`contiguous`]), or fails after `timeout`.
pub fn wait_for(
    url: &str,
    filter: &str,
    timeout: Duration,
    what: &str,
    pred: impl FnMut(&[Stored]) -> bool,
) -> Vec<Stored> {
    poll_until(timeout, what, "messages", pred, || {
        fetch(url, "VIRT_EVENTS", filter)
    })
}

// ---------------------------------------------------------------- libvirt

/// Defines and starts `name`, suspends/resumes it `pairs` times `pace`
/// apart, then destroys and undefines it, on its own thread.
pub fn burst(name: String, pairs: usize, pace: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let conn = virt::connect::Connect::open(Some(TEST_URI)).unwrap();
        let d = conn
            .define_domain_xml(&test_domain_xml(&name, &new_uuid()))
            .unwrap();
        d.create().unwrap();
        for _ in 0..pairs {
            d.suspend().unwrap();
            std::thread::sleep(pace);
            d.resume().unwrap();
            std::thread::sleep(pace);
        }
        d.destroy().unwrap();
        d.undefine().unwrap();
    })
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Makes sure the system libvirtd answers on the test driver socket;
/// starts virtlogd + libvirtd when running as root and they are down.
pub fn ensure_libvirtd() {
    // Test-side libvirt errors are asserted on, not printed.
    virt::error::clear_error_callback();
    if virsh_ok() {
        return;
    }
    assert!(
        is_root(),
        "libvirtd is not answering on {TEST_URI}: start it with `bash deploy/local-env.sh start`"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local-env.sh");
    let st = Command::new("bash")
        .arg(script)
        .arg("start")
        .status()
        .unwrap();
    assert!(st.success(), "deploy/local-env.sh start failed");
    assert!(virsh_ok(), "libvirtd still not answering on {TEST_URI}");
}

/// Kills the system libvirtd, keeps it down for `downtime`, starts it again.
pub fn restart_libvirtd(downtime: Duration) {
    let _ = Command::new("pkill").args(["-x", "libvirtd"]).status();
    let end = Instant::now() + Duration::from_secs(20);
    while Command::new("pgrep")
        .args(["-x", "libvirtd"])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        assert!(Instant::now() < end, "libvirtd did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(downtime);
    let st = Command::new("libvirtd")
        .arg("--daemon")
        .status()
        .expect("libvirtd binary");
    assert!(st.success(), "libvirtd --daemon failed");
    let end = Instant::now() + Duration::from_secs(20);
    while !virsh_ok() {
        assert!(Instant::now() < end, "libvirtd did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the agent (SIGTERM must be a clean exit) and checks that the
/// stream holds exactly the journal's entries: host_seq 1..=N, each once,
/// in order per subject. Returns the stream.
pub fn assert_stream_is_journal(nats_url: &str, agent: &mut Agent) -> Vec<Stored> {
    assert_eq!(agent.terminate(), Some(0), "SIGTERM is a clean exit");
    let n = journal_host_seq(agent);
    let all = fetch(nats_url, "VIRT_EVENTS", &agent.filter());
    let snaps = snapshot_seqs(&agent.host_id).len() as u64;
    assert_eq!(
        all.len() as u64 + snaps,
        n,
        "the streams hold exactly the journal's {n} entries ({snaps} of them snapshot records)"
    );
    assert_contiguous(&all);
    all
}

/// The last host_seq the agent's journal holds (agent must be stopped).
pub fn journal_host_seq(agent: &Agent) -> u64 {
    let dir = agent.dir.path().join("journal");
    let (j, w, rec) = virtstream::journal::Journal::open(virtstream::journal::OpenOptions {
        dir: &dir,
        host_id: Some(&agent.host_id),
        default_host_id: &|| unreachable!(),
        sinks: vec![],
        group_commit_max: 1,
        queue: 1,
    })
    .expect("journal opens after the agent stopped");
    drop(j);
    drop(w);
    rec.host_seq
}

fn virsh_ok() -> bool {
    Command::new("virsh")
        .args(["-c", TEST_URI, "list", "--all"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn test_domain_xml(name: &str, uuid: &str) -> String {
    format!(
        "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory>8192</memory>\
         <vcpu>1</vcpu><os><type>hvm</type></os></domain>"
    )
}

pub fn qemu_domain_xml(name: &str, uuid: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>\
         <memory unit='MiB'>32</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>"
    )
}

pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A libvirt event as `virsh event` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleEvent {
    pub domain: String,
    /// `EventType` symbol, e.g. `STARTED`, or `REBOOT`.
    pub event: String,
    /// `Detail` symbol, e.g. `BOOTED`.
    pub detail: String,
}

/// `virsh event --all --loop --timestamp` as a record of what libvirt
/// emitted. It also keeps a connection open (the test driver forgets its
/// domains when the last connection closes).
pub struct Oracle {
    child: Child,
    pub events: Arc<Mutex<Vec<OracleEvent>>>,
}

fn map_virsh(ty: &str, detail: &str) -> Option<(String, String)> {
    let (event, details): (&str, &[(&str, &str)]) = match ty {
        "Defined" => (
            "DEFINED",
            &[
                ("Added", "ADDED"),
                ("Updated", "UPDATED"),
                ("Renamed", "RENAMED"),
                ("Snapshot", "FROM_SNAPSHOT"),
            ],
        ),
        "Undefined" => (
            "UNDEFINED",
            &[("Removed", "REMOVED"), ("Renamed", "RENAMED")],
        ),
        "Started" => (
            "STARTED",
            &[
                ("Booted", "BOOTED"),
                ("Migrated", "MIGRATED"),
                ("Restored", "RESTORED"),
                ("Snapshot", "FROM_SNAPSHOT"),
                ("Event wakeup", "WAKEUP"),
            ],
        ),
        "Suspended" => (
            "SUSPENDED",
            &[
                ("Paused", "PAUSED"),
                ("Migrated", "MIGRATED"),
                ("I/O Error", "IOERROR"),
                ("Watchdog", "WATCHDOG"),
                ("Restored", "RESTORED"),
                ("Snapshot", "FROM_SNAPSHOT"),
                ("API error", "API_ERROR"),
                ("Post-copy", "POSTCOPY"),
                ("Post-copy Error", "POSTCOPY_FAILED"),
            ],
        ),
        "Resumed" => (
            "RESUMED",
            &[
                ("Unpaused", "UNPAUSED"),
                ("Migrated", "MIGRATED"),
                ("Snapshot", "FROM_SNAPSHOT"),
                ("Post-copy", "POSTCOPY"),
                ("Post-copy Error", "POSTCOPY_FAILED"),
            ],
        ),
        "Stopped" => (
            "STOPPED",
            &[
                ("Shutdown", "SHUTDOWN"),
                ("Destroyed", "DESTROYED"),
                ("Crashed", "CRASHED"),
                ("Migrated", "MIGRATED"),
                ("Saved", "SAVED"),
                ("Failed", "FAILED"),
                ("Snapshot", "FROM_SNAPSHOT"),
            ],
        ),
        "Shutdown" => (
            "SHUTDOWN",
            &[
                ("Finished", "FINISHED"),
                ("Finished after guest request", "GUEST"),
                ("Finished after host request", "HOST"),
            ],
        ),
        "PMSuspended" => ("PMSUSPENDED", &[("Memory", "MEMORY"), ("Disk", "DISK")]),
        "Crashed" => (
            "CRASHED",
            &[("Panicked", "PANICKED"), ("Crashloaded", "CRASHLOADED")],
        ),
        _ => return None,
    };
    let d = details
        .iter()
        .find(|(s, _)| *s == detail)
        .map(|(_, d)| *d)?;
    Some((event.to_string(), d.to_string()))
}

fn parse_oracle_line(line: &str) -> Option<OracleEvent> {
    // 2026-11-22 02:45:38.454+0000: event 'lifecycle' for domain 'probe-t': Defined Added
    let rest = line.split_once("event '")?.1;
    let (kind, rest) = rest.split_once('\'')?;
    let rest = rest.split_once("for domain '")?.1;
    let (name, rest) = rest.rsplit_once('\'')?;
    match kind {
        "lifecycle" => {
            let text = rest.trim_start_matches(':').trim();
            let (ty, detail) = text.split_once(' ')?;
            let (event, detail) = map_virsh(ty, detail.trim())
                .unwrap_or_else(|| panic!("oracle line not understood: {line}"));
            Some(OracleEvent {
                domain: name.to_string(),
                event,
                detail,
            })
        }
        "reboot" => Some(OracleEvent {
            domain: name.to_string(),
            event: "REBOOT".into(),
            detail: "NONE".into(),
        }),
        _ => None,
    }
}

impl Oracle {
    pub fn start(uri: &str) -> Oracle {
        let mut child = Command::new("virsh")
            .args(["-c", uri, "event", "--all", "--loop", "--timestamp"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("virsh (libvirt-clients) must be installed: bash deploy/local-env.sh start");
        let events = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let ev = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(e) = parse_oracle_line(&line) {
                    ev.lock().unwrap().push(e);
                }
            }
        });
        let o = Oracle { child, events };
        // Sync: a sentinel domain's events prove virsh has registered.
        let conn = virt::connect::Connect::open(Some(uri)).unwrap();
        let name = unique("oracle-sync");
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let d = conn
                .define_domain_xml(&if uri.starts_with("test") {
                    test_domain_xml(&name, &new_uuid())
                } else {
                    qemu_domain_xml(&name, &new_uuid())
                })
                .unwrap();
            d.undefine().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            if o.events.lock().unwrap().iter().any(|e| e.domain == name) {
                break;
            }
            assert!(
                Instant::now() < end,
                "virsh event did not report anything within 20 s"
            );
        }
        o
    }

    /// The events for `domain`, in order.
    pub fn for_domain(&self, domain: &str) -> Vec<OracleEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.domain == domain)
            .cloned()
            .collect()
    }
}

impl Drop for Oracle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- agent

pub struct Agent {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub metrics_port: u16,
    pub host_id: String,
    /// Extra environment for the agent process (e.g. secrets).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    runs: u32,
}

impl Agent {
    /// Writes a config for `uri` and `nats_url` (extra TOML appended).
    pub fn new(uri: &str, nats_url: Option<&str>, extra: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let metrics_port = free_port();
        let host_id = unique("host");
        let mut toml = format!(
            "[host]\nid = \"{host_id}\"\nshutdown_timeout = \"5s\"\n\
             [libvirt]\nuri = \"{uri}\"\nreconnect_backoff_min = \"200ms\"\nreconnect_backoff_max = \"2s\"\n\
             [journal]\npath = \"{}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            dir.path().join("journal").display()
        );
        if let Some(u) = nats_url {
            toml.push_str(&format!("[nats]\nurl = \"{u}\"\n"));
            tap_nats(u, &host_id);
        }
        if let Some(b) = extra
            .split_once("[kafka]")
            .and_then(|(_, k)| k.split_once("brokers = [\""))
            .and_then(|(_, b)| b.split_once('"'))
            .map(|(b, _)| b)
        {
            tap_kafka(b, &host_id);
        }
        toml.push_str(extra);
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, toml).unwrap();
        Agent {
            dir,
            config,
            metrics_port,
            host_id,
            env: Vec::new(),
            child: None,
            runs: 0,
        }
    }

    /// A new agent, started and ready.
    pub fn ready(uri: &str, nats_url: Option<&str>, extra: &str) -> Agent {
        let mut a = Agent::new(uri, nats_url, extra);
        a.start();
        a.wait_ready(Duration::from_secs(30));
        a
    }

    pub fn bin() -> &'static str {
        env!("CARGO_BIN_EXE_virtstream")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("agent-{}.log", self.runs))
    }

    pub fn start(&mut self) {
        self.runs += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(Self::bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("VIRTSTREAM_LOG", "virtstream=debug,info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// The sum of every `/metrics` series whose line starts with `name`
    /// (a label set may be part of it).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, m) = self.http("/metrics").unwrap();
        m.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum()
    }

    pub fn http(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let code = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default();
        Some((code, body))
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            if let Some((200, _)) = self.http("/readyz") {
                return;
            }
            if Instant::now() > end {
                panic!(
                    "agent not ready within {timeout:?}: {:?}\n--- agent log ---\n{}",
                    self.http("/readyz"),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The exit code if the agent has exited (None while running).
    pub fn try_exit(&mut self) -> Option<Option<i32>> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => {
                self.child = None;
                Some(st.code())
            }
            _ => None,
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe_kill(c.id(), libc::SIGTERM);
        c.wait().ok()?.code()
    }

    /// Subject filter for this agent's events.
    pub fn filter(&self) -> String {
        format!(
            "virt.events.v1.{}.>",
            virtstream::sinks::subject_token(&self.host_id)
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ({}) ---\n{}",
                self.log_path().display(),
                self.log()
            );
        }
        self.kill9();
    }
}

/// Checks the invariants every stream must hold for one host: host_seq
/// unique and contiguous from `first`, and seq contiguous from 1 per domain
/// in stream order.
pub fn assert_contiguous(msgs: &[Stored]) {
    let mut hs: Vec<u64> = msgs.iter().map(|m| m.event.host_seq).collect();
    hs.sort_unstable();
    let before = hs.len();
    hs.dedup();
    assert_eq!(hs.len(), before, "an event host_seq appears twice");
    let snaps = msgs
        .first()
        .map(|m| snapshot_seqs(&m.event.host_id))
        .unwrap_or_default();
    assert!(
        hs.iter().all(|h| !snaps.contains(h)),
        "a host_seq is both an event and a snapshot record"
    );
    hs.extend(snaps.iter().copied());
    hs.sort_unstable();
    let n = hs.len() as u64;
    assert_eq!(
        hs,
        (1..=n).collect::<Vec<_>>(),
        "events and snapshot records must cover host_seq 1..={n}, each once"
    );
    let mut per_domain: std::collections::HashMap<&str, u64> = Default::default();
    let mut per_subject: std::collections::HashMap<&str, u64> = Default::default();
    for m in msgs {
        let last_hs = per_subject.entry(m.subject.as_str()).or_insert(0);
        assert!(
            m.event.host_seq > *last_hs,
            "host_seq out of order on {}",
            m.subject
        );
        *last_hs = m.event.host_seq;
        if m.event.event.as_str() == "GAP" {
            assert_eq!(m.event.seq, 0);
            continue;
        }
        let s = per_domain.entry(m.event.domain.uuid.as_str()).or_insert(0);
        assert_eq!(
            m.event.seq,
            *s + 1,
            "seq of {} not contiguous",
            m.event.domain.name
        );
        *s += 1;
    }
}

/// The state an oracle event leaves a domain in (independent of the
/// agent's table), given the previous state.
pub fn expected_state(event: &str, prev: DomainState) -> DomainState {
    match event {
        "STARTED" | "RESUMED" => DomainState::RUNNING,
        "SUSPENDED" => DomainState::PAUSED,
        "STOPPED" => DomainState::SHUTOFF,
        "SHUTDOWN" => DomainState::SHUTDOWN,
        "DEFINED" | "UNDEFINED" | "REBOOT" => prev,
        other => panic!("unexpected oracle event {other}"),
    }
}

/// Compares one domain's messages with the oracle, event by event.
pub fn check_domain(
    oracle: &Oracle,
    msgs: &[Stored],
    name: &str,
    persistent_until_undefine: bool,
    memory_kib: i64,
) {
    let want = oracle.for_domain(name);
    let got: Vec<&Stored> = msgs
        .iter()
        .filter(|m| m.event.domain.name == name && m.event.origin == Origin::LIBVIRT)
        .collect();
    let got_pairs: Vec<(String, String)> = got
        .iter()
        .map(|m| (m.event.event.to_string(), m.event.detail.to_string()))
        .collect();
    let want_pairs: Vec<(String, String)> = want
        .iter()
        .map(|e| (e.event.clone(), e.detail.clone()))
        .collect();
    assert_eq!(
        got_pairs, want_pairs,
        "events of {name} differ from virsh event"
    );
    assert!(
        msgs.iter()
            .filter(|m| m.event.domain.name == name)
            .all(|m| m.event.origin == Origin::LIBVIRT),
        "no reconcile events expected for {name}"
    );
    let mut state = DomainState::SHUTOFF;
    let mut persistent = false;
    for (i, m) in got.iter().enumerate() {
        let e = &m.event;
        assert_eq!(e.seq, i as u64 + 1, "{name}: seq contiguous from 1");
        state = expected_state(e.event.as_str(), state);
        assert_eq!(
            e.state_after.state,
            state,
            "{name} #{}: state_after after {}/{}",
            i + 1,
            e.event,
            e.detail
        );
        match e.event.as_str() {
            "DEFINED" => persistent = true,
            "UNDEFINED" => persistent = false,
            _ if i == 0 => persistent = persistent_until_undefine,
            _ => {}
        }
        assert_eq!(
            e.persistent,
            persistent,
            "{name} #{}: persistent after {}",
            i + 1,
            e.event
        );
        // Enrichment comes from lookups, which fail once a fast script has
        // already removed the domain: then the event is published with what
        // is known. What is there must be right.
        assert!(
            e.vcpus.is_none_or(|v| v == 1),
            "{name} #{}: vcpus {:?}",
            i + 1,
            e.vcpus
        );
        assert!(
            e.memory_kib.is_none_or(|m| m == memory_kib),
            "{name} #{}: memory {:?}",
            i + 1,
            e.memory_kib
        );
        assert!(e
            .config_hash
            .as_deref()
            .is_none_or(|h| h.starts_with("sha256:") && h.len() == 71));
        if state != DomainState::SHUTOFF {
            assert!(
                e.domain.id.is_some(),
                "{name} #{}: running domains carry their id",
                i + 1
            );
        } else {
            assert_eq!(e.domain.id, None);
        }
        // Subject, message id and CloudEvents headers.
        assert!(m.subject.ends_with(&e.domain.uuid));
        let h: HashMap<&str, &str> = m
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if m.subject.starts_with("kafka:") {
            // Kafka: keyed by the domain UUID.
            assert!(!h.contains_key("Nats-Msg-Id"));
        } else {
            assert_eq!(h.get("Nats-Msg-Id"), Some(&e.event_id.as_str()));
        }
        assert_eq!(h.get("ce_id"), Some(&e.event_id.as_str()));
        assert_eq!(h.get("ce_specversion"), Some(&"1.0"));
        assert_eq!(h.get("ce_type"), Some(&"io.virtstream.domain.event.v1"));
        assert_eq!(h.get("ce_subject"), Some(&e.domain.uuid.as_str()));
        assert_eq!(
            h.get("ce_source").map(|s| s.to_string()),
            Some(format!("virtstream://{}", e.host_id))
        );
        assert!(h.contains_key("ce_time") && h.contains_key("virtstream-schema-fingerprint"));
        assert_eq!(h.get("content-type"), Some(&"application/avro"));
    }
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
