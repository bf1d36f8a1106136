//! Confluent wire format ("schema registry framing"): byte 0, the schema's
//! registry id as a 4-byte big-endian integer, then the Avro datum. Used
//! on a bus when `[schema_registry]` is configured; the journal always
//! holds single-object messages, so framing is a re-wrap of the same
//! datum at publish time and its inverse when reading.
//!
//! Invariants:
//! - the datum is never re-encoded: [`confluent_frame`] and
//!   [`single_object_from_confluent`] only swap the 10-byte single-object
//!   header for the 5-byte registry header and back, so both framings of a
//!   journal entry carry byte-identical data;
//! - a byte string is registry-framed exactly when it starts with byte 0
//!   and is at least 5 bytes long (a single-object message starts with
//!   `C3`, a JSON one with `{`).

use super::schema::{split, SchemaEntry, SINGLE_OBJECT_MAGIC};
use super::CodecError;

/// The first byte of a registry-framed message.
pub const CONFLUENT_MAGIC: u8 = 0;

/// The registry id of a registry-framed message, or `None` when the bytes
/// are not registry-framed.
pub fn confluent_id(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [CONFLUENT_MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// The shipped writer schema of a single-object message (current or
/// legacy fingerprint), for the caller to find its registry id.
pub fn writer_entry(single_object: &[u8]) -> Result<&'static SchemaEntry, CodecError> {
    split(single_object).map(|(w, _)| w)
}

/// Re-frames a single-object message as registry framing with `id`.
pub fn confluent_frame(single_object: &[u8], id: u32) -> Result<Vec<u8>, CodecError> {
    let (_, datum) = split(single_object)?;
    let mut out = Vec::with_capacity(5 + datum.len());
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(datum);
    Ok(out)
}

/// Re-frames a registry-framed message whose id names the shipped schema
/// `writer` as a single-object message (what every decoder here reads).
pub fn single_object_from_confluent(
    bytes: &[u8],
    writer: &SchemaEntry,
) -> Result<Vec<u8>, CodecError> {
    if confluent_id(bytes).is_none() {
        return Err(CodecError::TooShort(bytes.len()));
    }
    let datum = &bytes[5..];
    let mut out = Vec::with_capacity(10 + datum.len());
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    out.extend_from_slice(&writer.fingerprint.to_le_bytes());
    out.extend_from_slice(datum);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, tests::sample};

    #[test]
    fn framing_swaps_headers_and_keeps_the_datum() {
        let so = codec::encode_event(&sample());
        let framed = confluent_frame(&so, 0x0102_0304).unwrap();
        assert_eq!(&framed[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(&framed[5..], &so[10..]);
        assert_eq!(confluent_id(&framed), Some(0x0102_0304));
        let w = writer_entry(&so).unwrap();
        assert_eq!(w.name, "DomainEvent");
        let back = single_object_from_confluent(&framed, w).unwrap();
        assert_eq!(back, so);
        assert_eq!(codec::decode_event(&back).unwrap(), sample());
    }

    #[test]
    fn other_framings_are_not_taken_for_registry_framing() {
        let so = codec::encode_event(&sample());
        assert_eq!(confluent_id(&so), None);
        assert_eq!(confluent_id(b"{\"a\":1}"), None);
        assert_eq!(confluent_id(&[0, 0, 0, 1]), None, "too short");
        assert!(confluent_frame(b"{}", 1).is_err(), "not single-object");
        let w = writer_entry(&so).unwrap();
        assert!(single_object_from_confluent(&[0, 0], w).is_err());
    }

    #[test]
    fn a_legacy_fingerprint_frames_with_the_same_writer() {
        let so = codec::encode_event(&sample());
        let w = writer_entry(&so).unwrap();
        let mut legacy = so.clone();
        legacy[2..10].copy_from_slice(&w.legacy_fingerprint.to_le_bytes());
        assert!(std::ptr::eq(writer_entry(&legacy).unwrap(), w));
        assert_eq!(
            confluent_frame(&legacy, 7).unwrap(),
            confluent_frame(&so, 7).unwrap()
        );
    }
}
