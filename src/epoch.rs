//! The journal's epoch against what the buses hold.
//!
//! - At start, before anything is journaled: nothing of (this host, this
//!   epoch) can be on a bus beyond the journal's head, because nothing is
//!   published before it is durable. If a bus holds more, the journal was
//!   restored from a backup or a VM snapshot, and its `host_seq` values are
//!   taken: the agent starts a new epoch (`check_against_buses`). Each bus
//!   is asked for a bounded time; one that does not answer is logged and
//!   skipped (the sinks then detect the condition when they first read the
//!   bus, and stop the agent: see docs/journal.md).
//! - In the background, at every start: the domains whose latest snapshot
//!   record is an earlier epoch's and not a tombstone are handed to the
//!   tracker, whose next complete round tombstones those it does not
//!   contain (`spawn_stale_seeding`). Retries until each bus answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::config::Config;
use crate::journal::{Journal, Recovered};
use crate::sinks::kafka::{self, probe as kafka_probe};
use crate::sinks::nats::probe as nats_probe;
use crate::source::Item;

/// How long a bus may take to tell its highest `host_seq` at start.
const NATS_PROBE: Duration = Duration::from_secs(5);
/// Kafka reads end after `kafka.readback_idle` of quiet: allow a few.
const KAFKA_PROBE_MIN: Duration = Duration::from_secs(15);

/// What the buses hold beyond the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusAhead {
    /// The bus that holds the highest `host_seq`.
    pub bus: &'static str,
    pub host_seq: u64,
}

/// The highest `host_seq` of the journal's epoch on any configured bus,
/// when it is beyond the journal's head. Buses that cannot be read within
/// their bound are logged and skipped.
pub async fn check_against_buses(
    cfg: &Config,
    journal: &Journal,
    rec: &Recovered,
) -> Option<BusAhead> {
    let nats = async {
        let n = cfg.nats.as_ref()?;
        let read = nats_probe::highest_host_seq(n, &rec.host_id, &rec.epoch);
        match tokio::time::timeout(NATS_PROBE, read).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not check the journal against NATS at start");
                None
            }
            Err(_) => {
                tracing::warn!(timeout = ?NATS_PROBE, "could not check the journal against NATS at start: no answer in time");
                None
            }
        }
    };
    let kafka = async {
        let k = cfg.kafka.clone()?;
        let state = match journal.sink_state(kafka::service::SINK_NAME) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the Kafka sink state; not checking the journal against Kafka");
                return None;
            }
        };
        let bound = (k.readback_idle.0 * 5).max(KAFKA_PROBE_MIN);
        let stop = Arc::new(AtomicBool::new(false));
        let (host, epoch) = (rec.host_id.clone(), rec.epoch.clone());
        let client_id = format!("virtstream-{host}-probe");
        let s = stop.clone();
        let job = tokio::task::spawn_blocking(move || {
            kafka_probe::highest_host_seq(&k, &client_id, &host, &epoch, state.as_deref(), &s)
        });
        match tokio::time::timeout(bound, job).await {
            Ok(Ok(Ok(v))) => v,
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "could not check the journal against Kafka at start");
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not check the journal against Kafka at start");
                None
            }
            Err(_) => {
                // The read stops at its next poll.
                stop.store(true, Ordering::Relaxed);
                tracing::warn!(timeout = ?bound, "could not check the journal against Kafka at start: no answer in time");
                None
            }
        }
    };
    let (n, k) = tokio::join!(nats, kafka);
    let best = match (n, k) {
        (Some(a), Some(b)) if b > a => Some(BusAhead {
            bus: "kafka",
            host_seq: b,
        }),
        (Some(a), _) => Some(BusAhead {
            bus: "nats",
            host_seq: a,
        }),
        (None, Some(b)) => Some(BusAhead {
            bus: "kafka",
            host_seq: b,
        }),
        (None, None) => None,
    };
    best.filter(|b| b.host_seq > rec.host_seq)
}

/// Starts one background task per configured bus that reads the domains
/// an earlier epoch left as latest snapshot records and hands them to the
/// tracker (`Item::StaleSnapshots`), retrying until the bus answers.
pub fn spawn_stale_seeding(
    cfg: &Config,
    host_id: &str,
    epoch: &str,
    items: SyncSender<Item>,
    shutdown: &broadcast::Sender<()>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(n) = cfg.nats.clone() {
        let (host, epoch, items) = (host_id.to_string(), epoch.to_string(), items.clone());
        let mut rx = shutdown.subscribe();
        tasks.push(tokio::spawn(async move {
            let read = || async {
                match tokio::time::timeout(
                    NATS_PROBE * 2,
                    nats_probe::stale_snapshots(&n, &host, &epoch),
                )
                .await
                {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("no answer in time".to_string()),
                }
            };
            retry("nats", read, items, &mut rx).await;
        }));
    }
    if let Some(k) = cfg.kafka.clone() {
        let (host, epoch) = (host_id.to_string(), epoch.to_string());
        let mut rx = shutdown.subscribe();
        let stop = Arc::new(AtomicBool::new(false));
        tasks.push(tokio::spawn(async move {
            let read = || {
                let (k, host, epoch, stop) = (k.clone(), host.clone(), epoch.clone(), stop.clone());
                async move {
                    let client_id = format!("virtstream-{host}-probe");
                    tokio::task::spawn_blocking(move || {
                        kafka_probe::stale_snapshots(&k, &client_id, &host, &epoch, &stop)
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
                }
            };
            let stopper = stop.clone();
            retry("kafka", read, items, &mut rx).await;
            // A read still under way (shutdown) ends at its next poll.
            stopper.store(true, Ordering::Relaxed);
        }));
    }
    tasks
}

/// Runs `read` until it answers (backoff up to 30 s) or shutdown, then
/// hands a non-empty answer to the tracker.
async fn retry<F, Fut>(
    bus: &'static str,
    read: F,
    items: SyncSender<Item>,
    shutdown: &mut broadcast::Receiver<()>,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<String>, String>>,
{
    let mut delay = Duration::from_secs(1);
    loop {
        let r = tokio::select! {
            _ = shutdown.recv() => return,
            r = read() => r,
        };
        match r {
            Ok(uuids) => {
                if uuids.is_empty() {
                    tracing::debug!(bus, "no snapshots of earlier epochs to delete");
                    return;
                }
                tracing::info!(bus, domains = uuids.len(), "latest snapshot records from earlier epochs found; the next complete round deletes those of domains no longer on this host");
                // The hand-off queue is bounded: wait for room off the
                // async threads.
                let _ = tokio::task::spawn_blocking(move || {
                    items.send(Item::StaleSnapshots(uuids)).is_ok()
                })
                .await;
                return;
            }
            Err(e) => {
                tracing::warn!(bus, error = %e, retry_in = ?delay, "cannot read earlier epochs' snapshot records yet");
                tokio::select! {
                    _ = shutdown.recv() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}
