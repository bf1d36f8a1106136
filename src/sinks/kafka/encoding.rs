//! Kafka encoding of a journal entry: topic, key (the domain UUID),
//! partition, CloudEvents binary-mode headers and value.
//!
//! Invariants: the same entry always yields the same key, partition,
//! headers and value (the same bytes as on NATS: Avro single-object
//! encoding unless `kafka.encoding = "json"`); `ce_id` is the event id, by
//! which the sink recognises its own records when it reads them back.

use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders};

use super::partition_for;
use crate::codec::CodecError;
use crate::config::Encoding;
use crate::journal::Entry;
use crate::sinks::message_parts;

/// Header carrying the event id (CloudEvents `id`).
pub const EVENT_ID_HEADER: &str = "ce_id";

/// Everything a produce call needs, computed once per entry.
pub struct Encoded {
    pub partition: i32,
    pub key: String,
    pub headers: OwnedHeaders,
    pub value: Bytes,
    /// Record timestamp: the agent's receive time, in milliseconds.
    pub timestamp_ms: i64,
}

/// Per-sink constants.
pub struct EncodingContext {
    pub host_id: String,
    pub epoch: String,
    pub topic: String,
    pub partitions: i32,
    pub encoding: Encoding,
}

impl EncodingContext {
    pub fn encode(&self, entry: &Entry) -> Result<Encoded, CodecError> {
        let parts = message_parts(&self.host_id, &self.epoch, self.encoding, entry)?;
        let mut headers = OwnedHeaders::new_with_capacity(parts.headers.len());
        for (k, v) in &parts.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        Ok(Encoded {
            partition: partition_for(&entry.key, self.partitions),
            key: entry.key.clone(),
            headers,
            value: parts.body,
            timestamp_ms: entry.observed_at.div_euclid(1000),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, tests::sample};
    use crate::journal::Kind;
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
            host_id: "host.a".into(),
            epoch: "7f3c".into(),
            topic: "virt.domain.events.v1".into(),
            partitions: 12,
            encoding: Encoding::Avro,
        };
        let enc = ctx.encode(&entry).unwrap();
        assert_eq!(enc.key, "b9906489-6d5b-40f8-a742-ca71b2b84277");
        assert_eq!(enc.partition, partition_for(&enc.key, 12));
        assert_eq!(enc.value.as_ref(), entry.payload.as_slice());
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
