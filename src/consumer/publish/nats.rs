//! The usage CloudEvents on JetStream: the usage stream found or created
//! (`bus::nats::usage_stream_config`), then one publish per event with
//! `Nats-Msg-Id` = the event id, so the server drops a re-publish of the
//! same window within the stream's duplicate window.
//!
//! Invariants: at most `nats.max_in_flight` publishes await their ack (the
//! oldest is awaited first); every ack is awaited before returning.

use std::collections::VecDeque;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;

use super::{PublishError, Published, UsageEvent, CONTENT_TYPE};
use crate::bus::nats::{
    check_usage_suitable, connect_once, context, ensure_stream, usage_stream_config, NatsError,
};
use crate::bus::wire::subject_token;
use crate::config::{NatsConfig, UsageConfig};

/// The subject of a usage event: `<prefix>.<host token>.<domain uuid>`.
pub(super) fn subject(usage: &UsageConfig, e: &UsageEvent) -> String {
    format!(
        "{}.{}.{}",
        usage.nats_subject_prefix,
        subject_token(&e.host_id),
        e.uuid
    )
}

struct Pending<'a> {
    subject: String,
    event: &'a UsageEvent,
    ack: PublishAckFuture,
}

pub(super) async fn publish(
    cfg: &NatsConfig,
    usage: &UsageConfig,
    events: &[UsageEvent],
) -> Result<Published, PublishError> {
    let client = connect_once(cfg, "virtstream-usage").await?;
    let js = context(client.clone(), cfg);
    ensure_stream(&js, cfg, usage_stream_config(cfg, usage), |c| {
        check_usage_suitable(c, usage)
    })
    .await?;
    let mut out = Published {
        target: format!("JetStream stream {}", usage.nats_stream),
        acked: 0,
        duplicates: 0,
    };
    let window = cfg.max_in_flight.max(1);
    let mut pending: VecDeque<Pending<'_>> = VecDeque::new();
    for event in events {
        if pending.len() >= window {
            if let Some(p) = pending.pop_front() {
                settle(p, &mut out).await?;
            }
        }
        let subject = subject(usage, event);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.id.as_str());
        headers.insert("content-type", CONTENT_TYPE);
        let msg = PublishMessage::build()
            .payload(event.json.clone().into())
            .headers(headers);
        let ack =
            js.send_publish(subject.clone(), msg)
                .await
                .map_err(|e| PublishError::NotStored {
                    subject: subject.clone(),
                    id: event.id.clone(),
                    reason: e.to_string(),
                })?;
        pending.push_back(Pending {
            subject,
            event,
            ack,
        });
    }
    while let Some(p) = pending.pop_front() {
        settle(p, &mut out).await?;
    }
    client
        .flush()
        .await
        .map_err(|e| NatsError::Api(e.to_string()))?;
    Ok(out)
}

/// Awaits one ack.
async fn settle(p: Pending<'_>, out: &mut Published) -> Result<(), PublishError> {
    let ack = p.ack.await.map_err(|e| PublishError::NotStored {
        subject: p.subject.clone(),
        id: p.event.id.clone(),
        reason: e.to_string(),
    })?;
    out.acked += 1;
    if ack.duplicate {
        out.duplicates += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_is_prefix_host_token_and_uuid() {
        let e = UsageEvent {
            id: "usage:node1.example.com:u-1:0:1".into(),
            subject: "tenant-1".into(),
            host_id: "node1.example.com".into(),
            uuid: "u-1".into(),
            json: "{}".into(),
        };
        assert_eq!(
            subject(&UsageConfig::default(), &e),
            "virt.usage.v1.node1_2Eexample_2Ecom.u-1"
        );
    }
}
