//! The libvirt source: an explicit connection state machine
//! (Connecting → Connected → Backoff → Connecting …) that owns the libvirt
//! connection, registers the event callbacks, lists domains after every
//! (re)connect and on request, and reports disconnects as items on the
//! tracker's queue.
//!
//! Invariants:
//! - callbacks are registered *before* the listing, so no change falls
//!   between listing and events (a change may show in both; the listing
//!   then finds no difference and the tracker emits nothing for it);
//! - every lost connection puts `Item::Disconnected` on the queue before
//!   the next listing, so consumers see a gap marker before the reconcile;
//! - this thread may block on libvirt calls; libvirt's event-loop thread
//!   never waits for it.

pub mod enrich;
// The one module allowed `unsafe` (see its header).
#[allow(unsafe_code)]
pub mod ffi;
mod handoff;

pub use handoff::{Facts, Item, RawEvent, ResyncRequests};

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use virt::connect::Connect;
use virt::domain::Domain;

use crate::clock::now_micros;
use crate::model::{HostInfo, StateReason};
use crate::telemetry::{Health, Metrics};
use enrich::{Inspector, LookupError};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open libvirt connection to {uri}: {message}")]
    Open { uri: String, message: String },
    #[error("libvirt event loop: {0}")]
    EventLoop(String),
    #[error("registering callbacks on {uri}: {message}")]
    Register { uri: String, message: String },
    #[error("listing domains on {uri}: {message}")]
    List { uri: String, message: String },
}

/// Connection settings (from `[libvirt]`).
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub uri: String,
    pub read_only: bool,
    pub keepalive_interval: u32,
    pub keepalive_count: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Keep domain XML in listings (messages carry it).
    pub keep_xml: bool,
}

/// The live connection, shared with the inspector for lookups.
pub type ConnSlot = Arc<RwLock<Option<Connect>>>;

/// Opens a connection as configured.
pub fn open(opts: &SourceOptions) -> Result<Connect, SourceError> {
    ffi::init_event_loop().map_err(SourceError::EventLoop)?;
    let conn = if opts.read_only {
        Connect::open_read_only(Some(&opts.uri))
    } else {
        Connect::open(Some(&opts.uri))
    }
    .map_err(|e| SourceError::Open {
        uri: opts.uri.clone(),
        message: e.message().to_string(),
    })?;
    if opts.keepalive_interval > 0 {
        if let Err(e) = conn.set_keep_alive(opts.keepalive_interval as i32, opts.keepalive_count) {
            tracing::warn!(error = %e.message(), "libvirt keepalive not enabled");
        }
    }
    Ok(conn)
}

/// The host UUID from libvirt's capabilities, for a default host id.
pub fn host_uuid(conn: &Connect) -> Option<String> {
    let caps = conn.capabilities().ok()?;
    let host = caps.split("<host>").nth(1)?;
    let uuid = host.split("<uuid>").nth(1)?.split("</uuid>").next()?;
    Some(uuid.trim().to_string()).filter(|u| !u.is_empty())
}

/// Everything a lookup or listing reports about one domain.
pub fn facts_of(dom: &Domain, want_xml: bool) -> Result<Facts, virt::error::Error> {
    let (state, reason) = ffi::domain_state(dom)?;
    let persistent = dom.is_persistent()?;
    let autostart = if persistent {
        dom.autostart().ok()
    } else {
        Some(false)
    };
    let info = dom.info().ok();
    let xml = if want_xml {
        dom.xml_desc(virt_sys::VIR_DOMAIN_XML_INACTIVE).ok()
    } else {
        None
    };
    let config_hash = xml.as_ref().map(|x| config_hash(x));
    Ok(Facts {
        name: dom.name()?,
        id: dom.id().and_then(|i| i32::try_from(i).ok()),
        state: StateReason::from_codes(state, reason),
        persistent,
        autostart,
        vcpus: info.as_ref().map(|i| i.nr_virt_cpu as i32),
        memory_kib: info.as_ref().map(|i| i.max_mem as i64),
        config_hash,
        xml,
    })
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    matches!(
        e.code(),
        virt::error::ErrorNumberEnum::Known(virt::error::ErrorNumber::NoDomain)
    )
}

