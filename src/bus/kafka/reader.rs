//! Reads partitions of a topic from given offsets to their end, without
//! trusting the broker's high watermark.
//!
//! Some Kafka-protocol brokers report the high watermark wrong (under it,
//! even 0 for a partition holding thousands of records), so neither
//! `enable.partition.eof` nor ListOffsets can say where a partition ends.
//! Each partition is done, independently, when the first of these holds:
//! - the caller says so (it found what it was looking for);
//! - a record stamped later than the read's start plus `max_clock_skew`
//!   arrives: it was appended after the read began, so everything appended
//!   before is behind it (this ends a partition other producers keep busy).
//!   The start is the latest of this host's clock, `not_before_ms` and the
//!   stamps of records the caller marks as [`Flow::Earlier`] (records it
//!   knows were appended before the read began, such as the reading agent's
//!   own): a clock stepped backward, which makes older records look late,
//!   cannot end a partition before those records (see [`Lateness`]);
//! - no record has arrived for `idle`, and two Fetch requests were sent
//!   after a statistics report that came after the last record, with no
//!   client error in between. librdkafka sends the next Fetch to a broker
//!   only after the previous one was answered, and serves statistics from
//!   the same queue as records, so one complete Fetch came back with
//!   nothing new for the partition.
//!
//! A start offset inside a record batch is honoured even by brokers whose
//! Fetch skips a batch that begins before the requested offset (tansu
//! 0.6 returns only batches whose base offset is at or past it): fetching
//! starts `lookback` records earlier and records before the requested
//! offset are dropped here, unless the log turns out to start after the
//! fetch position (topic recreated or truncated: then all of it is read).
//!
//! Invariants: no group membership and no offset commits (partitions are
//! assigned); a run that sees no Fetch progress for `stall` fails rather
//! than claiming an end it did not see.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as ClientError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::{KafkaContext, KafkaError};

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
    /// Largest clock difference between this host and record timestamps.
    pub max_clock_skew: Duration,
    /// The read began no earlier than this record time (ms), whatever
    /// this host's clock says now (e.g. the newest time this host stamped
    /// before a restart).
    pub not_before_ms: Option<i64>,
    /// No Fetch progress for this long is an error.
    pub stall: Duration,
    /// Set to stop early (the read then returns `Interrupted`).
    pub stop: Option<&'a AtomicBool>,
    /// Records to fetch before a `Start::At` offset (see the module doc).
    pub lookback: i64,
}

/// What the caller wants after a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Continue; this record was appended before the read began (the
    /// caller knows: e.g. it is the reading agent's own), so its stamp
    /// never ends the partition and later records are judged against it.
    Earlier,
    /// Stop reading this record's partition.
    PartitionDone,
}

/// When a record counts as appended after the read began: stamped later
/// than the read's start plus the allowed skew. The start only moves
/// forward: to `not_before_ms`, and to the stamp of every record known to
/// be earlier, so this host's clock being behind (stepped backward since
/// it stamped them) cannot end a partition before its own records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lateness {
    start_ms: i64,
    skew_ms: i64,
}

