//! Unit tests of the rebuild, one rule at a time (helpers shared with
//! the audit and usage tests).

use super::*;
use crate::consumer::lanes::Piped;
use crate::consumer::liveness::Liveness;
use crate::consumer::record::{Position, RecordError};
use crate::model::{
    event_id, Detail, DomainEvent, DomainRef, DomainSnapshot, DomainState, EventType, HostInfo,
    HostSnapshot, HostSnapshotKind, Origin, StateReason, AGENT_VERSION,
};
use std::sync::Arc;

pub(crate) const U1: &str = "00000000-0000-4000-8000-000000000001";
pub(crate) const U2: &str = "00000000-0000-4000-8000-000000000002";

pub(crate) fn pos(src: &str, offset: u64) -> Position {
    Position {
        source: Arc::from(src),
        partition: None,
        offset,
        time_us: None,
    }
}

pub(crate) fn ev(epoch: &str, hs: u64, uuid: &str, seq: u64, state: DomainState) -> Body {
    let event = match state {
        DomainState::RUNNING => EventType::STARTED,
        DomainState::PAUSED => EventType::SUSPENDED,
        _ => EventType::STOPPED,
    };
    Body::Event(DomainEvent {
        event_id: event_id("h", epoch, hs),
        host_id: "h".into(),
        epoch: epoch.into(),
        host_seq: hs,
        seq,
        domain: DomainRef {
            uuid: uuid.into(),
            name: format!("vm-{}", &uuid[uuid.len() - 1..]),
            id: None,
        },
        event,
        libvirt_event_id: 0,
        event_code: event.lifecycle_code().unwrap_or(-1),
        detail: Detail::UNKNOWN,
        detail_code: -1,
        origin: Origin::LIBVIRT,
        state_after: StateReason::named(state, "UNKNOWN"),
        persistent: true,
        autostart: None,
        vcpus: Some(2),
        memory_kib: Some(1024),
        config_hash: None,
        observed_at: hs as i64 * 1_000_000,
        xml: None,
        hook: None,
    })
}

pub(crate) fn host_rec(epoch: &str, hs: u64, kind: HostSnapshotKind, round: u64, n: i32) -> Body {
    Body::Host(HostSnapshot {
        event_id: event_id("h", epoch, hs),
        host_id: "h".into(),
        epoch: epoch.into(),
        host_seq: hs,
        kind,
        snapshot_id: Some(event_id("h", epoch, round)),
        domain_count: n,
        host_seq_watermark: hs - 1,
        info: HostInfo::default(),
        agent_version: AGENT_VERSION.into(),
        observed_at: hs as i64 * 1_000_000,
    })
}

/// A complete round at `begin` listing `(uuid, seq, state)`.
pub(crate) fn round(epoch: &str, begin: u64, doms: &[(&str, u64, DomainState)]) -> Vec<Body> {
    let n = doms.len() as i32;
    let mut v = vec![host_rec(
        epoch,
        begin,
        HostSnapshotKind::ROUND_BEGIN,
        begin,
        n,
    )];
    for (i, (u, seq, st)) in doms.iter().enumerate() {
        let hs = begin + 1 + i as u64;
        v.push(Body::Domain(DomainSnapshot {
            event_id: event_id("h", epoch, hs),
            host_id: "h".into(),
            epoch: epoch.into(),
            host_seq: hs,
            snapshot_id: event_id("h", epoch, begin),
            seq: *seq,
            domain: DomainRef {
                uuid: (*u).into(),
                name: "vm".into(),
                id: None,
            },
            state: StateReason::named(*st, "UNKNOWN"),
            persistent: true,
            autostart: None,
            vcpus: Some(2),
            memory_kib: Some(1024),
            config_hash: None,
            observed_at: hs as i64 * 1_000_000,
            xml: None,
        }));
    }
    v.push(host_rec(
        epoch,
        begin + n as u64 + 1,
        HostSnapshotKind::ROUND_END,
        begin,
        n,
    ));
    v
}

