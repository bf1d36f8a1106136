//! Wire encoding: Avro binary in single-object framing (`C3 01` + the
//! 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
//! canonical form + the datum), CloudEvents binary-mode headers, and the
//! decoders the consumer tools use.
//!
//! Invariants:
//! - encoding is deterministic: the same `DomainEvent` always yields the same
//!   bytes (re-publishing a journal entry is byte-identical);
//! - the hand-written encoder follows `schemas/DomainEvent.v1.avsc` field by
//!   field; tests decode its output with `apache-avro` against that file;
//! - decoding never panics: any byte string gives a value or a `CodecError`
//!   naming what is wrong.

use std::collections::HashMap;
use std::sync::OnceLock;

use apache_avro::types::Value;
use apache_avro::Schema;

mod binary;

use crate::model::{
    Detail, DomainEvent, DomainRef, DomainSnapshot, DomainState, EventType, HostSnapshot, Origin,
    StateReason, AGENT_VERSION,
};

/// The schema files shipped with this build: (record name, version, text).
pub const SCHEMA_FILES: &[(&str, u32, &str)] = &[
    (
        "DomainEvent",
        1,
        include_str!("../../schemas/DomainEvent.v1.avsc"),
    ),
    (
        "DomainSnapshot",
        1,
        include_str!("../../schemas/DomainSnapshot.v1.avsc"),
    ),
    (
        "HostSnapshot",
        1,
        include_str!("../../schemas/HostSnapshot.v1.avsc"),
    ),
];

/// Content type of Avro single-object encoded bodies.
pub const CONTENT_TYPE_AVRO: &str = "application/avro";
/// Content type of JSON bodies (opt-in per sink).
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// CloudEvents type of a `DomainEvent` v1.
pub const CE_TYPE_DOMAIN_EVENT: &str = "io.virtstream.domain.event.v1";
/// CloudEvents type of a `DomainSnapshot` v1 (and of its tombstone).
pub const CE_TYPE_DOMAIN_SNAPSHOT: &str = "io.virtstream.domain.snapshot.v1";
/// CloudEvents type of a `HostSnapshot` v1.
pub const CE_TYPE_HOST_SNAPSHOT: &str = "io.virtstream.host.snapshot.v1";

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("message is {0} bytes, shorter than the 10-byte single-object header")]
    TooShort(usize),
    #[error("not Avro single-object encoding: first bytes are {0:02x} {1:02x}, expected c3 01")]
    BadMagic(u8, u8),
    #[error("unknown writer schema fingerprint {0:016x} (not a schema this build ships)")]
    UnknownFingerprint(u64),
    #[error("Avro datum does not match schema {schema}: {source}")]
    Avro {
        schema: String,
        #[source]
        source: Box<apache_avro::Error>,
    },
    #[error("{0} bytes left over after the Avro datum")]
    Trailing(usize),
    #[error("decoded record has an unexpected shape: {0}")]
    Shape(String),
}

/// One parsed schema file.
pub struct SchemaEntry {
    pub name: &'static str,
    pub version: u32,
    pub schema: Schema,
    pub fingerprint: u64,
}

/// The largest single allocation a decoded message may ask of
/// `apache-avro` (a string, bytes or array length read from the datum).
/// Bus messages are far smaller (NATS and Kafka default to 1 MiB), and
/// without a bound a corrupt length makes the decoder try to allocate
/// gigabytes before noticing the datum is short.
pub const MAX_DECODE_ALLOCATION: usize = 16 << 20;

/// Every shipped schema, parsed once.
pub fn schemas() -> &'static [SchemaEntry] {
    static SCHEMAS: OnceLock<Vec<SchemaEntry>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        // Process-wide in apache-avro, settable once: every decode goes
        // through this function first.
        apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION);
        SCHEMA_FILES
            .iter()
            .map(|(name, version, text)| {
                let schema = Schema::parse_str(text)
                    .unwrap_or_else(|e| panic!("shipped schema {name} v{version} is invalid: {e}"));
                let fingerprint = crc64_avro(schema.canonical_form().as_bytes());
                SchemaEntry {
                    name,
                    version: *version,
                    schema,
                    fingerprint,
                }
            })
            .collect()
    })
}

fn by_fingerprint() -> &'static HashMap<u64, usize> {
    static MAP: OnceLock<HashMap<u64, usize>> = OnceLock::new();
    MAP.get_or_init(|| {
        schemas()
            .iter()
            .enumerate()
            .map(|(i, s)| (s.fingerprint, i))
            .collect()
    })
}

/// The newest shipped version of a record.
pub fn latest(name: &str) -> &'static SchemaEntry {
    schemas()
        .iter()
        .filter(|s| s.name == name)
        .max_by_key(|s| s.version)
        .unwrap_or_else(|| panic!("no shipped schema named {name}"))
}

