//! The soak's checks, after quiescence, against independent sources:
//! libvirt's own view (`virsh list`/`domstate`), the bus as read and
//! decoded by tests/oracle/read_events.py (official clients, fastavro on
//! the .avsc files: not virtstream's decoder), and the outputs of
//! `virtstream state` and `virtstream audit`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};

use serde::Deserialize;

/// One message as the independent reader decoded it.
#[derive(Debug, Clone, Deserialize)]
pub struct Msg {
    /// NATS stream sequence, or `partition:offset`.
    pub pos: String,
    pub host_id: String,
    pub epoch: String,
    pub host_seq: u64,
    pub seq: u64,
    pub uuid: String,
    pub name: String,
    pub event: String,
    pub detail: String,
    pub origin: String,
    pub state: String,
    pub persistent: bool,
    pub observed_at: i64,
}

/// What libvirt says about one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truth {
    pub name: String,
    pub state: String,
    pub persistent: bool,
}

fn virsh(uri: &str, args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .expect("virsh runs");
    assert!(
        out.status.success(),
        "virsh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn uuids(uri: &str, filter: &[&str]) -> BTreeSet<String> {
    let mut args = vec!["list", "--all", "--uuid"];
    args.extend_from_slice(filter);
    virsh(uri, &args)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn domstate_name(s: &str) -> String {
    match s.trim() {
        "running" => "RUNNING",
        "paused" => "PAUSED",
        "shut off" => "SHUTOFF",
        "in shutdown" => "SHUTDOWN",
        "crashed" => "CRASHED",
        "pmsuspended" => "PMSUSPENDED",
        "idle" | "blocked" => "BLOCKED",
        "no state" => "NOSTATE",
        _ => "UNKNOWN",
    }
    .to_string()
}

/// Every domain libvirt has now, by UUID.
pub fn libvirt_truth(uri: &str) -> BTreeMap<String, Truth> {
    let all = uuids(uri, &[]);
    let persistent = uuids(uri, &["--persistent"]);
    let running = uuids(uri, &["--state-running"]);
    let paused = uuids(uri, &["--state-paused"]);
    let shutoff = uuids(uri, &["--state-shutoff"]);
    let names: HashMap<String, String> = virsh(uri, &["list", "--all", "--uuid", "--name"])
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect();
    all.into_iter()
        .map(|u| {
            let state = if running.contains(&u) {
                "RUNNING".to_string()
            } else if paused.contains(&u) {
                "PAUSED".to_string()
            } else if shutoff.contains(&u) {
                "SHUTOFF".to_string()
            } else {
                domstate_name(&virsh(uri, &["domstate", &u]))
            };
            let t = Truth {
                name: names.get(&u).cloned().unwrap_or_default(),
                state,
                persistent: persistent.contains(&u),
            };
            (u, t)
        })
        .collect()
}

/// The Python that has the reader's packages: $SOAK_PYTHON, else the
/// venv deploy/local-env.sh installs, else python3 on PATH.
fn python() -> String {
    if let Ok(p) = std::env::var("SOAK_PYTHON") {
        return p;
    }
    let venv = std::env::var("VIRTSTREAM_ORACLE_VENV")
        .unwrap_or_else(|_| "/opt/virtstream-oracle".to_string());
    let p = Path::new(&venv).join("bin/python3");
    if p.is_file() {
        return p.display().to_string();
    }
    "python3".to_string()
}

/// The whole events stream/topic, read and decoded by the Python oracle.
pub fn read_bus(bus: &str, address: &str) -> Vec<Msg> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracle/read_events.py");
    let out = Command::new(python())
        .arg(&script)
        .args([bus, address])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "tests/oracle/read_events.py {bus} {address} failed ({}): {}\n(install its packages: \
         bash deploy/local-env.sh oracle)",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("oracle line {l}: {e}")))
        .collect()
}

/// One domain whose last word on the bus differs from libvirt.
#[derive(Debug, Clone)]
pub struct Wrong {
    pub uuid: String,
    pub name: String,
    pub want: String,
    pub got: String,
    /// The domain's last events as `virsh event` saw them.
    pub history: String,
}

