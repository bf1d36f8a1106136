//! Pure derivation, no tracker state: the (state, reason) an event leads
//! to, the event a reconcile emits to bring a consumer to a listed state,
//! and how a listing merges with what events settled after it began.
//!
//! Invariants:
//! - the state after an event comes from (event, detail) alone, or is left
//!   open (`None`) for the caller to take from the previous state; attached
//!   facts never decide it;
//! - every reason named is one libvirt's table has for that state (tested
//!   over every (type, detail) pair);
//! - a reconcile difference is one event per domain, none when the listed
//!   facts match the record.

use crate::model::{Detail, DomainState, EventType, StateReason};
use crate::source::Facts;

use super::types::{DomainRecord, Touch};

/// The (state, reason) an event leads to, from the event alone. `None`
/// means the event does not change the state (DEFINED, UNDEFINED, REBOOT)
/// or cannot tell it (unknown type). A `None` reason is left to the lookup.
pub fn derive_state(
    event: EventType,
    detail: Detail,
) -> Option<(DomainState, Option<&'static str>)> {
    use Detail as D;
    use DomainState as S;
    // Where libvirt names the reason like the detail (STOPPED/DESTROYED →
    // SHUTOFF/DESTROYED), the detail is the reason; other pairs are listed.
    let named = |s: S| -> (S, Option<&'static str>) {
        let r = detail.as_str();
        let known = detail != D::UNKNOWN && StateReason::named(s, r).reason_code >= 0;
        (s, known.then_some(r))
    };
    let r = match (event, detail) {
        // The destination of an incoming migration is paused until
        // RESUMED/MIGRATED: billing must not count it twice.
        (EventType::STARTED, D::MIGRATED) => (S::PAUSED, Some("MIGRATION")),
        (EventType::STARTED, _) => named(S::RUNNING),
        (EventType::SUSPENDED, D::PAUSED) => (S::PAUSED, Some("USER")),
        (EventType::SUSPENDED, D::MIGRATED) => (S::PAUSED, Some("MIGRATION")),
        (EventType::SUSPENDED, _) => named(S::PAUSED),
        (EventType::RESUMED, _) => named(S::RUNNING),
        (EventType::STOPPED, _) => named(S::SHUTOFF),
        (EventType::SHUTDOWN, _) => (S::SHUTDOWN, Some("USER")),
        (EventType::PMSUSPENDED, _) => (S::PMSUSPENDED, None),
        (EventType::CRASHED, D::CRASHLOADED) => (S::RUNNING, Some("CRASHED")),
        (EventType::CRASHED, _) => named(S::CRASHED),
        (
            EventType::DEFINED
            | EventType::UNDEFINED
            | EventType::REBOOT
            | EventType::GAP
            | EventType::UNKNOWN
            | EventType::HOOK,
            _,
        ) => return None,
    };
    Some(r)
}

/// A listing's facts for a domain that events touched since the listing
/// began: what those events settled (state, persistence) is the tracker's,
/// the rest is the listing's.
pub(super) fn merge_touched(rec: &DomainRecord, listed: &Facts, touch: Touch) -> Facts {
    let mut f = listed.clone();
    if touch.state {
        f.state = rec.state();
        f.id = rec.id;
    }
    if touch.persistence {
        f.persistent = rec.persistent;
        if !rec.persistent {
            f.autostart = Some(false);
        }
    }
    if touch.config {
        // A (re)definition after the listing read: its configuration is
        // newer than the listed one.
        f.config_hash = rec.config_hash.clone();
        f.vcpus = rec.vcpus;
        f.memory_kib = rec.memory_kib;
        f.autostart = rec.autostart;
        f.xml = None;
    }
    f
}

