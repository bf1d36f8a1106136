//! Event actions: each `[[actions]]` entry is a sink of its own, fed by
//! the publish loop (`sinks::driver`) from its own journal cursor
//! (`action:<name>`), that runs a command for every matching domain event
//! instead of publishing it. `rule` decides what matches and what the
//! command line and environment become, `bus` orders and bounds the
//! commands, `run` runs one (timeout, process group, retries, dead
//! letter).
//!
//! Invariants:
//! - at least once: an entry is acknowledged only after its command
//!   finished (success, or final failure written to the dead-letter
//!   file, the write retried until it succeeds); a crash before that runs
//!   it again after the restart; after shutdown begins no attempt starts,
//!   and a failed one is neither retried nor dead-lettered (it runs again
//!   at the next start);
//! - a new action starts at the journal's head (`start = "oldest"`: at
//!   the oldest retained entry);
//! - in order per domain, at most `concurrency` commands at once;
//! - a slow command delays only its own action's cursor: event intake and
//!   the other sinks go on, and the journal keeps the entries behind the
//!   cursor (within `journal.max_bytes`, like for a slow sink).

mod bus;
pub mod rule;
mod run;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use self::bus::ActionBus;
use self::run::{Counters, Runner};
use super::driver::{Driver, DriverOptions};
use crate::config::{find_program, ActionConfig, ActionStart};
use crate::journal::{Journal, JournalError};
use crate::telemetry::{Health, Metrics, SinkState};

/// The dead-letter file's name, in the journal directory.
pub const DEAD_LETTER_FILE: &str = "actions-dead-letter.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("action journal access: {0}")]
    Journal(#[source] JournalError),
    #[error("actions[{index}].command: {reason}")]
    Program { index: usize, reason: String },
}

/// The journal cursor's (and metrics `sink` label's) name of an action.
pub fn sink_name(action: &str) -> String {
    format!("action:{action}")
}

/// One configured action, ready to run.
pub struct ActionSink {
    pub cfg: ActionConfig,
    /// [`sink_name`], for the life of the process.
    pub sink: &'static str,
    pub journal: Journal,
    pub journal_dir: PathBuf,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// Resolved `command[0]`.
    pub program: PathBuf,
}

impl ActionSink {
    /// Resolves the program (PATH may differ from `check-config`'s).
    pub fn new(
        index: usize,
        cfg: &ActionConfig,
        sink: &'static str,
        journal: Journal,
        journal_dir: &Path,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
    ) -> Result<ActionSink, ActionError> {
        let path = std::env::var("PATH").ok();
        let program = find_program(&cfg.command[0], path.as_deref())
            .map_err(|reason| ActionError::Program { index, reason })?;
        Ok(ActionSink {
            cfg: cfg.clone(),
            sink,
            journal,
            journal_dir: journal_dir.to_path_buf(),
            health,
            metrics,
            program,
        })
    }

    /// Runs commands until shutdown, then drains within `drain_deadline`
    /// (commands still running then are killed and run again at the next
    /// start).
    pub async fn run(
        self,
        mut shutdown: broadcast::Receiver<()>,
        drain_deadline: Duration,
    ) -> Result<(), ActionError> {
        self.metrics.register_action(&self.cfg.name);
        let journal = self.journal.clone();
        let sink = self.sink;
        let from_now = self.cfg.start == ActionStart::Now;
        // A new action (no cursor) starts at the journal's head unless it
        // asked for everything retained: adding or renaming an action must
        // not run it for hours of old events a lagging sink kept.
        let start = tokio::task::spawn_blocking(move || -> Result<u64, JournalError> {
            if from_now && !journal.has_cursor(sink)? {
                let head = *journal.committed().borrow();
                journal.ack(sink, head)?;
                journal.sync()?;
                tracing::info!(action = sink, head, "new action: starts at the journal's head (start = \"oldest\" runs it for what the journal holds)");
            }
            journal.cursor(sink)
        })
        .await
        .map_err(|e| ActionError::Journal(JournalError::Storage(e.to_string())))?
        .map_err(ActionError::Journal)?;
        // Once shutdown begins no attempt starts and none is retried or
        // dead-lettered: the entry stays for the next start.
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut rx = shutdown.resubscribe();
        let flag = stopping.clone();
        tokio::spawn(async move {
            let _ = rx.recv().await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        self.health.set_sink(sink, SinkState::Ready);
        tracing::info!(action = %self.cfg.name, cursor = start, "action started");
        let runner = Arc::new(Runner {
            counters: Counters::new(&self.metrics, &self.cfg.name),
            cfg: self.cfg.clone(),
            program: self.program,
            dead_letter: self.journal_dir.join(DEAD_LETTER_FILE),
            stopping,
        });
        let bus = ActionBus::new(
            self.cfg.name.clone(),
            rule::Rule::new(&self.cfg.on),
            self.cfg.concurrency,
        );
        let options = DriverOptions {
            journal: self.journal,
            sink,
            start,
            metrics: &self.metrics,
            observer: None,
            drain_deadline,
        };
        let send = move |job| bus::send(runner.clone(), job);
        Driver::new(bus, send, options).run(&mut shutdown).await
    }
}
