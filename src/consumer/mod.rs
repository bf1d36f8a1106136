//! Consumer tools (same binary as the agent, and a library others can
//! embed): read what agents wrote back from the buses.
//!
//! The pipeline runs one way, each stage knowing only the next:
//!
//! 1. `bus`: reads the streams (NATS) or topics (Kafka) into raw
//!    messages with their positions, and says where each contiguous lane
//!    ended;
//! 2. `record`: decodes a message into a record (skipped for a feed that
//!    wants the bytes only); `registry` resolves schema-registry ids so a
//!    registry-framed message decodes like a single-object one;
//! 3. `lanes`: finds the holes in each contiguous lane's positions, once
//!    for every tool, and hands them on as `hole::Hole`s (the one hole
//!    type) just before the record that revealed them;
//! 4. `feed`: the tools, each a `feed::Feed`: `rebuild` (fleet state,
//!    docs/contract.md §4, for `state`), `usage` (running/paused seconds, vCPU·s
//!    and GiB·s over a window), `audit` (continuity per host and domain)
//!    and `replay` (the messages as written);
//! 5. `report`: every rendering of what the tools found (JSON, the state
//!    table, the usage CSV, the audit text, replay's JSON lines).
//!
//! Shared by the tools: `liveness` (when a host counts as silent) and
//! `epochs` (which of a host's epochs is newest, by stream position);
//! `tenant` (a domain's tenant, from its XML) is `usage`'s.
//!
//! After the report, and only for `usage --format cloudevents --publish`:
//! `publish` sends the rendered usage events back to a bus (a usage topic
//! or stream of their own, never the agent's).
//!
//! Invariants: `rebuild`, `usage` and `audit` are pure (records and holes
//! in, results out: they never touch a bus, so they can be fed from
//! anything through `lanes::Piped`); every message read reaches the feed,
//! decoded or as undecodable.

pub mod audit;
pub mod bus;
pub mod epochs;
pub mod feed;
pub mod hole;
pub mod lanes;
pub mod liveness;
pub mod publish;
pub mod rebuild;
pub mod record;
pub mod registry;
pub mod replay;
pub mod report;
pub mod tenant;
pub mod usage;

use crate::config::Config;
use bus::{BusError, Item, Next, Scope, StartAt};
pub use feed::Feed;
use lanes::Lanes;
use record::Position;

/// Which bus to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    Nats,
    Kafka,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("config key `{0}`: reading --bus {0} needs a [{0}] section")]
    MissingSection(&'static str),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Totals of one read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadTotals {
    /// Records of the events stream/topic.
    pub events: u64,
    /// Records of the snapshot streams/topics.
    pub snapshots: u64,
    pub undecodable: u64,
}

/// What a whole-bus read gives besides what the feed took.
#[derive(Debug, Default, Clone)]
pub struct ReadOutcome {
    pub totals: ReadTotals,
    /// Messages that could not be decoded: where, and why.
    pub undecodable: Vec<(Position, String)>,
}

/// Reads a bus configured in `cfg` (see `bus`) through the lanes into
/// `feed`. Undecodable messages are also collected in the outcome, for
/// the report. The read stops early when the feed is done.
pub fn read_scoped(
    cfg: &Config,
    bus: BusKind,
    from: &StartAt,
    scope: Scope<'_>,
    feed: &mut (dyn Feed + Send),
) -> Result<ReadOutcome, ConsumerError> {
    let mut lanes = Lanes::new();
    let mut out = ReadOutcome::default();
    let mut registry = match &cfg.schema_registry {
        Some(r) => Some(registry::Resolver::new(r).map_err(bus::BusError::from)?),
        None => None,
    };
    let mut each = |it: Item<'_>| {
        match it {
            Item::Message(msg) => {
                feed.message(&msg);
                if feed.wants_records() {
                    match msg.decode() {
                        Ok(rec) => {
                            match msg.contiguous {
                                true => out.totals.events += 1,
                                false => out.totals.snapshots += 1,
                            }
                            lanes.record(&rec, msg.contiguous, feed);
                        }
                        Err(error) => {
                            out.totals.undecodable += 1;
                            lanes.undecodable(msg.pos, &error, msg.contiguous, feed);
                            out.undecodable.push((msg.pos.clone(), error.to_string()));
                        }
                    }
                }
            }
            Item::LaneEnd {
                lane,
                last,
                time_us,
            } => lanes.lane_end(lane, last, time_us, feed),
        }
        if feed.done() {
            Next::Break(())
        } else {
            Next::Continue(())
        }
    };
    match bus {
        BusKind::Nats => {
            let ncfg = cfg
                .nats
                .as_ref()
                .ok_or(ConsumerError::MissingSection("nats"))?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ConsumerError::Runtime)?
                .block_on(bus::read_nats(ncfg, from, scope, &mut registry, &mut each))?
        }
        BusKind::Kafka => {
            let kcfg = cfg
                .kafka
                .as_ref()
                .ok_or(ConsumerError::MissingSection("kafka"))?;
            bus::read_kafka(kcfg, from, scope, &mut registry, &mut each)?
        }
    };
    Ok(out)
}

