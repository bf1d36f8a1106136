//! The bus stage of the consumer pipeline: reads what agents wrote, as raw
//! [`Message`]s with their positions, first the snapshot stream/topics (so
//! rounds are known before the events that follow them), then the events
//! stream/topic. Decoding is left to the caller (see `consumer::read`), so
//! a tool that wants the bytes as written (replay) reads through here too.
//!
//! - NATS: `VIRT_SNAPSHOTS` in full (it keeps one message per subject),
//!   then `VIRT_EVENTS` from the start, a stream sequence or a time, to
//!   the end the stream had when reading began. Stream sequences are
//!   contiguous unless messages were deleted, so the events stream is a
//!   contiguous lane.
//! - Kafka: the two snapshot topics from the earliest offset, then the
//!   events topic from the earliest offset, given offsets, or the first
//!   record at or after a time (per partition; the broker's time index is
//!   not used). A partition's end is found by fetching until nothing new
//!   arrives (`bus::kafka::reader`), never from the high watermark.
//!   Each events partition is a contiguous lane (the topic is not
//!   compacted and the producer is not transactional).
//! - With a domain ([`ReadSpec::domain`]), only that domain's events: on
//!   NATS by subject, on Kafka from its partition (by key) unless offsets
//!   name the partitions.
//!
//! Invariants: every message read is handed on, nothing is skipped
//! silently (except what a domain or start time leaves out); the read
//! stops early only when the caller asks it to.

use std::borrow::Cow;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use rdkafka::message::{Headers as _, Message as _};

use super::record::{self, Headers, Lane, Position, Record, RecordError};
use super::registry::Resolver;
use crate::bus::kafka::reader::{self, Flow, ReadOptions, Start};
use crate::bus::kafka::{self, KafkaContext};
use crate::bus::wire::TOMBSTONE_HEADER;
use crate::codec;
use crate::config::{KafkaConfig, NatsConfig};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {message} (is nats-server running?)")]
    NatsConnect { url: String, message: String },
    #[error("JetStream: {0}")]
    Nats(String),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error(transparent)]
    Registry(#[from] crate::bus::registry::RegistryError),
}

/// Where the events are read from (snapshots are always read in full).
#[derive(Debug, Clone, Default)]
pub enum StartAt {
    #[default]
    Start,
    /// NATS: this stream sequence.
    StreamSeq(u64),
    /// Kafka: these partitions from these offsets (others not read).
    Offsets(Vec<(i32, i64)>),
    /// The first message at or after this time.
    Time(time::OffsetDateTime),
}

/// What is read.
#[derive(Debug, Clone, Copy, Default)]
pub enum Scope<'a> {
    /// Snapshots, then events, each events lane kept whole after the
    /// start point (`state`, `usage`, `audit`): a NATS stream idle with
    /// messages still pending is an error, and with a start time each
    /// Kafka partition is read from its first record at or after it.
    #[default]
    Fleet,
    /// Only the events, optionally of one domain (`replay`): an idle NATS
    /// stream ends the read, errors name the stream only when it is
    /// missing, and every Kafka record stamped before a start time is
    /// left out.
    Events { domain: Option<&'a str> },
}

impl Scope<'_> {
    fn domain(&self) -> Option<&str> {
        match self {
            Scope::Fleet => None,
            Scope::Events { domain } => *domain,
        }
    }
}

/// One message as read.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub pos: &'a Position,
    pub payload: &'a [u8],
    pub headers: Headers<'a>,
    /// The NATS subject (`None` on Kafka).
    pub subject: Option<&'a str>,
    /// Whether its lane's positions are contiguous when nothing is lost.
    pub contiguous: bool,
    /// Resolves schema-registry ids (when `[schema_registry]` is set).
    pub registry: Option<&'a Resolver>,
}

impl<'a> Message<'a> {
    /// The body in a framing the decoders read: a registry-framed payload
    /// re-framed as single-object (its datum unchanged), any other as is.
    pub fn body(&self) -> Result<Cow<'a, [u8]>, RecordError> {
        match (codec::confluent_id(self.payload), self.registry) {
            (Some(_), Some(r)) => r
                .single_object(self.payload)
                .map(Cow::Owned)
                .map_err(RecordError::Registry),
            _ => Ok(Cow::Borrowed(self.payload)),
        }
    }

    /// The record it carries.
    pub fn decode(&self) -> Result<Record, RecordError> {
        record::decode(&self.body()?, self.headers).map(|body| Record {
            body,
            pos: self.pos.clone(),
        })
    }
}

