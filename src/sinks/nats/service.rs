//! The NATS publish loop: journal cursor → JetStream, effectively once and
//! in order per subject.
//!
//! How order and exactly-once hold across crashes and outages:
//! - at most one publish per subject is in flight; publishes of different
//!   subjects are pipelined (bounded by `nats.max_in_flight`);
//! - each publish carries `Nats-Expected-Last-Subject-Sequence` = the
//!   stream sequence of this subject's previous message, so a message can
//!   never be stored ahead of a predecessor that was lost in an outage;
//! - when the sink does not know a subject's position (after a start or an
//!   error) it reads the subject's last stored message: if that message is
//!   this host's, this epoch's, with a `host_seq` at or past the entry, the
//!   entry is already stored and is not sent again (this holds beyond the
//!   JetStream duplicate window), and the position remembered for the
//!   subject is that message's own (stream sequence, `host_seq`);
//!   otherwise its sequence is the expectation;
//! - `Nats-Msg-Id` = event_id lets JetStream drop a re-send inside the
//!   duplicate window as well; that ack names the stored copy, not
//!   necessarily the subject's tail, so the position is read again;
//! - a stream deleted under the sink ("no stream for the subject") stops
//!   dispatching until the streams are provisioned again (created when
//!   allowed, else not ready until they exist); cached positions are then
//!   void and dropped.
//!
//! The loop itself (read-ahead, acks before new work, the cursor
//! write-back, draining) is `sinks::driver`'s; the per-subject queues,
//! positions and retry waits are `scheduler`'s. This file holds what
//! talks to JetStream: provisioning, the position read-back and the
//! publish with its expectation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, stream::LastRawMessageErrorKind};
use tokio::sync::broadcast;

use super::encoding::{Encoded, EncodingContext};
use super::scheduler::{Failed, Position, Retry, Scheduler};
use super::NatsError;
use crate::bus::nats::ensure_streams;
use crate::config::NatsConfig;
use crate::journal::{Entry, Journal, JournalError, Kind};
use crate::model::parse_event_id;
use crate::sinks::driver::AckObserver;
use crate::sinks::driver::{Bus, Driver, DriverOptions, Progress};
pub use crate::sinks::registry::{await_ids, Registrar};
use crate::telemetry::{Health, Metrics, SinkState};

/// The sink's name in the journal's cursor table and in metrics.
pub const SINK_NAME: &str = "nats";

/// At most one diagnostic connection attempt this often while not ready.
const DIAGNOSE_EVERY: Duration = Duration::from_secs(30);

enum Outcome {
    Published {
        stream_seq: u64,
    },
    /// The entry is already in the stream. `tail` is the subject's last
    /// message as read back (its own stream sequence and `host_seq`, which
    /// may be past the entry); `None` after a JetStream duplicate ack,
    /// which names the entry's own message, not necessarily the tail.
    AlreadyStored {
        tail: Option<Position>,
    },
    /// The subject holds this host's and epoch's `host_seq` beyond the
    /// journal's head: the journal was restored (`probe::behind_bus`).
    BeyondJournal {
        host_seq: u64,
        head: u64,
    },
}

/// Why a publish did not store the entry.
enum Failure {
    /// The subject's expected last sequence was stale: re-read it.
    WrongSeq(String),
    /// No stream takes the subject: it was deleted while the sink ran.
    StreamGone(String),
    Other(String),
}

struct Done {
    subject: String,
    entry: Entry,
    result: Result<Outcome, Failure>,
}

pub struct NatsSink {
    pub cfg: NatsConfig,
    pub client: async_nats::Client,
    pub journal: Journal,
    pub encoding: Arc<EncodingContext>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub observer: Option<AckObserver>,
    /// The schema registry, when the sink publishes in its framing.
    pub registry: Option<Arc<Registrar>>,
}

async fn last_position(
    stream: &jetstream::stream::Stream,
    subject: &str,
    enc: &EncodingContext,
) -> Result<Position, Failure> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => {
            let ours = m
                .headers
                .get("Nats-Msg-Id")
                .and_then(|v| {
                    parse_event_id(v.as_str()).map(|(h, e, s)| (h.to_string(), e.to_string(), s))
                })
                .filter(|(h, e, _)| *h == enc.message.host_id && *e == enc.message.epoch)
                .map(|(_, _, s)| s);
            Ok(Position {
                stream_seq: m.sequence,
                ours,
            })
        }
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(Position {
            stream_seq: 0,
            ours: None,
        }),
        Err(e) => {
            let gone = matches!(
                e.kind(),
                LastRawMessageErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            );
            let msg = format!("reading last message of {subject}: {e}");
            Err(if gone {
                Failure::StreamGone(msg)
            } else {
                Failure::Other(msg)
            })
        }
    }
}

