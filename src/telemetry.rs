//! Telemetry: Prometheus metrics, component health, and the small HTTP
//! endpoint serving `/metrics`, `/healthz` and `/readyz`.
//!
//! Invariants:
//! - metric names are part of the operator contract (README lists them);
//! - `/readyz` is 200 only when libvirt is connected, the journal is
//!   writable and every sink is connected; its body names each component's
//!   state either way;
//! - the endpoint never blocks the pipeline: it reads atomics and a short
//!   mutex, holds a bounded number of connections, each with a read and a
//!   write deadline, and backs off when `accept` fails (see [`server`]).

pub mod server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use server::{bind, serve, Limits};

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot listen on {addr} (metrics.listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub events_received: Family<Labels, Counter>,
    pub events_dropped: Counter,
    pub gaps: Family<Labels, Counter>,
    pub reconcile_events: Counter,
    pub snapshot_rounds: Counter,
    pub journal_full_drops: Counter,
    pub hook_spool_dropped: Counter,
    pub published: Family<Labels, Counter>,
    pub publish_errors: Family<Labels, Counter>,
    pub publish_latency: Family<Labels, Histogram>,
    pub sink_backlog: Family<Labels, Gauge>,
    pub journal_backlog_entries: Gauge,
    pub journal_backlog_bytes: Gauge,
    pub journal_commits: Gauge,
    pub libvirt_connected: Gauge,
    pub libvirt_reconnects: Counter,
    pub domains_tracked: Gauge,
    pub action_runs: Family<Labels, Counter>,
    pub action_failures: Family<Labels, Counter>,
    pub action_timeouts: Family<Labels, Counter>,
    pub action_dead_lettered: Family<Labels, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
    ])
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("virtstream");
        let events_received = Family::<Labels, Counter>::default();
        registry.register(
            "libvirt_events_received",
            "libvirt events handed to the tracker, by event type",
            events_received.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "libvirt_events_dropped",
            "libvirt events dropped because the hand-off queue was full (each leads to a gap marker and a reconcile)",
            events_dropped.clone(),
        );
        let gaps = Family::<Labels, Counter>::default();
        registry.register("gap_markers", "gap markers emitted, by cause", gaps.clone());
        let reconcile_events = Counter::default();
        registry.register(
            "reconcile_events",
            "RECONCILE events emitted after comparing a libvirt listing with the tracker",
            reconcile_events.clone(),
        );
        let snapshot_rounds = Counter::default();
        registry.register(
            "snapshot_rounds",
            "complete snapshot rounds journaled (at start, after reconnects and gaps, and every snapshot.interval)",
            snapshot_rounds.clone(),
        );
        let journal_full_drops = Counter::default();
        registry.register(
            "journal_full_drops",
            "events not journaled because journal.max_bytes was reached",
            journal_full_drops.clone(),
        );
        let hook_spool_dropped = Counter::default();
        registry.register(
            "hook_spool_dropped",
            "qemu hook calls the hook dropped on a full spool while the agent was down (counted at start)",
            hook_spool_dropped.clone(),
        );
        let published = Family::<Labels, Counter>::default();
        registry.register(
            "sink_published",
            "messages acknowledged by the broker, by sink",
            published.clone(),
        );
        let publish_errors = Family::<Labels, Counter>::default();
        registry.register(
            "sink_publish_errors",
            "failed publish attempts (retried), by sink",
            publish_errors.clone(),
        );
        let publish_latency = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "publish_latency_seconds",
            "time from libvirt callback (hand-off) to broker acknowledgement, by sink",
            publish_latency.clone(),
        );
        let sink_backlog = Family::<Labels, Gauge>::default();
        registry.register(
            "sink_backlog",
            "journal entries not yet acknowledged, by sink",
            sink_backlog.clone(),
        );
        let journal_backlog_entries = Gauge::default();
        registry.register(
            "journal_backlog_entries",
            "entries retained in the journal (not yet acknowledged by every sink)",
            journal_backlog_entries.clone(),
        );
        let journal_backlog_bytes = Gauge::default();
        registry.register(
            "journal_backlog_bytes",
            "bytes of retained journal entries",
            journal_backlog_bytes.clone(),
        );
        let journal_commits = Gauge::default();
        registry.register(
            "journal_commits",
            "group commits since start",
            journal_commits.clone(),
        );
        let libvirt_connected = Gauge::default();
        registry.register(
            "libvirt_connected",
            "1 while connected to libvirt",
            libvirt_connected.clone(),
        );
        let libvirt_reconnects = Counter::default();
        registry.register(
            "libvirt_reconnects",
            "libvirt connections lost and re-established",
            libvirt_reconnects.clone(),
        );
        let domains_tracked = Gauge::default();
        registry.register(
            "domains_tracked",
            "domains the tracker knows on this host",
            domains_tracked.clone(),
        );
        let action_runs = Family::<Labels, Counter>::default();
        registry.register(
            "action_runs",
            "action command attempts started, by action",
            action_runs.clone(),
        );
        let action_failures = Family::<Labels, Counter>::default();
        registry.register(
            "action_failures",
            "action command attempts that failed (non-zero exit, signal, spawn error or timeout), by action",
            action_failures.clone(),
        );
        let action_timeouts = Family::<Labels, Counter>::default();
        registry.register(
            "action_timeouts",
            "action command attempts killed at their timeout, by action",
            action_timeouts.clone(),
        );
        let action_dead_lettered = Family::<Labels, Counter>::default();
        registry.register(
            "action_dead_lettered",
            "events an action gave up on after its retries (written to actions-dead-letter.jsonl), by action",
            action_dead_lettered.clone(),
        );
        Metrics {
            registry,
            events_received,
            events_dropped,
            gaps,
            reconcile_events,
            snapshot_rounds,
            journal_full_drops,
            hook_spool_dropped,
            published,
            publish_errors,
            publish_latency,
            sink_backlog,
            journal_backlog_entries,
            journal_backlog_bytes,
            journal_commits,
            libvirt_connected,
            libvirt_reconnects,
            domains_tracked,
            action_runs,
            action_failures,
            action_timeouts,
            action_dead_lettered,
        }
    }

    pub fn count_received(&self, event: &str) {
        self.events_received
            .get_or_create(&vec![("event", event.to_string())])
            .inc();
    }

    pub fn count_gap(&self, cause: &str) {
        self.gaps
            .get_or_create(&vec![("cause", cause.to_string())])
            .inc();
    }

    pub fn sink(sink: &str) -> Labels {
        vec![("sink", sink.to_string())]
    }

    pub fn action(action: &str) -> Labels {
        vec![("action", action.to_string())]
    }

    /// Creates an action's series at zero.
    pub fn register_action(&self, action: &str) {
        let labels = Self::action(action);
        let _ = self.action_runs.get_or_create(&labels);
        let _ = self.action_failures.get_or_create(&labels);
        let _ = self.action_timeouts.get_or_create(&labels);
        let _ = self.action_dead_lettered.get_or_create(&labels);
    }

    /// Creates an enabled sink's series at zero, so they exist from the
    /// start (a broker unreachable from start-up still shows
    /// `sink_published_total{sink} 0`, and rate() and absent() alerts work).
    pub fn register_sink(&self, sink: &str) {
        let labels = Self::sink(sink);
        let _ = self.published.get_or_create(&labels);
        let _ = self.publish_errors.get_or_create(&labels);
        let _ = self.publish_latency.get_or_create(&labels);
        let _ = self.sink_backlog.get_or_create(&labels);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// State of one sink as shown by `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkState {
    Connecting,
    Ready,
    Failing(String),
}