/// The findings of one cell.
#[derive(Debug, Default)]
pub struct Findings {
    pub messages: usize,
    pub domains: usize,
    pub wrong_last_words: Vec<Wrong>,
    /// Extra copies of a (host, epoch, host_seq).
    pub duplicates: Vec<String>,
    /// Per-domain seq holes, repeats or steps back (not duplicates).
    pub seq_breaks: Vec<String>,
    /// Missing seqs in those breaks (unreported losses).
    pub losses: u64,
    /// Gap markers (losses the agent reported), by position.
    pub gap_markers: Vec<String>,
    /// Gap markers by cause (detail), e.g. `QUEUE_OVERFLOW`.
    pub gap_causes: BTreeMap<String, usize>,
    pub state_wrong: Vec<String>,
    pub audit_wrong: Vec<String>,
    /// The reader and the agent's codec disagree (see [`cross_check`]).
    pub decoder_mismatch: Vec<String>,
}

impl Findings {
    /// `CAUSE:count+CAUSE:count`, or `none`.
    pub fn causes(&self) -> String {
        if self.gap_causes.is_empty() {
            return "none".into();
        }
        let v: Vec<String> = self
            .gap_causes
            .iter()
            .map(|(c, n)| format!("{c}:{n}"))
            .collect();
        v.join("+")
    }

    pub fn ok(&self) -> bool {
        self.wrong_last_words.is_empty()
            && self.duplicates.is_empty()
            && self.seq_breaks.is_empty()
            && self.state_wrong.is_empty()
            && self.audit_wrong.is_empty()
            && self.decoder_mismatch.is_empty()
    }

    /// The details of every finding, one per line.
    pub fn details(&self) -> String {
        let mut s = String::new();
        for w in &self.wrong_last_words {
            s.push_str(&format!(
                "  wrong last word: {} ({}): bus says {}, libvirt says {}\n",
                w.name, w.uuid, w.got, w.want
            ));
            if !w.history.is_empty() {
                s.push_str(&format!("    virsh event saw: … {}\n", w.history));
            }
        }
        // The first few of each kind; the counts are in the summary.
        let mut some = |what: &str, list: &[String]| {
            for d in list.iter().take(10) {
                s.push_str(&format!("  {what}: {d}\n"));
            }
            if list.len() > 10 {
                s.push_str(&format!("  … and {} more of: {what}\n", list.len() - 10));
            }
        };
        some("duplicate", &self.duplicates);
        some("seq", &self.seq_breaks);
        some("state", &self.state_wrong);
        some("audit", &self.audit_wrong);
        some("decoder mismatch", &self.decoder_mismatch);
        s
    }
}

