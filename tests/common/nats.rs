//! nats-server with JetStream on a random port and a temporary store,
//! killed on drop; reading a stream back.
//!
//! Invariants:
//! - the server listens on 127.0.0.1 only, and a stopped server restarts
//!   on the same port with the same store;
//! - reading back never consumes: an ordered consumer reads the stream up
//!   to its last sequence at the time of the call.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;

use super::records::{poll_until, Stored};
use super::{free_port, rt, unsafe_kill, wait_port};

pub struct NatsServer {
    pub port: u16,
    pub store: tempfile::TempDir,
    /// Extra command-line arguments (TLS, authentication).
    args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> NatsServer {
        Self::start_with(port, Vec::new())
    }

    /// A server with extra arguments, e.g. `--tls ...` or `-c auth.conf`.
    pub fn start_with(port: u16, args: Vec<String>) -> NatsServer {
        let store = tempfile::tempdir().unwrap();
        let mut s = NatsServer {
            port,
            store,
            args,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args(["-js", "-sd"])
            .arg(self.store.path())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.store.path().join("server.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nats-server ({e}): install and start the test environment with \
                     `bash deploy/local-env.sh start` (Debian package nats-server)"
                )
            });
        self.child = Some(child);
        assert!(
            wait_port(self.port, Duration::from_secs(10)),
            "nats-server did not listen on 127.0.0.1:{} within 10 s: {}",
            self.port,
            std::fs::read_to_string(self.store.path().join("server.log")).unwrap_or_default()
        );
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Stops the server (SIGTERM, wait); the store is kept.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_kill(c.id(), libc::SIGTERM);
            let _ = c.wait();
        }
    }

    /// Starts again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn resume(&mut self) {
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every message on `filter` in the stream, in stream order.
pub fn fetch(url: &str, stream: &str, filter: &str) -> Vec<Stored> {
    fetch_with(async_nats::ConnectOptions::new(), url, stream, filter)
}

/// [`fetch`] with connect options (TLS, credentials).
pub fn fetch_with(
    opts: async_nats::ConnectOptions,
    url: &str,
    stream: &str,
    filter: &str,
) -> Vec<Stored> {
    rt().block_on(async {
        let client = opts.connect(url).await.expect("connect to nats");
        let js = jetstream::new(client);
        let mut st = match js.get_stream(stream).await {
            Ok(s) => s,
            Err(_) => return Vec::new(),
        };
        let last = st.info().await.unwrap().state.last_sequence;
        if last == 0 {
            return Vec::new();
        }
        let consumer = st
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.to_string(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = consumer.messages().await.unwrap();
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(2), msgs.next()).await;
            let m = match next {
                Ok(Some(Ok(m))) => m,
                _ => break,
            };
            let info = m.info().unwrap();
            let (seq, pending) = (info.stream_sequence, info.pending);
            let headers = m
                .headers
                .as_ref()
                .map(|h| {
                    h.iter()
                        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Stored {
                stream_seq: seq,
                subject: m.subject.to_string(),
                event: virtstream::codec::decode_event(&m.payload).expect("decodes"),
                headers,
            });
            if pending == 0 || seq >= last {
                break;
            }
        }
        out
    })
}

/// Polls until `pred(messages)` holds on a hole-free snapshot of one
/// host's stream (see [`contiguous`]), or fails after `timeout`.
pub fn wait_for(
    url: &str,
    filter: &str,
    timeout: Duration,
    what: &str,
    pred: impl FnMut(&[Stored]) -> bool,
) -> Vec<Stored> {
    poll_until(timeout, what, "messages", pred, || {
        fetch(url, "VIRT_EVENTS", filter)
    })
}
