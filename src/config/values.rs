//! Value types and defaults shared by several sections: durations written
//! as text (`5s`) and the body encoding of both sinks.
//!
//! Invariants:
//! - a [`Dur`] reads and writes the same humantime text form, and a bad
//!   one is refused with an example of a good one;
//! - defaults here are the ones documented for every section using them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A duration written as `500ms`, `5s`, `2m`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration ({e}); use e.g. 500ms, 5s, 2m"
            ))
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Avro,
    Json,
}

pub(super) fn d_true() -> bool {
    true
}
pub(super) fn d_one() -> usize {
    1
}
pub(super) fn d_encoding() -> Encoding {
    Encoding::Avro
}
