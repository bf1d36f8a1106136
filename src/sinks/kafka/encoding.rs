//! Kafka encoding of a journal entry: topic, key, partition, CloudEvents
//! binary-mode headers and value.
//!
//! Routing (docs/contract.md §3): events → events topic, key = domain UUID; domain
//! snapshots → domain snapshots topic, key = `<host_id>/<domain uuid>`,
//! a null value for a tombstone; round markers and heartbeats → host
//! snapshots topic, key = host_id.
//!
//! Invariants: the same entry always yields the same topic, key,
//! partition, headers and value (the same bytes as on NATS: Avro
//! single-object encoding unless `kafka.encoding = "json"`); `ce_id` is the
//! event id, by which the sink recognises its own records when it reads
//! them back.

use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders};

use crate::bus::kafka::partition_for;
use crate::codec::CodecError;
use crate::journal::{Entry, Kind};
use crate::sinks::MessageContext;

/// Header carrying the event id (CloudEvents `id`).
pub const EVENT_ID_HEADER: &str = "ce_id";

/// Everything a produce call needs, computed once per entry.
pub struct Encoded {
    /// Index into [`EncodingContext::topics`].
    pub topic: usize,
    pub partition: i32,
    pub key: String,
    pub headers: OwnedHeaders,
    /// None for a tombstone (a null value deletes the key on compaction).
    pub value: Option<Bytes>,
    /// Record timestamp: the agent's receive time, in milliseconds.
    pub timestamp_ms: i64,
}

/// Index of the events topic in [`EncodingContext::topics`].
pub const EVENTS: usize = 0;
/// Index of the domain snapshots topic.
pub const DOMAIN_SNAPSHOTS: usize = 1;
/// Index of the host snapshots topic.
pub const HOST_SNAPSHOTS: usize = 2;

/// Per-sink constants.
pub struct EncodingContext {
    /// Id, headers and body, as on every bus.
    pub message: MessageContext,
    /// (name, partitions) of the events, domain snapshots and host
    /// snapshots topics, in that order.
    pub topics: [(String, i32); 3],
}

impl EncodingContext {
    /// (topic index, key, partition) of an entry.
    pub fn route(&self, entry: &Entry) -> (usize, String, i32) {
        let (topic, key) = match entry.kind {
            Kind::DomainEvent => (EVENTS, entry.key.clone()),
            Kind::DomainSnapshot | Kind::DomainTombstone => (
                DOMAIN_SNAPSHOTS,
                format!("{}/{}", self.message.host_id, entry.key),
            ),
            Kind::HostSnapshot => (HOST_SNAPSHOTS, self.message.host_id.clone()),
        };
        let partition = partition_for(&key, self.topics[topic].1);
        (topic, key, partition)
    }

    pub fn encode(&self, entry: &Entry) -> Result<Encoded, CodecError> {
        let parts = self.message.parts(entry)?;
        let mut headers = OwnedHeaders::new_with_capacity(parts.headers.len());
        for (k, v) in &parts.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let (topic, key, partition) = self.route(entry);
        Ok(Encoded {
            topic,
            partition,
            key,
            headers,
            value: (!parts.tombstone).then_some(parts.body),
            timestamp_ms: entry.observed_at.div_euclid(1000),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, tests::sample};
    use crate::config::Encoding;
    use rdkafka::message::Headers;

    #[test]
    fn value_is_the_journal_bytes_with_cloudevents_headers() {
        let e = sample();
        let entry = Entry {
            host_seq: e.host_seq,
            kind: Kind::DomainEvent,
            key: e.domain.uuid.clone(),
            observed_at: e.observed_at,
            payload: codec::encode_event(&e),
        };
        let ctx = EncodingContext {
            message: MessageContext {
                host_id: "host.a".into(),
                epoch: "7f3c".into(),
                encoding: Encoding::Avro,
                framing: None,
            },
            topics: [
                ("virt.domain.events.v1".into(), 12),
                ("virt.domain.snapshots.v1".into(), 6),
                ("virt.host.snapshots.v1".into(), 3),
            ],
        };
        let enc = ctx.encode(&entry).unwrap();
        assert_eq!(enc.topic, EVENTS);
        assert_eq!(enc.key, "b9906489-6d5b-40f8-a742-ca71b2b84277");
        assert_eq!(enc.partition, partition_for(&enc.key, 12));
        assert_eq!(enc.value.as_deref(), Some(entry.payload.as_slice()));
        // Snapshots are keyed <host>/<uuid>; a tombstone has no value;
        // host records are keyed by host.
        let snap = Entry {
            kind: Kind::DomainSnapshot,
            ..entry.clone()
        };
        let sn = ctx.encode(&snap).unwrap();
        assert_eq!(sn.topic, DOMAIN_SNAPSHOTS);
        assert_eq!(sn.key, "host.a/b9906489-6d5b-40f8-a742-ca71b2b84277");
        assert_eq!(sn.partition, partition_for(&sn.key, 6));
        let tomb = Entry {
            kind: Kind::DomainTombstone,
            payload: Vec::new(),
            ..entry.clone()
        };
        let t = ctx.encode(&tomb).unwrap();
        assert_eq!(
            (t.topic, t.key.as_str()),
            (DOMAIN_SNAPSHOTS, sn.key.as_str())
        );
        assert!(t.value.is_none());
        assert!(t
            .headers
            .iter()
            .any(|h| h.key == crate::bus::wire::TOMBSTONE_HEADER));
        let host = Entry {
            kind: Kind::HostSnapshot,
            ..entry.clone()
        };
        let h = ctx.encode(&host).unwrap();
        assert_eq!((h.topic, h.key.as_str()), (HOST_SNAPSHOTS, "host.a"));
        assert_eq!(enc.timestamp_ms, e.observed_at / 1000);
        let h = |name: &str| {
            enc.headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8(v.to_vec()).unwrap())
        };
        assert_eq!(h(EVENT_ID_HEADER).as_deref(), Some("host.a:7f3c:1042"));
        assert_eq!(h("ce_specversion").as_deref(), Some("1.0"));
        assert_eq!(h("ce_source").as_deref(), Some("virtstream://host.a"));
        assert_eq!(h("ce_subject").as_deref(), Some(enc.key.as_str()));
        assert_eq!(h("content-type").as_deref(), Some("application/avro"));
        assert!(h("ce_time").is_some() && h("ce_type").is_some());
    }
}
