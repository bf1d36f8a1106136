//! What the Kafka topics hold of this host, read at start (before
//! publishing): the highest `host_seq` stored for the journal's epoch (a
//! journal behind it was restored from a backup or a VM snapshot), and
//! the domains whose latest snapshot record belongs to an earlier epoch.
//!
//! Reads go through `reader::read_to_end` (never trusting the high
//! watermark). The `host_seq` read starts at the per-partition offsets the
//! journal recorded with the sink's cursor (records of this epoch beyond
//! the journal's head can only be past them) and at the start of a
//! partition it has none for; the three topics are read in parallel.
//! Blocking: call from the blocking pool. A missing topic holds nothing.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Headers, Message};

use super::encoding::EVENT_ID_HEADER;
use super::service::Offsets;
use super::KafkaSinkError;
use crate::bus::kafka::reader::{self, Flow, ReadOptions, Start};
use crate::bus::kafka::{
    admin_client, client_config, partition_counts, partition_for, REQUEST_TIMEOUT,
};
use crate::bus::wire::TOMBSTONE_HEADER;
use crate::config::KafkaConfig;
use crate::model::parse_event_id;

/// (host, epoch, host_seq) of a record, from its `ce_id` header.
fn origin(m: &BorrowedMessage<'_>) -> Option<(String, String, u64)> {
    let h = m.headers()?;
    let v = h
        .iter()
        .find(|h| h.key == EVENT_ID_HEADER)
        .and_then(|h| h.value)?;
    let id = std::str::from_utf8(v).ok()?;
    parse_event_id(id).map(|(h, e, s)| (h.to_string(), e.to_string(), s))
}

fn tombstone(m: &BorrowedMessage<'_>) -> bool {
    m.payload().is_none()
        || m.headers().is_some_and(|h| {
            h.iter()
                .any(|h| h.key == TOMBSTONE_HEADER && h.value == Some(b"true".as_slice()))
        })
}

/// Partition counts of the topics that exist.
fn partitions(cfg: &KafkaConfig, client_id: &str) -> Result<HashMap<String, i32>, KafkaSinkError> {
    let admin = admin_client(cfg, client_id)?;
    let md = admin
        .inner()
        .fetch_metadata(None, REQUEST_TIMEOUT)
        .map_err(|e| {
            KafkaSinkError::broker(
                cfg.brokers.0.join(","),
                format!("metadata request failed: {e}"),
            )
        })?;
    Ok(partition_counts(&md))
}

fn read_options<'a>(
    cfg: &KafkaConfig,
    topic: &'a str,
    starts: Vec<(i32, Start)>,
    stop: &'a AtomicBool,
) -> ReadOptions<'a> {
    let idle = cfg.readback_idle.0;
    ReadOptions {
        topic,
        starts,
        idle,
        max_clock_skew: cfg.readback_max_clock_skew.0,
        stall: (idle * 5).max(Duration::from_secs(10)),
        stop: Some(stop),
        lookback: reader::DEFAULT_LOOKBACK,
        not_before_ms: None,
    }
}

/// The highest `host_seq` of (`host_id`, `epoch`) in the three topics,
/// read from the offsets in `state` (the Kafka sink's journaled state);
/// `None` when there is none. `stop` ends the read early (an error).
pub fn highest_host_seq(
    cfg: &KafkaConfig,
    client_id: &str,
    host_id: &str,
    epoch: &str,
    state: Option<&[u8]>,
    stop: &AtomicBool,
) -> Result<Option<u64>, KafkaSinkError> {
    let offsets: Offsets = state
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default();
    let counts = partitions(cfg, client_id)?;
    let base = client_config(cfg, client_id)?;
    let mut reads: Vec<(&str, Vec<(i32, Start)>)> = Vec::new();
    for (i, (topic, _)) in crate::bus::kafka::topics(cfg).into_iter().enumerate() {
        let Some(&n) = counts.get(topic) else {
            continue;
        };
        let parts: Vec<i32> = if i == 2 {
            // Round markers and heartbeats: keyed by host id.
            vec![partition_for(host_id, n)]
        } else {
            (0..n).collect()
        };
        let next = offsets.topics.get(topic).filter(|o| o.partitions == n);
        let starts = parts
            .into_iter()
            .map(|p| {
                let s = next
                    .and_then(|o| o.next.get(&p))
                    .map_or(Start::Earliest, |o| Start::At(*o));
                (p, s)
            })
            .collect();
        reads.push((topic, starts));
    }
    std::thread::scope(|scope| {
        let jobs: Vec<_> = reads
            .into_iter()
            .map(|(topic, starts)| {
                let base = &base;
                scope.spawn(move || {
                    let mut best: Option<u64> = None;
                    reader::read_to_end(base, read_options(cfg, topic, starts, stop), |m| {
                        match origin(m) {
                            // This host's records (any epoch) were appended
                            // before this read: their stamps never end it.
                            Some((h, e, s)) if h == host_id => {
                                if e == epoch {
                                    best = best.max(Some(s));
                                }
                                Flow::Earlier
                            }
                            _ => Flow::Continue,
                        }
                    })
                    .map(|_| best)
                })
            })
            .collect();
        let mut best = None;
        for j in jobs {
            let r = j.join().map_err(|_| KafkaSinkError::INTERRUPTED)?;
            best = best.max(r?);
        }
        Ok(best)
    })
}

/// Domain UUIDs whose latest record on the domain snapshots topic (key
/// `<host_id>/<uuid>`) is from an epoch other than `epoch` and not a
/// tombstone. Reads the whole topic (it is compacted).
pub fn stale_snapshots(
    cfg: &KafkaConfig,
    client_id: &str,
    host_id: &str,
    epoch: &str,
    stop: &AtomicBool,
) -> Result<Vec<String>, KafkaSinkError> {
    let topic = cfg.domain_snapshots_topic.as_str();
    let Some(&n) = partitions(cfg, client_id)?.get(topic) else {
        return Ok(Vec::new());
    };
    let base = client_config(cfg, client_id)?;
    let prefix = format!("{host_id}/");
    // Latest per key: (another epoch's, not a tombstone).
    let mut latest: HashMap<String, bool> = HashMap::new();
    let starts = (0..n).map(|p| (p, Start::Earliest)).collect();
    reader::read_to_end(&base, read_options(cfg, topic, starts, stop), |m| {
        let Some(uuid) = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| k.strip_prefix(&prefix))
        else {
            return Flow::Continue;
        };
        let other = origin(m).is_some_and(|(h, e, _)| h == host_id && e != epoch);
        latest.insert(uuid.to_string(), other && !tombstone(m));
        Flow::Continue
    })?;
    let mut out: Vec<String> = latest
        .into_iter()
        .filter(|(_, stale)| *stale)
        .map(|(u, _)| u)
        .collect();
    out.sort();
    Ok(out)
}
