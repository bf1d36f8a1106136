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

/// What ends or delays the NATS sink: a bus error (connection, streams),
/// or the bus being ahead of the journal.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error(transparent)]
    Bus(#[from] bus::NatsError),
    #[error(transparent)]
    Registry(#[from] crate::bus::registry::RegistryError),
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
        match self {
            NatsError::Bus(e) => e.is_fatal(),
            NatsError::Registry(e) => e.is_fatal(),
            NatsError::JournalBehindBus { .. } => true,
        }
    }

    /// A JetStream API failure.
    pub fn api(message: impl Into<String>) -> NatsError {
        NatsError::Bus(bus::NatsError::Api(message.into()))
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
