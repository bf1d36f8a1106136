//! The action sink's side of the publish loop ([`Bus`]): which journal
//! entries run the command, in which order, how many at once.
//!
//! Invariants:
//! - entries that do not match (snapshots, other events, other domains)
//!   are acknowledged without running anything;
//! - at most one command per domain (journal key) runs at a time, and a
//!   domain's events run in `host_seq` order: the next waits until the
//!   previous one is settled (succeeded or dead-lettered);
//! - at most `concurrency` commands run at once, across domains; domains
//!   take turns in the order they became ready;
//! - an entry is acknowledged only once it is settled, so the journal
//!   cursor never passes an event whose command has not finished.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use super::rule::Rule;
use super::run::{self, Runner};
use super::ActionError;
use crate::codec;
use crate::journal::{Entry, JournalError, Kind};
use crate::model::DomainEvent;
use crate::sinks::driver::{Bus, Progress};

/// One event to run the command for.
pub struct Job {
    /// The journal entry, without its payload (decoded into `event`).
    entry: Entry,
    event: DomainEvent,
    json: serde_json::Value,
}

/// A settled job.
pub struct Done {
    entry: Entry,
}

/// The command of `job` with its retries; completes once it is settled.
pub async fn send(runner: Arc<Runner>, job: Job) -> Done {
    run::execute(runner, &job.event, &job.json).await;
    Done { entry: job.entry }
}

pub struct ActionBus {
    name: String,
    rule: Rule,
    concurrency: usize,
    /// Entries to acknowledge without running anything.
    settled: Vec<u64>,
    /// Matching events per domain, in order, not yet started.
    queues: HashMap<String, VecDeque<Job>>,
    /// Domains with a command running.
    busy: HashSet<String>,
    /// Domains with a queued event and none running, in turn order.
    ready: VecDeque<String>,
    queued: usize,
}

impl ActionBus {
    pub fn new(name: String, rule: Rule, concurrency: usize) -> ActionBus {
        ActionBus {
            name,
            rule,
            concurrency: concurrency.max(1),
            settled: Vec::new(),
            queues: HashMap::new(),
            busy: HashSet::new(),
            ready: VecDeque::new(),
            queued: 0,
        }
    }

    fn ack_settled(&mut self, progress: &mut Progress) {
        for seq in self.settled.drain(..) {
            progress.ack(seq);
        }
    }
}

impl Bus for ActionBus {
    type Error = ActionError;
    type Job = Job;
    type Delivery = Done;
    type Event = ();
    const LABEL: &'static str = "action";

    fn max_in_flight(&self) -> usize {
        self.concurrency
    }

    fn buffered(&self) -> usize {
        self.queued + self.settled.len()
    }

    fn accept(&mut self, entry: Entry) {
        if entry.kind != Kind::DomainEvent {
            self.settled.push(entry.host_seq);
            return;
        }
        let event = match codec::decode_event(&entry.payload) {
            Ok(e) => e,
            Err(e) => {
                // The agent wrote it; nothing an action could do with it.
                tracing::error!(action = %self.name, host_seq = entry.host_seq, error = %e, "journal entry does not decode; skipped");
                self.settled.push(entry.host_seq);
                return;
            }
        };
        if !self.rule.matches(&event) {
            self.settled.push(entry.host_seq);
            return;
        }
        let json = codec::event_to_json(&event);
        let entry = Entry {
            payload: Vec::new(),
            ..entry
        };
        let queue = self.queues.entry(entry.key.clone()).or_default();
        if queue.is_empty() && !self.busy.contains(&entry.key) {
            self.ready.push_back(entry.key.clone());
        }
        queue.push_back(Job { entry, event, json });
        self.queued += 1;
    }

    fn next_job(&mut self, progress: &mut Progress, _: u64) -> Result<Option<Job>, ActionError> {
        self.ack_settled(progress);
        let Some(key) = self.ready.pop_front() else {
            return Ok(None);
        };
        let job = self.queues.get_mut(&key).and_then(VecDeque::pop_front);
        if self.queues.get(&key).is_some_and(VecDeque::is_empty) {
            self.queues.remove(&key);
        }
        Ok(job.inspect(|_| {
            self.queued -= 1;
            self.busy.insert(key);
        }))
    }

    fn on_delivery(&mut self, done: Done, progress: &mut Progress) -> Result<(), ActionError> {
        // Settled: counts as published (latency: libvirt callback to the
        // command's end).
        progress.stored(&done.entry);
        progress.ack(done.entry.host_seq);
        self.busy.remove(&done.entry.key);
        if self.queues.contains_key(&done.entry.key) {
            self.ready.push_back(done.entry.key);
        }
        self.ack_settled(progress);
        Ok(())
    }

    fn journal_error(e: JournalError) -> ActionError {
        ActionError::Journal(e)
    }
}
