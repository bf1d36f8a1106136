//! What the tracker keeps and produces: the per-domain record (persisted
//! in the journal), the messages and snapshot records it emits, why a gap
//! marker is emitted, and its settings.
//!
//! Invariants:
//! - `DomainRecord` is JSON in the journal: a field added later takes
//!   `#[serde(default)]`, so records an older agent wrote still decode;
//! - a record the journal cannot decode is never fatal: the domain's `seq`
//!   restarts and a reconcile repairs its state (`decode_records`);
//! - a gone record (shut off, not persistent) with no tombstone pending is
//!   not loaded at start: it stays in the journal until the domain returns.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::config::XmlMode;
use crate::model::{Detail, DomainEvent, DomainSnapshot, DomainState, HostSnapshot, StateReason};

/// Why a gap marker is emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapCause {
    Disconnected,
    QueueOverflow,
    JournalFull,
    AgentRestart,
    /// The journal was found behind the bus (restored from a backup or a
    /// VM snapshot) and a new epoch began. Same `Detail` as
    /// `AgentRestart` (no new schema symbol); its own metric label.
    JournalRestored,
}

impl GapCause {
    pub(super) fn detail(self) -> Detail {
        match self {
            GapCause::Disconnected => Detail::DISCONNECTED,
            GapCause::QueueOverflow => Detail::QUEUE_OVERFLOW,
            GapCause::JournalFull => Detail::JOURNAL_FULL,
            GapCause::AgentRestart | GapCause::JournalRestored => Detail::AGENT_RESTART,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            GapCause::Disconnected => "disconnected",
            GapCause::QueueOverflow => "queue_overflow",
            GapCause::JournalFull => "journal_full",
            GapCause::AgentRestart => "agent_restart",
            GapCause::JournalRestored => "journal_restored",
        }
    }
}

/// What the events applied since a listing began settled about one
/// domain: the listing may be older than them, so it does not override
/// what they settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Touch {
    /// An event fixed the state (STARTED, SUSPENDED, STOPPED, …).
    pub state: bool,
    /// DEFINED or UNDEFINED fixed the persistence.
    pub persistence: bool,
    /// DEFINED showed the domain exists.
    pub defined: bool,
    /// DEFINED's lookup fixed the configuration (hash, sizes, autostart).
    pub config: bool,
}

/// The tracker's memory of one domain (persisted in the journal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainRecord {
    pub name: String,
    pub id: Option<i32>,
    pub state_code: i32,
    pub reason_code: i32,
    pub persistent: bool,
    pub autostart: Option<bool>,
    pub vcpus: Option<i32>,
    pub memory_kib: Option<i64>,
    pub config_hash: Option<String>,
    pub seq: u64,
    /// In the last complete snapshot round and not tombstoned since: a
    /// round that no longer finds the domain publishes its tombstone.
    #[serde(default)]
    pub in_round: bool,
}

impl DomainRecord {
    pub fn state(&self) -> StateReason {
        StateReason::from_codes(self.state_code, self.reason_code)
    }
    /// Shut off and not persistent: the domain no longer exists on the host.
    pub fn gone(&self) -> bool {
        !self.persistent && DomainState::from_code(self.state_code) == DomainState::SHUTOFF
    }
}

/// Tracker settings.
#[derive(Debug, Clone)]
pub struct TrackerOptions {
    pub xml: XmlMode,
    /// Journal payload bound; new events are not journaled beyond it.
    pub max_journal_bytes: u64,
}

/// One message produced by the tracker, with the domain record it leaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub event: DomainEvent,
    pub record: Option<(String, DomainRecord)>,
}

/// A snapshot-round or heartbeat record, with the domain record it updates.
#[derive(Debug, Clone, PartialEq)]
pub enum Snap {
    Host(HostSnapshot),
    Domain(DomainSnapshot, Option<(String, DomainRecord)>),
    /// The domain left the host (seen by a complete round): its snapshot is
    /// deleted (null value on Kafka, tombstone header on NATS). No record
    /// for a domain only an earlier epoch knew (`Item::StaleSnapshots`).
    Tombstone {
        uuid: String,
        host_seq: u64,
        observed_at: i64,
        record: Option<(String, DomainRecord)>,
    },
}

impl Snap {
    pub fn host_seq(&self) -> u64 {
        match self {
            Snap::Host(h) => h.host_seq,
            Snap::Domain(d, _) => d.host_seq,
            Snap::Tombstone { host_seq, .. } => *host_seq,
        }
    }
}

/// Decodes the domain records the journal recovered. Gone domains with no
/// tombstone pending stay in the journal only (restored if they return).
pub fn decode_records(raw: &HashMap<String, Vec<u8>>) -> HashMap<String, DomainRecord> {
    raw.iter()
        .filter_map(|(k, v)| match serde_json::from_slice::<DomainRecord>(v) {
            Ok(r) if r.gone() && !r.in_round => None,
            Ok(r) => Some((k.clone(), r)),
            Err(e) => {
                // The domain's seq restarts from the journal's view; a
                // reconcile repairs its state. Never fatal.
                tracing::warn!(uuid = %k, error = %e, "unreadable tracker record in journal; domain will be reconciled");
                None
            }
        })
        .collect()
}