/// Every domain on the host with its facts. Domains that vanish between
/// the list and their lookup are skipped (their events follow).
///
/// Bulk where libvirt allows: one list call, one GetAllDomainStats call
/// (state, vCPUs, memory), and one list call each for the persistent and
/// the autostart domains. The XML (for the config hash) costs one call per
/// domain, so it is fetched only for a `full` listing (after connecting or
/// a gap, when config changes may have been missed) or when messages carry
/// it (`keep_xml`); a light listing leaves `config_hash` unset (and the
/// sizes, when the driver's bulk stats lack them) and the tracker keeps
/// what it knows.
pub fn list(
    conn: &Connect,
    keep_xml: bool,
    full: bool,
) -> Result<Vec<(String, Facts)>, virt::error::Error> {
    let doms = conn.list_all_domains(0)?;
    let stats = match ffi::all_domain_stats(conn) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(error = %e, "bulk domain stats unavailable; asking per domain");
            None
        }
    };
    let uuids = |flags| -> Result<HashSet<String>, virt::error::Error> {
        conn.list_all_domains(flags)?
            .iter()
            .map(|d| d.uuid_string())
            .collect()
    };
    let persistent = uuids(virt_sys::VIR_CONNECT_LIST_DOMAINS_PERSISTENT)?;
    let autostart = uuids(virt_sys::VIR_CONNECT_LIST_DOMAINS_AUTOSTART)?;
    // One domain's facts; Ok(None) when it vanished meanwhile.
    let one = |d: &Domain| -> Result<Option<(String, Facts)>, virt::error::Error> {
        let uuid = d.uuid_string()?;
        let bulk = stats.as_ref().and_then(|s| s.get(&uuid));
        let facts = match bulk {
            Some(b) if b.state >= 0 => {
                let is_persistent = persistent.contains(&uuid);
                let xml = if full || keep_xml {
                    match d.xml_desc(virt_sys::VIR_DOMAIN_XML_INACTIVE) {
                        Ok(x) => Some(x),
                        Err(e) if is_no_domain(&e) => return Ok(None),
                        Err(e) => return Err(e),
                    }
                } else {
                    None
                };
                // Drivers that report only the state (the test driver):
                // sizes from the XML a full listing reads anyway (a light
                // one leaves them to what the tracker knows), else one
                // more call.
                let (mut vcpus, mut memory_kib) = (b.vcpus, b.max_mem_kib);
                if full && (vcpus.is_none() || memory_kib.is_none()) {
                    let (v, m) = xml.as_deref().map(sizes_from_xml).unwrap_or_default();
                    vcpus = vcpus.or(v);
                    memory_kib = memory_kib.or(m);
                }
                if full && (vcpus.is_none() || memory_kib.is_none()) {
                    match d.info() {
                        Ok(i) => {
                            vcpus = vcpus.or(Some(i.nr_virt_cpu as i32));
                            memory_kib = memory_kib.or(Some(i.max_mem as i64));
                        }
                        Err(e) if is_no_domain(&e) => return Ok(None),
                        Err(e) => return Err(e),
                    }
                }
                Ok(Facts {
                    name: d.name()?,
                    id: d.id().and_then(|i| i32::try_from(i).ok()),
                    state: StateReason::from_codes(b.state, b.reason),
                    persistent: is_persistent,
                    autostart: Some(is_persistent && autostart.contains(&uuid)),
                    vcpus,
                    memory_kib,
                    config_hash: xml.as_ref().map(|x| config_hash(x)),
                    xml,
                })
            }
            _ => facts_of(d, full || keep_xml),
        };
        match facts {
            Ok(mut f) => {
                if !keep_xml {
                    f.xml = None;
                }
                Ok(Some((uuid, f)))
            }
            Err(e) if is_no_domain(&e) => Ok(None),
            Err(e) => Err(e),
        }
    };
    // Calls per domain (XML, sizes, or everything without bulk stats) are
    // spread over a few threads: libvirt connections take concurrent calls
    // and the daemon answers them on its worker pool.
    let per_domain_calls = full || keep_xml || stats.is_none();
    let results: Vec<Result<Option<(String, Facts)>, virt::error::Error>> =
        if per_domain_calls && doms.len() >= 256 {
            let chunk = doms.len().div_ceil(LISTING_THREADS);
            std::thread::scope(|scope| {
                let workers: Vec<_> = doms
                    .chunks(chunk)
                    .map(|c| scope.spawn(|| c.iter().map(&one).collect::<Vec<_>>()))
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().expect("listing worker"))
                    .collect()
            })
        } else {
            doms.iter().map(&one).collect()
        };
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        if let Some(x) = r? {
            out.push(x);
        }
    }
    Ok(out)
}