impl Lateness {
    pub fn new(now_ms: i64, not_before_ms: Option<i64>, skew: Duration) -> Lateness {
        Lateness {
            start_ms: not_before_ms.map_or(now_ms, |n| n.max(now_ms)),
            skew_ms: i64::try_from(skew.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// Whether the record stamped `ts_ms`, of which the caller said
    /// `flow`, ends its partition as appended after the read began.
    pub fn ends(&mut self, ts_ms: Option<i64>, flow: Flow) -> bool {
        let Some(t) = ts_ms else { return false };
        if flow == Flow::Earlier {
            self.start_ms = self.start_ms.max(t);
            return false;
        }
        t > self.start_ms.saturating_add(self.skew_ms)
    }
}

/// Per-partition progress.
struct Progress {
    lateness: Lateness,
    /// Where fetching started (an earlier record means the log was reset).
    fetch_start: i64,
    /// Records below this offset are look-back, not shown to the caller.
    skip_below: Option<i64>,
    done: bool,
    last_record: Instant,
    /// Statistics number seen when the last record arrived; the baseline
    /// is taken from a later report.
    record_report: Option<u64>,
    /// (broker, Fetch requests) of the baseline report.
    base: Option<(i32, i64)>,
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
    mut on_record: impl FnMut(&BorrowedMessage<'_>) -> Flow,
) -> Result<ReadSummary, KafkaError> {
    let brokers = base.get("bootstrap.servers").unwrap_or("?").to_string();
    let broker_err = |message: String| KafkaError::Broker {
        brokers: brokers.clone(),
        message,
    };
    let mut summary = ReadSummary::default();
    if opts.starts.is_empty() {
        return Ok(summary);
    }
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let lateness = Lateness::new(started_ms, opts.not_before_ms, opts.max_clock_skew);
    let consumer: BaseConsumer<KafkaContext> = base
        .clone()
        // librdkafka wants a group id even for assigned partitions; with
        // assign() the group is never joined and nothing is committed. It
        // also routes statistics through the consumer queue (see above).
        .set("group.id", "virtstream-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "100")
        .set("fetch.wait.max.ms", "200")
        .create_with_context(KafkaContext::for_topic(opts.topic))
        .map_err(|e| KafkaError::Config(e.to_string()))?;
    let mut tpl = TopicPartitionList::new();
    let mut parts: HashMap<i32, Progress> = HashMap::new();
    for (p, start) in &opts.starts {
        let (fetch_start, skip_below) = match start {
            // Offset 0, not Offset::Beginning: a start below the log start
            // is reset to the earliest record (auto.offset.reset) without a
            // ListOffsets request, whose answers are unreliable on some
            // brokers.
            Start::Earliest => (0, None),
            Start::At(o) => ((*o - opts.lookback.max(0)).max(0), Some(*o)),
        };
        tpl.add_partition_offset(opts.topic, *p, Offset::Offset(fetch_start))
            .map_err(|e| KafkaError::Config(e.to_string()))?;
        parts.insert(
            *p,
            Progress {
                lateness,
                fetch_start,
                skip_below,
                done: false,
                last_record: Instant::now(),
                record_report: None,
                base: None,
            },
        );
    }
    consumer
        .assign(&tpl)
        .map_err(|e| broker_err(format!("assigning partitions: {e}")))?;

    let finish = |consumer: &BaseConsumer<KafkaContext>, p: i32| {
        let mut t = TopicPartitionList::new();
        t.add_partition(opts.topic, p);
        let _ = consumer.pause(&t);
    };
    let mut errors_seen = consumer.context().errors();
    let mut last_progress = Instant::now();
    let mut last_total: i64 = -1;
    loop {
        if opts.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Err(KafkaError::Interrupted);
        }
        let mut errored = false;
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                let Some(st) = parts.get_mut(&m.partition()) else {
                    continue;
                };
                if st.done {
                    continue;
                }
                if m.offset() < st.fetch_start {
                    // The log starts after where fetching began: the
                    // partition was recreated or truncated. Read all of it.
                    st.skip_below = None;
                }
                st.last_record = Instant::now();
                st.record_report = Some(consumer.context().fetch_stats().seq);
                st.base = None;
                let mut flow = Flow::Continue;
                if st.skip_below.is_none_or(|s| m.offset() >= s) {
                    flow = on_record(&m);
                    summary.records += 1;
                }
                let late = st.lateness.ends(m.timestamp().to_millis(), flow);
                if flow == Flow::PartitionDone || late {
                    st.done = true;
                    finish(&consumer, m.partition());
                }
                continue;
            }
            Some(Err(ClientError::PartitionEOF(_))) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "Kafka fetch error while reading");
                errored = true;
            }
            None => {}
        }
        let stats = consumer.context().fetch_stats();
        let errors = consumer.context().errors();
        errored |= errors != errors_seen;
        errors_seen = errors;
        let mut total = 0i64;
        let mut all_done = true;
        for (p, st) in parts.iter_mut().filter(|(_, st)| !st.done) {
            all_done = false;
            let Some(f) = stats.partitions.get(p) else {
                continue;
            };
            total += f.fetches;
            if f.state != "active" || errored {
                st.base = None;
                continue;
            }
            if let Some(seen) = st.record_report {
                if stats.seq <= seen {
                    continue; // no report made after the last record yet
                }
                st.record_report = None;
            }
            match st.base {
                Some((broker, n)) if broker == f.broker => {
                    if f.fetches >= n + 2 && st.last_record.elapsed() >= opts.idle {
                        st.done = true;
                        finish(&consumer, *p);
                    }
                }
                _ => st.base = Some((f.broker, f.fetches)),
            }
        }
        if all_done {
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

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    #[test]
    fn a_clock_stepped_back_does_not_make_own_records_late() {
        let skew = Duration::from_secs(10);
        // This host stamped its records at 10 h, then its clock stepped
        // back an hour: the read starts at 9 h by its clock.
        let now = 9 * H;
        let mut l = Lateness::new(now, None, skew);
        assert!(
            l.ends(Some(10 * H), Flow::Continue),
            "a record not known to be earlier: late"
        );
        let mut l = Lateness::new(now, None, skew);
        assert!(!l.ends(Some(10 * H), Flow::Earlier), "its own: never late");
        assert!(
            !l.ends(Some(10 * H + 5_000), Flow::Continue),
            "another host's record within the skew of the last own one"
        );
        assert!(l.ends(Some(10 * H + 11_000), Flow::Continue));
        // The newest time this host stamped, given up front.
        let mut l = Lateness::new(now, Some(10 * H), skew);
        assert!(!l.ends(Some(10 * H + 9_000), Flow::Continue));
        assert!(l.ends(Some(10 * H + 10_001), Flow::Continue));
        // A floor in the past changes nothing.
        let mut l = Lateness::new(now, Some(0), skew);
        assert!(l.ends(Some(now + 10_001), Flow::Continue));
        assert!(!l.ends(None, Flow::Continue), "no timestamp: not late");
    }

    #[test]
    fn hostile_stamps_do_not_overflow() {
        let mut l = Lateness::new(i64::MAX, Some(i64::MIN), Duration::MAX);
        assert!(!l.ends(Some(i64::MAX), Flow::Continue));
        assert!(!l.ends(Some(i64::MIN), Flow::Earlier));
    }
}
