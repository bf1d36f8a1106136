//! Configuration: TOML file + `VIRTSTREAM_<SECTION>_<KEY>` environment
//! overrides, validated before anything starts. This module owns
//! [`Config`], loading and the error type; each section lives beside its
//! validation (`host`: host, libvirt, journal; `nats`; `kafka`;
//! `registry`: schema_registry; `service`: snapshot, metrics, log;
//! `usage`: where the usage tool publishes, and the tenant rule;
//! `actions`: the `[[actions]]` commands run for matching events; `hooks`:
//! the qemu hook listener and spool), `env`
//! applies overrides, `secrets` keeps secret values out of output.
//!
//! Invariants:
//! - unknown keys and wrong types are refused, naming the full key
//!   (`nats.url`) and the reason;
//! - a sink is enabled exactly when its section is present (in the file or
//!   through an environment override);
//! - secrets never appear in `Display`/`redacted()` output.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod actions;
mod env;
mod hooks;
mod host;
mod kafka;
mod nats;
mod registry;
mod secrets;
mod service;
mod usage;
mod values;

pub use actions::{
    find_program, placeholders_in, ActionConfig, ActionMatch, ActionStart, PLACEHOLDERS,
};
pub use env::ENV_PREFIX;
pub use hooks::{HooksConfig, DEFAULT_HOOKS_SOCKET, DEFAULT_HOOKS_SPOOL, DEFAULT_SPOOL_MAX_BYTES};
pub use host::{HostConfig, JournalConfig, LibvirtConfig, WhenFull, XmlMode};
pub use kafka::{Brokers, KafkaConfig, PropValue, SaslMechanism, KAFKA_RESERVED_PROPERTIES};
pub use nats::NatsConfig;
pub use registry::{RegistrySink, SchemaRegistryConfig, Subjects};
pub use secrets::Secret;
pub use service::{LogConfig, LogFormat, MetricsConfig, SnapshotConfig};
pub use usage::{Namespaces, TenantConfig, UsageConfig};
pub use values::{Dur, Encoding};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Key { key: String, reason: String },
}

fn key_err(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.to_string(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub host: HostConfig,
    #[serde(default)]
    pub libvirt: LibvirtConfig,
    pub journal: JournalConfig,
    pub nats: Option<NatsConfig>,
    pub kafka: Option<KafkaConfig>,
    pub schema_registry: Option<SchemaRegistryConfig>,
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The usage tool's publishing targets and tenant rule (not used by
    /// the agent).
    #[serde(default)]
    pub usage: UsageConfig,
    /// Commands run for matching domain events, each fed from its own
    /// journal cursor (`action:<name>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ActionConfig>,
    /// The qemu hook listener (`virtstream hook`); enabled when present.
    pub hooks: Option<HooksConfig>,
}

impl Config {
    /// Reads `path`, applies environment overrides from `env`, validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path, env)
    }

    /// Parses TOML text, applies overrides, validates.
    pub fn from_toml(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    message: e.message().to_string(),
                })?;
        env::apply_env(&mut table, env)?;
        let de = toml::Value::Table(table);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let reason = e.inner().to_string();
            // serde reports a missing field on its parent; name the full key.
            let missing = reason
                .strip_prefix("missing field `")
                .and_then(|r| r.split('`').next());
            match missing {
                Some(field) if key == "." => key_err(field, "required key is missing"),
                Some(field) => key_err(&format!("{key}.{field}"), "required key is missing"),
                None => key_err(&key, reason),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        // Section by section, in the order the keys are documented.
        self.host.validate()?;
        self.libvirt.validate()?;
        self.snapshot.validate()?;
        self.journal.validate()?;
        if let Some(n) = &self.nats {
            n.validate()?;
        }
        if let Some(k) = &self.kafka {
            k.validate()?;
        }
        if let Some(r) = &self.schema_registry {
            r.validate(self.kafka.as_ref(), self.nats.as_ref())?;
        }
        self.usage
            .validate(self.nats.as_ref(), self.kafka.as_ref())?;
        if let Some(h) = &self.hooks {
            h.validate()?;
        }
        let path = std::env::var("PATH").ok();
        actions::validate(&self.actions, path.as_deref())
    }

    /// Checks the journal directory can be created and written; the error
    /// names `journal.path`.
    pub fn check_journal_writable(&self) -> Result<(), ConfigError> {
        let dir = &self.journal.path;
        let fail = |e: std::io::Error| {
            key_err(
                "journal.path",
                format!("{} is not a writable directory: {e}", dir.display()),
            )
        };
        // 0700: the journal holds domain names and, optionally, XML.
        create_private_dir(dir).map_err(fail)?;
        let probe = dir.join(format!(".virtstream-probe-{}", std::process::id()));
        std::fs::write(&probe, b"probe").map_err(fail)?;
        std::fs::remove_file(&probe).map_err(fail)?;
        std::fs::read_dir(dir).map_err(fail)?;
        Ok(())
    }

    /// The effective configuration as TOML, secrets replaced by `<redacted>`.
    pub fn redacted(&self) -> String {
        let mut v = toml::Value::try_from(self).expect("config serializes");
        fn scrub(v: &mut toml::Value) {
            if let toml::Value::Table(t) = v {
                for (k, val) in t.iter_mut() {
                    if secrets::is_secret(k) {
                        *val = toml::Value::String("<redacted>".into());
                    } else {
                        scrub(val);
                    }
                }
            }
        }
        scrub(&mut v);
        toml::to_string_pretty(&v).expect("toml renders")
    }
}

