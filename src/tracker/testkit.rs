//! Test helpers of the tracker's unit tests: an in-memory inspector, and
//! the tracker behind the enricher as the agent wires them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::XmlMode;
use crate::model::{DomainState, HostInfo, StateReason};
use crate::source::enrich::{EnrichOptions, Enricher, Inspector, LookupError};
use crate::source::{Facts, Item, RawEvent};

use super::state::Tracker;
use super::types::{Output, TrackerOptions};

/// An in-memory inspector for the pure state-machine tests.
#[derive(Default, Clone)]
pub struct TableInspector(pub Arc<Mutex<HashMap<String, Facts>>>);

impl TableInspector {
    /// What a lookup of `uuid` answers from now on.
    pub fn set(&self, uuid: &str, facts: Facts) {
        self.0.lock().unwrap().insert(uuid.to_string(), facts);
    }
}

impl Inspector for TableInspector {
    fn inspect(&self, uuid: &str, _xml: bool) -> Result<Facts, LookupError> {
        self.0
            .lock()
            .unwrap()
            .get(uuid)
            .cloned()
            .ok_or(LookupError::NoDomain)
    }
}

/// The tracker behind the enricher, as the agent wires them: events
/// and listings pass the enricher first.
pub(crate) struct Enriched {
    pub tracker: Tracker,
    pub enricher: Enricher<TableInspector>,
}

impl Enriched {
    pub fn on_event(&mut self, raw: &RawEvent) -> Output {
        let mut items = [Item::Event(Box::new(raw.clone()))];
        self.enricher.enrich(&mut items);
        let [Item::Event(raw)] = items else {
            unreachable!()
        };
        self.tracker.on_event(&raw)
    }

    pub fn begin_listing(&mut self) {
        self.enricher
            .enrich(&mut [Item::ListingBegin { dropped: 0 }]);
        self.tracker.begin_listing();
    }

    pub fn on_resync(&mut self, listing: &[(String, Facts)], observed_at: i64) -> Vec<Output> {
        self.enricher.enrich(&mut [Item::Resync {
            listing: listing.to_vec(),
            observed_at,
            info: HostInfo::default(),
        }]);
        self.tracker.on_resync(listing, observed_at)
    }
}

impl std::ops::Deref for Enriched {
    type Target = Tracker;
    fn deref(&self) -> &Tracker {
        &self.tracker
    }
}

impl std::ops::DerefMut for Enriched {
    fn deref_mut(&mut self) -> &mut Tracker {
        &mut self.tracker
    }
}

pub fn facts(state: DomainState, reason: &str, persistent: bool) -> Facts {
    Facts {
        name: "vm".into(),
        id: Some(3),
        state: StateReason::named(state, reason),
        persistent,
        autostart: Some(false),
        vcpus: Some(2),
        memory_kib: Some(1024),
        config_hash: Some("sha256:aa".into()),
        xml: None,
    }
}

pub(crate) fn tracker(table: TableInspector) -> Enriched {
    Enriched {
        tracker: Tracker::new(
            "host-a".into(),
            "e1".into(),
            0,
            HashMap::new(),
            TrackerOptions {
                xml: XmlMode::Off,
                max_journal_bytes: u64::MAX,
            },
        ),
        enricher: Enricher::new(
            table,
            EnrichOptions {
                xml: XmlMode::Off,
                lookup_attempts: 1,
            },
        ),
    }
}

pub(crate) fn raw(uuid: &str, ty: i32, detail: i32) -> RawEvent {
    RawEvent {
        uuid: uuid.into(),
        name: "vm".into(),
        id: Some(3),
        event_id: 0,
        type_code: ty,
        detail_code: detail,
        observed_at: 1,
        facts: None,
    }
}
