//! Consumer tools (same binary as the agent, and a library others can
//! embed): read what agents wrote back from the buses.
//!
//! - `record`: one decoded message of any kind and where it was read;
//! - `bus`: reads the streams (NATS) or topics (Kafka) into records;
//! - `rebuild`: fleet state from snapshot rounds and events (DESIGN §6);
//! - `audit`: continuity per host and domain;
//! - `usage`: running/paused seconds, vCPU·s and GiB·s over a window;
//! - `liveness`: when a host counts as silent (shared by the three);
//! - `epochs`: which of a host's epochs is newest, by stream position;
//! - `replay`: decoded messages as JSON lines.
//!
//! `rebuild`, `audit` and `usage` are pure: they take records in the order
//! they were read and never touch a bus, so they can be fed from anything.

pub mod audit;
pub mod bus;
pub mod epochs;
pub mod liveness;
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
/// handing every item to `on_item` in the order read. Undecodable
/// messages are also collected in the outcome, for the report.
pub fn read(
    cfg: &Config,
    bus: BusKind,
    from: &From,
    on_item: &mut (dyn FnMut(&Item) + Send),
) -> Result<ReadOutcome, ConsumerError> {
    let mut undecodable = Vec::new();
    let mut each = |it: Item| {
        on_item(&it);
        if let Item::Undecodable { pos, error, .. } = it {
            undecodable.push((pos, error.to_string()));
        }
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
                .block_on(bus::read_nats(ncfg, from, &mut each))?
        }
        BusKind::Kafka => {
            let kcfg = cfg
                .kafka
                .as_ref()
                .ok_or(ConsumerError::MissingSection("kafka"))?;
            bus::read_kafka(kcfg, from, &mut each)?
        }
    };
    Ok(ReadOutcome {
        totals,
        undecodable,
    })
}

/// What the rebuild and usage take from a read: records, losses at a
/// position of a contiguous lane, and where such a lane ended.
pub trait Feed {
    fn record(&mut self, rec: &record::Record, contiguous: bool);
    fn lost(&mut self, pos: &Position);
    fn lane_end(&mut self, lane: &record::Lane, last: u64, time_us: Option<i64>);

    /// Hands one item read over (an undecodable message of a contiguous
    /// lane counts as a lost one).
    fn feed(&mut self, it: &Item) {
        match it {
            Item::Record { record, contiguous } => self.record(record, *contiguous),
            Item::Undecodable {
                pos,
                contiguous: true,
                ..
            } => self.lost(pos),
            Item::Undecodable { .. } => {}
            Item::LaneEnd {
                lane,
                last,
                time_us,
            } => self.lane_end(lane, *last, *time_us),
        }
    }
}

impl Feed for rebuild::Fleet {
    fn record(&mut self, rec: &record::Record, contiguous: bool) {
        self.apply(rec, contiguous)
    }
    fn lost(&mut self, pos: &Position) {
        rebuild::Fleet::lost(self, pos)
    }
    fn lane_end(&mut self, lane: &record::Lane, last: u64, time_us: Option<i64>) {
        rebuild::Fleet::lane_end(self, lane, last, time_us)
    }
}

impl Feed for usage::Usage {
    fn record(&mut self, rec: &record::Record, contiguous: bool) {
        self.add(rec, contiguous)
    }
    fn lost(&mut self, pos: &Position) {
        usage::Usage::lost(self, pos)
    }
    fn lane_end(&mut self, lane: &record::Lane, last: u64, time_us: Option<i64>) {
        usage::Usage::lane_end(self, lane, last, time_us)
    }
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
    let out = read(cfg, bus, &From::Start, &mut |it| fleet.feed(it))?;
    Ok((fleet, out))
}

/// `virtstream audit`.
pub fn audit(
    cfg: &Config,
    bus: BusKind,
    from: &From,
    silent_after: u32,
    now_us: i64,
) -> Result<audit::AuditReport, ConsumerError> {
    let mut auditor = audit::Auditor::new(audit::AuditOptions {
        liveness: liveness(cfg, silent_after),
        now_us,
        from_start: matches!(from, From::Start),
    });
    read(cfg, bus, from, &mut |it| match it {
        Item::Record { record, contiguous } => auditor.add(record, *contiguous),
        Item::Undecodable { pos, error, .. } => auditor.undecodable(pos, &error.to_string()),
        Item::LaneEnd { lane, last, .. } => auditor.lane_end(lane, *last),
    })?;
    Ok(auditor.finish())
}

/// `virtstream usage` over `[from_us, to_us)`; hosts silent at the earlier
/// of `to_us` and `now_us` bill nothing after their last word plus the
/// allowance.
pub fn usage(
    cfg: &Config,
    bus: BusKind,
    from_us: i64,
    to_us: i64,
    silent_after: u32,
    now_us: i64,
) -> Result<(Vec<usage::UsageRow>, ReadOutcome), ConsumerError> {
    let mut u = usage::Usage::new().with_liveness(liveness(cfg, silent_after), now_us);
    let out = read(cfg, bus, &From::Start, &mut |it| u.feed(it))?;
    let skew = i64::try_from(clock_skew(cfg, bus).as_micros()).unwrap_or(i64::MAX);
    Ok((u.compute_with_skew(from_us, to_us, skew), out))
}