/// The event a reconcile emits to bring a consumer to `facts`' state.
pub(super) fn reconcile_event(
    prev: Option<&DomainRecord>,
    facts: &Facts,
) -> Option<(EventType, Detail)> {
    let live = prev.filter(|p| !p.gone());
    let target = facts.state.state;
    let by_state = || -> (EventType, Detail) {
        let reason = facts.state.reason.as_str();
        match target {
            DomainState::RUNNING | DomainState::BLOCKED | DomainState::NOSTATE => {
                let d = match reason {
                    "MIGRATED" => Detail::MIGRATED,
                    "RESTORED" => Detail::RESTORED,
                    "FROM_SNAPSHOT" => Detail::FROM_SNAPSHOT,
                    "WAKEUP" => Detail::WAKEUP,
                    "UNPAUSED" | "MIGRATION_CANCELED" | "SAVE_CANCELED" => Detail::UNPAUSED,
                    _ => Detail::BOOTED,
                };
                let from_paused = live.is_some_and(|p| {
                    matches!(DomainState::from_code(p.state_code), DomainState::PAUSED)
                });
                if from_paused {
                    (
                        EventType::RESUMED,
                        if d == Detail::MIGRATED {
                            d
                        } else {
                            Detail::UNPAUSED
                        },
                    )
                } else {
                    (
                        EventType::STARTED,
                        if d == Detail::UNPAUSED {
                            Detail::BOOTED
                        } else {
                            d
                        },
                    )
                }
            }
            DomainState::PAUSED => (
                EventType::SUSPENDED,
                match reason {
                    "MIGRATION" => Detail::MIGRATED,
                    "IOERROR" => Detail::IOERROR,
                    "WATCHDOG" => Detail::WATCHDOG,
                    "FROM_SNAPSHOT" => Detail::FROM_SNAPSHOT,
                    "API_ERROR" => Detail::API_ERROR,
                    "POSTCOPY" => Detail::POSTCOPY,
                    "POSTCOPY_FAILED" => Detail::POSTCOPY_FAILED,
                    _ => Detail::PAUSED,
                },
            ),
            DomainState::SHUTDOWN => (EventType::SHUTDOWN, Detail::FINISHED),
            DomainState::SHUTOFF => (
                EventType::STOPPED,
                match reason {
                    "SHUTDOWN" => Detail::SHUTDOWN,
                    "DESTROYED" => Detail::DESTROYED,
                    "CRASHED" => Detail::CRASHED,
                    "MIGRATED" => Detail::MIGRATED,
                    "SAVED" => Detail::SAVED,
                    "FAILED" | "DAEMON" => Detail::FAILED,
                    "FROM_SNAPSHOT" => Detail::FROM_SNAPSHOT,
                    _ => Detail::UNKNOWN,
                },
            ),
            DomainState::CRASHED => (EventType::CRASHED, Detail::PANICKED),
            DomainState::PMSUSPENDED => (EventType::PMSUSPENDED, Detail::MEMORY),
            DomainState::UNKNOWN => (EventType::UNKNOWN, Detail::UNKNOWN),
        }
    };
    match live {
        None if target == DomainState::SHUTOFF => Some((EventType::DEFINED, Detail::ADDED)),
        None => Some(by_state()),
        Some(p) if DomainState::from_code(p.state_code) != target => Some(by_state()),
        Some(p) if p.persistent != facts.persistent => Some(if facts.persistent {
            (EventType::DEFINED, Detail::ADDED)
        } else {
            (EventType::UNDEFINED, Detail::REMOVED)
        }),
        Some(p) if facts.config_hash.is_some() && p.config_hash != facts.config_hash => {
            Some((EventType::DEFINED, Detail::UPDATED))
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_detail_pair_has_a_defined_state_after() {
        // The full table: for each libvirt (type, detail) integer pair, and
        // one past the end of each, the state after is what libvirt's own
        // domstate would report right after that event.
        use DomainState as S;
        let expect = |ty: EventType, d: Detail| -> Option<(S, &str)> {
            Some(match (ty, d) {
                (EventType::STARTED, Detail::MIGRATED) => (S::PAUSED, "MIGRATION"),
                (EventType::STARTED, Detail::BOOTED) => (S::RUNNING, "BOOTED"),
                (EventType::STARTED, Detail::RESTORED) => (S::RUNNING, "RESTORED"),
                (EventType::STARTED, Detail::FROM_SNAPSHOT) => (S::RUNNING, "FROM_SNAPSHOT"),
                (EventType::STARTED, Detail::WAKEUP) => (S::RUNNING, "WAKEUP"),
                (EventType::STARTED, _) => (S::RUNNING, "?"),
                (EventType::SUSPENDED, Detail::PAUSED) => (S::PAUSED, "USER"),
                (EventType::SUSPENDED, Detail::MIGRATED) => (S::PAUSED, "MIGRATION"),
                (EventType::SUSPENDED, Detail::RESTORED | Detail::UNKNOWN) => (S::PAUSED, "?"),
                (EventType::SUSPENDED, d) => (S::PAUSED, d.as_str()),
                (EventType::RESUMED, Detail::UNKNOWN) => (S::RUNNING, "?"),
                (EventType::RESUMED, d) => (S::RUNNING, d.as_str()),
                (EventType::STOPPED, Detail::RECREATED | Detail::UNKNOWN) => (S::SHUTOFF, "?"),
                (EventType::STOPPED, d) => (S::SHUTOFF, d.as_str()),
                (EventType::SHUTDOWN, _) => (S::SHUTDOWN, "USER"),
                (EventType::PMSUSPENDED, _) => (S::PMSUSPENDED, "?"),
                (EventType::CRASHED, Detail::PANICKED) => (S::CRASHED, "PANICKED"),
                (EventType::CRASHED, Detail::CRASHLOADED) => (S::RUNNING, "CRASHED"),
                (EventType::CRASHED, _) => (S::CRASHED, "?"),
                _ => return None,
            })
        };
        let mut checked = 0;
        for ty in 0..=9 {
            let e = EventType::from_lifecycle(ty);
            for dc in 0..=9 {
                let d = Detail::from_code(e, dc);
                let got = derive_state(e, d);
                let want = expect(e, d);
                match (got, want) {
                    (None, None) => {}
                    (Some((s, r)), Some((ws, wr))) => {
                        assert_eq!(s, ws, "{e}/{d}");
                        assert_eq!(r.unwrap_or("?"), wr, "{e}/{d}");
                        // Every named reason exists in libvirt's table for that state.
                        if let Some(r) = r {
                            assert!(StateReason::named(s, r).reason_code >= 0, "{e}/{d}: {r}");
                        }
                    }
                    (g, w) => panic!("{e}/{d}: got {g:?}, want {w:?}"),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 100);
    }
}
