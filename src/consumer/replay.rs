//! `virtstream replay` as a feed: each message of the events stream
//! (NATS) or topic (Kafka), as written, decoded to one JSON line with all
//! its fields plus where it was (`stream_seq` and `subject` on NATS;
//! `topic`, `partition` and `offset` on Kafka; see `report`). What is read
//! (from a position or a time, optionally one domain's, to the end) is the
//! bus stage's business (`bus::Scope::Events`).
//!
//! Invariants: a message that cannot be decoded is reported on stderr with
//! its position and the reason, never silently skipped, and never stops
//! the replay; the count of such messages is returned. After a failed
//! write nothing more is written or reported, and the read stops.

use std::io::Write;

use super::bus::Message;
use super::feed::Feed;
use super::{report, ConsumerError};
use crate::codec;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Read(#[from] ConsumerError),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

/// Totals of one replay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayStats {
    pub decoded: u64,
    pub undecodable: u64,
}

/// Writes each message handed to it as a JSON line.
pub struct Replay<'a> {
    out: &'a mut (dyn Write + Send),
    stats: ReplayStats,
    failed: Option<std::io::Error>,
}

impl<'a> Replay<'a> {
    pub fn new(out: &'a mut (dyn Write + Send)) -> Replay<'a> {
        Replay {
            out,
            stats: ReplayStats::default(),
            failed: None,
        }
    }

    /// The totals, once everything is written out.
    pub fn finish(self) -> Result<ReplayStats, ReplayError> {
        if let Some(e) = self.failed {
            return Err(e.into());
        }
        self.out.flush()?;
        Ok(self.stats)
    }
}

impl Feed for Replay<'_> {
    fn wants_records(&self) -> bool {
        false
    }

    fn done(&self) -> bool {
        self.failed.is_some()
    }

    fn message(&mut self, msg: &Message<'_>) {
        if self.failed.is_some() {
            return;
        }
        match msg
            .body()
            .map_err(|e| e.to_string())
            .and_then(|b| decode_body(&b))
        {
            Ok(json) => {
                if let Err(e) = writeln!(self.out, "{}", report::replay_line(json, msg)) {
                    self.failed = Some(e);
                }
                self.stats.decoded += 1;
            }
            Err(e) => {
                eprintln!("{}", report::replay_undecodable(msg, &e));
                self.stats.undecodable += 1;
            }
        }
    }
}

/// Decodes a message body: Avro single-object encoding, or the opt-in JSON.
fn decode_body(body: &[u8]) -> Result<serde_json::Value, String> {
    if body.starts_with(&codec::SINGLE_OBJECT_MAGIC) {
        return codec::decode_json(body)
            .map(|(_, v)| v)
            .map_err(|e| e.to_string());
    }
    if let Some(e) = super::record::registry_framed(body) {
        return Err(e.to_string());
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        _ => Err("neither Avro single-object encoded nor a JSON object".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::record::{Headers, Position};
    use std::sync::Arc;

    #[test]
    fn lines_carry_the_position_and_bad_messages_are_counted() {
        let pos = Position {
            source: Arc::from("EV"),
            partition: None,
            offset: 7,
            time_us: None,
        };
        let msg = |payload: &'static [u8]| Message {
            pos: &pos,
            payload,
            headers: Headers::default(),
            subject: Some("virt.events.h.u"),
            contiguous: true,
            registry: None,
        };
        let mut buf = Vec::new();
        let mut out = std::io::Cursor::new(&mut buf);
        let mut r = Replay::new(&mut out);
        r.message(&msg(br#"{"b":1,"a":2}"#));
        r.message(&msg(b"[1]"));
        let stats = r.finish().unwrap();
        assert_eq!(
            stats,
            ReplayStats {
                decoded: 1,
                undecodable: 1
            }
        );
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "{\"b\":1,\"a\":2,\"stream_seq\":7,\"subject\":\"virt.events.h.u\"}\n"
        );
    }
}
