//! Running one action for one event: the command in its own process
//! group, the event on stdin and in the environment, the timeout, the
//! retries, and the dead-letter line when every attempt failed.
//!
//! Invariants:
//! - the command inherits the agent's environment minus every
//!   `VIRTSTREAM_*` variable (configuration overrides and secrets), plus
//!   the event's `VIRTSTREAM_*` variables;
//! - commands run through `tokio::process`, never a shell, and nothing
//!   here blocks the async thread (the dead-letter append runs on the
//!   blocking pool);
//! - an attempt that outlives `timeout`, or whose future is dropped (the
//!   agent's drain deadline passed), gets its whole process group
//!   SIGKILLed: nothing it started is left running;
//! - [`execute`] returns only once the event is settled: the command
//!   succeeded, or it failed `retries + 1` times and the dead-letter line
//!   was written (or its write failed, which is logged);
//! - at most [`CAPTURE`] bytes of stdout and of stderr are kept per
//!   attempt; the rest is read and discarded so the command never blocks
//!   on a full pipe.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::rule;
use crate::config::ActionConfig;
use crate::model::DomainEvent;
use crate::telemetry::Metrics;

/// Bytes of stdout and stderr kept per attempt.
pub const CAPTURE: usize = 4096;
/// The first retry waits this long; each next one twice as long.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// What one action needs to run, shared by its jobs.
pub struct Runner {
    pub cfg: ActionConfig,
    /// `command[0]` resolved at start.
    pub program: PathBuf,
    pub dead_letter: PathBuf,
    pub counters: Counters,
    /// Set when shutdown begins.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Runner {
    fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The action's metrics.
pub struct Counters {
    pub runs: Counter,
    pub failures: Counter,
    pub timeouts: Counter,
    pub dead_lettered: Counter,
}

impl Counters {
    pub fn new(metrics: &Metrics, action: &str) -> Counters {
        let l = Metrics::action(action);
        Counters {
            runs: metrics.action_runs.get_or_create(&l).clone(),
            failures: metrics.action_failures.get_or_create(&l).clone(),
            timeouts: metrics.action_timeouts.get_or_create(&l).clone(),
            dead_lettered: metrics.action_dead_lettered.get_or_create(&l).clone(),
        }
    }
}

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Spawn(String),
    Exit(String),
    Timeout(Duration),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Spawn(e) => write!(f, "cannot start the command: {e}"),
            Failure::Exit(s) => write!(f, "the command {s}"),
            Failure::Timeout(t) => write!(
                f,
                "timed out after {}; its process group was killed",
                humantime::format_duration(*t)
            ),
        }
    }
}