/// Feeds bodies on a non-contiguous lane (positions say nothing).
pub(crate) fn feed(f: &mut Fleet, bodies: impl IntoIterator<Item = Body>) {
    for (i, body) in bodies.into_iter().enumerate() {
        f.apply(
            &Record {
                body,
                pos: pos("S", i as u64 + 1),
            },
            false,
        );
    }
}

pub(crate) fn view(f: &Fleet, uuid: &str) -> Option<DomainView> {
    f.domains().into_iter().find(|d| d.uuid == uuid)
}

#[test]
fn a_seq_jump_makes_only_that_domain_stale_until_a_later_round() {
    let mut f = Fleet::new();
    feed(
        &mut f,
        [
            ev("e", 1, U1, 1, DomainState::SHUTOFF),
            ev("e", 2, U2, 1, DomainState::SHUTOFF),
            ev("e", 10, U1, 4, DomainState::RUNNING),
        ],
    );
    let v = view(&f, U1).unwrap();
    assert!(v.stale, "seq 1 → 4");
    assert_eq!(
        (v.state.as_str(), v.seq),
        ("RUNNING", 4),
        "the newest state applies"
    );
    assert!(v.stale_reason.unwrap().contains("seq jumps from 1 to 4"));
    assert!(
        !view(&f, U2).unwrap().stale,
        "the other domain is not touched"
    );
    // A round that began before the jump's event does not clear it.
    feed(
        &mut f,
        round(
            "e",
            4,
            &[(U1, 3, DomainState::PAUSED), (U2, 1, DomainState::SHUTOFF)],
        ),
    );
    let v = view(&f, U1).unwrap();
    assert!(v.stale);
    assert_eq!(v.state, "RUNNING", "the round is older than the event");
    feed(
        &mut f,
        round(
            "e",
            12,
            &[(U1, 4, DomainState::RUNNING), (U2, 1, DomainState::SHUTOFF)],
        ),
    );
    assert!(
        !view(&f, U1).unwrap().stale,
        "a later complete round clears it"
    );
}

#[test]
fn a_gap_marker_makes_the_host_stale_until_the_next_complete_round() {
    let mut f = Fleet::new();
    feed(&mut f, [ev("e", 1, U1, 1, DomainState::RUNNING)]);
    let mut gap = ev("e", 2, crate::model::HOST_UUID, 0, DomainState::NOSTATE);
    if let Body::Event(e) = &mut gap {
        e.event = EventType::GAP;
        e.detail = Detail::QUEUE_OVERFLOW;
    }
    feed(&mut f, [gap]);
    let v = view(&f, U1).unwrap();
    assert!(v.stale && v.stale_reason.unwrap().contains("QUEUE_OVERFLOW"));
    // An incomplete round (END missing) repairs nothing.
    let mut r = round("e", 3, &[(U1, 2, DomainState::PAUSED)]);
    let end = r.pop().unwrap();
    feed(&mut f, r);
    assert!(view(&f, U1).unwrap().stale);
    assert_eq!(view(&f, U1).unwrap().state, "RUNNING");
    feed(&mut f, [end]);
    let v = view(&f, U1).unwrap();
    assert!(!v.stale);
    assert_eq!((v.state.as_str(), v.seq), ("PAUSED", 2));
}

