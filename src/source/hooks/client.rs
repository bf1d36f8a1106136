//! The hook side: what `virtstream hook qemu GUEST OPERATION SUBOPERATION
//! EXTRA` does inside libvirtd's QEMU driver. Reads the domain XML from
//! stdin (at most [`MAX_XML`] bytes), takes the domain's UUID from it,
//! hands the call to the agent over its UNIX socket and waits briefly for
//! the agent's acknowledgement (the call is then on the agent's queue,
//! ahead of any event libvirt emits after the hook returns); when no agent
//! listens, appends the record to the spool.
//!
//! Invariants:
//! - never calls libvirt (libvirtd waits for the hook: a call back into it
//!   deadlocks) and never fails libvirt's operation: the outcome is always
//!   exit status 0, problems go to stderr;
//! - bounded in time: socket writes and the acknowledgement wait are cut
//!   at [`ACK_WAIT`]; a record the agent accepted but did not acknowledge
//!   in time is not spooled (it is in the socket and will be journaled, a
//!   spooled copy would be a duplicate);
//! - bounded in space: see the spool invariants in `hooks`.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{dropped_path, uuid_of_xml, HookError, HookPhase};

/// The most of the domain XML read from stdin (the UUID is near its top).
pub const MAX_XML: u64 = 1 << 20;

/// How long the hook waits for the agent's acknowledgement.
pub const ACK_WAIT: Duration = Duration::from_millis(30);

/// Where the hook sends or spools.
#[derive(Debug, Clone)]
pub struct HookTarget {
    pub socket: PathBuf,
    pub spool: PathBuf,
    pub spool_max_bytes: u64,
}

/// What became of one hook call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The agent queued it.
    Acknowledged,
    /// Sent, not acknowledged within `ACK_WAIT` (the agent reads it later).
    Unacknowledged,
    /// No agent listening: appended to the spool.
    Spooled,
    /// No agent and the spool is full (or unwritable): dropped, counted.
    Dropped,
    /// The XML held no domain UUID: nothing to forward.
    NoUuid,
}

/// Runs one hook call; `args` are GUEST OPERATION SUBOPERATION EXTRA.
pub fn run(target: &HookTarget, args: [&str; 4], stdin: impl Read, now: i64) -> Outcome {
    let mut xml = Vec::new();
    if let Err(e) = stdin.take(MAX_XML).read_to_end(&mut xml) {
        eprintln!("virtstream hook: reading the domain XML from stdin: {e}");
    }
    let Some(uuid) = uuid_of_xml(&xml) else {
        eprintln!(
            "virtstream hook: no <uuid> in the domain XML on stdin for guest {:?} ({} {}); not forwarded",
            args[0], args[1], args[2]
        );
        return Outcome::NoUuid;
    };
    let record = HookPhase::new(&uuid, args, now);
    let line = record.line();
    match send(&target.socket, &line) {
        Ok(true) => Outcome::Acknowledged,
        Ok(false) => {
            eprintln!(
                "virtstream hook: the agent at {} did not acknowledge within {ACK_WAIT:?}; it will read the call later",
                target.socket.display()
            );
            Outcome::Unacknowledged
        }
        Err(e) => match spool(&target.spool, target.spool_max_bytes, &line) {
            Ok(true) => Outcome::Spooled,
            Ok(false) => {
                eprintln!(
                    "virtstream hook: {e}; spool {} is full: call dropped and counted",
                    target.spool.display()
                );
                Outcome::Dropped
            }
            Err(se) => {
                eprintln!("virtstream hook: {e}; {se}: call dropped");
                count_drop(&target.spool);
                Outcome::Dropped
            }
        },
    }
}

/// Sends one record; `Ok(true)` once acknowledged, `Ok(false)` when
/// written but not acknowledged in time, `Err` when nothing was delivered.
fn send(socket: &Path, line: &[u8]) -> Result<bool, HookError> {
    let err = |source| HookError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(err)?;
    s.set_write_timeout(Some(ACK_WAIT)).map_err(err)?;
    s.set_read_timeout(Some(ACK_WAIT)).map_err(err)?;
    s.write_all(line).map_err(err)?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut ack = [0u8; 1];
    Ok(matches!(s.read(&mut ack), Ok(1)))
}

/// Appends one record to the spool in a single write; `Ok(false)` (and
/// counted) when it does not fit the bound.
pub fn spool(path: &Path, max_bytes: u64, line: &[u8]) -> Result<bool, HookError> {
    let err = |source| HookError::Spool {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f = open_own_file(path).map_err(err)?;
    let meta = f.metadata().map_err(err)?;
    give_to_dir_owner(path, &f, &meta);
    let len = meta.len();
    if len + line.len() as u64 > max_bytes {
        count_drop(path);
        return Ok(false);
    }
    f.write_all(line).map_err(err)?;
    Ok(true)
}

/// Opens (or creates, 0600) a file the hook appends to, refusing anything
/// but a plain file of its own: the hook runs as root in a directory the
/// agent's user owns, and a symlink or hard link placed there must not
/// make root append to (and hand over) another file such as
/// `/etc/shadow`.
fn open_own_file(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    use std::os::unix::fs::MetadataExt;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(std::io::Error::other(
            "not a plain file with one link (refused: the hook runs as root)",
        ));
    }
    Ok(f)
}

