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

pub mod record;
pub mod replay;
