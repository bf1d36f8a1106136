//! Kafka sink: client configuration, topic provisioning and suitability
//! checks, and key → partition placement (this file); encoding
//! (`encoding.rs`); reading a partition to its end (`reader.rs`); and the
//! publish loop with its crash recovery (`service.rs`).
//!
//! Invariants:
//! - every client is built from one [`client_config`]: brokers, client id,
//!   TLS, SASL, then the operator's pass-through properties (which may not
//!   override what the guarantees rest on, see
//!   [`crate::config::KAFKA_RESERVED_PROPERTIES`]);
//! - the events topic keeps history (`cleanup.policy` without `compact`);
//!   the snapshot topics are compacted; an existing topic that is not is
//!   refused with a message naming the topic and the setting;
//! - a domain's messages always go to partition
//!   `murmur2(uuid) mod partitions` (what a Java producer's default
//!   partitioner picks), computed here, so the sink knows where every
//!   journal entry went without asking the broker.

pub mod encoding;
mod offsets;
pub mod probe;
pub mod reader;
mod recovery;
pub mod service;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use serde::Deserialize;

use crate::config::KafkaConfig;

/// How long one metadata or admin request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error("Kafka client configuration: {0}")]
    Config(String),
    #[error("Kafka topic {topic} is unsuitable for virtstream: {reason}")]
    Unsuitable { topic: String, reason: String },
    #[error("Kafka topic {topic} does not exist and kafka.create_topics = false")]
    Missing { topic: String },
    #[error("Kafka brokers {brokers}: {message}")]
    Broker { brokers: String, message: String },
    #[error("journal: {0}")]
    Journal(String),
    #[error("interrupted by shutdown")]
    Interrupted,
    /// The bus holds a message of this host and epoch beyond the journal's
    /// head: the journal was restored from a backup or a VM snapshot. The
    /// agent stops; its next start detects this and begins a new epoch.
    #[error("the bus holds host_seq {bus} of this host's epoch {epoch}, beyond the journal's head {journal}: the journal was restored from a backup or a VM snapshot; restart the agent to begin a new epoch")]
    JournalBehindBus {
        epoch: String,
        bus: u64,
        journal: u64,
    },
}

impl KafkaSinkError {
    /// Errors that retrying cannot fix.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            KafkaSinkError::Config(_)
                | KafkaSinkError::Unsuitable { .. }
                | KafkaSinkError::Missing { .. }
                | KafkaSinkError::Journal(_)
                | KafkaSinkError::JournalBehindBus { .. }
        )
    }
}

/// What one statistics report says about fetching a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionFetch {
    /// librdkafka's fetch state (`active` while fetching).
    pub state: String,
    /// The broker serving the partition.
    pub broker: i32,
    /// Fetch requests that broker connection has sent so far.
    pub fetches: i64,
}

/// The latest statistics report, numbered. Reports are served from the
/// consumer queue (the main queue is redirected there when a group id is
/// set), so every record fetched before a report was made has been
/// returned by `poll` before that report is seen.
#[derive(Debug, Default, Clone)]
pub struct FetchStats {
    pub seq: u64,
    pub partitions: HashMap<i32, PartitionFetch>,
}

/// The context of every client: routes librdkafka's logs and errors to
/// `tracing`, counts errors, and keeps the fetch statistics the reader
/// uses to know that fetches came back empty.
/// Clones share their state.
#[derive(Default, Clone)]
pub struct KafkaContext {
    inner: Arc<ContextState>,
}

#[derive(Default)]
struct ContextState {
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    fetch: Mutex<FetchStats>,
    topic: Option<String>,
}

impl KafkaContext {
    /// A context whose statistics track `topic`'s partitions.
    pub fn for_topic(topic: &str) -> KafkaContext {
        KafkaContext {
            inner: Arc::new(ContextState {
                topic: Some(topic.to_string()),
                ..Default::default()
            }),
        }
    }

    /// Client errors reported so far (connection failures, all brokers
    /// down, authentication failures, …).
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.lock().expect("kafka context").clone()
    }

    pub fn fetch_stats(&self) -> FetchStats {
        self.inner.fetch.lock().expect("kafka context").clone()
    }
}

