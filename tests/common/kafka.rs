//! The tansu Kafka-protocol broker on a random port with in-memory
//! storage, killed on drop; reading topics back.
//!
//! Invariants:
//! - the broker listens on 127.0.0.1 only; a paused (SIGSTOP) broker is
//!   resumed before it is killed;
//! - topics are read back with the agent's own reader, to the end of
//!   every partition, never relying on the high watermark.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::records::{poll_until, Stored};
use super::{free_port, unsafe_kill, wait_port};

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
    use virtstream::bus::kafka::reader::{read_to_end, Flow, ReadOptions, Start};
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
