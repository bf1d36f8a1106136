//! Part 2: how fast a trivial action (`/bin/true`) runs for a burst of
//! libvirt events — the agent's `[[actions]]` beside the `virsh event |
//! while read` loop an operator writes instead — each on a fresh private
//! libvirtd under the same load.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{common, load, procs};

const SESSIONS: usize = 2;
const DOMAINS_PER_SESSION: usize = 4;
/// Every load event's action must have run this long after the load.
const DEADLINE: Duration = Duration::from_secs(120);
/// ... and the count must not stand still this long meanwhile.
const STALL: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(10);
const RUNS: &str = "virtstream_action_runs_total{action=\"true\"}";

/// What one run measured.
struct Measured {
    label: String,
    /// Load start → the command ran for the last load event (None: not
    /// every load event's command ran).
    secs: Option<f64>,
    load_secs: f64,
    /// Commands run for load events.
    handled: u64,
    /// CPU seconds of the process tree: own, and with reaped commands.
    cpu_own: f64,
    cpu_all: f64,
    libvirtd_rate: f64,
    notes: String,
}

/// CPU seconds of `root` and its living descendants: (utime + stime,
/// that plus the cutime + cstime of the children they reaped).
fn tree_cpu(root: u32) -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut all: Vec<(u32, u32, f64, f64)> = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let n = |i: usize| f[i].parse::<f64>().unwrap_or(0.0) / hz;
        all.push((pid, f[1].parse().unwrap_or(0), n(11) + n(12), n(13) + n(14)));
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(all.iter().filter(|x| x.1 == p).map(|x| x.0));
        i += 1;
    }
    let mine = all.iter().filter(|x| tree.contains(&x.0));
    let own: f64 = mine.clone().map(|x| x.2).sum();
    let reaped: f64 = mine.map(|x| x.3).sum();
    (own, own + reaped)
}

/// A private libvirtd with the load's domains and the reference client.
/// (Fields drop in order: the daemon last.)
struct Host {
    reference: load::Reference,
    _conn: virt::connect::Connect,
    domains: Vec<Vec<String>>,
    uri: String,
    _host: common::libvirt_host::LibvirtHost,
}

impl Host {
    fn start() -> Host {
        let host = common::libvirt_host::LibvirtHost::start();
        let uri = host.test_uri();
        let conn = virt::connect::Connect::open(Some(&uri)).unwrap();
        let domains = load::define(&conn, SESSIONS, DOMAINS_PER_SESSION);
        let reference = load::Reference::start(&uri);
        Host {
            reference,
            _conn: conn,
            domains,
            uri,
            _host: host,
        }
    }

    /// Runs the load; fails on a virsh error.
    fn load(&self, e: u64) -> Result<(), String> {
        let logs = tempfile::tempdir().unwrap();
        let errors = load::run(&self.uri, &self.domains, e, logs.path());
        if errors > 0 {
            return Err(format!(
                "{errors} virsh commands failed (see {})",
                logs.keep().display()
            ));
        }
        Ok(())
    }

    /// libvirtd's delivery rate, or the failure when the reference did
    /// not see every load event.
    fn rate(&self, e: u64) -> Result<f64, String> {
        self.reference
            .rate(e as usize, Duration::from_secs(30))
            .ok_or_else(|| {
                format!(
                    "the reference virsh event printed {} of {e} load events",
                    self.reference.count()
                )
            })
    }
}

/// Polls `count` until it reaches `target` (then its time), the deadline
/// after `load_end` passes or it stands still for [`STALL`].
fn wait_count(
    mut count: impl FnMut() -> u64,
    target: u64,
    load_end: Instant,
) -> (Option<Instant>, u64) {
    let mut last = 0;
    let mut moved = Instant::now();
    loop {
        let now = Instant::now();
        let c = count();
        if c >= target {
            return (Some(now), c);
        }
        if c != last {
            last = c;
            moved = now;
        }
        if now > load_end + DEADLINE || moved.elapsed() > STALL {
            return (None, c);
        }
        std::thread::sleep(POLL);
    }
}

