//! Reads what agents wrote from a bus, as [`Record`]s with their positions:
//! first the snapshot stream/topics (so rounds are known before the events
//! that follow them), then the events stream/topic.
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
//!
//! Invariants: every message read is handed on, decoded or with the reason
//! it could not be; nothing is skipped silently.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use rdkafka::message::{Headers as _, Message};

use super::record::{self, Headers, Lane, Position, Record, RecordError};
use crate::bus::kafka::reader::{self, Flow, ReadOptions, Start};
use crate::bus::kafka::{self, KafkaContext};
use crate::bus::wire::TOMBSTONE_HEADER;
use crate::config::{KafkaConfig, NatsConfig};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {message} (is nats-server running?)")]
    NatsConnect { url: String, message: String },
    #[error("JetStream: {0}")]
    Nats(String),
    #[error("Kafka: {0}")]
    Kafka(String),
}

/// Where the events are read from (snapshots are always read in full).
#[derive(Debug, Clone, Default)]
pub enum From {
    #[default]
    Start,
    /// NATS: this stream sequence.
    StreamSeq(u64),
    /// Kafka: these partitions from these offsets (others not read).
    Offsets(Vec<(i32, i64)>),
    /// The first message at or after this time.
    Time(time::OffsetDateTime),
}

/// One message read. Items are handed on one at a time and never stored,
/// so the size difference between the variants costs nothing.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Item {
    /// A decoded record; `contiguous` tells whether its lane's positions
    /// are contiguous when nothing is lost (see `rebuild::Fleet::apply`).
    Record { record: Record, contiguous: bool },
    /// A message that is not a record of a shipped schema.
    Undecodable {
        pos: Position,
        error: RecordError,
        contiguous: bool,
    },
    /// The last position a contiguous lane had when reading began (NATS),
    /// and when it was stored: positions read short of it were lost.
    LaneEnd {
        lane: Lane,
        last: u64,
        time_us: Option<i64>,
    },
}

/// Totals of one read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadTotals {
    pub events: u64,
    pub snapshots: u64,
    pub undecodable: u64,
}

fn item(body: &[u8], headers: Headers<'_>, pos: Position, contiguous: bool) -> Item {
    match record::decode(body, headers) {
        Ok(body) => Item::Record {
            record: Record { body, pos },
            contiguous,
        },
        Err(error) => Item::Undecodable {
            pos,
            error,
            contiguous,
        },
    }
}

/// Reads the snapshot stream, then the events stream, from NATS.
pub async fn read_nats(
    cfg: &NatsConfig,
    from: &From,
    on_item: &mut (dyn FnMut(Item) + Send),
) -> Result<ReadTotals, BusError> {
    let client = crate::bus::nats::connect_once(cfg, "virtstream-reader")
        .await
        .map_err(|e| BusError::NatsConnect {
            url: cfg.url.clone(),
            message: e.to_string(),
        })?;
    let js = jetstream::new(client);
    let mut totals = ReadTotals::default();
    let snaps = read_stream(
        &js,
        &cfg.snapshots_stream,
        DeliverPolicy::All,
        false,
        on_item,
    )
    .await?;
    totals.snapshots = snaps.0;
    totals.undecodable += snaps.1;
    let policy = match from {
        From::Start => DeliverPolicy::All,
        From::StreamSeq(n) => DeliverPolicy::ByStartSequence {
            start_sequence: (*n).max(1),
        },
        From::Time(t) => DeliverPolicy::ByStartTime { start_time: *t },
        From::Offsets(_) => {
            return Err(BusError::Nats(
                "partition offsets are for Kafka; use a stream sequence".into(),
            ))
        }
    };
    let events = read_stream(&js, &cfg.events_stream, policy, true, on_item).await?;
    totals.events = events.0;
    totals.undecodable += events.1;
    Ok(totals)
}

