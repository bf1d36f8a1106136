//! NATS encoding of a journal entry: subject, headers (`Nats-Msg-Id` plus
//! CloudEvents binary mode) and body.
//!
//! Invariants: the same entry always yields the same subject, message id
//! and body, so a re-publish is recognised by JetStream de-duplication and
//! by the per-subject position check.

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::codec::{self, CodecError};
use crate::config::Encoding;
use crate::journal::{Entry, Kind};
use crate::model::event_id;
use crate::sinks::subject_token;

/// Subject of an entry: `<prefix>.<host token>.<domain uuid>`.
pub fn subject(prefix: &str, host_token: &str, entry: &Entry) -> String {
    format!("{prefix}.{host_token}.{}", entry.key)
}

/// Everything a publish needs, computed once per entry.
pub struct Encoded {
    pub subject: String,
    pub msg_id: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Per-sink constants.
pub struct EncodingContext {
    pub host_id: String,
    pub host_token: String,
    pub epoch: String,
    pub prefix: String,
    pub encoding: Encoding,
}

impl EncodingContext {
    pub fn new(host_id: &str, epoch: &str, prefix: &str, encoding: Encoding) -> Self {
        EncodingContext {
            host_id: host_id.to_string(),
            host_token: subject_token(host_id),
            epoch: epoch.to_string(),
            prefix: prefix.to_string(),
            encoding,
        }
    }

    pub fn encode(&self, entry: &Entry) -> Result<Encoded, CodecError> {
        let msg_id = event_id(&self.host_id, &self.epoch, entry.host_seq);
        let (ce_type, schema) = match entry.kind {
            Kind::DomainEvent => (codec::CE_TYPE_DOMAIN_EVENT, codec::latest("DomainEvent")),
        };
        let (content_type, body) = match self.encoding {
            Encoding::Avro => (codec::CONTENT_TYPE_AVRO, Bytes::from(entry.payload.clone())),
            Encoding::Json => {
                let (_, json) = codec::decode_json(&entry.payload)?;
                (codec::CONTENT_TYPE_JSON, Bytes::from(json.to_string()))
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        for (k, v) in codec::cloudevents_headers(
            ce_type,
            &msg_id,
            &self.host_id,
            entry.observed_at,
            &entry.key,
            content_type,
            schema,
        ) {
            headers.insert(k, v.as_str());
        }
        Ok(Encoded {
            subject: subject(&self.prefix, &self.host_token, entry),
            msg_id,
            headers,
            body,
        })
    }
}
