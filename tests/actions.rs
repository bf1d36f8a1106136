//! `[[actions]]` against the real libvirtd test driver: the commands the
//! agent runs for matching events, checked against `virsh event` (the
//! oracle) filtered by the same rule, what the scripts themselves wrote
//! (environment, arguments, stdin), the process table, the dead-letter
//! file and NATS.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use virt::connect::Connect;

/// Writes an executable shell script.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out after {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One line the recording script appended: `name|event|detail|event_id|
/// arg1|arg2|stdin`.
#[derive(Debug)]
struct Run {
    name: String,
    event: String,
    detail: String,
    event_id: String,
    args: (String, String),
    stdin: serde_json::Value,
}

fn runs(p: &Path) -> Vec<Run> {
    lines(p)
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.splitn(7, '|').collect();
            assert_eq!(f.len(), 7, "line {l}");
            Run {
                name: f[0].into(),
                event: f[1].into(),
                detail: f[2].into(),
                event_id: f[3].into(),
                args: (f[4].into(), f[5].into()),
                stdin: serde_json::from_str(f[6]).unwrap_or_else(|e| panic!("{e}: {l}")),
            }
        })
        .collect()
}

/// A script recording each run as one line in `out` (after `pause`).
fn recorder(dir: &Path, out: &Path, pause: &str) -> PathBuf {
    script(
        dir,
        "record.sh",
        &format!(
            "json=$(cat)\n{pause}\nprintf '%s|%s|%s|%s|%s|%s|%s\\n' \"$VIRTSTREAM_DOMAIN_NAME\" \"$VIRTSTREAM_EVENT\" \"$VIRTSTREAM_DETAIL\" \"$VIRTSTREAM_EVENT_ID\" \"$1\" \"$2\" \"$json\" >> {}",
            out.display()
        ),
    )
}

/// The oracle's (event, detail) of `name` that `events` selects.
fn oracle_pairs(oracle: &Oracle, name: &str, events: &[&str]) -> Vec<(String, String)> {
    oracle
        .for_domain(name)
        .into_iter()
        .filter(|e| events.contains(&e.event.as_str()))
        .map(|e| (e.event, e.detail))
        .collect()
}

#[test]
fn an_action_runs_once_per_matching_event_and_never_otherwise() {
    ensure_libvirtd();
    let oracle = Oracle::start(TEST_URI);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("runs.txt");
    let cmd = recorder(work.path(), &out, "");
    let prefix = unique("act-a");
    let mut agent = Agent::ready(
        TEST_URI,
        None,
        &format!(
            "[[actions]]\nname = \"record\"\ncommand = [\"{}\", \"{{event}}\", \"vm={{name}} {{detail}}\"]\n\
             on = {{ event = [\"STARTED\", \"STOPPED\"], domain = \"{prefix}-*\", origin = [\"LIBVIRT\"] }}\n\
             concurrency = 3\n",
            cmd.display()
        ),
    );
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let (one, two, other) = (
        format!("{prefix}-1"),
        format!("{prefix}-2"),
        unique("act-other"),
    );
    scripted_lifecycle(&conn, &one);
    scripted_lifecycle(&conn, &two);
    scripted_lifecycle(&conn, &other);
    wait_until(
        Duration::from_secs(20),
        "oracle sees the lifecycles",
        || oracle.for_domain(&other).last().map(|e| e.event.as_str()) == Some("UNDEFINED"),
    );
    let events = ["STARTED", "STOPPED"];
    let want: usize = [&one, &two]
        .iter()
        .map(|n| oracle_pairs(&oracle, n, &events).len())
        .sum();
    assert_eq!(want, 8, "two starts and two stops per domain");
    wait_until(Duration::from_secs(30), "every matching event ran", || {
        lines(&out).len() >= want
    });
    // Nothing more comes (no duplicate, nothing for the other domain).
    std::thread::sleep(Duration::from_secs(1));
    let got = runs(&out);
    assert_eq!(got.len(), want, "{got:#?}");
    for name in [&one, &two] {
        let mine: Vec<&Run> = got.iter().filter(|r| &r.name == name).collect();
        let pairs: Vec<(String, String)> = mine
            .iter()
            .map(|r| (r.event.clone(), r.detail.clone()))
            .collect();
        assert_eq!(pairs, oracle_pairs(&oracle, name, &events), "{name}");
        for r in mine {
            // Placeholders inside arguments; each stays one argument.
            assert_eq!(r.args.0, r.event);
            assert_eq!(r.args.1, format!("vm={name} {}", r.detail));
            // stdin is the event as `replay` prints it.
            assert_eq!(r.stdin["event_id"], r.event_id.as_str());
            assert_eq!(r.stdin["domain"]["name"], name.as_str());
            assert_eq!(r.stdin["event"], r.event.as_str());
            assert_eq!(r.stdin["origin"], "LIBVIRT");
            assert!(r.stdin["state_after"]["state"].is_string());
        }
    }
    assert!(got.iter().all(|r| r.name != other));
    assert_eq!(agent.metric("virtstream_action_runs_total"), want as f64);
    assert_eq!(agent.metric("virtstream_action_failures_total"), 0.0);
    assert_eq!(agent.terminate(), Some(0), "SIGTERM is a clean exit");
}