/// The last message of its subject for a while: a tombstone, or an event
/// after which the domain no longer exists on the host.
fn leaves_host(entry: &Entry) -> bool {
    match entry.kind {
        Kind::DomainTombstone => true,
        Kind::DomainEvent => crate::codec::decode_event(&entry.payload).is_ok_and(|e| {
            !e.persistent && e.state_after.state == crate::model::DomainState::SHUTOFF
        }),
        _ => false,
    }
}

/// How far the journal is known to reach, for the restored-journal check.
struct JournalHead {
    committed: tokio::sync::watch::Receiver<u64>,
    /// The highest host_seq this sink has read (may be ahead of the
    /// committed watch by a batch).
    read_upto: u64,
}

/// One publish, as the scheduler handed it out.
struct Job {
    js: jetstream::Context,
    stream: Arc<jetstream::stream::Stream>,
    enc: Arc<EncodingContext>,
    /// The subject's position when known; else it is read back first.
    known: Option<Position>,
    head: JournalHead,
    entry: Entry,
    encoded: Encoded,
}

async fn publish_one(job: Job) -> Done {
    let Job {
        js,
        stream,
        enc,
        known,
        head,
        entry,
        encoded,
    } = job;
    let subject = encoded.subject.clone();
    let result = async {
        let pos = match known {
            Some(p) => p,
            None => last_position(&stream, &subject, &enc).await?,
        };
        // Everything this sink published it read from the journal (up to
        // `read_upto`, which may run ahead of the committed watch by a
        // batch); the head is read after the position. Only a restored
        // journal is behind what the subject holds.
        let head = (*head.committed.borrow()).max(head.read_upto);
        if let Some(hs) = pos.ours.filter(|hs| *hs > head) {
            return Ok(Outcome::BeyondJournal { host_seq: hs, head });
        }
        if pos.ours.is_some_and(|hs| hs >= entry.host_seq) {
            return Ok(Outcome::AlreadyStored { tail: Some(pos) });
        }
        let msg = jetstream::message::PublishMessage::build()
            .payload(encoded.body)
            .headers(encoded.headers)
            .expected_last_subject_sequence(pos.stream_seq);
        let ack = js
            .send_publish(subject.clone(), msg)
            .await
            .map_err(|e| Failure::Other(e.to_string()))?
            .await
            .map_err(|e| match e.kind() {
                PublishErrorKind::WrongLastSequence => Failure::WrongSeq(e.to_string()),
                PublishErrorKind::StreamNotFound => {
                    Failure::StreamGone(format!("publishing to {subject}: {e}"))
                }
                _ => Failure::Other(e.to_string()),
            })?;
        Ok(if ack.duplicate {
            Outcome::AlreadyStored { tail: None }
        } else {
            Outcome::Published {
                stream_seq: ack.sequence,
            }
        })
    }
    .await;
    Done {
        subject,
        entry,
        result,
    }
}

impl NatsSink {
    fn set_state(&self, s: SinkState) {
        self.health.set_sink(SINK_NAME, s);
    }

    /// Runs until shutdown; returns `Err` only for errors retrying cannot
    /// fix (an unsuitable stream).
    pub async fn run(
        self,
        mut shutdown: broadcast::Receiver<()>,
        drain_deadline: Duration,
    ) -> Result<(), NatsError> {
        self.set_state(SinkState::Connecting);
        let js = crate::bus::nats::context(self.client.clone(), &self.cfg);
        let Some((events, snapshots)) = self.await_streams(&js, &mut shutdown).await? else {
            return Ok(());
        };
        // Nothing is published before the registry's ids are known.
        let enc = match &self.registry {
            None => self.encoding.clone(),
            Some(r) => {
                let waiting = |e: &crate::bus::registry::RegistryError| {
                    self.set_state(SinkState::Failing(e.to_string()))
                };
                match await_ids(r, &mut shutdown, waiting).await {
                    Ok(Some(ids)) => Arc::new(self.encoding.with_framing(ids)),
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        let e = NatsError::from(e);
                        tracing::error!(error = %e, "NATS sink cannot continue");
                        self.set_state(SinkState::Failing(e.to_string()));
                        return Err(e);
                    }
                }
            }
        };
        self.set_state(SinkState::Ready);
        tracing::info!(stream = %self.cfg.events_stream, "NATS sink ready");