/// The hook runs as root, the agent usually as the owner of the spool's
/// directory (the unit's `StateDirectory`): a spool the hook created is
/// handed to that owner, so the agent can read it.
fn give_to_dir_owner(path: &Path, f: &std::fs::File, meta: &std::fs::Metadata) {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = path.parent().and_then(|d| std::fs::metadata(d).ok()) else {
        return;
    };
    if (meta.uid(), meta.gid()) != (dir.uid(), dir.gid()) {
        if let Err(e) = std::os::unix::fs::fchown(f, Some(dir.uid()), Some(dir.gid())) {
            eprintln!(
                "virtstream hook: giving {} to the owner of its directory: {e}",
                path.display()
            );
        }
    }
}

/// Counts one dropped record: one byte appended to `<spool>.dropped`
/// (itself bounded: it stops growing at the spool bound's 1 MiB default).
fn count_drop(spool: &Path) {
    let p = dropped_path(spool);
    let res = open_own_file(&p).and_then(|mut f| {
        if f.metadata()?.len() < super::listen::MAX_DROP_COUNT {
            f.write_all(b"x")?;
        }
        Ok(())
    });
    if let Err(e) = res {
        eprintln!(
            "virtstream hook: counting a dropped call in {}: {e}",
            p.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &[u8] =
        b"<domain><name>vm</name><uuid>b9906489-6d5b-40f8-a742-ca71b2b84277</uuid></domain>";

    #[test]
    fn without_an_agent_calls_are_spooled_up_to_the_bound_then_counted() {
        let dir = tempfile::tempdir().unwrap();
        let target = HookTarget {
            socket: dir.path().join("none.sock"),
            spool: dir.path().join("sub/hooks.spool"),
            spool_max_bytes: 4096,
        };
        let args = ["vm", "prepare", "begin", "-"];
        let mut spooled = 0;
        let mut dropped = 0;
        for i in 0..100 {
            match run(&target, args, XML, i) {
                Outcome::Spooled => spooled += 1,
                Outcome::Dropped => dropped += 1,
                o => panic!("{o:?}"),
            }
        }
        assert!(spooled > 10 && dropped > 10, "{spooled} {dropped}");
        let text = std::fs::read(&target.spool).unwrap();
        assert!(text.len() <= 4096);
        assert_eq!(
            text.split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count(),
            spooled
        );
        let count = std::fs::metadata(dropped_path(&target.spool))
            .unwrap()
            .len();
        assert_eq!(count, dropped as u64);
        assert_eq!(run(&target, args, &b"<domain/>"[..], 1), Outcome::NoUuid);
    }

    #[test]
    fn a_spool_the_hook_creates_belongs_to_its_directorys_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        // As root (the hook's case), hand the directory to another user.
        if std::os::unix::fs::chown(&state, Some(4242), Some(4243)).is_err() {
            eprintln!("not root: ownership not checked");
            return;
        }
        let spool_path = state.join("hooks.spool");
        assert!(spool(&spool_path, 4096, b"{}\n").unwrap());
        let m = std::fs::metadata(&spool_path).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (4242, 4243, 0o600));
    }

    #[test]
    fn a_link_or_fifo_in_place_of_the_spool_is_refused_untouched() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        // Another file the agent's user must not get root to append to
        // or hand over (as /etc/shadow would be).
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"root only\n").unwrap();
        let before = std::fs::metadata(&secret).unwrap();
        let sym = dir.path().join("sym.spool");
        std::os::unix::fs::symlink(&secret, &sym).unwrap();
        let hard = dir.path().join("hard.spool");
        std::fs::hard_link(&secret, &hard).unwrap();
        let fifo = dir.path().join("fifo.spool");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        for p in [&sym, &hard, &fifo] {
            let e = spool(p, 4096, b"{}\n").unwrap_err().to_string();
            assert!(e.contains(&p.display().to_string()), "{e}");
            // The drop counter refuses links the same way.
            let counter = dropped_path(p);
            std::os::unix::fs::symlink(&secret, &counter).unwrap();
            count_drop(p);
            std::fs::remove_file(&counter).unwrap();
        }
        let after = std::fs::metadata(&secret).unwrap();
        assert_eq!(std::fs::read(&secret).unwrap(), b"root only\n");
        assert_eq!(
            (after.uid(), after.gid(), after.len()),
            (before.uid(), before.gid(), before.len())
        );
    }
}
