//! Consumer tools (same binary as the agent): read what agents wrote back
//! from the buses. `replay` decodes messages to JSON lines.

pub mod replay;