#[test]
fn a_compacted_round_completes_from_the_heartbeat_that_names_it() {
    // What a late reader of the compacted snapshot stream finds: the
    // round's domain records, a heartbeat naming the round (its
    // BEGIN/END were replaced), no events of the deleted domain.
    let mut f = Fleet::new();
    feed(&mut f, [ev("e", 1, U2, 1, DomainState::SHUTOFF)]);
    let mut r = round("e", 10, &[(U1, 5, DomainState::RUNNING)]);
    r.retain(|b| matches!(b, Body::Domain(_)));
    feed(&mut f, r.clone());
    assert!(view(&f, U1).is_none(), "not complete without its end");
    feed(
        &mut f,
        [host_rec("e", 20, HostSnapshotKind::HEARTBEAT, 10, 2)],
    );
    assert!(view(&f, U1).is_none(), "the heartbeat says two domains");
    feed(
        &mut f,
        [host_rec("e", 21, HostSnapshotKind::HEARTBEAT, 10, 1)],
    );
    let v = view(&f, U1).unwrap();
    assert_eq!((v.state.as_str(), v.seq, v.stale), ("RUNNING", 5, false));
    assert!(
        view(&f, U2).is_none(),
        "absent from a complete round: deleted"
    );
    // Older events of the deleted domain cannot bring it back.
    feed(&mut f, [ev("e", 3, U2, 2, DomainState::RUNNING)]);
    assert!(view(&f, U2).is_none());
    assert_eq!(f.stats().rounds_applied, 1);
}

#[test]
fn an_epoch_change_is_stale_until_a_round_of_the_new_epoch() {
    let mut f = Fleet::new();
    feed(&mut f, round("old", 1, &[(U1, 1, DomainState::RUNNING)]));
    let mut first = ev("new", 1, U1, 1, DomainState::PAUSED);
    if let Body::Event(e) = &mut first {
        e.observed_at = 100_000_000; // after everything of the old epoch
    }
    feed(&mut f, [first]);
    let v = view(&f, U1).unwrap();
    assert_eq!((v.state.as_str(), v.epoch.as_str()), ("PAUSED", "new"));
    assert!(v.stale && v.stale_reason.unwrap().contains("epoch changed"));
    // A straggler of the old epoch changes nothing.
    let mut old = ev("old", 9, U1, 2, DomainState::SHUTOFF);
    if let Body::Event(e) = &mut old {
        e.observed_at = 0;
    }
    feed(&mut f, [old]);
    assert_eq!(f.stats().old_epoch, 4, "the old round and the straggler");
    feed(&mut f, round("new", 2, &[(U1, 1, DomainState::PAUSED)]));
    assert!(!view(&f, U1).unwrap().stale);
}

#[test]
fn a_position_hole_is_bounded_by_the_hosts_next_record() {
    let mut f = Piped::new(Fleet::new());
    let lane_rec = |body, offset| Record {
        body,
        pos: pos("EV", offset),
    };
    f.record(&lane_rec(ev("e", 1, U1, 1, DomainState::RUNNING), 1), true);
    // Position 2 is missing; this host's next record there is host_seq 3.
    f.record(&lane_rec(ev("e", 3, U1, 2, DomainState::PAUSED), 3), true);
    assert!(view(&f.feed, U1).unwrap().stale);
    feed(&mut f.feed, round("e", 2, &[(U1, 1, DomainState::RUNNING)]));
    assert!(
        view(&f.feed, U1).unwrap().stale,
        "the round began before the bound"
    );
    feed(&mut f.feed, round("e", 4, &[(U1, 2, DomainState::PAUSED)]));
    assert!(!view(&f.feed, U1).unwrap().stale);
    // A last message deleted: the stream's end says so.
    f.lane_end(&pos("EV", 0).lane(), 5, None);
    assert!(view(&f.feed, U1).unwrap().stale);
}

