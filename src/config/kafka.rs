//! The `[kafka]` section: brokers, topics, flow control, TLS, SASL and
//! librdkafka properties passed through.
//!
//! Invariants:
//! - the section is optional; when present the sink is enabled;
//! - properties the sink's guarantees depend on
//!   ([`KAFKA_RESERVED_PROPERTIES`]) cannot be overridden, and secrets
//!   cannot be given inline as properties;
//! - topic names are valid Kafka names and pairwise distinct.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::secrets::{check_secret_file, Secret};
use super::values::{d_encoding, d_true, Dur, Encoding};
use super::{key_err, ConfigError};

/// Kafka bootstrap brokers: a TOML array, or one comma-separated string
/// (what `VIRTSTREAM_KAFKA_BROKERS=a:9092,b:9092` gives).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Brokers(pub Vec<String>);

impl<'de> Deserialize<'de> for Brokers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let list = match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a list of \"host:port\" strings or one comma-separated string",
            )
        })? {
            Raw::One(s) => s.split(',').map(|b| b.trim().to_string()).collect(),
            Raw::Many(v) => v,
        };
        Ok(Brokers(list))
    }
}

/// A librdkafka property value: TOML strings, integers, floats and
/// booleans are all passed as their text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PropValue {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for PropValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropValue::Text(s) => f.write_str(s),
            PropValue::Int(i) => write!(f, "{i}"),
            PropValue::Float(x) => write!(f, "{x}"),
            PropValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// librdkafka properties the sink's guarantees depend on; `properties`
/// may not override them.
pub const KAFKA_RESERVED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "use kafka.brokers"),
    ("metadata.broker.list", "use kafka.brokers"),
    ("enable.idempotence", "the idempotent producer is always on"),
    ("acks", "acks=all is required for effectively-once delivery"),
    (
        "request.required.acks",
        "acks=all is required for effectively-once delivery",
    ),
    (
        "message.timeout.ms",
        "messages never time out locally (order and exactly-once depend on it)",
    ),
    (
        "delivery.timeout.ms",
        "messages never time out locally (order and exactly-once depend on it)",
    ),
    ("transactional.id", "transactions are not used"),
    (
        "enable.gapless.guarantee",
        "a failed batch must stop the producer, not leave a gap",
    ),
    ("client.id", "use kafka.client_id"),
    (
        "security.protocol",
        "use kafka.tls and kafka.sasl_mechanism",
    ),
    ("sasl.mechanism", "use kafka.sasl_mechanism"),
    ("sasl.mechanisms", "use kafka.sasl_mechanism"),
    (
        "sasl.password",
        "secrets come from files or the environment: use kafka.sasl_password_file or VIRTSTREAM_KAFKA_SASL_PASSWORD",
    ),
    ("sasl.username", "use kafka.sasl_username"),
    (
        "ssl.key.password",
        "secrets come from files: use kafka.tls_key_password_file",
    ),
    (
        "sasl.oauthbearer.client.secret",
        "secrets come from files or the environment, not the config",
    ),
    ("ssl.ca.location", "use kafka.tls_ca_file"),
    ("ssl.certificate.location", "use kafka.tls_cert_file"),
    ("ssl.key.location", "use kafka.tls_key_file"),
];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Brokers,
    #[serde(default = "d_events_topic")]
    pub events_topic: String,
    #[serde(default = "d_domain_snapshots_topic")]
    pub domain_snapshots_topic: String,
    #[serde(default = "d_host_snapshots_topic")]
    pub host_snapshots_topic: String,
    /// Create missing topics.
    #[serde(default = "d_true")]
    pub create_topics: bool,
    /// Partitions of topics virtstream creates.
    #[serde(default = "d_partitions")]
    pub partitions: i32,
    /// Replication factor of topics virtstream creates.
    #[serde(default = "d_replication")]
    pub replication: i32,
    /// Default: `virtstream-<host id>`.
    pub client_id: Option<String>,
    /// Messages handed to the producer and not yet acknowledged, at most.
    #[serde(default = "d_kafka_inflight")]
    pub max_in_flight: usize,
    /// On start, this host's records are read back until no new record
    /// arrives for this long (the end of a partition is never taken from
    /// the broker's high watermark).
    #[serde(default = "d_readback_idle")]
    pub readback_idle: Dur,
    /// Largest expected clock difference between hosts: a partition that
    /// other hosts keep busy is read back until a record stamped later
    /// than the read-back start plus this.
    #[serde(default = "d_clock_skew")]
    pub readback_max_clock_skew: Dur,
    /// Value encoding: avro (single-object) or json.
    #[serde(default = "d_encoding")]
    pub encoding: Encoding,
    /// TLS to the brokers.
    #[serde(default)]
    pub tls: bool,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_key_password_file: Option<PathBuf>,
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    /// The SASL password, read from this file.
    pub sasl_password_file: Option<PathBuf>,
    /// The SASL password itself; set it through the environment
    /// (`VIRTSTREAM_KAFKA_SASL_PASSWORD`), not in the file.
    pub sasl_password: Option<Secret>,
    /// librdkafka properties passed through as they are (e.g.
    /// `"linger.ms" = 5`, `"compression.type" = "lz4"`).
    #[serde(default)]
    pub properties: BTreeMap<String, PropValue>,
}

