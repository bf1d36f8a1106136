//! The bus layer: how virtstream reaches NATS JetStream and Kafka, shared
//! by the publishing side (`sinks/`) and the reading tools (`consumer/`).
//!
//! - `nats`: connection options, connecting, the JetStream context, the
//!   stream configurations and their suitability checks;
//! - `kafka`: the client configuration and context, topics and their
//!   provisioning, the partitioner, and the partition reader;
//! - `registry`: the Confluent-compatible schema registry client;
//! - `wire`: names both writers and readers rely on (headers, subject
//!   tokens of host ids);
//! - here: [`Diagnosis`], why a bus cannot be reached, and `read_secret`.
//!
//! Invariants:
//! - nothing here imports `sinks/` or `consumer/`;
//! - secret values never appear in errors or logs; only the config key and
//!   the file's path do;
//! - a [`Diagnosis`] displays exactly the text operators are shown (its
//!   `detail`); the bus and the cause class are for code that acts on it.

pub mod kafka;
pub mod nats;
pub mod registry;
pub mod wire;

use std::fmt;

/// Reads a secret file named by config key `key`: its content without the
/// trailing newline. The error names the key and the path, never content.
pub(crate) fn read_secret(key: &str, path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|e| format!("{key} {}: {e}", path.display()))
}

/// A message bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    Nats,
    Kafka,
}

impl fmt::Display for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bus::Nats => "NATS",
            Bus::Kafka => "Kafka",
        })
    }
}

/// The class of a connection failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The client could not be configured (a secret file unreadable, an
    /// invalid option): retrying does not help.
    Config,
    /// The server could not be reached (refused, name not resolved,
    /// connection lost).
    Unreachable,
    /// The server refused the credentials.
    Auth,
    /// The TLS handshake failed.
    Tls,
    /// No answer in time.
    Timeout,
    /// Anything else.
    Other,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cause::Config => "configuration",
            Cause::Unreachable => "unreachable",
            Cause::Auth => "authentication",
            Cause::Tls => "TLS",
            Cause::Timeout => "timeout",
            Cause::Other => "other",
        })
    }
}

/// Why connecting to a bus fails right now, in full (the clients' own
/// connection events often say only "IO error").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    pub bus: Bus,
    pub cause: Cause,
    /// The client's account of the failure, as operators see it.
    pub detail: String,
}

impl fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diagnosis_displays_its_detail_unchanged() {
        let d = Diagnosis {
            bus: Bus::Nats,
            cause: Cause::Timeout,
            detail: "NATS connect to nats://x:1: timed out".into(),
        };
        assert_eq!(d.to_string(), "NATS connect to nats://x:1: timed out");
        assert_eq!(format!("{} {}", d.bus, d.cause), "NATS timeout");
    }

    #[test]
    fn read_secret_trims_the_newline_and_names_key_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "v4lue\r\n").unwrap();
        assert_eq!(read_secret("k.file", &p).unwrap(), "v4lue");
        let e = read_secret("k.file", &dir.path().join("none")).unwrap_err();
        assert!(e.starts_with("k.file "), "{e}");
        assert!(!e.contains("v4lue"), "{e}");
    }
}
