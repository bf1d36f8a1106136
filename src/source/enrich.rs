//! The enricher: the stage between libvirt's callbacks and the tracker
//! that attaches the facts an event cannot tell (persistence, autostart,
//! sizes, configuration hash, XML) where they are needed, so the tracker
//! never calls libvirt and a known domain's lifecycle transition costs no
//! libvirt call at all.
//!
//! Invariants:
//! - items leave in the order they arrived; the enricher only fills
//!   `RawEvent::facts`, never reorders, drops or merges;
//! - facts are fetched only for a DEFINED (its configuration changed), a
//!   domain the enricher does not know to exist, or every event when the
//!   XML is wanted with every message (`xml = "always"`); a fetch may
//!   already see a later state, and the tracker never lets it override the
//!   state the event leads to (see `tracker::derive`);
//! - fetches are batched: every item queued when a batch starts is looked
//!   at together and the domains it needs are fetched at once (one bulk
//!   stats call for all of them, see `Inspector::inspect_many`);
//! - what the enricher knows of a domain follows events and listings the
//!   way the tracker's records do; a listing does not undo what events
//!   after its barrier settled (list + watch, see `tracker::rounds`). Where the
//!   two disagree the cost is one needless fetch, or one event published
//!   with the tracker's last known facts, repaired by the next round.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::now_micros;
use crate::config::XmlMode;
use crate::model::{DomainState, EventType};
use crate::source::{Facts, Item, RawEvent};

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum LookupError {
    #[error("no such domain (yet)")]
    NoDomain,
    #[error("not connected to libvirt")]
    Disconnected,
    #[error("libvirt: {0}")]
    Libvirt(String),
}

/// Looks domains up (libvirt in the agent, a table in tests and benches).
pub trait Inspector: Send {
    fn inspect(&self, uuid: &str, want_xml: bool) -> Result<Facts, LookupError>;

    /// Several domains at once, answers in the order asked. Implementations
    /// with a bulk call (libvirt's `virDomainListGetStats`) override it.
    fn inspect_many(&self, wanted: &[(String, bool)]) -> Vec<Result<Facts, LookupError>> {
        wanted.iter().map(|(u, x)| self.inspect(u, *x)).collect()
    }
}

/// Enricher settings (from `[libvirt]`).
#[derive(Debug, Clone)]
pub struct EnrichOptions {
    pub xml: XmlMode,
    /// Lookups of a domain not found yet (libvirt sends DEFINED before a
    /// lookup finds the domain); 2 ms, then 4× longer each time.
    pub lookup_attempts: u32,
}

/// What the enricher knows of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    /// `None` while the fetch that tells it is under way (or failed).
    pub persistent: Option<bool>,
    pub shutoff: bool,
    /// Facts were had (a fetch, a listing or the journal): a domain whose
    /// fetch failed is fetched again with its next event.
    pub complete: bool,
}

/// What events since a listing's barrier settled about a domain (as the
/// tracker's `Touch`): the listing may be older and does not undo it.
#[derive(Debug, Clone, Copy, Default)]
struct Touched {
    state: bool,
    persistence: bool,
    defined: bool,
}

impl Known {
    /// Shut off and not persistent: no longer on the host.
    fn gone(&self) -> bool {
        self.persistent == Some(false) && self.shutoff
    }
}

/// Whether an event leaves the domain shut off (`Some(true)`), running in
/// some way (`Some(false)`), or does not change it (`None`).
fn shuts_off(event: EventType) -> Option<bool> {
    match event {
        EventType::STOPPED => Some(true),
        EventType::STARTED
        | EventType::SUSPENDED
        | EventType::RESUMED
        | EventType::SHUTDOWN
        | EventType::PMSUSPENDED
        | EventType::CRASHED => Some(false),
        _ => None,
    }
}

/// The pure part: decides, fetches through the inspector, attaches.
pub struct Enricher<I: Inspector> {
    inspector: I,
    opts: EnrichOptions,
    known: HashMap<String, Known>,
    /// Between a listing's barrier and the listing: domains events
    /// touched (the listing may be older than them).
    touched: Option<HashMap<String, Touched>>,
    /// UUID → agent time at which a lookup found no such domain. Events
    /// observed before that time are not looked up again: the answer
    /// cannot be better.
    missing_since: HashMap<String, i64>,
}

impl<I: Inspector> Enricher<I> {
    pub fn new(inspector: I, opts: EnrichOptions) -> Self {
        Enricher {
            inspector,
            opts,
            known: HashMap::new(),
            touched: None,
            missing_since: HashMap::new(),
        }
    }

    /// Seeds what the journal remembers (before the first listing).
    pub fn seed(&mut self, uuid: &str, persistent: bool, shutoff: bool) {
        let k = Known {
            persistent: Some(persistent),
            shutoff,
            complete: true,
        };
        if !k.gone() {
            self.known.insert(uuid.to_owned(), k);
        }
    }