/// What a read hands on, in the order read.
#[derive(Debug, Clone, Copy)]
pub enum Item<'a> {
    Message(Message<'a>),
    /// The last position a contiguous lane had when reading began (NATS),
    /// and when it was stored: positions read short of it were lost.
    LaneEnd {
        lane: &'a Lane,
        last: u64,
        time_us: Option<i64>,
    },
}

/// What the caller of a read says after each item: go on, or stop the
/// whole read (what was read so far stands).
pub type Next = ControlFlow<()>;

/// Reads the snapshot stream (with [`Scope::Fleet`]), then the events
/// stream, from NATS.
pub async fn read_nats(
    cfg: &NatsConfig,
    from: &StartAt,
    scope: Scope<'_>,
    registry: &mut Option<Resolver>,
    on_item: &mut (dyn FnMut(Item<'_>) -> Next + Send),
) -> Result<(), BusError> {
    let client = crate::bus::nats::connect_once(cfg, "virtstream-reader")
        .await
        .map_err(|e| BusError::NatsConnect {
            url: cfg.url.clone(),
            message: e.to_string(),
        })?;
    let js = jetstream::new(client);
    let fleet = matches!(scope, Scope::Fleet);
    if fleet {
        let snaps = NatsRead {
            name: &cfg.snapshots_stream,
            deliver_policy: DeliverPolicy::All,
            contiguous: false,
            filter_subject: String::new(),
            strict: true,
        };
        if snaps.read(&js, registry, on_item).await?.is_break() {
            return Ok(());
        }
    }
    let deliver_policy = match from {
        StartAt::Start => DeliverPolicy::All,
        StartAt::StreamSeq(n) => DeliverPolicy::ByStartSequence {
            start_sequence: (*n).max(1),
        },
        StartAt::Time(t) => DeliverPolicy::ByStartTime { start_time: *t },
        StartAt::Offsets(_) if fleet => {
            return Err(BusError::Nats(
                "partition offsets are for Kafka; use a stream sequence".into(),
            ))
        }
        StartAt::Offsets(_) => DeliverPolicy::All,
    };
    let filter_subject = match (fleet, scope.domain()) {
        (true, _) => String::new(),
        (false, Some(uuid)) => format!("{}.*.{uuid}", cfg.events_subject_prefix),
        (false, None) => format!("{}.>", cfg.events_subject_prefix),
    };
    let events = NatsRead {
        name: &cfg.events_stream,
        deliver_policy,
        contiguous: true,
        filter_subject,
        strict: fleet,
    };
    events.read(&js, registry, on_item).await.map(|_| ())
}

/// One NATS stream to read, to the end it had when reading began.
struct NatsRead<'a> {
    name: &'a str,
    deliver_policy: DeliverPolicy,
    contiguous: bool,
    filter_subject: String,
    /// See [`Scope::Fleet`]; otherwise as [`Scope::Events`].
    strict: bool,
}

impl NatsRead<'_> {
    async fn read(
        self,
        js: &jetstream::Context,
        registry: &mut Option<Resolver>,
        on_item: &mut (dyn FnMut(Item<'_>) -> Next + Send),
    ) -> Result<Next, BusError> {
        let name = self.name;
        let missing = |e: &dyn std::fmt::Display| BusError::Nats(format!("stream {name}: {e}"));
        let api = |e: &dyn std::fmt::Display| match self.strict {
            true => missing(e),
            false => BusError::Nats(e.to_string()),
        };
        let mut stream = js.get_stream(name).await.map_err(|e| missing(&e))?;
        let (messages, last, last_time) = {
            let info = stream.info().await.map_err(|e| api(&e))?;
            (
                info.state.messages,
                info.state.last_sequence,
                micros(info.state.last_timestamp),
            )
        };
        let source: Arc<str> = Arc::from(name);
        let lane = Lane {
            source: source.clone(),
            partition: None,
        };
        let end = |on_item: &mut (dyn FnMut(Item<'_>) -> Next + Send)| {
            if self.contiguous && self.strict && last > 0 {
                on_item(Item::LaneEnd {
                    lane: &lane,
                    last,
                    time_us: Some(last_time),
                })
            } else {
                Next::Continue(())
            }
        };
        if self.strict && messages == 0 {
            return Ok(end(on_item));
        }
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: self.deliver_policy,
                filter_subject: self.filter_subject.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| api(&e))?;
        if last == 0 {
            return Ok(Next::Continue(()));
        }
        let mut messages = consumer.messages().await.map_err(|e| api(&e))?;
        let mut pending_after_last = None;
        loop {
            // A start point past every message gives nothing: stop when idle.
            let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
            let msg = match next {
                Err(_) | Ok(None) => match pending_after_last {
                    Some(p) if p > 0 && self.strict => {
                        return Err(BusError::Nats(format!(
                            "stream {name}: no message for 2 s with {p} still pending; the read is incomplete"
                        )))
                    }
                    _ => break,
                },
                Ok(Some(Err(e))) => return Err(api(&e)),
                Ok(Some(Ok(m))) => m,
            };
            let info = msg.info().map_err(|e| api(&e))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            pending_after_last = Some(pending);
            let pos = Position {
                source: source.clone(),
                partition: None,
                offset: seq,
                time_us: Some(micros(info.published)),
            };
            let h = msg.headers.as_ref();
            let get = |k: &str| h.and_then(|h| h.get(k)).map(|v| v.as_str());
            let headers = Headers {
                tombstone: get(TOMBSTONE_HEADER) == Some("true"),
                ce_id: get("ce_id"),
                ce_subject: get("ce_subject"),
            };
            if let Some(r) = registry.as_mut() {
                if let Some(id) = r.unknown(&msg.payload) {
                    r.learn(id).await?;
                }
            }
            let it = Item::Message(Message {
                pos: &pos,
                payload: &msg.payload,
                headers,
                subject: Some(msg.subject.as_str()),
                contiguous: self.contiguous,
                registry: registry.as_ref(),
            });
            if on_item(it).is_break() {
                return Ok(Next::Break(()));
            }
            if pending == 0 || seq >= last {
                break;
            }
        }
        Ok(end(on_item))
    }
}

fn micros(t: time::OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

/// Reads the snapshot topics (with [`Scope::Fleet`]), then the events
/// topic, from Kafka (blocking: call it from a thread of its own).
pub fn read_kafka(
    cfg: &KafkaConfig,
    from: &StartAt,
    scope: Scope<'_>,
    registry: &mut Option<Resolver>,
    on_item: &mut dyn FnMut(Item<'_>) -> Next,
) -> Result<(), BusError> {
    let kerr = |e: kafka::KafkaError| BusError::Kafka(e.to_string());
    let base = kafka::client_config(cfg, "virtstream-reader").map_err(kerr)?;
    let fleet = matches!(scope, Scope::Fleet);
    if fleet {
        for topic in [&cfg.host_snapshots_topic, &cfg.domain_snapshots_topic] {
            let n = partitions(cfg, &base, topic)?;
            let read = KafkaRead {
                topic,
                starts: (0..n).map(|p| (p, Start::Earliest)).collect(),
                since_ms: None,
                contiguous: false,
                scope,
            };
            if read.read(cfg, &base, registry, on_item)?.is_break() {
                return Ok(());
            }
        }
    }
    let topic = &cfg.events_topic;
    let n = partitions(cfg, &base, topic)?;
    // All of a domain's messages are in one partition.
    let all = || -> Vec<(i32, Start)> {
        match scope.domain() {
            Some(uuid) => vec![(kafka::partition_for(uuid, n), Start::Earliest)],
            None => (0..n).map(|p| (p, Start::Earliest)).collect(),
        }
    };
    let (starts, since_ms) = match from {
        StartAt::Start => (all(), None),
        StartAt::Time(t) => (all(), Some((t.unix_timestamp_nanos() / 1_000_000) as i64)),
        StartAt::Offsets(offsets) => {
            let mut v = Vec::new();
            for (p, o) in offsets {
                if !(0..n).contains(p) {
                    return Err(BusError::Kafka(format!(
                        "topic {topic} has partitions 0..{}; there is no partition {p}",
                        n - 1
                    )));
                }
                v.push((*p, Start::At(*o)));
            }
            (v, None)
        }
        StartAt::StreamSeq(_) if fleet => {
            return Err(BusError::Kafka(
                "stream sequences are for NATS; use PARTITION:OFFSET".into(),
            ))
        }
        StartAt::StreamSeq(_) => (all(), None),
    };
    let read = KafkaRead {
        topic,
        starts,
        since_ms,
        contiguous: true,
        scope,
    };
    read.read(cfg, &base, registry, on_item).map(|_| ())
}

fn partitions(
    cfg: &KafkaConfig,
    base: &rdkafka::ClientConfig,
    topic: &str,
) -> Result<i32, BusError> {
    let probe: rdkafka::consumer::BaseConsumer<KafkaContext> = base
        .create_with_context(KafkaContext::default())
        .map_err(|e| BusError::Kafka(e.to_string()))?;
    let md =
        rdkafka::consumer::Consumer::fetch_metadata(&probe, Some(topic), kafka::REQUEST_TIMEOUT)
            .map_err(|e| {
                BusError::Kafka(format!(
                    "metadata from {}: {e} (is the broker running?)",
                    cfg.brokers.0.join(",")
                ))
            })?;
    let n = md
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0);
    if n == 0 {
        return Err(BusError::Kafka(format!("topic {topic} does not exist")));
    }
    Ok(n)
}

/// One Kafka topic to read, each partition to its end.
struct KafkaRead<'a> {
    topic: &'a str,
    starts: Vec<(i32, Start)>,
    since_ms: Option<i64>,
    contiguous: bool,
    scope: Scope<'a>,
}

impl KafkaRead<'_> {
    fn read(
        self,
        cfg: &KafkaConfig,
        base: &rdkafka::ClientConfig,
        registry: &mut Option<Resolver>,
        on_item: &mut dyn FnMut(Item<'_>) -> Next,
    ) -> Result<Next, BusError> {
        let (topic, since_ms, scope) = (self.topic, self.since_ms, self.scope);
        let source: Arc<str> = Arc::from(topic);
        let mut stopped = false;
        let mut failed = None;
        // Fleet: with a start time, each partition is read from its first
        // record at or after it; everything after that is kept, so clock
        // differences between hosts cannot open false holes.
        let mut begun: std::collections::HashSet<i32> = std::collections::HashSet::new();
        reader::read_to_end(
            base,
            ReadOptions {
                topic,
                starts: self.starts,
                idle: cfg.readback_idle.0,
                max_clock_skew: cfg.readback_max_clock_skew.0,
                not_before_ms: None,
                stall: Duration::from_secs(30),
                stop: None,
                lookback: reader::DEFAULT_LOOKBACK,
            },
            |m| {
                if stopped {
                    return Flow::PartitionDone;
                }
                let p = m.partition();
                if let Some(uuid) = scope.domain() {
                    if m.key() != Some(uuid.as_bytes()) {
                        return Flow::Continue;
                    }
                }
                if let Some(since) = since_ms {
                    let before = m.timestamp().to_millis().is_some_and(|t| t < since);
                    match scope {
                        Scope::Events { .. } if before => return Flow::Continue,
                        Scope::Events { .. } => {}
                        Scope::Fleet if begun.contains(&p) => {}
                        Scope::Fleet if before => return Flow::Continue,
                        Scope::Fleet => {
                            begun.insert(p);
                        }
                    }
                }
                let (mut tomb, mut ce_id, mut ce_subject) = (false, None, None);
                if let Some(hs) = m.headers() {
                    for h in hs.iter() {
                        let v = h.value.and_then(|v| std::str::from_utf8(v).ok());
                        match h.key {
                            TOMBSTONE_HEADER => tomb = v == Some("true"),
                            "ce_id" => ce_id = v,
                            "ce_subject" => ce_subject = v,
                            _ => {}
                        }
                    }
                }
                let pos = Position {
                    source: source.clone(),
                    partition: Some(p),
                    offset: m.offset().max(0) as u64,
                    time_us: m.timestamp().to_millis().map(|t| t.saturating_mul(1000)),
                };
                let headers = Headers {
                    tombstone: tomb || m.payload().is_none(),
                    ce_id,
                    ce_subject,
                };
                let payload = m.payload().unwrap_or_default();
                if let Some(r) = registry.as_mut() {
                    if let Some(id) = r.unknown(payload) {
                        if let Err(e) = r.learn_blocking(id) {
                            failed = Some(e);
                            stopped = true;
                            return Flow::PartitionDone;
                        }
                    }
                }
                let it = Item::Message(Message {
                    pos: &pos,
                    payload,
                    headers,
                    subject: None,
                    contiguous: self.contiguous,
                    registry: registry.as_ref(),
                });
                if on_item(it).is_break() {
                    stopped = true;
                    return Flow::PartitionDone;
                }
                Flow::Continue
            },
        )
        .map_err(|e| BusError::Kafka(e.to_string()))?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        Ok(if stopped {
            Next::Break(())
        } else {
            Next::Continue(())
        })
    }
}
