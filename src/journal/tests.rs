//! The journal's unit tests, on a real file in a temporary directory:
//! permissions, what survives a reopen (entries, counters, domains, sink
//! cursors and state), trimming behind every sink, another host's journal,
//! corrupt entries, epoch rotation and idle cursor durability.

use super::*;

fn open(dir: &Path, sinks: &[&str]) -> (Journal, std::thread::JoinHandle<()>, Recovered) {
    let (j, w, r) = Journal::open(OpenOptions {
        dir,
        host_id: Some("h"),
        default_host_id: &|| "unused".into(),
        sinks: sinks.iter().map(|s| s.to_string()).collect(),
        group_commit_max: 64,
        queue: 128,
        when_full: WhenFull::RejectNew,
    })
    .unwrap();
    (j, std::thread::spawn(move || w.run()), r)
}

fn entry(n: u64) -> Entry {
    Entry {
        host_seq: n,
        kind: Kind::DomainEvent,
        key: "b9906489-6d5b-40f8-a742-ca71b2b84277".into(),
        observed_at: n as i64,
        payload: vec![n as u8; 10],
    }
}

#[test]
fn journal_file_is_0600_and_a_new_dir_0700() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("state/journal");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    {
        let (j, t, _) = open(&dir, &["nats"]);
        j.append(entry(1), None).unwrap();
        j.sync().unwrap();
        drop(j);
        t.join().unwrap();
    }
    assert_eq!(mode(&dir), 0o700, "journal dir");
    assert_eq!(mode(&dir.join(FILE_NAME)), 0o600, "journal file");
    // A journal left more open by an older build is closed on open.
    std::fs::set_permissions(dir.join(FILE_NAME), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (j, t, r) = open(&dir, &["nats"]);
    assert!(!r.fresh, "the journal is reopened, not re-created");
    assert_eq!(
        mode(&dir.join(FILE_NAME)),
        0o600,
        "journal file after reopen"
    );
    drop(j);
    t.join().unwrap();
}

#[test]
fn entries_counters_and_domains_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let epoch;
    {
        let (j, t, r) = open(dir.path(), &["nats"]);
        assert!(r.fresh);
        assert_eq!(r.host_seq, 0);
        epoch = r.epoch.clone();
        for n in 1..=5 {
            j.append(entry(n), Some(("d1".into(), vec![n as u8])))
                .unwrap();
        }
        j.sync().unwrap();
        assert_eq!(*j.committed().borrow(), 5);
        drop(j);
        t.join().unwrap();
    }
    let (j, t, r) = open(dir.path(), &["nats"]);
    assert!(!r.fresh);
    assert_eq!(r.epoch, epoch);
    assert_eq!(r.host_seq, 5);
    assert_eq!(r.domains.get("d1"), Some(&vec![5u8]));
    assert_eq!(r.backlog_entries, 5);
    let got = j.read_after(2, 10).unwrap();
    assert_eq!(got, vec![entry(3), entry(4), entry(5)]);
    drop(j);
    t.join().unwrap();
}

#[test]
fn trims_only_behind_every_sink() {
    let dir = tempfile::tempdir().unwrap();
    let (j, t, _) = open(dir.path(), &["a", "b"]);
    for n in 1..=10 {
        j.append(entry(n), None).unwrap();
    }
    j.ack("a", 8).unwrap();
    j.sync().unwrap();
    assert_eq!(j.read_after(0, 100).unwrap().len(), 10, "b acked nothing");
    j.ack("b", 4).unwrap();
    j.ack("a", 3).unwrap(); // never moves back
    j.sync().unwrap();
    assert_eq!(j.cursor("a").unwrap(), 8);
    let left: Vec<u64> = j
        .read_after(0, 100)
        .unwrap()
        .iter()
        .map(|e| e.host_seq)
        .collect();
    assert_eq!(left, (5..=10).collect::<Vec<_>>());
    assert_eq!(j.backlog_entries(), 6);
    assert_eq!(
        j.cursor("new-sink").unwrap(),
        4,
        "a new sink starts at the oldest retained entry"
    );
    drop(j);
    t.join().unwrap();
}

#[test]
fn sink_state_is_written_with_the_cursor_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (j, t, _) = open(dir.path(), &["kafka"]);
        for n in 1..=3 {
            j.append(entry(n), None).unwrap();
        }
        assert_eq!(j.sink_state("kafka").unwrap(), None);
        j.ack_with_state("kafka", 2, b"offsets-a".to_vec()).unwrap();
        j.sync().unwrap();
        assert_eq!(j.cursor("kafka").unwrap(), 2);
        // State may change while the cursor stays.
        j.ack_with_state("kafka", 2, b"offsets-b".to_vec()).unwrap();
        j.sync().unwrap();
        drop(j);
        t.join().unwrap();
    }
    let (j, t, _) = open(dir.path(), &["kafka"]);
    assert_eq!(j.cursor("kafka").unwrap(), 2);
    assert_eq!(
        j.sink_state("kafka").unwrap().as_deref(),
        Some(&b"offsets-b"[..])
    );
    assert_eq!(j.sink_state("nats").unwrap(), None);
    drop(j);
    t.join().unwrap();
}

