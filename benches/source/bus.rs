//! The bus as the benchmark reads it. NATS: JetStream per-subject counts
//! polled while a run drains, then the agent's messages decoded with
//! virtstream's codec to prove that every load event is there. Kafka: a
//! consumer reading the run's topic from its start for the whole run
//! (decoding the agent's records as they come): tansu's high watermarks
//! and offsets undercount (a watermark below the records a consumer
//! reads), so counts come from the records themselves.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::TryStreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use virtstream::model::{DomainEvent, Origin};

use crate::common;

/// Where the bridge writes (created here, like an operator would).
pub const BRIDGE_STREAM: &str = "BRIDGE";
/// The agent's default (docs/contract.md §3).
pub const AGENT_STREAM: &str = "VIRT_EVENTS";
/// As the agent's test config (`common::kafka_section`) asks.
const PARTITIONS: i32 = 4;

pub struct Bus {
    rt: tokio::runtime::Runtime,
    js: jetstream::Context,
    pub nats_url: String,
    pub bootstrap: String,
    admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
}

/// One sink of one run: where its messages land.
pub enum Place {
    Nats {
        stream: &'static str,
        filter: String,
    },
    Kafka(KafkaTap),
}

impl Place {
    pub fn name(&self) -> &'static str {
        match self {
            Place::Nats { .. } => "nats",
            Place::Kafka(_) => "kafka",
        }
    }
}

/// The agent's messages of one run, decoded.
#[derive(Default, Debug, Clone)]
pub struct Tally {
    /// SUSPENDED/RESUMED events with origin LIBVIRT: the load's.
    pub load_events: u64,
    /// host_seqs of those, to tell a duplicate from an extra event.
    seqs: HashSet<u64>,
    /// Gap markers by cause.
    pub gaps: BTreeMap<String, u64>,
    /// Everything else (reconcile events, other lifecycle events).
    pub other: u64,
}

impl Tally {
    fn add(&mut self, e: &DomainEvent) {
        match (e.event.as_str(), e.origin == Origin::LIBVIRT) {
            ("SUSPENDED" | "RESUMED", true) => {
                self.load_events += 1;
                self.seqs.insert(e.host_seq);
            }
            ("GAP", _) => *self.gaps.entry(e.detail.to_string()).or_default() += 1,
            _ => self.other += 1,
        }
    }

    /// Load events read more than once (same host_seq).
    pub fn duplicates(&self) -> u64 {
        self.load_events - self.seqs.len() as u64
    }

    /// Distinct load events.
    pub fn distinct(&self) -> u64 {
        self.seqs.len() as u64
    }
}

/// Reads a Kafka topic from its start on a thread of its own until
/// dropped: the agent's records of one host decoded into a [`Tally`], or
/// (the bridge's) every record counted as a load event.
pub struct KafkaTap {
    decode: bool,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KafkaTap {
    fn start(bootstrap: &str, topic: &str, agent_host: Option<String>) -> KafkaTap {
        use rdkafka::message::{Headers, Message};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "bench")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            // Drain times are read from here: answer fetches quickly.
            .set("fetch.wait.max.ms", "10")
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(0))
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let decode = agent_host.is_some();
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, st) = (tally.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let Some(host) = &agent_host else {
                    t.lock().unwrap().load_events += 1;
                    continue;
                };
                let ours = m.headers().is_some_and(|h| {
                    h.iter().any(|h| {
                        h.key == "ce_id"
                            && h.value
                                .and_then(|v| std::str::from_utf8(v).ok())
                                .and_then(virtstream::model::parse_event_id)
                                .is_some_and(|(h, _, _)| h == host)
                    })
                });
                if ours {
                    let e = virtstream::codec::decode_event(m.payload().unwrap_or_default())
                        .expect("an agent record decodes");
                    t.lock().unwrap().add(&e);
                }
            }
        });
        KafkaTap {
            decode,
            tally,
            stop,
            thread: Some(thread),
        }
    }

    pub fn tally(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }
}

impl Drop for KafkaTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Bus {
    /// Connects to both brokers and creates the bridge's stream.
    pub fn new(nats_url: String, bootstrap: String) -> Bus {
        let rt = common::rt();
        let js = rt.block_on(async {
            let client = async_nats::connect(nats_url.as_str()).await.unwrap();
            let js = jetstream::new(client);
            js.get_or_create_stream(jetstream::stream::Config {
                name: BRIDGE_STREAM.into(),
                subjects: vec!["bridge.>".into()],
                ..Default::default()
            })
            .await
            .unwrap();
            js
        });
        let admin = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .unwrap();
        Bus {
            rt,
            js,
            nats_url,
            bootstrap,
            admin,
        }
    }

    /// Creates a topic for the bridge (as many partitions as the agent's).
    pub fn create_topic(&self, topic: &str) {
        let created = self
            .rt
            .block_on(self.admin.create_topics(
                &[rdkafka::admin::NewTopic::new(
                    topic,
                    PARTITIONS,
                    rdkafka::admin::TopicReplication::Fixed(1),
                )],
                &rdkafka::admin::AdminOptions::new(),
            ))
            .expect("create a topic");
        for r in created {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
    }

    /// A NATS place (counts are per subject filter: a run's subjects are
    /// its own).
    pub fn nats(&self, stream: &'static str, filter: String) -> Place {
        Place::Nats { stream, filter }
    }

    /// A Kafka place: `topic` read from its start; with `agent_host`, that
    /// host's records are decoded and only its load events count.
    pub fn kafka(&self, topic: &str, agent_host: Option<&str>) -> Place {
        Place::Kafka(KafkaTap::start(
            &self.bootstrap,
            topic,
            agent_host.map(String::from),
        ))
    }

    /// Messages in `place` (Kafka: load events, distinct for the agent).
    pub fn count(&self, place: &Place) -> u64 {
        match place {
            Place::Nats { stream, filter } => self.rt.block_on(async {
                let Ok(s) = self.js.get_stream_no_info(*stream).await else {
                    return 0;
                };
                let Ok(mut info) = s.info_with_subjects(filter).await else {
                    return 0;
                };
                let mut n = 0u64;
                while let Ok(Some((_, c))) = info.try_next().await {
                    n += c as u64;
                }
                n
            }),
            Place::Kafka(tap) if tap.decode => tap.tally().distinct(),
            Place::Kafka(tap) => tap.tally().load_events,
        }
    }

    /// The agent's messages in `place`, decoded.
    pub fn tally(&self, place: &Place) -> Tally {
        match place {
            Place::Nats { stream, filter } => {
                let mut t = Tally::default();
                for m in common::fetch(&self.nats_url, stream, filter) {
                    t.add(&m.event);
                }
                t
            }
            Place::Kafka(tap) => tap.tally(),
        }
    }
}
