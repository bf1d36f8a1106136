//! Fixtures for tests against real servers, one file per server:
//! nats-server (`nats`) and the tansu Kafka-protocol broker (`kafka`), each
//! on a random port with temporary storage and killed on drop; the system
//! libvirtd (`libvirtd`, started when missing and allowed) and a private
//! one (`libvirt_host`); the agent binary as a child process (`agent`);
//! `virsh event` as the independent oracle (`oracle`); the Python clients
//! we did not write (`python`); a minimal Confluent-API schema registry
//! (`registry`, used as `common::registry::Registry`); TLS material and a
//! TLS terminator (`tls`). `records` reads back what a host published and
//! checks it. Everything is re-exported here: tests use `common::X`.
//!
//! Invariants:
//! - a missing server is a failure with a message saying how to start it,
//!   never a silent skip;
//! - every process a fixture starts is stopped when the fixture is
//!   dropped.
#![allow(dead_code)]

mod agent;
mod kafka;
pub mod libvirt_host;
mod libvirtd;
mod nats;
mod oracle;
mod python;
mod records;
pub mod registry;
pub mod tls;

// Each test binary uses its own part of the fixtures.
#[allow(unused_imports)]
pub use {agent::*, kafka::*, libvirtd::*, nats::*, oracle::*, python::*, records::*};

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub const TEST_URI: &str = "test+unix:///default";
pub const QEMU_URI: &str = "qemu:///system";

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Unique short name for this test run.
pub fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{:x}", std::process::id(), n % 0xffff_ffff)
}

pub fn unsafe_kill(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Seconds since the Unix epoch, now.
pub fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `t` (seconds since the Unix epoch) in RFC 3339, as the tools' `--from`
/// and `--to` take it.
pub fn rfc3339(t: f64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos((t * 1e9) as i128).unwrap();
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}
