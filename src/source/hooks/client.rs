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
    let mut f = open_own_file(path).map_err(err)?;
    let len = f.metadata().map_err(err)?.len();
    if len + line.len() as u64 > max_bytes {
        count_drop(path);
        return Ok(false);
    }
    f.write_all(line).map_err(err)?;
    Ok(true)
}

/// Opens a file the hook appends to (the spool, its drop counter) without
/// letting whoever owns its directory redirect root. The hook runs as
/// root; the directory usually belongs to the agent's user, who could
/// place a symlink, a hard link to a root file or a FIFO there, or swap
/// the directory itself for a symlink. So:
/// - the directory is opened without following a symlink (a missing one
///   is created first, root's), and the file relative to that descriptor,
///   also without following one;
/// - a new file is created exclusively (0600) and only then handed to the
///   directory's owner, so the agent can read it;
/// - an existing file is used only if it is a plain file with one link
///   owned by the directory's owner, and is never chowned.
fn open_own_file(path: &Path) -> std::io::Result<std::fs::File> {
    use rustix::fs::{fstat, open, openat, FileType, Mode, OFlags};
    use std::os::unix::fs::fchown;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?;
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
    }
    let dfd = open(
        dir,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let owner = fstat(&dfd)?;
    let flags =
        OFlags::WRONLY | OFlags::APPEND | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    match openat(
        &dfd,
        name,
        flags | OFlags::CREATE | OFlags::EXCL,
        Mode::RUSR | Mode::WUSR,
    ) {
        Ok(fd) => {
            let f = std::fs::File::from(fd);
            if let Err(e) = fchown(&f, Some(owner.st_uid), Some(owner.st_gid)) {
                eprintln!(
                    "virtstream hook: giving {} to the owner of its directory: {e}",
                    path.display()
                );
            }
            Ok(f)
        }
        Err(rustix::io::Errno::EXIST) => {
            let fd = openat(&dfd, name, flags, Mode::empty())?;
            let st = fstat(&fd)?;
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
                || st.st_nlink != 1
                || st.st_uid != owner.st_uid
            {
                return Err(std::io::Error::other(
                    "not a plain file with one link owned by its directory's owner \
                     (refused: the hook runs as root)",
                ));
            }
            Ok(std::fs::File::from(fd))
        }
        Err(e) => Err(e.into()),
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
    fn links_fifos_and_foreign_files_in_place_of_the_spool_are_refused_untouched() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        // The spool directory belongs to the agent's user (4242 here); the
        // hook runs as root. Skipped where the test cannot chown.
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        if std::os::unix::fs::chown(&state, Some(4242), Some(4243)).is_err() {
            eprintln!("not root: not checked");
            return;
        }
        // Root's files the agent's user must not get root to append to or
        // hand over (as /etc/shadow would be), one per case so each has a
        // single link of its own.
        let secret = |n: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, b"root only\n").unwrap();
            p
        };
        let (s1, s2, s3) = (secret("s1"), secret("s2"), secret("s3"));
        let sym = state.join("sym.spool");
        std::os::unix::fs::symlink(&s1, &sym).unwrap();
        // A hard link whose original was since replaced: one link left.
        let hard = state.join("hard.spool");
        std::fs::hard_link(&s2, &hard).unwrap();
        std::fs::remove_file(&s2).unwrap();
        assert_eq!(std::fs::metadata(&hard).unwrap().nlink(), 1);
        let fifo = state.join("fifo.spool");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        // The directory itself swapped for a symlink to root's directory.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let swapped = state.join("spooldir");
        std::os::unix::fs::symlink(&elsewhere, &swapped).unwrap();
        let via_dir = swapped.join("hooks.spool");
        for p in [&sym, &hard, &fifo, &via_dir] {
            let e = spool(p, 4096, b"{}\n").unwrap_err().to_string();
            assert!(e.contains(&p.display().to_string()), "{e}");
            // The drop counter is opened the same way.
            let counter = dropped_path(p);
            if p != &via_dir {
                std::os::unix::fs::symlink(&s3, &counter).unwrap();
            }
            count_drop(p);
            let _ = std::fs::remove_file(&counter);
        }
        assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
        for s in [&s1, &hard, &s3] {
            let m = std::fs::metadata(s).unwrap();
            assert_eq!(std::fs::read(s).unwrap(), b"root only\n", "{}", s.display());
            assert_eq!((m.uid(), m.gid()), (0, 0), "{}", s.display());
        }
        // A plain file of the directory's owner is used, and not chowned.
        let own = state.join("hooks.spool");
        assert!(spool(&own, 4096, b"{}\n").unwrap());
        assert!(spool(&own, 4096, b"{}\n").unwrap());
        let m = std::fs::metadata(&own).unwrap();
        assert_eq!((m.uid(), m.gid(), m.len()), (4242, 4243, 6));
    }
}
