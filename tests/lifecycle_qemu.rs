//! A real QEMU domain under TCG (32 MiB, no disk) on `qemu:///system`:
//! start, suspend, resume, save, restore, kill -9 of the qemu process
//! (STOPPED/FAILED), start, destroy, undefine. JetStream must match
//! `virsh event` one to one with the right state_after, whatever order
//! QEMU emits its events in (RESUMED/UNPAUSED arrives before
//! STARTED/BOOTED).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use virt::connect::Connect;

fn virsh(args: &[&str]) {
    let out = Command::new("virsh")
        .args(["-q", "-c", QEMU_URI])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qemu_lifecycle_matches_the_oracle() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let oracle = Oracle::start(QEMU_URI);
    let mut agent = Agent::ready(QEMU_URI, Some(&nats.url()), "");

    let conn = Connect::open(Some(QEMU_URI)).unwrap();
    let name = unique("vsq");
    let d = conn
        .define_domain_xml(&qemu_domain_xml(&name, &new_uuid()))
        .unwrap();
    let save = tempfile::tempdir().unwrap();
    let save_path = save.path().join("dom.save");
    let save_str = save_path.to_str().unwrap();
    let result = std::panic::catch_unwind(|| {
        d.create().unwrap();
        d.suspend().unwrap();
        d.resume().unwrap();
        virsh(&["save", &name, save_str]);
        virsh(&["restore", save_str]);
        // kill -9 of the qemu process: libvirt reports STOPPED/FAILED.
        let pid = std::fs::read_to_string(format!("/var/run/libvirt/qemu/{name}.pid")).unwrap();
        let st = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap();
        assert!(st.success());
        let end = Instant::now() + Duration::from_secs(20);
        while d.is_active().unwrap_or(true) {
            assert!(Instant::now() < end, "killed qemu domain still active");
            std::thread::sleep(Duration::from_millis(50));
        }
        d.create().unwrap();
        d.destroy().unwrap();
    });
    let _ = d.destroy();
    d.undefine().unwrap();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }

    let end = Instant::now() + Duration::from_secs(30);
    while oracle.for_domain(&name).last().map(|e| e.event.as_str()) != Some("UNDEFINED") {
        assert!(
            Instant::now() < end,
            "oracle never saw the domain undefined"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let want = oracle.for_domain(&name);
    assert!(
        want.iter()
            .any(|e| e.event == "STOPPED" && e.detail == "FAILED"),
        "kill -9 should show as STOPPED/FAILED: {want:?}"
    );
    assert!(want
        .iter()
        .any(|e| e.event == "STOPPED" && e.detail == "SAVED"));
    assert!(want
        .iter()
        .any(|e| e.event == "STARTED" && e.detail == "RESTORED"));
    let msgs = wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(60),
        "all qemu events",
        |m| m.iter().filter(|s| s.event.domain.name == name).count() >= want.len(),
    );
    assert_contiguous(&msgs);
    check_domain(&oracle, &msgs, &name, true, 32 * 1024);
    let failed = msgs
        .iter()
        .find(|m| m.event.domain.name == name && m.event.detail.as_str() == "FAILED")
        .unwrap();
    assert_eq!(failed.event.state_after.state.as_str(), "SHUTOFF");
    assert_eq!(failed.event.state_after.reason, "FAILED");
    assert!(failed.event.persistent);
    assert_eq!(agent.terminate(), Some(0), "SIGTERM is a clean exit");
}
