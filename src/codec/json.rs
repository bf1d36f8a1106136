//! The JSON form of records (the opt-in JSON body encoding and `replay`)
//! and its way back to Avro, so JSON bodies go through the same decoders
//! as Avro ones.
//!
//! Invariants:
//! - the JSON form follows the schema's field names: enums as their
//!   symbols, unions unwrapped, bytes as hex;
//! - JSON turned back into Avro is resolved against the newest shipped
//!   schema, and a body that does not fit it is a `CodecError` saying it
//!   came from JSON.

use apache_avro::types::Value;

use super::decode::decode_value;
use super::schema::{latest, SINGLE_OBJECT_MAGIC};
use super::CodecError;
use crate::model::DomainEvent;

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
        "hook": e.hook.as_ref().map(|h| serde_json::json!({
            "operation": h.operation,
            "sub_operation": h.sub_operation,
            "extra": h.extra,
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode::{decode_domain_snapshot, decode_event, decode_host_snapshot};
    use crate::codec::encode::{encode_domain_snapshot, encode_event, encode_host_snapshot};
    use crate::codec::tests::{sample, sample_host, sample_snapshot};

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
}