/// vCPUs (the `current` attribute, else the count) and maximum memory in
/// KiB from a domain's XML as libvirt writes it (`<vcpu ...>N</vcpu>`,
/// `<memory unit='KiB'>N</memory>`, the first of each: the domain's own,
/// before any device). `None` where absent or in another form.
pub fn sizes_from_xml(xml: &str) -> (Option<i32>, Option<i64>) {
    // The first element named exactly `name`: its attributes and text.
    fn element<'a>(xml: &'a str, name: &str) -> Option<(&'a str, &'a str)> {
        let open = format!("<{name}");
        let mut rest = xml;
        loop {
            let at = rest.find(&open)?;
            rest = &rest[at + open.len()..];
            let end = rest.find('>')?;
            if rest.starts_with([' ', '>']) && !rest[..end].ends_with('/') {
                let attrs = &rest[..end];
                let text = &rest[end + 1..];
                let text = &text[..text.find('<')?];
                return Some((attrs, text.trim()));
            }
        }
    }
    fn attr<'a>(attrs: &'a str, name: &str) -> Option<&'a str> {
        ["'", "\""].iter().find_map(|q| {
            let key = format!("{name}={q}");
            let at = attrs.find(&key)? + key.len();
            Some(&attrs[at..at + attrs[at..].find(q)?])
        })
    }
    let vcpus = element(xml, "vcpu")
        .and_then(|(attrs, text)| attr(attrs, "current").unwrap_or(text).parse::<i32>().ok());
    let memory_kib = element(xml, "memory").and_then(|(attrs, text)| {
        let n: i64 = text.parse().ok()?;
        match attr(attrs, "unit").unwrap_or("KiB") {
            "KiB" | "k" | "K" => Some(n),
            "MiB" | "M" => n.checked_mul(1 << 10),
            "GiB" | "G" => n.checked_mul(1 << 20),
            _ => None,
        }
    });
    (vcpus, memory_kib)
}

/// Threads of a listing that needs calls per domain: libvirtd serves up
/// to `max_client_requests` (default 5) calls of one client at once.
const LISTING_THREADS: usize = 5;

/// `sha256:<hex>` of a domain's inactive XML.
fn config_hash(xml: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(xml.as_bytes())))
}

/// Lookups through whatever connection is live.
pub struct LibvirtInspector {
    pub conn: ConnSlot,
}

impl LibvirtInspector {
    fn conn(&self) -> Result<Connect, LookupError> {
        self.conn
            .read()
            .expect("connection slot")
            .clone()
            .ok_or(LookupError::Disconnected)
    }
}

fn lookup_error(e: virt::error::Error) -> LookupError {
    if is_no_domain(&e) {
        LookupError::NoDomain
    } else {
        LookupError::Libvirt(e.message().to_string())
    }
}