#[test]
fn a_host_quiet_after_a_hole_is_stale_until_a_round_taken_after_it() {
    let mut f = Piped::new(Fleet::new().with_clock_skew(std::time::Duration::from_secs(1)));
    // Host h published at position 1; position 2 is lost (another
    // host's message after it, at broker time 100 s). h has nothing
    // after the hole.
    let rec = |body, offset, t: i64| Record {
        body,
        pos: Position {
            time_us: Some(t * 1_000_000),
            ..pos("EV", offset)
        },
    };
    f.record(&rec(ev("e", 1, U1, 1, DomainState::RUNNING), 1, 1), true);
    let mut other = ev("e", 1, U2, 1, DomainState::RUNNING);
    if let Body::Event(e) = &mut other {
        e.host_id = "other".into();
    }
    f.record(&rec(other, 3, 100), true);
    assert!(
        view(&f.feed, U1).unwrap().stale,
        "h may have lost its message"
    );
    // A complete round of h taken before the hole's time: not enough.
    feed(&mut f.feed, round("e", 2, &[(U1, 1, DomainState::RUNNING)]));
    assert!(view(&f.feed, U1).unwrap().stale);
    // One taken after it (observed at 120 s): covered.
    let mut r = round("e", 10, &[(U1, 1, DomainState::RUNNING)]);
    for b in &mut r {
        match b {
            Body::Host(h) => h.observed_at = 120_000_000,
            Body::Domain(d) => d.observed_at = 120_000_000,
            _ => {}
        }
    }
    feed(&mut f.feed, r);
    assert!(!view(&f.feed, U1).unwrap().stale);
    // An undecodable message later in the lane is a loss again.
    let lost = Position {
        time_us: Some(200_000_000),
        ..pos("EV", 4)
    };
    f.undecodable(&lost, &RecordError::Tombstone("ce_id"), true);
    assert!(view(&f.feed, U1).unwrap().stale);
}

#[test]
fn a_kafka_partition_read_from_past_offset_0_lost_its_head() {
    let mut f = Piped::new(Fleet::new());
    let p = Position {
        partition: Some(2),
        ..pos("topic", 1)
    };
    f.record(
        &Record {
            body: ev("e", 1, U1, 1, DomainState::RUNNING),
            pos: p,
        },
        true,
    );
    assert!(view(&f.feed, U1).unwrap().stale);
}

#[test]
fn hostile_numbers_neither_panic_nor_apply() {
    let mut f = Fleet::new();
    // A round whose end would overflow, and one with a negative count.
    let far = u64::MAX - 1;
    feed(
        &mut f,
        [
            host_rec("e", 5, HostSnapshotKind::ROUND_END, far, 1),
            host_rec("e", 6, HostSnapshotKind::ROUND_END, 3, -1),
            ev("e", u64::MAX, U1, u64::MAX, DomainState::RUNNING),
            ev("e", 7, U2, 0, DomainState::RUNNING),
        ],
    );
    assert_eq!(f.stats().rounds_applied, 0);
    assert!(view(&f, U1).is_some());
}

#[test]
fn an_old_epochs_staleness_ends_with_the_new_epochs_round() {
    let mut f = Fleet::new();
    feed(
        &mut f,
        [
            ev("old", 1, U1, 1, DomainState::RUNNING),
            ev("old", 2, U1, 5, DomainState::PAUSED),
        ],
    );
    assert!(view(&f, U1).unwrap().stale);
    let mut first = ev("new", 1, U1, 1, DomainState::RUNNING);
    if let Body::Event(e) = &mut first {
        e.observed_at = 100_000_000;
    }
    feed(&mut f, [first]);
    feed(&mut f, round("new", 2, &[(U1, 1, DomainState::RUNNING)]));
    let v = view(&f, U1).unwrap();
    assert!(!v.stale, "{:?}", v.stale_reason);
}

/// Feeds bodies at explicit positions of lane `src`.
fn feed_at(f: &mut Fleet, src: &str, bodies: impl IntoIterator<Item = (u64, Body)>) {
    for (offset, body) in bodies {
        f.apply(
            &Record {
                body,
                pos: pos(src, offset),
            },
            false,
        );
    }
}

fn stamped(mut b: Body, t: i64) -> Body {
    match &mut b {
        Body::Event(e) => e.observed_at = t,
        Body::Domain(d) => d.observed_at = t,
        Body::Host(h) => h.observed_at = t,
        Body::Tombstone(_) => {}
    }
    b
}