fn agent_run(nats_url: &str, e: u64, concurrency: Option<usize>) -> Result<Measured, String> {
    let host = Host::start();
    let label = match concurrency {
        None => "agent, concurrency default (1)".to_string(),
        Some(c) => format!("agent, concurrency {c}"),
    };
    let extra = format!(
        "[[actions]]\nname = \"true\"\ncommand = [\"/bin/true\"]\n{}",
        concurrency.map_or(String::new(), |c| format!("concurrency = {c}\n"))
    );
    let mut agent = common::Agent::new(&host.uri, Some(nats_url), &extra);
    agent.env.push(("VIRTSTREAM_LOG".into(), "info".into()));
    agent.start();
    agent.wait_ready(Duration::from_secs(60));
    let runs = |a: &common::Agent| a.metric(RUNS) as u64;
    // The start's reconcile events run the action too: counted before.
    let base = procs::settle("the action runs", || runs(&agent));
    let pid = agent.pid().expect("agent running");
    let cpu0 = tree_cpu(pid);
    let t0 = Instant::now();
    host.load(e)?;
    let load_end = Instant::now();
    let (done, reached) = wait_count(|| runs(&agent) - base, e, load_end);
    let cpu1 = tree_cpu(pid);
    // Nothing more comes (no event run twice).
    std::thread::sleep(Duration::from_secs(1));
    let handled = runs(&agent) - base;
    let failures = agent.metric("virtstream_action_failures_total");
    let dead = agent.metric("virtstream_action_dead_lettered_total");
    let dead_file = agent
        .dir
        .path()
        .join("journal")
        .join(virtstream::sinks::actions::DEAD_LETTER_FILE);
    let dropped = agent.metric("virtstream_libvirt_events_dropped");
    let rate = host.rate(e)?;
    let code = agent.terminate();
    let mut wrong = Vec::new();
    if done.is_none() {
        wrong.push(format!(
            "the action ran for {reached} of {e} load events (deadline {DEADLINE:?} after the load, or {STALL:?} without progress)"
        ));
    }
    if handled != e {
        wrong.push(format!("{handled} runs for {e} load events"));
    }
    if failures > 0.0 || dead > 0.0 || dead_file.exists() {
        wrong.push(format!(
            "{failures} failed attempts, {dead} dead-lettered ({})",
            dead_file.display()
        ));
    }
    if dropped > 0.0 {
        wrong.push(format!("{dropped} events dropped by the agent"));
    }
    if code != Some(0) {
        wrong.push(format!("SIGTERM exit {code:?}"));
    }
    if !wrong.is_empty() {
        let keep = std::env::temp_dir().join("virtstream-bench-hooks-actions.log");
        let _ = std::fs::copy(agent.log_path(), &keep);
        return Err(format!(
            "actions: {label}: {} (agent log {})",
            wrong.join("; "),
            keep.display()
        ));
    }
    drop(host);
    Ok(Measured {
        label,
        secs: done.map(|d| (d - t0).as_secs_f64()),
        load_secs: (load_end - t0).as_secs_f64(),
        handled,
        cpu_own: cpu1.0 - cpu0.0,
        cpu_all: cpu1.1 - cpu0.1,
        libvirtd_rate: rate,
        notes: format!("base {base} reconcile runs before the load"),
    })
}

