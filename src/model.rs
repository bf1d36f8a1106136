//! The message model: libvirt's vocabulary (event types, details, domain
//! states and reasons) mapped to stable symbols, and the Rust form of the
//! `DomainEvent` record.
//!
//! Invariants:
//! - every libvirt integer maps to a symbol; values this build does not know
//!   map to `UNKNOWN` and the raw integer travels alongside, so a newer
//!   libvirt never crashes the agent nor loses an event;
//! - the symbol lists here are the Avro enum symbols in `schemas/`, in the
//!   same order (a unit test checks it), so adding one means a new schema
//!   version.

use std::fmt;

/// A libvirt-assigned integer with the symbol it maps to.
macro_rules! symbols {
    ($(#[$m:meta])* $name:ident { $($sym:ident),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        pub enum $name { $($sym),+ }
        impl $name {
            /// Every symbol, in Avro enum order.
            pub const ALL: &'static [$name] = &[$($name::$sym),+];
            /// The Avro/JSON symbol.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$sym => stringify!($sym)),+ }
            }
            /// Position in the Avro enum.
            pub fn index(self) -> u32 { self as u32 }
            /// Inverse of [`Self::as_str`].
            pub fn parse(s: &str) -> Option<Self> {
                match s { $(stringify!($sym) => Some($name::$sym),)+ _ => None }
            }
            /// Inverse of [`Self::index`].
            pub fn from_index(i: u32) -> Option<Self> {
                Self::ALL.get(i as usize).copied()
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

symbols! {
    /// What happened. The first nine are libvirt's lifecycle event types in
    /// libvirt's order; `REBOOT` is the REBOOT event id; `GAP` is the agent's
    /// marker for events it knows it lost; `HOOK` (schema v2) is a call of
    /// libvirt's qemu hook script, forwarded by `virtstream hook`.
    EventType {
        DEFINED, UNDEFINED, STARTED, SUSPENDED, RESUMED, STOPPED, SHUTDOWN,
        PMSUSPENDED, CRASHED, REBOOT, GAP, UNKNOWN, HOOK,
    }
}

symbols! {
    /// The union of libvirt's per-type event details, plus `NONE` (the event
    /// has no detail, e.g. REBOOT), the agent's gap causes and (schema v2)
    /// the qemu hook's operations.
    Detail {
        ADDED, UPDATED, RENAMED, FROM_SNAPSHOT, REMOVED, BOOTED, MIGRATED,
        RESTORED, WAKEUP, RECREATED, PAUSED, IOERROR, WATCHDOG, API_ERROR,
        POSTCOPY, POSTCOPY_FAILED, UNPAUSED, SHUTDOWN, DESTROYED, CRASHED,
        SAVED, FAILED, FINISHED, GUEST, HOST, MEMORY, DISK, PANICKED,
        CRASHLOADED, NONE, DISCONNECTED, QUEUE_OVERFLOW, JOURNAL_FULL,
        AGENT_RESTART, UNKNOWN, HOOK_PREPARE, HOOK_START, HOOK_STARTED,
        HOOK_STOPPED, HOOK_RELEASE, HOOK_MIGRATE, HOOK_RESTORE, HOOK_RECONNECT,
        HOOK_ATTACH,
    }
}

symbols! {
    /// Where a message came from.
    Origin { LIBVIRT, RECONCILE, HOOK, AGENT, UNKNOWN }
}

symbols! {
    /// libvirt's `virDomainState`, in libvirt's order.
    DomainState {
        NOSTATE, RUNNING, BLOCKED, PAUSED, SHUTDOWN, SHUTOFF, CRASHED,
        PMSUSPENDED, UNKNOWN,
    }
}

/// libvirt's `VIR_DOMAIN_EVENT_ID_*` values the agent knows by name.
pub mod event_id {
    pub const LIFECYCLE: i32 = 0;
    pub const REBOOT: i32 = 1;
    /// Not from libvirt (reconcile events, gap markers).
    pub const NONE: i32 = -1;

    /// libvirt's name of an event id (`VIR_DOMAIN_EVENT_ID_<name>`).
    pub fn name(id: i32) -> String {
        match id {
            LIFECYCLE => "LIFECYCLE".into(),
            REBOOT => "REBOOT".into(),
            other => format!("ID_{other}"),
        }
    }
}

impl EventType {
    /// The (event, detail) of a libvirt callback's integers: lifecycle
    /// events by their type and detail, REBOOT as such, anything else
    /// UNKNOWN (raw integers are published alongside).
    pub fn classify(
        libvirt_event_id: i32,
        type_code: i32,
        detail_code: i32,
    ) -> (EventType, Detail) {
        let event = match libvirt_event_id {
            event_id::LIFECYCLE => EventType::from_lifecycle(type_code),
            event_id::REBOOT => EventType::REBOOT,
            _ => EventType::UNKNOWN,
        };
        let detail = if libvirt_event_id == event_id::LIFECYCLE {
            Detail::from_code(event, detail_code)
        } else if event == EventType::REBOOT {
            Detail::NONE
        } else {
            Detail::UNKNOWN
        };
        (event, detail)
    }

    /// Maps a `virDomainEventType` integer.
    pub fn from_lifecycle(code: i32) -> EventType {
        use EventType::*;
        match code {
            0 => DEFINED,
            1 => UNDEFINED,
            2 => STARTED,
            3 => SUSPENDED,
            4 => RESUMED,
            5 => STOPPED,
            6 => SHUTDOWN,
            7 => PMSUSPENDED,
            8 => CRASHED,
            _ => UNKNOWN,
        }
    }

    /// The `virDomainEventType` integer of a lifecycle symbol.
    pub fn lifecycle_code(self) -> Option<i32> {
        let i = self.index() as i32;
        (i <= 8).then_some(i)
    }
}

/// The per-type detail tables of libvirt (`virDomainEvent*DetailType`).
fn detail_table(event: EventType) -> &'static [Detail] {
    use Detail::*;
    match event {
        EventType::DEFINED => &[ADDED, UPDATED, RENAMED, FROM_SNAPSHOT],
        EventType::UNDEFINED => &[REMOVED, RENAMED],
        EventType::STARTED => &[BOOTED, MIGRATED, RESTORED, FROM_SNAPSHOT, WAKEUP, RECREATED],
        EventType::SUSPENDED => &[
            PAUSED,
            MIGRATED,
            IOERROR,
            WATCHDOG,
            RESTORED,
            FROM_SNAPSHOT,
            API_ERROR,
            POSTCOPY,
            POSTCOPY_FAILED,
        ],
        EventType::RESUMED => &[UNPAUSED, MIGRATED, FROM_SNAPSHOT, POSTCOPY, POSTCOPY_FAILED],
        EventType::STOPPED => &[
            SHUTDOWN,
            DESTROYED,
            CRASHED,
            MIGRATED,
            SAVED,
            FAILED,
            FROM_SNAPSHOT,
            RECREATED,
        ],
        EventType::SHUTDOWN => &[FINISHED, GUEST, HOST],
        EventType::PMSUSPENDED => &[MEMORY, DISK],
        EventType::CRASHED => &[PANICKED, CRASHLOADED],
        EventType::GAP => &[DISCONNECTED, QUEUE_OVERFLOW, JOURNAL_FULL, AGENT_RESTART],
        EventType::REBOOT | EventType::UNKNOWN | EventType::HOOK => &[],
    }
}

impl Detail {
    /// Maps a detail integer in the context of its event type.
    pub fn from_code(event: EventType, code: i32) -> Detail {
        if event == EventType::REBOOT {
            return Detail::NONE;
        }
        usize::try_from(code)
            .ok()
            .and_then(|i| detail_table(event).get(i).copied())
            .unwrap_or(Detail::UNKNOWN)
    }

    /// The libvirt integer of this detail for `event` (-1 when none).
    pub fn code(self, event: EventType) -> i32 {
        detail_table(event)
            .iter()
            .position(|d| *d == self)
            .map(|p| p as i32)
            .unwrap_or(-1)
    }
}

impl DomainState {
    /// Maps a `virDomainState` integer.
    pub fn from_code(code: i32) -> DomainState {
        match code {
            0..=7 => DomainState::ALL[code as usize],
            _ => DomainState::UNKNOWN,
        }
    }

    /// The `virDomainState` integer (-1 for UNKNOWN).
    pub fn code(self) -> i32 {
        if self == DomainState::UNKNOWN {
            -1
        } else {
            self.index() as i32
        }
    }
}

/// libvirt's per-state reason names (`virDomain*Reason`), index = integer.
fn reason_table(state: DomainState) -> &'static [&'static str] {
    match state {
        DomainState::NOSTATE | DomainState::BLOCKED => &["UNKNOWN"],
        DomainState::RUNNING => &[
            "UNKNOWN",
            "BOOTED",
            "MIGRATED",
            "RESTORED",
            "FROM_SNAPSHOT",
            "UNPAUSED",
            "MIGRATION_CANCELED",
            "SAVE_CANCELED",
            "WAKEUP",
            "CRASHED",
            "POSTCOPY",
            "POSTCOPY_FAILED",
        ],
        DomainState::PAUSED => &[
            "UNKNOWN",
            "USER",
            "MIGRATION",
            "SAVE",
            "DUMP",
            "IOERROR",
            "WATCHDOG",
            "FROM_SNAPSHOT",
            "SHUTTING_DOWN",
            "SNAPSHOT",
            "CRASHED",
            "STARTING_UP",
            "POSTCOPY",
            "POSTCOPY_FAILED",
            "API_ERROR",
        ],
        DomainState::SHUTDOWN => &["UNKNOWN", "USER"],
        DomainState::SHUTOFF => &[
            "UNKNOWN",
            "SHUTDOWN",
            "DESTROYED",
            "CRASHED",
            "MIGRATED",
            "SAVED",
            "FAILED",
            "FROM_SNAPSHOT",
            "DAEMON",
        ],
        DomainState::CRASHED => &["UNKNOWN", "PANICKED"],
        DomainState::PMSUSPENDED => &["UNKNOWN"],
        DomainState::UNKNOWN => &[],
    }
}

/// A domain state with its reason, as libvirt's `virDomainGetState` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateReason {
    pub state: DomainState,
    /// libvirt's state integer (kept raw for values this build does not know).
    pub state_code: i32,
    /// Reason symbol, e.g. `BOOTED`; `UNKNOWN` when not known.
    pub reason: String,
    /// libvirt's reason integer, -1 when the reason was not reported.
    pub reason_code: i32,
}

impl StateReason {
    /// From libvirt's raw `(state, reason)` integers.
    pub fn from_codes(state_code: i32, reason_code: i32) -> StateReason {
        let state = DomainState::from_code(state_code);
        let reason = usize::try_from(reason_code)
            .ok()
            .and_then(|i| reason_table(state).get(i))
            .copied()
            .unwrap_or("UNKNOWN")
            .to_string();
        StateReason {
            state,
            state_code,
            reason,
            reason_code,
        }
    }

    /// From a state symbol and a reason name of that state's table.
    pub fn named(state: DomainState, reason: &str) -> StateReason {
        let reason_code = reason_table(state)
            .iter()
            .position(|r| *r == reason)
            .map(|p| p as i32)
            .unwrap_or(-1);
        StateReason {
            state,
            state_code: state.code(),
            reason: if reason_code < 0 { "UNKNOWN" } else { reason }.to_string(),
            reason_code,
        }
    }
}

/// A domain's identity as seen in an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRef {
    /// Lower-case hyphenated UUID.
    pub uuid: String,
    pub name: String,
    /// libvirt's domain id while the domain runs.
    pub id: Option<i32>,
}

