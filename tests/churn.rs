//! Memory under transient-domain churn: the agent's RSS stays flat while
//! libvirtd creates and destroys tens of thousands of transient domains
//! (each a new UUID), with every event published. Cycles default to
//! 20,000; `CHURN_CYCLES=100000` runs the long form.

mod common;

use std::time::{Duration, Instant};

use common::*;
use virt::connect::Connect;

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Creates and destroys `n` transient domains from `threads` connections.
fn churn(prefix: &str, from: usize, n: usize, threads: usize) {
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let conn = Connect::open(Some(TEST_URI)).unwrap();
                for i in (from + t * per)..(from + ((t + 1) * per).min(n)) {
                    let xml = test_domain_xml(&format!("{prefix}-{i}"), &new_uuid());
                    let d = conn.create_domain_xml(&xml, 0).unwrap();
                    d.destroy().unwrap();
                }
            });
        }
    });
}

/// Waits until every sink has published everything journaled and the
/// tracker had time to forget what is gone (sweeps run every second,
/// heap trims at every heartbeat).
fn settle(agent: &Agent) {
    let end = Instant::now() + Duration::from_secs(600);
    loop {
        let backlog = agent.metric("virtstream_sink_backlog");
        let received = agent.metric("virtstream_libvirt_events_received_total");
        std::thread::sleep(Duration::from_millis(500));
        if backlog == 0.0 && agent.metric("virtstream_libvirt_events_received_total") == received {
            break;
        }
        assert!(Instant::now() < end, "backlog did not drain: {backlog}");
    }
    std::thread::sleep(Duration::from_secs(3));
}

#[test]
fn rss_stays_flat_under_transient_domain_churn() {
    ensure_libvirtd();
    let cycles: usize = std::env::var("CHURN_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let nats = NatsServer::start();
    // The test driver keeps its domains only while a connection is open.
    let _hold = Connect::open(Some(TEST_URI)).unwrap();
    let mut agent = Agent::new(
        TEST_URI,
        Some(&nats.url()),
        "[snapshot]\nheartbeat = \"1s\"\n",
    );
    // A transient domain is often gone before its STARTED is handled: one
    // lookup is enough to learn that.
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        cfg.replace(
            "[libvirt]\n",
            "[libvirt]\nlookup_attempts = 1\nqueue_capacity = 65536\n",
        ),
    )
    .unwrap();
    agent.start();
    agent.wait_ready(Duration::from_secs(30));
    let pid = agent.pid().unwrap();
    let prefix = unique("churn");
    // The first half warms the allocator up; the second half must not grow.
    let warm = cycles / 2;
    let started = Instant::now();
    churn(&prefix, 0, warm, 2);
    settle(&agent);
    let rss_warm = rss_kib(pid);
    churn(&prefix, warm, cycles, 2);
    settle(&agent);
    let rss_end = rss_kib(pid);
    let took = started.elapsed();
    // Every create and destroy reached the agent (each is a STARTED and a
    // STOPPED event); what a burst overflowed is counted as dropped.
    let received = agent.metric("virtstream_libvirt_events_received_total");
    let dropped = agent.metric("virtstream_libvirt_events_dropped_total");
    assert!(
        received + dropped >= (2 * cycles) as f64,
        "received {received} and dropped {dropped} events for {cycles} cycles"
    );
    let growth = rss_end as i64 - rss_warm as i64;
    println!(
        "churn: cycles={cycles} took={took:?} received={received} dropped={dropped} rss_after_{warm}={rss_warm} KiB rss_after_{cycles}={rss_end} KiB growth={growth} KiB"
    );
    // Flat: a record kept per UUID (tracker record and cached subject
    // position, ~380 bytes) would grow ~3.7 MiB over 10,000 UUIDs.
    assert!(
        growth < 1536,
        "RSS grew {growth} KiB from {warm} to {cycles} cycles ({rss_warm} → {rss_end} KiB)"
    );
}