/// From this many domains on, persistence and autostart come from two
/// list calls (of every domain on the host) instead of two calls per
/// domain.
const LIST_FLAGS_FROM: usize = 64;

impl Inspector for LibvirtInspector {
    fn inspect(&self, uuid: &str, want_xml: bool) -> Result<Facts, LookupError> {
        let conn = self.conn()?;
        let dom = conn
            .lookup_domain_by_uuid_string(uuid)
            .map_err(lookup_error)?;
        facts_of(&dom, want_xml).map_err(lookup_error)
    }

    /// One lookup per domain (a local handle needs it), then state, vCPUs
    /// and memory of all of them in one `virDomainListGetStats` call;
    /// persistence and autostart per domain, or from two list calls for
    /// larger batches; the XML only where wanted.
    fn inspect_many(&self, wanted: &[(String, bool)]) -> Vec<Result<Facts, LookupError>> {
        if wanted.len() == 1 {
            return vec![self.inspect(&wanted[0].0, wanted[0].1)];
        }
        let conn = match self.conn() {
            Ok(c) => c,
            Err(e) => return vec![Err(e); wanted.len()],
        };
        let doms: Vec<Result<Domain, LookupError>> = wanted
            .iter()
            .map(|(u, _)| conn.lookup_domain_by_uuid_string(u).map_err(lookup_error))
            .collect();
        let found: Vec<Domain> = doms
            .iter()
            .filter_map(|d| d.as_ref().ok().cloned())
            .collect();
        let stats = match ffi::domain_list_stats(&found) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "bulk domain stats unavailable; asking per domain");
                return wanted
                    .iter()
                    .zip(doms)
                    .map(|((_, x), d)| facts_of(&d?, *x).map_err(lookup_error))
                    .collect();
            }
        };
        let flags = if wanted.len() >= LIST_FLAGS_FROM {
            let uuids = |flags| -> Result<HashSet<String>, virt::error::Error> {
                conn.list_all_domains(flags)?
                    .iter()
                    .map(|d| d.uuid_string())
                    .collect()
            };
            uuids(virt_sys::VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
                .and_then(|p| Ok((p, uuids(virt_sys::VIR_CONNECT_LIST_DOMAINS_AUTOSTART)?)))
                .ok()
        } else {
            None
        };
        wanted
            .iter()
            .zip(doms)
            .map(|((uuid, want_xml), d)| {
                let d = d?;
                match stats.get(uuid).filter(|b| b.state >= 0) {
                    Some(b) => facts_from_stats(&d, b, flags.as_ref(), *want_xml),
                    None => facts_of(&d, *want_xml),
                }
                .map_err(lookup_error)
            })
            .collect()
    }
}

/// One domain's facts from its bulk stats, with the calls the stats lack.
fn facts_from_stats(
    d: &Domain,
    b: &ffi::BulkStats,
    flags: Option<&(HashSet<String>, HashSet<String>)>,
    want_xml: bool,
) -> Result<Facts, virt::error::Error> {
    let uuid = d.uuid_string()?;
    let persistent = match flags {
        Some((p, _)) => p.contains(&uuid),
        None => d.is_persistent()?,
    };
    let autostart = match flags {
        Some((_, a)) => Some(persistent && a.contains(&uuid)),
        None if persistent => d.autostart().ok(),
        None => Some(false),
    };
    let xml = if want_xml {
        Some(d.xml_desc(virt_sys::VIR_DOMAIN_XML_INACTIVE)?)
    } else {
        None
    };
    let (mut vcpus, mut memory_kib) = (b.vcpus, b.max_mem_kib);
    if vcpus.is_none() || memory_kib.is_none() {
        // Drivers whose bulk stats report only the state (the test
        // driver): from the XML when it was read, else one more call.
        let (v, m) = xml.as_deref().map(sizes_from_xml).unwrap_or_default();
        vcpus = vcpus.or(v);
        memory_kib = memory_kib.or(m);
    }
    if vcpus.is_none() || memory_kib.is_none() {
        let i = d.info()?;
        vcpus = vcpus.or(Some(i.nr_virt_cpu as i32));
        memory_kib = memory_kib.or(Some(i.max_mem as i64));
    }
    Ok(Facts {
        name: d.name()?,
        id: d.id().and_then(|i| i32::try_from(i).ok()),
        state: StateReason::from_codes(b.state, b.reason),
        persistent,
        autostart,
        vcpus,
        memory_kib,
        config_hash: xml.as_ref().map(|x| config_hash(x)),
        xml,
    })
}

