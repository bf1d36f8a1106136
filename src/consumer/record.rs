//! What the consumer tools read: one decoded message of any kind, with the
//! place it was read from (stream sequence on NATS, partition and offset
//! on Kafka), so every report can say where a problem is.
//!
//! Invariants:
//! - decoding never panics and never drops a message silently: bytes that
//!   are not a record of a shipped schema give a `RecordError` naming the
//!   cause;
//! - a deletion (tombstone) is recognised by its header or by an empty/null
//!   body on the snapshot stream, and identified by its CloudEvents headers
//!   (`ce_id` = host, epoch and host_seq; `ce_subject` = the domain).

use std::fmt;
use std::sync::Arc;

use crate::codec::{self, CodecError};
use crate::model::{parse_event_id, DomainEvent, DomainSnapshot, HostSnapshot};

/// Where a message was read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// The stream (NATS) or topic (Kafka) name.
    pub source: Arc<str>,
    /// Kafka partition; `None` on NATS.
    pub partition: Option<i32>,
    /// Stream sequence (NATS) or offset (Kafka).
    pub offset: u64,
    /// When the broker stored it (NATS), or the record's timestamp (Kafka:
    /// the agent's time), µs since the Unix epoch.
    pub time_us: Option<i64>,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.partition {
            None => write!(f, "{} stream seq {}", self.source, self.offset),
            Some(p) => write!(f, "{} partition {p} offset {}", self.source, self.offset),
        }
    }
}

impl Position {
    /// The ordered lane this position is in (a stream, or one partition).
    pub fn lane(&self) -> Lane {
        Lane {
            source: self.source.clone(),
            partition: self.partition,
        }
    }
}

/// A totally ordered sequence of messages: a NATS stream, or one
/// partition of a Kafka topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lane {
    pub source: Arc<str>,
    pub partition: Option<i32>,
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.partition {
            None => write!(f, "{}", self.source),
            Some(p) => write!(f, "{} partition {p}", self.source),
        }
    }
}

/// A deleted domain snapshot (NATS: empty body; Kafka: null value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    pub host_id: String,
    pub epoch: String,
    pub host_seq: u64,
    pub uuid: String,
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Event(DomainEvent),
    Domain(DomainSnapshot),
    Host(HostSnapshot),
    Tombstone(Tombstone),
}

impl Body {
    /// (host_id, epoch, host_seq) of the message.
    pub fn origin(&self) -> (&str, &str, u64) {
        match self {
            Body::Event(e) => (&e.host_id, &e.epoch, e.host_seq),
            Body::Domain(d) => (&d.host_id, &d.epoch, d.host_seq),
            Body::Host(h) => (&h.host_id, &h.epoch, h.host_seq),
            Body::Tombstone(t) => (&t.host_id, &t.epoch, t.host_seq),
        }
    }

    /// Agent time of the message (µs), when the body carries one.
    pub fn observed_at(&self) -> Option<i64> {
        match self {
            Body::Event(e) => Some(e.observed_at),
            Body::Domain(d) => Some(d.observed_at),
            Body::Host(h) => Some(h.observed_at),
            Body::Tombstone(_) => None,
        }
    }
}

/// A message and where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub body: Body,
    pub pos: Position,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("JSON body: {0}")]
    Json(String),
    #[error("tombstone without a usable {0} header")]
    Tombstone(&'static str),
    #[error("{0}")]
    Registry(String),
}

/// Message headers the decoder looks at.
#[derive(Debug, Default, Clone, Copy)]
pub struct Headers<'a> {
    pub tombstone: bool,
    pub ce_id: Option<&'a str>,
    pub ce_subject: Option<&'a str>,
}

/// Decodes one message body (Avro single-object, or the opt-in JSON; a
/// registry-framed body is re-framed first, by `bus::Message::body`).
pub fn decode(body: &[u8], headers: Headers<'_>) -> Result<Body, RecordError> {
    if headers.tombstone || body.is_empty() {
        return tombstone(headers).map(Body::Tombstone);
    }
    if body.starts_with(&codec::SINGLE_OBJECT_MAGIC) {
        let (writer, _) = codec::writer_of(body)?;
        return Ok(match writer {
            "DomainEvent" => Body::Event(codec::decode_event(body)?),
            "DomainSnapshot" => Body::Domain(codec::decode_domain_snapshot(body)?),
            _ => Body::Host(codec::decode_host_snapshot(body)?),
        });
    }
    if let Some(e) = registry_framed(body) {
        return Err(e);
    }
    decode_json(body)
}

/// A registry-framed body that reached a decoder without being re-framed
/// (no `[schema_registry]` configured): the error that says so.
pub fn registry_framed(body: &[u8]) -> Option<RecordError> {
    codec::confluent_id(body).map(|id| {
        RecordError::Registry(format!(
            "schema-registry framed (schema id {id}): configure [schema_registry] to read it"
        ))
    })
}

fn tombstone(h: Headers<'_>) -> Result<Tombstone, RecordError> {
    let id = h.ce_id.ok_or(RecordError::Tombstone("ce_id"))?;
    let (host, epoch, host_seq) = parse_event_id(id).ok_or(RecordError::Tombstone("ce_id"))?;
    // ce_subject is the domain uuid on NATS and `<host>/<uuid>` on Kafka.
    let subject = h.ce_subject.ok_or(RecordError::Tombstone("ce_subject"))?;
    let uuid = subject.rsplit('/').next().unwrap_or(subject);
    if uuid.is_empty() {
        return Err(RecordError::Tombstone("ce_subject"));
    }
    Ok(Tombstone {
        host_id: host.to_owned(),
        epoch: epoch.to_owned(),
        host_seq,
        uuid: uuid.to_owned(),
    })
}

/// The opt-in JSON encoding: the same fields, told apart by their keys.
fn decode_json(body: &[u8]) -> Result<Body, RecordError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| RecordError::Json(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| {
        RecordError::Json("not Avro single-object encoded nor a JSON object".into())
    })?;
    let bytes = if obj.contains_key("kind") {
        codec::json_to_avro("HostSnapshot", &v)
    } else if obj.contains_key("snapshot_id") {
        codec::json_to_avro("DomainSnapshot", &v)
    } else {
        codec::json_to_avro("DomainEvent", &v)
    }
    .map_err(|e| RecordError::Json(e.to_string()))?;
    // Re-enter through the Avro decoders so both encodings are checked alike.
    let (writer, _) = codec::writer_of(&bytes)?;
    Ok(match writer {
        "DomainEvent" => Body::Event(codec::decode_event(&bytes)?),
        "DomainSnapshot" => Body::Domain(codec::decode_domain_snapshot(&bytes)?),
        _ => Body::Host(codec::decode_host_snapshot(&bytes)?),
    })
}
