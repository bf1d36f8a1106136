//! The agent's wall clock: one function, so every stage stamps times the
//! same way.
//!
//! Invariants:
//! - times are µs since the Unix epoch as an `i64`;
//! - a clock before the epoch reads 0 (never panics).

/// Current time in µs since the Unix epoch.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