/// CRC-64-AVRO (Rabin) fingerprint, as the Avro specification defines it.
pub fn crc64_avro(data: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    static TABLE: OnceLock<[u64; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u64; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & (0u64.wrapping_sub(fp & 1)));
            }
            *slot = fp;
        }
        t
    });
    let mut fp = EMPTY;
    for b in data {
        fp = (fp >> 8) ^ table[((fp ^ *b as u64) & 0xff) as usize];
    }
    fp
}

/// A tiny Avro binary writer for the records this crate emits.
struct Writer(Vec<u8>);

impl Writer {
    fn long(&mut self, v: i64) {
        let mut n = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            if n & !0x7f == 0 {
                self.0.push(n as u8);
                return;
            }
            self.0.push((n & 0x7f | 0x80) as u8);
            n >>= 7;
        }
    }
    fn int(&mut self, v: i32) {
        self.long(v as i64)
    }
    fn str(&mut self, s: &str) {
        self.long(s.len() as i64);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn bool(&mut self, b: bool) {
        self.0.push(b as u8);
    }
    fn enum_index(&mut self, i: u32) {
        self.long(i as i64)
    }
    /// `["null", T]` union.
    fn opt<T>(&mut self, v: &Option<T>, f: impl FnOnce(&mut Self, &T)) {
        match v {
            None => self.long(0),
            Some(x) => {
                self.long(1);
                f(self, x)
            }
        }
    }
}

/// The two bytes every Avro single-object message starts with.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xc3, 0x01];

/// Encodes a `DomainEvent` as an Avro single-object message.
pub fn encode_event(e: &DomainEvent) -> Vec<u8> {
    let fp = latest("DomainEvent").fingerprint;
    let mut w = Writer(Vec::with_capacity(
        256 + e.xml.as_ref().map_or(0, |x| x.len()),
    ));
    w.0.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    w.0.extend_from_slice(&fp.to_le_bytes());
    w.str(&e.event_id);
    w.str(&e.host_id);
    w.str(&e.epoch);
    w.long(e.host_seq as i64);
    w.long(e.seq as i64);
    w.str(&e.domain.uuid);
    w.str(&e.domain.name);
    w.opt(&e.domain.id, |w, v| w.int(*v));
    w.enum_index(e.event.index());
    w.int(e.libvirt_event_id);
    w.int(e.event_code);
    w.enum_index(e.detail.index());
    w.int(e.detail_code);
    w.enum_index(e.origin.index());
    w.enum_index(e.state_after.state.index());
    w.int(e.state_after.state_code);
    w.str(&e.state_after.reason);
    w.int(e.state_after.reason_code);
    w.bool(e.persistent);
    w.opt(&e.autostart, |w, v| w.bool(*v));
    w.opt(&e.vcpus, |w, v| w.int(*v));
    w.opt(&e.memory_kib, |w, v| w.long(*v));
    w.opt(&e.config_hash, |w, v| w.str(v));
    w.long(e.observed_at);
    w.opt(&e.xml, |w, v| w.str(v));
    w.0
}

/// Encodes a `DomainSnapshot` as an Avro single-object message.
pub fn encode_domain_snapshot(d: &DomainSnapshot) -> Vec<u8> {
    let fp = latest("DomainSnapshot").fingerprint;
    let mut w = Writer(Vec::with_capacity(
        256 + d.xml.as_ref().map_or(0, |x| x.len()),
    ));
    w.0.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    w.0.extend_from_slice(&fp.to_le_bytes());
    w.str(&d.event_id);
    w.str(&d.host_id);
    w.str(&d.epoch);
    w.long(d.host_seq as i64);
    w.str(&d.snapshot_id);
    w.long(d.seq as i64);
    w.str(&d.domain.uuid);
    w.str(&d.domain.name);
    w.opt(&d.domain.id, |w, v| w.int(*v));
    w.enum_index(d.state.state.index());
    w.int(d.state.state_code);
    w.str(&d.state.reason);
    w.int(d.state.reason_code);
    w.bool(d.persistent);
    w.opt(&d.autostart, |w, v| w.bool(*v));
    w.opt(&d.vcpus, |w, v| w.int(*v));
    w.opt(&d.memory_kib, |w, v| w.long(*v));
    w.opt(&d.config_hash, |w, v| w.str(v));
    w.long(d.observed_at);
    w.opt(&d.xml, |w, v| w.str(v));
    w.0
}

