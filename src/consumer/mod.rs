//! Consumer tools (same binary as the agent, and a library others can
//! embed): read what agents wrote back from the buses.
//!
//! - `record`: one decoded message of any kind and where it was read;
//! - `bus`: reads the streams (NATS) or topics (Kafka) into records;
//! - `rebuild`: fleet state from snapshot rounds and events (DESIGN §6);
//! - `audit`: continuity per host and domain;
//! - `usage`: running/paused seconds, vCPU·s and GiB·s over a window;
//! - `replay`: decoded messages as JSON lines.
//!
//! `rebuild`, `audit` and `usage` are pure: they take records in the order
//! they were read and never touch a bus, so they can be fed from anything.

pub mod audit;
pub mod bus;
pub mod rebuild;
pub mod record;
pub mod replay;
pub mod usage;

use crate::config::Config;
use bus::{BusError, From, Item, ReadTotals};
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

/// What a whole-bus read gives besides the records.
#[derive(Debug, Default, Clone)]
pub struct ReadOutcome {
    pub totals: ReadTotals,
    /// Messages that could not be decoded: where, and why.
    pub undecodable: Vec<(Position, String)>,
}

/// Reads a bus configured in `cfg` (snapshots, then events from `from`),
/// handing every decoded record to `on_record` with its lane's
/// contiguity. Undecodable messages are collected in the outcome.
pub fn read(
    cfg: &Config,
    bus: BusKind,
    from: &From,
    on_record: &mut (dyn FnMut(&record::Record, bool) + Send),
) -> Result<ReadOutcome, ConsumerError> {
    let mut undecodable = Vec::new();
    let mut on_item = |it: Item| match it {
        Item::Record { record, contiguous } => on_record(&record, contiguous),
        Item::Undecodable { pos, error } => undecodable.push((pos, error.to_string())),
    };
    let totals = match bus {
        BusKind::Nats => {
            let ncfg = cfg
                .nats
                .as_ref()
                .ok_or(ConsumerError::MissingSection("nats"))?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ConsumerError::Runtime)?
                .block_on(bus::read_nats(ncfg, from, &mut on_item))?
        }
        BusKind::Kafka => {
            let kcfg = cfg
                .kafka
                .as_ref()
                .ok_or(ConsumerError::MissingSection("kafka"))?;
            bus::read_kafka(kcfg, from, &mut on_item)?
        }
    };
    Ok(ReadOutcome {
        totals,
        undecodable,
    })
}

/// `virtstream state`: the rebuilt fleet. An undecodable message in an
/// events lane counts as a lost one (its hosts are stale until a round).
pub fn state(cfg: &Config, bus: BusKind) -> Result<(rebuild::Fleet, ReadOutcome), ConsumerError> {
    let mut fleet = rebuild::Fleet::new();
    let out = read(cfg, bus, &From::Start, &mut |r, c| fleet.apply(r, c))?;
    for (pos, _) in &out.undecodable {
        fleet.lane_hole(&pos.lane());
    }
    Ok((fleet, out))
}

/// `virtstream audit`.
pub fn audit(
    cfg: &Config,
    bus: BusKind,
    from: &From,
    now_us: i64,
) -> Result<audit::AuditReport, ConsumerError> {
    let mut auditor = audit::Auditor::new(audit::AuditOptions {
        heartbeat_us: cfg.snapshot.heartbeat.0.as_micros() as i64,
        now_us,
        from_start: matches!(from, From::Start),
    });
    let out = read(cfg, bus, from, &mut |r, c| auditor.add(r, c))?;
    for (pos, why) in &out.undecodable {
        auditor.undecodable(pos, why);
    }
    Ok(auditor.finish())
}

/// `virtstream usage` over `[from_us, to_us)`.
pub fn usage(
    cfg: &Config,
    bus: BusKind,
    from_us: i64,
    to_us: i64,
) -> Result<(Vec<usage::UsageRow>, ReadOutcome), ConsumerError> {
    let mut u = usage::Usage::new();
    let out = read(cfg, bus, &From::Start, &mut |r, c| u.add(r, c))?;
    for (pos, _) in &out.undecodable {
        u.lane_hole(&pos.lane());
    }
    Ok((u.compute(from_us, to_us), out))
}
