//! Part 1: the wall time of one qemu hook call as libvirtd makes it, the
//! agent running and stopped, beside a do-nothing hook script and
//! `/bin/true`; then the proof that no call was lost.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use virtstream::model::Origin;

use crate::{common, procs};

/// Calls per case not measured (page cache, first connections).
const WARMUP: usize = 20;
const GUEST: &str = "bench-hook";

/// One way of running the hook.
struct Case {
    label: &'static str,
    program: PathBuf,
    /// Arguments before libvirt's four.
    pre: Vec<String>,
    /// Arguments after them.
    post: Vec<String>,
    /// The domain UUID in the XML on stdin (one per virtstream case, to
    /// count its records).
    uuid: String,
    times: Vec<Duration>,
}

impl Case {
    fn new(label: &'static str, program: &Path) -> Case {
        Case {
            label,
            program: program.to_path_buf(),
            pre: Vec::new(),
            post: Vec::new(),
            uuid: common::new_uuid(),
            times: Vec::new(),
        }
    }

    /// One call as libvirtd makes it: spawn, the XML on stdin, close, wait.
    fn call(&mut self, stderr: &std::fs::File, keep: bool) {
        let xml = common::test_domain_xml(GUEST, &self.uuid);
        let t = Instant::now();
        let mut c = Command::new(&self.program)
            .args(&self.pre)
            .args([GUEST, "started", "begin", "-"])
            .args(&self.post)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(stderr.try_clone().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", self.program.display()));
        // A script that does not read its stdin may have exited already.
        let _ = c.stdin.take().unwrap().write_all(xml.as_bytes());
        let st = c.wait().unwrap();
        let took = t.elapsed();
        assert!(st.success(), "{}: {st} (a hook always exits 0)", self.label);
        if keep {
            self.times.push(took);
        }
    }

    fn calls(&self) -> usize {
        WARMUP + self.times.len()
    }
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Nearest-rank percentile.
fn pct(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Calls `cases` in turn, `WARMUP + n` rounds (the first not kept).
fn rounds(cases: &mut [&mut Case], n: usize, stderr: &std::fs::File) {
    for i in 0..WARMUP + n {
        for c in cases.iter_mut() {
            c.call(stderr, i >= WARMUP);
        }
    }
}

/// Prints one phase's table: ratios to `base` (the do-nothing script).
fn table(phase: &str, cases: &[&Case], base: &Case) {
    let b: Vec<Duration> = sorted(base);
    println!("\n{phase}\n");
    println!("| case | calls | p50 ms | p99 ms | max ms | p50 / do-nothing | p99 / do-nothing |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for c in cases {
        let t = sorted(c);
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            c.label,
            t.len(),
            ms(pct(&t, 0.5)),
            ms(pct(&t, 0.99)),
            ms(t[t.len() - 1]),
            pct(&t, 0.5).as_secs_f64() / pct(&b, 0.5).as_secs_f64(),
            pct(&t, 0.99).as_secs_f64() / pct(&b, 0.99).as_secs_f64(),
        );
    }
}

fn sorted(c: &Case) -> Vec<Duration> {
    let mut t = c.times.clone();
    t.sort();
    t
}

/// HOOK records of `uuid` on the agent's subjects: (records, distinct
/// seqs).
fn hook_records(nats_url: &str, filter: &str, uuid: &str) -> (usize, usize) {
    let msgs = common::fetch(nats_url, "VIRT_EVENTS", filter);
    let mine: Vec<u64> = msgs
        .iter()
        .filter(|m| m.event.domain.uuid == uuid && m.event.origin == Origin::HOOK)
        .filter(|m| {
            m.event
                .hook
                .as_ref()
                .is_some_and(|h| h.operation == "started")
        })
        .map(|m| m.event.seq)
        .collect();
    let distinct: std::collections::HashSet<u64> = mine.iter().copied().collect();
    (mine.len(), distinct.len())
}

/// Waits (at most 60 s) until every one of `cases`' calls is on NATS as
/// one HOOK record; the failures otherwise.
fn on_the_bus(nats_url: &str, filter: &str, cases: &[&Case]) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let counts: Vec<(usize, usize)> = cases
            .iter()
            .map(|c| hook_records(nats_url, filter, &c.uuid))
            .collect();
        let done = cases.iter().zip(&counts).all(|(c, (n, _))| *n >= c.calls());
        if done || Instant::now() > end {
            return cases
                .iter()
                .zip(&counts)
                .filter(|(c, (n, d))| *n != c.calls() || d != n)
                .map(|(c, (n, d))| {
                    format!(
                        "hooks: {}: {n} HOOK records ({d} distinct) on NATS for {} calls",
                        c.label,
                        c.calls()
                    )
                })
                .collect();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs part 1 with `n` measured calls per case; returns what failed.
pub fn run(nats_url: &str, n: usize) -> Vec<String> {
    let mut failed = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hooks.sock");
    let spool = dir.path().join("spool/hooks.spool");
    let bin = procs::agent_binary();
    let hook_bin = PathBuf::from(env!("CARGO_BIN_EXE_virtstream-hook"));
    // Written before anything runs concurrently (an executable still open
    // for writing in a forked child fails with ETXTBSY). The README's hook
    // script.
    let hook = script(
        dir.path(),
        "qemu",
        &format!(
            "'{}' --socket '{}' --spool '{}' -- qemu \"$@\" || true\nexit 0",
            hook_bin.display(),
            socket.display(),
            spool.display()
        ),
    );
    let noop = script(dir.path(), "noop", "exit 0");
    let stderr_path = dir.path().join("calls.err");
    let stderr = std::fs::File::create(&stderr_path).unwrap();

    let host = common::libvirt_host::LibvirtHost::start();
    let uri = host.test_uri();
    let mut agent = common::Agent::new(
        &uri,
        Some(nats_url),
        &format!(
            "[hooks]\nsocket = \"{}\"\nspool = \"{}\"\n",
            socket.display(),
            spool.display()
        ),
    );
    agent.env.push(("VIRTSTREAM_LOG".into(), "info".into()));
    agent.start();
    agent.wait_ready(Duration::from_secs(60));
    let filter = agent.filter();

    let paths = vec![
        "--socket".into(),
        socket.display().to_string(),
        "--spool".into(),
        spool.display().to_string(),
    ];
    let mut via_script = Case::new("README hook script (virtstream-hook), agent running", &hook);
    let mut lean = Case::new("virtstream-hook binary, agent running", &hook_bin);
    lean.pre = vec!["qemu".into()];
    lean.post = paths.clone();
    let mut direct = Case::new("virtstream hook (agent binary), agent running", &bin);
    direct.pre = vec!["hook".into(), "qemu".into()];
    direct.post = paths.clone();
    let mut base1 = Case::new("do-nothing script", &noop);
    let mut floor1 = Case::new("/bin/true", Path::new("/bin/true"));
    println!(
        "\nhook latency: {n} calls per case (+{WARMUP} warm-up), cases in turn; load average {}",
        procs::loadavg()
    );
    rounds(
        &mut [
            &mut via_script,
            &mut lean,
            &mut direct,
            &mut base1,
            &mut floor1,
        ],
        n,
        &stderr,
    );
    let load_running = procs::loadavg();
    if spool.exists() {
        failed.push(format!(
            "hooks: the agent was running, yet {} holds {} calls",
            spool.display(),
            std::fs::read_to_string(&spool)
                .unwrap_or_default()
                .lines()
                .count()
        ));
    }
    failed.extend(on_the_bus(
        nats_url,
        &filter,
        &[&via_script, &lean, &direct],
    ));

    // The agent stopped: calls go to the spool.
    let code = agent.terminate();
    if code != Some(0) {
        failed.push(format!("hooks: the agent's SIGTERM exit was {code:?}"));
    }
    let mut spooled = Case::new("README hook script, agent stopped (spool)", &hook);
    let mut spooled_direct = Case::new("virtstream hook (agent binary), agent stopped", &bin);
    spooled_direct.pre = direct.pre.clone();
    spooled_direct.post = paths;
    let mut base2 = Case::new("do-nothing script", &noop);
    let mut floor2 = Case::new("/bin/true", Path::new("/bin/true"));
    rounds(
        &mut [&mut spooled, &mut spooled_direct, &mut base2, &mut floor2],
        n,
        &stderr,
    );
    let load_stopped = procs::loadavg();
    let lines = std::fs::read_to_string(&spool)
        .unwrap_or_default()
        .lines()
        .count();
    if lines != spooled.calls() + spooled_direct.calls() {
        failed.push(format!(
            "hooks: the spool holds {lines} calls of {}",
            spooled.calls() + spooled_direct.calls()
        ));
    }
    let dropped = virtstream::source::hooks::dropped_path(&spool);
    if dropped.exists() {
        failed.push(format!("hooks: calls dropped ({})", dropped.display()));
    }
    // Restarted, the agent journals the spool.
    let t = Instant::now();
    agent.start();
    agent.wait_ready(Duration::from_secs(60));
    let bus = on_the_bus(nats_url, &filter, &[&spooled, &spooled_direct]);
    let drained = t.elapsed();
    if spool.exists() {
        failed.push("hooks: the spool is still there after the restart".into());
    }
    failed.extend(bus);
    let code = agent.terminate();
    if code != Some(0) {
        failed.push(format!("hooks: the agent's SIGTERM exit was {code:?}"));
    }

    table(
        &format!("agent running (load average {load_running})"),
        &[&via_script, &lean, &direct, &base1, &floor1],
        &base1,
    );
    table(
        &format!("agent stopped (load average {load_stopped})"),
        &[&spooled, &spooled_direct, &base2, &floor2],
        &base2,
    );
    println!(
        "\nevery call on NATS as a HOOK record: {}; spool of {} calls journaled and on NATS {:.2} s after the restart began",
        if failed.is_empty() { "yes" } else { "NO" },
        spooled.calls() + spooled_direct.calls(),
        drained.as_secs_f64()
    );
    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    if !err.is_empty() {
        let shown: Vec<&str> = err.lines().take(5).collect();
        println!(
            "hook stderr ({} lines): {}",
            err.lines().count(),
            shown.join(" / ")
        );
    }
    drop(host);
    failed
}
