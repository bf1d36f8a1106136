//! The `[host]`, `[libvirt]` and `[journal]` sections: who this host is,
//! how libvirt is reached, and where events are kept until the sinks have
//! them.
//!
//! Invariants:
//! - every key has the default documented beside it, so each section may
//!   be left out except `[journal]` (its `path` is required);
//! - validation refuses values the agent cannot run with (an empty host
//!   id, a zero-sized queue, backoff bounds the wrong way round), naming
//!   the key.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{d_true, Dur};
use super::{key_err, ConfigError};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Stable host identity; default: the journal's recorded id, else the
    /// libvirt host UUID, else the hostname.
    pub id: Option<String>,
    /// How long SIGTERM waits for the sinks to flush.
    #[serde(default = "d_shutdown")]
    pub shutdown_timeout: Dur,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum XmlMode {
    Off,
    OnChange,
    Always,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    #[serde(default = "d_uri")]
    pub uri: String,
    #[serde(default = "d_true")]
    pub read_only: bool,
    /// Keepalive probe interval in seconds (0 disables keepalive).
    #[serde(default = "d_keepalive_interval")]
    pub keepalive_interval: u32,
    #[serde(default = "d_keepalive_count")]
    pub keepalive_count: u32,
    #[serde(default = "d_backoff_min")]
    pub reconnect_backoff_min: Dur,
    #[serde(default = "d_backoff_max")]
    pub reconnect_backoff_max: Dur,
    /// Capacity of the hand-off queue between the libvirt callback and the
    /// tracker. When full, events are dropped, a gap is recorded and a
    /// reconcile repairs the state.
    #[serde(default = "d_queue")]
    pub queue_capacity: usize,
    /// Lookup attempts for a domain an event names but libvirt cannot find yet.
    #[serde(default = "d_lookup_attempts")]
    pub lookup_attempts: u32,
    /// Domain XML in messages: off | on-change | always.
    #[serde(default = "d_xml")]
    pub xml: XmlMode,
}

/// `journal.when_full`: what happens to new entries while the journal's
/// unpublished backlog is at `journal.max_bytes` (applied by
/// `Journal::rejects_new`, which handles every variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Accepted entries are kept; new events are not journaled while full.
    /// A gap marker and a reconcile follow once space is free again.
    RejectNew,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    pub path: PathBuf,
    /// Bound on unpublished journal payload bytes.
    #[serde(default = "d_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "d_when_full")]
    pub when_full: WhenFull,
    /// Most entries per group commit.
    #[serde(default = "d_group")]
    pub group_commit_max: usize,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            id: None,
            shutdown_timeout: d_shutdown(),
        }
    }
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        LibvirtConfig {
            uri: d_uri(),
            read_only: true,
            keepalive_interval: d_keepalive_interval(),
            keepalive_count: d_keepalive_count(),
            reconnect_backoff_min: d_backoff_min(),
            reconnect_backoff_max: d_backoff_max(),
            queue_capacity: d_queue(),
            lookup_attempts: d_lookup_attempts(),
            xml: d_xml(),
        }
    }
}

fn d_shutdown() -> Dur {
    Dur(Duration::from_secs(10))
}
fn d_uri() -> String {
    "qemu:///system".into()
}
fn d_keepalive_interval() -> u32 {
    5
}
fn d_keepalive_count() -> u32 {
    3
}
fn d_backoff_min() -> Dur {
    Dur(Duration::from_millis(500))
}
fn d_backoff_max() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d_queue() -> usize {
    8192
}
fn d_lookup_attempts() -> u32 {
    3
}
fn d_xml() -> XmlMode {
    XmlMode::Off
}
fn d_max_bytes() -> u64 {
    1 << 30
}
fn d_when_full() -> WhenFull {
    WhenFull::RejectNew
}
fn d_group() -> usize {
    1024
}

impl HostConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.id {
            if id.is_empty() {
                return Err(key_err("host.id", "must not be empty"));
            }
        }
        Ok(())
    }
}

impl LibvirtConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.queue_capacity == 0 {
            return Err(key_err("libvirt.queue_capacity", "must be at least 1"));
        }
        if self.reconnect_backoff_min.0 > self.reconnect_backoff_max.0 {
            return Err(key_err(
                "libvirt.reconnect_backoff_min",
                "is larger than libvirt.reconnect_backoff_max",
            ));
        }
        Ok(())
    }
}

impl JournalConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.group_commit_max == 0 {
            return Err(key_err("journal.group_commit_max", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testutil::{parse, SAMPLE};
    use crate::config::LogFormat;

    #[test]
    fn durations_parse_and_bad_ones_are_named() {
        let c = parse(&format!("{SAMPLE}\n[log]\nformat = \"json\"\n"), &[]).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let err = parse(
            &SAMPLE.replace("[host]", "[host]\nshutdown_timeout = \"soon\""),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("host.shutdown_timeout") && err.contains("duration"),
            "{err}"
        );
    }
}