/// Encodes a `HostSnapshot` as an Avro single-object message.
pub fn encode_host_snapshot(h: &HostSnapshot) -> Vec<u8> {
    let fp = latest("HostSnapshot").fingerprint;
    let mut w = Writer(Vec::with_capacity(256));
    w.0.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    w.0.extend_from_slice(&fp.to_le_bytes());
    w.str(&h.event_id);
    w.str(&h.host_id);
    w.str(&h.epoch);
    w.long(h.host_seq as i64);
    w.enum_index(h.kind.index());
    w.opt(&h.snapshot_id, |w, v| w.str(v));
    w.int(h.domain_count);
    w.long(h.host_seq_watermark as i64);
    w.str(&h.info.libvirt_uri);
    w.str(&h.info.libvirt_driver);
    w.str(&h.info.libvirt_version);
    // An Avro array: one block with the count, then the end marker.
    if !h.info.accepted_event_ids.is_empty() {
        w.long(h.info.accepted_event_ids.len() as i64);
        for id in &h.info.accepted_event_ids {
            w.str(id);
        }
    }
    w.long(0);
    w.str(if h.agent_version.is_empty() {
        AGENT_VERSION
    } else {
        &h.agent_version
    });
    w.long(h.observed_at);
    w.0
}

/// Splits a single-object message into its writer schema and datum.
fn split(bytes: &[u8]) -> Result<(&'static SchemaEntry, &[u8]), CodecError> {
    if bytes.len() < 10 {
        return Err(CodecError::TooShort(bytes.len()));
    }
    if bytes[..2] != SINGLE_OBJECT_MAGIC {
        return Err(CodecError::BadMagic(bytes[0], bytes[1]));
    }
    let fp = u64::from_le_bytes(bytes[2..10].try_into().expect("8 bytes"));
    let idx = *by_fingerprint()
        .get(&fp)
        .ok_or(CodecError::UnknownFingerprint(fp))?;
    Ok((&schemas()[idx], &bytes[10..]))
}

/// The writer schema (record name, version) of a single-object message.
pub fn writer_of(bytes: &[u8]) -> Result<(&'static str, u32), CodecError> {
    let (w, _) = split(bytes)?;
    Ok((w.name, w.version))
}

/// The JSON form of a record (what the opt-in JSON encoding and `replay`
/// write) back to an Avro single-object message of the newest version of
/// `name`, so JSON bodies go through the same decoders as Avro ones.
pub fn json_to_avro(name: &str, json: &serde_json::Value) -> Result<Vec<u8>, CodecError> {
    let entry = latest(name);
    let avro_err = |e: apache_avro::Error| CodecError::Avro {
        schema: format!("{} v{} (from JSON)", entry.name, entry.version),
        source: Box::new(e),
    };
    let value = Value::from(json.clone())
        .resolve(&entry.schema)
        .map_err(avro_err)?;
    let datum = apache_avro::to_avro_datum(&entry.schema, value).map_err(avro_err)?;
    let mut out = Vec::with_capacity(10 + datum.len());
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    out.extend_from_slice(&entry.fingerprint.to_le_bytes());
    out.extend_from_slice(&datum);
    Ok(out)
}

/// Decodes a single-object message into a generic Avro value, resolved to
/// the newest shipped version of its record. Returns the record name too.
pub fn decode_value(bytes: &[u8]) -> Result<(&'static str, Value), CodecError> {
    let (writer, mut datum) = split(bytes)?;
    let reader = latest(writer.name);
    let value = apache_avro::from_avro_datum(&writer.schema, &mut datum, Some(&reader.schema))
        .map_err(|e| CodecError::Avro {
            schema: format!("{} v{}", writer.name, writer.version),
            source: Box::new(e),
        })?;
    if !datum.is_empty() {
        return Err(CodecError::Trailing(datum.len()));
    }
    Ok((writer.name, value))
}

/// Decodes a `DomainEvent` message.
pub fn decode_event(bytes: &[u8]) -> Result<DomainEvent, CodecError> {
    let (writer, datum) = split(bytes)?;
    if writer.name == "DomainEvent" && writer.version == 1 {
        // The wire format of the newest version: read it directly.
        return binary::domain_event_v1(datum);
    }
    decode_event_generic(bytes)
}

/// [`decode_event`] through `apache-avro` and schema resolution, whatever
/// the writer version (the direct reader is checked against it).
pub fn decode_event_generic(bytes: &[u8]) -> Result<DomainEvent, CodecError> {
    let (name, value) = decode_value(bytes)?;
    if name != "DomainEvent" {
        return Err(CodecError::Shape(format!(
            "expected DomainEvent, found {name}"
        )));
    }
    event_from_value(value)
}

