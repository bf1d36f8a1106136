//! The list + watch rule: a listing never undoes an event delivered after
//! it began, and repairs only what such events could not tell.

use std::collections::HashMap;

use crate::model::{DomainSnapshot, DomainState, EventType, HostInfo, Origin};
use crate::source::RawEvent;

use super::testkit::{facts, Enriched, TableInspector};
use super::types::{DomainRecord, Snap};

const A: &str = "aaaaaaaa-1111-0000-0000-000000000000";
const B: &str = "bbbbbbbb-1111-0000-0000-000000000000";

// libvirt lifecycle codes (virDomainEventType and details).
const DEFINED: i32 = 0;
const UNDEFINED: i32 = 1;
const STARTED: i32 = 2;
const SUSPENDED: i32 = 3;
const STOPPED: i32 = 5;

fn tracker() -> Enriched {
    super::testkit::tracker(TableInspector::default())
}

fn ev(uuid: &str, ty: i32, detail: i32) -> RawEvent {
    super::testkit::raw(uuid, ty, detail)
}

fn info() -> HostInfo {
    HostInfo {
        libvirt_uri: "test:///default".into(),
        libvirt_driver: "TEST".into(),
        libvirt_version: "9.0.0".into(),
        accepted_event_ids: vec!["LIFECYCLE".into()],
    }
}

/// A tracker that knows `A` running and persistent, in a complete round.
fn known_running() -> Enriched {
    let mut t = tracker();
    let l = vec![(A.to_string(), facts(DomainState::RUNNING, "BOOTED", true))];
    t.begin_listing();
    t.on_resync(&l, 1);
    t.round(&l, &info(), 1);
    t
}

fn snapshot_of<'a>(snaps: &'a [Snap], uuid: &str) -> Option<&'a DomainSnapshot> {
    snaps.iter().find_map(|s| match s {
        Snap::Domain(d, _) if d.domain.uuid == uuid => Some(d),
        _ => None,
    })
}

#[test]
fn an_event_after_the_listing_began_is_not_undone() {
    let mut t = known_running();
    t.begin_listing();
    // Listed as running, then suspended before the listing reached the
    // tracker.
    let listing = vec![(A.to_string(), facts(DomainState::RUNNING, "BOOTED", true))];
    let o = t.on_event(&ev(A, SUSPENDED, 0));
    assert_eq!(o.event.state_after.state, DomainState::PAUSED);
    assert!(t.on_resync(&listing, 5).is_empty(), "the listing is older");
    let snaps = t.round(&listing, &info(), 5);
    assert_eq!(
        snapshot_of(&snaps, A).expect("A snapshotted").state.state,
        DomainState::PAUSED
    );
    assert_eq!(t.domain(A).unwrap().state().state, DomainState::PAUSED);
}

#[test]
fn without_events_since_the_barrier_the_listing_repairs() {
    let mut t = known_running();
    t.begin_listing();
    let listing = vec![(A.to_string(), facts(DomainState::PAUSED, "USER", true))];
    let outs = t.on_resync(&listing, 5);
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].event.event, EventType::SUSPENDED);
    assert_eq!(outs[0].event.origin, Origin::RECONCILE);
    // Events before the barrier do not protect a domain either.
    let mut t = known_running();
    t.on_event(&ev(A, SUSPENDED, 0));
    t.begin_listing();
    let listing = vec![(A.to_string(), facts(DomainState::RUNNING, "UNPAUSED", true))];
    let outs = t.on_resync(&listing, 5);
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].event.event, EventType::RESUMED);
}

#[test]
fn a_domain_created_after_the_listing_was_read_is_not_vanished() {
    let mut t = known_running();
    t.begin_listing();
    let listing = vec![(A.to_string(), facts(DomainState::RUNNING, "BOOTED", true))];
    let o = t.on_event(&ev(B, STARTED, 0));
    assert_eq!(o.event.state_after.state, DomainState::RUNNING);
    assert!(t.on_resync(&listing, 5).is_empty());
    let snaps = t.round(&listing, &info(), 5);
    assert_eq!(
        snapshot_of(&snaps, B).expect("B snapshotted").state.state,
        DomainState::RUNNING
    );
    let Snap::Host(begin) = &snaps[0] else {
        panic!("ROUND_BEGIN first")
    };
    assert_eq!(begin.domain_count, 2);
}

#[test]
fn a_domain_destroyed_and_undefined_after_the_listing_stays_gone() {
    let mut t = known_running();
    t.begin_listing();
    let listing = vec![(A.to_string(), facts(DomainState::RUNNING, "BOOTED", true))];
    t.on_event(&ev(A, STOPPED, 1)); // DESTROYED
    let o = t.on_event(&ev(A, UNDEFINED, 0));
    assert!(!o.event.persistent);
    assert!(t.on_resync(&listing, 5).is_empty(), "nothing to repair");
    let snaps = t.round(&listing, &info(), 5);
    assert!(
        snapshot_of(&snaps, A).is_none(),
        "gone domains are not snapshotted"
    );
    assert!(
        snaps
            .iter()
            .any(|s| matches!(s, Snap::Tombstone { uuid, .. } if uuid == A)),
        "the domain of the last round is tombstoned"
    );
}