/// The UUID standing for "this host" in host-level records (gap markers).
pub const HOST_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// The qemu hook call a HOOK record carries (the script's arguments after
/// the guest name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookCall {
    pub operation: String,
    pub sub_operation: String,
    pub extra: String,
}

impl Detail {
    /// The HOOK detail of a qemu hook OPERATION argument (`UNKNOWN` for
    /// one this build does not know; the raw operation travels in `hook`).
    pub fn of_hook_operation(operation: &str) -> Detail {
        match operation {
            "prepare" => Detail::HOOK_PREPARE,
            "start" => Detail::HOOK_START,
            "started" => Detail::HOOK_STARTED,
            "stopped" => Detail::HOOK_STOPPED,
            "release" => Detail::HOOK_RELEASE,
            "migrate" => Detail::HOOK_MIGRATE,
            "restore" => Detail::HOOK_RESTORE,
            "reconnect" => Detail::HOOK_RECONNECT,
            "attach" => Detail::HOOK_ATTACH,
            _ => Detail::UNKNOWN,
        }
    }
}

/// One `DomainEvent` record (schemas/DomainEvent.v2.avsc), in field order.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainEvent {
    pub event_id: String,
    pub host_id: String,
    pub epoch: String,
    pub host_seq: u64,
    pub seq: u64,
    pub domain: DomainRef,
    pub event: EventType,
    /// `VIR_DOMAIN_EVENT_ID_*` the event arrived on; -1 when not from libvirt.
    pub libvirt_event_id: i32,
    /// Raw libvirt event type integer (-1 when none).
    pub event_code: i32,
    pub detail: Detail,
    /// Raw libvirt detail integer (-1 when none).
    pub detail_code: i32,
    pub origin: Origin,
    pub state_after: StateReason,
    pub persistent: bool,
    pub autostart: Option<bool>,
    pub vcpus: Option<i32>,
    pub memory_kib: Option<i64>,
    pub config_hash: Option<String>,
    /// Agent receive time, microseconds since the Unix epoch.
    pub observed_at: i64,
    pub xml: Option<String>,
    /// The hook call, on HOOK records only (schema v2; `None` from v1 data).
    pub hook: Option<HookCall>,
}