/// Creates `dir` and missing parents with mode 0700 (an existing
/// directory keeps the mode its operator gave it): how the journal's
/// directory is made, by the config check of `journal.path` and by the
/// journal at open alike.
pub fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! What the tests of every section parse.
    use std::path::Path;

    use super::{Config, ConfigError};

    pub const SAMPLE: &str = r#"
[host]
id = "host-a"
[libvirt]
uri = "test+unix:///default"
[journal]
path = "/var/lib/virtstream"
[nats]
url = "nats://127.0.0.1:4222"
[metrics]
listen = "127.0.0.1:9477"
"#;

    pub const KAFKA: &str = "\n[kafka]\nbrokers = [\"127.0.0.1:9092\"]\n";

    pub fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml(
            text,
            Path::new("test.toml"),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{parse, SAMPLE};

    #[test]
    fn the_documented_example_parses() {
        let c = parse(SAMPLE, &[]).unwrap();
        assert_eq!(c.host.id.as_deref(), Some("host-a"));
        assert_eq!(c.libvirt.uri, "test+unix:///default");
        assert!(c.libvirt.read_only);
        assert_eq!(c.nats.unwrap().events_stream, "VIRT_EVENTS");
        assert_eq!(c.metrics.listen.port(), 9477);
    }

    #[test]
    fn a_new_journal_dir_is_made_0700_by_the_writability_check() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("state/journal");
        let text = SAMPLE.replace("/var/lib/virtstream", journal.to_str().unwrap());
        parse(&text, &[]).unwrap().check_journal_writable().unwrap();
        let mode = std::fs::metadata(&journal).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(&format!("{SAMPLE}\nbogus = 1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("metrics.bogus"), "{err}");
        let err = parse(&SAMPLE.replace("[host]", "[host]\ncolour = 1"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("host.colour") && err.contains("unknown field"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_is_named() {
        let err = parse(
            &SAMPLE.replace("uri = \"test+unix:///default\"", "uri = 5"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("libvirt.uri") && err.contains("invalid type"),
            "{err}"
        );
        let err = parse(
            &SAMPLE.replace("listen = \"127.0.0.1:9477\"", "listen = \"nowhere\""),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("metrics.listen"), "{err}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let err = parse("[journal]\n", &[]).unwrap_err().to_string();
        assert!(
            err.contains("journal.path") && err.contains("missing"),
            "{err}"
        );
        let err = parse("[nats]\nurl=\"nats://x:1\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`journal`"), "{err}");
    }
}
