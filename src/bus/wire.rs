//! Names on the wire that the writer and the readers share: the tombstone
//! header, and the reversible encoding of a host id as one NATS subject
//! token.
//!
//! Invariants: these are part of the published format (docs and external
//! consumers rely on them); changing one is a format change.

/// Header marking a deletion (tombstone) on NATS, and on Kafka too (where
/// the value is null).
pub const TOMBSTONE_HEADER: &str = "virtstream-tombstone";

/// Encodes a host id as one NATS subject token, reversibly: ASCII letters,
/// digits and `-` stay as they are; every other byte (including `_`, `.`,
/// `*`, `>` and whitespace) becomes `_XX` (upper-case hex).
/// `node1.example.com` → `node1_2Eexample_2Ecom`.
pub fn subject_token(host_id: &str) -> String {
    let mut out = String::with_capacity(host_id.len());
    for b in host_id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

/// Inverse of [`subject_token`]; `None` for a token it cannot have made.
pub fn host_from_token(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_token_is_reversible_and_safe() {
        for h in [
            "host-a",
            "node1.example.com",
            "a b*c>d_e",
            "ünï",
            "x:y/z",
            "",
        ] {
            let t = subject_token(h);
            assert!(!t.contains(['.', '*', '>', ' ']), "{t}");
            assert_eq!(host_from_token(&t).as_deref(), Some(h));
        }
        assert_eq!(subject_token("node1.example.com"), "node1_2Eexample_2Ecom");
        assert_eq!(host_from_token("bad_Z"), None);
    }
}
