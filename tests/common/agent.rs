//! The agent binary as a child process with its own config, journal
//! directory and metrics port; killed on drop (its log is printed when the
//! test panicked).
//!
//! Invariants:
//! - each agent has a unique host id, and its snapshot-record taps are
//!   registered before it starts;
//! - the journal is only opened by the test once the agent has stopped.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::nats::fetch;
use super::records::{assert_contiguous, snapshot_seqs, tap_kafka, tap_nats, Stored};
use super::{free_port, unique, unsafe_kill};

pub struct Agent {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub metrics_port: u16,
    pub host_id: String,
    /// Extra environment for the agent process (e.g. secrets).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    runs: u32,
}

impl Agent {
    /// Writes a config for `uri` and `nats_url` (extra TOML appended).
    pub fn new(uri: &str, nats_url: Option<&str>, extra: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let metrics_port = free_port();
        let host_id = unique("host");
        let mut toml = format!(
            "[host]\nid = \"{host_id}\"\nshutdown_timeout = \"5s\"\n\
             [libvirt]\nuri = \"{uri}\"\nreconnect_backoff_min = \"200ms\"\nreconnect_backoff_max = \"2s\"\n\
             [journal]\npath = \"{}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            dir.path().join("journal").display()
        );
        if let Some(u) = nats_url {
            toml.push_str(&format!("[nats]\nurl = \"{u}\"\n"));
            tap_nats(u, &host_id);
        }
        if let Some(b) = extra
            .split_once("[kafka]")
            .and_then(|(_, k)| k.split_once("brokers = [\""))
            .and_then(|(_, b)| b.split_once('"'))
            .map(|(b, _)| b)
        {
            tap_kafka(b, &host_id);
        }
        toml.push_str(extra);
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, toml).unwrap();
        Agent {
            dir,
            config,
            metrics_port,
            host_id,
            env: Vec::new(),
            child: None,
            runs: 0,
        }
    }

    /// A new agent, started and ready.
    pub fn ready(uri: &str, nats_url: Option<&str>, extra: &str) -> Agent {
        let mut a = Agent::new(uri, nats_url, extra);
        a.start();
        a.wait_ready(Duration::from_secs(30));
        a
    }

    pub fn bin() -> &'static str {
        env!("CARGO_BIN_EXE_virtstream")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("agent-{}.log", self.runs))
    }

    pub fn start(&mut self) {
        self.runs += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(Self::bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("VIRTSTREAM_LOG", "virtstream=debug,info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// The sum of every `/metrics` series whose line starts with `name`
    /// (a label set may be part of it).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, m) = self.http("/metrics").unwrap();
        m.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum()
    }

    pub fn http(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let code = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default();
        Some((code, body))
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            if let Some((200, _)) = self.http("/readyz") {
                return;
            }
            if Instant::now() > end {
                panic!(
                    "agent not ready within {timeout:?}: {:?}\n--- agent log ---\n{}",
                    self.http("/readyz"),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The exit code if the agent has exited (None while running).
    pub fn try_exit(&mut self) -> Option<Option<i32>> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => {
                self.child = None;
                Some(st.code())
            }
            _ => None,
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe_kill(c.id(), libc::SIGTERM);
        c.wait().ok()?.code()
    }

    /// Subject filter for this agent's events.
    pub fn filter(&self) -> String {
        format!(
            "virt.events.v1.{}.>",
            virtstream::bus::wire::subject_token(&self.host_id)
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ({}) ---\n{}",
                self.log_path().display(),
                self.log()
            );
        }
        self.kill9();
    }
}

/// Stops the agent (SIGTERM must be a clean exit) and checks that the
/// stream holds exactly the journal's entries: host_seq 1..=N, each once,
/// in order per subject. Returns the stream.
pub fn assert_stream_is_journal(nats_url: &str, agent: &mut Agent) -> Vec<Stored> {
    assert_eq!(agent.terminate(), Some(0), "SIGTERM is a clean exit");
    let n = journal_host_seq(agent);
    let all = fetch(nats_url, "VIRT_EVENTS", &agent.filter());
    let snaps = snapshot_seqs(&agent.host_id).len() as u64;
    assert_eq!(
        all.len() as u64 + snaps,
        n,
        "the streams hold exactly the journal's {n} entries ({snaps} of them snapshot records)"
    );
    assert_contiguous(&all);
    all
}

/// The last host_seq the agent's journal holds (agent must be stopped).
pub fn journal_host_seq(agent: &Agent) -> u64 {
    let dir = agent.dir.path().join("journal");
    let (j, w, rec) = virtstream::journal::Journal::open(virtstream::journal::OpenOptions {
        dir: &dir,
        host_id: Some(&agent.host_id),
        default_host_id: &|| unreachable!(),
        sinks: vec![],
        group_commit_max: 1,
        queue: 1,
        when_full: virtstream::journal::WhenFull::RejectNew,
    })
    .expect("journal opens after the agent stopped");
    drop(j);
    drop(w);
    rec.host_seq
}