#[test]
fn after_kill_9_every_matching_event_ran_at_least_once_in_order() {
    ensure_libvirtd();
    let oracle = Oracle::start(TEST_URI);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("runs.txt");
    let cmd = recorder(work.path(), &out, "sleep 0.3");
    let prefix = unique("act-k");
    let mut agent = Agent::ready(
        TEST_URI,
        None,
        &format!(
            "[[actions]]\nname = \"slow\"\ncommand = [\"{}\", \"a\", \"b\"]\n\
             on = {{ event = [\"DEFINED\", \"UNDEFINED\", \"STARTED\", \"SUSPENDED\", \"RESUMED\", \"STOPPED\"], domain = \"{prefix}-*\", origin = [\"LIBVIRT\"] }}\nconcurrency = 2\n",
            cmd.display()
        ),
    );
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let names = [format!("{prefix}-1"), format!("{prefix}-2")];
    for n in &names {
        scripted_lifecycle(&conn, n);
    }
    let all = [
        "DEFINED",
        "UNDEFINED",
        "STARTED",
        "SUSPENDED",
        "RESUMED",
        "STOPPED",
    ];
    wait_until(
        Duration::from_secs(20),
        "oracle sees the lifecycles",
        || {
            names
                .iter()
                .all(|n| oracle.for_domain(n).last().map(|e| e.event.as_str()) == Some("UNDEFINED"))
        },
    );
    // 2 × 8 events at 0.3 s each, two at a time: ~2.4 s of commands.
    wait_until(Duration::from_secs(20), "some actions ran", || {
        lines(&out).len() >= 3
    });
    let before = lines(&out).len();
    agent.kill9();
    assert!(before < 16, "the kill came while actions were running");
    agent.start();
    agent.wait_ready(Duration::from_secs(30));
    let want: Vec<Vec<(String, String)>> = names
        .iter()
        .map(|n| oracle_pairs(&oracle, n, &all))
        .collect();
    let first_runs = |name: &str| -> Vec<(String, String)> {
        let mut seen = std::collections::HashSet::new();
        runs(&out)
            .into_iter()
            .filter(|r| r.name == name && seen.insert(r.event_id.clone()))
            .map(|r| (r.event, r.detail))
            .collect()
    };
    wait_until(
        Duration::from_secs(40),
        "every event ran after the restart",
        || {
            names
                .iter()
                .zip(&want)
                .all(|(n, w)| first_runs(n).len() >= w.len())
        },
    );
    for (n, w) in names.iter().zip(&want) {
        assert_eq!(&first_runs(n), w, "{n}: first runs in oracle order");
    }
    assert_eq!(agent.terminate(), Some(0));
}

