//! Decoders of single-object messages into this crate's records: the
//! direct reader (`binary`) for `DomainEvent` v1 and v2, `apache-avro` with
//! schema resolution for every other writer schema.
//!
//! Invariants:
//! - decoding never panics: any byte string gives a record or a
//!   `CodecError` naming what is wrong;
//! - a message is read with its writer schema and resolved to the newest
//!   shipped version of its record; bytes left over are an error;
//! - each decoder refuses the other records; enum symbols this build does
//!   not know decode as `UNKNOWN`.

use std::collections::HashMap;

use apache_avro::types::Value;

use super::binary;
use super::schema::{latest, split};
use super::CodecError;
use crate::model::{
    Detail, DomainEvent, DomainRef, DomainSnapshot, DomainState, EventType, HookCall, HostSnapshot,
    Origin, StateReason,
};

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
    if writer.name == "DomainEvent" && matches!(writer.version, 1 | 2) {
        // The wire formats this build writes and wrote: read them directly.
        return binary::domain_event(datum, writer.version);
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
    /// The optional `HookCall` record (absent or null: `None`).
    fn opt_hook(&mut self, k: &str) -> Result<Option<HookCall>, CodecError> {
        if !self.0.contains_key(k) {
            return Ok(None);
        }
        match self.take(k)? {
            Value::Null => Ok(None),
            v @ Value::Record(_) => {
                let mut h = Fields::of(v)?;
                Ok(Some(HookCall {
                    operation: h.string("operation")?,
                    sub_operation: h.string("sub_operation")?,
                    extra: h.string("extra")?,
                }))
            }
            other => Err(shape(format!(
                "{k}: expected HookCall or null, found {other:?}"
            ))),
        }
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
        hook: f.opt_hook("hook")?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode::{encode_event, encode_host_snapshot};
    use crate::codec::tests::{sample, sample_host};
    use crate::model::HOST_UUID;

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
        // The last two bytes are the indexes of the trailing `xml` and
        // `hook` unions, which apache-avro (and so the direct reader) reads
        // as null when the datum ends before them; any shorter prefix is an
        // error.
        for n in 0..bytes.len() - 2 {
            assert!(decode_event(&bytes[..n]).is_err(), "prefix of {n} bytes");
            assert!(
                decode_event_generic(&bytes[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
        for cut in 1..=2 {
            assert_eq!(decode_event(&bytes[..bytes.len() - cut]).unwrap(), sample());
            assert_eq!(
                decode_event_generic(&bytes[..bytes.len() - cut]).unwrap(),
                sample()
            );
        }
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
        let at = bad_enum.len() - 2; // xml null branch (hook's is last)
        bad_enum[at] = 4; // branch 2
        let err = decode_event(&bad_enum).unwrap_err().to_string();
        assert!(
            err.contains("xml") && err.contains("union branch 2"),
            "{err}"
        );
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
        // so dropping the final bytes (xml, hook = null) is accepted; every
        // other truncation must fail.
        for cut in 10..good.len() - 2 {
            assert!(
                decode_event(&good[..cut]).is_err(),
                "truncated at {cut} decoded"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(decode_event(&long), Err(CodecError::Trailing(1))));
    }
}
