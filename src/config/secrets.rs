//! Secrets in the configuration: the [`Secret`] value type, which keys
//! count as secret (for `Config::redacted`), and the start-up check of the
//! files secrets are read from.
//!
//! Invariants:
//! - a `Secret` never shows its value through `Debug`, `Serialize` or a
//!   deserialization error; [`Secret::expose`] is the one way to read it;
//! - a secret file named in the config is readable and not blank, checked
//!   before anything starts; errors name the key and the path, never the
//!   contents.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{key_err, ConfigError};

/// A secret value given in the config or the environment. `Debug` and
/// `Serialize` never show it; [`Secret::expose`] is the one way to read it.
/// A trailing newline (a Kubernetes Secret made from a file) is dropped,
/// as it is from secret files.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Never echo the value in the error.
        let s = String::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a string (value not shown)"))?;
        Ok(Secret(s.trim_end_matches(['\n', '\r']).to_string()))
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Keys whose values are secrets or point at them.
const SECRET_KEYS: &[&str] = &[
    "token",
    "password",
    "credentials_file",
    "token_file",
    "nkey_seed_file",
    "sasl_password",
    "sasl_password_file",
    "tls_key_password_file",
];

/// Is `key` (a config key or a librdkafka property) a secret?
pub(super) fn is_secret(key: &str) -> bool {
    SECRET_KEYS.contains(&key) || key.contains("password") || key.contains("secret")
}

/// A file the agent reads at start: it must be readable and not empty.
pub(super) fn check_secret_file(key: &str, p: &Path) -> Result<(), ConfigError> {
    let data =
        std::fs::read(p).map_err(|e| key_err(key, format!("cannot read {}: {e}", p.display())))?;
    if data.iter().all(u8::is_ascii_whitespace) {
        return Err(key_err(key, format!("{} is empty", p.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::testutil::{parse, KAFKA, SAMPLE};

    #[test]
    fn secrets_have_one_way_in_and_never_echo() {
        let dir = tempfile::tempdir().unwrap();
        let with = |extra: &str| SAMPLE.replace("[metrics]", &format!("{extra}\n[metrics]"));
        // Credentials in the URL would be logged with it.
        let e = parse(
            &SAMPLE.replace("nats://127.0.0.1", "nats://u:pw-in-url@127.0.0.1"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nats.url") && !e.contains("pw-in-url"), "{e}");
        // An empty secret file is refused before anything starts.
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let e = parse(&with(&format!("token_file = \"{}\"", empty.display())), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nats.token_file") && e.contains("is empty"),
            "{e}"
        );
        // A password that looks like a boolean or a number stays a string,
        // and a trailing newline (a Secret made from a file) is dropped.
        for (raw, want) in [("true", "true"), ("007", "007"), ("pw\n", "pw")] {
            let c = parse(&with("user = \"u\""), &[("VIRTSTREAM_NATS_PASSWORD", raw)]).unwrap();
            let pw = c.nats.unwrap().password.unwrap();
            assert_eq!(pw.expose(), want);
        }
        // A wrong type never shows the value.
        let e = parse(&with("user = \"u\"\npassword = 12345"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nats.password") && !e.contains("12345"), "{e}");
        // Kafka secrets cannot be passed inline as librdkafka properties.
        let e = parse(
            &format!("{SAMPLE}{KAFKA}[kafka.properties]\n\"sasl.password\" = \"pw\"\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sasl.password") && e.contains("sasl_password_file"),
            "{e}"
        );
        // wss:// requires TLS like tls:// does.
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "ca").unwrap();
        let text = with(&format!("tls_ca_file = \"{}\"", ca.display()))
            .replace("nats://127.0.0.1:4222", "wss://127.0.0.1:443");
        assert!(parse(&text, &[]).unwrap().nats.unwrap().tls_required());
    }

    #[test]
    fn secrets_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("token");
        std::fs::write(&tok, "s3cret").unwrap();
        let text = SAMPLE.replace(
            "url = \"nats://127.0.0.1:4222\"",
            &format!(
                "url = \"nats://127.0.0.1:4222\"\ntoken_file = \"{}\"",
                tok.display()
            ),
        );
        let out = parse(&text, &[]).unwrap().redacted();
        assert!(out.contains("<redacted>"), "{out}");
        assert!(!out.contains(tok.to_str().unwrap()), "{out}");
        assert!(!out.contains("s3cret"));
    }
}
