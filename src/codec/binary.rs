//! A direct Avro binary reader for `DomainEvent` v1 and v2, the record the
//! consumer tools decode by the million. It reads the datum field by field
//! in the writer schema's order, without building a generic Avro value, and
//! is used only when the message's writer fingerprint is exactly
//! `DomainEvent` v1 or v2 (v2 = v1 + enum symbols appended at the end + a
//! trailing optional `hook` record); every other writer schema goes
//! through `apache-avro` with schema resolution.
//!
//! Invariants:
//! - never panics and never reads past the datum: every length and varint is
//!   checked against what is left, and any malformed byte string gives a
//!   `CodecError` naming the field;
//! - gives the same `DomainEvent` as the generic path for every datum the
//!   generic path accepts, and refuses what it refuses (the fuzz target
//!   compares both).

use super::CodecError;
use crate::model::{
    Detail, DomainEvent, DomainRef, DomainState, EventType, HookCall, Origin, StateReason,
};

struct Reader<'a> {
    buf: &'a [u8],
    field: &'static str,
}

fn malformed(field: &'static str, what: impl std::fmt::Display) -> CodecError {
    CodecError::Shape(format!("DomainEvent field {field}: {what}"))
}

impl<'a> Reader<'a> {
    fn at(&mut self, field: &'static str) -> &mut Self {
        self.field = field;
        self
    }

    fn long(&mut self) -> Result<i64, CodecError> {
        self.long_or_end()?
            .ok_or_else(|| malformed(self.field, "datum ends inside a number"))
    }

    /// A long, or `None` when the datum ends before the number does (the
    /// rest of the datum is then consumed, as a slice reader would).
    fn long_or_end(&mut self) -> Result<Option<i64>, CodecError> {
        let mut n: u64 = 0;
        for (i, b) in self.buf.iter().enumerate().take(10) {
            n |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.buf = &self.buf[i + 1..];
                return Ok(Some((n >> 1) as i64 ^ -((n & 1) as i64)));
            }
        }
        if self.buf.len() < 10 {
            self.buf = &[];
            return Ok(None);
        }
        Err(malformed(self.field, "number longer than 10 bytes"))
    }

    fn int(&mut self) -> Result<i32, CodecError> {
        let v = self.long()?;
        i32::try_from(v).map_err(|_| malformed(self.field, format!("{v} does not fit an int")))
    }

    fn str(&mut self) -> Result<&'a str, CodecError> {
        let left = self.buf.len();
        self.str_or_end()?.ok_or_else(|| {
            malformed(
                self.field,
                format!("string longer than the {left} bytes left"),
            )
        })
    }

    /// A string, or `None` when the datum ends inside its bytes (the rest
    /// is consumed): apache-avro reads that as null, which a `["null",
    /// "string"]` union accepts. Lengths over the decode allocation bound
    /// are refused first, as apache-avro does.
    fn str_or_end(&mut self) -> Result<Option<&'a str>, CodecError> {
        let len = self.long()?;
        let len = usize::try_from(len)
            .map_err(|_| malformed(self.field, format!("negative string length {len}")))?;
        if len > super::MAX_DECODE_ALLOCATION {
            return Err(malformed(
                self.field,
                format!("string of {len} bytes is over the decoding bound"),
            ));
        }
        if len > self.buf.len() {
            self.buf = &[];
            return Ok(None);
        }
        let (s, rest) = self.buf.split_at(len);
        self.buf = rest;
        std::str::from_utf8(s)
            .map(Some)
            .map_err(|e| malformed(self.field, e))
    }

    /// A string with logical type `uuid`, read as `apache-avro` does (16
    /// bytes are the raw UUID, anything else must parse as one) and given
    /// in the canonical lower-case hyphenated form.
    fn uuid(&mut self) -> Result<String, CodecError> {
        let len = self.long()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= self.buf.len())
            .ok_or_else(|| malformed(self.field, format!("bad UUID length {len}")))?;
        let (b, rest) = self.buf.split_at(len);
        self.buf = rest;
        let u = if len == 16 {
            uuid::Uuid::from_slice(b).map_err(|e| malformed(self.field, e))?
        } else {
            let s = std::str::from_utf8(b).map_err(|e| malformed(self.field, e))?;
            uuid::Uuid::parse_str(s).map_err(|e| malformed(self.field, e))?
        };
        Ok(u.hyphenated().to_string())
    }

    fn bool(&mut self) -> Result<bool, CodecError> {
        match self.buf.split_first() {
            Some((0, rest)) => {
                self.buf = rest;
                Ok(false)
            }
            Some((1, rest)) => {
                self.buf = rest;
                Ok(true)
            }
            Some((b, _)) => Err(malformed(self.field, format!("boolean byte {b}"))),
            None => Err(malformed(self.field, "datum ends before a boolean")),
        }
    }

    fn symbol<T>(&mut self, from_index: impl Fn(u32) -> Option<T>) -> Result<T, CodecError> {
        let i = self.long()?;
        u32::try_from(i)
            .ok()
            .and_then(from_index)
            .ok_or_else(|| malformed(self.field, format!("enum index {i} out of range")))
    }

    /// A `["null", "string"]` union (a string cut by the datum's end is
    /// null there, see [`Self::str_or_end`]).
    fn opt_str(&mut self) -> Result<Option<String>, CodecError> {
        Ok(self.opt(|r| r.str_or_end())?.flatten().map(str::to_owned))
    }

    /// A `["null", T]` union.
    fn opt<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, CodecError>,
    ) -> Result<Option<T>, CodecError> {
        // apache-avro reads a union whose index the datum ends before (or
        // inside) as null; do the same, so both readers accept the same
        // data.
        let Some(index) = self.long_or_end()? else {
            return Ok(None);
        };
        match index {
            0 => Ok(None),
            1 => f(self).map(Some),
            b => Err(malformed(
                self.field,
                format!("union branch {b} out of range"),
            )),
        }
    }
}

