//! Reconciling listings and snapshot rounds.

use crate::model::{DomainState, EventType, HostInfo, HostSnapshotKind, Origin};

use super::testkit::{facts, raw, tracker, TableInspector};
use super::types::Snap;

#[test]
fn rounds_snapshot_every_domain_and_delete_only_after_a_complete_round() {
    let mut t = tracker(TableInspector::default());
    let info = HostInfo {
        libvirt_uri: "test:///default".into(),
        libvirt_driver: "TEST".into(),
        libvirt_version: "9.0.0".into(),
        accepted_event_ids: vec!["LIFECYCLE".into()],
    };
    let a = "aaaaaaaa-0000-0000-0000-000000000000".to_string();
    let b = "bbbbbbbb-0000-0000-0000-000000000000".to_string();
    let listing = vec![
        (a.clone(), facts(DomainState::RUNNING, "BOOTED", true)),
        (b.clone(), facts(DomainState::PAUSED, "USER", false)),
    ];
    let reconciled = t.on_resync(&listing, 5).len() as u64;
    let snaps = t.round(&listing, &info, 5);
    // BEGIN, a, b, END: consecutive host_seq after the reconcile.
    let seqs: Vec<u64> = snaps.iter().map(Snap::host_seq).collect();
    assert_eq!(seqs, (reconciled + 1..=reconciled + 4).collect::<Vec<_>>());
    let Snap::Host(begin) = &snaps[0] else {
        panic!("round starts with ROUND_BEGIN")
    };
    assert_eq!(begin.kind, HostSnapshotKind::ROUND_BEGIN);
    assert_eq!(begin.snapshot_id.as_deref(), Some(begin.event_id.as_str()));
    assert_eq!(begin.domain_count, 2);
    assert_eq!(begin.host_seq_watermark, begin.host_seq - 1);
    let Snap::Domain(sa, Some((_, rec))) = &snaps[1] else {
        panic!("a domain snapshot with its record update")
    };
    assert_eq!(sa.domain.uuid, a);
    assert_eq!(sa.seq, 1, "carries the domain's seq without bumping it");
    assert_eq!(sa.snapshot_id, begin.event_id);
    assert_eq!(sa.state.state, DomainState::RUNNING);
    assert!(rec.in_round && rec.seq == 1);
    let Snap::Host(end) = &snaps[3] else {
        panic!("round ends with ROUND_END")
    };
    assert_eq!(end.kind, HostSnapshotKind::ROUND_END);
    assert_eq!(end.snapshot_id, begin.snapshot_id);
    assert_eq!(end.domain_count, 2);
    // The heartbeat names the last complete round.
    let hb = t.heartbeat(&info, 6);
    assert_eq!(hb.kind, HostSnapshotKind::HEARTBEAT);
    assert_eq!(hb.snapshot_id, begin.snapshot_id);
    assert_eq!(hb.host_seq_watermark, end.host_seq + 1 - 1);
    // b (transient) stops: its event makes it gone, but only the next
    // complete round deletes its snapshot, after ROUND_END.
    let stop = t.on_event(&raw(&b, 5, 2));
    assert!(!stop.record.as_ref().unwrap().1.persistent);
    assert!(
        stop.record.as_ref().unwrap().1.in_round,
        "kept until a round"
    );
    let listing2 = vec![(a.clone(), facts(DomainState::RUNNING, "BOOTED", true))];
    assert!(t.on_resync(&listing2, 7).is_empty());
    let snaps = t.round(&listing2, &info, 7);
    let kinds: Vec<&str> = snaps
        .iter()
        .map(|s| match s {
            Snap::Host(h) => h.kind.as_str(),
            Snap::Domain(..) => "DOMAIN",
            Snap::Tombstone { .. } => "TOMBSTONE",
        })
        .collect();
    assert_eq!(kinds, ["ROUND_BEGIN", "DOMAIN", "ROUND_END", "TOMBSTONE"]);
    let Snap::Tombstone { uuid, record, .. } = &snaps[3] else {
        unreachable!()
    };
    assert_eq!(uuid, &b);
    assert!(!record.as_ref().unwrap().1.in_round);
    // a was already in a round: no record update needed.
    assert!(matches!(&snaps[1], Snap::Domain(_, None)));
    // Deleted once only.
    let snaps = t.round(&listing2, &info, 8);
    assert!(!snaps.iter().any(|s| matches!(s, Snap::Tombstone { .. })));
}

#[test]
fn resync_emits_only_differences_and_vanished_domains() {
    let mut t = tracker(TableInspector::default());
    let a = "aaaaaaaa-0000-0000-0000-000000000000".to_string();
    let b = "bbbbbbbb-0000-0000-0000-000000000000".to_string();
    let c = "cccccccc-0000-0000-0000-000000000000".to_string();
    let listing = vec![
        (a.clone(), facts(DomainState::RUNNING, "BOOTED", true)),
        (b.clone(), facts(DomainState::SHUTOFF, "UNKNOWN", true)),
        (c.clone(), facts(DomainState::PAUSED, "USER", false)),
    ];
    let outs = t.on_resync(&listing, 5);
    let got: Vec<_> = outs
        .iter()
        .map(|o| (o.event.domain.uuid.clone(), o.event.event))
        .collect();
    assert_eq!(
        got,
        vec![
            (a.clone(), EventType::STARTED),
            (b.clone(), EventType::DEFINED),
            (c.clone(), EventType::SUSPENDED)
        ]
    );
    assert!(outs
        .iter()
        .all(|o| o.event.origin == Origin::RECONCILE && o.event.seq == 1));
    // Same listing again: nothing to say.
    assert!(t.on_resync(&listing, 6).is_empty());
    // a paused, b gone, c resumed.
    let listing2 = vec![
        (a.clone(), facts(DomainState::PAUSED, "USER", true)),
        (c.clone(), facts(DomainState::RUNNING, "UNPAUSED", false)),
    ];
    let outs = t.on_resync(&listing2, 7);
    let mut got: Vec<_> = outs
        .iter()
        .map(|o| {
            (
                o.event.domain.uuid.clone(),
                o.event.event,
                o.event.seq,
                o.event.persistent,
            )
        })
        .collect();
    got.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        got,
        vec![
            (a, EventType::SUSPENDED, 2, true),
            (b, EventType::UNDEFINED, 2, false),
            (c, EventType::RESUMED, 2, false)
        ]
    );
    let hs: Vec<u64> = outs.iter().map(|o| o.event.host_seq).collect();
    assert_eq!(hs, vec![4, 5, 6]);
}
