//! The `[hooks]` section: where the agent listens for libvirt's qemu hook
//! calls (`virtstream hook qemu …`) and where a hook that finds no agent
//! spools them. The section present (in the file or through an
//! environment override) enables the listener.
//!
//! Invariants:
//! - every key has a default; the defaults are also what `virtstream hook`
//!   uses without a config file (it must not need one to work);
//! - the spool bound is between 4 KiB and 64 MiB.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{key_err, ConfigError};

/// The hook socket `virtstream hook` and the agent default to.
pub const DEFAULT_HOOKS_SOCKET: &str = "/run/virtstream/hooks.sock";
/// The spool `virtstream hook` and the agent default to.
pub const DEFAULT_HOOKS_SPOOL: &str = "/var/lib/virtstream/hooks.spool";
/// The spool's default size bound.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    /// The UNIX socket the agent listens on.
    #[serde(default = "d_socket")]
    pub socket: PathBuf,
    /// Where a hook appends its record when the agent is not listening;
    /// the agent journals what it holds at start.
    #[serde(default = "d_spool")]
    pub spool: PathBuf,
    /// The spool's bound: a record that does not fit is dropped and
    /// counted (`<spool>.dropped`).
    #[serde(default = "d_spool_max")]
    pub spool_max_bytes: u64,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            socket: d_socket(),
            spool: d_spool(),
            spool_max_bytes: d_spool_max(),
        }
    }
}

impl HooksConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(4096..=64 << 20).contains(&self.spool_max_bytes) {
            return Err(key_err(
                "hooks.spool_max_bytes",
                "must be between 4096 and 67108864",
            ));
        }
        if self.socket.as_os_str().len() > 100 {
            return Err(key_err(
                "hooks.socket",
                "a UNIX socket path must be at most 100 bytes",
            ));
        }
        Ok(())
    }
}

fn d_socket() -> PathBuf {
    DEFAULT_HOOKS_SOCKET.into()
}
fn d_spool() -> PathBuf {
    DEFAULT_HOOKS_SPOOL.into()
}
fn d_spool_max() -> u64 {
    DEFAULT_SPOOL_MAX_BYTES
}

#[cfg(test)]
mod tests {
    use super::super::testutil::parse;

    #[test]
    fn section_defaults_and_bounds() {
        let base = "[journal]\npath = \"/tmp/j\"\n";
        let c = parse(&format!("{base}[hooks]\n"), &[]).unwrap();
        let h = c.hooks.unwrap();
        assert_eq!(h.socket.to_str(), Some(super::DEFAULT_HOOKS_SOCKET));
        assert_eq!(h.spool_max_bytes, super::DEFAULT_SPOOL_MAX_BYTES);
        assert!(parse(base, &[]).unwrap().hooks.is_none());
        let c = parse(base, &[("VIRTSTREAM_HOOKS_SOCKET", "/tmp/h.sock")]).unwrap();
        assert_eq!(c.hooks.unwrap().socket.to_str(), Some("/tmp/h.sock"));
        let err = parse(&format!("{base}[hooks]\nspool_max_bytes = 1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("hooks.spool_max_bytes"), "{err}");
    }
}
