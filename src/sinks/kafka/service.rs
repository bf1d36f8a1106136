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
//! The loop itself (read-ahead, acks before new work, the coalesced
//! write-back of the cursor, which carries the offsets, and draining) is
//! `sinks::driver`'s; the read-back is `recovery`'s.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rdkafka::admin::AdminClient;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::broadcast;
use tokio::task::{JoinError, JoinHandle};

use super::encoding::EncodingContext;
use super::offsets::forget_offsets;
pub use super::offsets::{Offsets, TopicOffsets};
use super::recovery::{Placed, Recovery};
use super::KafkaSinkError;
use crate::bus::kafka::{
    admin_client, client_config, missing_topic, provision_topics, KafkaContext,
};
use crate::config::KafkaConfig;
use crate::journal::{Entry, Journal, JournalError};
pub use crate::sinks::driver::AckObserver;
use crate::sinks::driver::{Bus, Driver, DriverOptions, Progress};
use crate::sinks::registry::{await_ids, Registrar, SchemaIds};
use crate::sinks::MessageContext;
use crate::telemetry::{Health, Metrics, SinkState};

/// The sink's name in the journal's cursor table and in metrics.
pub const SINK_NAME: &str = "kafka";

/// No acknowledgement for this long while client errors are reported:
/// the sink reports itself failing.
const STALL_WITH_ERRORS: Duration = Duration::from_secs(2);
/// No acknowledgement for this long, errors or not: failing.
const STALL_SILENT: Duration = Duration::from_secs(5);

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
    /// The schema registry, when the sink publishes in its framing.
    pub registry: Option<Arc<Registrar>>,
}

/// How a session ended without an error.
enum SessionEnd {
    Shutdown,
}

type Delivery = (Entry, usize, Result<(i32, i64), String>);

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
        // The registry first: nothing is published before the ids are known.
        let framing = match &self.registry {
            None => None,
            Some(r) => {
                let waiting = |e: &crate::bus::registry::RegistryError| {
                    self.set_state(SinkState::Failing(e.to_string()))
                };
                match await_ids(r, &mut shutdown, waiting).await {
                    Ok(Some(ids)) => Some(ids),
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        let e = KafkaSinkError::from(e);
                        tracing::error!(error = %e, "Kafka sink cannot continue");
                        self.set_state(SinkState::Failing(e.to_string()));
                        return Err(e);
                    }
                }
            }
        };
        let mut backoff = Duration::from_millis(200);
        // Whether a session got as far as publishing: a topic missing
        // after that was deleted under the running agent, which then waits
        // (not ready) for it instead of exiting.
        let mut published = false;
        loop {
            let started = Instant::now();
            match self
                .session(&mut shutdown, drain_deadline, &mut published, &framing)
                .await
            {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Err(e) if e.is_interrupted() => return Ok(()),
                Err(e)
                    if e.is_fatal()
                        && !(published
                            && matches!(
                                e,
                                KafkaSinkError::Bus(crate::bus::kafka::KafkaError::Missing { .. })
                            )) =>
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
        framing: &Option<Arc<SchemaIds>>,
    ) -> Result<SessionEnd, KafkaSinkError> {
        let base = client_config(&self.cfg, &self.client_id)?;
        // 1. Topics.
        let admin = admin_client(&self.cfg, &self.client_id)?;
        let prepared = tokio::select! {
            r = self.provision(&admin) => r,
            _ = shutdown.recv() => Err(KafkaSinkError::INTERRUPTED),
        };
        // Destroying a client joins its threads: not on the async thread.
        let _ = tokio::task::spawn_blocking(move || drop(admin)).await;
        let (partitions, start, mut offsets) = prepared?;
        let enc = Arc::new(EncodingContext {
            message: MessageContext {
                host_id: self.host_id.clone(),
                epoch: self.epoch.clone(),
                encoding: self.cfg.encoding,
                framing: framing.clone(),
            },
            topics: [
                (self.cfg.events_topic.clone(), partitions[0]),
                (self.cfg.domain_snapshots_topic.clone(), partitions[1]),
                (self.cfg.host_snapshots_topic.clone(), partitions[2]),
            ],
        });

        // 2. Recovery.
        let recovery = Recovery {
            cfg: &self.cfg,
            journal: &self.journal,
            host_id: &self.host_id,
            epoch: &self.epoch,
            sent_upto: &self.sent_upto,
        };
        let found = recovery
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
            c.create_with_context(ctx.clone()).map_err(|e| {
                KafkaSinkError::Bus(crate::bus::kafka::KafkaError::Config(e.to_string()))
            })?
        };
        let result = self
            .publish(
                &producer,
                &ctx,
                &enc,
                start,
                &mut offsets,
                found,
                shutdown,
                drain_deadline,
            )
            .await;
        // Dropping the producer purges what is queued and waits up to
        // 500 ms; keep that off the async thread. Whatever it held stays
        // in the journal and is found by the next read-back if stored.
        let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
        result
    }

    /// Publishes from `start` until shutdown or a session-ending error.
    /// What it wrote back is in the journal's queue when it returns,
    /// before the next session loads the cursor and offsets (or the sink
    /// returns).
    #[allow(clippy::too_many_arguments)]
    async fn publish(
        &self,
        producer: &FutureProducer<KafkaContext>,
        ctx: &KafkaContext,
        encoding: &EncodingContext,
        start: u64,
        offsets: &mut Offsets,
        found: HashMap<u64, Placed>,
        shutdown: &mut broadcast::Receiver<()>,
        drain_deadline: Duration,
    ) -> Result<SessionEnd, KafkaSinkError> {
        self.set_state(SinkState::Ready);
        tracing::info!(topics = ?encoding.topics, cursor = start, "Kafka sink ready");
        let publisher = Publisher {
            sink: self,
            producer,
            ctx,
            encoding,
            offsets,
            found,
            pending: VecDeque::new(),
            acked_above: BTreeMap::new(),
            queue_full_until: None,
            stall: Stall {
                waiting_since: None,
                errors_at_delivery: ctx.errors(),
                ready_state: true,
            },
            topics: TopicWatch {
                last_offset: HashMap::new(),
                next_check: Instant::now() + TOPIC_CHECK_EVERY,
                check: None,
                names: encoding.topics.iter().map(|(t, _)| t.clone()).collect(),
            },
        };
        let options = DriverOptions {
            journal: self.journal.clone(),
            sink: SINK_NAME,
            start,
            metrics: &self.metrics,
            observer: self.observer.clone(),
            drain_deadline,
        };
        Driver::new(publisher, deliver, options)
            .run(shutdown)
            .await
            .map(|()| SessionEnd::Shutdown)
    }
}

