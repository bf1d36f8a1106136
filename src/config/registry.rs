//! The `[schema_registry]` section: a Confluent-compatible schema registry.
//! When present, the Avro sinks it applies to publish in the registry's
//! framing (byte 0 + 4-byte schema id + datum) instead of single-object
//! encoding, after registering the shipped schemas at start under
//! TopicNameStrategy subjects: `<topic>-value` on Kafka, a configurable
//! subject per record type on NATS; the consumer tools read both framings.
//!
//! Invariants:
//! - the URL is http(s), without credentials (they would be logged with
//!   it); basic auth comes from `username` + `password` (environment) or
//!   `password_file`, never both;
//! - the client certificate needs both `tls_cert_file` and
//!   `tls_key_file`; TLS files are readable before anything starts;
//! - a sink listed in `sinks` must be configured and encode Avro (the
//!   registry framing has no JSON form here).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::secrets::check_secret_file;
use super::{key_err, ConfigError, Dur, Encoding, KafkaConfig, NatsConfig, Secret};

/// A sink the registry framing can apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrySink {
    Kafka,
    Nats,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// Base URL, e.g. `https://registry.example:8081`.
    pub url: String,
    /// Basic-auth user.
    pub username: Option<String>,
    /// Basic-auth password; set it through the environment
    /// (`VIRTSTREAM_SCHEMA_REGISTRY_PASSWORD`), or use `password_file`.
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// CA bundle (PEM) trusted for an https URL, besides the system's.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Per-request timeout.
    #[serde(default = "d_timeout")]
    pub timeout: Dur,
    /// The sinks that publish in registry framing (default: every
    /// configured one; a list names configured sinks only).
    pub sinks: Option<Vec<RegistrySink>>,
    /// NATS subjects (registry subjects, not NATS ones) per record type;
    /// default `<NATS subject prefix>-value`. `VIRT_SNAPSHOTS` carries two
    /// record types, so it takes two subjects.
    pub nats_events_subject: Option<String>,
    pub nats_domain_snapshots_subject: Option<String>,
    pub nats_host_snapshots_subject: Option<String>,
}

fn d_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}