/// Generic Avro value → JSON (enums as symbols, unions unwrapped).
pub fn value_to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Null => J::Null,
        Value::Boolean(b) => J::Bool(*b),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => J::from(*i),
        Value::Long(i)
        | Value::TimeMicros(i)
        | Value::TimestampMillis(i)
        | Value::TimestampMicros(i)
        | Value::TimestampNanos(i)
        | Value::LocalTimestampMillis(i)
        | Value::LocalTimestampMicros(i)
        | Value::LocalTimestampNanos(i) => J::from(*i),
        Value::Float(f) => J::from(*f),
        Value::Double(f) => J::from(*f),
        Value::String(s) | Value::Enum(_, s) => J::String(s.clone()),
        Value::Uuid(u) => J::String(u.to_string()),
        Value::Bytes(b) | Value::Fixed(_, b) => J::String(hex::encode(b)),
        Value::Union(_, inner) => value_to_json(inner),
        Value::Array(items) => J::Array(items.iter().map(value_to_json).collect()),
        Value::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect(),
        ),
        Value::Record(fields) => J::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect(),
        ),
        other => J::String(format!("{other:?}")),
    }
}

/// Decodes any shipped record into JSON.
pub fn decode_json(bytes: &[u8]) -> Result<(&'static str, serde_json::Value), CodecError> {
    let (name, value) = decode_value(bytes)?;
    Ok((name, value_to_json(&value)))
}

fn shape(msg: impl Into<String>) -> CodecError {
    CodecError::Shape(msg.into())
}

struct Fields(HashMap<String, Value>);

impl Fields {
    fn of(v: Value) -> Result<Fields, CodecError> {
        match v {
            Value::Record(f) => Ok(Fields(f.into_iter().collect())),
            other => Err(shape(format!("expected a record, found {other:?}"))),
        }
    }
    fn take(&mut self, k: &str) -> Result<Value, CodecError> {
        let v = self
            .0
            .remove(k)
            .ok_or_else(|| shape(format!("missing field {k}")))?;
        Ok(match v {
            Value::Union(_, inner) => *inner,
            other => other,
        })
    }
    fn string(&mut self, k: &str) -> Result<String, CodecError> {
        match self.take(k)? {
            Value::String(s) => Ok(s),
            Value::Uuid(u) => Ok(u.to_string()),
            other => Err(shape(format!("{k}: expected string, found {other:?}"))),
        }
    }
    fn opt_string(&mut self, k: &str) -> Result<Option<String>, CodecError> {
        match self.take(k)? {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s)),
            other => Err(shape(format!(
                "{k}: expected string or null, found {other:?}"
            ))),
        }
    }
    fn long(&mut self, k: &str) -> Result<i64, CodecError> {
        match self.take(k)? {
            Value::Long(i) | Value::TimestampMicros(i) => Ok(i),
            Value::Int(i) => Ok(i as i64),
            other => Err(shape(format!("{k}: expected long, found {other:?}"))),
        }
    }
    fn opt_long(&mut self, k: &str) -> Result<Option<i64>, CodecError> {
        match self.take(k)? {
            Value::Null => Ok(None),
            Value::Long(i) => Ok(Some(i)),
            Value::Int(i) => Ok(Some(i as i64)),
            other => Err(shape(format!(
                "{k}: expected long or null, found {other:?}"
            ))),
        }
    }
    fn int(&mut self, k: &str) -> Result<i32, CodecError> {
        match self.take(k)? {
            Value::Int(i) => Ok(i),
            other => Err(shape(format!("{k}: expected int, found {other:?}"))),
        }
    }
    fn opt_int(&mut self, k: &str) -> Result<Option<i32>, CodecError> {
        match self.take(k)? {
            Value::Null => Ok(None),
            Value::Int(i) => Ok(Some(i)),
            other => Err(shape(format!("{k}: expected int or null, found {other:?}"))),
        }
    }
    fn boolean(&mut self, k: &str) -> Result<bool, CodecError> {
        match self.take(k)? {
            Value::Boolean(b) => Ok(b),
            other => Err(shape(format!("{k}: expected boolean, found {other:?}"))),
        }
    }
    fn opt_bool(&mut self, k: &str) -> Result<Option<bool>, CodecError> {
        match self.take(k)? {
            Value::Null => Ok(None),
            Value::Boolean(b) => Ok(Some(b)),
            other => Err(shape(format!(
                "{k}: expected boolean or null, found {other:?}"
            ))),
        }
    }
    /// A `DomainRef` record field.
    fn domain_ref(&mut self, k: &str) -> Result<DomainRef, CodecError> {
        let mut d = Fields::of(self.take(k)?)?;
        Ok(DomainRef {
            uuid: d.string("uuid")?,
            name: d.string("name")?,
            id: d.opt_int("id")?,
        })
    }
    /// A `StateAfter` record field.
    fn state_reason(&mut self, k: &str) -> Result<StateReason, CodecError> {
        let mut s = Fields::of(self.take(k)?)?;
        Ok(StateReason {
            state: DomainState::parse(&s.symbol("state")?).unwrap_or(DomainState::UNKNOWN),
            state_code: s.int("state_code")?,
            reason: s.string("reason")?,
            reason_code: s.int("reason_code")?,
        })
    }
    fn symbol(&mut self, k: &str) -> Result<String, CodecError> {
        match self.take(k)? {
            Value::Enum(_, s) => Ok(s),
            other => Err(shape(format!("{k}: expected enum, found {other:?}"))),
        }
    }
}