#[derive(Deserialize)]
struct RawStats {
    #[serde(default)]
    brokers: HashMap<String, RawBroker>,
    #[serde(default)]
    topics: HashMap<String, RawTopic>,
}

#[derive(Deserialize)]
struct RawBroker {
    nodeid: i32,
    #[serde(default)]
    req: HashMap<String, i64>,
}

#[derive(Deserialize)]
struct RawTopic {
    #[serde(default)]
    partitions: HashMap<String, RawPartition>,
}

#[derive(Deserialize)]
struct RawPartition {
    partition: i32,
    broker: i32,
    #[serde(default)]
    fetch_state: String,
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(facility = fac, "librdkafka: {msg}"),
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {msg}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(facility = fac, "librdkafka: {msg}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {msg}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %error, "Kafka client error: {reason}");
        // "All brokers are down" follows the error that says why; keep
        // the cause.
        let all_down = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
        let mut last = self.inner.last_error.lock().expect("kafka context");
        if !(all_down && last.is_some()) {
            *last = Some(format!("{error}: {reason}"));
        }
    }

    fn stats_raw(&self, statistics: &[u8]) {
        let Some(topic) = &self.inner.topic else {
            return;
        };
        let Ok(raw) = serde_json::from_slice::<RawStats>(statistics) else {
            return;
        };
        let fetches: HashMap<i32, i64> = raw
            .brokers
            .values()
            .map(|b| (b.nodeid, b.req.get("Fetch").copied().unwrap_or(0)))
            .collect();
        let mut guard = self.inner.fetch.lock().expect("kafka context");
        let mut stats = FetchStats {
            seq: guard.seq + 1,
            partitions: HashMap::new(),
        };
        if let Some(t) = raw.topics.get(topic) {
            for p in t.partitions.values().filter(|p| p.partition >= 0) {
                stats.partitions.insert(
                    p.partition,
                    PartitionFetch {
                        state: p.fetch_state.clone(),
                        broker: p.broker,
                        fetches: fetches.get(&p.broker).copied().unwrap_or(0),
                    },
                );
            }
        }
        *guard = stats;
    }
}

impl ConsumerContext for KafkaContext {}

/// Only for [`diagnose`]'s producer, which sends nothing.
impl ProducerContext for KafkaContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

fn read_secret(key: &str, path: &std::path::Path) -> Result<String, KafkaSinkError> {
    super::read_secret(key, path).map_err(KafkaSinkError::Config)
}

/// The configuration shared by the producer, the admin client and the
/// readers.
pub fn client_config(cfg: &KafkaConfig, client_id: &str) -> Result<ClientConfig, KafkaSinkError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cfg.brokers.0.join(","))
        .set("client.id", cfg.client_id.as_deref().unwrap_or(client_id))
        .set("allow.auto.create.topics", "false");
    let protocol = match (cfg.tls, cfg.sasl_mechanism.is_some()) {
        (false, false) => "plaintext",
        (true, false) => "ssl",
        (false, true) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    };
    c.set("security.protocol", protocol);
    if let Some(p) = &cfg.tls_ca_file {
        c.set("ssl.ca.location", p.display().to_string());
    }
    if let Some(p) = &cfg.tls_cert_file {
        c.set("ssl.certificate.location", p.display().to_string());
    }
    if let Some(p) = &cfg.tls_key_file {
        c.set("ssl.key.location", p.display().to_string());
    }
    if let Some(p) = &cfg.tls_key_password_file {
        c.set(
            "ssl.key.password",
            read_secret("kafka.tls_key_password_file", p)?,
        );
    }
    if let Some(m) = cfg.sasl_mechanism {
        c.set("sasl.mechanism", m.as_str());
        if let Some(u) = &cfg.sasl_username {
            c.set("sasl.username", u);
        }
        let password = match (&cfg.sasl_password, &cfg.sasl_password_file) {
            (Some(p), _) => p.expose().to_string(),
            (None, Some(f)) => read_secret("kafka.sasl_password_file", f)?,
            (None, None) => String::new(),
        };
        c.set("sasl.password", password);
    }
    for (k, v) in &cfg.properties {
        c.set(k, v.to_string());
    }
    Ok(c)
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of a message key: what Kafka's Java default partitioner
/// picks for a keyed record.
pub fn partition_for(key: &str, partitions: i32) -> i32 {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

/// The role of a topic, which decides the cleanup policy it must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRole {
    /// Every message is kept (until retention): `cleanup.policy` must not
    /// include `compact`.
    History,
    /// Latest message per key: `cleanup.policy` must include `compact`.
    Compacted,
}

