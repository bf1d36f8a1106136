//! The Kafka publish loop: journal cursor → idempotent producer,
//! effectively once across agent crashes without Kafka transactions.
//!
//! A session is: connect and check topics → recover → publish. Any broker
//! failure the producer cannot ride out ends the session; the next one
//! starts over with recovery (backoff wrapped around it).
//!
//! How exactly-once holds:
//! - entries are handed to librdkafka in `host_seq` order, each to the
//!   partition of its key; the producer is idempotent with `acks=all` and
//!   messages never time out locally, so within a session each partition
//!   receives this host's entries in order, without gaps or duplicates;
//! - the journal stores, with the sink's cursor and in the same
//!   transaction, per partition the offset just past this host's last
//!   record at or below the cursor (`next`). Records of this host above
//!   the cursor can only be at or past `next` in their partition;
//! - recovery reads, from `next` (or the start, for a partition never
//!   written), every partition an unacknowledged entry maps to, until the
//!   fetches come back empty (never trusting the high watermark), and
//!   notes the entries whose event id (`ce_id` header, this host and
//!   epoch) is already there; those are acknowledged, not sent again.
//!
//! Acks are handled before new work (`select! { biased; }`); the cursor
//! and offsets are written back at most every 10 ms. Journal reads and
//! cursor writes run on the blocking pool (`sinks::journal_io`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rdkafka::admin::AdminClient;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::broadcast;

use super::encoding::{EncodingContext, EVENT_ID_HEADER};
use super::offsets::forget_offsets;
pub use super::offsets::{Offsets, TopicOffsets};
use super::reader::{self, Flow, ReadOptions, Start};
use super::{
    admin_client, client_config, missing_topic, partition_for, provision_topics, KafkaContext,
    KafkaSinkError,
};
use crate::config::KafkaConfig;
use crate::journal::{Entry, Journal};
use crate::model::parse_event_id;
use crate::sinks::journal_io::{CursorWriter, ReadAhead};
use crate::sinks::AckWindow;
use crate::telemetry::{Health, Metrics, SinkState};
use crate::tracker::now_micros;

/// The sink's name in the journal's cursor table and in metrics.
pub const SINK_NAME: &str = "kafka";

/// Entries read ahead of the in-flight window.
const READ_AHEAD: usize = 8192;

/// No acknowledgement for this long while client errors are reported:
/// the sink reports itself failing.
const STALL_WITH_ERRORS: Duration = Duration::from_secs(2);
/// No acknowledgement for this long, errors or not: failing.
const STALL_SILENT: Duration = Duration::from_secs(5);

/// Called for every entry the broker stored (benchmarks measure latency).
pub type AckObserver = Arc<dyn Fn(&Entry) + Send + Sync>;

pub struct KafkaSink {
    pub cfg: KafkaConfig,
    /// Default client id (`kafka.client_id` wins).
    pub client_id: String,
    pub host_id: String,
    pub epoch: String,
    pub journal: Journal,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub observer: Option<AckObserver>,
    /// The highest `host_seq` of this epoch this process may have put on
    /// the bus: the journal's head when it was opened (an earlier process
    /// published nothing beyond it), then every entry handed to the
    /// producer. A record of this epoch beyond it was written by a process
    /// whose journal went further: this journal was restored. (The
    /// journal's current head would not do: while the broker cannot be
    /// reached, new entries take the host_seq values the bus already
    /// holds, and read back as already stored.)
    pub sent_upto: Arc<std::sync::atomic::AtomicU64>,
}

/// How a session ended without an error.
enum SessionEnd {
    Shutdown,
}

type Delivery = (Entry, usize, Result<(i32, i64), String>);

/// Where an entry was found or acknowledged: (topic index, partition, offset).
type Placed = (usize, i32, i64);
/// Per topic: partition → the highest `host_seq` of the backlog there.
type PartitionChecks = [BTreeMap<i32, u64>; 3];

/// How often the publish loop checks that its topics still exist.
const TOPIC_CHECK_EVERY: Duration = Duration::from_secs(3);

impl KafkaSink {
    fn set_state(&self, s: SinkState) {
        self.health.set_sink(SINK_NAME, s);
    }

    fn journal_err(e: impl std::fmt::Display) -> KafkaSinkError {
        KafkaSinkError::Journal(e.to_string())
    }

