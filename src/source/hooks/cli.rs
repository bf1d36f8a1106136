//! The hook's command line, shared by `virtstream hook …` and the small
//! `virtstream-hook` binary (the same arguments, environment overrides and
//! defaults; the small binary links neither libvirt nor the brokers'
//! clients, so libvirtd's synchronous wait on it is a process start of
//! about a millisecond instead of loading libvirt's ~50 libraries).
//!
//! Invariants:
//! - the defaults are the `[hooks]` defaults, so neither entry needs a
//!   config file;
//! - nothing here fails libvirt's operation: every path ends in exit 0.

use std::path::PathBuf;

use super::client::{run, HookTarget};
use crate::config::{DEFAULT_HOOKS_SOCKET, DEFAULT_HOOKS_SPOOL, DEFAULT_SPOOL_MAX_BYTES};

/// `qemu GUEST OPERATION SUBOPERATION EXTRA` with the domain XML on stdin.
#[derive(Debug, clap::Args)]
pub struct HookArgs {
    /// The libvirt hook driver (only `qemu` is forwarded).
    pub driver: String,
    #[arg(allow_hyphen_values = true)]
    pub guest: String,
    #[arg(allow_hyphen_values = true)]
    pub operation: String,
    #[arg(allow_hyphen_values = true, default_value = "-")]
    pub sub_operation: String,
    #[arg(allow_hyphen_values = true, default_value = "-")]
    pub extra: String,
    /// The agent's `[hooks] socket`.
    #[arg(long, env = "VIRTSTREAM_HOOKS_SOCKET", default_value = DEFAULT_HOOKS_SOCKET)]
    pub socket: PathBuf,
    /// The `[hooks] spool` used when no agent listens.
    #[arg(long, env = "VIRTSTREAM_HOOKS_SPOOL", default_value = DEFAULT_HOOKS_SPOOL)]
    pub spool: PathBuf,
    /// The `[hooks] spool_max_bytes` bound.
    #[arg(long, env = "VIRTSTREAM_HOOKS_SPOOL_MAX_BYTES", default_value_t = DEFAULT_SPOOL_MAX_BYTES)]
    pub spool_max_bytes: u64,
}

impl HookArgs {
    /// Forwards the call (or spools it); problems go to stderr.
    pub fn forward(self) {
        if self.driver != "qemu" {
            eprintln!(
                "virtstream hook: driver {:?} is not forwarded (only qemu)",
                self.driver
            );
            return;
        }
        let target = HookTarget {
            socket: self.socket,
            spool: self.spool,
            spool_max_bytes: self.spool_max_bytes,
        };
        run(
            &target,
            [
                &self.guest,
                &self.operation,
                &self.sub_operation,
                &self.extra,
            ],
            std::io::stdin().lock(),
            crate::clock::now_micros(),
        );
    }
}