fn event_from_value(v: Value) -> Result<DomainEvent, CodecError> {
    let mut f = Fields::of(v)?;
    let domain = f.domain_ref("domain")?;
    let state_after = f.state_reason("state_after")?;
    Ok(DomainEvent {
        event_id: f.string("event_id")?,
        host_id: f.string("host_id")?,
        epoch: f.string("epoch")?,
        host_seq: f.long("host_seq")? as u64,
        seq: f.long("seq")? as u64,
        domain,
        event: EventType::parse(&f.symbol("event")?).unwrap_or(EventType::UNKNOWN),
        libvirt_event_id: f.int("libvirt_event_id")?,
        event_code: f.int("event_code")?,
        detail: Detail::parse(&f.symbol("detail")?).unwrap_or(Detail::UNKNOWN),
        detail_code: f.int("detail_code")?,
        origin: Origin::parse(&f.symbol("origin")?).unwrap_or(Origin::UNKNOWN),
        state_after,
        persistent: f.boolean("persistent")?,
        autostart: f.opt_bool("autostart")?,
        vcpus: f.opt_int("vcpus")?,
        memory_kib: f.opt_long("memory_kib")?,
        config_hash: f.opt_string("config_hash")?,
        observed_at: f.long("observed_at")?,
        xml: f.opt_string("xml")?,
    })
}

/// Decodes a `DomainSnapshot` message.
pub fn decode_domain_snapshot(bytes: &[u8]) -> Result<DomainSnapshot, CodecError> {
    let (name, value) = decode_value(bytes)?;
    if name != "DomainSnapshot" {
        return Err(shape(format!("expected DomainSnapshot, found {name}")));
    }
    let mut f = Fields::of(value)?;
    let domain = f.domain_ref("domain")?;
    let state = f.state_reason("state")?;
    Ok(DomainSnapshot {
        event_id: f.string("event_id")?,
        host_id: f.string("host_id")?,
        epoch: f.string("epoch")?,
        host_seq: f.long("host_seq")? as u64,
        snapshot_id: f.string("snapshot_id")?,
        seq: f.long("seq")? as u64,
        domain,
        state,
        persistent: f.boolean("persistent")?,
        autostart: f.opt_bool("autostart")?,
        vcpus: f.opt_int("vcpus")?,
        memory_kib: f.opt_long("memory_kib")?,
        config_hash: f.opt_string("config_hash")?,
        observed_at: f.long("observed_at")?,
        xml: f.opt_string("xml")?,
    })
}