    /// Runs until shutdown; returns `Err` only for errors retrying cannot
    /// fix (bad client configuration, an unsuitable or missing topic).
    pub async fn run(
        self,
        mut shutdown: broadcast::Receiver<()>,
        drain_deadline: Duration,
    ) -> Result<(), KafkaSinkError> {
        self.set_state(SinkState::Connecting);
        let mut backoff = Duration::from_millis(200);
        // Whether a session got as far as publishing: a topic missing
        // after that was deleted under the running agent, which then waits
        // (not ready) for it instead of exiting.
        let mut published = false;
        loop {
            let started = Instant::now();
            match self
                .session(&mut shutdown, drain_deadline, &mut published)
                .await
            {
                Ok(SessionEnd::Shutdown) | Err(KafkaSinkError::Interrupted) => return Ok(()),
                Err(e)
                    if e.is_fatal()
                        && !(published && matches!(e, KafkaSinkError::Missing { .. })) =>
                {
                    tracing::error!(error = %e, "Kafka sink cannot continue");
                    self.set_state(SinkState::Failing(e.to_string()));
                    return Err(e);
                }
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = Duration::from_millis(200);
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "Kafka sink session ended; will recover and resume");
                    self.set_state(SinkState::Failing(e.to_string()));
                    tokio::select! {
                        _ = shutdown.recv() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

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
            let batch = journal.read_after(after, 4096).map_err(Self::journal_err)?;
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
    async fn recover(
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
            .map_err(Self::journal_err)??
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
            let host = self.host_id.clone();
            let epoch = self.epoch.clone();
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
            })
        };
        tokio::pin!(job);
        let (found, seen_end, records) = tokio::select! {
            r = &mut job => r.map_err(|e| KafkaSinkError::Journal(e.to_string()))??,
            _ = shutdown.recv() => {
                stop.store(true, Ordering::Relaxed);
                let _ = job.await;
                return Err(KafkaSinkError::Interrupted);
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

    /// Creates missing topics (when allowed) and checks them; loads the
    /// cursor and the offsets recorded with it, forgetting those of a
    /// topic created just now.
    async fn provision(
        &self,
        admin: &Arc<AdminClient<KafkaContext>>,
    ) -> Result<([i32; 3], u64, Offsets), KafkaSinkError> {
        let provisioned = provision_topics(admin, &self.cfg).await?;
        let journal = self.journal.clone();
        let (start, mut offsets) =
            tokio::task::spawn_blocking(move || Offsets::load(&journal, SINK_NAME))
                .await
                .map_err(Self::journal_err)??;
        forget_offsets(&mut offsets, &provisioned.created);
        Ok((provisioned.partitions, start, offsets))
    }

    async fn session(
        &self,
        shutdown: &mut broadcast::Receiver<()>,
        drain_deadline: Duration,
        published: &mut bool,
    ) -> Result<SessionEnd, KafkaSinkError> {
        let base = client_config(&self.cfg, &self.client_id)?;
        // 1. Topics.
        let admin = admin_client(&self.cfg, &self.client_id)?;
        let prepared = tokio::select! {
            r = self.provision(&admin) => r,
            _ = shutdown.recv() => Err(KafkaSinkError::Interrupted),
        };
        // Destroying a client joins its threads: not on the async thread.
        let _ = tokio::task::spawn_blocking(move || drop(admin)).await;
        let (partitions, start, mut offsets) = prepared?;
        let enc = Arc::new(EncodingContext {
            host_id: self.host_id.clone(),
            epoch: self.epoch.clone(),
            topics: [
                (self.cfg.events_topic.clone(), partitions[0]),
                (self.cfg.domain_snapshots_topic.clone(), partitions[1]),
                (self.cfg.host_snapshots_topic.clone(), partitions[2]),
            ],
            encoding: self.cfg.encoding,
        });

        // 2. Recovery.
        let mut found = self
            .recover(&base, start, &mut offsets, &enc, shutdown)
            .await?;
        let journal = self.journal.clone();
        let state = serde_json::to_vec(&offsets).expect("offsets serialize");
        tokio::task::spawn_blocking(move || journal.ack_with_state(SINK_NAME, start, state))
            .await
            .map_err(Self::journal_err)?
            .map_err(Self::journal_err)?;

        // 3. Publish.
        *published = true;
        let ctx = KafkaContext::default();
        let producer: FutureProducer<KafkaContext> = {
            let mut c = base.clone();
            // Idempotent, acks from all in-sync replicas, no local
            // timeouts, and a fatal error rather than a gap if a batch
            // fails permanently: within a session each partition gets this
            // host's entries in order, without gaps or duplicates.
            c.set("enable.idempotence", "true")
                .set("acks", "all")
                .set("message.timeout.ms", "0")
                .set("enable.gapless.guarantee", "true");
            if !self.cfg.properties.contains_key("linger.ms")
                && !self.cfg.properties.contains_key("queue.buffering.max.ms")
            {
                c.set("linger.ms", "2");
            }
            c.create_with_context(ctx.clone())
                .map_err(|e| KafkaSinkError::Config(e.to_string()))?
        };
        let mut acks = CursorWriter::new(self.journal.clone(), SINK_NAME);
        let result = self
            .publish(
                &producer,
                &ctx,
                &enc,
                start,
                &mut offsets,
                &mut acks,
                &mut found,
                shutdown,
                drain_deadline,
            )
            .await;
        // What the session wrote back is in the journal's queue before the
        // next session loads the cursor and offsets (or the sink returns).
        acks.flush().await;
        // Dropping the producer purges what is queued and waits up to
        // 500 ms; keep that off the async thread. Whatever it held stays
        // in the journal and is found by the next read-back if stored.
        let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
        result
    }

    /// Writes the cursor and, in the same journal transaction, the offsets
    /// of the partitions whose entries it now covers.
    fn write_back(
        &self,
        enc: &EncodingContext,
        cursor: u64,
        acked_above: &mut BTreeMap<u64, Placed>,
        offsets: &mut Offsets,
        acks: &mut CursorWriter,
    ) {
        let rest = acked_above.split_off(&(cursor + 1));
        for (_, (t, p, o)) in std::mem::replace(acked_above, rest) {
            offsets
                .topics
                .entry(enc.topics[t].0.clone())
                .or_default()
                .next
                .insert(p, o + 1);
        }
        let state = serde_json::to_vec(&*offsets).expect("offsets serialize");
        acks.write(cursor, Some(state));
    }

    #[allow(clippy::too_many_arguments)]
    async fn publish(
        &self,
        producer: &FutureProducer<KafkaContext>,
        ctx: &KafkaContext,
        encoding: &EncodingContext,
        start: u64,
        offsets: &mut Offsets,
        acks: &mut CursorWriter,
        found: &mut HashMap<u64, Placed>,
        shutdown: &mut broadcast::Receiver<()>,
        drain_deadline: Duration,
    ) -> Result<SessionEnd, KafkaSinkError> {
        self.set_state(SinkState::Ready);
        tracing::info!(topics = ?encoding.topics, cursor = start, "Kafka sink ready");
        let labels = Metrics::sink(SINK_NAME);
        let published = self.metrics.published.get_or_create(&labels).clone();
        let errors = self.metrics.publish_errors.get_or_create(&labels).clone();
        let latency = self.metrics.publish_latency.get_or_create(&labels).clone();

        let mut window = AckWindow::new(start);
        // (partition, offset) of acknowledged entries above the cursor.
        let mut acked_above: BTreeMap<u64, Placed> = BTreeMap::new();
        let mut read_upto = start;
        let mut committed = self.journal.committed();
        let mut reads = ReadAhead::new(self.journal.clone());
        let mut pending: std::collections::VecDeque<Entry> = Default::default();
        let mut inflight = FuturesUnordered::new();
        let mut flushed_cursor = start;
        let mut last_flush = Instant::now();
        // Since when acknowledgements are awaited without one arriving.
        let mut waiting_since: Option<Instant> = None;
        let mut errors_at_delivery = ctx.errors();
        let mut ready_state = true;
        let mut queue_full_until: Option<Instant> = None;
        let mut draining: Option<Instant> = None;
        // A deleted topic: librdkafka retries into it forever (or a broker
        // acks into nothing), so its metadata is checked now and then, and
        // an offset that goes backwards in a partition ends the session.
        // Per (topic, partition): the delivery of the highest host_seq so
        // far, (host_seq, offset). Deliveries complete in any order (one
        // poll can finish several); within a partition offsets must still
        // grow with host_seq, or the partition was created again.
        let mut last_offset: HashMap<(usize, i32), (u64, i64)> = HashMap::new();
        let mut next_check = Instant::now() + TOPIC_CHECK_EVERY;
        let mut check: Option<tokio::task::JoinHandle<Option<String>>> = None;
        let names: Vec<String> = encoding.topics.iter().map(|(t, _)| t.clone()).collect();

        loop {
            if check.is_none() && draining.is_none() && Instant::now() >= next_check {
                let p = producer.clone();
                let names = names.clone();
                check = Some(tokio::task::spawn_blocking(move || {
                    missing_topic(p.client(), &names)
                }));
            }
            // Read ahead from the journal (the entries arrive below).
            let head = *committed.borrow_and_update();
            if !reads.busy() && pending.len() < READ_AHEAD && read_upto < head {
                reads.start(read_upto, READ_AHEAD - pending.len());
            }
            // Dispatch in host_seq order.
            if queue_full_until.is_some_and(|t| Instant::now() >= t) {
                queue_full_until = None;
            }
            while queue_full_until.is_none() && inflight.len() < self.cfg.max_in_flight {
                let Some(entry) = pending.pop_front() else {
                    break;
                };
                if let Some(placed) = found.remove(&entry.host_seq) {
                    // Stored before the crash: acknowledge, do not resend.
                    acked_above.insert(entry.host_seq, placed);
                    window.ack(entry.host_seq);
                    continue;
                }
                let enc = match encoding.encode(&entry) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(host_seq = entry.host_seq, error = %e, "cannot encode journal entry; skipped");
                        window.ack(entry.host_seq);
                        continue;
                    }
                };
                let topic = enc.topic;
                let mut record = FutureRecord::to(&encoding.topics[topic].0)
                    .partition(enc.partition)
                    .key(enc.key.as_bytes())
                    .headers(enc.headers)
                    .timestamp(enc.timestamp_ms);
                if let Some(v) = &enc.value {
                    record = record.payload(v.as_ref());
                }
                match producer.send_result(record) {
                    Ok(fut) => inflight.push({
                        self.sent_upto.fetch_max(entry.host_seq, Ordering::AcqRel);
                        async move {
                            let r = match fut.await {
                                Ok(Ok(d)) => Ok((d.partition, d.offset)),
                                Ok(Err((e, _))) => Err(e.to_string()),
                                Err(_) => Err("producer dropped the message".to_string()),
                            };
                            (entry, topic, r)
                        }
                    }),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        pending.push_front(entry);
                        queue_full_until = Some(Instant::now() + Duration::from_millis(5));
                    }
                    Err((e, _)) => {
                        errors.inc();
                        return Err(KafkaSinkError::Broker {
                            brokers: self.cfg.brokers.0.join(","),
                            message: format!("produce failed: {e}"),
                        });
                    }
                }
            }
            // Cursor and offsets write-back, coalesced.
            if window.cursor() > flushed_cursor
                && (last_flush.elapsed() >= Duration::from_millis(10) || inflight.is_empty())
            {
                flushed_cursor = window.cursor();
                last_flush = Instant::now();
                self.write_back(encoding, flushed_cursor, &mut acked_above, offsets, acks);
            }
            // Health: deliveries stalled, behind client errors (2 s) or
            // behind a broker that accepts connections but does not answer
            // (5 s).
            if inflight.is_empty() {
                waiting_since = None;
            } else if waiting_since.is_none() {
                waiting_since = Some(Instant::now());
            }
            let stalled = waiting_since.map(|t| t.elapsed()).unwrap_or_default();
            if !inflight.is_empty()
                && ready_state
                && (stalled > STALL_SILENT
                    || (stalled > STALL_WITH_ERRORS && ctx.errors() != errors_at_delivery))
            {
                let why = ctx.last_error().unwrap_or_else(|| {
                    format!(
                        "no acknowledgement from {} for {stalled:.0?}",
                        self.cfg.brokers.0.join(",")
                    )
                });
                tracing::warn!(in_flight = inflight.len(), error = %why, "Kafka deliveries stalled; librdkafka keeps retrying in order");
                self.set_state(SinkState::Failing(why));
                ready_state = false;
            }
            if let Some(deadline) = draining {
                if window.cursor() >= head || Instant::now() >= deadline {
                    if window.cursor() > flushed_cursor {
                        self.write_back(encoding, window.cursor(), &mut acked_above, offsets, acks);
                    }
                    tracing::info!(cursor = window.cursor(), head, "Kafka sink stopped");
                    return Ok(SessionEnd::Shutdown);
                }
            }
            let wake = queue_full_until
                .unwrap_or_else(|| {
                    Instant::now()
                        + Duration::from_millis(if draining.is_some() { 20 } else { 500 })
                })
                .min(if check.is_none() && draining.is_none() {
                    next_check
                } else {
                    Instant::now() + Duration::from_secs(1)
                });
            tokio::select! {
                biased;
                Some((entry, topic, result)) = inflight.next(), if !inflight.is_empty() => {
                    let (entry, topic, result): Delivery = (entry, topic, result);
                    match result {
                        Ok((p, o)) if last_offset
                            .get(&(topic, p))
                            .is_some_and(|&(hs, off)| (entry.host_seq > hs) != (o > off)) => {
                            // Not acknowledged: the next session reads back
                            // whether it is stored.
                            let name = &encoding.topics[topic].0;
                            self.write_back(encoding, window.cursor(), &mut acked_above, offsets, acks);
                            offsets.topics.remove(name);
                            self.write_back(encoding, window.cursor(), &mut acked_above, offsets, acks);
                            return Err(KafkaSinkError::Broker {
                                brokers: self.cfg.brokers.0.join(","),
                                message: format!("topic {name} partition {p} went back to offset {o}: deleted and created again while publishing"),
                            });
                        }
                        Ok((p, o)) => {
                            let l = last_offset.entry((topic, p)).or_insert((entry.host_seq, o));
                            if entry.host_seq > l.0 {
                                *l = (entry.host_seq, o);
                            }
                            published.inc();
                            latency.observe((now_micros() - entry.observed_at).max(0) as f64 / 1e6);
                            if let Some(obs) = &self.observer {
                                obs(&entry);
                            }
                            acked_above.insert(entry.host_seq, (topic, p, o));
                            window.ack(entry.host_seq);
                            waiting_since = Some(Instant::now());
                            errors_at_delivery = ctx.errors();
                            if !ready_state {
                                ready_state = true;
                                self.set_state(SinkState::Ready);
                            }
                        }
                        Err(msg) => {
                            // A permanent delivery failure: later messages
                            // of the partition may still land, so end the
                            // session and let recovery sort out what is
                            // stored.
                            errors.inc();
                            if window.cursor() > flushed_cursor {
                                self.write_back(encoding, window.cursor(), &mut acked_above, offsets, acks);
                            }
                            return Err(KafkaSinkError::Broker {
                                brokers: self.cfg.brokers.0.join(","),
                                message: format!("delivery of host_seq {} failed: {msg}", entry.host_seq),
                            });
                        }
                    }
                }
                entries = reads.done(), if reads.busy() => {
                    for e in entries.map_err(Self::journal_err)? {
                        read_upto = e.host_seq;
                        pending.push_back(e);
                    }
                }
                r = async { check.as_mut().expect("guarded").await }, if check.is_some() => {
                    check = None;
                    next_check = Instant::now() + TOPIC_CHECK_EVERY;
                    if let Ok(Some(name)) = r {
                        // Its recorded offsets belong to the deleted topic.
                        self.write_back(encoding, window.cursor(), &mut acked_above, offsets, acks);
                        offsets.topics.remove(&name);
                        self.write_back(encoding, window.cursor(), &mut acked_above, offsets, acks);
                        return Err(KafkaSinkError::Broker {
                            brokers: self.cfg.brokers.0.join(","),
                            message: format!("topic {name} was deleted while publishing"),
                        });
                    }
                }
                _ = shutdown.recv(), if draining.is_none() => {
                    tracing::info!(deadline = ?drain_deadline, in_flight = inflight.len(), "Kafka sink draining");
                    draining = Some(Instant::now() + drain_deadline);
                }
                r = committed.changed(), if draining.is_none() && !reads.busy() && pending.len() < READ_AHEAD => {
                    if r.is_err() {
                        draining.get_or_insert(Instant::now() + drain_deadline);
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }
}
