//! The clients we did not write, in Python: the venv
//! `deploy/local-env.sh oracle` installs (`$VIRTSTREAM_ORACLE_VENV`,
//! default /opt/virtstream-oracle) with fastavro, confluent-kafka, nats-py
//! and the CloudEvents SDK, pinned.
//!
//! Invariant: a missing venv or a failing script fails the test with what
//! the script printed and how to install the venv.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The venv's python3.
pub fn oracle_python() -> PathBuf {
    let venv = std::env::var("VIRTSTREAM_ORACLE_VENV")
        .unwrap_or_else(|_| "/opt/virtstream-oracle".to_string());
    let p = std::path::Path::new(&venv).join("bin/python3");
    assert!(
        p.is_file(),
        "{} missing: install the oracle venv with `bash deploy/local-env.sh oracle`",
        p.display()
    );
    p
}

/// Runs `script` (python -c) with `args` and `stdin`; its standard output.
pub fn run_python(what: &str, script: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new(oracle_python())
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Every message of the events stream (`nats URL`) or topic (`kafka
/// BOOTSTRAP`) as tests/oracle/read_events.py decodes it (fastavro from
/// `schemas/`, or confluent-kafka's registry client with `--registry`),
/// one JSON object per message.
pub fn read_events(bus: &str, address: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracle/read_events.py");
    let out = Command::new(oracle_python())
        .arg(&script)
        .args([bus, address])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "read_events.py {bus} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
