//! Fuzz target: bytes off a topic never crash the consumer tools.
//!
//! The input is cut into messages (a length byte before each). The first
//! byte of a message picks how it is framed: raw bytes, or a random datum
//! behind the single-object header of one of the shipped schemas (so the
//! Avro decoders are reached at once), with or without a tombstone
//! header. Every message goes through the decoders; whatever decodes is
//! fed to the rebuild, the audit and usage, whose results are then read.
//! A decoder may refuse anything, but must say why and never panic; and the
//! direct `DomainEvent` reader must accept exactly what the generic Avro
//! decoder accepts, with the same result.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtstream::codec;
use virtstream::consumer::audit::{AuditOptions, Auditor};
use virtstream::consumer::lanes::Piped;
use virtstream::consumer::liveness::Liveness;
use virtstream::consumer::rebuild::Fleet;
use virtstream::consumer::record::{self, Headers, Position, Record};
use virtstream::consumer::usage::Usage;

fuzz_target!(|data: &[u8]| {
    let schemas = codec::schemas();
    let now_us = 1_800_000_000_000_000;
    let rule = Liveness::new(std::time::Duration::from_secs(30), 3);
    let mut fleet = Piped::new(Fleet::new().with_liveness(rule, now_us));
    let mut audit = Piped::new(Auditor::new(AuditOptions {
        liveness: rule,
        now_us,
        from_start: true,
    }));
    let mut usage = Piped::new(Usage::new().with_liveness(rule, now_us));
    let source: Arc<str> = Arc::from("FUZZ");
    let mut rest = data;
    let mut offset = 0u64;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize).min(tail.len());
        let (msg, next) = tail.split_at(n);
        rest = next;
        let Some((&mode, body)) = msg.split_first() else {
            continue;
        };
        let framed: Vec<u8> = match mode % 4 {
            0 => body.to_vec(),
            m => {
                let s = &schemas[(m as usize - 1) % schemas.len()];
                let mut v = codec::SINGLE_OBJECT_MAGIC.to_vec();
                v.extend_from_slice(&s.fingerprint.to_le_bytes());
                v.extend_from_slice(body);
                v
            }
        };
        // The decoders, one by one.
        let direct = codec::decode_event(&framed);
        let generic = codec::decode_event_generic(&framed);
        assert_eq!(
            direct.as_ref().ok(),
            generic.as_ref().ok(),
            "direct and generic decoders disagree: {direct:?} vs {generic:?}"
        );
        let _ = codec::decode_domain_snapshot(&framed);
        let _ = codec::decode_host_snapshot(&framed);
        let _ = codec::decode_json(&framed);
        let headers = Headers {
            tombstone: mode & 0x80 != 0,
            ce_id: std::str::from_utf8(body).ok(),
            ce_subject: Some("host/00000000-0000-4000-8000-000000000001"),
        };
        offset += 1 + (mode as u64 & 0x40) / 0x40;
        match record::decode(&framed, headers) {
            Ok(body) => {
                let rec = Record {
                    body,
                    pos: Position {
                        source: source.clone(),
                        partition: (mode & 0x20 != 0).then_some(0),
                        offset,
                        time_us: Some(offset as i64 * 1_000_000),
                    },
                };
                let contiguous = mode & 0x10 != 0;
                fleet.record(&rec, contiguous);
                audit.record(&rec, contiguous);
                usage.record(&rec, contiguous);
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                let pos = Position {
                    source: source.clone(),
                    partition: None,
                    offset,
                    time_us: None,
                };
                fleet.undecodable(&pos, &e, true);
                usage.undecodable(&pos, &e, true);
                audit.undecodable(&pos, &e, true);
            }
        }
    }
    let lane = Position {
        source: source.clone(),
        partition: None,
        offset: 0,
        time_us: None,
    }
    .lane();
    fleet.lane_end(&lane, offset + 2, None);
    usage.lane_end(&lane, offset + 2, None);
    audit.lane_end(&lane, offset + 2, None);
    let _ = fleet.feed.domains();
    let _ = fleet.feed.hosts();
    let report = audit.into_inner().finish();
    let _ = virtstream::consumer::report::audit_text(&report);
    let _ = usage.feed.compute(0, 1_900_000_000_000_000);
});
