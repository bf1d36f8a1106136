//! Reads partitions of a topic from given offsets to their end, without
//! trusting the broker's high watermark.
//!
//! Some Kafka-protocol brokers report the high watermark wrong (under it,
//! even 0 for a partition holding thousands of records), so neither
//! `enable.partition.eof` nor ListOffsets can say where a partition ends.
//! The end is reached when, for every assigned partition, no record has
//! arrived for `idle` and at least two Fetch requests were sent after the
//! last record with no client error in between: librdkafka sends the next
//! Fetch to a broker only after the previous one was answered, so at least
//! one complete Fetch answered with nothing new.
//!
//! A start offset inside a record batch is honoured even by brokers whose
//! Fetch skips a batch that begins before the requested offset (tansu
//! 0.6 returns only batches whose base offset is at or past it): fetching
//! starts `lookback` records earlier and records before the requested
//! offset are dropped here.
//!
//! Invariants: no group membership and no offset commits (partitions are
//! assigned); a run that sees no Fetch progress for `stall` fails rather
//! than claiming an end it did not see; `on_record` never sees a record
//! before its partition's requested start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::{KafkaContext, KafkaSinkError};

/// Where reading a partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first retained record.
    Earliest,
    /// This offset (a position past the end reads nothing).
    At(i64),
}

/// librdkafka's default `batch.num.messages`: the most records a batch of
/// its producer holds, hence the look-back that always reaches the base
/// of the batch holding a start offset.
pub const DEFAULT_LOOKBACK: i64 = 10_000;

/// Options of one read.
pub struct ReadOptions<'a> {
    pub topic: &'a str,
    pub starts: Vec<(i32, Start)>,
    /// Quiet time after the last record before a partition counts as read.
    pub idle: Duration,
    /// No Fetch progress for this long is an error.
    pub stall: Duration,
    /// Set to stop early (the read then returns `Interrupted`).
    pub stop: Option<&'a AtomicBool>,
    /// Records to fetch before a `Start::At` offset (see the module doc).
    pub lookback: i64,
}

/// Totals of one read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadSummary {
    pub records: u64,
}

/// Reads `opts.starts` to their end, calling `on_record` for each record
/// in partition order. Blocking: run it on a thread of its own (or the
/// blocking pool).
pub fn read_to_end(
    base: &ClientConfig,
    opts: ReadOptions<'_>,
    mut on_record: impl FnMut(&BorrowedMessage<'_>),
) -> Result<ReadSummary, KafkaSinkError> {
    let brokers = base.get("bootstrap.servers").unwrap_or("?").to_string();
    let broker_err = |message: String| KafkaSinkError::Broker {
        brokers: brokers.clone(),
        message,
    };
    let mut summary = ReadSummary::default();
    if opts.starts.is_empty() {
        return Ok(summary);
    }
    let consumer: BaseConsumer<KafkaContext> = base
        .clone()
        // librdkafka wants a group id even for assigned partitions; with
        // assign() the group is never joined and nothing is committed.
        .set("group.id", "virtstream-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "100")
        .set("fetch.wait.max.ms", "200")
        .create_with_context(KafkaContext::for_topic(opts.topic))
        .map_err(|e| KafkaSinkError::Config(e.to_string()))?;
    let mut tpl = TopicPartitionList::new();
    let mut skip_below: HashMap<i32, i64> = HashMap::new();
    for (p, start) in &opts.starts {
        let offset = match start {
            // Offset 0, not Offset::Beginning: a start below the log start
            // is reset to the earliest record (auto.offset.reset) without a
            // ListOffsets request, whose answers are unreliable on some
            // brokers.
            Start::Earliest => Offset::Offset(0),
            Start::At(o) => {
                skip_below.insert(*p, *o);
                Offset::Offset((*o - opts.lookback.max(0)).max(0))
            }
        };
        tpl.add_partition_offset(opts.topic, *p, offset)
            .map_err(|e| KafkaSinkError::Config(e.to_string()))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| broker_err(format!("assigning partitions: {e}")))?;

    let parts: Vec<i32> = opts.starts.iter().map(|(p, _)| *p).collect();
    // Per partition: Fetch requests counted when its last record (or the
    // last client error) was seen; None until fetching is active.
    let mut base_fetches: HashMap<i32, Option<i64>> = parts.iter().map(|p| (*p, None)).collect();
    let mut last_record = Instant::now();
    let mut errors_seen = consumer.context().errors();
    let mut last_progress = Instant::now();
    let mut last_total: i64 = -1;
    loop {
        if opts.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Err(KafkaSinkError::Interrupted);
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                if skip_below
                    .get(&m.partition())
                    .is_none_or(|start| m.offset() >= *start)
                {
                    on_record(&m);
                    summary.records += 1;
                }
                last_record = Instant::now();
                let stats = consumer.context().fetch_stats();
                for p in &parts {
                    if let Some((_, n)) = stats.partitions.get(p) {
                        base_fetches.insert(*p, Some(*n));
                    }
                }
                continue;
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "Kafka fetch error while reading back");
            }
            None => {}
        }
        let stats = consumer.context().fetch_stats();
        let errors = consumer.context().errors();
        let errored = errors != errors_seen;
        errors_seen = errors;
        let mut total = 0i64;
        let mut done = last_record.elapsed() >= opts.idle;
        for p in &parts {
            let Some((state, n)) = stats.partitions.get(p) else {
                done = false;
                continue;
            };
            total += n;
            let base = base_fetches.get_mut(p).expect("assigned partition");
            if state != "active" {
                done = false;
                *base = None;
                continue;
            }
            match base {
                Some(b) if !errored => {
                    if *n < *b + 2 {
                        done = false;
                    }
                }
                _ => {
                    *base = Some(*n);
                    done = false;
                }
            }
        }
        if done {
            return Ok(summary);
        }
        if total != last_total {
            last_total = total;
            last_progress = Instant::now();
        } else if last_progress.elapsed() >= opts.stall {
            let why = consumer
                .context()
                .last_error()
                .unwrap_or_else(|| "no Fetch answered".into());
            return Err(broker_err(format!(
                "reading {} made no progress for {:?}: {why}",
                opts.topic, opts.stall
            )));
        }
    }
}