#[test]
fn an_event_that_only_settles_persistence_leaves_the_state_to_the_listing() {
    // The tracker's state for A is stale (it missed A's stop while
    // disconnected); after the barrier only UNDEFINED arrives. The listing
    // shows A shut off, so with the undefine A is gone.
    let mut t = known_running();
    t.begin_listing();
    let listing = vec![(
        A.to_string(),
        facts(DomainState::SHUTOFF, "DESTROYED", true),
    )];
    t.on_event(&ev(A, UNDEFINED, 0));
    let outs = t.on_resync(&listing, 5);
    assert_eq!(outs.len(), 1, "{outs:?}");
    assert_eq!(outs[0].event.state_after.state, DomainState::SHUTOFF);
    assert!(!outs[0].event.persistent);
    assert!(t.domain(A).unwrap().gone());
    // …and a listing that lacks a domain touched only by UNDEFINED
    // vanishes it.
    let mut t = known_running();
    t.begin_listing();
    t.on_event(&ev(A, UNDEFINED, 0));
    let outs = t.on_resync(&[], 5);
    assert_eq!(outs.len(), 1);
    assert!(t.domain(A).unwrap().gone());
}

#[test]
fn a_domain_defined_after_the_listing_was_read_is_kept() {
    let mut t = known_running();
    t.begin_listing();
    t.on_event(&ev(B, DEFINED, 0));
    let listing = vec![(A.to_string(), facts(DomainState::RUNNING, "BOOTED", true))];
    assert!(t.on_resync(&listing, 5).is_empty());
    assert!(!t.domain(B).unwrap().gone());
}

#[test]
fn a_cancelled_listing_protects_nothing_later() {
    let mut t = known_running();
    t.begin_listing();
    t.on_event(&ev(A, SUSPENDED, 0));
    t.cancel_listing();
    t.begin_listing();
    let listing = vec![(A.to_string(), facts(DomainState::RUNNING, "UNPAUSED", true))];
    // The suspend came before this listing began: the listing is newer.
    assert_eq!(t.on_resync(&listing, 5).len(), 1);
}

#[test]
fn gone_domains_are_forgotten_once_durable_and_continue_their_seq_when_back() {
    let mut t = tracker();
    // What the journal holds: the last record written per domain.
    let mut journal: HashMap<String, DomainRecord> = HashMap::new();
    let mut peak = 0;
    for i in 0..10_000u32 {
        let uuid = format!("{i:08x}-2222-0000-0000-000000000000");
        for ty in [STARTED, STOPPED] {
            let o = t.on_event(&ev(&uuid, ty, if ty == STOPPED { 1 } else { 0 }));
            let (u, r) = o.record.expect("a record");
            journal.insert(u, r);
        }
        if i % 100 == 99 {
            // Everything so far is durable.
            let committed = t.host_seq();
            t.sweep(committed);
            peak = peak.max(t.records_in_memory());
        }
    }
    assert!(peak <= 300, "records held: {peak}");
    // Nothing is forgotten before the journal committed it.
    let u = "ffffffff-2222-0000-0000-000000000000";
    t.on_event(&ev(u, STARTED, 0));
    t.on_event(&ev(u, STOPPED, 1));
    t.sweep(0);
    t.sweep(0);
    assert!(t.knows(u), "not durable yet");
    // A forgotten domain that returns continues its seq.
    let back = "00000000-2222-0000-0000-000000000000";
    assert!(!t.knows(back));
    t.restore(back, journal[back].clone());
    let o = t.on_event(&ev(back, STARTED, 0));
    assert_eq!(o.event.seq, 3);
    // A live domain and one awaiting its tombstone are never forgotten.
    let mut t = known_running();
    t.begin_listing();
    t.on_event(&ev(A, STOPPED, 1));
    t.on_event(&ev(A, UNDEFINED, 0));
    for _ in 0..3 {
        t.sweep(u64::MAX);
    }
    assert!(t.knows(A), "the tombstone of A is still due");
}

#[test]
fn a_redefinition_after_the_listing_was_read_keeps_its_configuration() {
    let mut t = known_running();
    // The lookup after DEFINED/UPDATED sees the new configuration.
    let mut new = facts(DomainState::RUNNING, "BOOTED", true);
    new.config_hash = Some("sha256:new".into());
    new.vcpus = Some(8);
    t.enricher.inspector().set(A, new);
    t.begin_listing();
    // The listing read the old configuration.
    let listing = vec![(A.to_string(), facts(DomainState::RUNNING, "BOOTED", true))];
    let o = t.on_event(&ev(A, DEFINED, 1)); // UPDATED
    assert_eq!(o.event.config_hash.as_deref(), Some("sha256:new"));
    assert!(t.on_resync(&listing, 5).is_empty(), "the listing is older");
    let snaps = t.round(&listing, &info(), 5);
    let snap = snapshot_of(&snaps, A).expect("A snapshotted");
    assert_eq!(snap.config_hash.as_deref(), Some("sha256:new"));
    assert_eq!(snap.vcpus, Some(8));
}

#[test]
fn undefining_a_running_domain_clears_its_autostart() {
    let mut t = tracker();
    let mut f = facts(DomainState::RUNNING, "BOOTED", true);
    f.autostart = Some(true);
    let l = vec![(A.to_string(), f)];
    t.begin_listing();
    t.on_resync(&l, 1);
    let o = t.on_event(&ev(A, UNDEFINED, 0));
    assert!(!o.event.persistent);
    assert_eq!(o.event.autostart, Some(false));
    assert_eq!(o.event.state_after.state, DomainState::RUNNING);
}