/// What an entry handed to the producer became: its (partition, offset)
/// or why it failed, with the entry and its topic index.
async fn deliver((fut, entry, topic): Job) -> Delivery {
    let r = match fut.await {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, _))) => Err(e.to_string()),
        Err(_) => Err("producer dropped the message".to_string()),
    };
    (entry, topic, r)
}

/// An entry handed to the producer: its delivery, the entry and its topic
/// index.
type Job = (DeliveryFuture, Entry, usize);

/// A deleted topic: librdkafka retries into it forever (or a broker acks
/// into nothing), so its metadata is checked now and then, and an offset
/// that goes backwards in a partition ends the session.
struct TopicWatch {
    /// Per (topic, partition): the delivery of the highest host_seq so
    /// far, (host_seq, offset). Deliveries complete in any order (one poll
    /// can finish several); within a partition offsets must still grow
    /// with host_seq, or the partition was created again.
    last_offset: HashMap<(usize, i32), (u64, i64)>,
    next_check: Instant,
    /// The metadata check under way: the name of a missing topic.
    check: Option<JoinHandle<Option<String>>>,
    names: Vec<String>,
}

impl TopicWatch {
    /// Whether a delivery at `(partition, offset)` of `host_seq` in topic
    /// `topic` contradicts an earlier one (the partition was created
    /// again); else records it.
    fn went_back(&mut self, topic: usize, host_seq: u64, (p, o): (i32, i64)) -> bool {
        if self
            .last_offset
            .get(&(topic, p))
            .is_some_and(|&(hs, off)| (host_seq > hs) != (o > off))
        {
            return true;
        }
        let l = self.last_offset.entry((topic, p)).or_insert((host_seq, o));
        if host_seq > l.0 {
            *l = (host_seq, o);
        }
        false
    }
}

/// Health of deliveries: stalled behind client errors (2 s) or behind a
/// broker that accepts connections but does not answer (5 s).
struct Stall {
    /// Since when acknowledgements are awaited without one arriving.
    waiting_since: Option<Instant>,
    errors_at_delivery: u64,
    /// Whether the sink last reported itself ready.
    ready_state: bool,
}

