//! Sample records for the tests of the codec and of the sinks.
//!
//! Invariants:
//! - the samples are fixed values with realistic ids and fields, some
//!   optional fields set and some not; tests compare what the decoders and
//!   sinks return against them.

use crate::model::{
    event_id, Detail, DomainEvent, DomainRef, DomainSnapshot, DomainState, EventType, HostSnapshot,
    Origin, StateReason, AGENT_VERSION,
};

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
        hook: None,
    }
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