/// Reads snapshots, then events from `from`, of the whole fleet into
/// `feed` (see [`read_scoped`]).
pub fn read(
    cfg: &Config,
    bus: BusKind,
    from: &StartAt,
    feed: &mut (dyn Feed + Send),
) -> Result<ReadOutcome, ConsumerError> {
    read_scoped(cfg, bus, from, Scope::Fleet, feed)
}

/// Clock skew allowed between agents and brokers when placing a hole in
/// time: the Kafka setting where there is one, else the default.
fn clock_skew(cfg: &Config, bus: BusKind) -> std::time::Duration {
    match (bus, &cfg.kafka) {
        (BusKind::Kafka, Some(k)) => k.readback_max_clock_skew.0,
        _ => std::time::Duration::from_micros(rebuild::DEFAULT_CLOCK_SKEW_US as u64),
    }
}

/// The silence rule of the agents configured in `cfg`: silent after
/// `multiple` heartbeat periods without a word.
pub fn liveness(cfg: &Config, multiple: u32) -> liveness::Liveness {
    liveness::Liveness::new(cfg.snapshot.heartbeat.0, multiple)
}

/// `virtstream state`: the rebuilt fleet at `now_us` (hosts silent then
/// are stale). An undecodable message in an events lane counts as a lost
/// one.
pub fn state(
    cfg: &Config,
    bus: BusKind,
    silent_after: u32,
    now_us: i64,
) -> Result<(rebuild::Fleet, ReadOutcome), ConsumerError> {
    let mut fleet = rebuild::Fleet::new()
        .with_clock_skew(clock_skew(cfg, bus))
        .with_liveness(liveness(cfg, silent_after), now_us);
    let out = read(cfg, bus, &StartAt::Start, &mut fleet)?;
    Ok((fleet, out))
}

/// `virtstream audit`.
pub fn audit(
    cfg: &Config,
    bus: BusKind,
    from: &StartAt,
    silent_after: u32,
    now_us: i64,
) -> Result<audit::AuditReport, ConsumerError> {
    let mut auditor = audit::Auditor::new(audit::AuditOptions {
        liveness: liveness(cfg, silent_after),
        now_us,
        from_start: matches!(from, StartAt::Start),
    });
    read(cfg, bus, from, &mut auditor)?;
    Ok(auditor.finish())
}

/// `virtstream usage` over `[from_us, to_us)`; hosts silent at the earlier
/// of `to_us` and `now_us` bill nothing after their last word plus the
/// allowance. With `[usage.tenant]`, rows name the tenant found in the
/// domain XML.
pub fn usage(
    cfg: &Config,
    bus: BusKind,
    from_us: i64,
    to_us: i64,
    silent_after: u32,
    now_us: i64,
) -> Result<(Vec<usage::UsageRow>, ReadOutcome), ConsumerError> {
    let mut u = usage::Usage::new().with_liveness(liveness(cfg, silent_after), now_us);
    if let Some(t) = &cfg.usage.tenant {
        u = u.with_tenants(tenant::TenantRule::new(t));
    }
    let out = read(cfg, bus, &StartAt::Start, &mut u)?;
    let skew = i64::try_from(clock_skew(cfg, bus).as_micros()).unwrap_or(i64::MAX);
    Ok((u.compute_with_skew(from_us, to_us, skew), out))
}

/// `virtstream replay`: the events from `from` (of one domain, if given)
/// written to `out` as JSON lines (see `replay`).
pub fn replay(
    cfg: &Config,
    bus: BusKind,
    from: &StartAt,
    domain: Option<&str>,
    out: &mut (dyn std::io::Write + Send),
) -> Result<replay::ReplayStats, replay::ReplayError> {
    let mut r = replay::Replay::new(out);
    read_scoped(cfg, bus, from, Scope::Events { domain }, &mut r)?;
    r.finish()
}
