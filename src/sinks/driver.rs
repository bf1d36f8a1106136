//! The publish loop every sink shares: read-ahead of journal entries, the
//! in-flight set, the contiguous-ack window, cursor write-back, draining
//! at shutdown, the publish metrics and the ack observer. A bus plugs in
//! through [`Bus`]: what to send next, what a delivery means, and what
//! state to keep beside the cursor.
//!
//! Invariants:
//! - deliveries are handled before new work (`select! { biased; }`), then
//!   journal reads, then the bus's own event, shutdown, new entries and
//!   the timer;
//! - one journal read at a time, started only while the bus holds fewer
//!   than [`READ_AHEAD`] entries (as it counts them), for at most the
//!   difference; entries reach the bus in `host_seq` order, none skipped
//!   or repeated;
//! - the cursor is the contiguous-ack window's; it is written back at most
//!   every 10 ms (at once when nothing is in flight), with the bus's state
//!   for that cursor, and every write asked for is handed to the journal
//!   before the driver returns, whatever the outcome;
//! - after a shutdown request the driver stops once the cursor reaches the
//!   journal's head or the drain deadline passes, writing the cursor last.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{broadcast, watch};

use crate::clock::now_micros;
use crate::journal::{Entry, Journal, JournalError};
use crate::sinks::journal_io::{CursorWriter, ReadAhead};
use crate::sinks::AckWindow;
use crate::telemetry::Metrics;

/// Entries read ahead of the in-flight window.
const READ_AHEAD: usize = 8192;

/// The cursor is written back at most this often while acks flow.
const WRITE_BACK_EVERY: Duration = Duration::from_millis(10);

/// Called for every entry the broker stored (benchmarks measure latency).
pub type AckObserver = Arc<dyn Fn(&Entry) + Send + Sync>;

/// What a bus adds to the driver. Hooks are called in this order on every
/// turn: [`Bus::turn`], [`Bus::restore`] (when [`Bus::wants_restore`]),
/// [`Bus::open`] then [`Bus::next_job`] while the in-flight set has room,
/// [`Bus::state`] (on a write-back), [`Bus::watch`], [`Bus::wake`]; then
/// one of [`Bus::on_delivery`], [`Bus::accept`] or [`Bus::on_event`].
pub(crate) trait Bus {
    type Error;
    /// What [`Bus::next_job`] hands over; the driver's `send` function
    /// turns it into the future put in flight.
    type Job;
    /// What an in-flight future yields.
    type Delivery;
    /// What [`Bus::poll_event`] yields.
    type Event;
    /// The bus's name in log messages ("NATS sink stopped").
    const LABEL: &'static str;

