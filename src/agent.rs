//! The agent: wires source → tracker → journal → sinks and the telemetry
//! endpoint, and shuts them down in order.
//!
//! Shutdown order (SIGTERM/SIGINT): stop the libvirt source and the qemu
//! hook listener (no new intake), let the tracker drain its queue into the journal, then give the
//! sinks `host.shutdown_timeout` to publish what the brokers accept; what
//! is left stays in the journal for the next start.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::config::Config;
use crate::journal::{Journal, JournalError, OpenOptions};
use crate::sinks::actions::ActionError;
use crate::sinks::kafka::KafkaSinkError;
use crate::sinks::launch::{SinkContext, SinkError, SinkKind};
use crate::sinks::nats::NatsError;
use crate::source::enrich::{EnrichOptions, EnrichTask, Enricher};
use crate::source::hooks::{self, listen::HookListener};
use crate::source::{self, ffi, LibvirtInspector, Source, SourceOptions};
use crate::telemetry::{self, Health, Metrics, TelemetryError};
use crate::tracker::{
    decode_records, GapCause, SnapshotOptions, Tracker, TrackerOptions, TrackerTask,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Kafka(#[from] KafkaSinkError),
    #[error(transparent)]
    Action(#[from] ActionError),
    #[error(transparent)]
    Hook(#[from] crate::source::hooks::HookError),
    #[error("{0}")]
    Thread(String),
}

impl From<SinkError> for AgentError {
    fn from(e: SinkError) -> Self {
        match e {
            SinkError::Nats(e) => AgentError::Nats(e),
            SinkError::Kafka(e) => AgentError::Kafka(e),
            SinkError::Action(e) => AgentError::Action(e),
        }
    }
}

/// The hostname, the last fallback for `host.id`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn source_options(cfg: &Config) -> SourceOptions {
    SourceOptions {
        uri: cfg.libvirt.uri.clone(),
        read_only: cfg.libvirt.read_only,
        keepalive_interval: cfg.libvirt.keepalive_interval,
        keepalive_count: cfg.libvirt.keepalive_count,
        backoff_min: cfg.libvirt.reconnect_backoff_min.0,
        backoff_max: cfg.libvirt.reconnect_backoff_max.0,
        keep_xml: cfg.libvirt.xml != crate::config::XmlMode::Off,
    }
}

/// Runs the agent until SIGTERM/SIGINT, or until a sink fails in a way
/// retrying cannot fix.
pub async fn run(cfg: Config) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let listener = telemetry::bind(cfg.metrics.listen).await?;

    let sink_kinds = SinkKind::configured(&cfg);
    let sinks: Vec<String> = sink_kinds.iter().map(|k| k.name().to_string()).collect();
    // Each sink is "connecting" (not ready) until it reports otherwise.
    let sink_names = sinks.clone();
    for name in &sinks {
        health.set_sink(name, crate::telemetry::SinkState::Connecting);
    }
    let src_opts = source_options(&cfg);
    let default_host = {
        let opts = src_opts.clone();
        move || -> String {
            // Only consulted when the journal is new and host.id is unset.
            match source::open(&opts) {
                Ok(c) => source::host_uuid(&c).unwrap_or_else(hostname),
                Err(_) => hostname(),
            }
        }
    };
    let (journal, mut writer, mut recovered) = Journal::open(OpenOptions {
        dir: &cfg.journal.path,
        host_id: cfg.host.id.as_deref(),
        default_host_id: &default_host,
        sinks,
        group_commit_max: cfg.journal.group_commit_max,
        queue: cfg.journal.group_commit_max * 2,
        when_full: cfg.journal.when_full,
    })?;
    tracing::info!(
        host_id = %recovered.host_id,
        epoch = %recovered.epoch,
        host_seq = recovered.host_seq,
        backlog = recovered.backlog_entries,
        fresh = recovered.fresh,
        "journal open"
    );
    // A journal restored from a backup or a VM snapshot reuses host_seq
    // values the bus already holds: detect it before anything is
    // journaled and start a new epoch (its first entry is a gap marker).
    let mut first_gap = (!recovered.fresh).then_some(GapCause::AgentRestart);
    if let Some(ahead) = crate::epoch::check_against_buses(&cfg, &journal, &recovered).await {
        let journal_host_seq = recovered.host_seq;
        let old_epoch = writer.rotate_epoch(&mut recovered)?;
        tracing::error!(
            bus = ahead.bus,
            bus_host_seq = ahead.host_seq,
            journal_host_seq,
            old_epoch = %old_epoch,
            new_epoch = %recovered.epoch,
            "the bus holds this epoch's host_seq {} but the journal ends at {}: the journal was restored from a backup or a VM snapshot; starting a new epoch (its unpublished backlog is dropped: the bus already holds it)",
            ahead.host_seq,
            journal_host_seq,
        );
        first_gap = Some(GapCause::JournalRestored);
    }
    health.journal_writable.store(true, Ordering::Relaxed);
    let writer_thread = std::thread::Builder::new()
        .name("journal-writer".into())
        .spawn(move || writer.run())
        .map_err(|e| AgentError::Thread(e.to_string()))?;

    let (shutdown_tx, _) = broadcast::channel::<()>(4);
    let stop = Arc::new(AtomicBool::new(false));

    // Callbacks and source → enricher → tracker.
    let (items_tx, items_rx) = std::sync::mpsc::sync_channel(cfg.libvirt.queue_capacity);
    let (enriched_tx, enriched_rx) = std::sync::mpsc::sync_channel(cfg.libvirt.queue_capacity);
    let resync = Arc::new(crate::source::ResyncRequests::default());
    let overflow = Arc::new(AtomicBool::new(false));
    let conn_slot = Arc::new(RwLock::new(None));
    let seeding = crate::epoch::spawn_stale_seeding(
        &cfg,
        &recovered.host_id,
        &recovered.epoch,
        items_tx.clone(),
        &shutdown_tx,
    );
    // The qemu hook listener: queues each call before acknowledging it,
    // so it precedes the events libvirt emits after the hook returns.
    let hook_thread = match &cfg.hooks {
        Some(h) => {
            let listener = HookListener::bind(&h.socket, &h.spool)?;
            let spooled = listener.take_spool()?;
            if spooled.dropped > 0 {
                tracing::error!(
                    dropped = spooled.dropped,
                    spool = %h.spool.display(),
                    "qemu hook calls were dropped on a full spool while the agent was down"
                );
            }
            metrics.hook_spool_dropped.inc_by(spooled.dropped);
            let (items, stop) = (items_tx.clone(), stop.clone());
            let socket = h.socket.clone();
            let thread = std::thread::Builder::new()
                .name("hook-listener".into())
                .spawn(move || listener.run(items, spooled.calls, stop))
                .map_err(|e| AgentError::Thread(e.to_string()))?;
            Some((thread, socket))
        }
        None => None,
    };
    let src = Source {
        opts: src_opts,
        callbacks: ffi::CallbackTarget {
            items: items_tx.clone(),
            overflow: overflow.clone(),
            dropped: metrics.events_dropped.clone(),
        },
        items: items_tx,
        resync: resync.clone(),
        conn: conn_slot.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        shutdown: stop.clone(),
    };
    let source_thread = std::thread::Builder::new()
        .name("libvirt-source".into())
        .spawn(move || src.run())
        .map_err(|e| AgentError::Thread(e.to_string()))?;

    let records = decode_records(&recovered.domains);
    let mut enricher = Enricher::new(
        LibvirtInspector { conn: conn_slot },
        EnrichOptions {
            xml: cfg.libvirt.xml,
            lookup_attempts: cfg.libvirt.lookup_attempts,
        },
    );
    for (uuid, r) in &records {
        enricher.seed(
            uuid,
            r.persistent,
            r.state().state == crate::model::DomainState::SHUTOFF,
        );
    }
    let enrich = EnrichTask {
        enricher,
        input: items_rx,
        output: enriched_tx,
        stop: stop.clone(),
    };
    let enrich_thread = std::thread::Builder::new()
        .name("enricher".into())
        .spawn(move || enrich.run())
        .map_err(|e| AgentError::Thread(e.to_string()))?;

    let tracker = Tracker::new(
        recovered.host_id.clone(),
        recovered.epoch.clone(),
        recovered.host_seq,
        records,
        TrackerOptions {
            xml: cfg.libvirt.xml,
            max_journal_bytes: cfg.journal.max_bytes,
        },
    );
    let task = TrackerTask {
        tracker,
        items: enriched_rx,
        overflow,
        resync,
        journal: journal.clone(),
        metrics: metrics.clone(),
        restarted: first_gap,
        stop: stop.clone(),
        snapshot: SnapshotOptions {
            interval: cfg.snapshot.interval.0,
            heartbeat: cfg.snapshot.heartbeat.0,
        },
    };
    let tracker_thread = std::thread::Builder::new()
        .name("tracker".into())
        .spawn(move || task.run())
        .map_err(|e| AgentError::Thread(e.to_string()))?;

    let mut sink_tasks = Vec::new();
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<AgentError>(4);
    let sink_ctx = SinkContext {
        host_id: recovered.host_id.clone(),
        epoch: recovered.epoch.clone(),
        host_seq: recovered.host_seq,
        journal: journal.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
    };
    for kind in sink_kinds {
        metrics.register_sink(kind.name());
        let Some(sink) = kind.build(&cfg, &sink_ctx).await? else {
            continue;
        };
        let rx = shutdown_tx.subscribe();
        let deadline = cfg.host.shutdown_timeout.0;
        let fatal_tx = fatal_tx.clone();
        sink_tasks.push(tokio::spawn(async move {
            if let Err(e) = sink.run(rx, deadline).await {
                let _ = fatal_tx.send(e.into()).await;
            }
        }));
    }
    drop(sink_ctx);

    // Telemetry. `refresh` reads the journal's cursors (redb): the ticker
    // and the endpoint call it on the blocking pool, one at a time, so a
    // scrape never shows values read before its own refresh.
    let refresh = {
        let journal = journal.clone();
        let metrics = metrics.clone();
        let health = health.clone();
        let sinks = sink_names.clone();
        let one_at_a_time = std::sync::Mutex::new(());
        Arc::new(move || {
            let _one = one_at_a_time
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Per-sink backlog from the recorded cursors: known even while
            // a sink cannot reach its broker.
            let head = *journal.committed().borrow();
            for name in &sinks {
                if let Ok(c) = journal.cursor(name) {
                    metrics
                        .sink_backlog
                        .get_or_create(&Metrics::sink(name))
                        .set(head.saturating_sub(c) as i64);
                }
            }
            metrics
                .journal_backlog_entries
                .set(journal.backlog_entries() as i64);
            metrics
                .journal_backlog_bytes
                .set(journal.backlog_bytes() as i64);
            metrics.journal_commits.set(journal.commits() as i64);
            health
                .journal_writable
                .store(journal.writable(), Ordering::Relaxed);
        }) as Arc<dyn Fn() + Send + Sync>
    };
    let server = tokio::spawn(telemetry::serve(
        listener,
        metrics.clone(),
        health.clone(),
        refresh.clone(),
        shutdown_tx.subscribe(),
    ));
    let ticker = {
        let refresh = refresh.clone();
        let mut rx = shutdown_tx.subscribe();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = rx.recv() => return,
                    _ = t.tick() => {
                        let refresh = refresh.clone();
                        let _ = tokio::task::spawn_blocking(move || refresh()).await;
                    }
                }
            }
        })
    };

    // Wait for a signal or a fatal sink error.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| AgentError::Thread(format!("SIGTERM handler: {e}")))?;
    let mut fatal: Option<AgentError> = None;
    drop(fatal_tx);
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        Some(e) = fatal_rx.recv() => {
            tracing::error!(error = %e, "sink failed; shutting down");
            fatal = Some(e);
        }
    }

    // 1. Stop intake; 2. tracker drains into the journal.
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || {
        if let Some((thread, socket)) = hook_thread {
            hooks::listen::wake(&socket);
            let _ = thread.join();
        }
        let _ = source_thread.join();
        let _ = enrich_thread.join();
        let _ = tracker_thread.join();
    })
    .await;
    // 3. Sinks flush within the deadline.
    let _ = shutdown_tx.send(());
    for t in sink_tasks {
        let _ = t.await;
    }
    let _ = server.await;
    let _ = ticker.await;
    for t in seeding {
        let _ = t.await;
    }
    drop(journal);
    drop(refresh);
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    tracing::info!("stopped");
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
