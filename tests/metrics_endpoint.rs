//! The metrics endpoint under abuse, against the real agent, libvirtd's
//! test driver and nats-server: a flood of idle and slowloris connections
//! is capped and timed out while every event still reaches NATS, and a
//! failing `accept` (the agent out of file descriptors) backs off instead
//! of spinning. The kernel's view of the agent (/proc/PID) is the oracle
//! for descriptors and CPU time; virsh event and a raw JetStream read are
//! the oracle for the events.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// The endpoint's documented limits (docs/operations.md).
const MAX_CONNECTIONS: usize = 64;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Socket descriptors the process holds.
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// User + system CPU time the process has used.
fn cpu_time(pid: u32) -> Duration {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// User + system CPU time of the process's main thread: the async runtime
/// the endpoint runs on (libvirt, the tracker and the journal have their
/// own threads, busy with whatever else happens on the shared libvirtd).
fn runtime_cpu_time(pid: u32) -> Duration {
    stat_cpu(&format!("/proc/{pid}/task/{pid}/stat"))
}

fn stat_cpu(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap();
    // Fields after the ")" that ends the command name: utime is the 12th,
    // stime the 13th (fields 14 and 15 of proc(5)).
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Has the server closed this connection (EOF or reset, without blocking)?
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 512];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // a 503, then EOF
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Up to `n` connections; stops early when the listen backlog is full.
fn connect_many(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map_while(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .collect()
}

/// Connections that send a partial request and then a byte every 500 ms.
fn slowloris(addr: SocketAddr, n: usize, for_: Duration) -> std::thread::JoinHandle<Vec<bool>> {
    std::thread::spawn(move || {
        let mut conns = connect_many(addr, n);
        for c in &mut conns {
            let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
        }
        let mut alive = vec![true; conns.len()];
        let end = Instant::now() + for_;
        while Instant::now() < end {
            for (c, a) in conns.iter_mut().zip(alive.iter_mut()) {
                if *a && c.write_all(b"X").is_err() {
                    *a = false;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // Still open after `for_` while dripping?
        conns
            .iter_mut()
            .zip(alive)
            .map(|(c, a)| a && !closed_by_server(c))
            .collect()
    })
}

fn check_all_events(nats: &NatsServer, agent: &Agent, oracle: &Oracle, name: &str) {
    let msgs = wait_for(
        &nats.url(),
        &agent.filter(),
        Duration::from_secs(60),
        "every event of the burst",
        |m| {
            m.iter()
                .rfind(|s| s.event.domain.name == name)
                .is_some_and(|s| s.event.event.as_str() == "UNDEFINED")
        },
    );
    assert_contiguous(&msgs);
    check_domain(oracle, &msgs, name, true, 8192);
}

#[test]
fn connection_flood_is_capped_timed_out_and_events_keep_flowing() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let oracle = Oracle::start(TEST_URI);
    let agent = Agent::ready(TEST_URI, Some(&nats.url()), "");
    let pid = agent.pid().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], agent.metrics_port).into();
    let base = sockets(pid);
    let cpu0 = cpu_time(pid);

    let name = unique("flood");
    let events = burst(name.clone(), 50, Duration::from_millis(40));
    let drip = slowloris(addr, 50, READ_TIMEOUT + Duration::from_secs(3));
    let mut idle = connect_many(addr, 2000);
    // The agent holds no more than the cap (plus one being closed).
    let mut peak = 0;
    for _ in 0..10 {
        peak = peak.max(sockets(pid).saturating_sub(base));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        peak <= MAX_CONNECTIONS + 2,
        "the agent holds {peak} connections beyond its own (cap {MAX_CONNECTIONS})"
    );
    // Over the cap, connections are closed at once: the backlog never fills.
    assert_eq!(idle.len(), 2000, "the agent stopped accepting");
    events.join().unwrap();

    // Idle connections are closed by the server after the read timeout,
    // slowloris ones too although they keep sending.
    std::thread::sleep(READ_TIMEOUT + Duration::from_secs(2));
    let still_open = idle.iter_mut().map(closed_by_server).filter(|c| !c).count();
    assert_eq!(still_open, 0, "idle connections left open by the server");
    let dripping = drip.join().unwrap().into_iter().filter(|a| *a).count();
    assert_eq!(dripping, 0, "slowloris connections left open by the server");
    drop(idle);

    // The endpoint answers promptly once the flood is over.
    let t = Instant::now();
    let h = agent.http("/healthz");
    let took = t.elapsed();
    assert_eq!(h.map(|x| x.0), Some(200));
    assert!(took < Duration::from_secs(1), "/healthz took {took:?}");
    let cpu = cpu_time(pid) - cpu0;
    eprintln!("agent CPU during the flood: {cpu:?}; peak extra sockets {peak}");
    assert!(cpu < Duration::from_secs(5), "agent used {cpu:?} CPU");

    check_all_events(&nats, &agent, &oracle, &name);
}

#[test]
fn accept_failures_back_off_and_events_keep_flowing() {
    ensure_libvirtd();
    let nats = NatsServer::start();
    let oracle = Oracle::start(TEST_URI);
    let agent = Agent::ready(TEST_URI, Some(&nats.url()), "");
    let pid = agent.pid().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], agent.metrics_port).into();

    // A few descriptors to spare: accept fails with EMFILE under a flood.
    let spare = 6;
    let limit = (open_fds(pid) + spare) as u64;
    let st = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit (util-linux)");
    assert!(st.success(), "prlimit failed");

    // More connections than descriptors, fewer than the listen backlog.
    let flood = connect_many(addr, 100);
    assert!(flood.len() > 50, "only {} connections opened", flood.len());
    std::thread::sleep(Duration::from_millis(500));
    // Events while accept keeps failing.
    let name = unique("emfile");
    let events = burst(name.clone(), 40, Duration::from_millis(40));
    let (cpu0, all0, t0) = (runtime_cpu_time(pid), cpu_time(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(4));
    let cpu = runtime_cpu_time(pid) - cpu0;
    let all = cpu_time(pid) - all0;
    let wall = t0.elapsed();
    eprintln!("agent CPU while accept fails: runtime thread {cpu:?}, process {all:?}, in {wall:?}");
    assert!(
        cpu < wall / 5,
        "the agent spun: {cpu:?} CPU in {wall:?} while accept failed"
    );
    events.join().unwrap();
    check_all_events(&nats, &agent, &oracle, &name);
    assert!(
        agent.log().contains("accept failed; backing off"),
        "accept never failed: the test did not exercise the back-off"
    );

    // Once the flood is gone the endpoint answers again.
    drop(flood);
    let end = Instant::now() + Duration::from_secs(20);
    while agent.http("/healthz").map(|x| x.0) != Some(200) {
        assert!(
            Instant::now() < end,
            "/healthz not answering after the flood"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
