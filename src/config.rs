//! Configuration: TOML file + `VIRTSTREAM_<SECTION>_<KEY>` environment
//! overrides, validated before anything starts.
//!
//! Invariants:
//! - unknown keys and wrong types are refused, naming the full key
//!   (`nats.url`) and the reason;
//! - a sink is enabled exactly when its section is present (in the file or
//!   through an environment override);
//! - secrets never appear in `Display`/`redacted()` output.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "VIRTSTREAM_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
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
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Stable host identity; default: the journal's recorded id, else the
    /// libvirt host UUID, else the hostname.
    pub id: Option<String>,
    /// How long SIGTERM waits for the sinks to flush.
    #[serde(default = "d_shutdown")]
    pub shutdown_timeout: Dur,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum XmlMode {
    Off,
    OnChange,
    Always,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    #[serde(default = "d_uri")]
    pub uri: String,
    #[serde(default = "d_true")]
    pub read_only: bool,
    /// Keepalive probe interval in seconds (0 disables keepalive).
    #[serde(default = "d_keepalive_interval")]
    pub keepalive_interval: u32,
    #[serde(default = "d_keepalive_count")]
    pub keepalive_count: u32,
    #[serde(default = "d_backoff_min")]
    pub reconnect_backoff_min: Dur,
    #[serde(default = "d_backoff_max")]
    pub reconnect_backoff_max: Dur,
    /// Capacity of the hand-off queue between the libvirt callback and the
    /// tracker. When full, events are dropped, a gap is recorded and a
    /// reconcile repairs the state.
    #[serde(default = "d_queue")]
    pub queue_capacity: usize,
    /// Lookup attempts for a domain an event names but libvirt cannot find yet.
    #[serde(default = "d_lookup_attempts")]
    pub lookup_attempts: u32,
    /// Domain XML in messages: off | on-change | always.
    #[serde(default = "d_xml")]
    pub xml: XmlMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Accepted entries are kept; new events are not journaled while full.
    /// A gap marker and a reconcile follow once space is free again.
    RejectNew,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    pub path: PathBuf,
    /// Bound on unpublished journal payload bytes.
    #[serde(default = "d_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "d_when_full")]
    pub when_full: WhenFull,
    /// Most entries per group commit.
    #[serde(default = "d_group")]
    pub group_commit_max: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub url: String,
    #[serde(default = "d_events_stream")]
    pub events_stream: String,
    #[serde(default = "d_events_prefix")]
    pub events_subject_prefix: String,
    /// Stream of DomainSnapshot and HostSnapshot records (one per subject).
    #[serde(default = "d_snapshots_stream")]
    pub snapshots_stream: String,
    #[serde(default = "d_snapshots_prefix")]
    pub snapshots_subject_prefix: String,
    #[serde(default = "d_hosts_prefix")]
    pub hosts_subject_prefix: String,
    /// Create the stream when missing.
    #[serde(default = "d_true")]
    pub create_streams: bool,
    #[serde(default = "d_max_age")]
    pub max_age: Dur,
    #[serde(default = "d_dup_window")]
    pub duplicate_window: Dur,
    #[serde(default = "d_one")]
    pub replicas: usize,
    /// Publishes awaiting a JetStream ack at once.
    #[serde(default = "d_inflight")]
    pub max_in_flight: usize,
    #[serde(default = "d_ack_timeout")]
    pub ack_timeout: Dur,
    /// Body encoding: avro (single-object) or json.
    #[serde(default = "d_encoding")]
    pub encoding: Encoding,
    /// Token read from this file (never from the command line).
    pub token_file: Option<PathBuf>,
    /// NATS credentials (.creds) file: user JWT + NKey seed.
    pub credentials_file: Option<PathBuf>,
    /// File holding an NKey user seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// User name for user/password authentication.
    pub user: Option<String>,
    /// The password, read from this file.
    pub password_file: Option<PathBuf>,
    /// The password itself; set it through the environment
    /// (`VIRTSTREAM_NATS_PASSWORD`), not in the file.
    pub password: Option<Secret>,
    /// Require TLS (a `tls://` URL requires it too).
    #[serde(default)]
    pub tls: bool,
    /// CA bundle (PEM) the server certificate is verified against. It
    /// replaces the system roots (the NATS client loads those only when no
    /// CA file is given).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    pub tls_key_file: Option<PathBuf>,
}

impl NatsConfig {
    /// TLS is required: `nats.tls = true` or a `tls://` URL.
    pub fn tls_required(&self) -> bool {
        self.tls || self.url.starts_with("tls://") || self.url.starts_with("wss://")
    }
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Avro,
    Json,
}