/// The topics virtstream writes, with their roles.
pub fn topics(cfg: &KafkaConfig) -> [(&str, TopicRole); 3] {
    [
        (cfg.events_topic.as_str(), TopicRole::History),
        (cfg.domain_snapshots_topic.as_str(), TopicRole::Compacted),
        (cfg.host_snapshots_topic.as_str(), TopicRole::Compacted),
    ]
}

/// Checks an existing topic's `cleanup.policy` (absent means the Kafka
/// default, `delete`); `Err` names the setting.
pub fn check_cleanup_policy(role: TopicRole, policy: Option<&str>) -> Result<(), String> {
    let shown = policy.unwrap_or("delete (broker default)");
    let compacts = policy.is_some_and(|p| p.split(',').any(|s| s.trim() == "compact"));
    match role {
        TopicRole::Compacted if !compacts => Err(format!(
            "cleanup.policy is {shown}; snapshot topics must be compacted (cleanup.policy=compact)"
        )),
        TopicRole::History if compacts => Err(format!(
            "cleanup.policy is {shown}; compaction would delete event history (use cleanup.policy=delete)"
        )),
        _ => Ok(()),
    }
}

fn broker_err(cfg: &KafkaConfig, e: impl std::fmt::Display) -> KafkaSinkError {
    KafkaSinkError::Broker {
        brokers: cfg.brokers.0.join(","),
        message: e.to_string(),
    }
}

/// Partition counts of the topics that exist (librdkafka's metadata call
/// blocks, so it runs on the blocking pool).
async fn existing_topics(
    admin: &Arc<AdminClient<KafkaContext>>,
    cfg: &KafkaConfig,
) -> Result<HashMap<String, i32>, KafkaSinkError> {
    let a = admin.clone();
    let fetched =
        tokio::task::spawn_blocking(move || a.inner().fetch_metadata(None, REQUEST_TIMEOUT))
            .await
            .map_err(|e| broker_err(cfg, e))?;
    let md = match fetched {
        Ok(md) => {
            *DIAGNOSIS.lock().expect("kafka diagnosis") = None;
            md
        }
        Err(e) => {
            let cached = DIAGNOSIS
                .lock()
                .expect("kafka diagnosis")
                .as_ref()
                .filter(|(at, _)| at.elapsed() < DIAGNOSE_EVERY)
                .map(|(_, why)| why.clone());
            let why = match cached {
                Some(why) => why,
                None => {
                    let c = cfg.clone();
                    let why = tokio::task::spawn_blocking(move || diagnose(&c))
                        .await
                        .ok()
                        .flatten();
                    *DIAGNOSIS.lock().expect("kafka diagnosis") =
                        Some((std::time::Instant::now(), why.clone()));
                    why
                }
            };
            let why = why.map(|w| format!(" ({w})")).unwrap_or_default();
            return Err(broker_err(
                cfg,
                format!("metadata request failed: {e}{why}"),
            ));
        }
    };
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// Creates missing topics (when allowed) and checks existing ones;
/// returns the partition counts of the events, domain snapshots and host
/// snapshots topics, in that order.
pub async fn ensure_topics(
    admin: &Arc<AdminClient<KafkaContext>>,
    cfg: &KafkaConfig,
) -> Result<[i32; 3], KafkaSinkError> {
    provision_topics(admin, cfg).await.map(|p| p.partitions)
}

/// What [`provision_topics`] found or made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// Partition counts of the events, domain snapshots and host snapshots
    /// topics, in that order.
    pub partitions: [i32; 3],
    /// Topics created just now: anything recorded about an earlier topic
    /// of the same name (offsets) is void.
    pub created: Vec<String>,
}