symbols! {
    /// What a `HostSnapshot` record is.
    HostSnapshotKind { ROUND_BEGIN, ROUND_END, HEARTBEAT, UNKNOWN }
}

/// One `DomainSnapshot` record (schemas/DomainSnapshot.v1.avsc).
#[derive(Debug, Clone, PartialEq)]
pub struct DomainSnapshot {
    pub event_id: String,
    pub host_id: String,
    pub epoch: String,
    pub host_seq: u64,
    /// The round: event_id of its ROUND_BEGIN record.
    pub snapshot_id: String,
    /// The domain's current seq (not bumped by the snapshot).
    pub seq: u64,
    pub domain: DomainRef,
    pub state: StateReason,
    pub persistent: bool,
    pub autostart: Option<bool>,
    pub vcpus: Option<i32>,
    pub memory_kib: Option<i64>,
    pub config_hash: Option<String>,
    pub observed_at: i64,
    pub xml: Option<String>,
}

/// What the host's libvirt is and can report (carried by `HostSnapshot`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostInfo {
    pub libvirt_uri: String,
    pub libvirt_driver: String,
    pub libvirt_version: String,
    pub accepted_event_ids: Vec<String>,
}

/// One `HostSnapshot` record (schemas/HostSnapshot.v1.avsc).
#[derive(Debug, Clone, PartialEq)]
pub struct HostSnapshot {
    pub event_id: String,
    pub host_id: String,
    pub epoch: String,
    pub host_seq: u64,
    pub kind: HostSnapshotKind,
    pub snapshot_id: Option<String>,
    pub domain_count: i32,
    pub host_seq_watermark: u64,
    pub info: HostInfo,
    pub agent_version: String,
    pub observed_at: i64,
}