    pub fn inspector(&self) -> &I {
        &self.inspector
    }

    /// Domains the enricher believes exist, and domains it remembers
    /// libvirt did not find.
    pub fn memory(&self) -> (usize, usize) {
        (self.known.len(), self.missing_since.len())
    }

    /// Attaches facts to the events of `items` that need them.
    pub fn enrich(&mut self, items: &mut [Item]) {
        // Which events need facts, in order, with what the batch itself
        // settles noted as it goes; then one fetch for all of them.
        let mut wanted: Vec<(String, bool)> = Vec::new();
        let mut slot: HashMap<String, usize> = HashMap::new();
        let mut needs: Vec<(usize, usize)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item {
                Item::Event(raw) => {
                    if let Some(want_xml) = self.needs(raw, slot.contains_key(&raw.uuid)) {
                        let w = *slot.entry(raw.uuid.clone()).or_insert_with(|| {
                            wanted.push((raw.uuid.clone(), false));
                            wanted.len() - 1
                        });
                        wanted[w].1 |= want_xml;
                        needs.push((i, w));
                    }
                    self.note(raw);
                }
                Item::ListingBegin { .. } => self.touched = Some(HashMap::new()),
                Item::Resync { listing, .. } => self.apply_listing(listing),
                Item::Disconnected { .. } => self.touched = None,
                Item::StaleSnapshots(_) | Item::Hook(_) => {}
            }
        }
        if wanted.is_empty() {
            return;
        }
        let answers = self.fetch(&wanted);
        for (uuid, f) in wanted.iter().map(|w| &w.0).zip(&answers) {
            let Some(k) = self.known.get_mut(uuid) else {
                continue;
            };
            match f {
                Ok(f) => {
                    k.persistent = k.persistent.or(Some(f.persistent));
                    k.complete = true;
                }
                // Not found: not (or no longer) defined on the host.
                Err(LookupError::NoDomain) => k.persistent = k.persistent.or(Some(false)),
                // Unknown: asked again with the next event.
                Err(_) => {}
            }
            if k.gone() {
                // Created and gone within the batch (churn): forgotten, so
                // memory stays flat however many UUIDs pass.
                self.forget(uuid);
            }
        }
        for (i, w) in needs {
            if let (Item::Event(raw), Ok(f)) = (&mut items[i], &answers[w]) {
                raw.facts = Some(Box::new(f.clone()));
            }
        }
    }

    /// `Some(want_xml)` when the event needs a fetch; `scheduled` when one
    /// is already asked for this domain in the batch.
    fn needs(&self, raw: &RawEvent, scheduled: bool) -> Option<bool> {
        let (event, _) = EventType::classify(raw.event_id, raw.type_code, raw.detail_code);
        let live = self.known.get(&raw.uuid).filter(|k| !k.gone());
        // An event that ends the domain: nothing left to look up.
        let ends = match (event, shuts_off(event)) {
            (EventType::UNDEFINED, _) => live.is_none_or(|k| k.shutoff),
            (_, Some(true)) => live.is_some_and(|k| k.persistent == Some(false)),
            _ => false,
        };
        if ends
            || self
                .missing_since
                .get(&raw.uuid)
                .is_some_and(|t| raw.observed_at <= *t)
        {
            return None;
        }
        match live {
            None => Some(true),
            Some(k) if !k.complete && !scheduled => Some(true),
            Some(_) if event == EventType::DEFINED => Some(true),
            Some(_) if self.opts.xml == XmlMode::Always => Some(true),
            Some(_) => None,
        }
    }

    /// What the event settles about the domain.
    fn note(&mut self, raw: &RawEvent) {
        let (event, _) = EventType::classify(raw.event_id, raw.type_code, raw.detail_code);
        if let Some(t) = self.touched.as_mut() {
            let t = t.entry(raw.uuid.clone()).or_default();
            t.state |= shuts_off(event).is_some();
            t.persistence |= matches!(event, EventType::DEFINED | EventType::UNDEFINED);
            t.defined |= event == EventType::DEFINED;
        }
        let k = self
            .known
            .entry(raw.uuid.clone())
            .and_modify(|k| {
                if k.gone() {
                    // Back on the host: the fetch tells what it is now.
                    k.persistent = None;
                    k.complete = false;
                }
            })
            .or_insert(Known {
                persistent: None,
                // A new definition is shut off until it starts; an
                // undefined domain never seen is gone (as for the tracker).
                shutoff: matches!(event, EventType::DEFINED | EventType::UNDEFINED),
                complete: false,
            });
        match event {
            EventType::DEFINED => k.persistent = Some(true),
            EventType::UNDEFINED => k.persistent = Some(false),
            _ => {}
        }
        if let Some(off) = shuts_off(event) {
            k.shutoff = off;
        }
        if k.gone() {
            self.forget(&raw.uuid);
        }
    }

    fn forget(&mut self, uuid: &str) {
        self.known.remove(uuid);
        self.missing_since.remove(uuid);
    }

    /// A listing, applied by the tracker's list + watch rule: what it
    /// shows replaces what the enricher knew, except what events after
    /// its barrier settled (state, persistence); a domain it lacks is
    /// gone unless such an event showed it exists.
    fn apply_listing(&mut self, listing: &[(String, Facts)]) {
        let touched = self.touched.take().unwrap_or_default();
        let listed: HashSet<&str> = listing.iter().map(|(u, _)| u.as_str()).collect();
        self.known.retain(|u, _| {
            listed.contains(u.as_str()) || touched.get(u).is_some_and(|t| t.state || t.defined)
        });
        for (uuid, f) in listing {
            let shutoff = f.state.state == DomainState::SHUTOFF;
            let k = match (touched.get(uuid), self.known.get_mut(uuid)) {
                (Some(t), Some(k)) => {
                    if !t.persistence {
                        k.persistent = Some(f.persistent);
                    }
                    if !t.state {
                        k.shutoff = shutoff;
                    }
                    k.complete = true;
                    *k
                }
                (Some(t), None) => {
                    // Forgotten since the barrier: an event ended it.
                    let k = Known {
                        persistent: Some(!t.persistence && f.persistent),
                        shutoff: t.state || shutoff,
                        complete: true,
                    };
                    if !k.gone() {
                        self.known.insert(uuid.clone(), k);
                    }
                    k
                }
                (None, _) => {
                    let k = Known {
                        persistent: Some(f.persistent),
                        shutoff,
                        complete: true,
                    };
                    self.known.insert(uuid.clone(), k);
                    k
                }
            };
            if k.gone() {
                self.forget(uuid);
            }
        }
    }

    /// Facts for every wanted domain (`None`: could not be had). Domains
    /// not found are retried with backoff, all together.
    fn fetch(&mut self, wanted: &[(String, bool)]) -> Vec<Result<Facts, LookupError>> {
        let mut out: Vec<Result<Facts, LookupError>> =
            vec![Err(LookupError::NoDomain); wanted.len()];
        let mut pending: Vec<usize> = (0..wanted.len()).collect();
        let attempts = self.opts.lookup_attempts.max(1);
        let mut delay = Duration::from_millis(2);
        for attempt in 1..=attempts {
            let ask: Vec<(String, bool)> = pending.iter().map(|&i| wanted[i].clone()).collect();
            let answers = self.inspector.inspect_many(&ask);
            let mut missing = Vec::new();
            for (&i, r) in pending.iter().zip(answers) {
                match r {
                    Ok(f) => {
                        self.missing_since.remove(&wanted[i].0);
                        out[i] = Ok(f);
                    }
                    Err(LookupError::NoDomain) => missing.push(i),
                    Err(e) => {
                        tracing::debug!(uuid = %wanted[i].0, error = %e, "lookup failed; publishing what the event tells");
                        out[i] = Err(e);
                    }
                }
            }
            pending = missing;
            if pending.is_empty() {
                break;
            }
            if attempt < attempts {
                std::thread::sleep(delay);
                delay *= 4;
            }
        }
        if !pending.is_empty() {
            if self.missing_since.len() + pending.len() > 65_536 {
                // Bounded: forgetting only costs a lookup or two.
                self.missing_since.clear();
            }
            let now = now_micros();
            for i in pending {
                self.missing_since.insert(wanted[i].0.clone(), now);
            }
        }
        out
    }
}

