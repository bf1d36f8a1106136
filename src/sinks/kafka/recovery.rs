//! The Kafka sink's recovery before publishing: which partitions the
//! unacknowledged backlog maps to, and the read-back of this host's
//! records there, from the offsets recorded with the cursor.
//!
//! Invariants:
//! - read-back starts at the recorded `next` offset of a partition (or its
//!   start, when none is recorded) and runs until the fetches come back
//!   empty, never trusting the high watermark;
//! - an entry is taken as stored only when a record of this host and
//!   epoch carries its event id; a record of this epoch beyond what this
//!   process sent or found at open means the journal was restored, and is
//!   an error;
//! - `next` only advances over a partition read to its end and found free
//!   of this host's records above the cursor.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Headers, Message};
use tokio::sync::broadcast;

use super::encoding::{EncodingContext, EVENT_ID_HEADER};
use super::offsets::{Offsets, TopicOffsets};
use super::KafkaSinkError;
use crate::bus::kafka::partition_for;
use crate::bus::kafka::reader::{self, Flow, ReadOptions, Start};
use crate::config::KafkaConfig;
use crate::journal::Journal;
use crate::model::parse_event_id;

/// Where an entry was found or acknowledged: (topic index, partition, offset).
pub(super) type Placed = (usize, i32, i64);
/// Per topic: partition → the highest `host_seq` of the backlog there.
type PartitionChecks = [BTreeMap<i32, u64>; 3];

fn journal_err(e: impl std::fmt::Display) -> KafkaSinkError {
    KafkaSinkError::Journal(e.to_string())
}

/// What the read-back needs of the sink.
pub(super) struct Recovery<'a> {
    pub cfg: &'a KafkaConfig,
    pub journal: &'a Journal,
    pub host_id: &'a str,
    pub epoch: &'a str,
    /// See `KafkaSink::sent_upto`.
    pub sent_upto: &'a AtomicU64,
}