/// Decodes a `DomainEvent` v1 or v2 datum (the bytes after the 10-byte
/// header). A v1 writer knows neither the HOOK symbols nor the `hook`
/// field: its indexes past its own lists are out of range, as they are
/// for the generic path.
pub(super) fn domain_event(datum: &[u8], version: u32) -> Result<DomainEvent, CodecError> {
    let v1 = version == 1;
    // The symbols of the v1 enums: the v2 lists minus what v2 appended.
    let event_v1 = |i: u32| {
        (i <= EventType::UNKNOWN.index())
            .then(|| EventType::from_index(i))
            .flatten()
    };
    let detail_v1 = |i: u32| {
        (i <= Detail::UNKNOWN.index())
            .then(|| Detail::from_index(i))
            .flatten()
    };
    let r = &mut Reader {
        buf: datum,
        field: "",
    };
    let event_id = r.at("event_id").str()?.to_owned();
    let host_id = r.at("host_id").str()?.to_owned();
    let epoch = r.at("epoch").str()?.to_owned();
    let host_seq = r.at("host_seq").long()? as u64;
    let seq = r.at("seq").long()? as u64;
    let domain = DomainRef {
        uuid: r.at("domain.uuid").uuid()?,
        name: r.at("domain.name").str()?.to_owned(),
        id: r.at("domain.id").opt(Reader::int)?,
    };
    let event = if v1 {
        r.at("event").symbol(event_v1)?
    } else {
        r.at("event").symbol(EventType::from_index)?
    };
    let libvirt_event_id = r.at("libvirt_event_id").int()?;
    let event_code = r.at("event_code").int()?;
    let detail = if v1 {
        r.at("detail").symbol(detail_v1)?
    } else {
        r.at("detail").symbol(Detail::from_index)?
    };
    let detail_code = r.at("detail_code").int()?;
    let origin = r.at("origin").symbol(Origin::from_index)?;
    let state_after = StateReason {
        state: r.at("state_after.state").symbol(DomainState::from_index)?,
        state_code: r.at("state_after.state_code").int()?,
        reason: r.at("state_after.reason").str()?.to_owned(),
        reason_code: r.at("state_after.reason_code").int()?,
    };
    let persistent = r.at("persistent").bool()?;
    let autostart = r.at("autostart").opt(Reader::bool)?;
    let vcpus = r.at("vcpus").opt(Reader::int)?;
    let memory_kib = r.at("memory_kib").opt(Reader::long)?;
    let config_hash = r.at("config_hash").opt_str()?;
    let observed_at = r.at("observed_at").long()?;
    let xml = r.at("xml").opt_str()?;
    let hook = if v1 {
        None
    } else {
        r.at("hook").opt(|r| {
            Ok(HookCall {
                operation: r.at("hook.operation").str()?.to_owned(),
                sub_operation: r.at("hook.sub_operation").str()?.to_owned(),
                extra: r.at("hook.extra").str()?.to_owned(),
            })
        })?
    };
    if !r.buf.is_empty() {
        return Err(CodecError::Trailing(r.buf.len()));
    }
    Ok(DomainEvent {
        event_id,
        host_id,
        epoch,
        host_seq,
        seq,
        domain,
        event,
        libvirt_event_id,
        event_code,
        detail,
        detail_code,
        origin,
        state_after,
        persistent,
        autostart,
        vcpus,
        memory_kib,
        config_hash,
        observed_at,
        xml,
        hook,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample;
    use super::super::{decode_event, decode_event_generic, encode_event, schemas};
    use crate::model::{Detail, EventType, HookCall, Origin};

    fn hook_sample() -> crate::model::DomainEvent {
        let mut e = sample();
        e.event = EventType::HOOK;
        e.detail = Detail::HOOK_RELEASE;
        e.origin = Origin::HOOK;
        e.event_code = -1;
        e.detail_code = -1;
        e.libvirt_event_id = -1;
        e.hook = Some(HookCall {
            operation: "release".into(),
            sub_operation: "end".into(),
            extra: "-".into(),
        });
        e
    }

    #[test]
    fn v2_hook_records_read_the_same_directly_and_through_apache_avro() {
        for e in [sample(), hook_sample()] {
            let bytes = encode_event(&e);
            assert_eq!(decode_event(&bytes).unwrap(), e);
            assert_eq!(decode_event_generic(&bytes).unwrap(), e);
        }
    }

    #[test]
    fn both_readers_agree_on_every_truncation_and_corruption_of_a_hook_record() {
        let bytes = encode_event(&hook_sample());
        for n in 10..=bytes.len() {
            let (a, b) = (decode_event(&bytes[..n]), decode_event_generic(&bytes[..n]));
            match (&a, &b) {
                (Ok(x), Ok(y)) => assert_eq!(x, y, "prefix {n}"),
                (Err(_), Err(_)) => {}
                _ => panic!("prefix {n}: direct {a:?} generic {b:?}"),
            }
        }
        for i in bytes.len() - 20..bytes.len() {
            for v in [0x00u8, 0x02, 0x7f, 0x80, 0xff] {
                let mut c = bytes.clone();
                c[i] = v;
                let (a, b) = (decode_event(&c), decode_event_generic(&c));
                match (&a, &b) {
                    (Ok(x), Ok(y)) => assert_eq!(x, y, "byte {i} = {v}"),
                    (Err(_), Err(_)) => {}
                    _ => panic!("byte {i} = {v}: direct {a:?} generic {b:?}"),
                }
            }
        }
    }

    #[test]
    fn v1_data_still_reads_and_v1_writers_cannot_name_v2_symbols() {
        let v1 = schemas()
            .iter()
            .find(|s| s.name == "DomainEvent" && s.version == 1)
            .unwrap();
        // A v1 datum is the v2 one of a record without a hook, minus the
        // trailing null branch of `hook`.
        let e = sample();
        let mut bytes = encode_event(&e);
        assert_eq!(bytes.pop(), Some(0));
        bytes[2..10].copy_from_slice(&v1.fingerprint.to_le_bytes());
        assert_eq!(decode_event(&bytes).unwrap(), e);
        assert_eq!(decode_event_generic(&bytes).unwrap(), e);
        // HOOK as a v1 event index is out of v1's range for both readers.
        let mut h = sample();
        h.event = EventType::HOOK;
        let mut bytes = encode_event(&h);
        bytes.pop();
        bytes[2..10].copy_from_slice(&v1.fingerprint.to_le_bytes());
        assert!(decode_event(&bytes).is_err());
        assert!(decode_event_generic(&bytes).is_err());
    }
}