fn d_events_topic() -> String {
    "virt.domain.events.v1".into()
}
fn d_domain_snapshots_topic() -> String {
    "virt.domain.snapshots.v1".into()
}
fn d_host_snapshots_topic() -> String {
    "virt.host.snapshots.v1".into()
}
fn d_partitions() -> i32 {
    12
}
fn d_replication() -> i32 {
    3
}
fn d_kafka_inflight() -> usize {
    10_000
}
fn d_readback_idle() -> Dur {
    Dur(Duration::from_secs(2))
}
fn d_clock_skew() -> Dur {
    Dur(Duration::from_secs(10))
}

/// A Kafka topic name: 1..=249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub(super) fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl KafkaConfig {
    /// Brokers, topics, flow control, TLS and SASL, and the librdkafka
    /// properties that may not be overridden.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let k = self;
        if k.brokers.0.is_empty() {
            return Err(key_err("kafka.brokers", "must name at least one broker"));
        }
        for b in &k.brokers.0 {
            let port_ok = b
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !port_ok || b.contains("://") {
                return Err(key_err(
                    "kafka.brokers",
                    format!("`{b}` is not host:port (e.g. kafka-1.example.com:9092)"),
                ));
            }
        }
        let topics = [
            ("kafka.events_topic", &k.events_topic),
            ("kafka.domain_snapshots_topic", &k.domain_snapshots_topic),
            ("kafka.host_snapshots_topic", &k.host_snapshots_topic),
        ];
        for (key, t) in topics {
            if !valid_topic(t) {
                return Err(key_err(
                    key,
                    format!("`{t}` is not a valid Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)"),
                ));
            }
        }
        for (i, (key, t)) in topics.iter().enumerate() {
            if topics[..i].iter().any(|(_, o)| o == t) {
                return Err(key_err(
                    key,
                    format!("`{t}` is already used by another topic key"),
                ));
            }
        }
        if k.partitions < 1 {
            return Err(key_err("kafka.partitions", "must be at least 1"));
        }
        if k.replication < 1 {
            return Err(key_err("kafka.replication", "must be at least 1"));
        }
        if k.max_in_flight == 0 {
            return Err(key_err("kafka.max_in_flight", "must be at least 1"));
        }
        if k.readback_idle.0 < Duration::from_millis(100) {
            return Err(key_err(
                "kafka.readback_idle",
                "must be at least 100ms (it decides where a partition ends)",
            ));
        }
        for (key, p) in [
            ("kafka.tls_ca_file", &k.tls_ca_file),
            ("kafka.tls_cert_file", &k.tls_cert_file),
            ("kafka.tls_key_file", &k.tls_key_file),
            ("kafka.tls_key_password_file", &k.tls_key_password_file),
            ("kafka.sasl_password_file", &k.sasl_password_file),
        ] {
            if let Some(p) = p {
                if !k.tls && key.starts_with("kafka.tls_") {
                    return Err(key_err(key, "is set but kafka.tls = false"));
                }
                check_secret_file(key, p)?;
            }
        }
        if k.tls_cert_file.is_some() != k.tls_key_file.is_some() {
            return Err(key_err(
                "kafka.tls_cert_file",
                "a client certificate needs both kafka.tls_cert_file and kafka.tls_key_file",
            ));
        }
        match k.sasl_mechanism {
            Some(m) => {
                if k.sasl_username.as_deref().is_none_or(str::is_empty) {
                    return Err(key_err(
                        "kafka.sasl_username",
                        format!("is required with kafka.sasl_mechanism = \"{}\"", m.as_str()),
                    ));
                }
                match (&k.sasl_password, &k.sasl_password_file) {
                    (None, None) => return Err(key_err(
                        "kafka.sasl_password_file",
                        "is required with kafka.sasl_mechanism (or set VIRTSTREAM_KAFKA_SASL_PASSWORD)",
                    )),
                    (Some(_), Some(_)) => {
                        return Err(key_err(
                            "kafka.sasl_password",
                            "set either kafka.sasl_password or kafka.sasl_password_file, not both",
                        ))
                    }
                    _ => {}
                }
            }
            None => {
                for (key, set) in [
                    ("kafka.sasl_username", k.sasl_username.is_some()),
                    ("kafka.sasl_password", k.sasl_password.is_some()),
                    ("kafka.sasl_password_file", k.sasl_password_file.is_some()),
                ] {
                    if set {
                        return Err(key_err(key, "is set but kafka.sasl_mechanism is not"));
                    }
                }
            }
        }
        for prop in k.properties.keys() {
            if let Some((_, why)) = KAFKA_RESERVED_PROPERTIES.iter().find(|(p, _)| p == prop) {
                return Err(key_err(
                    &format!("kafka.properties.\"{prop}\""),
                    format!("cannot be overridden: {why}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testutil::{parse, KAFKA, SAMPLE};
    use crate::config::Secret;

    #[test]
    fn kafka_section_parses_with_defaults() {
        let c = parse(&format!("{SAMPLE}{KAFKA}"), &[]).unwrap();
        let k = c.kafka.unwrap();
        assert_eq!(k.brokers.0, vec!["127.0.0.1:9092".to_string()]);
        assert_eq!(k.events_topic, "virt.domain.events.v1");
        assert_eq!(k.domain_snapshots_topic, "virt.domain.snapshots.v1");
        assert_eq!(k.host_snapshots_topic, "virt.host.snapshots.v1");
        assert!(c.nats.is_some(), "both sinks may be enabled");
        // A comma-separated list from the environment enables the sink.
        let c = parse(SAMPLE, &[("VIRTSTREAM_KAFKA_BROKERS", "k1:9092, k2:9093")]).unwrap();
        assert_eq!(c.kafka.unwrap().brokers.0, vec!["k1:9092", "k2:9093"]);
    }

    #[test]
    fn kafka_errors_name_the_key() {
        let cases = [
            ("brokers = [\"nohost\"]", "kafka.brokers"),
            ("brokers = []", "kafka.brokers"),
            (
                "brokers = [\"h:1\"]\nevents_topic = \"bad topic\"",
                "kafka.events_topic",
            ),
            ("brokers = [\"h:1\"]\npartitions = 0", "kafka.partitions"),
            (
                "brokers = [\"h:1\"]\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"",
                "kafka.sasl_password_file",
            ),
            (
                "brokers = [\"h:1\"]\nsasl_mechanism = \"MD5\"",
                "kafka.sasl_mechanism",
            ),
            (
                "brokers = [\"h:1\"]\nsasl_username = \"u\"",
                "kafka.sasl_username",
            ),
            (
                "brokers = [\"h:1\"]\ntls_ca_file = \"/nonexistent\"",
                "kafka.tls_ca_file",
            ),
            (
                "brokers = [\"h:1\"]\n[kafka.properties]\n\"enable.idempotence\" = false",
                "enable.idempotence",
            ),
            ("brokers = [\"h:1\"]\n[kafka.properties]\nacks = 1", "acks"),
        ];
        for (body, key) in cases {
            let err = parse(&format!("{SAMPLE}\n[kafka]\n{body}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{body}: {err}");
        }
    }

    #[test]
    fn kafka_secrets_are_redacted() {
        let text = format!(
            "{SAMPLE}{KAFKA}sasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"agent\"\n[kafka.properties]\n\"ssl.keystore.password\" = \"hunter2\"\n\"linger.ms\" = 5\n"
        );
        let c = parse(&text, &[("VIRTSTREAM_KAFKA_SASL_PASSWORD", "pa55word")]).unwrap();
        let k = c.kafka.as_ref().unwrap();
        assert_eq!(
            k.sasl_password.as_ref().map(Secret::expose),
            Some("pa55word")
        );
        assert!(!format!("{k:?}").contains("pa55word"));
        assert_eq!(k.properties["linger.ms"].to_string(), "5");
        let out = c.redacted();
        assert!(
            !out.contains("pa55word") && !out.contains("hunter2"),
            "{out}"
        );
        assert!(out.contains("agent"), "{out}");
    }
}