        let journal = self.journal.clone();
        let start = tokio::task::spawn_blocking(move || journal.cursor(SINK_NAME))
            .await
            .map_err(|e| NatsError::api(e.to_string()))?
            .map_err(|e| NatsError::api(e.to_string()))?;
        let publisher = Publisher {
            sink: &self,
            enc,
            js,
            events: Arc::new(events),
            snapshots: Arc::new(snapshots),
            sched: Scheduler::default(),
            ready_state: true,
        };
        let options = DriverOptions {
            journal: self.journal.clone(),
            sink: SINK_NAME,
            start,
            metrics: &self.metrics,
            observer: self.observer.clone(),
            drain_deadline,
        };
        Driver::new(publisher, publish_one, options)
            .run(&mut shutdown)
            .await
    }

    /// Provisions / checks the streams, retrying transient failures;
    /// `None` when shut down first.
    async fn await_streams(
        &self,
        js: &jetstream::Context,
        shutdown: &mut broadcast::Receiver<()>,
    ) -> Result<Option<(jetstream::stream::Stream, jetstream::stream::Stream)>, NatsError> {
        let mut delay = Duration::from_millis(200);
        // The client's own events say only "IO error" for a refused TLS
        // handshake; a one-shot connect tells why. It costs a connection
        // attempt, so at most one per DIAGNOSE_EVERY while not ready.
        let mut diagnosis: Option<(Instant, String)> = None;
        loop {
            let e = tokio::select! {
                _ = shutdown.recv() => return Ok(None),
                r = ensure_streams(js, &self.cfg) => match r.map_err(NatsError::from) {
                    Ok(s) => return Ok(Some(s)),
                    Err(e) if e.is_fatal() => {
                        self.set_state(SinkState::Failing(e.to_string()));
                        return Err(e);
                    }
                    Err(e) => e,
                }
            };
            let mut why = e.to_string();
            if self.client.connection_state() != async_nats::connection::State::Connected {
                let stale = diagnosis
                    .as_ref()
                    .is_none_or(|(at, _)| at.elapsed() >= DIAGNOSE_EVERY);
                if stale {
                    let cause = tokio::select! {
                        _ = shutdown.recv() => return Ok(None),
                        c = crate::bus::nats::diagnose(&self.cfg) => c.map(|d| d.to_string()),
                    };
                    diagnosis = cause.map(|c| (Instant::now(), c));
                }
                if let Some((_, cause)) = &diagnosis {
                    why = cause.clone();
                }
            }
            tracing::warn!(error = %why, retry_in = ?delay, "NATS not ready");
            self.set_state(SinkState::Failing(why));
            tokio::select! {
                _ = shutdown.recv() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// The JetStream side of the publish loop: hands out the scheduler's
/// entries as publishes, and feeds what came of them back.
struct Publisher<'a> {
    sink: &'a NatsSink,
    /// The sink's encoding, with the registry's framing when configured.
    enc: Arc<EncodingContext>,
    js: jetstream::Context,
    events: Arc<jetstream::stream::Stream>,
    snapshots: Arc<jetstream::stream::Stream>,
    sched: Scheduler,
    /// Whether the sink last reported itself ready.
    ready_state: bool,
}

impl Publisher<'_> {
    fn failing(&mut self, why: String) {
        self.sink.set_state(SinkState::Failing(why));
        self.ready_state = false;
    }

    /// What became of a publish that did not store its entry.
    fn failed(&mut self, subject: String, entry: Entry, failure: Failure) {
        let (why, msg) = match failure {
            Failure::WrongSeq(msg) => (Retry::StalePosition, msg),
            Failure::StreamGone(msg) => (Retry::StreamGone, msg),
            Failure::Other(msg) => (Retry::Backoff, msg),
        };
        match self.sched.failed(subject, entry, why, Instant::now()) {
            Failed::Retrying => {
                tracing::debug!(error = %msg, "subject position was stale; re-reading it");
            }
            Failed::Reprovision { known } => {
                if !known {
                    tracing::warn!(error = %msg, "JetStream stream is gone; provisioning it again before publishing on");
                }
                self.failing(msg);
            }
            Failed::BackingOff { retry_in } => {
                tracing::warn!(error = %msg, retry_in = ?retry_in, "NATS publish failed; will retry in order");
                self.failing(msg);
            }
        }
    }
}

impl Bus for Publisher<'_> {
    type Error = NatsError;
    type Job = Job;
    type Delivery = Done;
    type Event = ();
    const LABEL: &'static str = "NATS";

    fn max_in_flight(&self) -> usize {
        self.sink.cfg.max_in_flight
    }

    fn buffered(&self) -> usize {
        self.sched.buffered()
    }

    fn accept(&mut self, entry: Entry) {
        let subject = super::encoding::subject(&self.enc, &entry);
        self.sched.push(subject, entry);
    }

    fn wants_restore(&self, idle: bool) -> bool {
        self.sched.wants_reprovision(Instant::now(), idle)
    }

    /// Provisions the deleted stream again.
    async fn restore(&mut self) -> Result<(), NatsError> {
        let cfg = &self.sink.cfg;
        match ensure_streams(&self.js, cfg).await.map_err(NatsError::from) {
            Ok((events, snapshots)) => {
                tracing::info!(events = %cfg.events_stream, snapshots = %cfg.snapshots_stream, "JetStream streams provisioned again; publishing resumes in order");
                self.events = Arc::new(events);
                self.snapshots = Arc::new(snapshots);
                // Cached subject positions belong to the old stream.
                self.sched.reprovisioned();
                self.ready_state = true;
                self.sink.set_state(SinkState::Ready);
            }
            Err(e)
                if matches!(
                    e,
                    NatsError::Bus(crate::bus::nats::NatsError::Unsuitable { .. })
                ) =>
            {
                self.sink.set_state(SinkState::Failing(e.to_string()));
                return Err(e);
            }
            Err(e) => {
                let retry_in = self.sched.reprovision_failed(Instant::now());
                tracing::warn!(error = %e, retry_in = ?retry_in, "NATS stream not provisioned; publishing waits");
                self.failing(e.to_string());
            }
        }
        Ok(())
    }

    fn open(&mut self) -> bool {
        self.sched.open(Instant::now())
    }

    fn next_job(
        &mut self,
        progress: &mut Progress,
        read_upto: u64,
    ) -> Result<Option<Job>, NatsError> {
        while let Some((subject, entry)) = self.sched.next() {
            let encoded = match self.enc.encode(&entry) {
                Ok(e) => e,
                Err(e) => {
                    if let Some(fatal) = self.enc.message.unframable(&entry) {
                        return Err(fatal.into());
                    }
                    // An entry this build cannot encode cannot be
                    // published by retrying: report and skip it (audit
                    // shows the hole).
                    tracing::error!(host_seq = entry.host_seq, error = %e, "cannot encode journal entry; skipped");
                    progress.ack(entry.host_seq);
                    self.sched.skipped(subject);
                    continue;
                }
            };
            return Ok(Some(Job {
                js: self.js.clone(),
                stream: if entry.kind == Kind::DomainEvent {
                    self.events.clone()
                } else {
                    self.snapshots.clone()
                },
                enc: self.enc.clone(),
                known: self.sched.position(&subject),
                head: JournalHead {
                    committed: self.sink.journal.committed(),
                    read_upto,
                },
                entry,
                encoded,
            }));
        }
        Ok(None)
    }

    fn wake(&self, tick: Instant, _draining: bool) -> Instant {
        self.sched.wake(tick)
    }

    fn on_delivery(&mut self, done: Done, progress: &mut Progress) -> Result<(), NatsError> {
        let Done {
            subject,
            entry,
            result,
        } = done;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(failure) => {
                progress.error();
                self.failed(subject, entry, failure);
                return Ok(());
            }
        };
        // The subject's tail as the broker holds it; unknown (re-read on
        // the next publish) after a duplicate ack.
        let tail = match outcome {
            Outcome::Published { stream_seq } => {
                progress.stored(&entry);
                Some(Position {
                    stream_seq,
                    ours: Some(entry.host_seq),
                })
            }
            Outcome::AlreadyStored { tail } => tail,
            Outcome::BeyondJournal { host_seq, head } => {
                let e = super::probe::behind_bus(&self.enc.message.epoch, host_seq, head);
                tracing::error!(error = %e, "NATS sink cannot continue");
                self.sink.set_state(SinkState::Failing(e.to_string()));
                return Err(e);
            }
        };
        // A domain that left the host frees its subject's slot (memory
        // stays flat under churn); should it return, its subject is read
        // back once.
        let tail = tail.filter(|_| !leaves_host(&entry));
        progress.ack(entry.host_seq);
        self.sched.stored(subject, tail);
        if !self.ready_state {
            self.ready_state = true;
            self.sink.set_state(SinkState::Ready);
        }
        Ok(())
    }

    fn journal_error(e: JournalError) -> NatsError {
        NatsError::api(e.to_string())
    }
}
