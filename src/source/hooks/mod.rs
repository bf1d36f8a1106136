//! libvirt's qemu hook, forwarded: `virtstream hook qemu GUEST OPERATION
//! SUBOPERATION EXTRA` (`client`, run by libvirtd as
//! `/etc/libvirt/hooks/qemu`) hands each call to the running agent over a
//! UNIX socket, or appends it to a bounded spool file when no agent
//! listens; the agent (`listen`) queues each call on the source's queue
//! as an `Item::Hook`, and journals the spool at start. This file owns
//! the record both sides exchange and the spool's format.
//!
//! Invariants:
//! - one record is one JSON line of at most [`MAX_RECORD`] bytes (fields
//!   are cut to fit on the hook side, refused beyond it on the agent side);
//! - the spool is append-only with one `write` per record (O_APPEND), and
//!   bounded: a record that does not fit is dropped and counted by one
//!   byte appended to `<spool>.dropped` (its size is the count);
//! - the hook side never calls libvirt and never makes libvirt's operation
//!   fail (see `client`).

pub mod cli;
pub mod client;
pub mod listen;

use std::path::{Path, PathBuf};

use super::HookPhase;

/// The largest record (one JSON line, newline included).
pub const MAX_RECORD: usize = 8 * 1024;

/// The largest field the hook sends (longer ones are cut at a character
/// boundary).
const MAX_FIELD: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hook socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hook spool {path}: {source}")]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hook record is not valid: {0}")]
    Record(String),
}

fn cut(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_string();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The wire and spool form of a hook call.
impl HookPhase {
    /// The record of a hook call (fields cut to fit [`MAX_RECORD`]).
    pub fn new(uuid: &str, args: [&str; 4], observed_at: i64) -> HookPhase {
        HookPhase {
            uuid: uuid.to_string(),
            name: cut(args[0]),
            operation: cut(args[1]),
            sub_operation: cut(args[2]),
            extra: cut(args[3]),
            observed_at,
        }
    }

    /// One JSON line.
    pub fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("hook record serializes");
        v.push(b'\n');
        v
    }

    /// Parses one line (without or with its newline); the UUID must be one.
    pub fn parse(line: &[u8]) -> Result<HookPhase, HookError> {
        if line.len() > MAX_RECORD {
            return Err(HookError::Record(format!(
                "{} bytes, over the {MAX_RECORD}-byte bound",
                line.len()
            )));
        }
        let mut r: HookPhase =
            serde_json::from_slice(line).map_err(|e| HookError::Record(e.to_string()))?;
        let u = uuid::Uuid::parse_str(&r.uuid)
            .map_err(|e| HookError::Record(format!("uuid {:?}: {e}", r.uuid)))?;
        r.uuid = u.hyphenated().to_string();
        Ok(r)
    }
}

/// The file counting records the spool dropped.
pub fn dropped_path(spool: &Path) -> PathBuf {
    let mut p = spool.as_os_str().to_owned();
    p.push(".dropped");
    PathBuf::from(p)
}

/// The first `<uuid>` of a domain XML (the domain's own: it precedes every
/// device), scanned without parsing the document.
pub fn uuid_of_xml(xml: &[u8]) -> Option<String> {
    let start = find(xml, b"<uuid>")? + b"<uuid>".len();
    let len = find(&xml[start..], b"</uuid>")?;
    let text = std::str::from_utf8(&xml[start..start + len]).ok()?;
    uuid::Uuid::parse_str(text.trim())
        .ok()
        .map(|u| u.hyphenated().to_string())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_are_bounded() {
        let long = "x".repeat(5000) + "é";
        let r = HookPhase::new(
            "B9906489-6D5B-40F8-A742-CA71B2B84277",
            ["vm", "prepare", "begin", &long],
            5,
        );
        assert_eq!(r.extra.len(), MAX_FIELD);
        let line = r.line();
        assert!(line.len() <= MAX_RECORD);
        let back = HookPhase::parse(&line).unwrap();
        assert_eq!(back.uuid, "b9906489-6d5b-40f8-a742-ca71b2b84277");
        assert_eq!(back.operation, "prepare");
        assert!(HookPhase::parse(b"{}").is_err());
        assert!(HookPhase::parse(&vec![b' '; MAX_RECORD + 1]).is_err());
        let bad = HookPhase::new("not-a-uuid", ["vm", "start", "begin", "-"], 1);
        assert!(HookPhase::parse(&bad.line()).is_err());
    }

    #[test]
    fn the_domains_uuid_is_the_first_one() {
        let xml = b"<domain type='qemu'>\n  <name>vm</name>\n  <uuid>B9906489-6D5B-40F8-A742-CA71B2B84277</uuid>\n  <devices><disk><uuid>11111111-1111-1111-1111-111111111111</uuid></disk></devices>\n</domain>";
        assert_eq!(
            uuid_of_xml(xml).as_deref(),
            Some("b9906489-6d5b-40f8-a742-ca71b2b84277")
        );
        assert_eq!(uuid_of_xml(b"<domain/>"), None);
        assert_eq!(uuid_of_xml(b"<uuid>nope</uuid>"), None);
    }
}
