//! The enricher's decisions: which events cost a fetch, how a batch is
//! fetched, and that a listing older than an event does not undo it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::*;
use crate::model::{HostInfo, StateReason};

const A: &str = "aaaaaaaa-3333-0000-0000-000000000000";
const B: &str = "bbbbbbbb-3333-0000-0000-000000000000";

// libvirt lifecycle codes (virDomainEventType).
const DEFINED: i32 = 0;
const UNDEFINED: i32 = 1;
const STARTED: i32 = 2;
const SUSPENDED: i32 = 3;
const RESUMED: i32 = 4;
const STOPPED: i32 = 5;

/// The UUIDs (with want_xml) of each `inspect_many` call.
type Calls = Arc<Mutex<Vec<Vec<(String, bool)>>>>;

/// A table of domains that counts what it was asked.
#[derive(Default, Clone)]
struct Counting {
    table: Arc<Mutex<HashMap<String, Facts>>>,
    /// One entry per `inspect_many` call: the UUIDs asked, with want_xml.
    calls: Calls,
}

impl Inspector for Counting {
    fn inspect(&self, uuid: &str, _xml: bool) -> Result<Facts, LookupError> {
        if uuid.starts_with("ffffffff") {
            return Err(LookupError::Libvirt("internal error".into()));
        }
        self.table
            .lock()
            .unwrap()
            .get(uuid)
            .cloned()
            .ok_or(LookupError::NoDomain)
    }

    fn inspect_many(&self, wanted: &[(String, bool)]) -> Vec<Result<Facts, LookupError>> {
        self.calls.lock().unwrap().push(wanted.to_vec());
        wanted.iter().map(|(u, x)| self.inspect(u, *x)).collect()
    }
}