/// Stream checks over one host's messages: duplicates, per-domain seq
/// continuity, and the last word of each domain against libvirt.
pub fn check_stream(
    msgs: &[Msg],
    host_id: &str,
    truth: &BTreeMap<String, Truth>,
    plan_uuids: &BTreeSet<String>,
    f: &mut Findings,
) {
    let msgs: Vec<&Msg> = msgs.iter().filter(|m| m.host_id == host_id).collect();
    f.messages = msgs.len();
    // Epochs, oldest first (by the first agent time seen).
    let mut first_seen: HashMap<&str, i64> = HashMap::new();
    for m in &msgs {
        let t = first_seen.entry(m.epoch.as_str()).or_insert(m.observed_at);
        *t = (*t).min(m.observed_at);
    }
    let mut epochs: Vec<(&i64, &&str)> = first_seen.iter().map(|(e, t)| (t, e)).collect();
    epochs.sort();
    let rank: HashMap<&str, usize> = epochs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| (**e, i))
        .collect();

    let mut seen: HashMap<(&str, u64), &str> = HashMap::new();
    let mut next_seq: HashMap<(&str, &str), u64> = HashMap::new();
    // uuid -> (epoch rank, seq, message)
    let mut last: HashMap<&str, (usize, u64, &Msg)> = HashMap::new();
    for m in &msgs {
        if let Some(first) = seen.insert((m.epoch.as_str(), m.host_seq), m.pos.as_str()) {
            f.duplicates.push(format!(
                "host_seq {} of epoch {} at {first} and again at {} ({} {} {})",
                m.host_seq, m.epoch, m.pos, m.name, m.event, m.detail
            ));
            continue;
        }
        if m.event == "GAP" {
            f.gap_markers.push(m.pos.clone());
            *f.gap_causes.entry(m.detail.clone()).or_default() += 1;
            continue;
        }
        let want = next_seq
            .entry((m.epoch.as_str(), m.uuid.as_str()))
            .or_insert(1);
        if m.seq != *want {
            f.seq_breaks.push(format!(
                "{} ({}): seq {} at {} after seq {} ({} {} {})",
                m.name,
                m.uuid,
                m.seq,
                m.pos,
                *want - 1,
                m.origin,
                m.event,
                m.detail
            ));
            f.losses += m.seq.saturating_sub(*want);
        }
        *want = m.seq.max(*want - 1) + 1;
        let key = (rank[m.epoch.as_str()], m.seq);
        match last.get(m.uuid.as_str()) {
            Some((r, s, _)) if (*r, *s) >= key => {}
            _ => {
                last.insert(m.uuid.as_str(), (key.0, key.1, m));
            }
        }
    }
    // Every domain of the load and every domain the bus mentions.
    let mut checked: BTreeSet<&str> = plan_uuids.iter().map(String::as_str).collect();
    checked.extend(last.keys().copied());
    for uuid in checked {
        let t = truth.get(uuid);
        let got = last.get(uuid).map(|(_, _, m)| *m);
        if t.is_none() && got.is_none() {
            continue; // a transient slot never created, or never seen
        }
        f.domains += 1;
        let (want_state, want_persistent) = match t {
            Some(t) => (t.state.as_str(), t.persistent),
            None => ("SHUTOFF", false),
        };
        let right = got.is_some_and(|m| m.state == want_state && m.persistent == want_persistent);
        if !right {
            f.wrong_last_words.push(Wrong {
                uuid: uuid.to_string(),
                name: t
                    .map(|t| t.name.clone())
                    .or(got.map(|m| m.name.clone()))
                    .unwrap_or_default(),
                want: match t {
                    Some(_) => format!("{want_state} persistent={want_persistent}"),
                    None => "gone (SHUTOFF persistent=false)".to_string(),
                },
                got: got.map_or("nothing".to_string(), |m| {
                    format!(
                        "{} persistent={} (seq {} at {}: {} {}/{})",
                        m.state, m.persistent, m.seq, m.pos, m.origin, m.event, m.detail
                    )
                }),
                history: String::new(),
            });
        }
    }
}

