//! The hand-written Avro encoders of the records this crate emits.
//!
//! Invariants:
//! - encoding is deterministic: the same record always yields the same
//!   bytes (re-publishing a journal entry is byte-identical);
//! - each encoder follows its schema file (the newest version of `schemas/<Record>.v<N>.avsc`) field by
//!   field, in order; the round-trip tests in `decode` and the
//!   `apache-avro` check in `json` hold it to that.

use super::schema::{latest, SINGLE_OBJECT_MAGIC};
use crate::model::{DomainEvent, DomainSnapshot, HostSnapshot, AGENT_VERSION};

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
    w.opt(&e.hook, |w, h| {
        w.str(&h.operation);
        w.str(&h.sub_operation);
        w.str(&h.extra);
    });
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
