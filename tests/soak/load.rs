//! Randomized lifecycle load: long-lived interactive `virsh` sessions fed
//! commands on stdin (one process per session, far faster than one per
//! command), choices drawn from a seeded RNG. Commands that are invalid
//! for a domain's current state just fail in virsh; that is fine.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// xorshift64*: small, seedable, good enough to pick actions.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, never zero.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An interactive `virsh -c URI` reading commands from a pipe.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Session {
    pub fn open(uri: &str, log: &Path) -> Session {
        let log = std::fs::File::create(log).unwrap();
        let mut child = Command::new("virsh")
            .args(["-q", "-c", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("virsh (libvirt-clients) must be installed");
        let stdin = child.stdin.take();
        Session { child, stdin }
    }

    pub fn send(&mut self, cmd: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "{cmd}");
        }
    }

    /// Ends the session after the commands sent so far and waits for it
    /// (at most `timeout`, then it is killed).
    pub fn finish(mut self, timeout: Duration) -> bool {
        self.send("quit");
        drop(self.stdin.take());
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

pub fn test_domain_xml(name: &str, uuid: &str) -> String {
    format!(
        "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory>8192</memory>\
         <vcpu>1</vcpu><os><type>hvm</type></os></domain>"
    )
}

/// One domain of the load, with its XML file.
#[derive(Clone, Debug)]
pub struct Dom {
    pub name: String,
    pub uuid: String,
    pub xml: PathBuf,
}

/// The domains a cell drives: persistent ones (defined, started,
/// suspended, …, sometimes undefined and defined again) and transient
/// slots (created, suspended, resumed, destroyed).
pub struct Plan {
    pub persistent: Vec<Dom>,
    pub transient: Vec<Dom>,
}

impl Plan {
    pub fn new(dir: &Path, prefix: &str, persistent: usize, transient: usize) -> Plan {
        let mk = |kind: &str, i: usize| {
            let name = format!("{prefix}-{kind}{i:02}");
            let uuid = uuid::Uuid::new_v4().to_string();
            let xml = dir.join(format!("{name}.xml"));
            std::fs::write(&xml, test_domain_xml(&name, &uuid)).unwrap();
            Dom { name, uuid, xml }
        };
        Plan {
            persistent: (0..persistent).map(|i| mk("p", i)).collect(),
            transient: (0..transient).map(|i| mk("t", i)).collect(),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &Dom> {
        self.persistent.iter().chain(&self.transient)
    }
}

/// Defines every persistent domain of the plan and starts about half.
pub fn define_all(uri: &str, plan: &Plan, rng: &mut Rng, log: &Path) {
    let mut s = Session::open(uri, log);
    for d in &plan.persistent {
        s.send(&format!("define {}", d.xml.display()));
    }
    for d in &plan.persistent {
        if rng.below(2) == 0 {
            s.send(&format!("start {}", d.name));
        }
    }
    assert!(
        s.finish(Duration::from_secs(60)),
        "virsh did not define the load's domains within 60 s"
    );
}

/// Defines `n` background domains through one session and starts every
/// other one (listings and reconciles then take time).
pub fn background(uri: &str, dir: &Path, prefix: &str, n: usize) {
    let mut s = Session::open(uri, &dir.join("virsh-background.log"));
    for i in 0..n {
        let name = format!("{prefix}-bg{i:04}");
        let xml = dir.join(format!("{name}.xml"));
        std::fs::write(
            &xml,
            test_domain_xml(&name, &uuid::Uuid::new_v4().to_string()),
        )
        .unwrap();
        s.send(&format!("define {}", xml.display()));
    }
    for i in (0..n).step_by(2) {
        s.send(&format!("start {prefix}-bg{i:04}"));
    }
    assert!(
        s.finish(Duration::from_secs(120)),
        "virsh did not define {n} background domains within 120 s"
    );
}

/// Parallel sessions running random commands until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub commands: Arc<AtomicU64>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(uri: &str, plan: &Plan, seed: u64, sessions: usize, log_dir: &Path) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let commands = Arc::new(AtomicU64::new(0));
        let workers = (0..sessions)
            .map(|w| {
                let (stop, commands) = (stop.clone(), commands.clone());
                let mut rng = Rng::new(seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9));
                let persistent = plan.persistent.clone();
                let transient = plan.transient.clone();
                let uri = uri.to_string();
                let log = log_dir.join(format!("virsh-session-{w}.log"));
                std::thread::spawn(move || {
                    let mut s = Session::open(&uri, &log);
                    while !stop.load(Ordering::Relaxed) {
                        s.send(&pick(&mut rng, &persistent, &transient));
                        commands.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(4 + rng.below(12)));
                    }
                    s.finish(Duration::from_secs(30));
                })
            })
            .collect();
        Load {
            stop,
            commands,
            workers,
        }
    }

    /// Stops sending and waits until every session has run what it was
    /// sent and exited.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            let _ = w.join();
        }
        self.commands.load(Ordering::Relaxed)
    }
}

fn pick(rng: &mut Rng, persistent: &[Dom], transient: &[Dom]) -> String {
    let r = rng.below(100);
    if r < 70 {
        let d = &persistent[rng.below(persistent.len() as u64) as usize];
        let action =
            ["start", "suspend", "resume", "destroy", "shutdown", "start"][rng.below(6) as usize];
        format!("{action} {}", d.name)
    } else if r < 95 {
        let d = &transient[rng.below(transient.len() as u64) as usize];
        match rng.below(4) {
            0 => format!("create {}", d.xml.display()),
            1 => format!("suspend {}", d.name),
            2 => format!("resume {}", d.name),
            _ => format!("destroy {}", d.name),
        }
    } else if r < 97 {
        // A few undefines: a running domain turns transient, a shut-off
        // one is gone.
        let d = &persistent[rng.below(persistent.len() as u64) as usize];
        format!("undefine {}", d.name)
    } else {
        let d = &persistent[rng.below(persistent.len() as u64) as usize];
        format!("define {}", d.xml.display())
    }
}