/// Decodes a `HostSnapshot` message.
pub fn decode_host_snapshot(bytes: &[u8]) -> Result<HostSnapshot, CodecError> {
    let (name, value) = decode_value(bytes)?;
    if name != "HostSnapshot" {
        return Err(shape(format!("expected HostSnapshot, found {name}")));
    }
    let mut f = Fields::of(value)?;
    let ids = match f.take("accepted_event_ids")? {
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(shape(format!(
                    "accepted_event_ids: expected strings, found {other:?}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        other => {
            return Err(shape(format!(
                "accepted_event_ids: expected an array, found {other:?}"
            )))
        }
    };
    Ok(HostSnapshot {
        event_id: f.string("event_id")?,
        host_id: f.string("host_id")?,
        epoch: f.string("epoch")?,
        host_seq: f.long("host_seq")? as u64,
        kind: crate::model::HostSnapshotKind::parse(&f.symbol("kind")?)
            .unwrap_or(crate::model::HostSnapshotKind::UNKNOWN),
        snapshot_id: f.opt_string("snapshot_id")?,
        domain_count: f.int("domain_count")?,
        host_seq_watermark: f.long("host_seq_watermark")? as u64,
        info: crate::model::HostInfo {
            libvirt_uri: f.string("libvirt_uri")?,
            libvirt_driver: f.string("libvirt_driver")?,
            libvirt_version: f.string("libvirt_version")?,
            accepted_event_ids: ids,
        },
        agent_version: f.string("agent_version")?,
        observed_at: f.long("observed_at")?,
    })
}

/// RFC 3339 time (UTC, microseconds) of a µs timestamp.
pub fn rfc3339_micros(us: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(us as i128 * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

/// CloudEvents binary-mode attributes plus schema identification, as
/// (header name, value) pairs; the same on NATS and Kafka.
pub fn cloudevents_headers(
    ce_type: &str,
    event_id: &str,
    host_id: &str,
    observed_at: i64,
    subject: &str,
    content_type: &str,
    schema: &SchemaEntry,
) -> Vec<(&'static str, String)> {
    vec![
        ("ce_specversion", "1.0".to_string()),
        ("ce_id", event_id.to_string()),
        ("ce_source", format!("virtstream://{host_id}")),
        ("ce_type", ce_type.to_string()),
        ("ce_time", rfc3339_micros(observed_at)),
        ("ce_subject", subject.to_string()),
        ("content-type", content_type.to_string()),
        (
            "virtstream-schema",
            format!("io.virtstream.{}.v{}", schema.name, schema.version),
        ),
        (
            "virtstream-schema-fingerprint",
            format!("{:016x}", schema.fingerprint),
        ),
    ]
}

/// JSON form of a `DomainEvent` (the opt-in JSON encoding and `replay`).
pub fn event_to_json(e: &DomainEvent) -> serde_json::Value {
    serde_json::json!({
        "event_id": e.event_id,
        "host_id": e.host_id,
        "epoch": e.epoch,
        "host_seq": e.host_seq,
        "seq": e.seq,
        "domain": {"uuid": e.domain.uuid, "name": e.domain.name, "id": e.domain.id},
        "event": e.event.as_str(),
        "libvirt_event_id": e.libvirt_event_id,
        "event_code": e.event_code,
        "detail": e.detail.as_str(),
        "detail_code": e.detail_code,
        "origin": e.origin.as_str(),
        "state_after": {
            "state": e.state_after.state.as_str(),
            "state_code": e.state_after.state_code,
            "reason": e.state_after.reason,
            "reason_code": e.state_after.reason_code,
        },
        "persistent": e.persistent,
        "autostart": e.autostart,
        "vcpus": e.vcpus,
        "memory_kib": e.memory_kib,
        "config_hash": e.config_hash,
        "observed_at": e.observed_at,
        "xml": e.xml,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{event_id, HOST_UUID};

    pub fn sample() -> DomainEvent {
        DomainEvent {
            event_id: event_id("host-a", "7f3c", 1042),
            host_id: "host-a".into(),
            epoch: "7f3c".into(),
            host_seq: 1042,
            seq: 17,
            domain: DomainRef {
                uuid: "b9906489-6d5b-40f8-a742-ca71b2b84277".into(),
                name: "core_node".into(),
                id: Some(12),
            },
            event: EventType::RESUMED,
            libvirt_event_id: 0,
            event_code: 4,
            detail: Detail::MIGRATED,
            detail_code: 1,
            origin: Origin::LIBVIRT,
            state_after: StateReason::named(DomainState::RUNNING, "MIGRATED"),
            persistent: true,
            autostart: Some(false),
            vcpus: Some(4),
            memory_kib: Some(8_388_608),
            config_hash: Some("sha256:00".into()),
            observed_at: 1_795_312_588_856_123,
            xml: None,
        }
    }

    #[test]
    fn direct_reader_agrees_with_apache_avro() {
        let mut variants = vec![sample()];
        let mut e = sample();
        e.domain.id = None;
        e.autostart = None;
        e.vcpus = None;
        e.memory_kib = None;
        e.config_hash = None;
        e.xml = Some("<domain>ünïcode</domain>".into());
        e.observed_at = -1;
        e.host_seq = u64::MAX >> 1;
        variants.push(e);
        let mut e = sample();
        e.event = EventType::GAP;
        e.detail = Detail::JOURNAL_FULL;
        e.domain.uuid = HOST_UUID.into();
        e.state_after = StateReason::from_codes(42, 99);
        variants.push(e);
        for e in variants {
            let bytes = encode_event(&e);
            let direct = decode_event(&bytes).expect("direct");
            let generic = decode_event_generic(&bytes).expect("generic");
            assert_eq!(direct, generic);
            assert_eq!(direct, e);
        }
    }

    #[test]
    fn truncated_or_corrupt_events_are_errors_not_panics() {
        let bytes = encode_event(&sample());
        // The last byte is the index of the trailing `xml` union, which
        // apache-avro (and so the direct reader) reads as null when the
        // datum ends before it; any shorter prefix is an error.
        for n in 0..bytes.len() - 1 {
            assert!(decode_event(&bytes[..n]).is_err(), "prefix of {n} bytes");
            assert!(
                decode_event_generic(&bytes[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
        assert_eq!(decode_event(&bytes[..bytes.len() - 1]).unwrap(), sample());
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(decode_event(&long), Err(CodecError::Trailing(1))));
        // Every single-byte corruption of the datum decodes or errs cleanly.
        for i in 10..bytes.len() {
            for b in [0x00u8, 0x7f, 0x80, 0xff] {
                let mut c = bytes.clone();
                c[i] = b;
                let _ = decode_event(&c);
            }
        }
        // A corrupt length asks for a huge allocation: an error, not an
        // abort (found by the fuzz target).
        let mut huge =
            encode_host_snapshot(&sample_host(crate::model::HostSnapshotKind::HEARTBEAT));
        huge.truncate(12);
        huge.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode_host_snapshot(&huge).is_err());
        let mut bad_enum = encode_event(&sample());
        let at = bad_enum.len() - 1; // last byte: xml null branch
        bad_enum[at] = 4; // branch 2
        let err = decode_event(&bad_enum).unwrap_err().to_string();
        assert!(
            err.contains("xml") && err.contains("union branch 2"),
            "{err}"
        );
    }

    #[test]
    fn json_bodies_convert_back_to_the_same_records() {
        let e = sample();
        let (_, json) = decode_json(&encode_event(&e)).unwrap();
        let back = json_to_avro("DomainEvent", &json).unwrap();
        assert_eq!(decode_event(&back).unwrap(), e);
        let d = sample_snapshot();
        let (_, json) = decode_json(&encode_domain_snapshot(&d)).unwrap();
        let back = json_to_avro("DomainSnapshot", &json).unwrap();
        assert_eq!(decode_domain_snapshot(&back).unwrap(), d);
        let h = sample_host(crate::model::HostSnapshotKind::HEARTBEAT);
        let (_, json) = decode_json(&encode_host_snapshot(&h)).unwrap();
        let back = json_to_avro("HostSnapshot", &json).unwrap();
        assert_eq!(decode_host_snapshot(&back).unwrap(), h);
        let err = json_to_avro("DomainEvent", &serde_json::json!({"seq": "x"})).unwrap_err();
        assert!(err.to_string().contains("from JSON"), "{err}");
    }

    pub fn sample_snapshot() -> DomainSnapshot {
        let e = sample();
        DomainSnapshot {
            event_id: event_id("host-a", "7f3c", 1050),
            host_id: e.host_id,
            epoch: e.epoch,
            host_seq: 1050,
            snapshot_id: event_id("host-a", "7f3c", 1049),
            seq: e.seq,
            domain: e.domain,
            state: e.state_after,
            persistent: true,
            autostart: None,
            vcpus: Some(4),
            memory_kib: None,
            config_hash: Some("sha256:00".into()),
            observed_at: e.observed_at,
            xml: Some("<domain/>".into()),
        }
    }

    pub fn sample_host(kind: crate::model::HostSnapshotKind) -> HostSnapshot {
        HostSnapshot {
            event_id: event_id("host-a", "7f3c", 1049),
            host_id: "host-a".into(),
            epoch: "7f3c".into(),
            host_seq: 1049,
            kind,
            snapshot_id: Some(event_id("host-a", "7f3c", 1049)),
            domain_count: 3,
            host_seq_watermark: 1048,
            info: crate::model::HostInfo {
                libvirt_uri: "qemu:///system".into(),
                libvirt_driver: "QEMU".into(),
                libvirt_version: "9.0.0".into(),
                accepted_event_ids: vec!["LIFECYCLE".into(), "REBOOT".into()],
            },
            agent_version: AGENT_VERSION.into(),
            observed_at: 1_795_312_588_856_123,
        }
    }

    #[test]
    fn snapshot_records_round_trip_through_the_schema_files() {
        let d = sample_snapshot();
        let bytes = encode_domain_snapshot(&d);
        assert_eq!(decode_domain_snapshot(&bytes).unwrap(), d);
        assert_eq!(decode_json(&bytes).unwrap().0, "DomainSnapshot");
        for kind in [
            crate::model::HostSnapshotKind::ROUND_BEGIN,
            crate::model::HostSnapshotKind::ROUND_END,
            crate::model::HostSnapshotKind::HEARTBEAT,
        ] {
            let mut h = sample_host(kind);
            let bytes = encode_host_snapshot(&h);
            assert_eq!(decode_host_snapshot(&bytes).unwrap(), h);
            h.snapshot_id = None;
            h.info.accepted_event_ids.clear();
            let bytes = encode_host_snapshot(&h);
            assert_eq!(decode_host_snapshot(&bytes).unwrap(), h);
        }
        // Each decoder refuses the other records.
        assert!(decode_host_snapshot(&encode_domain_snapshot(&d)).is_err());
        assert!(decode_event(&encode_domain_snapshot(&d)).is_err());
        assert!(decode_domain_snapshot(&encode_event(&sample())).is_err());
    }

    #[test]
    fn encoder_output_is_valid_avro_for_the_schema_file() {
        let e = sample();
        let bytes = encode_event(&e);
        // apache-avro decodes what the hand-written encoder produced.
        let schema = &latest("DomainEvent").schema;
        let mut datum = &bytes[10..];
        let v = apache_avro::from_avro_datum(schema, &mut datum, None).unwrap();
        assert!(datum.is_empty());
        let j = value_to_json(&v);
        assert_eq!(j["event"], "RESUMED");
        assert_eq!(j["state_after"]["reason"], "MIGRATED");
        assert_eq!(j["domain"]["id"], 12);
        assert_eq!(decode_event(&bytes).unwrap(), e);
    }

    #[test]
    fn every_symbol_and_null_round_trips() {
        let mut e = sample();
        e.domain.id = None;
        e.autostart = None;
        e.vcpus = None;
        e.memory_kib = None;
        e.config_hash = None;
        e.xml = Some("<domain/>".into());
        e.domain.uuid = HOST_UUID.into();
        for ev in EventType::ALL {
            for d in Detail::ALL {
                e.event = *ev;
                e.detail = *d;
                assert_eq!(decode_event(&encode_event(&e)).unwrap(), e);
            }
        }
        for st in DomainState::ALL {
            e.state_after.state = *st;
            for o in Origin::ALL {
                e.origin = *o;
                assert_eq!(decode_event(&encode_event(&e)).unwrap(), e);
            }
        }
    }

    #[test]
    fn enum_symbols_match_the_schema_file() {
        let text = SCHEMA_FILES[0].2;
        let j: serde_json::Value = serde_json::from_str(text).unwrap();
        let fields = j["fields"].as_array().unwrap();
        let symbols = |name: &str| -> Vec<String> {
            fn find(v: &serde_json::Value, name: &str) -> Option<Vec<String>> {
                match v {
                    serde_json::Value::Object(m) => {
                        if m.get("type").and_then(|t| t.as_str()) == Some("enum")
                            && m.get("name").and_then(|n| n.as_str()) == Some(name)
                        {
                            return Some(
                                m["symbols"]
                                    .as_array()
                                    .unwrap()
                                    .iter()
                                    .map(|s| s.as_str().unwrap().to_string())
                                    .collect(),
                            );
                        }
                        m.values().find_map(|v| find(v, name))
                    }
                    serde_json::Value::Array(a) => a.iter().find_map(|v| find(v, name)),
                    _ => None,
                }
            }
            find(&serde_json::Value::Array(fields.clone()), name).unwrap()
        };
        let names = |all: Vec<&str>| all.into_iter().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            symbols("EventType"),
            names(EventType::ALL.iter().map(|s| s.as_str()).collect())
        );
        assert_eq!(
            symbols("EventDetail"),
            names(Detail::ALL.iter().map(|s| s.as_str()).collect())
        );
        assert_eq!(
            symbols("Origin"),
            names(Origin::ALL.iter().map(|s| s.as_str()).collect())
        );
        assert_eq!(
            symbols("DomainState"),
            names(DomainState::ALL.iter().map(|s| s.as_str()).collect())
        );
    }

    #[test]
    fn fingerprint_matches_apache_avro() {
        let entry = latest("DomainEvent");
        let theirs = entry
            .schema
            .fingerprint::<apache_avro::rabin::Rabin>()
            .bytes;
        // apache-avro renders the Rabin digest little-endian, as single-object framing wants.
        assert_eq!(theirs, entry.fingerprint.to_le_bytes().to_vec());
        // The spec's test vector: fingerprint of the canonical form `"null"`.
        assert_eq!(crc64_avro(b"\"null\""), 0x63dd_24e7_cc25_8f8a);
    }

    #[test]
    fn garbage_gives_errors_not_panics() {
        assert!(matches!(decode_event(b"abc"), Err(CodecError::TooShort(3))));
        assert!(matches!(
            decode_event(&[0u8; 12]),
            Err(CodecError::BadMagic(0, 0))
        ));
        let mut bad_fp = encode_event(&sample());
        bad_fp[2] ^= 0xff;
        assert!(matches!(
            decode_event(&bad_fp),
            Err(CodecError::UnknownFingerprint(_))
        ));
        let good = encode_event(&sample());
        // apache-avro reads a union index cut off at end of input as null,
        // so dropping the final byte (xml = null) is accepted; every other
        // truncation must fail.
        for cut in 10..good.len() - 1 {
            assert!(
                decode_event(&good[..cut]).is_err(),
                "truncated at {cut} decoded"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(decode_event(&long), Err(CodecError::Trailing(1))));
    }

    #[test]
    fn rfc3339_has_microseconds() {
        assert_eq!(
            rfc3339_micros(1_795_312_588_856_123),
            "2026-11-22T01:56:28.856123Z"
        );
    }
}