#[test]
fn a_new_epoch_stamped_before_the_old_one_still_replaces_it() {
    // The old epoch ran at ~1000 s; its journal was recreated and the
    // clock stepped back an hour, so the new epoch stamps ~1000 s - 3600 s.
    let back = |b: Body| {
        let t = b.observed_at().unwrap() - 3_600_000_000 + 1_000_000_000;
        stamped(b, t)
    };
    let fwd = |b: Body| {
        let t = b.observed_at().unwrap() + 1_000_000_000;
        stamped(b, t)
    };
    let mut f = Fleet::new();
    // Snapshots first: the new epoch's complete round (compacted stream).
    let r = round("new", 2, &[(U1, 1, DomainState::PAUSED)]);
    feed_at(
        &mut f,
        "SNAP",
        r.into_iter().map(back).zip(10..).map(|(b, o)| (o, b)),
    );
    // Then the events partition: the old epoch's events, then the new's.
    feed_at(
        &mut f,
        "EV",
        [
            (1, fwd(ev("old", 1, U1, 1, DomainState::RUNNING))),
            (2, fwd(ev("old", 2, U2, 1, DomainState::RUNNING))),
            (3, back(ev("new", 1, U1, 1, DomainState::PAUSED))),
        ],
    );
    let v = view(&f, U1).unwrap();
    assert_eq!(
        (v.epoch.as_str(), v.state.as_str(), v.stale),
        ("new", "PAUSED", false),
        "{:?}",
        v.stale_reason
    );
    assert!(view(&f, U2).is_none(), "absent from the new epoch's round");
    assert_eq!(f.stats().old_epoch, 2);
    let h = &f.hosts()[0];
    assert_eq!((h.epoch.as_str(), h.stale), ("new", false));
}

#[test]
fn a_silent_host_makes_its_domains_stale_from_its_last_heartbeat() {
    let rule = Liveness::new(std::time::Duration::from_secs(1), 3);
    let bodies = || {
        let mut v = round("e", 1, &[(U1, 1, DomainState::RUNNING)]);
        v.push(host_rec("e", 10, HostSnapshotKind::HEARTBEAT, 1, 1));
        // Read late: an older heartbeat stamped later (clock stepped back
        // since) does not count as the last word.
        v.push(stamped(
            host_rec("e", 5, HostSnapshotKind::HEARTBEAT, 1, 1),
            99_000_000,
        ));
        v
    };
    let mut live = Fleet::new().with_liveness(rule, 13_000_000);
    feed(&mut live, bodies());
    assert!(
        !view(&live, U1).unwrap().stale,
        "3 s after the heartbeat: live"
    );
    let mut silent = Fleet::new().with_liveness(rule, 14_000_000);
    feed(&mut silent, bodies());
    let v = view(&silent, U1).unwrap();
    assert_eq!(v.state, "RUNNING", "the last known state is kept");
    let why = v.stale_reason.expect("stale");
    assert!(
        why.contains("host h is silent since 1970-01-01T00:00:13"),
        "{why}"
    );
    assert!(silent.hosts()[0].stale);
    // Without the rule (a library user that did not ask): not stale.
    let mut f = Fleet::new();
    feed(&mut f, bodies());
    assert!(!view(&f, U1).unwrap().stale);
}

/// An event of `host` with the given event, detail and state after it.
fn mig(host: &str, hs: u64, seq: u64, e: (EventType, Detail), s: (DomainState, &str)) -> Body {
    let Body::Event(mut ev) = ev("e", hs, U1, seq, s.0) else {
        unreachable!()
    };
    ev.host_id = host.into();
    ev.event_id = event_id(host, "e", hs);
    ev.event = e.0;
    ev.detail = e.1;
    ev.state_after = StateReason::named(s.0, s.1);
    ev.persistent = false;
    Body::Event(ev)
}