/// The agent's version, as carried by `HostSnapshot`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `event_id` from its parts (docs/contract.md §1): deterministic per journal entry.
pub fn event_id(host_id: &str, epoch: &str, host_seq: u64) -> String {
    format!("{host_id}:{epoch}:{host_seq}")
}

/// Splits an `event_id` into (host_id, epoch, host_seq). The host id may
/// itself contain ':' so the split is from the right.
pub fn parse_event_id(id: &str) -> Option<(&str, &str, u64)> {
    let (rest, seq) = id.rsplit_once(':')?;
    let (host, epoch) = rest.rsplit_once(':')?;
    Some((host, epoch, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_lifecycle_integers_map_to_unknown() {
        assert_eq!(EventType::from_lifecycle(9), EventType::UNKNOWN);
        assert_eq!(EventType::from_lifecycle(-3), EventType::UNKNOWN);
        assert_eq!(Detail::from_code(EventType::STARTED, 42), Detail::UNKNOWN);
        assert_eq!(Detail::from_code(EventType::UNKNOWN, 0), Detail::UNKNOWN);
        assert_eq!(DomainState::from_code(99), DomainState::UNKNOWN);
        let sr = StateReason::from_codes(1, 77);
        assert_eq!(sr.state, DomainState::RUNNING);
        assert_eq!(sr.reason, "UNKNOWN");
        assert_eq!(sr.reason_code, 77);
        let sr = StateReason::from_codes(12, 1);
        assert_eq!((sr.state, sr.state_code), (DomainState::UNKNOWN, 12));
    }

    #[test]
    fn known_codes_round_trip() {
        for code in 0..=8 {
            let e = EventType::from_lifecycle(code);
            assert_eq!(e.lifecycle_code(), Some(code));
            for d in 0..detail_table(e).len() as i32 {
                assert_eq!(Detail::from_code(e, d).code(e), d);
            }
        }
        assert_eq!(
            Detail::from_code(EventType::STOPPED, 5),
            Detail::FAILED,
            "STOPPED/FAILED is what a killed qemu reports"
        );
        assert_eq!(Detail::from_code(EventType::RESUMED, 0), Detail::UNPAUSED);
        assert_eq!(
            StateReason::named(DomainState::SHUTOFF, "DESTROYED").reason_code,
            2
        );
    }

    #[test]
    fn event_id_round_trips_with_colons_in_host() {
        let id = event_id("rack1:host-a", "7f3c", 1042);
        assert_eq!(parse_event_id(&id), Some(("rack1:host-a", "7f3c", 1042)));
        assert_eq!(parse_event_id("nonsense"), None);
    }
}