/// Component health shared by the pipeline and the HTTP endpoint.
#[derive(Default)]
pub struct Health {
    pub libvirt_connected: AtomicBool,
    pub journal_writable: AtomicBool,
    sinks: Mutex<BTreeMap<String, SinkState>>,
}

impl Health {
    pub fn set_sink(&self, name: &str, state: SinkState) {
        self.sinks
            .lock()
            .expect("health mutex")
            .insert(name.to_string(), state);
    }

    /// (ready, human-readable report).
    pub fn readiness(&self) -> (bool, String) {
        let lv = self.libvirt_connected.load(Ordering::Relaxed);
        let jw = self.journal_writable.load(Ordering::Relaxed);
        let mut ready = lv && jw;
        let mut body = format!(
            "libvirt: {}\njournal: {}\n",
            if lv { "connected" } else { "disconnected" },
            if jw { "writable" } else { "NOT writable" }
        );
        for (name, state) in self.sinks.lock().expect("health mutex").iter() {
            let s = match state {
                SinkState::Ready => "ready".to_string(),
                SinkState::Connecting => {
                    ready = false;
                    "connecting".to_string()
                }
                SinkState::Failing(why) => {
                    ready = false;
                    format!("failing: {why}")
                }
            };
            body.push_str(&format!("sink {name}: {s}\n"));
        }
        body.insert_str(0, if ready { "ready\n" } else { "not ready\n" });
        (ready, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_enabled_sinks_series_exist_before_its_first_publish() {
        let m = Metrics::new();
        m.register_sink("nats");
        let text = m.render();
        for series in [
            "virtstream_sink_published_total{sink=\"nats\"} 0",
            "virtstream_sink_publish_errors_total{sink=\"nats\"} 0",
            "virtstream_publish_latency_seconds_count{sink=\"nats\"} 0",
            "virtstream_sink_backlog{sink=\"nats\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn readiness_needs_every_component() {
        let h = Health::default();
        assert!(!h.readiness().0);
        h.libvirt_connected.store(true, Ordering::Relaxed);
        h.journal_writable.store(true, Ordering::Relaxed);
        assert!(h.readiness().0);
        h.set_sink("nats", SinkState::Connecting);
        let (ready, body) = h.readiness();
        assert!(!ready);
        assert!(body.contains("sink nats: connecting"), "{body}");
        h.set_sink("nats", SinkState::Ready);
        assert!(h.readiness().0);
    }

    #[test]
    fn metrics_render_with_names() {
        let m = Metrics::new();
        m.count_received("STARTED");
        m.publish_latency
            .get_or_create(&Metrics::sink("nats"))
            .observe(0.003);
        let text = m.render();
        assert!(
            text.contains("virtstream_libvirt_events_received_total{event=\"STARTED\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("virtstream_publish_latency_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("virtstream_libvirt_connected"), "{text}");
    }
}
