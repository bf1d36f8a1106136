//! CloudEvents binary-mode attributes and the content types of bodies:
//! the headers every published record carries, the same on NATS and Kafka.
//!
//! Invariants:
//! - `ce_id` is the record's event id (what de-duplication keys on) and
//!   `ce_time` its observation time, RFC 3339 in UTC with microseconds;
//! - the schema headers name the writer schema of the body and its
//!   fingerprint, as in the single-object header.

use super::schema::SchemaEntry;

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
            // The header's 8 bytes in order, as fastavro prints a fingerprint.
            schema
                .fingerprint
                .to_le_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_has_microseconds() {
        assert_eq!(
            rfc3339_micros(1_795_312_588_856_123),
            "2026-11-22T01:56:28.856123Z"
        );
    }
}
