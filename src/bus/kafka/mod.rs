//! Kafka: the client configuration every client is built from, the
//! client context (`context.rs`), topics and their provisioning
//! (`topics.rs`), key → partition placement (`partitioner.rs`), and
//! reading a partition to its end (`reader.rs`); here also [`diagnose`],
//! why the brokers cannot be reached.
//!
//! Invariants:
//! - every client is built from one [`client_config`]: brokers, client id,
//!   TLS, SASL, then the operator's pass-through properties (which may not
//!   override what the guarantees rest on, see
//!   [`crate::config::KAFKA_RESERVED_PROPERTIES`]);
//! - secrets are read from files or the environment and never appear in
//!   errors or logs.

mod context;
mod partitioner;
pub mod reader;
mod topics;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};

pub use context::{cause_of, FetchStats, KafkaContext, PartitionFetch};
pub use partitioner::{murmur2, partition_for};
pub use topics::{
    check_cleanup_policy, ensure_topics, missing_topic, partition_counts, provision_topics, topics,
    Provisioned, TopicRole,
};

use super::{Bus, Diagnosis};
use crate::config::KafkaConfig;

/// How long one metadata or admin request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("Kafka client configuration: {0}")]
    Config(String),
    #[error("Kafka topic {topic} is unsuitable for virtstream: {reason}")]
    Unsuitable { topic: String, reason: String },
    #[error("Kafka topic {topic} does not exist and kafka.create_topics = false")]
    Missing { topic: String },
    #[error("Kafka brokers {brokers}: {message}")]
    Broker { brokers: String, message: String },
    #[error("interrupted by shutdown")]
    Interrupted,
}

impl KafkaError {
    /// Errors that retrying cannot fix.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            KafkaError::Config(_) | KafkaError::Unsuitable { .. } | KafkaError::Missing { .. }
        )
    }
}

fn read_secret(key: &str, path: &std::path::Path) -> Result<String, KafkaError> {
    super::read_secret(key, path).map_err(KafkaError::Config)
}

/// The configuration shared by the producer, the admin client and the
/// readers.
pub fn client_config(cfg: &KafkaConfig, client_id: &str) -> Result<ClientConfig, KafkaError> {
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

/// Why the brokers cannot be reached, as librdkafka reports it (e.g.
/// `SSL handshake failed: ...`, `SASL authentication error: ...`). The
/// admin client's own error events go to a queue nobody polls, so a
/// short-lived producer makes one metadata request and its events are
/// polled here. Blocks for up to the request timeout.
pub fn diagnose(cfg: &KafkaConfig) -> Option<Diagnosis> {
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
    if !failed {
        return None;
    }
    ctx.last_failure().map(|(cause, detail)| Diagnosis {
        bus: Bus::Kafka,
        cause,
        detail,
    })
}

/// Creates the admin client.
pub fn admin_client(
    cfg: &KafkaConfig,
    client_id: &str,
) -> Result<Arc<AdminClient<KafkaContext>>, KafkaError> {
    client_config(cfg, client_id)?
        .create_with_context(KafkaContext::default())
        .map(Arc::new)
        .map_err(|e| KafkaError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
