//! Applying libvirt events: states after, sequence numbers, what attached
//! facts may fill, unknown integers, gap markers.

use crate::model::{Detail, DomainState, EventType, Origin, HOST_UUID};

use super::testkit::{facts, raw, tracker, TableInspector};
use super::types::GapCause;

#[test]
fn lifecycle_sequence_gives_contiguous_seq_and_right_states() {
    let table = TableInspector::default();
    let mut t = tracker(table.clone());
    let u = "11111111-1111-1111-1111-111111111111";
    table.set(u, facts(DomainState::SHUTOFF, "UNKNOWN", true));
    let steps = [
        (0, 0, DomainState::SHUTOFF, true),  // DEFINED/ADDED
        (2, 0, DomainState::RUNNING, true),  // STARTED/BOOTED
        (3, 0, DomainState::PAUSED, true),   // SUSPENDED/PAUSED
        (4, 0, DomainState::RUNNING, true),  // RESUMED/UNPAUSED
        (5, 1, DomainState::SHUTOFF, true),  // STOPPED/DESTROYED
        (1, 0, DomainState::SHUTOFF, false), // UNDEFINED/REMOVED
    ];
    for (i, (ty, d, state, persistent)) in steps.iter().enumerate() {
        let o = t.on_event(&raw(u, *ty, *d));
        assert_eq!(o.event.seq, i as u64 + 1);
        assert_eq!(o.event.host_seq, i as u64 + 1);
        assert_eq!(o.event.state_after.state, *state, "step {i}");
        assert_eq!(o.event.persistent, *persistent, "step {i}");
        assert_eq!(o.event.origin, Origin::LIBVIRT);
    }
    assert!(t.domain(u).unwrap().gone());
    // The lookup table still says RUNNING-ish facts: they never override.
    table.set(u, facts(DomainState::RUNNING, "BOOTED", true));
    let o = t.on_event(&raw(u, 3, 0));
    assert_eq!(o.event.state_after.state, DomainState::PAUSED);
    assert_eq!(o.event.seq, 7, "a returning UUID continues its seq");
}

#[test]
fn lookup_never_overrides_the_event_derived_state() {
    let table = TableInspector::default();
    let mut t = tracker(table.clone());
    let u = "22222222-2222-2222-2222-222222222222";
    // During a burst the lookup already sees the domain paused again.
    table.set(u, facts(DomainState::PAUSED, "USER", false));
    let o = t.on_event(&raw(u, 4, 0)); // RESUMED/UNPAUSED
    assert_eq!(o.event.state_after.state, DomainState::RUNNING);
    assert_eq!(o.event.state_after.reason, "UNPAUSED");
    assert!(
        !o.event.persistent,
        "persistent filled from the lookup for an unseen domain"
    );
    assert_eq!(o.event.vcpus, Some(2));
}

#[test]
fn transient_stop_means_gone_and_unlookupable_domains_still_publish() {
    let table = TableInspector::default();
    let mut t = tracker(table.clone());
    let u = "33333333-3333-3333-3333-333333333333";
    // STARTED for a domain libvirt cannot find (yet): still published.
    let o = t.on_event(&raw(u, 2, 0));
    assert_eq!(o.event.state_after.state, DomainState::RUNNING);
    assert!(!o.event.persistent);
    assert_eq!(o.event.vcpus, None);
    let o = t.on_event(&raw(u, 5, 1));
    assert_eq!(o.event.state_after.state, DomainState::SHUTOFF);
    assert!(!o.event.persistent);
    assert_eq!(o.event.domain.id, None);
    assert!(t.domain(u).unwrap().gone());
}

#[test]
fn unknown_integers_are_published_as_unknown_with_raw_values() {
    let mut t = tracker(TableInspector::default());
    let u = "44444444-4444-4444-4444-444444444444";
    let o = t.on_event(&raw(u, 42, 7));
    assert_eq!(o.event.event, EventType::UNKNOWN);
    assert_eq!(o.event.detail, Detail::UNKNOWN);
    assert_eq!((o.event.event_code, o.event.detail_code), (42, 7));
    let o = t.on_event(&raw(u, 2, 99)); // STARTED/<new detail>
    assert_eq!(o.event.event, EventType::STARTED);
    assert_eq!(o.event.detail, Detail::UNKNOWN);
    assert_eq!(o.event.detail_code, 99);
    assert_eq!(o.event.state_after.state, DomainState::RUNNING);
    let mut reboot = raw(u, -1, -1);
    reboot.event_id = 1;
    let o = t.on_event(&reboot);
    assert_eq!(
        (o.event.event, o.event.detail),
        (EventType::REBOOT, Detail::NONE)
    );
    assert_eq!(o.event.state_after.state, DomainState::RUNNING);
    let mut other = raw(u, -1, -1);
    other.event_id = 77;
    let o = t.on_event(&other);
    assert_eq!(
        (o.event.event, o.event.libvirt_event_id),
        (EventType::UNKNOWN, 77)
    );
}

#[test]
fn migration_destination_is_paused_until_resumed() {
    let mut t = tracker(TableInspector::default());
    let u = "55555555-5555-5555-5555-555555555555";
    let o = t.on_event(&raw(u, 2, 1)); // STARTED/MIGRATED
    assert_eq!(o.event.state_after.state, DomainState::PAUSED);
    let o = t.on_event(&raw(u, 4, 1)); // RESUMED/MIGRATED
    assert_eq!(o.event.state_after.state, DomainState::RUNNING);
    assert_eq!(o.event.state_after.reason, "MIGRATED");
}

#[test]
fn gap_marker_is_host_level() {
    let mut t = tracker(TableInspector::default());
    let g = t.gap(GapCause::Disconnected, 9);
    assert_eq!(g.event.event, EventType::GAP);
    assert_eq!(g.event.detail, Detail::DISCONNECTED);
    assert_eq!(g.event.seq, 0);
    assert_eq!(g.event.host_seq, 1);
    assert_eq!(g.event.domain.uuid, HOST_UUID);
    assert_eq!(g.event.origin, Origin::AGENT);
}