fn alive(pid: u32) -> bool {
    // A zombie is as good as gone (nothing reaps it in some containers).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn a_hanging_command_is_killed_with_its_group_and_does_not_delay_the_bus() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let work = tempfile::tempdir().unwrap();
    let pidfile = work.path().join("child.pid");
    let hang = script(
        work.path(),
        "hang.sh",
        &format!(
            "sleep 300 &\necho $! > {}.tmp\nmv {0}.tmp {0}\nwait",
            pidfile.display()
        ),
    );
    let prefix = unique("act-hang");
    let mut agent = Agent::ready(
        TEST_URI,
        Some(&nats.url()),
        &format!(
            "[[actions]]\nname = \"hang\"\ncommand = [\"{}\"]\n\
             on = {{ event = [\"STARTED\"], domain = \"{prefix}-*\" }}\ntimeout = \"4s\"\nretries = 0\n",
            hang.display()
        ),
    );
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let h = conn
        .define_domain_xml(&test_domain_xml(&format!("{prefix}-1"), &new_uuid()))
        .unwrap();
    h.create().unwrap();
    wait_until(
        Duration::from_secs(10),
        "the hanging command started",
        || pidfile.exists(),
    );
    let child: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(child));
    // Another domain's events reach NATS while the command hangs.
    let free = unique("act-free");
    let started = Instant::now();
    let f = conn
        .define_domain_xml(&test_domain_xml(&free, &new_uuid()))
        .unwrap();
    f.create().unwrap();
    f.destroy().unwrap();
    f.undefine().unwrap();
    wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(3),
        "the other domain's events",
        |m| m.iter().filter(|s| s.event.domain.name == free).count() >= 4,
    );
    assert!(
        alive(child),
        "published within {:?} while the command still hangs",
        started.elapsed()
    );
    // The timeout kills the whole group: the command's own child too.
    wait_until(Duration::from_secs(10), "the group is killed", || {
        !alive(child)
    });
    let dead = agent.dir.path().join("journal/actions-dead-letter.jsonl");
    wait_until(Duration::from_secs(5), "the dead-letter line", || {
        lines(&dead).len() == 1
    });
    let line: serde_json::Value = serde_json::from_str(&lines(&dead)[0]).unwrap();
    assert_eq!(line["action"], "hang");
    assert_eq!(line["attempts"], 1);
    assert!(
        line["reason"].as_str().unwrap().contains("timed out"),
        "{line}"
    );
    assert_eq!(line["event"]["event"], "STARTED");
    assert_eq!(agent.metric("virtstream_action_timeouts_total"), 1.0);
    h.destroy().unwrap();
    h.undefine().unwrap();
    assert_eq!(agent.terminate(), Some(0));
}

#[test]
fn a_failing_command_is_retried_then_dead_lettered() {
    ensure_libvirtd();
    let work = tempfile::tempdir().unwrap();
    let count = work.path().join("attempts.txt");
    let fail = script(
        work.path(),
        "fail.sh",
        &format!(
            "env > {}\necho \"$VIRTSTREAM_EVENT_ID\" >> {}\necho boom >&2\nexit 3",
            work.path().join("env.txt").display(),
            count.display()
        ),
    );
    let prefix = unique("act-fail");
    let mut agent = Agent::ready(
        TEST_URI,
        None,
        &format!(
            "[[actions]]\nname = \"fail\"\ncommand = [\"{}\"]\n\
             on = {{ event = [\"STARTED\"], domain = \"{prefix}-*\" }}\nretries = 2\n",
            fail.display()
        ),
    );
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let d = conn
        .define_domain_xml(&test_domain_xml(&format!("{prefix}-1"), &new_uuid()))
        .unwrap();
    d.create().unwrap();
    let dead = agent.dir.path().join("journal/actions-dead-letter.jsonl");
    // Three attempts, 1 s then 2 s apart.
    wait_until(Duration::from_secs(15), "the dead-letter line", || {
        !lines(&dead).is_empty()
    });
    let attempts = lines(&count);
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    let line: serde_json::Value = serde_json::from_str(&lines(&dead)[0]).unwrap();
    assert_eq!(line["action"], "fail");
    assert_eq!(line["attempts"], 3);
    assert!(line["reason"].as_str().unwrap().contains("3"), "{line}");
    assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
    assert_eq!(line["event"]["event_id"], attempts[0].as_str());
    assert!(attempts.iter().all(|a| a == &attempts[0]));
    assert_eq!(agent.metric("virtstream_action_runs_total"), 3.0);
    assert_eq!(agent.metric("virtstream_action_failures_total"), 3.0);
    assert_eq!(agent.metric("virtstream_action_dead_lettered_total"), 1.0);
    assert!(agent.log().contains("boom"), "stderr is logged");
    // The agent's own VIRTSTREAM_* settings (here VIRTSTREAM_LOG) are not
    // passed on; the event's are.
    let env = std::fs::read_to_string(work.path().join("env.txt")).unwrap();
    assert!(!env.contains("VIRTSTREAM_LOG="), "{env}");
    assert!(env.contains("VIRTSTREAM_STATE=RUNNING"), "{env}");
    d.destroy().unwrap();
    d.undefine().unwrap();
    assert_eq!(agent.terminate(), Some(0));
}