/// The producer side of the publish loop: entries go to librdkafka in
/// `host_seq` order; what recovery found stored is acknowledged instead;
/// the offsets of acknowledged entries are kept for the write-back.
struct Publisher<'a> {
    sink: &'a KafkaSink,
    producer: &'a FutureProducer<KafkaContext>,
    ctx: &'a KafkaContext,
    encoding: &'a EncodingContext,
    offsets: &'a mut Offsets,
    /// Entries read back as stored, by `host_seq`.
    found: HashMap<u64, Placed>,
    /// Entries read, not yet handed to the producer.
    pending: VecDeque<Entry>,
    /// Where acknowledged entries above the cursor are.
    acked_above: BTreeMap<u64, Placed>,
    /// The producer's queue was full: no sending before this.
    queue_full_until: Option<Instant>,
    stall: Stall,
    topics: TopicWatch,
}

impl Publisher<'_> {
    fn broker_error(&self, message: String) -> KafkaSinkError {
        KafkaSinkError::broker(self.sink.cfg.brokers.0.join(","), message)
    }

    /// Writes the cursor and, in the same journal transaction, the offsets
    /// of the partitions whose entries it now covers.
    fn write_back(&mut self, progress: &mut Progress) {
        let cursor = progress.cursor();
        let state = self.state(cursor);
        progress.write(cursor, state);
    }

    /// Writes back what is acknowledged, then again without the offsets
    /// of topic `name`, which belong to a deleted topic.
    fn forget_topic(&mut self, progress: &mut Progress, name: &str) {
        self.write_back(progress);
        self.offsets.topics.remove(name);
        self.write_back(progress);
    }
}