/// Largest batch looked at together.
const MAX_BATCH: usize = 1024;

/// The enricher's thread: callback queue in, tracker queue out.
pub struct EnrichTask<I: Inspector> {
    pub enricher: Enricher<I>,
    pub input: Receiver<Item>,
    pub output: SyncSender<Item>,
    /// Set at shutdown: pass on what is queued, then return (dropping the
    /// output, which tells the tracker nothing more comes).
    pub stop: Arc<AtomicBool>,
}

impl<I: Inspector> EnrichTask<I> {
    pub fn run(mut self) {
        let mut batch: Vec<Item> = Vec::with_capacity(64);
        loop {
            let stopping = self.stop.load(Ordering::Relaxed);
            let first = if stopping {
                match self.input.try_recv() {
                    Ok(i) => i,
                    Err(_) => return,
                }
            } else {
                match self.input.recv_timeout(Duration::from_millis(100)) {
                    Ok(i) => i,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match self.input.try_recv() {
                    Ok(i) => batch.push(i),
                    Err(_) => break,
                }
            }
            self.enricher.enrich(&mut batch);
            for item in batch.drain(..) {
                if self.output.send(item).is_err() {
                    return;
                }
            }
            if batch.capacity() > 4 * 64 {
                // A burst's batch is not kept for the quiet times.
                batch.shrink_to(64);
            }
        }
    }
}

#[cfg(test)]
#[path = "enrich_tests.rs"]
mod tests;
