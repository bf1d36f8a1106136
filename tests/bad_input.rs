//! Bad input is refused with the cause named, and nothing accepted is lost:
//! unknown config keys, an unwritable journal directory, NATS unreachable
//! at start (the agent journals, reports not ready, delivers later), and an
//! existing stream unsuitable for effectively-once delivery.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use virt::connect::Connect;

fn write_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("agent.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn unknown_config_key_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[journal]\npath = \"{}\"\n[nats]\nurl = \"nats://127.0.0.1:1\"\nstreem = \"X\"\n",
            dir.path().join("j").display()
        ),
    );
    for cmd in ["check-config", "run"] {
        let out = Command::new(Agent::bin())
            .args([cmd, "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("nats.streem") && err.contains("unknown field"),
            "{cmd}: {err}"
        );
    }
}

#[test]
fn wrong_type_and_missing_file_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[journal]\npath = \"{}\"\nmax_bytes = \"lots\"\n",
            dir.path().join("j").display()
        ),
    );
    let out = Command::new(Agent::bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("journal.max_bytes"));
    let out = Command::new(Agent::bin())
        .args(["check-config", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
    let out = Command::new(Agent::bin())
        .args(["run", "--bogus-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "usage errors exit 64");
}

#[test]
fn unwritable_journal_dir_exits_64_naming_journal_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let journal = dir.path().join("journal");
    std::fs::create_dir(&journal).unwrap();
    std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(0o000)).unwrap();
    let cfg = write_config(
        dir.path(),
        &format!("[journal]\npath = \"{}\"\n", journal.display()),
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    // root bypasses permissions: run as nobody to meet an unreadable dir.
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            Agent::bin(),
        ]);
        c
    } else {
        Command::new(Agent::bin())
    };
    let out = cmd
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("journal.path") && err.contains("Permission denied"),
        "{err}"
    );

    // A path below a regular file can never be a directory (root too).
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let cfg = write_config(
        dir.path(),
        &format!("[journal]\npath = \"{}/j\"\n", file.display()),
    );
    let out = Command::new(Agent::bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("journal.path"), "{err}");
}

#[test]
fn check_config_prints_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "very-secret-token").unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[journal]\npath = \"{}\"\n[nats]\nurl = \"nats://127.0.0.1:1\"\ntoken_file = \"{}\"\n",
            dir.path().join("j").display(),
            token.display()
        ),
    );
    let out = Command::new(Agent::bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .env("VIRTSTREAM_LIBVIRT_URI", "test:///default")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("uri = \"test:///default\""),
        "env override shown: {text}"
    );
    assert!(
        text.contains("events_stream = \"VIRT_EVENTS\""),
        "defaults shown: {text}"
    );
    assert!(
        text.contains("<redacted>") && !text.contains(token.to_str().unwrap()),
        "{text}"
    );
}

#[test]
fn nats_unreachable_at_start_journals_then_delivers() {
    ensure_libvirtd();
    let oracle = Oracle::start(TEST_URI);
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut agent = Agent::new(TEST_URI, Some(&url), "");
    agent.start();
    // libvirt connected, journal writable, sink not: not ready.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Some((503, body)) = agent.http("/readyz") {
            if body.contains("libvirt: connected") {
                break body;
            }
        }
        assert!(
            std::time::Instant::now() < end,
            "agent never reported libvirt connected"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        body.contains("not ready") && body.contains("sink nats:"),
        "{body}"
    );

    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let name = unique("offline");
    let d = conn
        .define_domain_xml(&test_domain_xml(&name, &new_uuid()))
        .unwrap();
    d.create().unwrap();
    d.destroy().unwrap();
    d.undefine().unwrap();
    // The events wait in the journal.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, m) = agent.http("/metrics").unwrap();
        let backlog = m
            .lines()
            .find(|l| l.starts_with("virtstream_journal_backlog_entries "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if backlog >= 5.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "journal backlog never grew: {m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(agent.http("/readyz").unwrap().0, 503);

    // NATS appears on that port: everything is delivered, once.
    let nats = NatsServer::start_on(port);
    agent.wait_ready(Duration::from_secs(30));
    let want = oracle.for_domain(&name);
    assert_eq!(want.len(), 4);
    let msgs = wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(30),
        "journaled events",
        |m| m.iter().filter(|s| s.event.domain.name == name).count() >= 4,
    );
    assert_contiguous(&msgs);
    let got: Vec<(String, String)> = msgs
        .iter()
        .filter(|m| m.event.domain.name == name)
        .map(|m| (m.event.event.to_string(), m.event.detail.to_string()))
        .collect();
    let want: Vec<(String, String)> = want.into_iter().map(|e| (e.event, e.detail)).collect();
    assert_eq!(got, want);
}

#[test]
fn unsuitable_existing_stream_is_refused() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    // Someone created VIRT_EVENTS as a memory stream without de-duplication.
    rt().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "VIRT_EVENTS".into(),
            subjects: vec!["virt.events.v1.>".into()],
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let mut agent = Agent::new(TEST_URI, Some(&nats.url()), "");
    agent.start();
    let end = std::time::Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(code) = agent.try_exit() {
            break code;
        }
        assert!(
            std::time::Instant::now() < end,
            "agent kept running with an unsuitable stream"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, Some(1));
    let log = agent.log();
    assert!(
        log.contains("VIRT_EVENTS is unsuitable") && log.contains("memory"),
        "{log}"
    );
}