/// [`ensure_topics`], also saying which topics it created.
pub async fn provision_topics(
    admin: &Arc<AdminClient<KafkaContext>>,
    cfg: &KafkaConfig,
) -> Result<Provisioned, KafkaSinkError> {
    let mut created = Vec::new();
    let mut existing = existing_topics(admin, cfg).await?;
    let opts = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
    let missing: Vec<(&str, TopicRole)> = topics(cfg)
        .into_iter()
        .filter(|(t, _)| !existing.contains_key(*t))
        .collect();
    if !missing.is_empty() {
        if !cfg.create_topics {
            return Err(KafkaSinkError::Missing {
                topic: missing[0].0.to_string(),
            });
        }
        let new: Vec<NewTopic> = missing
            .iter()
            .map(|(t, role)| {
                let policy = match role {
                    TopicRole::History => "delete",
                    TopicRole::Compacted => "compact",
                };
                NewTopic::new(t, cfg.partitions, TopicReplication::Fixed(cfg.replication))
                    .set("cleanup.policy", policy)
            })
            .collect();
        let results = admin
            .create_topics(new.iter(), &opts)
            .await
            .map_err(|e| broker_err(cfg, format!("CreateTopics failed: {e}")))?;
        for r in results {
            match r {
                Ok(t) => {
                    tracing::info!(topic = %t, partitions = cfg.partitions, replication = cfg.replication, "created Kafka topic");
                    created.push(t);
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    let err = KafkaSinkError::Broker {
                        brokers: cfg.brokers.0.join(","),
                        message: format!("creating topic {t}: {code}"),
                    };
                    return Err(match code {
                        RDKafkaErrorCode::InvalidReplicationFactor
                        | RDKafkaErrorCode::InvalidPartitions
                        | RDKafkaErrorCode::InvalidConfig
                        | RDKafkaErrorCode::InvalidTopic
                        | RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed => {
                            KafkaSinkError::Config(err.to_string())
                        }
                        _ => err,
                    });
                }
            }
        }
        // Topic creation can take a moment to show in metadata.
        for _ in 0..50 {
            existing = existing_topics(admin, cfg).await?;
            if topics(cfg).iter().all(|(t, _)| existing.contains_key(*t)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Check the cleanup policy of every topic.
    let names: Vec<&str> = topics(cfg).iter().map(|(t, _)| *t).collect();
    let specs: Vec<ResourceSpecifier> = names.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let described = admin
        .describe_configs(specs.iter(), &opts)
        .await
        .map_err(|e| broker_err(cfg, format!("DescribeConfigs failed: {e}")))?;
    for ((name, role), res) in topics(cfg).iter().zip(described) {
        let res = res
            .map_err(|code| broker_err(cfg, format!("DescribeConfigs for topic {name}: {code}")))?;
        let policy = res.get("cleanup.policy").and_then(|e| e.value.as_deref());
        check_cleanup_policy(*role, policy).map_err(|reason| KafkaSinkError::Unsuitable {
            topic: name.to_string(),
            reason,
        })?;
    }
    let count = |t: &str| {
        existing
            .get(t)
            .copied()
            .ok_or_else(|| broker_err(cfg, format!("topic {t} does not show in metadata")))
    };
    Ok(Provisioned {
        partitions: [
            count(&cfg.events_topic)?,
            count(&cfg.domain_snapshots_topic)?,
            count(&cfg.host_snapshots_topic)?,
        ],
        created,
    })
}

/// The first of `names` the brokers' metadata says does not exist (a
/// topic deleted while the sink runs). `None` when all exist or the
/// metadata request fails (an unreachable broker is reported elsewhere).
/// Blocks for up to the request timeout.
pub fn missing_topic<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    names: &[String],
) -> Option<String> {
    let md = client.fetch_metadata(None, REQUEST_TIMEOUT).ok()?;
    names
        .iter()
        .find(|n| {
            !md.topics().iter().any(|t| {
                t.name() == n.as_str() && t.error().is_none() && !t.partitions().is_empty()
            })
        })
        .cloned()
}

/// At most one diagnostic connection this often while the brokers cannot
/// be reached.
const DIAGNOSE_EVERY: Duration = Duration::from_secs(30);

/// The last diagnosis and when it was made (one Kafka sink per process;
/// cleared by a successful metadata request).
static DIAGNOSIS: std::sync::Mutex<Option<(std::time::Instant, Option<String>)>> =
    std::sync::Mutex::new(None);

/// Why the brokers cannot be reached, as librdkafka reports it (e.g.
/// `SSL handshake failed: ...`, `SASL authentication error: ...`). The
/// admin client's own error events go to a queue nobody polls, so a
/// short-lived producer makes one metadata request and its events are
/// polled here. Blocks for up to the request timeout.
fn diagnose(cfg: &KafkaConfig) -> Option<String> {
    let ctx = KafkaContext::default();
    let producer: BaseProducer<KafkaContext> = client_config(cfg, "virtstream-diagnose")
        .ok()?
        .create_with_context(ctx.clone())
        .ok()?;
    let failed = producer
        .client()
        .fetch_metadata(None, REQUEST_TIMEOUT)
        .is_err();
    producer.poll(Duration::from_millis(100));
    if failed {
        ctx.last_error()
    } else {
        None
    }
}

/// Creates the admin client.
pub fn admin_client(
    cfg: &KafkaConfig,
    client_id: &str,
) -> Result<Arc<AdminClient<KafkaContext>>, KafkaSinkError> {
    client_config(cfg, client_id)?
        .create_with_context(KafkaContext::default())
        .map(Arc::new)
        .map_err(|e| KafkaSinkError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Values from Apache Kafka's own tests of Utils.murmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (k, want) in cases {
            assert_eq!(murmur2(k), want, "{}", String::from_utf8_lossy(k));
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        let key = "b9906489-6d5b-40f8-a742-ca71b2b84277";
        for n in 1..=64 {
            let p = partition_for(key, n);
            assert!((0..n).contains(&p));
            assert_eq!(p, partition_for(key, n));
        }
        // 1,000 random keys spread over every one of 12 partitions.
        let mut seen = [0u32; 12];
        for _ in 0..1000 {
            let k = uuid::Uuid::new_v4().to_string();
            seen[partition_for(&k, 12) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 30), "{seen:?}");
    }

    #[test]
    fn cleanup_policy_checks_name_the_setting() {
        assert!(check_cleanup_policy(TopicRole::Compacted, Some("compact")).is_ok());
        assert!(check_cleanup_policy(TopicRole::Compacted, Some("compact,delete")).is_ok());
        let e = check_cleanup_policy(TopicRole::Compacted, None).unwrap_err();
        assert!(
            e.contains("cleanup.policy is delete (broker default)"),
            "{e}"
        );
        let e = check_cleanup_policy(TopicRole::Compacted, Some("delete")).unwrap_err();
        assert!(e.contains("cleanup.policy=compact"), "{e}");
        assert!(check_cleanup_policy(TopicRole::History, None).is_ok());
        assert!(check_cleanup_policy(TopicRole::History, Some("delete")).is_ok());
        let e = check_cleanup_policy(TopicRole::History, Some("compact")).unwrap_err();
        assert!(e.contains("event history"), "{e}");
    }

    #[test]
    fn client_config_maps_tls_and_sasl() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let cfg: KafkaConfig = toml::from_str(&format!(
            "brokers = [\"a:9092\", \"b:9092\"]\ntls = true\nsasl_mechanism = \"SCRAM-SHA-256\"\nsasl_username = \"u\"\nsasl_password_file = \"{}\"\n[properties]\n\"linger.ms\" = 7\n",
            pw.display()
        ))
        .unwrap();
        let c = client_config(&cfg, "virtstream-h").unwrap();
        assert_eq!(c.get("bootstrap.servers"), Some("a:9092,b:9092"));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-256"));
        assert_eq!(c.get("sasl.password"), Some("s3cret"));
        assert_eq!(c.get("linger.ms"), Some("7"));
        assert_eq!(c.get("client.id"), Some("virtstream-h"));
    }
}
