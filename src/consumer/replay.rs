//! `virtstream replay --bus nats`: reads the events stream from a stream
//! sequence or a time, optionally for one domain, and writes each message
//! decoded as one JSON line (all record fields plus `stream_seq` and
//! `subject`). Stops at the end of the stream as it was when replay began.
//!
//! Invariants: a message that cannot be decoded is reported on stderr with
//! its stream sequence and the reason, never silently skipped, and never
//! stops the replay; the count of such messages is returned.

use std::io::Write;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;

use crate::codec;
use crate::config::NatsConfig;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot connect to NATS at {url}: {message} (is nats-server running?)")]
    Connect { url: String, message: String },
    #[error("JetStream: {0}")]
    Api(String),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

/// Where replay starts.
#[derive(Debug, Clone, Copy)]
pub enum From {
    Start,
    StreamSeq(u64),
    Time(time::OffsetDateTime),
}

/// Totals of one replay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayStats {
    pub decoded: u64,
    pub undecodable: u64,
}

/// Replays the events stream to `out`.
pub async fn replay_nats(
    cfg: &NatsConfig,
    from: From,
    domain: Option<&str>,
    out: &mut (dyn Write + Send),
) -> Result<ReplayStats, ReplayError> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(cfg.url.as_str())
        .await
        .map_err(|e| ReplayError::Connect {
            url: cfg.url.clone(),
            message: e.to_string(),
        })?;
    let js = jetstream::new(client);
    let mut stream = js
        .get_stream(&cfg.events_stream)
        .await
        .map_err(|e| ReplayError::Api(format!("stream {}: {e}", cfg.events_stream)))?;
    let last = stream
        .info()
        .await
        .map_err(|e| ReplayError::Api(e.to_string()))?
        .state
        .last_sequence;
    let filter_subject = match domain {
        Some(uuid) => format!("{}.*.{uuid}", cfg.events_subject_prefix),
        None => format!("{}.>", cfg.events_subject_prefix),
    };
    let deliver_policy = match from {
        From::Start => DeliverPolicy::All,
        From::StreamSeq(n) => DeliverPolicy::ByStartSequence {
            start_sequence: n.max(1),
        },
        From::Time(t) => DeliverPolicy::ByStartTime { start_time: t },
    };
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| ReplayError::Api(e.to_string()))?;
    let mut stats = ReplayStats::default();
    if last == 0 {
        return Ok(stats);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| ReplayError::Api(e.to_string()))?;
    loop {
        // An idle stream past `last` (or a filter matching nothing after
        // the start point) ends the replay.
        let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
        let msg = match next {
            Err(_) | Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ReplayError::Api(e.to_string())),
            Ok(Some(Ok(m))) => m,
        };
        let info = msg.info().map_err(|e| ReplayError::Api(e.to_string()))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        match codec::decode_json(&msg.payload) {
            Ok((_, mut json)) => {
                if let Some(obj) = json.as_object_mut() {
                    obj.insert("stream_seq".into(), seq.into());
                    obj.insert("subject".into(), msg.subject.to_string().into());
                }
                writeln!(out, "{json}")?;
                stats.decoded += 1;
            }
            Err(e) => {
                eprintln!("stream_seq {seq} ({}): cannot decode: {e}", msg.subject);
                stats.undecodable += 1;
            }
        }
        if pending == 0 || seq >= last {
            break;
        }
    }
    out.flush()?;
    Ok(stats)
}
