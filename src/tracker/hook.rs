//! Applying a qemu hook call (`source::HookPhase`) to the `Tracker`: a
//! HOOK record about the domain, in its `seq` order with its lifecycle
//! events. Pure logic, like `state`.
//!
//! Invariants:
//! - a hook call never changes what the tracker knows about the domain:
//!   its `state_after`, persistence, sizes and config hash are the
//!   tracker's current knowledge, so a reader that applies every record's
//!   state (a v1 reader sees the event as UNKNOWN) ends where it was;
//! - it bumps `host_seq` and the domain's `seq` like any message about the
//!   domain; a domain the tracker does not know yet (a transient domain
//!   being created, an incoming migration) gets a record that says it does
//!   not exist (shut off, not persistent), so its `seq` starts here and
//!   the lifecycle events that follow continue it;
//! - it never settles anything a listing under way must respect (no
//!   `Touch`).

use crate::model::{Detail, DomainState, EventType, HookCall, Origin, StateReason};
use crate::source::HookPhase;

use super::rounds::Made;
use super::state::Tracker;
use super::types::{DomainRecord, Output};

impl Tracker {
    /// One qemu hook call.
    pub fn on_hook(&mut self, hook: &HookPhase) -> Output {
        let mut record = match self.domains.get(&hook.uuid) {
            Some(prev) => prev.clone(),
            None => {
                let s = StateReason::named(DomainState::SHUTOFF, "UNKNOWN");
                DomainRecord {
                    name: hook.name.clone(),
                    id: None,
                    state_code: s.state_code,
                    reason_code: s.reason_code,
                    persistent: false,
                    autostart: Some(false),
                    vcpus: None,
                    memory_kib: None,
                    config_hash: None,
                    seq: 0,
                    in_round: false,
                }
            }
        };
        record.seq += 1;
        if !hook.name.is_empty() {
            record.name = hook.name.clone();
        }
        let made = Made {
            origin: Origin::HOOK,
            event: EventType::HOOK,
            detail: Detail::of_hook_operation(&hook.operation),
            observed_at: hook.observed_at,
            xml: None,
            hook: Some(HookCall {
                operation: hook.operation.clone(),
                sub_operation: hook.sub_operation.clone(),
                extra: hook.extra.clone(),
            }),
        };
        self.made_event(&hook.uuid, record, made)
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Detail, DomainState, EventType, Origin};
    use crate::source::HookPhase;

    use super::super::testkit::{facts, raw, tracker, TableInspector};

    fn hook(uuid: &str, op: &str, sub: &str) -> HookPhase {
        HookPhase {
            uuid: uuid.into(),
            name: "vm".into(),
            operation: op.into(),
            sub_operation: sub.into(),
            extra: "-".into(),
            observed_at: 7,
        }
    }

    #[test]
    fn hook_calls_take_the_next_seq_and_change_no_state() {
        let table = TableInspector::default();
        let mut t = tracker(table.clone());
        let u = "22222222-2222-2222-2222-222222222222";
        table.set(u, facts(DomainState::SHUTOFF, "UNKNOWN", true));
        let defined = t.on_event(&raw(u, 0, 0));
        assert_eq!(defined.event.seq, 1);
        let o = t.tracker.on_hook(&hook(u, "prepare", "begin"));
        assert_eq!((o.event.seq, o.event.host_seq), (2, 2));
        assert_eq!(o.event.event, EventType::HOOK);
        assert_eq!(o.event.detail, Detail::HOOK_PREPARE);
        assert_eq!(o.event.origin, Origin::HOOK);
        assert_eq!(
            (o.event.event_code, o.event.detail_code),
            (-1, -1),
            "no libvirt codes"
        );
        assert_eq!(o.event.state_after, defined.event.state_after);
        assert_eq!(o.event.persistent, defined.event.persistent);
        assert_eq!(o.event.hook.as_ref().unwrap().sub_operation, "begin");
        let started = t.on_event(&raw(u, 2, 0));
        assert_eq!(started.event.seq, 3);
        assert_eq!(started.event.state_after.state, DomainState::RUNNING);
        let o = t.tracker.on_hook(&hook(u, "stopped", "end"));
        assert_eq!(o.event.seq, 4);
        assert_eq!(o.event.state_after, started.event.state_after);
        assert_eq!(o.event.domain.id, started.event.domain.id);
        let o = t.tracker.on_hook(&hook(u, "whatever", "-"));
        assert_eq!(o.event.detail, Detail::UNKNOWN);
        assert_eq!(o.event.hook.as_ref().unwrap().operation, "whatever");
    }

    #[test]
    fn a_hook_before_any_event_starts_the_domains_seq() {
        let table = TableInspector::default();
        let mut t = tracker(table.clone());
        let u = "33333333-3333-3333-3333-333333333333";
        let o = t.tracker.on_hook(&hook(u, "prepare", "begin"));
        assert_eq!(o.event.seq, 1);
        assert_eq!(o.event.state_after.state, DomainState::SHUTOFF);
        assert!(!o.event.persistent);
        assert!(t.tracker.domain(u).unwrap().gone());
        // A transient domain: created, started.
        table.set(u, facts(DomainState::RUNNING, "BOOTED", false));
        let started = t.on_event(&raw(u, 2, 0));
        assert_eq!(started.event.seq, 2);
        assert_eq!(started.event.state_after.state, DomainState::RUNNING);
    }
}
