//! The processes under measurement: the agent (the release binary,
//! through the tests' `Agent` fixture) and the baseline bridge
//! (`benches/bridge/bridge.py`, pipelined or awaiting each publish), with
//! what /proc says about them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common;

/// CPU seconds (user + system, every thread, living or exited) of `pid`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e} (did the process die?)"));
    let close = stat.rfind(')').expect("stat has a command name");
    let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// CPU seconds by thread name (threads of one name summed) of `pid`'s
/// living threads.
pub fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut out: Vec<(String, f64)> = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let secs = (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / hz;
        match out.iter_mut().find(|(n, _)| n == name) {
            Some((_, s)) => *s += secs,
            None => out.push((name.to_string(), secs)),
        }
    }
    out
}

/// The threads that used the most CPU between two [`thread_cpu`] samples.
pub fn top_threads(before: &[(String, f64)], after: &[(String, f64)]) -> String {
    let mut d: Vec<(&str, f64)> = after
        .iter()
        .map(|(n, s)| {
            let b = before.iter().find(|(m, _)| m == n).map_or(0.0, |x| x.1);
            (n.as_str(), s - b)
        })
        .filter(|(_, s)| *s >= 0.01)
        .collect();
    d.sort_by(|a, b| b.1.total_cmp(&a.1));
    d.iter()
        .take(5)
        .map(|(n, s)| format!("{n} {s:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Peak resident set (VmHWM) of `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The system's load average over the last minute (the machine is shared).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

/// The Python of the venv `deploy/local-env.sh oracle` makes (with
/// libvirt-python, nats-py and confluent-kafka), or `BENCH_PYTHON`.
fn python() -> String {
    std::env::var("BENCH_PYTHON").unwrap_or_else(|_| {
        std::env::var("VIRTSTREAM_ORACLE_VENV").unwrap_or_else(|_| "/opt/virtstream-oracle".into())
            + "/bin/python3"
    })
}

/// The baseline bridge as a child process; its stdout lines are kept.
pub struct Bridge {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: tempfile::NamedTempFile,
}

impl Bridge {
    /// Starts the bridge on `uri` with the given sinks ((url, subject) and
    /// (bootstrap, topic)), publishing one event at a time if
    /// `await_each`, and waits for its "ready".
    pub fn start(
        uri: &str,
        nats: Option<(&str, &str)>,
        kafka: Option<(&str, &str)>,
        await_each: bool,
    ) -> Bridge {
        let script = common::workspace().join("benches/bridge/bridge.py");
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new(python());
        cmd.arg("-u").arg(&script).args(["--uri", uri]);
        if let Some((url, subject)) = nats {
            cmd.args(["--nats", url, "--subject", subject]);
        }
        if let Some((bootstrap, topic)) = kafka {
            cmd.args(["--kafka", bootstrap, "--topic", topic]);
        }
        if await_each {
            cmd.arg("--await-each");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}): `sudo deploy/local-env.sh oracle` makes the venv",
                    python()
                )
            });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let keep = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(l);
            }
        });
        let mut b = Bridge {
            child: Some(child),
            lines,
            stderr,
        };
        let end = Instant::now() + Duration::from_secs(30);
        while !b.lines.lock().unwrap().iter().any(|l| l == "ready") {
            if Instant::now() > end || b.exited() {
                panic!("the bridge did not get ready:\n{}", b.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Its stderr and the last stdout lines.
    pub fn log(&self) -> String {
        let lines = self.lines.lock().unwrap();
        let tail = lines[lines.len().saturating_sub(3)..].join("\n");
        format!(
            "--- bridge stderr ---\n{}--- bridge stdout (last lines) ---\n{tail}",
            std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
        )
    }

    /// SIGTERM, wait (at most 40 s); returns its "final acked …" line.
    pub fn stop(&mut self) -> String {
        let Some(mut c) = self.child.take() else {
            return String::new();
        };
        common::unsafe_kill(c.id(), libc::SIGTERM);
        let end = Instant::now() + Duration::from_secs(40);
        while !matches!(c.try_wait(), Ok(Some(_))) {
            if Instant::now() > end {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The reader thread may still be on the last line.
        std::thread::sleep(Duration::from_millis(50));
        self.lines
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|l| l.starts_with("final "))
            .cloned()
            .unwrap_or_else(|| format!("no final line\n{}", self.log()))
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The agent of one run: the tests' fixture (release binary, journal in
/// a temporary directory), logging at its production default; Kafka as
/// (bootstrap, events topic).
pub fn agent(uri: &str, nats: Option<&str>, kafka: Option<(&str, &str)>) -> common::Agent {
    let extra = kafka
        .map(|(b, topic)| format!("{}events_topic = \"{topic}\"\n", common::kafka_section(b)))
        .unwrap_or_default();
    let mut a = common::Agent::new(uri, nats, &extra);
    a.env.push(("VIRTSTREAM_LOG".into(), "info".into()));
    a.start();
    a
}

/// Where the tests' fixture finds the agent binary.
pub fn agent_binary() -> PathBuf {
    PathBuf::from(common::Agent::bin())
}

/// Waits until what `read` returns has not moved for 500 ms (read every
/// 100 ms, at most 60 s); returns it. `what` names it in the panic.
pub fn settle<T: PartialEq + std::fmt::Debug>(what: &str, mut read: impl FnMut() -> T) -> T {
    let end = Instant::now() + Duration::from_secs(60);
    let mut last = read();
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = read();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(500) {
            return last;
        }
        assert!(Instant::now() < end, "{what} did not settle: {last:?}");
    }
}
