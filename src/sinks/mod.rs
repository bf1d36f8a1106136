//! Sinks: each reads the journal from its own cursor, publishes, and
//! acknowledges back to the journal. Shared pieces live here: the
//! bus-independent parts of a message, the contiguous-ack window,
//! (`journal_io`) the journal reads and cursor writes, which run on the
//! blocking pool, never on the async thread, (`driver`) the publish loop
//! every bus plugs into, and (`launch`) building the configured sinks so
//! the agent starts them alike, and (`registry`) the schema ids of a
//! schema registry, and (`actions`) the `[[actions]]` commands, sinks
//! that run a command instead of publishing. Connections, topics, streams and wire
//! names are the bus layer's ([`crate::bus`]).
//!
//! Invariants:
//! - a sink's cursor is the highest `host_seq` such that every entry at or
//!   below it was acknowledged by the broker; it only moves forward, and
//!   its writes reach the journal in order;
//! - a slow or dead sink never blocks the tracker or another sink (the
//!   journal absorbs the difference, within `journal.max_bytes`).

pub mod actions;
pub(crate) mod driver;
mod journal_io;
pub mod kafka;
pub mod launch;
pub mod nats;
pub mod registry;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;

use crate::bus::wire::TOMBSTONE_HEADER;
use crate::codec::{self, CodecError};
use crate::config::Encoding;
use crate::journal::{Entry, Kind};
use crate::model::event_id;

/// The bus-independent parts of a message: its id, CloudEvents binary-mode
/// headers (plus schema name and fingerprint) and body. Both sinks build
/// their messages from these, so NATS and Kafka carry the same bytes.
pub struct MessageParts {
    pub event_id: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
    /// A deleted domain snapshot: Kafka sends a null value, NATS an empty
    /// body with [`TOMBSTONE_HEADER`].
    pub tombstone: bool,
}

/// What every message of one agent run shares on either bus: the host
/// and epoch its id is made of, the body encoding and, with a schema
/// registry, the framing ids. Each sink's encoding context holds one and
/// adds its own routing (subjects, topics).
#[derive(Debug, Clone)]
pub struct MessageContext {
    pub host_id: String,
    pub epoch: String,
    pub encoding: Encoding,
    /// Registry ids when the sink publishes in schema-registry framing.
    pub framing: Option<Arc<registry::SchemaIds>>,
}

impl MessageContext {
    /// Why `entry` cannot be framed for the schema registry, if the sink
    /// frames and it cannot: the caller keeps it in the journal and stops.
    pub fn unframable(&self, entry: &Entry) -> Option<crate::bus::registry::RegistryError> {
        self.framing.as_ref().and_then(|f| f.unframable(entry))
    }

    /// Builds the [`MessageParts`] of a journal entry. Deterministic: the
    /// same entry always yields the same id, headers and body. With
    /// `framing`, an Avro body is in the registry's framing.
    pub fn parts(&self, entry: &Entry) -> Result<MessageParts, CodecError> {
        let (host_id, encoding) = (self.host_id.as_str(), self.encoding);
        let framing = self.framing.as_deref();
        let id = event_id(host_id, &self.epoch, entry.host_seq);
        let (ce_type, schema) = match entry.kind {
            Kind::DomainEvent => (codec::CE_TYPE_DOMAIN_EVENT, codec::latest("DomainEvent")),
            Kind::DomainSnapshot | Kind::DomainTombstone => (
                codec::CE_TYPE_DOMAIN_SNAPSHOT,
                codec::latest("DomainSnapshot"),
            ),
            Kind::HostSnapshot => (codec::CE_TYPE_HOST_SNAPSHOT, codec::latest("HostSnapshot")),
        };
        let tombstone = entry.kind == Kind::DomainTombstone;
        let (content_type, body) = match encoding {
            _ if tombstone => (codec::CONTENT_TYPE_AVRO, Bytes::new()),
            Encoding::Avro => match framing {
                Some(ids) => (codec::CONTENT_TYPE_AVRO, ids.frame(&entry.payload)?),
                None => (codec::CONTENT_TYPE_AVRO, Bytes::from(entry.payload.clone())),
            },
            Encoding::Json => {
                let (_, json) = codec::decode_json(&entry.payload)?;
                (codec::CONTENT_TYPE_JSON, Bytes::from(json.to_string()))
            }
        };
        let subject = if entry.kind == Kind::HostSnapshot {
            host_id
        } else {
            entry.key.as_str()
        };
        let mut headers = codec::cloudevents_headers(
            ce_type,
            &id,
            host_id,
            entry.observed_at,
            subject,
            content_type,
            schema,
        );
        if tombstone {
            headers.push((TOMBSTONE_HEADER, "true".to_string()));
        }
        Ok(MessageParts {
            event_id: id,
            headers,
            body,
            tombstone,
        })
    }
}

/// Tracks out-of-order acknowledgements and yields the contiguous cursor.
#[derive(Debug, Clone)]
pub struct AckWindow {
    cursor: u64,
    above: BTreeSet<u64>,
}

impl AckWindow {
    pub fn new(cursor: u64) -> Self {
        AckWindow {
            cursor,
            above: BTreeSet::new(),
        }
    }

    /// Records an ack; returns true when the cursor moved.
    pub fn ack(&mut self, host_seq: u64) -> bool {
        if host_seq <= self.cursor {
            return false;
        }
        self.above.insert(host_seq);
        let before = self.cursor;
        while self.above.remove(&(self.cursor + 1)) {
            self.cursor += 1;
        }
        self.cursor != before
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_window_is_contiguous() {
        let mut w = AckWindow::new(10);
        assert!(!w.ack(12));
        assert!(!w.ack(9));
        assert!(w.ack(11));
        assert_eq!(w.cursor(), 12);
        assert!(w.ack(13));
        assert_eq!(w.cursor(), 13);
    }
}