/// The connection state machine.
enum State {
    Connecting { attempt: u32 },
    Connected(Session),
    Backoff { attempt: u32 },
}

struct Session {
    // Field order matters: callbacks are deregistered before the
    // connection reference is dropped.
    registration: ffi::Registration,
    conn: Connect,
    closed: Receiver<i32>,
}

/// The source thread.
pub struct Source {
    pub opts: SourceOptions,
    pub callbacks: ffi::CallbackTarget,
    /// Blocking sender for control items (listings, disconnects).
    pub items: SyncSender<Item>,
    /// Listing requests (merged: a full one absorbs a light one).
    pub resync: Arc<ResyncRequests>,
    pub conn: ConnSlot,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Arc<AtomicBool>,
}

impl Source {
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .opts
            .backoff_min
            .saturating_mul(1u32 << attempt.min(16));
        let capped = base.min(self.opts.backoff_max);
        // Up to 20% jitter so a fleet does not reconnect in lockstep.
        let jitter = (now_micros() as u64 % 1000) as f64 / 5000.0;
        capped.mul_f64(1.0 + jitter)
    }

    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Sleeps up to `d`, waking early on shutdown.
    fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stopping() {
            let now = Instant::now();
            if now >= end {
                return;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }

    fn connect(&self) -> Result<Session, SourceError> {
        let conn = open(&self.opts)?;
        let (close_tx, closed) = std::sync::mpsc::sync_channel(4);
        let registration = ffi::register(&conn, &self.callbacks, close_tx).map_err(|message| {
            SourceError::Register {
                uri: self.opts.uri.clone(),
                message,
            }
        })?;
        Ok(Session {
            registration,
            conn,
            closed,
        })
    }

    /// What this connection's libvirt is and can report.
    fn host_info(&self, session: &Session) -> HostInfo {
        let version = session
            .conn
            .lib_version()
            .map(|v| format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000))
            .unwrap_or_default();
        HostInfo {
            libvirt_uri: self.opts.uri.clone(),
            libvirt_driver: session.conn.driver_type().unwrap_or_default(),
            libvirt_version: version,
            accepted_event_ids: session
                .registration
                .accepted
                .iter()
                .map(|id| crate::model::event_id::name(*id))
                .collect(),
        }
    }

    /// A list + watch step: the barrier goes on the queue first, behind
    /// every event delivered so far, then the listing is taken; events
    /// delivered meanwhile queue between the two, and the tracker does
    /// not let the (possibly older) listing undo them.
    fn send_listing(&self, session: &Session, full: bool) -> Result<(), SourceError> {
        // Blocking sends: this is not the libvirt event loop.
        let _ = self.items.send(Item::ListingBegin {
            dropped: self.metrics.events_dropped.get(),
        });
        let observed_at = now_micros();
        let started = Instant::now();
        let listing =
            list(&session.conn, self.opts.keep_xml, full).map_err(|e| SourceError::List {
                uri: self.opts.uri.clone(),
                message: e.message().to_string(),
            })?;
        tracing::debug!(domains = listing.len(), full, took = ?started.elapsed(), "listed domains");
        let _ = self.items.send(Item::Resync {
            listing,
            observed_at,
            info: self.host_info(session),
        });
        Ok(())
    }

    fn set_connected(&self, conn: Option<&Connect>) {
        *self.conn.write().expect("connection slot") = conn.cloned();
        let up = conn.is_some();
        self.health.libvirt_connected.store(up, Ordering::Relaxed);
        self.metrics.libvirt_connected.set(up as i64);
    }

    /// Runs until shutdown.
    pub fn run(self) {
        let mut state = State::Connecting { attempt: 0 };
        let mut ever_connected = false;
        while !self.stopping() {
            state = match state {
                State::Connecting { attempt } => match self.connect() {
                    Ok(session) => {
                        self.conn
                            .write()
                            .expect("connection slot")
                            .replace(session.conn.clone());
                        match self.send_listing(&session, true) {
                            Ok(()) => {
                                tracing::info!(uri = %self.opts.uri, accepted_event_ids = ?session.registration.accepted, "connected to libvirt");
                                if ever_connected {
                                    self.metrics.libvirt_reconnects.inc();
                                }
                                ever_connected = true;
                                self.set_connected(Some(&session.conn));
                                State::Connected(session)
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "listing after connect failed");
                                self.set_connected(None);
                                drop(session);
                                // Events since the connect may be lost with
                                // the callbacks: say so before the next
                                // listing (this also ends the barrier).
                                let _ = self.items.send(Item::Disconnected {
                                    observed_at: now_micros(),
                                });
                                State::Backoff {
                                    attempt: attempt + 1,
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "libvirt connect failed");
                        State::Backoff {
                            attempt: attempt + 1,
                        }
                    }
                },
                State::Backoff { attempt } => {
                    self.sleep(self.backoff(attempt.saturating_sub(1)));
                    State::Connecting { attempt }
                }
                State::Connected(session) => self.connected(session),
            };
        }
        self.set_connected(None);
    }

    /// Waits for a close, a resync request or shutdown.
    fn connected(&self, session: Session) -> State {
        loop {
            if self.stopping() {
                return State::Connected(session);
            }
            if let Ok(reason) = session.closed.try_recv() {
                tracing::warn!(reason, "libvirt connection closed");
                return self.lost(session);
            }
            match self.resync.wait(Duration::from_millis(100)) {
                Some(full) => {
                    if let Err(e) = self.send_listing(&session, full) {
                        tracing::warn!(error = %e, "resync listing failed; reconnecting");
                        return self.lost(session);
                    }
                }
                None => {
                    // Without a close callback, notice a dead connection here.
                    if !session.conn.is_alive().unwrap_or(false) {
                        tracing::warn!("libvirt connection is no longer alive");
                        return self.lost(session);
                    }
                }
            }
        }
    }

    fn lost(&self, session: Session) -> State {
        self.set_connected(None);
        drop(session);
        let _ = self.items.send(Item::Disconnected {
            observed_at: now_micros(),
        });
        State::Connecting { attempt: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::sizes_from_xml;

    #[test]
    fn sizes_come_from_the_domains_own_elements() {
        let xml = "<domain type='test'><name>a</name><memory unit='KiB'>8192</memory>\
                   <currentMemory unit='KiB'>4096</currentMemory>\
                   <vcpu placement='static' current='2'>4</vcpu>\
                   <memoryBacking/><cpu><numa><cell id='0' cpus='0-3' memory='8192'/></numa></cpu>\
                   <devices><memory model='dimm'><target><size unit='KiB'>1</size></target></memory>\
                   </devices></domain>";
        assert_eq!(sizes_from_xml(xml), (Some(2), Some(8192)));
        let plain = "<domain><memory unit=\"MiB\">32</memory><vcpus><vcpu id='0'/></vcpus><vcpu>1</vcpu></domain>";
        assert_eq!(sizes_from_xml(plain), (Some(1), Some(32 << 10)));
        assert_eq!(sizes_from_xml("<domain/>"), (None, None));
        assert_eq!(
            sizes_from_xml("<domain><memory unit='b'>1024</memory></domain>"),
            (None, None)
        );
    }
}