/// The loop's process group (bash, virsh, the subshell, its commands):
/// killed and reaped on drop, also on an early return.
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the group is the
        // loop's own (`process_group(0)`), started by this benchmark.
        unsafe {
            libc::kill(-(self.0.id() as i32), libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

/// The operator's loop: bash reading `virsh event --loop --all`, running
/// `/bin/true` per line, echoing its count.
fn baseline_run(e: u64) -> Result<Measured, String> {
    let host = Host::start();
    let label = "bash loop (virsh event, while read, /bin/true)".to_string();
    let script = format!(
        "virsh -c '{}' event --loop --all | {{ n=0; while read -r line; do /bin/true; n=$((n+1)); echo \"$n\"; done; }}",
        host.uri
    );
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut group = Group(
        Command::new("bash")
            .arg("-c")
            .arg(&script)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err.reopen().unwrap())
            .spawn()
            .expect("bash runs"),
    );
    // (lines handled, when the last one was).
    let seen: Arc<Mutex<(u64, Instant)>> = Arc::new(Mutex::new((0, Instant::now())));
    let out = group.0.stdout.take().unwrap();
    let s = seen.clone();
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(n) = l.trim().parse::<u64>() {
                *s.lock().unwrap() = (n, Instant::now());
            }
        }
    });
    let count = || seen.lock().unwrap().0;
    // Ready once it handled a sentinel's events.
    let conn = virt::connect::Connect::open(Some(&host.uri)).unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while count() == 0 {
        assert!(Instant::now() < end, "the loop handled nothing in 20 s");
        let d = conn
            .define_domain_xml(&common::test_domain_xml(
                "bench-loop-sentinel",
                &common::new_uuid(),
            ))
            .unwrap();
        d.undefine().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(conn);
    let base = procs::settle("the loop's count", count);
    let pid = group.0.id();
    let cpu0 = tree_cpu(pid);
    let t0 = Instant::now();
    host.load(e)?;
    let load_end = Instant::now();
    let (done, reached) = wait_count(|| count() - base, e, load_end);
    let cpu1 = tree_cpu(pid);
    // The time of the line that reached E (it prints each).
    let done = done.map(|_| seen.lock().unwrap().1);
    let rate = host.rate(e)?;
    drop(group);
    let _ = reader.join();
    let stderr = std::fs::read_to_string(err.path()).unwrap_or_default();
    drop(host);
    Ok(Measured {
        label,
        secs: done.map(|d| (d - t0).as_secs_f64()),
        load_secs: (load_end - t0).as_secs_f64(),
        handled: reached,
        cpu_own: cpu1.0 - cpu0.0,
        cpu_all: cpu1.1 - cpu0.1,
        libvirtd_rate: rate,
        notes: if done.is_none() {
            format!(
                "handled {reached} of {e}: {}",
                stderr.lines().take(3).collect::<Vec<_>>().join(" / ")
            )
        } else {
            String::new()
        },
    })
}

fn print_run(m: &Measured) {
    println!(
        "{:<45}: load {:.2} s, last action {} s, CPU {:.2} s own / {:.2} s with commands, \
         libvirtd {:.0} events/s, load avg {}{}",
        m.label,
        m.load_secs,
        m.secs.map_or("—".into(), |s| format!("{s:.2}")),
        m.cpu_own,
        m.cpu_all,
        m.libvirtd_rate,
        procs::loadavg(),
        if m.notes.is_empty() {
            String::new()
        } else {
            format!(" | {}", m.notes)
        }
    );
}

/// Runs part 2: the agent at each concurrency, then the loop; returns
/// what failed.
pub fn run(nats_url: &str, e: u64, concurrency: &[Option<usize>]) -> Vec<String> {
    println!(
        "\naction throughput: {e} suspend/resume events, {SESSIONS} sessions × {DOMAINS_PER_SESSION} domains, \
         action /bin/true; load average {}",
        procs::loadavg()
    );
    let mut failed = Vec::new();
    let mut rows = Vec::new();
    for &c in concurrency {
        match agent_run(nats_url, e, c) {
            Ok(m) => {
                print_run(&m);
                rows.push(m);
            }
            Err(f) => {
                println!("{f}");
                failed.push(f);
            }
        }
    }
    let baseline = match baseline_run(e) {
        Ok(m) => {
            print_run(&m);
            Some(m)
        }
        Err(f) => {
            let f = format!("actions: baseline: {f}");
            println!("{f}");
            failed.push(f);
            None
        }
    };
    let rate = |m: &Measured| m.secs.map(|s| e as f64 / s);
    println!("\n| run | actions/s (load start → last action) | vs loop | load s | libvirtd events/s | CPU µs/event own | CPU µs/event with commands | handled |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for m in rows.iter().chain(baseline.iter()) {
        let ratio = match (rate(m), baseline.as_ref().and_then(rate)) {
            (Some(a), Some(b)) => format!("{:.2}×", a / b),
            _ => "—".into(),
        };
        println!(
            "| {} | {} | {ratio} | {:.2} | {:.0} | {:.0} | {:.0} | {} |",
            m.label,
            rate(m).map_or("incomplete".into(), |r| format!("{r:.0}")),
            m.load_secs,
            m.libvirtd_rate,
            m.cpu_own * 1e6 / e as f64,
            m.cpu_all * 1e6 / e as f64,
            m.handled
        );
    }
    failed
}