/// Reads one stream to the end it had when reading began.
async fn read_stream(
    js: &jetstream::Context,
    name: &str,
    deliver_policy: DeliverPolicy,
    contiguous: bool,
    on_item: &mut (dyn FnMut(Item) + Send),
) -> Result<(u64, u64), BusError> {
    let api = |e: &dyn std::fmt::Display| BusError::Nats(format!("stream {name}: {e}"));
    let mut stream = js.get_stream(name).await.map_err(|e| api(&e))?;
    let (messages, last, last_time) = {
        let info = stream.info().await.map_err(|e| api(&e))?;
        (
            info.state.messages,
            info.state.last_sequence,
            micros(info.state.last_timestamp),
        )
    };
    let source: Arc<str> = Arc::from(name);
    let end = |on_item: &mut (dyn FnMut(Item) + Send)| {
        if contiguous && last > 0 {
            on_item(Item::LaneEnd {
                lane: Lane {
                    source: source.clone(),
                    partition: None,
                },
                last,
                time_us: Some(last_time),
            });
        }
    };
    if messages == 0 {
        end(on_item);
        return Ok((0, 0));
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| api(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| api(&e))?;
    let (mut read, mut bad) = (0u64, 0u64);
    let mut pending_after_last = None;
    loop {
        // A start point past every message gives nothing: stop when idle.
        let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
        let msg = match next {
            Err(_) | Ok(None) => match pending_after_last {
                Some(p) if p > 0 => {
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
        let it = item(&msg.payload, headers, pos, contiguous);
        if matches!(it, Item::Undecodable { .. }) {
            bad += 1;
        } else {
            read += 1;
        }
        on_item(it);
        if pending == 0 || seq >= last {
            break;
        }
    }
    end(on_item);
    Ok((read, bad))
}

fn micros(t: time::OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

/// Reads the snapshot topics, then the events topic, from Kafka
/// (blocking: call it from a thread of its own).
pub fn read_kafka(
    cfg: &KafkaConfig,
    from: &From,
    on_item: &mut dyn FnMut(Item),
) -> Result<ReadTotals, BusError> {
    let kerr = |e: kafka::KafkaError| BusError::Kafka(e.to_string());
    let base = kafka::client_config(cfg, "virtstream-reader").map_err(kerr)?;
    let mut totals = ReadTotals::default();
    for topic in [&cfg.host_snapshots_topic, &cfg.domain_snapshots_topic] {
        let n = partitions(cfg, &base, topic)?;
        let starts = (0..n).map(|p| (p, Start::Earliest)).collect();
        let (read, bad) = read_topic(cfg, &base, topic, starts, None, false, on_item)?;
        totals.snapshots += read;
        totals.undecodable += bad;
    }
    let topic = &cfg.events_topic;
    let n = partitions(cfg, &base, topic)?;
    let (starts, since_ms) = match from {
        From::Start => ((0..n).map(|p| (p, Start::Earliest)).collect(), None),
        From::Time(t) => (
            (0..n).map(|p| (p, Start::Earliest)).collect(),
            Some((t.unix_timestamp_nanos() / 1_000_000) as i64),
        ),
        From::Offsets(offsets) => {
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
        From::StreamSeq(_) => {
            return Err(BusError::Kafka(
                "stream sequences are for NATS; use PARTITION:OFFSET".into(),
            ))
        }
    };
    let (read, bad) = read_topic(cfg, &base, topic, starts, since_ms, true, on_item)?;
    totals.events = read;
    totals.undecodable += bad;
    Ok(totals)
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

fn read_topic(
    cfg: &KafkaConfig,
    base: &rdkafka::ClientConfig,
    topic: &str,
    starts: Vec<(i32, Start)>,
    since_ms: Option<i64>,
    contiguous: bool,
    on_item: &mut dyn FnMut(Item),
) -> Result<(u64, u64), BusError> {
    let source: Arc<str> = Arc::from(topic);
    let (mut read, mut bad) = (0u64, 0u64);
    // With a start time, each partition is read from its first record at
    // or after it; everything after that is kept, so clock differences
    // between hosts cannot open false holes.
    let mut begun: std::collections::HashSet<i32> = std::collections::HashSet::new();
    reader::read_to_end(
        base,
        ReadOptions {
            topic,
            starts,
            idle: cfg.readback_idle.0,
            max_clock_skew: cfg.readback_max_clock_skew.0,
            not_before_ms: None,
            stall: Duration::from_secs(30),
            stop: None,
            lookback: reader::DEFAULT_LOOKBACK,
        },
        |m| {
            let p = m.partition();
            if let Some(since) = since_ms {
                if !begun.contains(&p) {
                    if m.timestamp().to_millis().is_some_and(|t| t < since) {
                        return Flow::Continue;
                    }
                    begun.insert(p);
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
            let it = item(m.payload().unwrap_or_default(), headers, pos, contiguous);
            if matches!(it, Item::Undecodable { .. }) {
                bad += 1;
            } else {
                read += 1;
            }
            on_item(it);
            Flow::Continue
        },
    )
    .map_err(|e| BusError::Kafka(e.to_string()))?;
    Ok((read, bad))
}
