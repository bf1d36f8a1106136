//! The shipped Avro schemas and single-object framing: `C3 01`, then the
//! 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
//! Parsing Canonical Form (`canonical.rs`, as Java and fastavro compute
//! it), then the datum.
//!
//! Builds before the fingerprint followed the specification wrote a
//! different one: apache-avro's canonical form keeps a logical-typed
//! primitive as `{"type":"string"}`. Readers accept that *legacy*
//! fingerprint of every shipped schema too, so data already on the buses
//! stays readable; writers use only the specification's.
//!
//! Invariants:
//! - the schema files are compiled in and parsed once; a shipped schema
//!   that does not parse is a build defect (panic at first use);
//! - a fingerprint (current or legacy) names exactly one shipped (record,
//!   version); a message whose header is short, has the wrong magic or an
//!   unknown fingerprint is a `CodecError`, never a guess;
//! - entries journaled by an earlier build keep the bytes they were
//!   encoded with (legacy fingerprint) when published after an upgrade.
//! - every decode goes through [`schemas`] first, which bounds
//!   `apache-avro` allocations ([`MAX_DECODE_ALLOCATION`]).

use std::collections::HashMap;
use std::sync::OnceLock;

use apache_avro::Schema;

use super::canonical::parsing_canonical_form;
use super::CodecError;

/// The schema files shipped with this build: (record name, version, text).
pub const SCHEMA_FILES: &[(&str, u32, &str)] = &[
    (
        "DomainEvent",
        1,
        include_str!("../../schemas/DomainEvent.v1.avsc"),
    ),
    (
        "DomainEvent",
        2,
        include_str!("../../schemas/DomainEvent.v2.avsc"),
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

/// One parsed schema file.
pub struct SchemaEntry {
    pub name: &'static str,
    pub version: u32,
    pub schema: Schema,
    /// The schema file's text (what a schema registry is given).
    pub text: &'static str,
    /// CRC-64-AVRO of the specification's Parsing Canonical Form: what
    /// writers put in the single-object header.
    pub fingerprint: u64,
    /// The fingerprint builds before it wrote (apache-avro's canonical
    /// form); accepted by readers only.
    pub legacy_fingerprint: u64,
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
                let pcf = parsing_canonical_form(text)
                    .unwrap_or_else(|e| panic!("shipped schema {name} v{version}: {e}"));
                SchemaEntry {
                    name,
                    version: *version,
                    text,
                    fingerprint: crc64_avro(pcf.as_bytes()),
                    legacy_fingerprint: crc64_avro(schema.canonical_form().as_bytes()),
                    schema,
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
            .flat_map(|(i, s)| [(s.legacy_fingerprint, i), (s.fingerprint, i)])
            .collect()
    })
}

/// The shipped schema a fingerprint (current or legacy) names.
pub fn by_fingerprint_entry(fp: u64) -> Option<&'static SchemaEntry> {
    by_fingerprint().get(&fp).map(|&i| &schemas()[i])
}

/// The shipped schema whose text is `text` (any JSON layout, logical
/// types or not): found by the fingerprint of its canonical form.
pub fn by_schema_text(text: &str) -> Result<&'static SchemaEntry, CodecError> {
    let pcf = parsing_canonical_form(text)
        .map_err(|e| CodecError::Shape(format!("not an Avro schema: {e}")))?;
    let fp = crc64_avro(pcf.as_bytes());
    by_fingerprint_entry(fp).ok_or(CodecError::UnknownFingerprint(fp))
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

/// The two bytes every Avro single-object message starts with.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xc3, 0x01];

/// Splits a single-object message into its writer schema and datum.
pub(super) fn split(bytes: &[u8]) -> Result<(&'static SchemaEntry, &[u8]), CodecError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Detail, DomainState, EventType, Origin};

    #[test]
    fn enum_symbols_match_the_schema_file() {
        let text = latest("DomainEvent").text;
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
    fn fingerprints_are_those_java_and_fastavro_compute() {
        // Computed by fastavro 1.13.1 (`fastavro.schema.fingerprint(
        // to_parsing_canonical_form(parse_schema(..)), "CRC-64-AVRO")`,
        // hex of the header's bytes) for the shipped files; tests/schemas.rs
        // asks fastavro again at test time.
        let hex = |fp: u64| {
            fp.to_le_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        for (name, want) in [
            ("DomainEvent", "7effbc33c91dc267"),
            ("DomainSnapshot", "46c25d79ec0a9c5c"),
            ("HostSnapshot", "463ccb69c741e340"),
        ] {
            assert_eq!(hex(latest(name).fingerprint), want, "{name}");
        }
        // The spec's test vector: fingerprint of the canonical form `"null"`.
        // The earlier version stays readable under its pinned fingerprint.
        let v1 = schemas()
            .iter()
            .find(|s| s.name == "DomainEvent" && s.version == 1)
            .unwrap();
        assert_eq!(hex(v1.fingerprint), "f6b1dfedc7acc0a3");
        assert_eq!(crc64_avro(b"\"null\""), 0x63dd_24e7_cc25_8f8a);
    }

    #[test]
    fn legacy_fingerprints_still_read_and_name_the_same_schema() {
        for (i, entry) in schemas().iter().enumerate() {
            // apache-avro's own digest of its canonical form is the legacy one.
            let theirs = entry
                .schema
                .fingerprint::<apache_avro::rabin::Rabin>()
                .bytes;
            assert_eq!(theirs, entry.legacy_fingerprint.to_le_bytes().to_vec());
            assert_ne!(
                entry.legacy_fingerprint, entry.fingerprint,
                "{}",
                entry.name
            );
            for fp in [entry.fingerprint, entry.legacy_fingerprint] {
                let mut msg = SINGLE_OBJECT_MAGIC.to_vec();
                msg.extend_from_slice(&fp.to_le_bytes());
                msg.push(0);
                let (w, datum) = split(&msg).unwrap();
                assert!(std::ptr::eq(w, &schemas()[i]));
                assert_eq!(datum, &[0]);
            }
        }
    }
}
