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
//! Acks are handled before new work (`select! { biased; }`); the cursor is
//! written back to the journal at most every 10 ms. Journal reads and
//! cursor writes run on the blocking pool (`sinks::journal_io`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, stream::LastRawMessageErrorKind};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::broadcast;

use super::encoding::{Encoded, EncodingContext};
use super::{ensure_streams, NatsError};
use crate::config::NatsConfig;
use crate::journal::{Entry, Journal, Kind};
use crate::model::parse_event_id;
use crate::sinks::journal_io::{CursorWriter, ReadAhead};
use crate::sinks::AckWindow;
use crate::telemetry::{Health, Metrics, SinkState};
use crate::tracker::now_micros;

/// The sink's name in the journal's cursor table and in metrics.
pub const SINK_NAME: &str = "nats";

/// At most one diagnostic connection attempt this often while not ready.
const DIAGNOSE_EVERY: Duration = Duration::from_secs(30);

/// Entries read ahead of the in-flight window.
const READ_AHEAD: usize = 8192;

/// What the broker holds for one subject, as far as this sink knows.
#[derive(Debug, Clone, Copy)]
struct Position {
    stream_seq: u64,
    /// `host_seq` of that message when it is this host's and epoch's.
    ours: Option<u64>,
}

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

/// Called for every entry the broker stored (benchmarks measure latency).
pub type AckObserver = Arc<dyn Fn(&Entry) + Send + Sync>;

