//! A private libvirt host for tests that must not disturb the shared
//! daemon: `deploy/libvirt-host.sh` runs virtlogd + libvirtd in their own
//! mount namespace on a temporary directory (own sockets, domains, config,
//! host UUID). Restarting it or defining thousands of domains on it is
//! invisible to other tests. Killed on drop.
//!
//! The test driver forgets its domains when the last connection closes,
//! so the host keeps one open (`virsh event --loop`, output discarded)
//! for its whole life, reopened after [`LibvirtHost::restart`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LibvirtHost {
    pub dir: tempfile::TempDir,
    keeper: Option<Child>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/libvirt-host.sh")
}

impl LibvirtHost {
    /// Starts a private libvirtd (needs root), or fails saying why.
    pub fn start() -> LibvirtHost {
        Self::start_with(|_| {})
    }

    /// [`Self::start`], with `setup` run on the host's directory before
    /// the daemons start (e.g. a hook script in `DIR/etc/hooks/qemu`,
    /// which is the daemon's `/etc/libvirt/hooks/qemu`).
    pub fn start_with(setup: impl FnOnce(&Path)) -> LibvirtHost {
        assert!(
            super::is_root(),
            "a private libvirtd needs root (mount namespace): run the tests as root"
        );
        virt::error::clear_error_callback();
        // Under /tmp, never under the directories it bind-mounts over.
        let dir = tempfile::Builder::new()
            .prefix("libvirt-host-")
            .tempdir()
            .unwrap();
        setup(dir.path());
        let mut h = LibvirtHost { dir, keeper: None };
        h.run("start");
        h.keep();
        h
    }

    fn run(&self, cmd: &str) {
        let out = Command::new("bash")
            .arg(script())
            .arg(cmd)
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .output()
            .expect("bash runs deploy/libvirt-host.sh");
        assert!(
            out.status.success(),
            "deploy/libvirt-host.sh {cmd} {} failed: {}",
            self.dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Holds a connection open so the test driver keeps its domains.
    fn keep(&mut self) {
        if let Some(mut k) = self.keeper.take() {
            let _ = k.kill();
            let _ = k.wait();
        }
        let child = Command::new("virsh")
            .args(["-c", &self.test_uri(), "event", "--all", "--loop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("virsh (libvirt-clients) must be installed");
        self.keeper = Some(child);
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/libvirt-sock")
    }

    /// The test driver of this daemon.
    pub fn test_uri(&self) -> String {
        format!("test+unix:///default?socket={}", self.socket().display())
    }

    /// QEMU (TCG) on this daemon.
    pub fn qemu_uri(&self) -> String {
        format!("qemu:///system?socket={}", self.socket().display())
    }

    /// The `--migrateuri` for a migration to another host on this machine:
    /// loopback with a free port of its own. Every daemon allocates its
    /// incoming-migration port from the same default range (49152–49215)
    /// without knowing of the others, so two migrations to two hosts at
    /// once could pick the same port ("Failed to find an available port").
    pub fn migrate_uri() -> String {
        format!("tcp://127.0.0.1:{}", super::free_port())
    }

    /// The daemon's log (libvirtd.log in its private /var/log/libvirt).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log/libvirtd.log")).unwrap_or_default()
    }

    /// Kills libvirtd (SIGKILL), keeps it down for `downtime`, starts it
    /// again and waits until it answers. The test driver comes back with
    /// only its default domain.
    pub fn restart(&mut self, downtime: Duration) {
        self.run("stop-libvirtd");
        std::thread::sleep(downtime);
        self.run("start");
        self.keep();
        let end = Instant::now() + Duration::from_secs(20);
        while !Command::new("virsh")
            .args(["-c", &self.test_uri(), "uri"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
        {
            assert!(Instant::now() < end, "private libvirtd did not come back");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        // QEMU guests outlive a killed libvirtd: destroy them first.
        let uri = self.qemu_uri();
        let names = Command::new("virsh")
            .args(["-c", &uri, "list", "--name"])
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for name in names.lines().filter(|l| !l.trim().is_empty()) {
            let _ = Command::new("virsh")
                .args(["-c", &uri, "destroy", name.trim()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut k) = self.keeper.take() {
            let _ = k.kill();
            let _ = k.wait();
        }
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
