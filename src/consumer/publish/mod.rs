//! Publishing the usage CloudEvents (`virtstream usage --format
//! cloudevents --publish`) to the bus the tool read from: the Kafka topic
//! `usage.kafka_topic` (`kafka`) or the JetStream stream
//! `usage.nats_stream` (`nats`), each created when missing and allowed.
//! This is the one place where the consumer side writes to a bus; it never
//! writes to the agent's own topics or streams (the config keeps them
//! apart).
//!
//! Invariants:
//! - `publish` returns `Ok` only when the broker acknowledged every event
//!   (Kafka: a delivery report from an idempotent producer with
//!   `acks=all`; NATS: a JetStream ack, a duplicate ack included); the
//!   first failure is an error naming the topic or subject, the event id
//!   and the broker's reason;
//! - an event always goes to the same place under the same id: Kafka key
//!   = the CloudEvent `subject` (murmur2 partitioning, as Java clients
//!   place keys), NATS subject = `<prefix>.<host token>.<domain uuid>`
//!   with `Nats-Msg-Id` = the CloudEvent `id`; the value is the event in
//!   structured mode with `content-type: application/cloudevents+json`;
//! - what awaits an ack is bounded (`nats.max_in_flight`, librdkafka's
//!   queue): a large fleet waits for acks, it does not pile up.

mod kafka;
mod nats;

use super::report::UsageEvent;
use super::BusKind;
use crate::bus::kafka::KafkaError;
use crate::bus::nats::NatsError;
use crate::config::Config;

/// The content type of a structured-mode CloudEvent in JSON.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("config key `{0}`: publishing to --bus {0} needs a [{0}] section")]
    MissingSection(&'static str),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("Kafka topic {topic}: usage event {id} was not delivered: {reason}")]
    Delivery {
        topic: String,
        id: String,
        reason: String,
    },
    #[error("JetStream subject {subject}: usage event {id} was not stored: {reason}")]
    NotStored {
        subject: String,
        id: String,
        reason: String,
    },
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Where the events went (`Kafka topic virt.usage.v1`, `JetStream
    /// stream VIRT_USAGE`).
    pub target: String,
    /// Events the broker acknowledged.
    pub acked: usize,
    /// Of those, the ones JetStream reported as duplicates of a message
    /// it already had (same `Nats-Msg-Id` within its duplicate window):
    /// stored once. Always 0 on Kafka, which stores every record.
    pub duplicates: usize,
}

/// Publishes `events` to `bus` as configured in `cfg` (see the module
/// doc); blocks until every event is acknowledged or one fails.
pub fn publish(
    cfg: &Config,
    bus: BusKind,
    events: &[UsageEvent],
) -> Result<Published, PublishError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(PublishError::Runtime)?;
    match bus {
        BusKind::Kafka => {
            let k = cfg
                .kafka
                .as_ref()
                .ok_or(PublishError::MissingSection("kafka"))?;
            rt.block_on(kafka::publish(k, &cfg.usage, events))
        }
        BusKind::Nats => {
            let n = cfg
                .nats
                .as_ref()
                .ok_or(PublishError::MissingSection("nats"))?;
            rt.block_on(nats::publish(n, &cfg.usage, events))
        }
    }
}
