//! The `[snapshot]`, `[metrics]` and `[log]` sections: how often complete
//! rounds and heartbeats are published, where metrics are served, and how
//! the agent logs.
//!
//! Invariants:
//! - all three sections are optional, every key has a default;
//! - snapshot intervals are at least one second.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::Dur;
use super::{key_err, ConfigError};

/// Snapshot rounds and heartbeats.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// A complete round at least this often (besides the rounds at start,
    /// after reconnects and after gaps).
    #[serde(default = "d_snapshot_interval")]
    pub interval: Dur,
    /// A HostSnapshot heartbeat this often.
    #[serde(default = "d_heartbeat")]
    pub heartbeat: Dur,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            interval: d_snapshot_interval(),
            heartbeat: d_heartbeat(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "d_listen")]
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: d_listen() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "d_log_format")]
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `virtstream=debug,info`.
    #[serde(default = "d_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: d_log_format(),
            level: d_log_level(),
        }
    }
}

fn d_snapshot_interval() -> Dur {
    Dur(Duration::from_secs(300))
}
fn d_heartbeat() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d_listen() -> SocketAddr {
    "127.0.0.1:9477".parse().expect("literal address")
}
fn d_log_format() -> LogFormat {
    LogFormat::Text
}
fn d_log_level() -> String {
    "info".into()
}

impl SnapshotConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, d) in [
            ("snapshot.interval", self.interval),
            ("snapshot.heartbeat", self.heartbeat),
        ] {
            if d.0 < Duration::from_secs(1) {
                return Err(key_err(key, "must be at least 1s"));
            }
        }
        Ok(())
    }
}
