//! The partition reader of the bus layer ([`crate::bus::kafka::reader`]),
//! with its errors as [`KafkaSinkError`]s for the sink's callers.
//!
//! Invariant: reads exactly as the bus layer's reader does; only the
//! error type differs (same variant, same text).

use rdkafka::config::ClientConfig;
use rdkafka::message::BorrowedMessage;

pub use crate::bus::kafka::reader::{
    Flow, Lateness, ReadOptions, ReadSummary, Start, DEFAULT_LOOKBACK,
};

use super::KafkaSinkError;

/// [`crate::bus::kafka::reader::read_to_end`]. Blocking.
pub fn read_to_end(
    base: &ClientConfig,
    opts: ReadOptions<'_>,
    on_record: impl FnMut(&BorrowedMessage<'_>) -> Flow,
) -> Result<ReadSummary, KafkaSinkError> {
    Ok(crate::bus::kafka::reader::read_to_end(
        base, opts, on_record,
    )?)
}
