//! The system libvirtd (test driver on its default socket, qemu:///system
//! for the QEMU suite): checked, started when missing and allowed,
//! restarted on request; domain XML for tests.
//!
//! Invariants:
//! - libvirtd is started only when running as root, else a missing daemon
//!   is a failure saying how to start it;
//! - test-side libvirt errors are asserted on, not printed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::TEST_URI;

/// Defines and starts `name`, suspends/resumes it `pairs` times `pace`
/// apart, then destroys and undefines it, on its own thread.
pub fn burst(name: String, pairs: usize, pace: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let conn = virt::connect::Connect::open(Some(TEST_URI)).unwrap();
        let d = conn
            .define_domain_xml(&test_domain_xml(&name, &new_uuid()))
            .unwrap();
        d.create().unwrap();
        for _ in 0..pairs {
            d.suspend().unwrap();
            std::thread::sleep(pace);
            d.resume().unwrap();
            std::thread::sleep(pace);
        }
        d.destroy().unwrap();
        d.undefine().unwrap();
    })
}

/// The scripted lifecycle of a persistent test-driver domain: define,
/// start, suspend, resume, destroy, start, shut down, undefine.
pub fn scripted_lifecycle(conn: &virt::connect::Connect, name: &str) {
    let d = conn
        .define_domain_xml(&test_domain_xml(name, &new_uuid()))
        .unwrap();
    d.create().unwrap();
    d.suspend().unwrap();
    d.resume().unwrap();
    d.destroy().unwrap();
    d.create().unwrap();
    d.shutdown().unwrap();
    d.undefine().unwrap();
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Makes sure the system libvirtd answers on the test driver socket;
/// starts virtlogd + libvirtd when running as root and they are down.
pub fn ensure_libvirtd() {
    // Test-side libvirt errors are asserted on, not printed.
    virt::error::clear_error_callback();
    if virsh_ok() {
        return;
    }
    assert!(
        is_root(),
        "libvirtd is not answering on {TEST_URI}: start it with `bash deploy/local-env.sh start`"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local-env.sh");
    let st = Command::new("bash")
        .arg(script)
        .arg("start")
        .status()
        .unwrap();
    assert!(st.success(), "deploy/local-env.sh start failed");
    assert!(virsh_ok(), "libvirtd still not answering on {TEST_URI}");
}

/// Kills the system libvirtd, keeps it down for `downtime`, starts it again.
/// Only the system daemon (its pid file): the private daemons other tests
/// run (`libvirt_host`) are left alone.
pub fn restart_libvirtd(downtime: Duration) {
    let pid: i32 = std::fs::read_to_string("/run/libvirtd.pid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("the system libvirtd writes /run/libvirtd.pid");
    super::unsafe_kill(pid as u32, libc::SIGTERM);
    let end = Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < end, "libvirtd did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(downtime);
    let st = Command::new("libvirtd")
        .arg("--daemon")
        .status()
        .expect("libvirtd binary");
    assert!(st.success(), "libvirtd --daemon failed");
    let end = Instant::now() + Duration::from_secs(20);
    while !virsh_ok() {
        assert!(Instant::now() < end, "libvirtd did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn virsh_ok() -> bool {
    Command::new("virsh")
        .args(["-c", TEST_URI, "list", "--all"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn test_domain_xml(name: &str, uuid: &str) -> String {
    format!(
        "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory>8192</memory>\
         <vcpu>1</vcpu><os><type>hvm</type></os></domain>"
    )
}

pub fn qemu_domain_xml(name: &str, uuid: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>\
         <memory unit='MiB'>32</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>"
    )
}

pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}