/// Snapshot rounds and heartbeats.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// A complete round at least this often (besides the rounds at start,
    /// after reconnects and after gaps).
    #[serde(default = "d_snapshot_interval")]
    pub interval: Dur,
    /// A HostSnapshot heartbeat this often.
    #[serde(default = "d_heartbeat")]
    pub heartbeat: Dur,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            interval: d_snapshot_interval(),
            heartbeat: d_heartbeat(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "d_listen")]
    pub listen: SocketAddr,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            id: None,
            shutdown_timeout: d_shutdown(),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: d_listen() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "d_log_format")]
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `virtstream=debug,info`.
    #[serde(default = "d_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: d_log_format(),
            level: d_log_level(),
        }
    }
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        LibvirtConfig {
            uri: d_uri(),
            read_only: true,
            keepalive_interval: d_keepalive_interval(),
            keepalive_count: d_keepalive_count(),
            reconnect_backoff_min: d_backoff_min(),
            reconnect_backoff_max: d_backoff_max(),
            queue_capacity: d_queue(),
            lookup_attempts: d_lookup_attempts(),
            xml: d_xml(),
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_one() -> usize {
    1
}
fn d_shutdown() -> Dur {
    Dur(Duration::from_secs(10))
}
fn d_uri() -> String {
    "qemu:///system".into()
}
fn d_keepalive_interval() -> u32 {
    5
}
fn d_keepalive_count() -> u32 {
    3
}
fn d_backoff_min() -> Dur {
    Dur(Duration::from_millis(500))
}
fn d_backoff_max() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d_queue() -> usize {
    8192
}
fn d_lookup_attempts() -> u32 {
    3
}
fn d_xml() -> XmlMode {
    XmlMode::Off
}
fn d_max_bytes() -> u64 {
    1 << 30
}
fn d_when_full() -> WhenFull {
    WhenFull::RejectNew
}
fn d_group() -> usize {
    1024
}
fn d_events_stream() -> String {
    "VIRT_EVENTS".into()
}
fn d_events_prefix() -> String {
    "virt.events.v1".into()
}
fn d_snapshots_stream() -> String {
    "VIRT_SNAPSHOTS".into()
}
fn d_snapshots_prefix() -> String {
    "virt.snapshots.v1".into()
}
fn d_hosts_prefix() -> String {
    "virt.hosts.v1".into()
}
fn d_max_age() -> Dur {
    Dur(Duration::from_secs(7 * 24 * 3600))
}
fn d_dup_window() -> Dur {
    Dur(Duration::from_secs(120))
}
fn d_inflight() -> usize {
    256
}
fn d_ack_timeout() -> Dur {
    Dur(Duration::from_secs(5))
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
fn d_snapshot_interval() -> Dur {
    Dur(Duration::from_secs(300))
}
fn d_heartbeat() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d_clock_skew() -> Dur {
    Dur(Duration::from_secs(10))
}
fn d_encoding() -> Encoding {
    Encoding::Avro
}
fn d_listen() -> SocketAddr {
    "127.0.0.1:9477".parse().expect("literal address")
}
fn d_log_format() -> LogFormat {
    LogFormat::Text
}
fn d_log_level() -> String {
    "info".into()
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
fn is_secret(key: &str) -> bool {
    SECRET_KEYS.contains(&key) || key.contains("password") || key.contains("secret")
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
        apply_env(&mut table, env)?;
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
        if let Some(id) = &self.host.id {
            if id.is_empty() {
                return Err(key_err("host.id", "must not be empty"));
            }
        }
        if self.libvirt.queue_capacity == 0 {
            return Err(key_err("libvirt.queue_capacity", "must be at least 1"));
        }
        if self.libvirt.reconnect_backoff_min.0 > self.libvirt.reconnect_backoff_max.0 {
            return Err(key_err(
                "libvirt.reconnect_backoff_min",
                "is larger than libvirt.reconnect_backoff_max",
            ));
        }
        for (key, d) in [
            ("snapshot.interval", self.snapshot.interval),
            ("snapshot.heartbeat", self.snapshot.heartbeat),
        ] {
            if d.0 < Duration::from_secs(1) {
                return Err(key_err(key, "must be at least 1s"));
            }
        }
        if self.journal.group_commit_max == 0 {
            return Err(key_err("journal.group_commit_max", "must be at least 1"));
        }
        if let Some(n) = &self.nats {
            if !(n.url.starts_with("nats://")
                || n.url.starts_with("tls://")
                || n.url.starts_with("ws://")
                || n.url.starts_with("wss://")
                || !n.url.contains("://"))
            {
                return Err(key_err(
                    "nats.url",
                    format!("`{}` is not a NATS URL (nats://host:port)", n.url),
                ));
            }
            if n.url
                .split(',')
                .any(|u| u.split_once("://").map_or(u, |x| x.1).contains('@'))
            {
                return Err(key_err(
                    "nats.url",
                    "must not carry credentials (user:password@): URLs are logged; \
                     use nats.user with nats.password_file, or nats.token_file",
                ));
            }
            if n.max_in_flight == 0 {
                return Err(key_err("nats.max_in_flight", "must be at least 1"));
            }
            if n.duplicate_window.0.is_zero() {
                return Err(key_err(
                    "nats.duplicate_window",
                    "must be > 0: JetStream de-duplication by Nats-Msg-Id needs it",
                ));
            }
            if n.events_stream == n.snapshots_stream {
                return Err(key_err(
                    "nats.snapshots_stream",
                    "must differ from nats.events_stream",
                ));
            }
            for (k, v) in [
                ("nats.events_stream", &n.events_stream),
                ("nats.snapshots_stream", &n.snapshots_stream),
            ] {
                if v.is_empty() || v.contains(['.', '*', '>', ' ']) {
                    return Err(key_err(
                        k,
                        format!("`{v}` is not a valid JetStream stream name"),
                    ));
                }
            }
            let prefixes = [
                ("nats.events_subject_prefix", &n.events_subject_prefix),
                ("nats.snapshots_subject_prefix", &n.snapshots_subject_prefix),
                ("nats.hosts_subject_prefix", &n.hosts_subject_prefix),
            ];
            for (i, (k, v)) in prefixes.iter().enumerate() {
                let overlaps = |a: &str, b: &str| {
                    a == b || a.starts_with(&format!("{b}.")) || b.starts_with(&format!("{a}."))
                };
                if prefixes[..i].iter().any(|(_, o)| overlaps(o, v)) {
                    return Err(key_err(k, format!("`{v}` overlaps another subject prefix")));
                }
            }
            for (k, v) in prefixes {
                if v.is_empty() || v.contains(['*', '>', ' ']) || v.ends_with('.') {
                    return Err(key_err(k, format!("`{v}` is not a valid subject prefix")));
                }
            }
            validate_nats_security(n)?;
        }
        if let Some(k) = &self.kafka {
            validate_kafka(k)?;
        }
        Ok(())
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
        crate::journal::create_private_dir(dir).map_err(fail)?;
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
                    if is_secret(k) {
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

/// NATS authentication (one method at most) and TLS files.
fn validate_nats_security(n: &NatsConfig) -> Result<(), ConfigError> {
    let methods: Vec<&str> = [
        ("nats.token_file", n.token_file.is_some()),
        ("nats.credentials_file", n.credentials_file.is_some()),
        ("nats.nkey_seed_file", n.nkey_seed_file.is_some()),
        ("nats.user", n.user.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect();
    if methods.len() > 1 {
        return Err(key_err(
            methods[1],
            format!(
                "choose one NATS authentication method; {} is set too",
                methods[0]
            ),
        ));
    }
    match (&n.user, &n.password, &n.password_file) {
        (Some(u), _, _) if u.is_empty() => {
            return Err(key_err("nats.user", "must not be empty"));
        }
        (Some(_), None, None) => {
            return Err(key_err(
                "nats.password_file",
                "is required with nats.user (or set VIRTSTREAM_NATS_PASSWORD)",
            ))
        }
        (Some(_), Some(_), Some(_)) => {
            return Err(key_err(
                "nats.password",
                "set either nats.password or nats.password_file, not both",
            ))
        }
        (None, Some(_), _) => {
            return Err(key_err("nats.password", "is set but nats.user is not"));
        }
        (None, _, Some(_)) => {
            return Err(key_err("nats.password_file", "is set but nats.user is not"));
        }
        _ => {}
    }
    if n.tls_cert_file.is_some() != n.tls_key_file.is_some() {
        return Err(key_err(
            "nats.tls_cert_file",
            "a client certificate needs both nats.tls_cert_file and nats.tls_key_file",
        ));
    }
    for (key, p) in [
        ("nats.token_file", &n.token_file),
        ("nats.credentials_file", &n.credentials_file),
        ("nats.nkey_seed_file", &n.nkey_seed_file),
        ("nats.password_file", &n.password_file),
        ("nats.tls_ca_file", &n.tls_ca_file),
        ("nats.tls_cert_file", &n.tls_cert_file),
        ("nats.tls_key_file", &n.tls_key_file),
    ] {
        if let Some(p) = p {
            if key.starts_with("nats.tls_") && !n.tls_required() {
                return Err(key_err(
                    key,
                    "is set but TLS is off (set nats.tls = true or use a tls:// URL)",
                ));
            }
            check_secret_file(key, p)?;
        }
    }
    Ok(())
}

/// A file the agent reads at start: it must be readable and not empty.
fn check_secret_file(key: &str, p: &Path) -> Result<(), ConfigError> {
    let data =
        std::fs::read(p).map_err(|e| key_err(key, format!("cannot read {}: {e}", p.display())))?;
    if data.iter().all(u8::is_ascii_whitespace) {
        return Err(key_err(key, format!("{} is empty", p.display())));
    }
    Ok(())
}

/// A Kafka topic name: 1..=249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn validate_kafka(k: &KafkaConfig) -> Result<(), ConfigError> {
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

/// Applies `VIRTSTREAM_<SECTION>_<KEY>=value` overrides. The value is typed
/// after the key's current value when the file sets it (string, integer,
/// float, boolean), else guessed (integer, boolean, then string).
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let overrides: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    for (name, raw) in overrides {
        let rest = &name[ENV_PREFIX.len()..];
        let Some((section, key)) = rest.split_once('_') else {
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
];

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
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

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml(
            text,
            Path::new("test.toml"),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

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
    fn nats_auth_and_tls_are_checked_and_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            p.display().to_string()
        };
        let (seed, ca, pass) = (
            file("seed", "SUSECRETSEED"),
            file("ca.pem", "ca"),
            file("pass", "pw-in-file"),
        );
        let with = |extra: &str| SAMPLE.replace("[metrics]", &format!("{extra}\n[metrics]"));
        let err =
            |extra: &str, env: &[(&str, &str)]| parse(&with(extra), env).unwrap_err().to_string();
        // One authentication method.
        let e = err(
            &format!("nkey_seed_file = \"{seed}\"\nuser = \"u\"\npassword_file = \"{pass}\""),
            &[],
        );
        assert!(
            e.contains("nats.user") && e.contains("nats.nkey_seed_file"),
            "{e}"
        );
        // A user needs a password, from a file or the environment.
        let e = err("user = \"u\"", &[]);
        assert!(
            e.contains("nats.password_file") && e.contains("VIRTSTREAM_NATS_PASSWORD"),
            "{e}"
        );
        let c = parse(
            &with("user = \"u\""),
            &[("VIRTSTREAM_NATS_PASSWORD", "1234")],
        )
        .unwrap();
        assert_eq!(
            c.nats
                .as_ref()
                .unwrap()
                .password
                .as_ref()
                .map(Secret::expose),
            Some("1234")
        );
        assert_eq!(
            format!("{:?}", c.nats.as_ref().unwrap().password),
            "Some(<redacted>)"
        );
        let e = err(&format!("password_file = \"{pass}\""), &[]);
        assert!(
            e.contains("nats.password_file") && e.contains("nats.user is not"),
            "{e}"
        );
        // TLS files need TLS on, and a client certificate needs its key.
        let e = err(&format!("tls_ca_file = \"{ca}\""), &[]);
        assert!(
            e.contains("nats.tls_ca_file") && e.contains("TLS is off"),
            "{e}"
        );
        assert!(parse(&with(&format!("tls = true\ntls_ca_file = \"{ca}\"")), &[]).is_ok());
        let tls_url = with(&format!("tls_ca_file = \"{ca}\""))
            .replace("nats://127.0.0.1:4222", "tls://127.0.0.1:4222");
        assert!(parse(&tls_url, &[]).unwrap().nats.unwrap().tls_required());
        let e = err(&format!("tls = true\ntls_cert_file = \"{ca}\""), &[]);
        assert!(
            e.contains("nats.tls_cert_file") && e.contains("tls_key_file"),
            "{e}"
        );
        let e = err("tls = true\ntls_ca_file = \"/nonexistent/ca.pem\"", &[]);
        assert!(
            e.contains("nats.tls_ca_file") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        // Secrets never show in the redacted form.
        let c = parse(&with(&format!("nkey_seed_file = \"{seed}\"")), &[]).unwrap();
        let shown = c.redacted();
        assert!(!shown.contains(&seed), "{shown}");
        let c = parse(
            &with("user = \"u\""),
            &[("VIRTSTREAM_NATS_PASSWORD", "pw-env")],
        )
        .unwrap();
        let shown = c.redacted();
        assert!(
            !shown.contains("pw-env") && shown.contains("user = \"u\""),
            "{shown}"
        );
    }

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

    #[test]
    fn durations_parse_and_bad_ones_are_named() {
        let c = parse(&format!("{SAMPLE}\n[log]\nformat = \"json\"\n"), &[]).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let err = parse(
            &SAMPLE.replace("[host]", "[host]\nshutdown_timeout = \"soon\""),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("host.shutdown_timeout") && err.contains("duration"),
            "{err}"
        );
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

    const KAFKA: &str = "\n[kafka]\nbrokers = [\"127.0.0.1:9092\"]\n";

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