#[test]
fn a_cursor_behind_the_trimmed_point_reads_as_that_point() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (j, t, _) = open(dir.path(), &["a", "b"]);
        for n in 1..=10 {
            j.append(entry(n), None).unwrap();
        }
        j.ack("b", 3).unwrap();
        j.sync().unwrap();
        drop(j);
        t.join().unwrap();
    }
    // "b" is not configured for a while: the journal trims behind "a".
    let (j, t, _) = open(dir.path(), &["a"]);
    j.ack("a", 8).unwrap();
    j.sync().unwrap();
    assert_eq!(j.read_after(0, 100).unwrap().len(), 2);
    assert_eq!(
        j.cursor("b").unwrap(),
        8,
        "b resumes at the oldest retained entry, not at a trimmed one"
    );
    drop(j);
    t.join().unwrap();
}

#[test]
fn refuses_another_hosts_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (j, t, _) = open(dir.path(), &[]);
    drop(j);
    t.join().unwrap();
    let err = Journal::open(OpenOptions {
        dir: dir.path(),
        host_id: Some("other"),
        default_host_id: &|| "x".into(),
        sinks: vec![],
        group_commit_max: 1,
        queue: 1,
        when_full: WhenFull::RejectNew,
    })
    .err()
    .unwrap();
    assert!(matches!(err, JournalError::HostMismatch { .. }), "{err}");
}

#[test]
fn corrupt_entry_bytes_are_an_error() {
    assert!(Entry::decode(1, &[9, 9]).is_err());
    let mut b = entry(1).encode();
    b[1] = 77;
    assert!(Entry::decode(1, &b).is_err());
    assert_eq!(Entry::decode(1, &entry(1).encode()).unwrap(), entry(1));
}

#[test]
fn rotating_the_epoch_starts_over_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let old;
    {
        let (j, w, r) = Journal::open(OpenOptions {
            dir: dir.path(),
            host_id: Some("h"),
            default_host_id: &|| "unused".into(),
            sinks: vec!["kafka".into()],
            group_commit_max: 64,
            queue: 128,
            when_full: WhenFull::RejectNew,
        })
        .unwrap();
        old = r.epoch.clone();
        let t = std::thread::spawn(move || w.run());
        for n in 1..=5 {
            j.append(entry(n), Some(("d1".into(), vec![n as u8])))
                .unwrap();
        }
        j.ack_with_state("kafka", 2, b"offsets".to_vec()).unwrap();
        j.sync().unwrap();
        drop(j);
        t.join().unwrap();
    }
    let (j, mut w, mut r) = Journal::open(OpenOptions {
        dir: dir.path(),
        host_id: Some("h"),
        default_host_id: &|| "unused".into(),
        sinks: vec!["kafka".into()],
        group_commit_max: 64,
        queue: 128,
        when_full: WhenFull::RejectNew,
    })
    .unwrap();
    assert_eq!((r.epoch.as_str(), r.host_seq), (old.as_str(), 5));
    assert_eq!(w.rotate_epoch(&mut r).unwrap(), old);
    assert_ne!(r.epoch, old);
    assert_eq!((r.host_seq, r.backlog_entries), (0, 0));
    assert!(r.domains.is_empty());
    assert_eq!(*j.committed().borrow(), 0);
    assert_eq!(j.backlog_entries(), 0);
    assert_eq!(j.cursor_and_state("kafka").unwrap(), (0, None));
    assert!(j.read_after(0, 10).unwrap().is_empty());
    let t = std::thread::spawn(move || w.run());
    j.append(entry(1), None).unwrap();
    j.sync().unwrap();
    let new_epoch = r.epoch.clone();
    drop(j);
    t.join().unwrap();
    let (j, t, r) = open(dir.path(), &["kafka"]);
    assert_eq!(r.epoch, new_epoch);
    assert_eq!(r.host_seq, 1);
    assert!(r.domains.is_empty());
    assert_eq!(j.read_after(0, 10).unwrap(), vec![entry(1)]);
    drop(j);
    t.join().unwrap();
}

#[test]
fn cursors_committed_without_fsync_are_made_durable_once_idle() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    {
        let (j, t, _) = open(dir.path(), &["nats"]);
        for n in 1..=5 {
            j.append(entry(n), None).unwrap();
        }
        j.sync().unwrap();
        // A batch of cursor updates alone: committed without fsync.
        j.ack("nats", 4).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while j.cursor("nats").unwrap() < 4 {
            assert!(Instant::now() < deadline, "cursor not committed");
            std::thread::sleep(Duration::from_millis(5));
        }
        let before = j.commits();
        // Idle: one durable commit follows (a crash from then on keeps
        // the cursor), and only one.
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(j.commits(), before + 1, "one sync commit once idle");
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(j.commits(), before + 1, "nothing more while idle");
        drop(j);
        t.join().unwrap();
    }
    let (j, t, r) = open(dir.path(), &["nats"]);
    assert_eq!(j.cursor("nats").unwrap(), 4, "the cursor survived");
    assert_eq!(r.backlog_entries, 1, "entries behind it trimmed");
    drop(j);
    t.join().unwrap();
}