/// Registry subjects of the three record types, in the order events,
/// domain snapshots, host snapshots.
pub type Subjects = [(String, &'static str); 3];

impl SchemaRegistryConfig {
    /// Whether `sink` publishes in registry framing.
    pub fn applies_to(&self, sink: RegistrySink) -> bool {
        self.sinks.as_ref().is_none_or(|s| s.contains(&sink))
    }

    /// TopicNameStrategy subjects of the Kafka topics, with the record
    /// each carries.
    pub fn kafka_subjects(&self, k: &KafkaConfig) -> Subjects {
        [
            (format!("{}-value", k.events_topic), "DomainEvent"),
            (
                format!("{}-value", k.domain_snapshots_topic),
                "DomainSnapshot",
            ),
            (format!("{}-value", k.host_snapshots_topic), "HostSnapshot"),
        ]
    }

    /// The registry subjects used for NATS, with the record each carries.
    pub fn nats_subjects(&self, n: &NatsConfig) -> Subjects {
        let or = |set: &Option<String>, prefix: &str| {
            set.clone().unwrap_or_else(|| format!("{prefix}-value"))
        };
        [
            (
                or(&self.nats_events_subject, &n.events_subject_prefix),
                "DomainEvent",
            ),
            (
                or(
                    &self.nats_domain_snapshots_subject,
                    &n.snapshots_subject_prefix,
                ),
                "DomainSnapshot",
            ),
            (
                or(&self.nats_host_snapshots_subject, &n.hosts_subject_prefix),
                "HostSnapshot",
            ),
        ]
    }

    /// The basic-auth password, from the environment/config or its file.
    pub fn password(&self) -> Result<Option<String>, std::io::Error> {
        if let Some(p) = &self.password {
            return Ok(Some(p.expose().to_string()));
        }
        match &self.password_file {
            Some(f) => Ok(Some(
                std::fs::read_to_string(f)?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            )),
            None => Ok(None),
        }
    }

    pub(super) fn validate(
        &self,
        kafka: Option<&KafkaConfig>,
        nats: Option<&NatsConfig>,
    ) -> Result<(), ConfigError> {
        let k = |s: &str| format!("schema_registry.{s}");
        let rest = match self.url.split_once("://") {
            Some(("http" | "https", rest)) if !rest.is_empty() => rest,
            _ => {
                return Err(key_err(
                    &k("url"),
                    "must be an http:// or https:// URL, e.g. http://registry:8081",
                ))
            }
        };
        if rest.split('/').next().unwrap_or("").contains('@') {
            return Err(key_err(
                &k("url"),
                "credentials in the URL would be logged with it: use schema_registry.username and password_file (or VIRTSTREAM_SCHEMA_REGISTRY_PASSWORD)",
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err(key_err(
                &k("password_file"),
                "set either password (environment) or password_file, not both",
            ));
        }
        if (self.password.is_some() || self.password_file.is_some()) != self.username.is_some() {
            return Err(key_err(
                &k("username"),
                "basic auth needs both username and a password (password_file or VIRTSTREAM_SCHEMA_REGISTRY_PASSWORD)",
            ));
        }
        if let Some(f) = &self.password_file {
            check_secret_file(&k("password_file"), f)?;
        }
        for (key, file) in [
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ] {
            if let Some(f) = file {
                check_secret_file(&k(key), f)?;
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(key_err(
                &k("tls_cert_file"),
                "a client certificate needs both tls_cert_file and tls_key_file",
            ));
        }
        if self.timeout.0.is_zero() {
            return Err(key_err(&k("timeout"), "must be more than 0"));
        }
        if self.url.starts_with("http://")
            && (self.tls_ca_file.is_some() || self.tls_cert_file.is_some())
        {
            return Err(key_err(
                &k("tls_ca_file"),
                "TLS files are set but schema_registry.url is http://; use https://",
            ));
        }
        if self.sinks.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(key_err(
                &k("sinks"),
                "is empty: leave [schema_registry] out instead, or name the sinks that use it",
            ));
        }
        let all = [RegistrySink::Kafka, RegistrySink::Nats];
        for s in all.iter().filter(|s| self.applies_to(**s)) {
            let encoding = match s {
                RegistrySink::Kafka => kafka.map(|c| c.encoding),
                RegistrySink::Nats => nats.map(|c| c.encoding),
            };
            if encoding.is_none() && self.sinks.is_some() {
                return Err(key_err(
                    &k("sinks"),
                    format!("names the {s:?} sink, which is not configured").to_lowercase(),
                ));
            }
            if encoding == Some(Encoding::Json) {
                return Err(key_err(
                    &k("sinks"),
                    format!(
                        "the {s:?} sink encodes JSON; registry framing is for Avro (set its encoding = \"avro\" or leave it out of schema_registry.sinks)"
                    )
                    .to_lowercase(),
                ));
            }
        }
        for (key, subject) in [
            ("nats_events_subject", &self.nats_events_subject),
            (
                "nats_domain_snapshots_subject",
                &self.nats_domain_snapshots_subject,
            ),
            (
                "nats_host_snapshots_subject",
                &self.nats_host_snapshots_subject,
            ),
        ] {
            if subject
                .as_deref()
                .is_some_and(|s| s.is_empty() || s.contains('/'))
            {
                return Err(key_err(&k(key), "must be a non-empty name without '/'"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testutil::{parse, KAFKA, SAMPLE};

    fn with(section: &str) -> String {
        format!("{SAMPLE}{KAFKA}[schema_registry]\n{section}")
    }

    #[test]
    fn subjects_follow_the_topic_name_strategy_and_the_nats_prefixes() {
        let c = parse(&with("url = \"http://127.0.0.1:8081\"\n"), &[]).unwrap();
        let r = c.schema_registry.as_ref().unwrap();
        let ks = r.kafka_subjects(c.kafka.as_ref().unwrap());
        assert_eq!(ks[0].0, "virt.domain.events.v1-value");
        assert_eq!(ks[1].0, "virt.domain.snapshots.v1-value");
        assert_eq!(ks[2].0, "virt.host.snapshots.v1-value");
        let ns = r.nats_subjects(c.nats.as_ref().unwrap());
        assert_eq!(ns[0].0, "virt.events.v1-value");
        assert_eq!(ns[2].0, "virt.hosts.v1-value");
        assert!(r.applies_to(super::RegistrySink::Nats));
        let c = parse(
            &with("url = \"http://r:8081\"\nnats_events_subject = \"ev\"\nsinks = [\"kafka\"]\n"),
            &[],
        )
        .unwrap();
        let r = c.schema_registry.as_ref().unwrap();
        assert_eq!(r.nats_subjects(c.nats.as_ref().unwrap())[0].0, "ev");
        assert!(!r.applies_to(super::RegistrySink::Nats));
    }

    #[test]
    fn bad_registry_settings_are_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        let cases = [
            ("url = \"registry:8081\"", "schema_registry.url"),
            ("url = \"http://u:p@r:8081\"", "credentials in the URL"),
            (
                "url = \"http://r\"\nusername = \"u\"",
                "schema_registry.username",
            ),
            (
                "url = \"http://r\"\ntls_cert_file = \"/nonexistent/c.pem\"",
                "schema_registry.tls_cert_file",
            ),
            (
                "url = \"http://r\"\ntimeout = \"0s\"",
                "schema_registry.timeout",
            ),
            (
                "url = \"http://r\"\nsinks = [\"redis\"]",
                "schema_registry.sinks",
            ),
            ("url = \"http://r\"\ncolour = 1", "schema_registry.colour"),
        ];
        for (section, want) in cases {
            let e = parse(&with(section), &[]).unwrap_err().to_string();
            assert!(e.contains(want), "{section}: {e}");
        }
        // A JSON sink cannot take registry framing.
        let e = parse(
            &with("url = \"http://r\"\n").replace(
                "[kafka]\nbrokers = [\"127.0.0.1:9092\"]\n",
                "[kafka]\nbrokers = [\"127.0.0.1:9092\"]\nencoding = \"json\"\n",
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("schema_registry.sinks") && e.contains("json"),
            "{e}"
        );
        // Basic auth from a file, or from the environment; never echoed.
        let c = parse(
            &with(&format!(
                "url = \"https://r\"\nusername = \"u\"\npassword_file = \"{}\"\n",
                pw.display()
            )),
            &[],
        )
        .unwrap();
        let r = c.schema_registry.as_ref().unwrap();
        assert_eq!(r.password().unwrap().as_deref(), Some("secret"));
        let c = parse(
            &with("url = \"https://r\"\nusername = \"u\"\n"),
            &[("VIRTSTREAM_SCHEMA_REGISTRY_PASSWORD", "0042")],
        )
        .unwrap();
        assert_eq!(
            c.schema_registry
                .as_ref()
                .unwrap()
                .password()
                .unwrap()
                .as_deref(),
            Some("0042")
        );
        assert!(!c.redacted().contains("0042"));
        // The environment alone can configure it.
        let c = parse(
            SAMPLE,
            &[("VIRTSTREAM_SCHEMA_REGISTRY_URL", "http://10.0.0.9:8081")],
        )
        .unwrap();
        assert_eq!(c.schema_registry.unwrap().url, "http://10.0.0.9:8081");
    }
}