#[test]
fn an_unwritable_dead_letter_file_keeps_the_event_until_it_can_be_written() {
    ensure_libvirtd();
    let work = tempfile::tempdir().unwrap();
    let fail = script(work.path(), "fail.sh", "exit 1");
    let prefix = unique("act-dl");
    let mut agent = Agent::new(
        TEST_URI,
        None,
        &format!(
            "[[actions]]\nname = \"dl\"\ncommand = [\"{}\"]\n\
             on = {{ event = [\"STARTED\"], domain = \"{prefix}-*\" }}\nretries = 0\n",
            fail.display()
        ),
    );
    // A directory where the file should be: every write fails (EISDIR).
    let dead = agent.dir.path().join("journal/actions-dead-letter.jsonl");
    std::fs::create_dir_all(&dead).unwrap();
    agent.start();
    agent.wait_ready(Duration::from_secs(30));
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let d = conn
        .define_domain_xml(&test_domain_xml(&format!("{prefix}-1"), &new_uuid()))
        .unwrap();
    d.create().unwrap();
    wait_until(Duration::from_secs(15), "the write failure logged", || {
        agent.log().contains("cannot write the dead-letter file")
    });
    // Not acknowledged meanwhile: the action's backlog holds it.
    let backlog = || agent.metric("virtstream_sink_backlog{sink=\"action:dl\"}");
    assert!(backlog() >= 1.0, "the event is still pending");
    std::fs::remove_dir(&dead).unwrap();
    wait_until(Duration::from_secs(15), "the dead-letter line", || {
        lines(&dead).len() == 1
    });
    wait_until(Duration::from_secs(10), "acknowledged once written", || {
        backlog() == 0.0
    });
    d.destroy().unwrap();
    d.undefine().unwrap();
    assert_eq!(agent.terminate(), Some(0));
}

#[test]
fn a_new_action_starts_at_the_journal_head_and_a_stop_never_dead_letters() {
    ensure_libvirtd();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("runs.txt");
    let pids = work.path().join("pids.txt");
    let slow = script(
        work.path(),
        "slow.sh",
        &format!(
            "echo $$ >> {}\nsleep 3\necho \"$VIRTSTREAM_DOMAIN_NAME|$VIRTSTREAM_EVENT_ID\" >> {}",
            pids.display(),
            out.display()
        ),
    );
    let prefix = unique("act-new");
    // Events journaled before the action exists…
    let mut agent = Agent::ready(TEST_URI, None, "");
    let conn = Connect::open(Some(TEST_URI)).unwrap();
    let old = conn
        .define_domain_xml(&test_domain_xml(&format!("{prefix}-old"), &new_uuid()))
        .unwrap();
    old.create().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.terminate(), Some(0));
    // …are not run for when it is added (start = "now").
    let mut cfg = std::fs::read_to_string(&agent.config).unwrap();
    cfg.push_str(&format!(
        "[[actions]]\nname = \"new\"\ncommand = [\"{}\"]\n\
         on = {{ event = [\"STARTED\"], domain = \"{prefix}-*\" }}\nretries = 0\n",
        slow.display()
    ));
    std::fs::write(&agent.config, cfg).unwrap();
    agent.start();
    agent.wait_ready(Duration::from_secs(30));
    let d = conn
        .define_domain_xml(&test_domain_xml(&format!("{prefix}-new"), &new_uuid()))
        .unwrap();
    d.create().unwrap();
    // Stopped while the command runs, and the command killed by the stop
    // (as a unit-wide signal would): neither retried nor dead-lettered.
    wait_until(Duration::from_secs(15), "the command started", || {
        !lines(&pids).is_empty()
    });
    let pid: u32 = lines(&pids)[0].parse().unwrap();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &agent.pid().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    std::thread::sleep(Duration::from_millis(200));
    unsafe_kill(pid, 9);
    let end = Instant::now() + Duration::from_secs(20);
    while agent.try_exit().is_none() {
        assert!(Instant::now() < end, "the agent did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let dead = agent.dir.path().join("journal/actions-dead-letter.jsonl");
    assert!(lines(&dead).is_empty(), "nothing dead-lettered by a stop");
    assert!(lines(&out).is_empty(), "the run was cut short");
    // The next start runs it again, once, and only the new domain's.
    agent.start();
    agent.wait_ready(Duration::from_secs(30));
    wait_until(Duration::from_secs(20), "the interrupted event ran", || {
        !lines(&out).is_empty()
    });
    std::thread::sleep(Duration::from_secs(1));
    let ran = lines(&out);
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!(ran[0].starts_with(&format!("{prefix}-new|")), "{ran:?}");
    assert_eq!(agent.terminate(), Some(0));
    for dom in [old, d] {
        dom.destroy().unwrap();
        dom.undefine().unwrap();
    }
}