impl Bus for Publisher<'_> {
    type Error = KafkaSinkError;
    type Job = Job;
    type Delivery = Delivery;
    type Event = Result<Option<String>, JoinError>;
    const LABEL: &'static str = "Kafka";

    fn max_in_flight(&self) -> usize {
        self.sink.cfg.max_in_flight
    }

    fn buffered(&self) -> usize {
        self.pending.len()
    }

    fn accept(&mut self, entry: Entry) {
        self.pending.push_back(entry);
    }

    fn turn(&mut self, draining: bool) {
        let t = &mut self.topics;
        if t.check.is_none() && !draining && Instant::now() >= t.next_check {
            let p = self.producer.clone();
            let names = t.names.clone();
            t.check = Some(tokio::task::spawn_blocking(move || {
                missing_topic(p.client(), &names)
            }));
        }
    }

    fn open(&mut self) -> bool {
        if self.queue_full_until.is_some_and(|t| Instant::now() >= t) {
            self.queue_full_until = None;
        }
        self.queue_full_until.is_none()
    }

    /// The next entry in `host_seq` order.
    fn next_job(
        &mut self,
        progress: &mut Progress,
        _read_upto: u64,
    ) -> Result<Option<Job>, KafkaSinkError> {
        while let Some(entry) = self.pending.pop_front() {
            if let Some(placed) = self.found.remove(&entry.host_seq) {
                // Stored before the crash: acknowledge, do not resend.
                self.acked_above.insert(entry.host_seq, placed);
                progress.ack(entry.host_seq);
                continue;
            }
            let enc = match self.encoding.encode(&entry) {
                Ok(e) => e,
                Err(e) => {
                    // Never skipped: the journal keeps it, the sink stops.
                    if let Some(fatal) = self.encoding.message.unframable(&entry) {
                        return Err(fatal.into());
                    }
                    tracing::error!(host_seq = entry.host_seq, error = %e, "cannot encode journal entry; skipped");
                    progress.ack(entry.host_seq);
                    continue;
                }
            };
            let topic = enc.topic;
            let mut record = FutureRecord::to(&self.encoding.topics[topic].0)
                .partition(enc.partition)
                .key(enc.key.as_bytes())
                .headers(enc.headers)
                .timestamp(enc.timestamp_ms);
            if let Some(v) = &enc.value {
                record = record.payload(v.as_ref());
            }
            return match self.producer.send_result(record) {
                Ok(fut) => {
                    self.sink
                        .sent_upto
                        .fetch_max(entry.host_seq, Ordering::AcqRel);
                    Ok(Some((fut, entry, topic)))
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.pending.push_front(entry);
                    self.queue_full_until = Some(Instant::now() + Duration::from_millis(5));
                    Ok(None)
                }
                Err((e, _)) => {
                    progress.error();
                    Err(self.broker_error(format!("produce failed: {e}")))
                }
            };
        }
        Ok(None)
    }

    /// The offsets: the partitions of the entries `cursor` now covers move
    /// in.
    fn state(&mut self, cursor: u64) -> Option<Vec<u8>> {
        let rest = self.acked_above.split_off(&(cursor + 1));
        for (_, (t, p, o)) in std::mem::replace(&mut self.acked_above, rest) {
            self.offsets
                .topics
                .entry(self.encoding.topics[t].0.clone())
                .or_default()
                .next
                .insert(p, o + 1);
        }
        Some(serde_json::to_vec(&*self.offsets).expect("offsets serialize"))
    }

    /// Health: deliveries stalled, behind client errors (2 s) or behind a
    /// broker that accepts connections but does not answer (5 s).
    fn watch(&mut self, in_flight: usize) {
        let s = &mut self.stall;
        if in_flight == 0 {
            s.waiting_since = None;
        } else if s.waiting_since.is_none() {
            s.waiting_since = Some(Instant::now());
        }
        let stalled = s.waiting_since.map(|t| t.elapsed()).unwrap_or_default();
        if in_flight > 0
            && s.ready_state
            && (stalled > STALL_SILENT
                || (stalled > STALL_WITH_ERRORS && self.ctx.errors() != s.errors_at_delivery))
        {
            let why = self.ctx.last_error().unwrap_or_else(|| {
                format!(
                    "no acknowledgement from {} for {stalled:.0?}",
                    self.sink.cfg.brokers.0.join(",")
                )
            });
            tracing::warn!(in_flight, error = %why, "Kafka deliveries stalled; librdkafka keeps retrying in order");
            self.sink.set_state(SinkState::Failing(why));
            s.ready_state = false;
        }
    }

    fn wake(&self, tick: Instant, draining: bool) -> Instant {
        let t = &self.topics;
        self.queue_full_until
            .unwrap_or(tick)
            .min(if t.check.is_none() && !draining {
                t.next_check
            } else {
                Instant::now() + Duration::from_secs(1)
            })
    }

    fn on_delivery(
        &mut self,
        (entry, topic, result): Delivery,
        progress: &mut Progress,
    ) -> Result<(), KafkaSinkError> {
        let (p, o) = match result {
            Ok(placed) => placed,
            Err(msg) => {
                // A permanent delivery failure: later messages of the
                // partition may still land, so end the session and let
                // recovery sort out what is stored.
                progress.error();
                if progress.unflushed() {
                    self.write_back(progress);
                }
                return Err(self.broker_error(format!(
                    "delivery of host_seq {} failed: {msg}",
                    entry.host_seq
                )));
            }
        };
        if self.topics.went_back(topic, entry.host_seq, (p, o)) {
            // Not acknowledged: the next session reads back whether it is
            // stored.
            let name = self.encoding.topics[topic].0.clone();
            self.forget_topic(progress, &name);
            return Err(self.broker_error(format!("topic {name} partition {p} went back to offset {o}: deleted and created again while publishing")));
        }
        progress.stored(&entry);
        self.acked_above.insert(entry.host_seq, (topic, p, o));
        progress.ack(entry.host_seq);
        let s = &mut self.stall;
        s.waiting_since = Some(Instant::now());
        s.errors_at_delivery = self.ctx.errors();
        if !s.ready_state {
            s.ready_state = true;
            self.sink.set_state(SinkState::Ready);
        }
        Ok(())
    }

    /// The metadata check under way.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Self::Event> {
        match self.topics.check.as_mut() {
            Some(job) => Pin::new(job).poll(cx),
            None => Poll::Pending,
        }
    }

    fn on_event(
        &mut self,
        missing: Result<Option<String>, JoinError>,
        progress: &mut Progress,
    ) -> Result<(), KafkaSinkError> {
        self.topics.check = None;
        self.topics.next_check = Instant::now() + TOPIC_CHECK_EVERY;
        if let Ok(Some(name)) = missing {
            // Its recorded offsets belong to the deleted topic.
            self.forget_topic(progress, &name);
            return Err(self.broker_error(format!("topic {name} was deleted while publishing")));
        }
        Ok(())
    }

    fn journal_error(e: JournalError) -> KafkaSinkError {
        KafkaSink::journal_err(e)
    }
}
