//! The context every Kafka client is built with: routes librdkafka's logs
//! and errors to `tracing`, counts errors, keeps the last one (with its
//! class, for [`super::diagnose`]), and keeps the fetch statistics the
//! partition reader uses to know that fetches came back empty.
//!
//! Invariants: clones share their state; "all brokers down" never hides
//! the error that said why; statistics are kept only for the one topic a
//! context was made for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::ProducerContext;
use serde::Deserialize;

use crate::bus::Cause;

/// The class of a librdkafka error code.
pub fn cause_of(code: RDKafkaErrorCode) -> Cause {
    use RDKafkaErrorCode as C;
    match code {
        C::SSL => Cause::Tls,
        C::Authentication
        | C::SaslAuthenticationFailed
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed => Cause::Auth,
        C::BrokerTransportFailure | C::Resolve | C::AllBrokersDown => Cause::Unreachable,
        C::MessageTimedOut | C::OperationTimedOut | C::RequestTimedOut | C::TimedOutQueue => {
            Cause::Timeout
        }
        C::InvalidArgument | C::Conflict => Cause::Config,
        _ => Cause::Other,
    }
}

/// What one statistics report says about fetching a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionFetch {
    /// librdkafka's fetch state (`active` while fetching).
    pub state: String,
    /// The broker serving the partition.
    pub broker: i32,
    /// Fetch requests that broker connection has sent so far.
    pub fetches: i64,
}

/// The latest statistics report, numbered. Reports are served from the
/// consumer queue (the main queue is redirected there when a group id is
/// set), so every record fetched before a report was made has been
/// returned by `poll` before that report is seen.
#[derive(Debug, Default, Clone)]
pub struct FetchStats {
    pub seq: u64,
    pub partitions: HashMap<i32, PartitionFetch>,
}

/// The context of every client: routes librdkafka's logs and errors to
/// `tracing`, counts errors, and keeps the fetch statistics the reader
/// uses to know that fetches came back empty.
/// Clones share their state.
#[derive(Default, Clone)]
pub struct KafkaContext {
    inner: Arc<ContextState>,
}

#[derive(Default)]
struct ContextState {
    errors: AtomicU64,
    /// The last error's code (when it has one) and text.
    last_error: Mutex<Option<(Option<RDKafkaErrorCode>, String)>>,
    fetch: Mutex<FetchStats>,
    topic: Option<String>,
}

impl KafkaContext {
    /// A context whose statistics track `topic`'s partitions.
    pub fn for_topic(topic: &str) -> KafkaContext {
        KafkaContext {
            inner: Arc::new(ContextState {
                topic: Some(topic.to_string()),
                ..Default::default()
            }),
        }
    }

    /// Client errors reported so far (connection failures, all brokers
    /// down, authentication failures, …).
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_failure().map(|(_, text)| text)
    }

    /// The last error's class and text.
    pub fn last_failure(&self) -> Option<(Cause, String)> {
        self.inner
            .last_error
            .lock()
            .expect("kafka context")
            .as_ref()
            .map(|(code, text)| (code.map_or(Cause::Other, cause_of), text.clone()))
    }

    pub fn fetch_stats(&self) -> FetchStats {
        self.inner.fetch.lock().expect("kafka context").clone()
    }
}

#[derive(Deserialize)]
struct RawStats {
    #[serde(default)]
    brokers: HashMap<String, RawBroker>,
    #[serde(default)]
    topics: HashMap<String, RawTopic>,
}

#[derive(Deserialize)]
struct RawBroker {
    nodeid: i32,
    #[serde(default)]
    req: HashMap<String, i64>,
}

#[derive(Deserialize)]
struct RawTopic {
    #[serde(default)]
    partitions: HashMap<String, RawPartition>,
}

#[derive(Deserialize)]
struct RawPartition {
    partition: i32,
    broker: i32,
    #[serde(default)]
    fetch_state: String,
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(facility = fac, "librdkafka: {msg}"),
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {msg}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(facility = fac, "librdkafka: {msg}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {msg}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %error, "Kafka client error: {reason}");
        // "All brokers are down" follows the error that says why; keep
        // the cause.
        let all_down = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
        let mut last = self.inner.last_error.lock().expect("kafka context");
        if !(all_down && last.is_some()) {
            *last = Some((error.rdkafka_error_code(), format!("{error}: {reason}")));
        }
    }

    fn stats_raw(&self, statistics: &[u8]) {
        let Some(topic) = &self.inner.topic else {
            return;
        };
        let Ok(raw) = serde_json::from_slice::<RawStats>(statistics) else {
            return;
        };
        let fetches: HashMap<i32, i64> = raw
            .brokers
            .values()
            .map(|b| (b.nodeid, b.req.get("Fetch").copied().unwrap_or(0)))
            .collect();
        let mut guard = self.inner.fetch.lock().expect("kafka context");
        let mut stats = FetchStats {
            seq: guard.seq + 1,
            partitions: HashMap::new(),
        };
        if let Some(t) = raw.topics.get(topic) {
            for p in t.partitions.values().filter(|p| p.partition >= 0) {
                stats.partitions.insert(
                    p.partition,
                    PartitionFetch {
                        state: p.fetch_state.clone(),
                        broker: p.broker,
                        fetches: fetches.get(&p.broker).copied().unwrap_or(0),
                    },
                );
            }
        }
        *guard = stats;
    }
}

impl ConsumerContext for KafkaContext {}

/// Only for [`super::diagnose`]'s producer, which sends nothing.
impl ProducerContext for KafkaContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_brokers_down_keeps_the_cause() {
        let ctx = KafkaContext::default();
        let ssl = KafkaError::Global(RDKafkaErrorCode::SSL);
        ctx.error(ssl, "SSL handshake failed");
        let down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        ctx.error(down, "1/1 brokers are down");
        assert_eq!(ctx.errors(), 2);
        let (cause, text) = ctx.last_failure().unwrap();
        assert_eq!(cause, Cause::Tls);
        assert!(text.ends_with("SSL handshake failed"), "{text}");
        assert_eq!(ctx.last_error(), Some(text));
    }

    #[test]
    fn codes_are_classed() {
        assert_eq!(cause_of(RDKafkaErrorCode::Authentication), Cause::Auth);
        assert_eq!(cause_of(RDKafkaErrorCode::Resolve), Cause::Unreachable);
        assert_eq!(cause_of(RDKafkaErrorCode::RequestTimedOut), Cause::Timeout);
        assert_eq!(cause_of(RDKafkaErrorCode::UnknownTopic), Cause::Other);
    }
}
