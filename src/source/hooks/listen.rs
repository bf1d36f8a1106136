//! The agent side: a thread that accepts the hook's connections on the
//! `[hooks] socket`, puts each call on the source's queue as an
//! `Item::Hook` and then acknowledges it, so the call is queued before the
//! hook returns to libvirt and so before any event libvirt emits after it
//! (the tracker gives them `seq` in that order). At start, what the spool
//! holds is queued first.
//!
//! Invariants:
//! - never blocks the libvirt event loop or an async thread: it is a
//!   thread of its own, and waits on the queue (bounded) like the source
//!   does, never dropping a call it read;
//! - a connection sends at most [`MAX_RECORD`] bytes and gets at most
//!   [`READ_WAIT`]; a bad record is logged and refused (no acknowledgement),
//!   never fatal;
//! - a spool is removed only once every record it held is on the queue;
//!   records a crash left in `<spool>.draining` are queued at the next
//!   start (at least once);
//! - stopping: `stop` is set, [`wake`] unblocks `accept`, the thread
//!   returns and drops its queue sender, and removes its socket file.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use super::{dropped_path, HookError, MAX_RECORD};
use crate::source::{HookPhase, Item};

/// How long one connection may take to send its record.
pub const READ_WAIT: Duration = Duration::from_millis(200);

/// The largest drop count `<spool>.dropped` holds (one byte per drop).
pub const MAX_DROP_COUNT: u64 = 1 << 20;

/// The bound listening socket.
pub struct HookListener {
    listener: UnixListener,
    socket: PathBuf,
    spool: PathBuf,
}

/// What the spool held at start.
#[derive(Debug, Default)]
pub struct Spooled {
    pub calls: Vec<HookPhase>,
    /// Calls the hook dropped on a full spool since it was last drained.
    pub dropped: u64,
    /// Lines that did not parse.
    pub bad: u64,
}

impl HookListener {
    /// Binds `socket` (its directory created, a stale socket file
    /// replaced, mode 0600).
    pub fn bind(socket: &Path, spool: &Path) -> Result<HookListener, HookError> {
        let err = |source| HookError::Socket {
            path: socket.to_path_buf(),
            source,
        };
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(socket).map_err(err)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        Ok(HookListener {
            listener,
            socket: socket.to_path_buf(),
            spool: spool.to_path_buf(),
        })
    }

    fn draining(&self) -> PathBuf {
        let mut p = self.spool.as_os_str().to_owned();
        p.push(".draining");
        PathBuf::from(p)
    }

    /// Takes what the spool holds (and what a crash left being drained);
    /// the file stays as `<spool>.draining` until [`Self::run`] has queued
    /// it all.
    pub fn take_spool(&self) -> Result<Spooled, HookError> {
        let draining = self.draining();
        let err = |source| HookError::Spool {
            path: self.spool.clone(),
            source,
        };
        let mut out = Spooled::default();
        let read = |path: &Path, out: &mut Spooled| -> Result<(), HookError> {
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(err(e)),
            };
            for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                match HookPhase::parse(line) {
                    Ok(r) => out.calls.push(r),
                    Err(e) => {
                        out.bad += 1;
                        tracing::warn!(spool = %path.display(), error = %e, "unreadable hook record in the spool; skipped");
                    }
                }
            }
            Ok(())
        };
        read(&draining, &mut out)?;
        match std::fs::rename(&self.spool, &draining) {
            Ok(()) => read(&draining, &mut out)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let dropped = dropped_path(&self.spool);
        if let Ok(m) = std::fs::metadata(&dropped) {
            out.dropped = m.len();
            let _ = std::fs::remove_file(&dropped);
        }
        Ok(out)
    }

    /// Queues `backlog` (the spool's calls, in order), then serves
    /// connections until `stop` is set and [`wake`] called, or the queue's
    /// receiver is gone.
    pub fn run(self, items: SyncSender<Item>, backlog: Vec<HookPhase>, stop: Arc<AtomicBool>) {
        let n = backlog.len();
        for call in backlog {
            if items.send(Item::Hook(Box::new(call))).is_err() {
                return;
            }
        }
        if n > 0 {
            tracing::info!(
                calls = n,
                "queued the hook calls spooled while the agent was down"
            );
        }
        let _ = std::fs::remove_file(self.draining());
        for conn in self.listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(socket = %self.socket.display(), error = %e, "accepting a hook connection failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let record = match read_record(&mut conn) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(socket = %self.socket.display(), error = %e, "hook call refused");
                    continue;
                }
            };
            if items.send(Item::Hook(Box::new(record))).is_err() {
                break;
            }
            // The hook may have given up waiting: nothing to do about it.
            let _ = conn.write_all(b"k");
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One record from a connection, within the time and size bounds.
fn read_record(conn: &mut UnixStream) -> Result<HookPhase, HookError> {
    let io = |e| HookError::Record(format!("reading: {e}"));
    conn.set_read_timeout(Some(READ_WAIT)).map_err(io)?;
    let mut buf = Vec::with_capacity(512);
    (&mut *conn)
        .take(MAX_RECORD as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(io)?;
    HookPhase::parse(buf.trim_ascii_end())
}

/// Unblocks a listener's `accept` (after `stop` is set).
pub fn wake(socket: &Path) {
    let _ = UnixStream::connect(socket);
}

#[cfg(test)]
mod tests {
    use super::super::client::{self, HookTarget, Outcome};
    use super::*;

    const XML: &[u8] =
        b"<domain><name>vm</name><uuid>b9906489-6d5b-40f8-a742-ca71b2b84277</uuid></domain>";

    #[test]
    fn calls_are_queued_before_the_hook_returns_and_the_spool_first() {
        let dir = tempfile::tempdir().unwrap();
        let target = HookTarget {
            socket: dir.path().join("run/hooks.sock"),
            spool: dir.path().join("hooks.spool"),
            spool_max_bytes: 1 << 20,
        };
        // Agent down: spooled.
        let r = client::run(&target, ["vm", "prepare", "begin", "-"], XML, 1);
        assert_eq!(r, Outcome::Spooled);
        let l = HookListener::bind(&target.socket, &target.spool).unwrap();
        let spooled = l.take_spool().unwrap();
        assert_eq!(spooled.calls.len(), 1);
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let stop = stop.clone();
            std::thread::spawn(move || l.run(tx, spooled.calls, stop))
        };
        let r = client::run(&target, ["vm", "start", "begin", "-"], XML, 2);
        assert_eq!(r, Outcome::Acknowledged);
        // Acknowledged means queued: both are there now, spool first.
        let ops: Vec<String> = rx
            .try_iter()
            .map(|i| match i {
                Item::Hook(h) => h.operation,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ops, ["prepare", "start"]);
        assert!(!target.spool.exists());
        // A bad record is refused, not fatal.
        let mut s = UnixStream::connect(&target.socket).unwrap();
        s.write_all(b"garbage\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut ack = Vec::new();
        s.read_to_end(&mut ack).unwrap();
        assert!(ack.is_empty());
        stop.store(true, Ordering::Relaxed);
        wake(&target.socket);
        t.join().unwrap();
        assert!(!target.socket.exists());
        // Down again: spooled, not lost.
        let r = client::run(&target, ["vm", "stopped", "end", "-"], XML, 3);
        assert_eq!(r, Outcome::Spooled);
    }
}
