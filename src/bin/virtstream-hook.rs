//! `virtstream-hook`: libvirt's qemu hook forwarder alone, for
//! `/etc/libvirt/hooks/qemu` (`virtstream-hook qemu "$@"`). The same
//! arguments and behaviour as `virtstream hook` (see
//! `source::hooks::cli`), in a binary that links only glibc and libgcc_s: libvirtd waits
//! for every hook call, so its start-up time is on every guest's start and
//! stop.
//!
//! Invariant: always exits 0, also on bad arguments (a failing hook would
//! fail libvirt's operation).

use clap::Parser;
use virtstream::source::hooks::cli::HookArgs;

/// Forwards one libvirt qemu hook call to the virtstream agent.
#[derive(Parser)]
#[command(name = "virtstream-hook", version)]
struct Cli {
    #[command(flatten)]
    hook: HookArgs,
}

fn main() {
    match Cli::try_parse() {
        Ok(cli) => cli.hook.forward(),
        Err(e) => {
            let _ = e.print();
        }
    }
}