    /// The most futures in flight at once.
    fn max_in_flight(&self) -> usize;
    /// Entries held: waiting to be sent and, when the bus counts them so,
    /// in flight. Bounds the read-ahead.
    fn buffered(&self) -> usize;
    /// An entry read from the journal, in `host_seq` order.
    fn accept(&mut self, entry: Entry);
    /// Called first on every turn.
    fn turn(&mut self, _draining: bool) {}
    /// Whether [`Bus::restore`] must run before dispatching; `idle` when
    /// nothing is in flight.
    fn wants_restore(&self, _idle: bool) -> bool {
        false
    }
    /// Makes the destination usable again (it raced shutdown and the
    /// drain deadline; cancelled only at an await point).
    fn restore(&mut self) -> impl Future<Output = Result<(), Self::Error>> {
        async { Ok(()) }
    }
    /// Whether [`Bus::next_job`] may be asked this turn.
    fn open(&mut self) -> bool {
        true
    }
    /// The next publish, or `None` when nothing can be sent now. Entries
    /// it settles without sending are acknowledged through `progress`.
    fn next_job(
        &mut self,
        progress: &mut Progress,
        read_upto: u64,
    ) -> Result<Option<Self::Job>, Self::Error>;
    /// The state written with `cursor` (moving what it now covers in).
    fn state(&mut self, _cursor: u64) -> Option<Vec<u8>> {
        None
    }
    /// Called after the write-back, with the number in flight.
    fn watch(&mut self, _in_flight: usize) {}
    /// When to wake up at the latest; `tick` is the driver's default.
    fn wake(&self, tick: Instant, _draining: bool) -> Instant {
        tick
    }
    /// A completed publish.
    fn on_delivery(
        &mut self,
        delivery: Self::Delivery,
        progress: &mut Progress,
    ) -> Result<(), Self::Error>;
    /// A bus event besides deliveries (never ready by default).
    fn poll_event(&mut self, _cx: &mut Context<'_>) -> Poll<Self::Event> {
        Poll::Pending
    }
    /// Handles what [`Bus::poll_event`] yielded.
    fn on_event(
        &mut self,
        _event: Self::Event,
        _progress: &mut Progress,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
    /// A failed journal read.
    fn journal_error(e: JournalError) -> Self::Error;
}

/// The publish metrics of one sink and its observer.
struct Tally {
    published: Counter,
    errors: Counter,
    latency: Histogram,
    observer: Option<AckObserver>,
}

/// The sink's acknowledgements: the contiguous-ack window, the cursor
/// writes, and the metrics a stored or failed publish counts in.
pub(crate) struct Progress {
    window: AckWindow,
    writer: CursorWriter,
    /// The cursor last written back by the coalescing write-back, and when.
    flushed: u64,
    last_flush: Instant,
    tally: Tally,
}

impl Progress {
    fn new(
        journal: Journal,
        sink: &'static str,
        start: u64,
        metrics: &Metrics,
        observer: Option<AckObserver>,
    ) -> Self {
        let labels = Metrics::sink(sink);
        Progress {
            window: AckWindow::new(start),
            writer: CursorWriter::new(journal, sink),
            flushed: start,
            last_flush: Instant::now(),
            tally: Tally {
                published: metrics.published.get_or_create(&labels).clone(),
                errors: metrics.publish_errors.get_or_create(&labels).clone(),
                latency: metrics.publish_latency.get_or_create(&labels).clone(),
                observer,
            },
        }
    }

    /// The broker stored `entry`: counts it, its latency, and tells the
    /// observer. (Acknowledging it is [`Progress::ack`].)
    pub(crate) fn stored(&self, entry: &Entry) {
        self.tally.published.inc();
        let lat = (now_micros() - entry.observed_at).max(0) as f64 / 1e6;
        self.tally.latency.observe(lat);
        if let Some(o) = &self.tally.observer {
            o(entry);
        }
    }

    /// A publish attempt failed.
    pub(crate) fn error(&self) {
        self.tally.errors.inc();
    }

    /// Acknowledges `host_seq`; returns true when the cursor moved.
    pub(crate) fn ack(&mut self, host_seq: u64) -> bool {
        self.window.ack(host_seq)
    }

    /// The contiguous cursor.
    pub(crate) fn cursor(&self) -> u64 {
        self.window.cursor()
    }

    /// Whether the cursor is past what the coalescing write-back wrote.
    pub(crate) fn unflushed(&self) -> bool {
        self.window.cursor() > self.flushed
    }

    /// Asks for `cursor` (with `state`) to be written, now, outside the
    /// coalescing write-back.
    pub(crate) fn write(&mut self, cursor: u64, state: Option<Vec<u8>>) {
        self.writer.write(cursor, state);
    }

    /// The cursor to write back now, if one is due: past the last one,
    /// and 10 ms later or with nothing in flight (`idle`).
    fn due(&mut self, idle: bool) -> Option<u64> {
        if self.unflushed() && (self.last_flush.elapsed() >= WRITE_BACK_EVERY || idle) {
            self.flushed = self.window.cursor();
            self.last_flush = Instant::now();
            Some(self.flushed)
        } else {
            None
        }
    }
}

/// Where a driver starts and what it reports into.
pub(crate) struct DriverOptions<'a> {
    pub journal: Journal,
    /// The sink's name in the journal's cursor table and in metrics.
    pub sink: &'static str,
    /// The sink's cursor when publishing starts.
    pub start: u64,
    pub metrics: &'a Metrics,
    pub observer: Option<AckObserver>,
    pub drain_deadline: Duration,
}

