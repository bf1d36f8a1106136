//! Wire encoding: Avro binary in single-object framing (`C3 01` + the
//! 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
//! Parsing Canonical Form + the datum), CloudEvents binary-mode headers, and
//! the decoders the consumer tools use. Split by concern: `canonical` (the
//! specification's canonical form), `schema` (shipped schemas, fingerprints,
//! framing), `encode`, `decode` (with `binary`, the
//! direct `DomainEvent` v1 reader), `json`, `cloudevents`, `confluent`
//! (the schema-registry framing, a re-wrap of the same datum). Public paths are
//! `crate::codec::*`.
//!
//! Invariants:
//! - encoding is deterministic: the same `DomainEvent` always yields the same
//!   bytes (re-publishing a journal entry is byte-identical);
//! - the hand-written encoder follows `schemas/DomainEvent.v2.avsc` field by
//!   field; tests decode its output with `apache-avro` against that file;
//! - decoding never panics: any byte string gives a value or a `CodecError`
//!   naming what is wrong.

mod binary;
mod canonical;
mod cloudevents;
mod confluent;
mod decode;
mod encode;
mod json;
mod schema;
#[cfg(test)]
pub(crate) mod tests;

pub use canonical::{parsing_canonical_form, CanonicalError};
pub use cloudevents::{
    cloudevents_headers, rfc3339_micros, CE_TYPE_DOMAIN_EVENT, CE_TYPE_DOMAIN_SNAPSHOT,
    CE_TYPE_HOST_SNAPSHOT, CONTENT_TYPE_AVRO, CONTENT_TYPE_JSON,
};
pub use confluent::{
    confluent_frame, confluent_id, single_object_from_confluent, writer_entry, CONFLUENT_MAGIC,
};
pub use decode::{
    decode_domain_snapshot, decode_event, decode_event_generic, decode_host_snapshot, decode_value,
};
pub use encode::{encode_domain_snapshot, encode_event, encode_host_snapshot};
pub use json::{decode_json, event_to_json, json_to_avro, value_to_json};
pub use schema::{
    by_fingerprint_entry, by_schema_text, crc64_avro, latest, schemas, writer_of, SchemaEntry,
    MAX_DECODE_ALLOCATION, SCHEMA_FILES, SINGLE_OBJECT_MAGIC,
};

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
