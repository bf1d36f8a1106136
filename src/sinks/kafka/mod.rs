//! Kafka sink: encoding (`encoding.rs`), the offsets kept beside the
//! cursor (`offsets.rs`), what the bus holds of this host (`probe.rs`) and
//! the publish loop with its crash recovery (`service.rs`); this file
//! holds the sink's error type and adapts the bus layer
//! ([`crate::bus::kafka`]: client configuration and context, topics,
//! partitioner, partition reader) to it.
//!
//! Invariants:
//! - every bus error keeps its variant and its text when it becomes a
//!   sink error, so [`KafkaSinkError::is_fatal`] decides as the bus would;
//! - a domain's messages always go to partition
//!   `murmur2(uuid) mod partitions` ([`crate::bus::kafka::partition_for`]), so the sink knows
//!   where every journal entry went without asking the broker.

pub mod encoding;
mod offsets;
pub mod probe;
mod recovery;
pub mod service;

use crate::bus::kafka as bus;

/// What ends a Kafka sink session: a bus error (client, topics, broker,
/// shutdown), the journal, or the bus being ahead of the journal.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error(transparent)]
    Bus(#[from] bus::KafkaError),
    #[error(transparent)]
    Registry(#[from] crate::bus::registry::RegistryError),
    #[error("journal: {0}")]
    Journal(String),
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

impl KafkaSinkError {
    /// Errors that retrying cannot fix.
    pub fn is_fatal(&self) -> bool {
        match self {
            KafkaSinkError::Bus(e) => e.is_fatal(),
            KafkaSinkError::Registry(e) => e.is_fatal(),
            KafkaSinkError::Journal(_) | KafkaSinkError::JournalBehindBus { .. } => true,
        }
    }

    /// Shutdown interrupted the work.
    pub const INTERRUPTED: KafkaSinkError = KafkaSinkError::Bus(bus::KafkaError::Interrupted);

    /// Whether shutdown interrupted the work.
    pub fn is_interrupted(&self) -> bool {
        matches!(self, KafkaSinkError::Bus(bus::KafkaError::Interrupted))
    }

    /// A broker's error.
    pub fn broker(brokers: impl Into<String>, message: impl Into<String>) -> KafkaSinkError {
        KafkaSinkError::Bus(bus::KafkaError::Broker {
            brokers: brokers.into(),
            message: message.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_errors_keep_variant_text_and_fatality() {
        let cases = [
            bus::KafkaError::Config("c".into()),
            bus::KafkaError::Unsuitable {
                topic: "t".into(),
                reason: "r".into(),
            },
            bus::KafkaError::Missing { topic: "t".into() },
            bus::KafkaError::Broker {
                brokers: "a:9092".into(),
                message: "m".into(),
            },
            bus::KafkaError::Interrupted,
        ];
        for e in cases {
            let (text, fatal) = (e.to_string(), e.is_fatal());
            let interrupted = matches!(e, bus::KafkaError::Interrupted);
            let s = KafkaSinkError::from(e);
            assert_eq!(s.to_string(), text);
            assert_eq!(s.is_fatal(), fatal, "{text}");
            assert_eq!(s.is_interrupted(), interrupted);
        }
    }
}
