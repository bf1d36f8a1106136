//! The libvirt source: an explicit connection state machine
//! (Connecting → Connected → Backoff → Connecting …) that owns the libvirt
//! connection, registers the event callbacks, lists domains after every
//! (re)connect and on request, and reports disconnects as items on the
//! tracker's queue. The source owns the hand-off to the tracker: the
//! queue's items and the listing requests (`handoff`), the enricher
//! stage and its `Inspector` (`enrich`), the reads behind them (`inspect`),
//! the qemu hook forwarding (`hooks`: the `virtstream hook` command and
//! the agent's listener), the FFI (`ffi`, the only module allowed
//! `unsafe`) and the safe allocator helpers over its glibc calls
//! (`heap`). Nothing here imports the tracker.
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
pub mod heap;
pub mod hooks;
mod inspect;

pub use handoff::{Facts, HookPhase, Item, RawEvent, ResyncRequests};
pub use inspect::{facts_of, list, sizes_from_xml, ConnSlot, LibvirtInspector};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virt::connect::Connect;

use crate::clock::now_micros;
use crate::model::HostInfo;
use crate::telemetry::{Health, Metrics};

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