/// The publish loop of one sink over bus `B`; `send` turns a job into the
/// future that completes with its delivery.
pub(crate) struct Driver<B, S, F> {
    bus: B,
    send: S,
    inflight: FuturesUnordered<F>,
    progress: Progress,
    reads: ReadAhead,
    /// The highest `host_seq` read from the journal.
    read_upto: u64,
    committed: watch::Receiver<u64>,
    /// Set at shutdown (or when the journal is gone): stop by then.
    draining: Option<Instant>,
    drain_deadline: Duration,
}

impl<B, S, F> Driver<B, S, F>
where
    B: Bus,
    S: FnMut(B::Job) -> F,
    F: Future<Output = B::Delivery>,
{
    pub(crate) fn new(bus: B, send: S, o: DriverOptions<'_>) -> Self {
        Driver {
            bus,
            send,
            inflight: FuturesUnordered::new(),
            committed: o.journal.committed(),
            reads: ReadAhead::new(o.journal.clone()),
            progress: Progress::new(o.journal, o.sink, o.start, o.metrics, o.observer),
            read_upto: o.start,
            draining: None,
            drain_deadline: o.drain_deadline,
        }
    }

    /// Publishes until shutdown (drained) or an error of the bus; every
    /// cursor write asked for is in the journal's queue on return.
    pub(crate) async fn run(
        mut self,
        shutdown: &mut broadcast::Receiver<()>,
    ) -> Result<(), B::Error> {
        let r = self.drive(shutdown).await;
        self.progress.writer.flush().await;
        r
    }

    async fn drive(&mut self, shutdown: &mut broadcast::Receiver<()>) -> Result<(), B::Error> {
        loop {
            self.bus.turn(self.draining.is_some());
            // Read ahead from the journal (the entries arrive below).
            let head = *self.committed.borrow_and_update();
            let buffered = self.bus.buffered();
            if !self.reads.busy() && buffered < READ_AHEAD && self.read_upto < head {
                self.reads.start(self.read_upto, READ_AHEAD - buffered);
            }
            if self.bus.wants_restore(self.inflight.is_empty()) {
                self.restore(shutdown).await?;
            }
            self.dispatch()?;
            // Cursor write-back, coalesced.
            if let Some(cursor) = self.progress.due(self.inflight.is_empty()) {
                let state = self.bus.state(cursor);
                self.progress.write(cursor, state);
            }
            self.bus.watch(self.inflight.len());
            if let Some(deadline) = self.draining {
                if self.progress.cursor() >= head || Instant::now() >= deadline {
                    let cursor = self.progress.cursor();
                    if self.progress.unflushed() {
                        let state = self.bus.state(cursor);
                        self.progress.write(cursor, state);
                    }
                    self.progress.writer.flush().await;
                    tracing::info!(cursor, head, "{} sink stopped", B::LABEL);
                    return Ok(());
                }
            }
            self.wait(shutdown).await?;
        }
    }

    /// Runs [`Bus::restore`], racing shutdown and the drain deadline.
    async fn restore(&mut self, shutdown: &mut broadcast::Receiver<()>) -> Result<(), B::Error> {
        let draining = self.draining;
        tokio::select! {
            r = self.bus.restore() => r?,
            _ = shutdown.recv(), if draining.is_none() => {
                self.draining = Some(Instant::now() + self.drain_deadline);
            }
            _ = tokio::time::sleep_until(draining.unwrap_or_else(Instant::now).into()), if draining.is_some() => {}
        }
        Ok(())
    }

    /// Puts jobs in flight while there is room and the bus has some.
    fn dispatch(&mut self) -> Result<(), B::Error> {
        if !self.bus.open() {
            return Ok(());
        }
        while self.inflight.len() < self.bus.max_in_flight() {
            let Some(job) = self.bus.next_job(&mut self.progress, self.read_upto)? else {
                break;
            };
            self.inflight.push((self.send)(job));
        }
        Ok(())
    }

    /// Waits for one thing to happen, deliveries first, and handles it.
    async fn wait(&mut self, shutdown: &mut broadcast::Receiver<()>) -> Result<(), B::Error> {
        let draining = self.draining.is_some();
        let tick = Instant::now() + Duration::from_millis(if draining { 20 } else { 500 });
        let wake = self.bus.wake(tick, draining);
        let room = !self.reads.busy() && self.bus.buffered() < READ_AHEAD;
        tokio::select! {
            biased;
            Some(delivery) = self.inflight.next(), if !self.inflight.is_empty() => {
                self.bus.on_delivery(delivery, &mut self.progress)?;
            }
            entries = self.reads.done(), if self.reads.busy() => {
                for entry in entries.map_err(B::journal_error)? {
                    self.read_upto = entry.host_seq;
                    self.bus.accept(entry);
                }
            }
            event = std::future::poll_fn(|cx| self.bus.poll_event(cx)) => {
                self.bus.on_event(event, &mut self.progress)?;
            }
            _ = shutdown.recv(), if !draining => {
                tracing::info!(deadline = ?self.drain_deadline, in_flight = self.inflight.len(), "{} sink draining", B::LABEL);
                self.draining = Some(Instant::now() + self.drain_deadline);
            }
            r = self.committed.changed(), if !draining && room => {
                if r.is_err() {
                    // The journal is gone: finish what is in flight.
                    self.draining.get_or_insert(Instant::now() + self.drain_deadline);
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::journal::{Kind, OpenOptions};

    /// Sends entries in order, at most two at a time; they are stored
    /// when their future completes.
    struct Echo {
        pending: VecDeque<Entry>,
    }

    impl Bus for Echo {
        type Error = JournalError;
        type Job = Entry;
        type Delivery = Entry;
        type Event = ();
        const LABEL: &'static str = "test";

        fn max_in_flight(&self) -> usize {
            2
        }
        fn buffered(&self) -> usize {
            self.pending.len()
        }
        fn accept(&mut self, entry: Entry) {
            self.pending.push_back(entry);
        }
        fn next_job(&mut self, _: &mut Progress, _: u64) -> Result<Option<Entry>, JournalError> {
            Ok(self.pending.pop_front())
        }
        fn state(&mut self, cursor: u64) -> Option<Vec<u8>> {
            Some(cursor.to_string().into_bytes())
        }
        fn on_delivery(&mut self, e: Entry, progress: &mut Progress) -> Result<(), JournalError> {
            progress.stored(&e);
            progress.ack(e.host_seq);
            Ok(())
        }
        fn journal_error(e: JournalError) -> JournalError {
            e
        }
    }

    #[test]
    fn drains_to_the_head_and_writes_the_cursor_with_its_state() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, writer, _) = Journal::open(OpenOptions {
            dir: dir.path(),
            host_id: Some("h"),
            default_host_id: &|| "unused".into(),
            sinks: vec!["s".into()],
            group_commit_max: 64,
            queue: 128,
            when_full: crate::journal::WhenFull::RejectNew,
        })
        .unwrap();
        let writer = std::thread::spawn(move || writer.run());
        for n in 1..=100 {
            let entry = Entry {
                host_seq: n,
                kind: Kind::DomainEvent,
                key: "k".into(),
                observed_at: 0,
                payload: vec![],
            };
            journal.append(entry, None).unwrap();
        }
        journal.sync().unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let observer: AckObserver = {
            let seen = seen.clone();
            Arc::new(move |_| {
                seen.fetch_add(1, Ordering::Relaxed);
            })
        };
        let metrics = Metrics::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, mut rx) = broadcast::channel(1);
            tx.send(()).unwrap();
            let bus = Echo {
                pending: VecDeque::new(),
            };
            let options = DriverOptions {
                journal: journal.clone(),
                sink: "s",
                start: 0,
                metrics: &metrics,
                observer: Some(observer),
                drain_deadline: Duration::from_secs(30),
            };
            Driver::new(bus, |e: Entry| async move { e }, options)
                .run(&mut rx)
                .await
                .unwrap();
        });
        assert_eq!(seen.load(Ordering::Relaxed), 100);
        journal.sync().unwrap();
        let (cursor, state) = journal.cursor_and_state("s").unwrap();
        assert_eq!(cursor, 100);
        assert_eq!(state.as_deref(), Some(&b"100"[..]));
        drop(journal);
        writer.join().unwrap();
    }
}
