//! Usage's rules one at a time: epochs, silent hosts, hostile numbers,
//! and the tenant of each row.

use super::*;
use crate::consumer::rebuild::tests::{ev, pos, U1, U2};
use crate::model::DomainState;

const S: i64 = 1_000_000;

fn at(mut b: Body, t: i64) -> Body {
    if let Body::Event(e) = &mut b {
        e.observed_at = t * S;
    }
    b
}

fn add(u: &mut Usage, bodies: Vec<Body>) {
    for (i, body) in bodies.into_iter().enumerate() {
        u.add(
            &Record {
                body,
                pos: pos("S", i as u64 + 1),
            },
            false,
        );
    }
}

#[test]
fn a_recreated_journal_ends_the_old_epochs_billing() {
    let mut u = Usage::new();
    add(
        &mut u,
        vec![
            at(ev("a", 1, U1, 1, DomainState::RUNNING), 0),
            at(ev("a", 2, U2, 1, DomainState::RUNNING), 10),
            // The old agent's last word at 50 s; the new epoch starts
            // at 100 s and knows only U1.
            at(ev("a", 3, U1, 2, DomainState::RUNNING), 50),
            at(ev("b", 1, U1, 1, DomainState::RUNNING), 100),
        ],
    );
    let rows = u.compute(0, 1000 * S);
    let u1 = rows.iter().find(|r| r.uuid == U1).unwrap();
    let u2 = rows.iter().find(|r| r.uuid == U2).unwrap();
    // U1: known 0..50 and 100..1000, unknown 50..100.
    assert_eq!((u1.running_seconds, u1.unknown_seconds), (950.0, 50.0));
    assert!(u1.stale);
    // U2: known 10..50, unknown until the new epoch, then not there.
    assert_eq!((u2.running_seconds, u2.unknown_seconds), (40.0, 50.0));
    assert_eq!(u2.vcpu_seconds, 80.0);
}

#[test]
fn a_new_epoch_stamped_before_the_old_one_is_still_the_newest() {
    // Old epoch "a" at 0 s and 10 s; its journal is recreated and the
    // clock stepped back: new epoch "b" stamps -100 s, later in the
    // same partition. "b" lists only U1.
    let mut u = Usage::new();
    for (offset, body) in [
        (1, at(ev("a", 1, U1, 1, DomainState::RUNNING), 0)),
        (2, at(ev("a", 2, U2, 1, DomainState::RUNNING), 10)),
        (3, at(ev("b", 1, U1, 1, DomainState::RUNNING), -100)),
    ] {
        u.add(
            &Record {
                body,
                pos: pos("EV", offset),
            },
            true,
        );
    }
    let rows = u.compute(0, 1000 * S);
    let u1 = rows.iter().find(|r| r.uuid == U1).unwrap();
    assert_eq!(u1.running_seconds, 1000.0);
    let u2 = rows.iter().find(|r| r.uuid == U2);
    assert!(
        u2.is_none_or(|r| r.running_seconds == 0.0),
        "the old epoch ended when the new one began: {u2:?}"
    );
}

#[test]
fn a_silent_hosts_time_after_its_last_word_is_unknown() {
    let rule = Liveness::new(std::time::Duration::from_secs(1), 3);
    let bodies = || {
        vec![
            at(ev("e", 1, U1, 1, DomainState::RUNNING), 0),
            crate::consumer::rebuild::tests::host_rec(
                "e",
                5,
                crate::model::HostSnapshotKind::HEARTBEAT,
                1,
                1,
            ),
        ]
    };
    // Judged at 7 s (the earlier of --to and now): 2 s after the
    // heartbeat at 5 s, live; billed to --to.
    let mut u = Usage::new().with_liveness(rule, 7 * S);
    add(&mut u, bodies());
    let r = &u.compute(0, 1000 * S)[0];
    assert_eq!((r.running_seconds, r.unknown_seconds), (1000.0, 0.0));
    assert!(
        r.unknown_seconds.is_sign_positive(),
        "no unknown time is 0.0, not -0.0"
    );
    // Judged at 100 s: silent since 5 s + 3 × 1 s.
    let mut u = Usage::new().with_liveness(rule, 100 * S);
    add(&mut u, bodies());
    let r = &u.compute(0, 50 * S)[0];
    assert_eq!((r.running_seconds, r.unknown_seconds), (8.0, 42.0));
    assert_eq!(r.vcpu_seconds, 16.0);
    assert!(r.stale);
    assert!(
        r.stale_reason
            .as_deref()
            .unwrap()
            .contains("host h is silent since"),
        "{:?}",
        r.stale_reason
    );
    // A window ending before the silence is all known.
    let r = &u.compute(0, 8 * S)[0];
    assert_eq!((r.running_seconds, r.unknown_seconds), (8.0, 0.0));
}

#[test]
fn rows_name_the_tenant_of_the_newest_xml() {
    let rule = TenantRule::new(&crate::config::TenantConfig {
        namespace: crate::config::Namespaces(vec!["urn:t".into()]),
        element: "owner".into(),
        attribute: Some("id".into()),
    });
    let xml = |t: &str| {
        format!(
            "<domain><metadata><t:m xmlns:t='urn:t'><t:owner id='{t}'/></t:m></metadata></domain>"
        )
    };
    let with_xml = |mut b: Body, x: Option<String>| {
        if let Body::Event(e) = &mut b {
            e.xml = x;
        }
        b
    };
    let mut u = Usage::new().with_tenants(rule);
    add(
        &mut u,
        vec![
            with_xml(
                at(ev("a", 1, U1, 1, DomainState::SHUTOFF), 0),
                Some(xml("t-1")),
            ),
            with_xml(
                at(ev("a", 2, U1, 2, DomainState::RUNNING), 1),
                Some(xml("t-2")),
            ),
            // No XML (xml = "on-change"): the tenant stays.
            at(ev("a", 3, U2, 1, DomainState::RUNNING), 2),
            at(ev("a", 4, U1, 3, DomainState::PAUSED), 3),
        ],
    );
    let rows = u.compute(0, 10 * S);
    let tenant = |uuid: &str| rows.iter().find(|r| r.uuid == uuid).unwrap().tenant.clone();
    assert_eq!(tenant(U1).as_deref(), Some("t-2"));
    assert_eq!(tenant(U2), None, "no XML read for U2");
    // Without a rule, no tenant and none in the JSON.
    let mut plain = Usage::new();
    add(
        &mut plain,
        vec![with_xml(
            at(ev("a", 1, U1, 1, DomainState::RUNNING), 0),
            Some(xml("t")),
        )],
    );
    let r = &plain.compute(0, S)[0];
    assert_eq!(r.tenant, None);
    assert!(!serde_json::to_string(r).unwrap().contains("tenant"));
}

#[test]
fn hostile_numbers_do_not_panic() {
    let mut u = Usage::new();
    add(
        &mut u,
        vec![
            at(ev("a", 1, U1, u64::MAX, DomainState::RUNNING), 0),
            at(ev("a", 2, U1, 0, DomainState::PAUSED), i64::MAX / S),
        ],
    );
    let rows = u.compute(i64::MIN, i64::MAX);
    assert_eq!(rows.len(), 1);
    assert!(rows[0].stale, "seq MAX then 0 is not continuous");
}
