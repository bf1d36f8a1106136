//! The load and libvirt's own view of it: persistent test-driver domains
//! started on the private libvirtd, one interactive `virsh` per session
//! fed `suspend`/`resume` lines (one lifecycle event each), and a plain
//! `virsh event --loop --all --timestamp` client as the reference for
//! what libvirtd delivered and how fast.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common;

/// Defines and starts `per_session` persistent domains for each session;
/// returns their names, session by session. The caller keeps `conn` open
/// for the run: the test driver forgets its domains when its last
/// connection closes, and the host's own keeper may not be connected yet.
pub fn define(
    conn: &virt::connect::Connect,
    sessions: usize,
    per_session: usize,
) -> Vec<Vec<String>> {
    (0..sessions)
        .map(|s| {
            (0..per_session)
                .map(|i| {
                    let name = format!("bench-s{s}-d{i}");
                    let d = conn
                        .define_domain_xml(&common::test_domain_xml(&name, &common::new_uuid()))
                        .unwrap();
                    d.create().unwrap();
                    name
                })
                .collect()
        })
        .collect()
}

/// A plain `virsh event` client: the receive times (virsh's own
/// timestamps, ms) of the SUSPENDED/RESUMED events it printed.
pub struct Reference {
    child: Child,
    times_ms: Arc<Mutex<Vec<i64>>>,
}

/// `2026-11-22 02:45:38.454+0000: event 'lifecycle' for domain 'x': Suspended Paused`
fn parse(line: &str) -> Option<i64> {
    let (stamp, rest) = line.split_once(": event 'lifecycle' for domain '")?;
    let kind = rest.rsplit_once("': ")?.1;
    if !(kind.starts_with("Suspended ") || kind.starts_with("Resumed ")) {
        return None;
    }
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
    );
    // Local time and its offset: only differences matter here.
    let t = time::PrimitiveDateTime::parse(stamp.get(..23)?, &fmt).ok()?;
    Some((t.assume_utc().unix_timestamp_nanos() / 1_000_000) as i64)
}

impl Reference {
    /// Starts the client and waits until it reports a sentinel domain's
    /// events (so it saw everything after).
    pub fn start(uri: &str) -> Reference {
        let mut child = Command::new("virsh")
            .args(["-c", uri, "event", "--all", "--loop", "--timestamp"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("virsh (libvirt-clients) must be installed");
        let times_ms = Arc::new(Mutex::new(Vec::new()));
        let seen_sentinel = Arc::new(Mutex::new(false));
        let out = child.stdout.take().unwrap();
        let (times, seen) = (times_ms.clone(), seen_sentinel.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(t) = parse(&line) {
                    times.lock().unwrap().push(t);
                } else if line.contains("'bench-sentinel'") {
                    *seen.lock().unwrap() = true;
                }
            }
        });
        let conn = virt::connect::Connect::open(Some(uri)).unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        while !*seen_sentinel.lock().unwrap() {
            assert!(
                Instant::now() < end,
                "virsh event reported nothing within 20 s"
            );
            let d = conn
                .define_domain_xml(&common::test_domain_xml(
                    "bench-sentinel",
                    &common::new_uuid(),
                ))
                .unwrap();
            d.undefine().unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        Reference { child, times_ms }
    }

    pub fn count(&self) -> usize {
        self.times_ms.lock().unwrap().len()
    }

    /// Waits until it printed `n` load events (at most `timeout`); then
    /// returns libvirtd's delivery rate, events/s from the first to the
    /// last, or None when fewer arrived.
    pub fn rate(&self, n: usize, timeout: Duration) -> Option<f64> {
        let end = Instant::now() + timeout;
        while self.count() < n {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let t = self.times_ms.lock().unwrap();
        let span = (t[t.len() - 1] - t[0]).max(1) as f64 / 1000.0;
        Some((t.len() - 1) as f64 / span)
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the load: one `virsh -c URI` process per session reading
/// `suspend NAME` / `resume NAME` lines, round-robin over its domains,
/// `total` commands split evenly. Returns when every session exited;
/// their stderr goes to `dir` and the number of `error:` lines is
/// returned (a failed command yields no event).
pub fn run(uri: &str, domains: &[Vec<String>], total: u64, dir: &Path) -> usize {
    let sessions = domains.len() as u64;
    let mut running = Vec::new();
    for (i, names) in domains.iter().enumerate() {
        let n = total / sessions + u64::from((i as u64) < total % sessions);
        let err = dir.join(format!("session-{i}.err"));
        let mut child = Command::new("virsh")
            .args(["-q", "-c", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("virsh (libvirt-clients) must be installed");
        let stdin = child.stdin.take().unwrap();
        let names = names.clone();
        let writer = std::thread::spawn(move || {
            let mut w = BufWriter::new(stdin);
            let k = names.len() as u64;
            for c in 0..n {
                let op = if (c / k) % 2 == 0 {
                    "suspend"
                } else {
                    "resume"
                };
                // A session that died is reported by the event count.
                let _ = writeln!(w, "{op} {}", names[(c % k) as usize]);
            }
            let _ = writeln!(w, "quit");
        });
        running.push((child, writer, err));
    }
    let mut errors = 0;
    for (mut child, writer, err) in running {
        let _ = writer.join();
        let _ = child.wait();
        errors += std::fs::read_to_string(err)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count();
    }
    errors
}