/// Runs a `virtstream` consumer tool; (exit code, stdout, stderr).
pub fn tool(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_virtstream"))
        .args(args)
        .output()
        .expect("virtstream runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `virtstream state` must equal libvirt for every domain of this host,
/// or mark it (or the host) stale; a domain libvirt no longer has is
/// absent, shut off and not persistent, or stale.
pub fn check_state(
    config: &Path,
    bus: &str,
    host_id: &str,
    truth: &BTreeMap<String, Truth>,
    f: &mut Findings,
) {
    let cfg = config.to_str().unwrap();
    let (code, out, err) = tool(&["state", "--config", cfg, "--bus", bus, "--format", "json"]);
    if code != Some(0) {
        f.state_wrong
            .push(format!("virtstream state exited {code:?}: {err}"));
        return;
    }
    let host_stale = err.contains(&format!("host {host_id} is stale"));
    let views: Vec<serde_json::Value> = serde_json::from_str(&out).expect("state --format json");
    let mut seen = BTreeSet::new();
    for v in views.iter().filter(|v| v["host_id"] == host_id) {
        let uuid = v["uuid"].as_str().unwrap_or_default().to_string();
        let state = v["state"].as_str().unwrap_or_default();
        let persistent = v["persistent"].as_bool().unwrap_or_default();
        let stale = v["stale"].as_bool().unwrap_or_default() || host_stale;
        let (want_state, want_persistent) = match truth.get(&uuid) {
            Some(t) => (t.state.as_str(), t.persistent),
            None => ("SHUTOFF", false),
        };
        seen.insert(uuid.clone());
        if !stale && (state != want_state || persistent != want_persistent) {
            f.state_wrong.push(format!(
                "{} ({uuid}): state says {state} persistent={persistent}, not stale; libvirt says {}",
                v["name"].as_str().unwrap_or_default(),
                match truth.get(&uuid) {
                    Some(_) => format!("{want_state} persistent={want_persistent}"),
                    None => "gone".to_string(),
                }
            ));
        }
    }
    if !host_stale {
        for (uuid, t) in truth {
            if !seen.contains(uuid) {
                f.state_wrong.push(format!(
                    "{} ({uuid}): libvirt has it {} persistent={}, state does not list it",
                    t.name, t.state, t.persistent
                ));
            }
        }
    }
}

/// `virtstream audit` exits 0, or its problems are exactly reported gaps
/// at the gap markers' positions (and every gap marker is named, as a
/// problem or as a repaired notice).
pub fn check_audit(config: &Path, bus: &str, f: &mut Findings) {
    let cfg = config.to_str().unwrap();
    let (code, out, err) = tool(&["audit", "--config", cfg, "--bus", bus, "--format", "json"]);
    let report: serde_json::Value = match serde_json::from_str(&out) {
        Ok(r) => r,
        Err(e) => {
            f.audit_wrong.push(format!(
                "virtstream audit exited {code:?} without a JSON report ({e}): {err}"
            ));
            return;
        }
    };
    // "VIRT_EVENTS stream seq 12" / "virt.domain.events.v1 partition 1 offset 7"
    let marker_pos = |p: &str| match p.split_once(':') {
        Some((part, off)) => format!("partition {part} offset {off}"),
        None => format!("stream seq {p}"),
    };
    let markers: BTreeSet<String> = f.gap_markers.iter().map(|p| marker_pos(p)).collect();
    let at_marker = |at: &str| markers.iter().any(|m| at.ends_with(m.as_str()));
    let empty = Vec::new();
    let problems = report["problems"].as_array().unwrap_or(&empty);
    let notices = report["notices"].as_array().unwrap_or(&empty);
    for p in problems {
        let kind = p["kind"].as_str().unwrap_or_default();
        let at = p["at"].as_str().unwrap_or_default();
        if kind != "reported_gap" || !at_marker(at) {
            f.audit_wrong
                .push(format!("{kind}: {}", p["message"].as_str().unwrap_or("")));
        }
    }
    for m in &markers {
        let named = problems
            .iter()
            .chain(notices)
            .filter(|p| p["kind"] == "reported_gap")
            .any(|p| p["at"].as_str().unwrap_or_default().ends_with(m.as_str()));
        if !named {
            f.audit_wrong
                .push(format!("the gap marker at {m} is not named by the audit"));
        }
    }
    let continuous = report["continuous"].as_bool().unwrap_or(false);
    if (code == Some(0)) != continuous {
        f.audit_wrong.push(format!(
            "exit code {code:?} disagrees with continuous={continuous}"
        ));
    }
}

/// The checks catch what they claim to, on hand-made streams.
#[test]
fn checks_catch_duplicates_seq_breaks_and_wrong_last_words() {
    let m =
        |pos: u64, host_seq: u64, seq: u64, uuid: &str, event: &str, state: &str, p: bool| Msg {
            pos: pos.to_string(),
            host_id: "h".into(),
            epoch: "e1".into(),
            host_seq,
            seq,
            uuid: uuid.into(),
            name: format!("dom-{uuid}"),
            event: event.into(),
            detail: "NONE".into(),
            origin: "LIBVIRT".into(),
            state: state.into(),
            persistent: p,
            observed_at: pos as i64,
        };
    let truth: BTreeMap<String, Truth> = [
        ("a", "RUNNING", true),
        ("b", "PAUSED", true),
        ("c", "SHUTOFF", true),
    ]
    .iter()
    .map(|(u, s, p)| {
        (
            u.to_string(),
            Truth {
                name: format!("dom-{u}"),
                state: s.to_string(),
                persistent: *p,
            },
        )
    })
    .collect();
    let plan: BTreeSet<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();

    // A clean stream: nothing found; "d" (gone) ended SHUTOFF, not persistent.
    let clean = vec![
        m(1, 1, 1, "a", "DEFINED", "SHUTOFF", true),
        m(2, 2, 2, "a", "STARTED", "RUNNING", true),
        m(3, 3, 1, "b", "DEFINED", "SHUTOFF", true),
        m(4, 5, 2, "b", "STARTED", "RUNNING", true),
        m(5, 6, 3, "b", "SUSPENDED", "PAUSED", true),
        m(6, 7, 1, "c", "DEFINED", "SHUTOFF", true),
        m(7, 8, 1, "d", "STARTED", "RUNNING", false),
        m(8, 9, 2, "d", "STOPPED", "SHUTOFF", false),
    ];
    let mut f = Findings::default();
    check_stream(&clean, "h", &truth, &plan, &mut f);
    assert!(f.ok(), "{}", f.details());
    assert_eq!(f.domains, 4);

    // A duplicate, a seq hole, a last word that is not libvirt's, a gone
    // domain last seen running, and a domain the bus never mentions.
    let bad = vec![
        m(1, 1, 1, "a", "DEFINED", "SHUTOFF", true),
        m(2, 2, 2, "a", "STARTED", "RUNNING", true),
        m(3, 2, 2, "a", "STARTED", "RUNNING", true),
        m(4, 3, 1, "b", "DEFINED", "SHUTOFF", true),
        m(5, 5, 3, "b", "SUSPENDED", "PAUSED", true),
        m(6, 8, 1, "d", "STARTED", "RUNNING", false),
    ];
    let mut f = Findings::default();
    check_stream(&bad, "h", &truth, &plan, &mut f);
    assert_eq!(f.duplicates.len(), 1, "{}", f.details());
    assert_eq!(f.seq_breaks.len(), 1, "{}", f.details());
    assert_eq!(f.losses, 1);
    let wrong: BTreeSet<&str> = f.wrong_last_words.iter().map(|w| w.uuid.as_str()).collect();
    assert_eq!(wrong, ["c", "d"].into_iter().collect(), "{}", f.details());
}

/// Cross-check of the reader itself: the same stream decoded by the
/// agent's codec (the test fixtures' `fetch`) must give the same fields
/// at the same positions. A difference means one of the two decoders is
/// wrong; the checks above rely on the reader only.
pub fn cross_check(bus: &str, address: &str, host_id: &str, msgs: &[Msg], f: &mut Findings) {
    let codec: Vec<(String, virtstream::model::DomainEvent)> = if bus == "nats" {
        super::common::fetch(address, "VIRT_EVENTS", "virt.events.v1.>")
            .into_iter()
            .map(|s| (s.stream_seq.to_string(), s.event))
            .collect()
    } else {
        super::common::fetch_kafka(address, "virt.domain.events.v1", host_id)
            .into_iter()
            .map(|s| {
                let p = s.subject.split(':').nth(1).unwrap_or_default().to_string();
                (format!("{p}:{}", s.stream_seq), s.event)
            })
            .collect()
    };
    let by_pos: HashMap<&str, &virtstream::model::DomainEvent> =
        codec.iter().map(|(p, e)| (p.as_str(), e)).collect();
    let ours: Vec<&Msg> = msgs.iter().filter(|m| m.host_id == host_id).collect();
    let theirs = codec.iter().filter(|(_, e)| e.host_id == host_id).count();
    if ours.len() != theirs {
        f.decoder_mismatch.push(format!(
            "the reader read {} messages of this host, the agent's codec {theirs}",
            ours.len()
        ));
    }
    for m in ours {
        let Some(e) = by_pos.get(m.pos.as_str()) else {
            f.decoder_mismatch
                .push(format!("at {}: only the reader has a message", m.pos));
            continue;
        };
        let same = e.epoch == m.epoch
            && e.host_seq == m.host_seq
            && e.seq == m.seq
            && e.domain.uuid == m.uuid
            && e.domain.name == m.name
            && e.event.as_str() == m.event
            && e.detail.as_str() == m.detail
            && e.origin.as_str() == m.origin
            && e.state_after.state.as_str() == m.state
            && e.persistent == m.persistent
            && e.observed_at == m.observed_at;
        if !same {
            f.decoder_mismatch
                .push(format!("at {}: reader {m:?}, agent's codec {e:?}", m.pos));
        }
    }
}
