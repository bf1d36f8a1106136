//! `virtstream replay`: reads the events stream (NATS) or topic (Kafka)
//! from a position or a time, optionally for one domain, and writes each
//! message decoded as one JSON line: all record fields plus where it was
//! (`stream_seq` and `subject` on NATS; `topic`, `partition` and `offset`
//! on Kafka). On NATS it stops at the end of the stream as it was when
//! replay began; on Kafka when fetches come back empty (the broker's high
//! watermark is not trusted, see `bus::kafka::reader`).
//!
//! Invariants: a message that cannot be decoded is reported on stderr with
//! its stream sequence and the reason, never silently skipped, and never
//! stops the replay; the count of such messages is returned.

use std::io::Write;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;

use crate::bus::kafka::reader::{self, Flow, ReadOptions, Start};
use crate::bus::kafka::{self, KafkaContext};
use crate::codec;
use crate::config::{KafkaConfig, NatsConfig};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot connect to NATS at {url}: {message} (is nats-server running?)")]
    Connect { url: String, message: String },
    #[error("JetStream: {0}")]
    Api(String),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

/// Where replay starts.
#[derive(Debug, Clone, Copy)]
pub enum From {
    Start,
    StreamSeq(u64),
    Time(time::OffsetDateTime),
}

/// Totals of one replay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayStats {
    pub decoded: u64,
    pub undecodable: u64,
}

/// Replays the events stream to `out`.
pub async fn replay_nats(
    cfg: &NatsConfig,
    from: From,
    domain: Option<&str>,
    out: &mut (dyn Write + Send),
) -> Result<ReplayStats, ReplayError> {
    let client = crate::bus::nats::connect_once(cfg, "virtstream-replay")
        .await
        .map_err(|e| ReplayError::Connect {
            url: cfg.url.clone(),
            message: e.to_string(),
        })?;
    let js = jetstream::new(client);
    let mut stream = js
        .get_stream(&cfg.events_stream)
        .await
        .map_err(|e| ReplayError::Api(format!("stream {}: {e}", cfg.events_stream)))?;
    let last = stream
        .info()
        .await
        .map_err(|e| ReplayError::Api(e.to_string()))?
        .state
        .last_sequence;
    let filter_subject = match domain {
        Some(uuid) => format!("{}.*.{uuid}", cfg.events_subject_prefix),
        None => format!("{}.>", cfg.events_subject_prefix),
    };
    let deliver_policy = match from {
        From::Start => DeliverPolicy::All,
        From::StreamSeq(n) => DeliverPolicy::ByStartSequence {
            start_sequence: n.max(1),
        },
        From::Time(t) => DeliverPolicy::ByStartTime { start_time: t },
    };
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| ReplayError::Api(e.to_string()))?;
    let mut stats = ReplayStats::default();
    if last == 0 {
        return Ok(stats);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| ReplayError::Api(e.to_string()))?;
    loop {
        // An idle stream past `last` (or a filter matching nothing after
        // the start point) ends the replay.
        let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
        let msg = match next {
            Err(_) | Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ReplayError::Api(e.to_string())),
            Ok(Some(Ok(m))) => m,
        };
        let info = msg.info().map_err(|e| ReplayError::Api(e.to_string()))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        match decode_body(&msg.payload) {
            Ok(mut json) => {
                if let Some(obj) = json.as_object_mut() {
                    obj.insert("stream_seq".into(), seq.into());
                    obj.insert("subject".into(), msg.subject.to_string().into());
                }
                writeln!(out, "{json}")?;
                stats.decoded += 1;
            }
            Err(e) => {
                eprintln!("stream_seq {seq} ({}): cannot decode: {e}", msg.subject);
                stats.undecodable += 1;
            }
        }
        if pending == 0 || seq >= last {
            break;
        }
    }
    out.flush()?;
    Ok(stats)
}

/// Decodes a message body: Avro single-object encoding, or the opt-in JSON.
fn decode_body(body: &[u8]) -> Result<serde_json::Value, String> {
    if body.starts_with(&codec::SINGLE_OBJECT_MAGIC) {
        return codec::decode_json(body)
            .map(|(_, v)| v)
            .map_err(|e| e.to_string());
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        _ => Err("neither Avro single-object encoded nor a JSON object".into()),
    }
}