impl Recovery<'_> {
    /// Per topic, for every partition the entries after `cursor` map to
    /// (under the current count and, after a change, the prior one), the
    /// highest `host_seq` mapping there; and the newest record time (ms)
    /// of the backlog. Reads the whole backlog: run it on the blocking pool.
    fn partitions_to_check(
        journal: &Journal,
        cursor: u64,
        enc: &EncodingContext,
        priors: [Option<i32>; 3],
    ) -> Result<(PartitionChecks, Option<i64>), KafkaSinkError> {
        let mut out: [BTreeMap<i32, u64>; 3] = Default::default();
        let mut newest: Option<i64> = None;
        let mut after = cursor;
        loop {
            let batch = journal.read_after(after, 4096).map_err(journal_err)?;
            let Some(last) = batch.last() else { break };
            after = last.host_seq;
            for e in &batch {
                let ms = e.observed_at.div_euclid(1000);
                newest = Some(newest.map_or(ms, |n| n.max(ms)));
                let (t, key, p) = enc.route(e);
                out[t].insert(p, e.host_seq);
                if let Some(n) = priors[t] {
                    let q = partition_for(&key, n);
                    if q < enc.topics[t].1 {
                        out[t].insert(q, e.host_seq);
                    }
                }
            }
        }
        Ok((out, newest))
    }

    /// Reads back this host's records above `cursor` in every topic;
    /// returns them by `host_seq` with where they are, and advances `next`
    /// over stretches found free of them.
    pub(super) async fn recover(
        &self,
        base: &rdkafka::config::ClientConfig,
        cursor: u64,
        offsets: &mut Offsets,
        enc: &Arc<EncodingContext>,
        shutdown: &mut broadcast::Receiver<()>,
    ) -> Result<HashMap<u64, Placed>, KafkaSinkError> {
        // Forget topics no longer configured; note partition count changes.
        offsets
            .topics
            .retain(|name, _| enc.topics.iter().any(|(t, _)| t == name));
        let head = *self.journal.committed().borrow();
        let mut priors = [None; 3];
        for (t, (name, partitions)) in enc.topics.iter().enumerate() {
            let o = offsets.topics.entry(name.clone()).or_default();
            if o.partitions > 0 && o.partitions != *partitions {
                // Until the cursor passes what is journaled now, a record
                // may sit where the old count put it.
                o.prior = Some((o.partitions, head));
            }
            o.partitions = *partitions;
            if o.prior.is_some_and(|(_, until)| cursor >= until) {
                o.prior = None;
            }
            priors[t] = o.prior.map(|(n, _)| n);
        }
        let (checks, newest_ms) = {
            let journal = self.journal.clone();
            let enc = enc.clone();
            tokio::task::spawn_blocking(move || {
                Self::partitions_to_check(&journal, cursor, &enc, priors)
            })
            .await
            .map_err(journal_err)??
        };
        let mut found = HashMap::new();
        for (t, check) in checks.into_iter().enumerate() {
            if check.is_empty() {
                continue;
            }
            let name = enc.topics[t].0.clone();
            let o = offsets.topics.get_mut(&name).expect("entry made above");
            let (in_topic, records) = self
                .recover_topic(base, &name, (cursor, newest_ms), o, check, shutdown)
                .await?;
            tracing::info!(topic = %name, records_read = records, already_stored = in_topic.len(), "read-back done");
            found.extend(in_topic.into_iter().map(|(s, (p, off))| (s, (t, p, off))));
        }
        Ok(found)
    }

    /// [`Self::recover`] for one topic.
    async fn recover_topic(
        &self,
        base: &rdkafka::config::ClientConfig,
        topic: &str,
        (cursor, newest_ms): (u64, Option<i64>),
        offsets: &mut TopicOffsets,
        check: BTreeMap<i32, u64>,
        shutdown: &mut broadcast::Receiver<()>,
    ) -> Result<(HashMap<u64, (i32, i64)>, u64), KafkaSinkError> {
        let starts: Vec<(i32, Start)> = check
            .keys()
            .map(|p| {
                (
                    *p,
                    offsets
                        .next
                        .get(p)
                        .map(|o| Start::At(*o))
                        .unwrap_or(Start::Earliest),
                )
            })
            .collect();
        tracing::info!(topic, cursor, partitions = ?check.keys().collect::<Vec<_>>(), "reading back this host's records before publishing");
        let stop = Arc::new(AtomicBool::new(false));
        let job = {
            let base = base.clone();
            let topic = topic.to_string();
            let idle = self.cfg.readback_idle.0;
            let skew = self.cfg.readback_max_clock_skew.0;
            let last_of = check.clone();
            let host = self.host_id.to_string();
            let epoch = self.epoch.to_string();
            let stop = stop.clone();
            // The most records one of our produce batches can hold (this
            // run's setting or librdkafka's default, whichever is larger:
            // the records may come from an earlier run).
            let lookback = self
                .cfg
                .properties
                .get("batch.num.messages")
                .and_then(|v| v.to_string().parse().ok())
                .unwrap_or(0)
                .max(reader::DEFAULT_LOOKBACK);
            // Nothing of this epoch can be stored beyond what this process
            // sent or found journaled at open, unless the journal was
            // restored.
            let head = self.sent_upto.load(Ordering::Acquire);
            tokio::task::spawn_blocking(move || {
                let mut beyond: Option<u64> = None;
                let mut found: HashMap<u64, (i32, i64)> = HashMap::new();
                let mut seen_end: HashMap<i32, i64> = HashMap::new();
                let r = reader::read_to_end(
                    &base,
                    ReadOptions {
                        topic: &topic,
                        starts,
                        idle,
                        max_clock_skew: skew,
                        // This host stamped its backlog by then: a clock
                        // stepped back since cannot make it look late.
                        not_before_ms: newest_ms,
                        stall: (idle * 10).max(Duration::from_secs(30)),
                        stop: Some(&stop),
                        lookback,
                    },
                    |m| {
                        seen_end.insert(m.partition(), m.offset() + 1);
                        let id = m.headers().and_then(|h| {
                            h.iter()
                                .find(|h| h.key == EVENT_ID_HEADER)
                                .and_then(|h| h.value)
                                .and_then(|v| std::str::from_utf8(v).ok())
                                .and_then(|v| {
                                    parse_event_id(v).map(|(h, e, s)| (h == host, e == epoch, s))
                                })
                        });
                        // Our own records, of any epoch, were all appended
                        // before this read: their stamps never end it.
                        let own = if id.is_some_and(|(h, _, _)| h) {
                            Flow::Earlier
                        } else {
                            Flow::Continue
                        };
                        if let Some((true, true, s)) = id {
                            if s > head {
                                beyond = beyond.max(Some(s));
                            }
                            if s > cursor {
                                found.insert(s, (m.partition(), m.offset()));
                                if last_of.get(&m.partition()) == Some(&s) {
                                    // The partition's last unacknowledged
                                    // entry is there, so are the earlier.
                                    return Flow::PartitionDone;
                                }
                            }
                        }
                        own
                    },
                );
                if let Some(s) = beyond {
                    return Err(KafkaSinkError::JournalBehindBus {
                        epoch: epoch.clone(),
                        bus: s,
                        journal: head,
                    });
                }
                r.map(|sum| (found, seen_end, sum.records))
                    .map_err(KafkaSinkError::from)
            })
        };
        tokio::pin!(job);
        let (found, seen_end, records) = tokio::select! {
            r = &mut job => r.map_err(|e| KafkaSinkError::Journal(e.to_string()))??,
            _ = shutdown.recv() => {
                stop.store(true, Ordering::Relaxed);
                let _ = job.await;
                return Err(KafkaSinkError::INTERRUPTED);
            }
        };
        // A partition read to its end with none of this host's records
        // above the cursor needs no re-read before that end next time.
        for p in check.keys() {
            let ours_here = found.values().any(|(fp, _)| fp == p);
            if !ours_here {
                if let Some(end) = seen_end.get(p) {
                    offsets.next.insert(*p, *end);
                }
            }
        }
        Ok((found, records))
    }
}
