//! What a host published, read back and checked: the common form of an
//! event from either sink ([`Stored`]), the ledger of snapshot records, and
//! the invariants every stream must hold.
//!
//! host_seq counts every record a host emits, snapshot records included,
//! and those live on compacted streams/topics that keep only the latest
//! per key. To check that events + snapshot records cover 1..=N exactly,
//! the tests collect the host_seqs of snapshot records as they are
//! published: on NATS with a core subscription started before the agent,
//! on Kafka by reading the snapshot topics (the test broker does not
//! compact).
//!
//! Invariants:
//! - a host's NATS tap is subscribed before its agent starts, so it sees
//!   every snapshot record;
//! - polling helpers only hand a predicate snapshots without holes in
//!   host_seq.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use virtstream::model::DomainEvent;

use super::kafka::read_topic;
use super::rt;

/// One message read back from JetStream.
#[derive(Debug, Clone)]
pub struct Stored {
    pub stream_seq: u64,
    pub subject: String,
    pub event: DomainEvent,
    pub headers: Vec<(String, String)>,
}

/// Fetches until `pred` holds on a snapshot without holes in host_seq
/// (see [`contiguous`]; duplicates are left for the caller's exact checks
/// to report), or fails after `timeout`.
pub(super) fn poll_until(
    timeout: Duration,
    what: &str,
    unit: &str,
    mut pred: impl FnMut(&[Stored]) -> bool,
    mut fetch: impl FnMut() -> Vec<Stored>,
) -> Vec<Stored> {
    let end = Instant::now() + timeout;
    loop {
        let got = fetch();
        if contiguous(&got) && pred(&got) {
            return got;
        }
        if Instant::now() > end {
            panic!(
                "timed out after {timeout:?} waiting for {what}; have {} {unit}",
                got.len()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One snapshot-stream record as published (NATS) or stored (Kafka).
#[derive(Debug, Clone)]
pub struct SnapRecord {
    pub host_seq: u64,
    /// A deleted domain snapshot (empty/null value, tombstone header).
    pub tombstone: bool,
    /// The domain UUID of a domain snapshot or tombstone.
    pub uuid: Option<String>,
    pub host: Option<virtstream::model::HostSnapshot>,
    pub domain: Option<virtstream::model::DomainSnapshot>,
}

impl SnapRecord {
    fn decode(headers: &[(String, String)], value: &[u8], uuid: Option<String>) -> SnapRecord {
        let host_seq = headers
            .iter()
            .find(|(k, _)| k == "ce_id")
            .and_then(|(_, v)| virtstream::model::parse_event_id(v))
            .map(|(_, _, s)| s)
            .expect("snapshot records carry ce_id");
        let tombstone = headers
            .iter()
            .any(|(k, v)| k == virtstream::bus::wire::TOMBSTONE_HEADER && v == "true");
        let (mut host, mut domain) = (None, None);
        // Schema-registry framing (tests/registry.rs) is decoded there by
        // confluent-kafka; here the record counts without its body.
        let registry_framed = virtstream::codec::confluent_id(value).is_some();
        if !tombstone && !registry_framed {
            match virtstream::codec::decode_json(value)
                .expect("snapshot record decodes")
                .0
            {
                "HostSnapshot" => host = virtstream::codec::decode_host_snapshot(value).ok(),
                "DomainSnapshot" => domain = virtstream::codec::decode_domain_snapshot(value).ok(),
                other => panic!("unexpected {other} on a snapshot stream"),
            }
        }
        SnapRecord {
            host_seq,
            tombstone,
            uuid,
            host,
            domain,
        }
    }
}

type Records = Arc<Mutex<Vec<SnapRecord>>>;

#[derive(Default, Clone)]
struct HostTaps {
    nats: Option<Records>,
    kafka: Option<String>,
}

fn ledger() -> &'static Mutex<HashMap<String, HostTaps>> {
    static L: std::sync::OnceLock<Mutex<HashMap<String, HostTaps>>> = std::sync::OnceLock::new();
    L.get_or_init(Default::default)
}

/// Starts collecting the snapshot records `host_id` publishes to NATS.
pub fn tap_nats(url: &str, host_id: &str) {
    let records: Records = Default::default();
    let token = virtstream::bus::wire::subject_token(host_id);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let url = url.to_string();
    let out = records.clone();
    std::thread::spawn(move || {
        rt().block_on(async move {
            let client = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .reconnect_delay_callback(|_| Duration::from_millis(10))
                .connect(url.as_str())
                .await
                .unwrap();
            let mut a = client
                .subscribe(format!("virt.snapshots.v1.{token}.>"))
                .await
                .unwrap();
            let mut b = client
                .subscribe(format!("virt.hosts.v1.{token}"))
                .await
                .unwrap();
            let _ = client.flush().await;
            let _ = ready_tx.send(());
            loop {
                let m = tokio::select! {
                    Some(m) = a.next() => m,
                    Some(m) = b.next() => m,
                    else => return,
                };
                let headers: Vec<(String, String)> = m
                    .headers
                    .as_ref()
                    .map(|h| {
                        h.iter()
                            .flat_map(|(k, vs)| {
                                vs.iter().map(move |v| (k.to_string(), v.to_string()))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let uuid = m
                    .subject
                    .strip_prefix("virt.snapshots.v1.")
                    .and_then(|r| r.rsplit_once('.'))
                    .map(|(_, u)| u.to_string());
                out.lock()
                    .unwrap()
                    .push(SnapRecord::decode(&headers, &m.payload, uuid));
            }
        })
    });
    // Up when the server is; a server started later is joined within ms.
    let _ = ready_rx.recv_timeout(Duration::from_secs(5));
    ledger()
        .lock()
        .unwrap()
        .entry(host_id.to_string())
        .or_default()
        .nats = Some(records);
}

/// Snapshot records of `host_id` are to be read from this Kafka broker.
pub fn tap_kafka(bootstrap: &str, host_id: &str) {
    ledger()
        .lock()
        .unwrap()
        .entry(host_id.to_string())
        .or_default()
        .kafka = Some(bootstrap.to_string());
}

/// Every snapshot record (round markers, domain snapshots, tombstones,
/// heartbeats) `host_id` has published so far, in host_seq order: from
/// the NATS tap when there is one, else from the Kafka snapshot topics.
pub fn snapshot_records(host_id: &str) -> Vec<SnapRecord> {
    let taps = ledger()
        .lock()
        .unwrap()
        .get(host_id)
        .cloned()
        .unwrap_or_default();
    let mut out = match (&taps.nats, &taps.kafka) {
        (Some(r), _) => r.lock().unwrap().clone(),
        (None, Some(b)) => kafka_snapshot_records(b, host_id),
        (None, None) => Vec::new(),
    };
    out.sort_by_key(|r| r.host_seq);
    out
}

/// The snapshot records of `host_id` on the Kafka snapshot topics.
pub fn kafka_snapshot_records(bootstrap: &str, host_id: &str) -> Vec<SnapRecord> {
    let mut out = Vec::new();
    for topic in ["virt.domain.snapshots.v1", "virt.host.snapshots.v1"] {
        for r in read_topic(bootstrap, topic) {
            if r.host_id == host_id {
                let uuid = r.key.rsplit_once('/').map(|(_, u)| u.to_string());
                out.push(SnapRecord::decode(
                    &r.headers,
                    r.value.as_deref().unwrap_or_default(),
                    uuid,
                ));
            }
        }
    }
    out.sort_by_key(|r| r.host_seq);
    out
}

/// Waits until a complete snapshot round (ROUND_BEGIN … ROUND_END) of
/// `host_id` began after `host_seq`; returns (begin, end) host_seqs and
/// checks that the round holds `domain_count` DomainSnapshot records.
pub fn wait_round_after(host_id: &str, host_seq: u64, timeout: Duration) -> (u64, u64) {
    use virtstream::model::HostSnapshotKind;
    let end = Instant::now() + timeout;
    loop {
        let recs = snapshot_records(host_id);
        for r in &recs {
            let Some(h) = &r.host else { continue };
            if h.kind != HostSnapshotKind::ROUND_END {
                continue;
            }
            let sid = h.snapshot_id.as_deref().expect("ROUND_END names its round");
            let (_, _, begin) = virtstream::model::parse_event_id(sid).unwrap();
            if begin > host_seq {
                let b = recs
                    .iter()
                    .find(|x| x.host_seq == begin)
                    .and_then(|x| x.host.as_ref())
                    .expect("the round's ROUND_BEGIN was published");
                assert_eq!(b.kind, HostSnapshotKind::ROUND_BEGIN);
                let inside: Vec<&SnapRecord> = recs
                    .iter()
                    .filter(|x| x.host_seq > begin && x.host_seq < h.host_seq)
                    .collect();
                assert!(
                    inside
                        .iter()
                        .all(|x| x.domain.as_ref().is_some_and(|d| d.snapshot_id == sid)),
                    "a round holds only its own DomainSnapshot records"
                );
                assert_eq!(
                    inside.len() as i32,
                    h.domain_count,
                    "ROUND_END counts its records"
                );
                assert_eq!(b.domain_count, h.domain_count);
                return (begin, h.host_seq);
            }
        }
        assert!(
            Instant::now() < end,
            "no complete snapshot round began after host_seq {host_seq} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// host_seqs of the snapshot records `host_id` has published so far.
pub fn snapshot_seqs(host_id: &str) -> std::collections::BTreeSet<u64> {
    let taps = ledger()
        .lock()
        .unwrap()
        .get(host_id)
        .cloned()
        .unwrap_or_default();
    let mut out: std::collections::BTreeSet<u64> = taps
        .nats
        .map(|r| r.lock().unwrap().iter().map(|r| r.host_seq).collect())
        .unwrap_or_default();
    if let Some(b) = taps.kafka {
        out.extend(
            kafka_snapshot_records(&b, host_id)
                .iter()
                .map(|r| r.host_seq),
        );
    }
    out
}

/// Is the host's `host_seq` set, with its snapshot records, exactly
/// 1..=n? Subjects are published in parallel, so a snapshot of a live
/// stream can have holes that later fill.
pub fn contiguous(msgs: &[Stored]) -> bool {
    let Some(first) = msgs.first() else {
        return true;
    };
    let mut hs: std::collections::BTreeSet<u64> = snapshot_seqs(&first.event.host_id);
    hs.extend(msgs.iter().map(|m| m.event.host_seq));
    hs.iter().enumerate().all(|(i, h)| *h == i as u64 + 1)
}

/// Checks the invariants every stream must hold for one host: host_seq
/// unique and contiguous from `first`, and seq contiguous from 1 per domain
/// in stream order.
pub fn assert_contiguous(msgs: &[Stored]) {
    let mut hs: Vec<u64> = msgs.iter().map(|m| m.event.host_seq).collect();
    hs.sort_unstable();
    let before = hs.len();
    hs.dedup();
    assert_eq!(hs.len(), before, "an event host_seq appears twice");
    let snaps = msgs
        .first()
        .map(|m| snapshot_seqs(&m.event.host_id))
        .unwrap_or_default();
    assert!(
        hs.iter().all(|h| !snaps.contains(h)),
        "a host_seq is both an event and a snapshot record"
    );
    hs.extend(snaps.iter().copied());
    hs.sort_unstable();
    let n = hs.len() as u64;
    assert_eq!(
        hs,
        (1..=n).collect::<Vec<_>>(),
        "events and snapshot records must cover host_seq 1..={n}, each once"
    );
    let mut per_domain: std::collections::HashMap<&str, u64> = Default::default();
    let mut per_subject: std::collections::HashMap<&str, u64> = Default::default();
    for m in msgs {
        let last_hs = per_subject.entry(m.subject.as_str()).or_insert(0);
        assert!(
            m.event.host_seq > *last_hs,
            "host_seq out of order on {}",
            m.subject
        );
        *last_hs = m.event.host_seq;
        if m.event.event.as_str() == "GAP" {
            assert_eq!(m.event.seq, 0);
            continue;
        }
        let s = per_domain.entry(m.event.domain.uuid.as_str()).or_insert(0);
        assert_eq!(
            m.event.seq,
            *s + 1,
            "seq of {} not contiguous",
            m.event.domain.name
        );
        *s += 1;
    }
}
