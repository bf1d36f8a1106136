//! The usage CloudEvents on Kafka: the usage topic found or created (with
//! `kafka.partitions` and `kafka.replication`, `cleanup.policy=delete`),
//! then one record per event from an idempotent producer with
//! `acks=all`, keyed by the CloudEvent `subject`.
//!
//! Invariants:
//! - an existing usage topic that is compacted is refused (compaction by
//!   subject would drop earlier windows);
//! - the partition of a key is murmur2 of the key, as Java producers
//!   place it, so one subject's records stay in one partition whoever
//!   writes them;
//! - every delivery report is awaited; a record not delivered within
//!   `DELIVERY_TIMEOUT` (or refused) fails the publish with the broker's
//!   reason.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use super::{PublishError, Published, UsageEvent, CONTENT_TYPE};
use crate::bus::kafka::{
    admin_client, check_cleanup_policy, client_config, partition_counts, partition_for,
    KafkaContext, KafkaError, TopicRole, REQUEST_TIMEOUT,
};
use crate::config::{KafkaConfig, UsageConfig};

/// How long librdkafka may try to deliver one record.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

fn broker_err(cfg: &KafkaConfig, message: impl Into<String>) -> KafkaError {
    KafkaError::Broker {
        brokers: cfg.brokers.0.join(","),
        message: message.into(),
    }
}

/// Partition count of `topic`, `None` when it does not exist.
async fn partitions(
    admin: &Arc<AdminClient<KafkaContext>>,
    cfg: &KafkaConfig,
    topic: &str,
) -> Result<Option<i32>, KafkaError> {
    let a = admin.clone();
    let md = tokio::task::spawn_blocking(move || a.inner().fetch_metadata(None, REQUEST_TIMEOUT))
        .await
        .map_err(|e| broker_err(cfg, e.to_string()))?
        .map_err(|e| broker_err(cfg, format!("metadata request failed: {e}")))?;
    Ok(partition_counts(&md).get(topic).copied())
}

/// The usage topic's partition count, creating the topic when missing
/// and `kafka.create_topics` allows; an existing topic must not compact.
async fn ensure_topic(cfg: &KafkaConfig, topic: &str) -> Result<i32, KafkaError> {
    let admin = admin_client(cfg, "virtstream-usage")?;
    let opts = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
    let mut count = partitions(&admin, cfg, topic).await?;
    if count.is_none() {
        if !cfg.create_topics {
            return Err(KafkaError::Missing {
                topic: topic.to_string(),
            });
        }
        let new = NewTopic::new(
            topic,
            cfg.partitions,
            TopicReplication::Fixed(cfg.replication),
        )
        .set("cleanup.policy", "delete");
        let results = admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| broker_err(cfg, format!("CreateTopics failed: {e}")))?;
        for r in results {
            match r {
                Ok(t) => {
                    tracing::info!(topic = %t, partitions = cfg.partitions, "created Kafka topic")
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(broker_err(cfg, format!("creating topic {t}: {code}")))
                }
            }
        }
        // A new topic can take a moment to show in metadata.
        for _ in 0..50 {
            count = partitions(&admin, cfg, topic).await?;
            if count.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(|e| broker_err(cfg, format!("DescribeConfigs failed: {e}")))?;
    for res in described {
        let res = res.map_err(|code| {
            broker_err(cfg, format!("DescribeConfigs for topic {topic}: {code}"))
        })?;
        let policy = res.get("cleanup.policy").and_then(|e| e.value.as_deref());
        check_cleanup_policy(TopicRole::History, policy).map_err(|reason| {
            KafkaError::Unsuitable {
                topic: topic.to_string(),
                reason,
            }
        })?;
    }
    count.ok_or_else(|| broker_err(cfg, format!("topic {topic} does not show in metadata")))
}

pub(super) async fn publish(
    cfg: &KafkaConfig,
    usage: &UsageConfig,
    events: &[UsageEvent],
) -> Result<Published, PublishError> {
    let topic = usage.kafka_topic.as_str();
    let partitions = ensure_topic(cfg, topic).await?;
    let ctx = KafkaContext::default();
    let producer: FutureProducer<KafkaContext> = {
        let mut c = client_config(cfg, "virtstream-usage")?;
        c.set("enable.idempotence", "true").set("acks", "all").set(
            "message.timeout.ms",
            DELIVERY_TIMEOUT.as_millis().to_string(),
        );
        c.create_with_context(ctx.clone())
            .map_err(|e| KafkaError::Config(e.to_string()))?
    };
    let failed = |e: &UsageEvent, reason: String| {
        // The client's last error says why a broker could not be reached.
        let why = match ctx.last_error() {
            Some(last) if !reason.contains(&last) => {
                format!("{reason} (last client error: {last})")
            }
            _ => reason,
        };
        PublishError::Delivery {
            topic: topic.to_string(),
            id: e.id.clone(),
            reason: why,
        }
    };
    let mut out = Published {
        target: format!("Kafka topic {topic}"),
        acked: 0,
        duplicates: 0,
    };
    let mut pending: VecDeque<(&UsageEvent, DeliveryFuture)> = VecDeque::new();
    for event in events {
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(CONTENT_TYPE),
        });
        let mut record = FutureRecord::to(topic)
            .key(event.subject.as_str())
            .payload(event.json.as_str())
            .partition(partition_for(&event.subject, partitions))
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push_back((event, f));
                    break;
                }
                // The local queue is full: wait for the oldest delivery.
                Err((e, r)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    record = r;
                    match pending.pop_front() {
                        Some(p) => settle(p, &mut out, &failed).await?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => return Err(failed(event, e.to_string())),
            }
        }
    }
    while let Some(p) = pending.pop_front() {
        settle(p, &mut out, &failed).await?;
    }
    // Dropping the producer waits for librdkafka's threads; nothing is
    // queued any more.
    let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
    Ok(out)
}

/// Awaits one delivery report.
async fn settle(
    (event, delivery): (&UsageEvent, DeliveryFuture),
    out: &mut Published,
    failed: &impl Fn(&UsageEvent, String) -> PublishError,
) -> Result<(), PublishError> {
    match delivery.await {
        Ok(Ok(_)) => {
            out.acked += 1;
            Ok(())
        }
        Ok(Err((e, _))) => Err(failed(event, e.to_string())),
        Err(_) => Err(failed(
            event,
            "the producer dropped the delivery report".into(),
        )),
    }
}