/// Kills the process group on drop unless disarmed.
struct GroupGuard(Option<i32>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(pgid) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `runner`'s command for `event` (its replay JSON `json`) until it
/// succeeds or the retries are used up; returns the number of attempts
/// and the last failure, if the event was dead-lettered.
pub async fn execute(
    runner: Arc<Runner>,
    event: &DomainEvent,
    json: &serde_json::Value,
) -> (u32, Option<Failure>) {
    let name = runner.cfg.name.as_str();
    let mut backoff = BACKOFF_FIRST;
    let mut attempts = 0;
    loop {
        if runner.stopping() {
            // Never settled: the driver drops this at its drain deadline
            // and the entry runs at the next start.
            std::future::pending::<()>().await;
        }
        attempts += 1;
        runner.counters.runs.inc();
        let failure = match attempt(&runner, event, json).await {
            Ok(()) => {
                tracing::debug!(action = name, event_id = %event.event_id, attempts, "action done");
                return (attempts, None);
            }
            Err(f) => f,
        };
        runner.counters.failures.inc();
        if runner.stopping() {
            // Likely killed by the stop itself (systemd signals the whole
            // unit): not the command's failure, never dead-lettered.
            tracing::warn!(action = name, event_id = %event.event_id, reason = %failure, "action interrupted by shutdown; runs again at the next start");
            std::future::pending::<()>().await;
        }
        if matches!(failure, Failure::Timeout(_)) {
            runner.counters.timeouts.inc();
        }
        if attempts > runner.cfg.retries {
            tracing::error!(
                action = name,
                event_id = %event.event_id,
                domain = %event.domain.name,
                attempts,
                reason = %failure,
                "action failed for good; written to the dead-letter file"
            );
            runner.counters.dead_lettered.inc();
            dead_letter(&runner, json, &failure, attempts).await;
            return (attempts, Some(failure));
        }
        tracing::warn!(
            action = name,
            event_id = %event.event_id,
            attempts,
            retry_in = ?backoff,
            reason = %failure,
            "action failed; retrying"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One run of the command.
async fn attempt(
    runner: &Runner,
    event: &DomainEvent,
    json: &serde_json::Value,
) -> Result<(), Failure> {
    let cfg = &runner.cfg;
    let mut cmd = Command::new(&runner.program);
    // The agent's own settings (overrides, secrets such as
    // VIRTSTREAM_NATS_PASSWORD) are not the command's business.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("VIRTSTREAM_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(cfg.command[1..].iter().map(|a| rule::substitute(a, event)))
        .envs(rule::environment(event))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| Failure::Spawn(e.to_string()))?;
    let mut group = GroupGuard(child.id().and_then(|p| i32::try_from(p).ok()));
    let stdin = child.stdin.take();
    let body = format!("{json}\n").into_bytes();
    let feed = tokio::spawn(async move {
        if let Some(mut s) = stdin {
            // A command that does not read its stdin is fine.
            let _ = s.write_all(&body).await;
        }
    });
    let out = child.stdout.take().map(|s| tokio::spawn(capture(s)));
    let err = child.stderr.take().map(|s| tokio::spawn(capture(s)));
    let status = tokio::time::timeout(cfg.timeout.0, child.wait()).await;
    let result = match status {
        Ok(Ok(status)) => {
            // Exited: what a successful command left running is its own
            // business; a failed one's leftovers must not overlap the retry.
            if status.success() {
                group.0 = None;
            } else {
                group.kill();
            }
            exit_result(status)
        }
        Ok(Err(e)) => Err(Failure::Spawn(e.to_string())),
        Err(_) => {
            group.kill();
            let _ = child.wait().await;
            Err(Failure::Timeout(cfg.timeout.0))
        }
    };
    feed.abort();
    // The output the command wrote; a background process that inherited
    // the pipes may keep them open, so do not wait for EOF long.
    let mut texts = Vec::new();
    for handle in [out, err].into_iter().flatten() {
        let abort = handle.abort_handle();
        match tokio::time::timeout(Duration::from_millis(200), handle).await {
            Ok(Ok(text)) => texts.push(text),
            _ => {
                abort.abort();
                texts.push(String::new());
            }
        }
    }
    let (stdout, stderr) = (
        texts.first().cloned().unwrap_or_default(),
        texts.get(1).cloned().unwrap_or_default(),
    );
    match &result {
        Ok(()) => tracing::debug!(
            action = %cfg.name,
            event_id = %event.event_id,
            stdout = %stdout,
            stderr = %stderr,
            "action command succeeded"
        ),
        Err(f) => tracing::warn!(
            action = %cfg.name,
            event_id = %event.event_id,
            reason = %f,
            stdout = %stdout,
            stderr = %stderr,
            "action command failed"
        ),
    }
    result
}

fn exit_result(status: ExitStatus) -> Result<(), Failure> {
    if status.success() {
        Ok(())
    } else {
        Err(Failure::Exit(status.to_string()))
    }
}

/// Reads `r` to its end, keeping the first [`CAPTURE`] bytes (lossy UTF-8).
async fn capture(mut r: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    let mut cut = false;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = CAPTURE - kept.len();
                kept.extend_from_slice(&buf[..n.min(room)]);
                cut |= n > room;
            }
        }
    }
    let mut s = String::from_utf8_lossy(&kept).trim_end().to_string();
    if cut {
        s.push_str(" […]");
    }
    s
}

/// Appends the dead-letter line (one `write` of one line, `O_APPEND`, so
/// lines of several actions never interleave).
async fn dead_letter(runner: &Runner, json: &serde_json::Value, failure: &Failure, attempts: u32) {
    let time = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let line = serde_json::json!({
        "action": runner.cfg.name,
        "reason": failure.to_string(),
        "attempts": attempts,
        "time": time,
        "event": json,
    });
    // Until it is written: the entry is acknowledged only after, so a
    // full or read-only disk stalls the action (its backlog shows) rather
    // than lose the event.
    let mut backoff = BACKOFF_FIRST;
    loop {
        let path = runner.dead_letter.clone();
        let text = format!("{line}\n");
        let r = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(text.as_bytes())?;
            f.sync_data()
        })
        .await;
        let error = match r {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(
            action = %runner.cfg.name,
            path = %runner.dead_letter.display(),
            error = %error,
            retry_in = ?backoff,
            "cannot write the dead-letter file; the event stays unacknowledged"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
