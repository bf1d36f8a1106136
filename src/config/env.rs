//! Environment overrides: `VIRTSTREAM_<SECTION>_<KEY>=value` sets
//! `section.key` before the configuration is deserialized, so overrides
//! are validated like the file.
//!
//! Invariants:
//! - an override wins over the file; naming a section absent from the
//!   file creates it (which is how the environment enables a sink);
//! - the value takes the type of the key's value in the file; a value
//!   that does not parse as that type is refused, naming the key and the
//!   variable.

use std::collections::BTreeMap;

use super::{key_err, ConfigError};

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "VIRTSTREAM_";

/// Applies `VIRTSTREAM_<SECTION>_<KEY>=value` overrides. The value is typed
/// after the key's current value when the file sets it (string, integer,
/// float, boolean), else guessed (integer, boolean, then string).
pub(super) fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let overrides: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    for (name, raw) in overrides {
        let rest = &name[ENV_PREFIX.len()..];
        // Section names with an underscore are matched whole first.
        let lower = rest.to_ascii_lowercase();
        let split = MULTI_WORD_SECTIONS
            .iter()
            .find_map(|s| {
                lower.strip_prefix(s)?.strip_prefix('_')?;
                Some((&rest[..s.len()], &rest[s.len() + 1..]))
            })
            .or_else(|| rest.split_once('_'));
        let Some((section, key)) = split else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let full = format!("{section}.{key}");
        let sect = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(sect) = sect else {
            return Err(key_err(&section, "is not a table"));
        };
        let value = match sect.get(&key) {
            Some(toml::Value::Integer(_)) => raw
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| key_err(&full, format!("{name}=`{raw}` is not an integer")))?,
            Some(toml::Value::Float(_)) => raw
                .parse::<f64>()
                .map(toml::Value::Float)
                .map_err(|_| key_err(&full, format!("{name}=`{raw}` is not a number")))?,
            Some(toml::Value::Boolean(_)) => raw
                .parse::<bool>()
                .map(toml::Value::Boolean)
                .map_err(|_| key_err(&full, format!("{name}=`{raw}` is not true/false")))?,
            Some(_) => toml::Value::String(raw),
            None => {
                if STRING_KEYS.contains(&full.as_str()) {
                    toml::Value::String(raw)
                } else if let Ok(i) = raw.parse::<i64>() {
                    toml::Value::Integer(i)
                } else if let Ok(b) = raw.parse::<bool>() {
                    toml::Value::Boolean(b)
                } else {
                    toml::Value::String(raw)
                }
            }
        };
        sect.insert(key, value);
    }
    Ok(())
}

/// Sections whose names contain an underscore.
const MULTI_WORD_SECTIONS: &[&str] = &["schema_registry"];

/// String-typed keys whose values may look like numbers.
const STRING_KEYS: &[&str] = &[
    "host.id",
    "journal.path",
    "nats.url",
    "metrics.listen",
    "kafka.brokers",
    "kafka.client_id",
    "kafka.sasl_username",
    "kafka.sasl_password",
    "nats.user",
    "nats.password",
    "schema_registry.url",
    "schema_registry.username",
    "schema_registry.password",
];

#[cfg(test)]
mod tests {
    use crate::config::testutil::{parse, SAMPLE};

    #[test]
    fn env_overrides_win_and_are_typed() {
        let c = parse(
            SAMPLE,
            &[
                ("VIRTSTREAM_NATS_URL", "nats://10.0.0.1:4222"),
                ("VIRTSTREAM_HOST_ID", "1234"),
                ("VIRTSTREAM_LIBVIRT_QUEUE_CAPACITY", "64"),
                ("VIRTSTREAM_LIBVIRT_READ_ONLY", "false"),
                ("OTHER_THING", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.nats.unwrap().url, "nats://10.0.0.1:4222");
        assert_eq!(c.host.id.as_deref(), Some("1234"));
        assert_eq!(c.libvirt.queue_capacity, 64);
        assert!(!c.libvirt.read_only);
        let err = parse(SAMPLE, &[("VIRTSTREAM_LIBVIRT_READ_ONLY", "maybe")]).unwrap_err();
        assert!(err.to_string().contains("libvirt.read_only"), "{err}");
    }

    #[test]
    fn env_can_enable_a_sink() {
        let text = SAMPLE.replace("[nats]\nurl = \"nats://127.0.0.1:4222\"\n", "");
        assert!(parse(&text, &[]).unwrap().nats.is_none());
        let c = parse(&text, &[("VIRTSTREAM_NATS_URL", "nats://h:4222")]).unwrap();
        assert_eq!(c.nats.unwrap().url, "nats://h:4222");
    }
}
