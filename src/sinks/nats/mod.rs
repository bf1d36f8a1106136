//! NATS JetStream sink: encoding (`encoding.rs`), what the bus holds of
//! this host (`probe.rs`) and the publish loop (`service.rs`); this file
//! holds the sink's error type and adapts the bus layer
//! ([`crate::bus::nats`]: connection, streams, suitability checks) to it.
//!
//! Invariants:
//! - every bus error keeps its variant and its text when it becomes a
//!   sink error, so [`NatsError::is_fatal`] decides as the bus would;
//! - the client reconnects forever; an unreachable server at start only
//!   delays publishing (the journal holds everything meanwhile).

pub mod encoding;
pub mod probe;
mod scheduler;
pub mod service;

use crate::bus::nats as bus;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("NATS options: {0}")]
    Options(String),
    #[error("NATS connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("JetStream stream {stream} is unsuitable for virtstream: {reason}")]
    Unsuitable { stream: String, reason: String },
    #[error("JetStream stream {stream} does not exist and nats.create_streams = false")]
    Missing { stream: String },
    #[error("JetStream API: {0}")]
    Api(String),
    /// The bus holds a message of this host and epoch beyond the journal's
    /// head: the journal was restored from a backup or a VM snapshot. The
    /// agent stops; its next start detects this and begins a new epoch.
    #[error("the bus holds host_seq {bus} of this host's epoch {epoch}, beyond the journal's head {journal}: the journal was restored from a backup or a VM snapshot; restart the agent to begin a new epoch")]
    JournalBehindBus {
        epoch: String,
        bus: u64,
        journal: u64,
    },
}

impl NatsError {
    /// Errors that retrying cannot fix.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            NatsError::Unsuitable { .. }
                | NatsError::Missing { .. }
                | NatsError::Options(_)
                | NatsError::JournalBehindBus { .. }
        )
    }
}

impl From<bus::NatsError> for NatsError {
    fn from(e: bus::NatsError) -> Self {
        match e {
            bus::NatsError::Options(m) => NatsError::Options(m),
            bus::NatsError::Connect { url, message } => NatsError::Connect { url, message },
            bus::NatsError::Unsuitable { stream, reason } => {
                NatsError::Unsuitable { stream, reason }
            }
            bus::NatsError::Missing { stream } => NatsError::Missing { stream },
            bus::NatsError::Api(m) => NatsError::Api(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_errors_keep_variant_text_and_fatality() {
        let cases = [
            bus::NatsError::Options("nats.token_file /x: gone".into()),
            bus::NatsError::Connect {
                url: "nats://x:1".into(),
                message: "IO error".into(),
            },
            bus::NatsError::Unsuitable {
                stream: "S".into(),
                reason: "r".into(),
            },
            bus::NatsError::Missing { stream: "S".into() },
            bus::NatsError::Api("timeout".into()),
        ];
        for e in cases {
            let (text, fatal) = (e.to_string(), e.is_fatal());
            let s = NatsError::from(e);
            assert_eq!(s.to_string(), text);
            assert_eq!(s.is_fatal(), fatal, "{text}");
        }
    }
}