/// Where a Kafka replay starts.
#[derive(Debug, Clone, Copy)]
pub enum KafkaFrom {
    /// Every partition from its first retained record.
    Start,
    /// One partition from this offset.
    Offset { partition: i32, offset: i64 },
    /// Records whose timestamp is at or after this time. Brokers' time
    /// index (ListOffsets by time) is not trusted, so this reads from the
    /// start of each partition and filters.
    Time(time::OffsetDateTime),
}

/// Replays the Kafka events topic to `out` (blocking).
pub fn replay_kafka(
    cfg: &KafkaConfig,
    from: KafkaFrom,
    domain: Option<&str>,
    out: &mut dyn Write,
) -> Result<ReplayStats, ReplayError> {
    let kerr = |e: kafka::KafkaError| ReplayError::Kafka(e.to_string());
    let base = kafka::client_config(cfg, "virtstream-replay").map_err(kerr)?;
    let probe: rdkafka::consumer::BaseConsumer<KafkaContext> = base
        .create_with_context(KafkaContext::default())
        .map_err(|e| ReplayError::Kafka(e.to_string()))?;
    let md = rdkafka::consumer::Consumer::fetch_metadata(
        &probe,
        Some(&cfg.events_topic),
        kafka::REQUEST_TIMEOUT,
    )
    .map_err(|e| {
        ReplayError::Kafka(format!(
            "metadata from {}: {e} (is the broker running?)",
            cfg.brokers.0.join(",")
        ))
    })?;
    drop(probe);
    let partitions = md
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0);
    if partitions == 0 {
        return Err(ReplayError::Kafka(format!(
            "topic {} does not exist",
            cfg.events_topic
        )));
    }
    let (starts, since_ms) = match from {
        KafkaFrom::Offset { partition, offset } => {
            if !(0..partitions).contains(&partition) {
                return Err(ReplayError::Kafka(format!(
                    "topic {} has partitions 0..{}; there is no partition {partition}",
                    cfg.events_topic,
                    partitions - 1
                )));
            }
            (vec![(partition, Start::At(offset))], None)
        }
        KafkaFrom::Start | KafkaFrom::Time(_) => {
            let parts: Vec<i32> = match domain {
                // All of a domain's messages are in one partition.
                Some(uuid) => vec![kafka::partition_for(uuid, partitions)],
                None => (0..partitions).collect(),
            };
            let since = match from {
                KafkaFrom::Time(t) => Some((t.unix_timestamp_nanos() / 1_000_000) as i64),
                _ => None,
            };
            (
                parts.into_iter().map(|p| (p, Start::Earliest)).collect(),
                since,
            )
        }
    };
    let mut stats = ReplayStats::default();
    let mut io_err: Option<std::io::Error> = None;
    reader::read_to_end(
        &base,
        ReadOptions {
            topic: &cfg.events_topic,
            starts,
            idle: cfg.readback_idle.0,
            max_clock_skew: cfg.readback_max_clock_skew.0,
            not_before_ms: None,
            stall: std::time::Duration::from_secs(30),
            stop: None,
            lookback: reader::DEFAULT_LOOKBACK,
        },
        |m| {
            use rdkafka::Message;
            if io_err.is_some() {
                return Flow::PartitionDone;
            }
            if let Some(uuid) = domain {
                if m.key() != Some(uuid.as_bytes()) {
                    return Flow::Continue;
                }
            }
            if let (Some(since), Some(ts)) = (since_ms, m.timestamp().to_millis()) {
                if ts < since {
                    return Flow::Continue;
                }
            }
            let (p, o) = (m.partition(), m.offset());
            match decode_body(m.payload().unwrap_or_default()) {
                Ok(mut json) => {
                    if let Some(obj) = json.as_object_mut() {
                        obj.insert("topic".into(), m.topic().into());
                        obj.insert("partition".into(), p.into());
                        obj.insert("offset".into(), o.into());
                    }
                    if let Err(e) = writeln!(out, "{json}") {
                        io_err = Some(e);
                    }
                    stats.decoded += 1;
                }
                Err(e) => {
                    eprintln!("partition {p} offset {o}: cannot decode: {e}");
                    stats.undecodable += 1;
                }
            }
            Flow::Continue
        },
    )
    .map_err(kerr)?;
    if let Some(e) = io_err {
        return Err(e.into());
    }
    out.flush()?;
    Ok(stats)
}
