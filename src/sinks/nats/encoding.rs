//! NATS encoding of a journal entry: subject, headers (`Nats-Msg-Id` plus
//! CloudEvents binary mode) and body.
//!
//! Invariants: the same entry always yields the same subject, message id
//! and body, so a re-publish is recognised by JetStream de-duplication and
//! by the per-subject position check.

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::bus::wire::subject_token;
use crate::codec::CodecError;
use crate::journal::{Entry, Kind};
use crate::sinks::registry::SchemaIds;
use crate::sinks::MessageContext;

/// Subject of an entry: `<events prefix>.<host token>.<domain uuid>` for
/// events, `<snapshots prefix>.<host token>.<domain uuid>` for domain
/// snapshots and their tombstones, `<hosts prefix>.<host token>` for round
/// markers and heartbeats.
pub fn subject(ctx: &EncodingContext, entry: &Entry) -> String {
    let host = &ctx.host_token;
    match entry.kind {
        Kind::DomainEvent => format!("{}.{host}.{}", ctx.prefix, entry.key),
        Kind::DomainSnapshot | Kind::DomainTombstone => {
            format!("{}.{host}.{}", ctx.snapshots_prefix, entry.key)
        }
        Kind::HostSnapshot => format!("{}.{host}", ctx.hosts_prefix),
    }
}

/// Everything a publish needs, computed once per entry.
pub struct Encoded {
    pub subject: String,
    pub msg_id: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Per-sink constants.
#[derive(Debug, Clone)]
pub struct EncodingContext {
    /// Id, headers and body, as on every bus.
    pub message: MessageContext,
    pub host_token: String,
    /// Events subject prefix.
    pub prefix: String,
    pub snapshots_prefix: String,
    pub hosts_prefix: String,
}

impl EncodingContext {
    pub fn new(host_id: &str, epoch: &str, cfg: &crate::config::NatsConfig) -> Self {
        EncodingContext {
            message: MessageContext {
                host_id: host_id.to_string(),
                epoch: epoch.to_string(),
                encoding: cfg.encoding,
                framing: None,
            },
            host_token: subject_token(host_id),
            prefix: cfg.events_subject_prefix.clone(),
            snapshots_prefix: cfg.snapshots_subject_prefix.clone(),
            hosts_prefix: cfg.hosts_subject_prefix.clone(),
        }
    }

    /// The same context, publishing in schema-registry framing with `ids`.
    pub fn with_framing(&self, ids: std::sync::Arc<SchemaIds>) -> Self {
        let mut framed = self.clone();
        framed.message.framing = Some(ids);
        framed
    }

    pub fn encode(&self, entry: &Entry) -> Result<Encoded, CodecError> {
        let parts = self.message.parts(entry)?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", parts.event_id.as_str());
        for (k, v) in &parts.headers {
            headers.insert(*k, v.as_str());
        }
        Ok(Encoded {
            subject: subject(self, entry),
            msg_id: parts.event_id,
            headers,
            body: parts.body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, tests::sample};
    use crate::journal::Kind;

    fn entry() -> Entry {
        let e = sample();
        Entry {
            host_seq: e.host_seq,
            kind: Kind::DomainEvent,
            key: e.domain.uuid.clone(),
            observed_at: e.observed_at,
            payload: codec::encode_event(&e),
        }
    }

    #[test]
    fn avro_body_is_the_journal_bytes_with_cloudevents_headers() {
        let cfg: crate::config::NatsConfig = toml::from_str("url = \"nats://x:1\"").unwrap();
        let ctx = EncodingContext::new("host.a", "7f3c", &cfg);
        let enc = ctx.encode(&entry()).unwrap();
        assert_eq!(
            enc.subject,
            "virt.events.v1.host_2Ea.b9906489-6d5b-40f8-a742-ca71b2b84277"
        );
        assert_eq!(enc.msg_id, "host.a:7f3c:1042");
        assert_eq!(enc.body.as_ref(), entry().payload.as_slice());
        let h = |k: &str| enc.headers.get(k).map(|v| v.as_str().to_string());
        assert_eq!(h("Nats-Msg-Id").as_deref(), Some("host.a:7f3c:1042"));
        assert_eq!(h("ce_source").as_deref(), Some("virtstream://host.a"));
        assert_eq!(
            h("ce_type").as_deref(),
            Some("io.virtstream.domain.event.v1")
        );
        assert_eq!(h("content-type").as_deref(), Some("application/avro"));
        assert_eq!(
            h("virtstream-schema").as_deref(),
            Some("io.virtstream.DomainEvent.v2")
        );
    }

    #[test]
    fn json_body_carries_the_same_record() {
        let cfg: crate::config::NatsConfig =
            toml::from_str("url = \"nats://x:1\"\nencoding = \"json\"").unwrap();
        let ctx = EncodingContext::new("host-a", "7f3c", &cfg);
        let enc = ctx.encode(&entry()).unwrap();
        let j: serde_json::Value = serde_json::from_slice(&enc.body).unwrap();
        assert_eq!(j["event_id"], sample().event_id.as_str());
        assert_eq!(j["state_after"]["state"], "RUNNING");
        assert_eq!(
            enc.headers.get("content-type").unwrap().as_str(),
            "application/json"
        );
    }
}