pub struct NatsSink {
    pub cfg: NatsConfig,
    pub client: async_nats::Client,
    pub journal: Journal,
    pub encoding: Arc<EncodingContext>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub observer: Option<AckObserver>,
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
                .filter(|(h, e, _)| *h == enc.host_id && *e == enc.epoch)
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

async fn publish_one(
    js: jetstream::Context,
    stream: Arc<jetstream::stream::Stream>,
    enc: Arc<EncodingContext>,
    known: Option<Position>,
    head: JournalHead,
    entry: Entry,
    encoded: Encoded,
) -> Done {
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
        let js = super::context(self.client.clone(), &self.cfg);
        // Provision / check the stream, retrying transient failures.
        let mut delay = Duration::from_millis(200);
        // The client's own events say only "IO error" for a refused TLS
        // handshake; a one-shot connect tells why. It costs a connection
        // attempt, so at most one per DIAGNOSE_EVERY while not ready.
        let mut diagnosis: Option<(Instant, String)> = None;
        let stream = loop {
            let e = tokio::select! {
                _ = shutdown.recv() => return Ok(()),
                r = ensure_streams(&js, &self.cfg) => match r {
                    Ok(s) => break s,
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
                        _ = shutdown.recv() => return Ok(()),
                        c = super::diagnose(&self.cfg) => c,
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
                _ = shutdown.recv() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        };
        let (mut events_stream, mut snapshots_stream) = (Arc::new(stream.0), Arc::new(stream.1));
        self.set_state(SinkState::Ready);
        let mut ready_state = true;
        tracing::info!(stream = %self.cfg.events_stream, "NATS sink ready");

        let labels = Metrics::sink(SINK_NAME);
        let published = self.metrics.published.get_or_create(&labels).clone();
        let errors = self.metrics.publish_errors.get_or_create(&labels).clone();
        let latency = self.metrics.publish_latency.get_or_create(&labels).clone();

        let journal = self.journal.clone();
        let start = tokio::task::spawn_blocking(move || journal.cursor(SINK_NAME))
            .await
            .map_err(|e| NatsError::Api(e.to_string()))?
            .map_err(|e| NatsError::Api(e.to_string()))?;
        let mut window = AckWindow::new(start);
        let mut read_upto = start;
        let mut committed = self.journal.committed();
        let mut reads = ReadAhead::new(self.journal.clone());
        let mut acks = CursorWriter::new(self.journal.clone(), SINK_NAME);
        let mut queues: HashMap<String, VecDeque<Entry>> = HashMap::new();
        // Subjects that are ready, in flight or waiting for a retry.
        let mut scheduled: HashSet<String> = HashSet::new();
        let mut ready: VecDeque<String> = VecDeque::new();
        let mut positions: HashMap<String, Position> = HashMap::new();
        let mut buffered = 0usize;
        let mut inflight = FuturesUnordered::new();
        let mut retry: Vec<String> = Vec::new();
        let mut backoff_until: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        let mut flushed_cursor = start;
        let mut last_flush = Instant::now();
        let mut draining: Option<Instant> = None;
        // A stream was deleted under the sink: publishing waits until it
        // is provisioned again (or exists again).
        let mut reprovision = false;

        loop {
            // Read ahead from the journal (the entries arrive below).
            let head = *committed.borrow_and_update();
            if !reads.busy() && buffered < READ_AHEAD && read_upto < head {
                reads.start(read_upto, READ_AHEAD - buffered);
            }
            let backing_off = backoff_until.is_some_and(|t| Instant::now() < t);
            // Re-provision once nothing is in flight: a late ack from the
            // deleted stream must not set a position in the new one.
            if reprovision && !backing_off && inflight.is_empty() {
                let attempt = tokio::select! {
                    r = super::ensure_streams(&js, &self.cfg) => Some(r),
                    _ = shutdown.recv(), if draining.is_none() => {
                        draining = Some(Instant::now() + drain_deadline);
                        None
                    }
                    _ = tokio::time::sleep_until(draining.unwrap_or_else(Instant::now).into()), if draining.is_some() => None,
                };
                match attempt {
                    Some(Ok((events, snapshots))) => {
                        tracing::info!(events = %self.cfg.events_stream, snapshots = %self.cfg.snapshots_stream, "JetStream streams provisioned again; publishing resumes in order");
                        events_stream = Arc::new(events);
                        snapshots_stream = Arc::new(snapshots);
                        // Cached subject positions belong to the old stream.
                        positions.clear();
                        reprovision = false;
                        backoff = Duration::from_millis(100);
                        backoff_until = None;
                        ready.extend(retry.drain(..));
                        ready_state = true;
                        self.set_state(SinkState::Ready);
                    }
                    Some(Err(e)) if matches!(e, NatsError::Unsuitable { .. }) => {
                        self.set_state(SinkState::Failing(e.to_string()));
                        return Err(e);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "NATS stream not provisioned; publishing waits");
                        self.set_state(SinkState::Failing(e.to_string()));
                        ready_state = false;
                        backoff_until = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    None => {}
                }
            }
            // Dispatch.
            let backing_off = backoff_until.is_some_and(|t| Instant::now() < t);
            if !backing_off && !reprovision {
                if backoff_until.take().is_some() {
                    ready.extend(retry.drain(..));
                }
                while inflight.len() < self.cfg.max_in_flight {
                    let Some(subject) = ready.pop_front() else {
                        break;
                    };
                    let Some(entry) = queues.get_mut(&subject).and_then(|q| q.pop_front()) else {
                        scheduled.remove(&subject);
                        continue;
                    };
                    let encoded = match self.encoding.encode(&entry) {
                        Ok(e) => e,
                        Err(e) => {
                            // An entry this build cannot encode cannot be
                            // published by retrying: report and skip it
                            // (audit shows the hole).
                            tracing::error!(host_seq = entry.host_seq, error = %e, "cannot encode journal entry; skipped");
                            window.ack(entry.host_seq);
                            buffered -= 1;
                            ready.push_back(subject);
                            continue;
                        }
                    };
                    inflight.push(publish_one(
                        js.clone(),
                        if entry.kind == Kind::DomainEvent {
                            events_stream.clone()
                        } else {
                            snapshots_stream.clone()
                        },
                        self.encoding.clone(),
                        positions.get(&subject).copied(),
                        JournalHead {
                            committed: self.journal.committed(),
                            read_upto,
                        },
                        entry,
                        encoded,
                    ));
                }
            }
            // Cursor write-back, coalesced.
            if window.cursor() > flushed_cursor
                && (last_flush.elapsed() >= Duration::from_millis(10) || inflight.is_empty())
            {
                flushed_cursor = window.cursor();
                last_flush = Instant::now();
                acks.write(flushed_cursor, None);
            }
            if let Some(deadline) = draining {
                let done = window.cursor() >= head || Instant::now() >= deadline;
                if done {
                    if window.cursor() > flushed_cursor {
                        acks.write(window.cursor(), None);
                    }
                    acks.flush().await;
                    tracing::info!(cursor = window.cursor(), head, "NATS sink stopped");
                    return Ok(());
                }
            }
            let wake = backoff_until.unwrap_or_else(|| {
                Instant::now() + Duration::from_millis(if draining.is_some() { 20 } else { 500 })
            });
            tokio::select! {
                biased;
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    buffered -= 1;
                    let Done { subject, entry, result } = done;
                    match result {
                        Ok(outcome) => {
                            // The subject's tail as the broker holds it;
                            // unknown (re-read on the next publish) after a
                            // duplicate ack.
                            let tail = match outcome {
                                Outcome::Published { stream_seq } => {
                                    published.inc();
                                    let lat = (now_micros() - entry.observed_at).max(0) as f64 / 1e6;
                                    latency.observe(lat);
                                    if let Some(o) = &self.observer {
                                        o(&entry);
                                    }
                                    Some(Position { stream_seq, ours: Some(entry.host_seq) })
                                }
                                Outcome::AlreadyStored { tail } => tail,
                                Outcome::BeyondJournal { host_seq, head } => {
                                    let e = super::probe::behind_bus(&self.encoding.epoch, host_seq, head);
                                    tracing::error!(error = %e, "NATS sink cannot continue");
                                    self.set_state(SinkState::Failing(e.to_string()));
                                    return Err(e);
                                }
                            };
                            match tail {
                                Some(p) if !leaves_host(&entry) => positions.insert(subject.clone(), p),
                                // A domain that left the host frees its
                                // subject's slot (memory stays flat under
                                // churn); should it return, its subject is
                                // read back once.
                                _ => positions.remove(&subject),
                            };
                            window.ack(entry.host_seq);
                            backoff = Duration::from_millis(100);
                            if !ready_state {
                                ready_state = true;
                                self.set_state(SinkState::Ready);
                            }
                            if queues.get(&subject).is_some_and(|q| !q.is_empty()) {
                                ready.push_back(subject);
                            } else {
                                scheduled.remove(&subject);
                                queues.remove(&subject);
                            }
                        }
                        Err(failure) => {
                            errors.inc();
                            positions.remove(&subject);
                            queues.entry(subject.clone()).or_default().push_front(entry);
                            buffered += 1;
                            retry.push(subject);
                            match failure {
                                Failure::WrongSeq(msg) => {
                                    tracing::debug!(error = %msg, "subject position was stale; re-reading it");
                                    backoff_until.get_or_insert(Instant::now() + Duration::from_millis(5));
                                }
                                Failure::StreamGone(msg) => {
                                    if !reprovision {
                                        tracing::warn!(error = %msg, "JetStream stream is gone; provisioning it again before publishing on");
                                    }
                                    reprovision = true;
                                    self.set_state(SinkState::Failing(msg));
                                    ready_state = false;
                                }
                                Failure::Other(msg) => {
                                    tracing::warn!(error = %msg, retry_in = ?backoff, "NATS publish failed; will retry in order");
                                    self.set_state(SinkState::Failing(msg));
                                    ready_state = false;
                                    backoff_until = Some(Instant::now() + backoff);
                                    backoff = (backoff * 2).min(Duration::from_secs(5));
                                }
                            }
                        }
                    }
                }
                entries = reads.done(), if reads.busy() => {
                    for entry in entries.map_err(|e| NatsError::Api(e.to_string()))? {
                        read_upto = entry.host_seq;
                        let subject = super::encoding::subject(&self.encoding, &entry);
                        if scheduled.insert(subject.clone()) {
                            ready.push_back(subject.clone());
                        }
                        queues.entry(subject).or_default().push_back(entry);
                        buffered += 1;
                    }
                }
                _ = shutdown.recv(), if draining.is_none() => {
                    tracing::info!(deadline = ?drain_deadline, in_flight = inflight.len(), "NATS sink draining");
                    draining = Some(Instant::now() + drain_deadline);
                }
                r = committed.changed(), if draining.is_none() && !reads.busy() && buffered < READ_AHEAD => {
                    if r.is_err() {
                        // The journal is gone: finish what is in flight.
                        draining.get_or_insert(Instant::now() + drain_deadline);
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }
}
