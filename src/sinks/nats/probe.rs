//! What JetStream holds of this host, read at start (before publishing):
//! the highest `host_seq` stored for the journal's epoch (a journal behind
//! it was restored from a backup or a VM snapshot), and the domains whose
//! latest snapshot record belongs to an earlier epoch.
//!
//! Both read only the last message of each of this host's subjects
//! (ephemeral ordered consumers, `DeliverLastPerSubject`, one filter
//! subject each: nats-server 2.9 has no multi-filter consumers). A
//! missing stream holds nothing.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use async_nats::HeaderMap;
use futures::StreamExt;

use super::NatsError;
use crate::bus::wire::{subject_token, TOMBSTONE_HEADER};
use crate::config::NatsConfig;
use crate::model::parse_event_id;

/// Longest wait for the next message of a read that has more pending.
const NEXT_MESSAGE: Duration = Duration::from_secs(2);

fn api(stream: &str, e: impl std::fmt::Display) -> NatsError {
    NatsError::api(format!("stream {stream}: {e}"))
}

/// (subject, headers) of the last message of every subject matching
/// `filter` in `stream`.
async fn last_per_subject(
    js: &jetstream::Context,
    stream: &str,
    filter: String,
) -> Result<Vec<(String, Option<HeaderMap>)>, NatsError> {
    let s = match js.get_stream(stream).await {
        Ok(s) => s,
        Err(e) => {
            let not_found = matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            );
            return if not_found {
                Ok(Vec::new())
            } else {
                Err(api(stream, e))
            };
        }
    };
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| api(stream, e))?;
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|e| api(stream, e))?;
    loop {
        let m = match tokio::time::timeout(NEXT_MESSAGE, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(api(stream, e)),
            Ok(None) | Err(_) => {
                return Err(api(stream, "the read stopped with messages still pending"))
            }
        };
        let pending = m.info().map_err(|e| api(stream, e))?.pending;
        out.push((m.subject.to_string(), m.headers.clone()));
        if pending == 0 {
            return Ok(out);
        }
    }
}

/// (host, epoch, host_seq) of a message, from its `Nats-Msg-Id`.
fn origin(headers: &Option<HeaderMap>) -> Option<(String, String, u64)> {
    let id = headers.as_ref()?.get("Nats-Msg-Id")?;
    parse_event_id(id.as_str()).map(|(h, e, s)| (h.to_string(), e.to_string(), s))
}

/// The highest `host_seq` of (`host_id`, `epoch`) on the last message of
/// any of this host's subjects (events, domain snapshots, round markers
/// and heartbeats); `None` when there is none.
pub async fn highest_host_seq(
    cfg: &NatsConfig,
    host_id: &str,
    epoch: &str,
) -> Result<Option<u64>, NatsError> {
    let client =
        crate::bus::nats::connect_once(cfg, &format!("virtstream-{host_id}-probe")).await?;
    let js = jetstream::new(client);
    let token = subject_token(host_id);
    let reads = [
        (
            &cfg.events_stream,
            format!("{}.{token}.>", cfg.events_subject_prefix),
        ),
        (
            &cfg.snapshots_stream,
            format!("{}.{token}.>", cfg.snapshots_subject_prefix),
        ),
        (
            &cfg.snapshots_stream,
            format!("{}.{token}", cfg.hosts_subject_prefix),
        ),
    ];
    let mut best = None;
    for (stream, filter) in reads {
        for (_, headers) in last_per_subject(&js, stream, filter).await? {
            if let Some((h, e, s)) = origin(&headers) {
                if h == host_id && e == epoch {
                    best = best.max(Some(s));
                }
            }
        }
    }
    Ok(best)
}

/// Domain UUIDs whose latest snapshot record (subject
/// `<snapshots prefix>.<host token>.<uuid>`) is from an epoch other than
/// `epoch` and not a tombstone.
pub async fn stale_snapshots(
    cfg: &NatsConfig,
    host_id: &str,
    epoch: &str,
) -> Result<Vec<String>, NatsError> {
    let client =
        crate::bus::nats::connect_once(cfg, &format!("virtstream-{host_id}-probe")).await?;
    let js = jetstream::new(client);
    let prefix = format!(
        "{}.{}.",
        cfg.snapshots_subject_prefix,
        subject_token(host_id)
    );
    let records = last_per_subject(&js, &cfg.snapshots_stream, format!("{prefix}*")).await?;
    let mut out = Vec::new();
    for (subject, headers) in records {
        let Some(uuid) = subject.strip_prefix(&prefix) else {
            continue;
        };
        let tombstone = headers
            .as_ref()
            .and_then(|h| h.get(TOMBSTONE_HEADER))
            .is_some_and(|v| v.as_str() == "true");
        let other_epoch = origin(&headers).is_some_and(|(h, e, _)| h == host_id && e != epoch);
        if other_epoch && !tombstone {
            out.push(uuid.to_string());
        }
    }
    Ok(out)
}

/// A stored message of this host and epoch beyond the journal's head:
/// the journal was restored (found while publishing).
pub fn behind_bus(epoch: &str, bus: u64, journal: u64) -> NatsError {
    NatsError::JournalBehindBus {
        epoch: epoch.to_string(),
        bus,
        journal,
    }
}