#[test]
fn a_domain_is_migrating_from_the_destinations_start_until_it_resumes_or_fails() {
    use DomainState::{PAUSED, RUNNING, SHUTOFF};
    use EventType::{RESUMED, STARTED, STOPPED, SUSPENDED};
    let started = |host, hs| mig(host, hs, 1, (STARTED, Detail::BOOTED), (RUNNING, "BOOTED"));
    let incoming = |hs| {
        mig(
            "b",
            hs,
            1,
            (STARTED, Detail::MIGRATED),
            (PAUSED, "MIGRATION"),
        )
    };
    let migrating = |f: &Fleet| -> Vec<(String, Option<Migration>)> {
        f.domains()
            .into_iter()
            .map(|d| (d.host_id, d.migration))
            .collect()
    };
    let m = Migration {
        from: "a".into(),
        to: "b".into(),
        since: 5_000_000,
    };
    // Success: B starts paused, A switches over, B resumes, A stops.
    let mut f = Fleet::new();
    feed(&mut f, [started("a", 1), incoming(5)]);
    assert_eq!(
        migrating(&f),
        vec![("a".into(), Some(m.clone())), ("b".into(), Some(m.clone()))]
    );
    feed(
        &mut f,
        [mig(
            "a",
            2,
            2,
            (SUSPENDED, Detail::MIGRATED),
            (PAUSED, "MIGRATION"),
        )],
    );
    assert!(migrating(&f).iter().all(|(_, x)| x.as_ref() == Some(&m)));
    feed(
        &mut f,
        [mig(
            "b",
            6,
            2,
            (RESUMED, Detail::MIGRATED),
            (RUNNING, "MIGRATED"),
        )],
    );
    assert!(migrating(&f).iter().all(|(_, x)| x.is_none()), "over");
    feed(
        &mut f,
        [mig(
            "a",
            3,
            3,
            (STOPPED, Detail::MIGRATED),
            (SHUTOFF, "MIGRATED"),
        )],
    );
    let d = f.domains();
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0].host_id.as_str(), d[0].state.as_str()),
        ("b", "RUNNING")
    );
    // Failure or abort: the destination stops; the source kept running.
    let mut f = Fleet::new();
    feed(&mut f, [started("a", 1), incoming(5)]);
    feed(
        &mut f,
        [mig(
            "b",
            6,
            2,
            (STOPPED, Detail::FAILED),
            (SHUTOFF, "FAILED"),
        )],
    );
    let d = f.domains();
    assert_eq!(d.len(), 1);
    assert!(d[0].migration.is_none() && d[0].state == "RUNNING");
    // A destination waiting with no active source elsewhere (its agent is
    // not on this bus) is not reported as a migration.
    let mut f = Fleet::new();
    feed(&mut f, [incoming(5)]);
    assert!(migrating(&f).iter().all(|(_, x)| x.is_none()));
}

#[test]
fn a_hook_record_continues_the_seq_and_leaves_the_state_as_it_was() {
    // The tracker writes a HOOK record with the state it knew: applied like
    // any record, it changes nothing but the seq.
    let mut f = Fleet::new();
    let mut hook = ev("e", 2, U1, 2, DomainState::RUNNING);
    if let Body::Event(e) = &mut hook {
        e.event = EventType::HOOK;
        e.detail = Detail::HOOK_STOPPED;
        e.origin = Origin::HOOK;
        e.event_code = -1;
        e.hook = Some(crate::model::HookCall {
            operation: "stopped".into(),
            sub_operation: "end".into(),
            extra: "-".into(),
        });
    }
    feed(&mut f, [ev("e", 1, U1, 1, DomainState::RUNNING), hook]);
    let v = view(&f, U1).unwrap();
    assert!(!v.stale, "{:?}", v.stale_reason);
    assert_eq!((v.state.as_str(), v.seq), ("RUNNING", 2));
    feed(&mut f, [ev("e", 3, U1, 3, DomainState::SHUTOFF)]);
    let v = view(&f, U1).unwrap();
    assert!(!v.stale);
    assert_eq!((v.state.as_str(), v.seq), ("SHUTOFF", 3));
}