impl Counting {
    fn put(&self, uuid: &str, persistent: bool, state: DomainState) {
        self.table.lock().unwrap().insert(
            uuid.to_owned(),
            Facts {
                name: "vm".into(),
                id: None,
                state: StateReason::named(state, "UNKNOWN"),
                persistent,
                autostart: Some(false),
                vcpus: Some(2),
                memory_kib: Some(1024),
                config_hash: Some("sha256:aa".into()),
                xml: None,
            },
        );
    }
    fn remove(&self, uuid: &str) {
        self.table.lock().unwrap().remove(uuid);
    }
    fn calls(&self) -> Vec<Vec<(String, bool)>> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

fn enricher(xml: XmlMode) -> (Enricher<Counting>, Counting) {
    let c = Counting::default();
    let e = Enricher::new(
        c.clone(),
        EnrichOptions {
            xml,
            lookup_attempts: 2,
        },
    );
    (e, c)
}

fn ev(uuid: &str, ty: i32) -> Item {
    Item::Event(Box::new(RawEvent {
        uuid: uuid.into(),
        name: "vm".into(),
        id: None,
        event_id: 0,
        type_code: ty,
        detail_code: 0,
        observed_at: now_micros(),
        facts: None,
    }))
}

fn listing(c: &Counting) -> Item {
    Item::Resync {
        listing: c
            .table
            .lock()
            .unwrap()
            .iter()
            .map(|(u, f)| (u.clone(), f.clone()))
            .collect(),
        observed_at: 1,
        info: HostInfo::default(),
    }
}

fn has_facts(items: &[Item]) -> Vec<bool> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Event(r) => Some(r.facts.is_some()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_known_domains_transitions_cost_no_lookup() {
    let (mut e, c) = enricher(XmlMode::OnChange);
    c.put(A, true, DomainState::RUNNING);
    e.enrich(&mut [Item::ListingBegin { dropped: 0 }, listing(&c)]);
    let mut items: Vec<Item> = (0..1000)
        .map(|i| ev(A, if i % 2 == 0 { SUSPENDED } else { RESUMED }))
        .collect();
    items.push(ev(A, STOPPED));
    items.push(ev(A, STARTED));
    e.enrich(&mut items);
    assert!(c.calls().is_empty(), "no lookup for a known domain");
    assert!(has_facts(&items).iter().all(|f| !f));
}

#[test]
fn definitions_and_unknown_domains_are_fetched_in_one_call_per_batch() {
    let (mut e, c) = enricher(XmlMode::Off);
    c.put(A, true, DomainState::RUNNING);
    c.put(B, true, DomainState::SHUTOFF);
    e.enrich(&mut [Item::ListingBegin { dropped: 0 }, listing(&c)]);
    let news: Vec<String> = (0..50)
        .map(|i| format!("cccccccc-3333-0000-0000-{i:012}"))
        .collect();
    for u in &news {
        c.put(u, false, DomainState::RUNNING);
    }
    let mut items: Vec<Item> = news.iter().map(|u| ev(u, STARTED)).collect();
    items.push(ev(B, DEFINED));
    items.push(ev(A, SUSPENDED));
    // A second event of a new domain in the same batch needs nothing more.
    items.push(ev(&news[0], SUSPENDED));
    e.enrich(&mut items);
    let calls = c.calls();
    assert_eq!(calls.len(), 1, "one bulk fetch for the batch");
    assert_eq!(calls[0].len(), 51, "each domain asked once");
    assert!(calls[0].iter().all(|(_, xml)| *xml), "configuration hashes");
    let f = has_facts(&items);
    assert!(
        f[..51].iter().all(|x| *x),
        "new domains and DEFINED carry facts"
    );
    assert!(!f[51] && !f[52], "known transitions do not");
}

#[test]
fn a_domain_that_left_and_came_back_is_fetched_again() {
    let (mut e, c) = enricher(XmlMode::Off);
    c.put(A, false, DomainState::RUNNING);
    e.enrich(&mut [Item::ListingBegin { dropped: 0 }, listing(&c)]);
    // A transient domain stops (gone), then is created again.
    let mut items = vec![ev(A, STOPPED), ev(A, STARTED)];
    e.enrich(&mut items);
    assert_eq!(has_facts(&items), vec![false, true]);
    // A persistent one undefined while shut off, then defined again.
    c.put(B, true, DomainState::SHUTOFF);
    e.enrich(&mut [Item::ListingBegin { dropped: 0 }, listing(&c)]);
    c.calls();
    let mut items = vec![ev(B, UNDEFINED), ev(B, DEFINED), ev(B, STARTED)];
    e.enrich(&mut items);
    assert_eq!(has_facts(&items), vec![false, true, false]);
}

#[test]
fn a_listing_older_than_an_event_does_not_undo_it() {
    let (mut e, c) = enricher(XmlMode::Off);
    c.put(A, false, DomainState::RUNNING);
    e.enrich(&mut [Item::ListingBegin { dropped: 0 }, listing(&c)]);
    // The barrier, then A (transient) stops while the listing, which
    // still shows it running, is being read.
    let old = listing(&c);
    c.remove(A);
    e.enrich(&mut [Item::ListingBegin { dropped: 0 }, ev(A, STOPPED), old]);
    // A is created again: the enricher knows it was gone and fetches.
    c.put(A, false, DomainState::RUNNING);
    let mut items = vec![ev(A, STARTED)];
    e.enrich(&mut items);
    assert_eq!(has_facts(&items), vec![true]);
}

#[test]
fn the_listing_replaces_what_events_did_not_touch() {
    let (mut e, c) = enricher(XmlMode::Off);
    c.put(A, true, DomainState::RUNNING);
    e.enrich(&mut [Item::ListingBegin { dropped: 0 }, listing(&c)]);
    assert_eq!(e.memory().0, 1);
    // A vanished while events were lost: the next listing forgets it.
    c.remove(A);
    c.put(B, true, DomainState::RUNNING);
    e.enrich(&mut [Item::ListingBegin { dropped: 0 }, listing(&c)]);
    assert_eq!(e.memory().0, 1);
    let mut items = vec![ev(B, SUSPENDED)];
    e.enrich(&mut items);
    assert_eq!(has_facts(&items), vec![false]);
}

#[test]
fn xml_always_fetches_every_event() {
    let (mut e, c) = enricher(XmlMode::Always);
    c.put(A, true, DomainState::RUNNING);
    e.enrich(&mut [Item::ListingBegin { dropped: 0 }, listing(&c)]);
    let mut items = vec![ev(A, SUSPENDED), ev(A, RESUMED)];
    e.enrich(&mut items);
    assert_eq!(has_facts(&items), vec![true, true]);
    assert_eq!(c.calls().len(), 1, "still one call for the batch");
}

#[test]
fn a_missing_domain_is_retried_then_not_asked_again_for_older_events() {
    let (mut e, c) = enricher(XmlMode::Off);
    let early = ev(A, SUSPENDED);
    let mut items = vec![ev(A, STARTED)];
    e.enrich(&mut items);
    assert_eq!(c.calls().len(), 2, "asked, then once more after a backoff");
    assert_eq!(has_facts(&items), vec![false]);
    // An event observed before that answer cannot learn more.
    let mut items = vec![early];
    e.enrich(&mut items);
    assert!(c.calls().is_empty());
}

#[test]
fn seeded_domains_need_no_fetch_before_the_first_listing() {
    let (mut e, c) = enricher(XmlMode::Off);
    e.seed(A, true, false);
    e.seed(B, false, true); // gone: not seeded
    let mut items = vec![ev(A, SUSPENDED), ev(B, STARTED)];
    c.put(B, false, DomainState::RUNNING);
    e.enrich(&mut items);
    assert_eq!(has_facts(&items), vec![false, true]);
}

#[test]
fn churn_leaves_nothing_behind() {
    let (mut e, c) = enricher(XmlMode::Off);
    // Transient domains created and destroyed before any lookup, in one
    // batch or across two; and defined then undefined.
    for i in 0..500 {
        let u = format!("dddddddd-3333-0000-0000-{i:012}");
        let mut items = vec![ev(&u, STARTED), ev(&u, STOPPED)];
        e.enrich(&mut items);
        e.enrich(&mut [ev(&u, STARTED)]);
        e.enrich(&mut [ev(&u, STOPPED)]);
        e.enrich(&mut [ev(&u, DEFINED)]);
        e.enrich(&mut [ev(&u, UNDEFINED)]);
    }
    assert_eq!(e.memory(), (0, 0));
    assert!(!c.calls().is_empty());
}

#[test]
fn a_failed_fetch_is_asked_again_and_says_nothing_of_persistence() {
    let (mut e, c) = enricher(XmlMode::Off);
    let u = "ffffffff-3333-0000-0000-000000000000";
    let mut items = vec![ev(u, STARTED)];
    e.enrich(&mut items);
    assert_eq!(has_facts(&items), vec![false]);
    assert_eq!(c.calls().len(), 1, "not retried like a missing domain");
    // The next event asks again; its STOPPED does not make it gone.
    let mut items = vec![ev(u, SUSPENDED)];
    e.enrich(&mut items);
    assert_eq!(c.calls().len(), 1);
    e.enrich(&mut [ev(u, STOPPED)]);
    assert_eq!(e.memory().0, 1, "persistence unknown: still on the host");
}

#[test]
fn a_listing_gives_the_persistence_an_event_after_its_barrier_did_not_settle() {
    let (mut e, c) = enricher(XmlMode::Off);
    // Known persistent (from the journal), but libvirt made it transient.
    e.seed(A, true, false);
    c.put(A, false, DomainState::RUNNING);
    let old = listing(&c);
    e.enrich(&mut [Item::ListingBegin { dropped: 0 }, ev(A, SUSPENDED), old]);
    // Transient, so its stop is its end; created again, it is fetched.
    e.enrich(&mut [ev(A, STOPPED)]);
    assert_eq!(e.memory().0, 0);
    let mut items = vec![ev(A, STARTED)];
    e.enrich(&mut items);
    assert_eq!(has_facts(&items), vec![true]);
}

#[test]
fn an_undefined_domain_never_seen_is_gone() {
    let (mut e, _c) = enricher(XmlMode::Off);
    e.enrich(&mut [ev(A, UNDEFINED)]);
    assert_eq!(e.memory().0, 0);
}
