//! NATS JetStream: connection options and connecting, the JetStream
//! context, the stream configurations virtstream creates (the agent's
//! events and snapshots streams, and the usage tool's stream), the checks
//! of existing streams, and provisioning them.
//!
//! Invariants:
//! - the usage stream de-duplicates by `Nats-Msg-Id` (duplicate window
//!   > 0), keeps every message (limits retention) and covers its prefix;
//! - the events stream is file-backed, de-duplicates by `Nats-Msg-Id`
//!   (duplicate window > 0), keeps history (limits retention, not one
//!   message per subject) and covers `<prefix>.>`; the snapshots stream is
//!   file-backed, de-duplicates, keeps exactly one message per subject (the
//!   NATS form of compaction) and covers the snapshot and host prefixes; an
//!   existing stream that is not is refused with a message naming the
//!   setting;
//! - [`connect`] reconnects forever (an unreachable server at start only
//!   delays publishing); [`connect_once`] fails at once (the tools);
//! - secrets are read from files or the environment, never from flags, and
//!   never appear in errors or logs.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::{Bus, Cause, Diagnosis};
use crate::config::{NatsConfig, UsageConfig};

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("NATS options: {0}")]
    Options(String),
    #[error("NATS connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("JetStream stream {stream} is unsuitable for virtstream: {reason}")]
    Unsuitable { stream: String, reason: String },
    #[error("JetStream stream {stream} does not exist and nats.create_streams = false")]
    Missing { stream: String },
    #[error("JetStream API: {0}")]
    Api(String),
}

impl NatsError {
    /// Errors that retrying cannot fix.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            NatsError::Unsuitable { .. } | NatsError::Missing { .. } | NatsError::Options(_)
        )
    }
}

/// Reads a secret file: the whole content without the trailing newline.
fn read_secret(key: &str, path: &std::path::Path) -> Result<String, NatsError> {
    super::read_secret(key, path).map_err(NatsError::Options)
}

/// Connection options shared by the agent and the tools: name, timeout,
/// TLS, and one authentication method (token, credentials file, NKey seed
/// or user/password), secrets read from files or the environment, never
/// from flags. Secret values never appear in errors or logs; only the key
/// and the file's path do.
async fn options(
    cfg: &NatsConfig,
    client_name: &str,
) -> Result<async_nats::ConnectOptions, NatsError> {
    let mut opts = match &cfg.credentials_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| {
                NatsError::Options(format!("nats.credentials_file {}: {e}", path.display()))
            })?,
        None => async_nats::ConnectOptions::new(),
    }
    .name(client_name)
    .connection_timeout(Duration::from_secs(5));
    if let Some(path) = &cfg.token_file {
        let token = read_secret("nats.token_file", path)?;
        opts = opts.token(token.trim().to_string());
    }
    if let Some(path) = &cfg.nkey_seed_file {
        let seed = read_secret("nats.nkey_seed_file", path)?;
        let seed = seed.trim().to_string();
        // Check the seed here: the client would only fail at connect time,
        // with a less helpful message.
        nkeys::KeyPair::from_seed(&seed).map_err(|e| {
            NatsError::Options(format!(
                "nats.nkey_seed_file {}: not an NKey seed ({e})",
                path.display()
            ))
        })?;
        opts = opts.nkey(seed);
    }
    if let Some(user) = &cfg.user {
        let password = match (&cfg.password, &cfg.password_file) {
            (Some(p), _) => p.expose().to_string(),
            (None, Some(path)) => read_secret("nats.password_file", path)?,
            (None, None) => {
                return Err(NatsError::Options(
                    "nats.user is set without nats.password_file or VIRTSTREAM_NATS_PASSWORD"
                        .into(),
                ))
            }
        };
        opts = opts.user_and_password(user.clone(), password);
    }
    if cfg.tls_required() {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(opts)
}

fn connect_error(cfg: &NatsConfig) -> impl FnOnce(async_nats::ConnectError) -> NatsError + '_ {
    move |e| NatsError::Connect {
        url: cfg.url.clone(),
        message: e.to_string(),
    }
}

/// Connects with retry-forever semantics (returns at once, even when the
/// server is down).
pub async fn connect(cfg: &NatsConfig, client_name: &str) -> Result<async_nats::Client, NatsError> {
    options(cfg, client_name)
        .await?
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100u64 << attempts.min(6)).min(5_000))
        })
        .event_callback(|ev| async move {
            tracing::info!(event = %ev, "nats connection event");
        })
        .connect(cfg.url.as_str())
        .await
        .map_err(connect_error(cfg))
}

/// Connects once, failing at once when the server cannot be reached (the
/// consumer tools).
pub async fn connect_once(
    cfg: &NatsConfig,
    client_name: &str,
) -> Result<async_nats::Client, NatsError> {
    options(cfg, client_name)
        .await?
        .connect(cfg.url.as_str())
        .await
        .map_err(connect_error(cfg))
}

/// The class of a client connection error.
fn cause_of(kind: async_nats::ConnectErrorKind) -> Cause {
    use async_nats::ConnectErrorKind as K;
    match kind {
        K::ServerParse => Cause::Config,
        K::Dns | K::Io | K::MaxReconnects => Cause::Unreachable,
        K::Authentication | K::AuthorizationViolation => Cause::Auth,
        K::TimedOut => Cause::Timeout,
        K::Tls => Cause::Tls,
    }
}

/// Why connecting to the server fails right now, in full: the client's
/// own connection events say only "IO error" for a refused TLS handshake
/// or an unreachable server. One attempt; `None` when it succeeds. Used
/// while the sink is not ready, so the log and `/readyz` name the cause.
pub async fn diagnose(cfg: &NatsConfig) -> Option<Diagnosis> {
    let failed = |cause, detail| {
        Some(Diagnosis {
            bus: Bus::Nats,
            cause,
            detail,
        })
    };
    let opts = match options(cfg, "virtstream-diagnose").await {
        Ok(o) => o,
        Err(e) => return failed(Cause::Config, e.to_string()),
    };
    let attempt = opts
        .connection_timeout(Duration::from_secs(3))
        .connect(cfg.url.as_str());
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(_client)) => None,
        Ok(Err(e)) => failed(cause_of(e.kind()), connect_error(cfg)(e).to_string()),
        Err(_) => failed(
            Cause::Timeout,
            format!("NATS connect to {}: timed out", cfg.url),
        ),
    }
}

/// The JetStream context publishes go through.
pub fn context(client: async_nats::Client, cfg: &NatsConfig) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(cfg.ack_timeout.0)
        .max_ack_inflight(cfg.max_in_flight.max(1))
        .backpressure_on_inflight(true)
        .build(client)
}

/// The stream configuration virtstream creates.
pub fn events_stream_config(cfg: &NatsConfig) -> stream::Config {
    stream::Config {
        name: cfg.events_stream.clone(),
        description: Some("virtstream DomainEvent messages (schemas/DomainEvent.v*.avsc)".into()),
        subjects: vec![format!("{}.>", cfg.events_subject_prefix)],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: cfg.max_age.0,
        duplicate_window: cfg.duplicate_window.0,
        num_replicas: cfg.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

/// The snapshots stream configuration virtstream creates: one message per
/// subject (the latest snapshot of each domain, the latest round marker or
/// heartbeat of each host).
pub fn snapshots_stream_config(cfg: &NatsConfig) -> stream::Config {
    stream::Config {
        name: cfg.snapshots_stream.clone(),
        description: Some(
            "virtstream DomainSnapshot and HostSnapshot records, latest per subject (schemas/*Snapshot.v*.avsc)"
                .into(),
        ),
        subjects: vec![
            format!("{}.>", cfg.snapshots_subject_prefix),
            format!("{}.>", cfg.hosts_subject_prefix),
        ],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_messages_per_subject: 1,
        duplicate_window: cfg.duplicate_window.0,
        num_replicas: cfg.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

/// The usage stream the usage tool creates (`usage --publish`): every
/// usage CloudEvent kept (until `nats.max_age`), re-publishes of the same
/// window dropped within `nats.duplicate_window`.
pub fn usage_stream_config(cfg: &NatsConfig, usage: &UsageConfig) -> stream::Config {
    stream::Config {
        name: usage.nats_stream.clone(),
        description: Some(
            "virtstream usage CloudEvents (structured JSON, type io.virtstream.usage.v1)".into(),
        ),
        subjects: vec![format!("{}.>", usage.nats_subject_prefix)],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: cfg.max_age.0,
        duplicate_window: cfg.duplicate_window.0,
        num_replicas: cfg.replicas,
        ..Default::default()
    }
}

/// Checks an existing usage stream; `Err` names the unsuitable setting.
pub fn check_usage_suitable(c: &stream::Config, usage: &UsageConfig) -> Result<(), String> {
    let prefix = &usage.nats_subject_prefix;
    if !c.subjects.iter().any(|p| covers(p, prefix)) {
        return Err(format!(
            "its subjects {:?} do not cover `{prefix}.>`",
            c.subjects
        ));
    }
    if c.duplicate_window.is_zero() {
        return Err("duplicate_window is 0; Nats-Msg-Id de-duplication is required".into());
    }
    if c.retention != stream::RetentionPolicy::Limits {
        return Err(format!(
            "retention is {:?}; usage records must stay readable (use limits)",
            c.retention
        ));
    }
    if (1..=64).contains(&c.max_messages_per_subject) {
        return Err(format!(
            "max_messages_per_subject is {}: that drops earlier windows of a domain",
            c.max_messages_per_subject
        ));
    }
    Ok(())
}

/// Checks an existing snapshots stream; `Err` names the unsuitable setting.
pub fn check_snapshots_suitable(c: &stream::Config, cfg: &NatsConfig) -> Result<(), String> {
    for prefix in [&cfg.snapshots_subject_prefix, &cfg.hosts_subject_prefix] {
        if !c.subjects.iter().any(|p| covers(p, prefix)) {
            return Err(format!(
                "its subjects {:?} do not cover `{prefix}.>`",
                c.subjects
            ));
        }
    }
    if c.storage != stream::StorageType::File {
        return Err("storage is memory; snapshots must survive server restarts".into());
    }
    if c.duplicate_window.is_zero() {
        return Err("duplicate_window is 0; Nats-Msg-Id de-duplication is required".into());
    }
    if c.max_messages_per_subject != 1 {
        return Err(format!(
            "max_messages_per_subject is {}; a snapshots stream keeps exactly 1 message per subject",
            c.max_messages_per_subject
        ));
    }
    if c.retention != stream::RetentionPolicy::Limits {
        return Err(format!(
            "retention is {:?}; snapshots must stay readable (use limits)",
            c.retention
        ));
    }
    if !c.max_age.is_zero() {
        return Err(format!(
            "max_age is {:?}; the latest snapshot of a quiet domain must not expire",
            c.max_age
        ));
    }
    Ok(())
}

/// Does NATS subject pattern `pattern` match every subject under `prefix.>`?
pub fn covers(pattern: &str, prefix: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let s: Vec<&str> = prefix.split('.').collect();
    for (i, tok) in p.iter().enumerate() {
        match *tok {
            ">" => return true,
            "*" if i < s.len() => continue,
            t if i < s.len() && t == s[i] => continue,
            _ => return false,
        }
    }
    false
}

/// Checks an existing stream; `Err` names the unsuitable setting.
pub fn check_suitable(c: &stream::Config, cfg: &NatsConfig) -> Result<(), String> {
    if !c
        .subjects
        .iter()
        .any(|p| covers(p, &cfg.events_subject_prefix))
    {
        return Err(format!(
            "its subjects {:?} do not cover `{}.>`",
            c.subjects, cfg.events_subject_prefix
        ));
    }
    if c.storage != stream::StorageType::File {
        return Err(
            "storage is memory; effectively-once across server restarts needs file storage".into(),
        );
    }
    if c.duplicate_window.is_zero() {
        return Err("duplicate_window is 0; Nats-Msg-Id de-duplication is required".into());
    }
    if c.retention != stream::RetentionPolicy::Limits {
        return Err(format!(
            "retention is {:?}; events must stay readable for replay and audit (use limits)",
            c.retention
        ));
    }
    if (1..=64).contains(&c.max_messages_per_subject) {
        return Err(format!(
            "max_messages_per_subject is {}: that compacts per-domain history (events need every message)",
            c.max_messages_per_subject
        ));
    }
    Ok(())
}

/// Finds a stream, creating it when missing and allowed
/// (`nats.create_streams`), and checks it with `check`.
pub async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &NatsConfig,
    want: stream::Config,
    check: impl Fn(&stream::Config) -> Result<(), String>,
) -> Result<stream::Stream, NatsError> {
    let name = want.name.clone();
    match js.get_stream(&name).await {
        Ok(mut s) => {
            let info = s.info().await.map_err(|e| NatsError::Api(e.to_string()))?;
            check(&info.config).map_err(|reason| NatsError::Unsuitable {
                stream: name.clone(),
                reason,
            })?;
            Ok(s)
        }
        Err(e) => {
            let not_found = matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            );
            if !not_found {
                return Err(NatsError::Api(e.to_string()));
            }
            if !cfg.create_streams {
                return Err(NatsError::Missing { stream: name });
            }
            tracing::info!(stream = %name, "creating JetStream stream");
            js.create_stream(want)
                .await
                .map_err(|e| NatsError::Api(e.to_string()))
        }
    }
}

/// The events and snapshots streams, created when missing and allowed.
pub async fn ensure_streams(
    js: &jetstream::Context,
    cfg: &NatsConfig,
) -> Result<(stream::Stream, stream::Stream), NatsError> {
    let events = ensure_stream(js, cfg, events_stream_config(cfg), |c| {
        check_suitable(c, cfg)
    })
    .await?;
    let snapshots = ensure_stream(js, cfg, snapshots_stream_config(cfg), |c| {
        check_snapshots_suitable(c, cfg)
    })
    .await?;
    Ok((events, snapshots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_coverage() {
        assert!(covers("virt.events.v1.>", "virt.events.v1"));
        assert!(covers("virt.>", "virt.events.v1"));
        assert!(covers(">", "virt.events.v1"));
        assert!(covers("virt.*.v1.>", "virt.events.v1"));
        assert!(!covers("virt.events.v1.*", "virt.events.v1"));
        assert!(!covers("virt.events.v2.>", "virt.events.v1"));
        assert!(!covers("virt.events.v1", "virt.events.v1"));
    }

    #[test]
    fn snapshots_stream_suitability_names_the_setting() {
        let cfg: NatsConfig = toml::from_str("url = \"nats://x:1\"").unwrap();
        let good = snapshots_stream_config(&cfg);
        assert!(check_snapshots_suitable(&good, &cfg).is_ok());
        let mut c = good.clone();
        c.max_messages_per_subject = 0;
        assert!(check_snapshots_suitable(&c, &cfg)
            .unwrap_err()
            .contains("max_messages_per_subject"));
        let mut c = good.clone();
        c.subjects = vec!["virt.snapshots.v1.>".into()];
        assert!(check_snapshots_suitable(&c, &cfg)
            .unwrap_err()
            .contains("virt.hosts.v1"));
        let mut c = good;
        c.max_age = Duration::from_secs(60);
        assert!(check_snapshots_suitable(&c, &cfg)
            .unwrap_err()
            .contains("max_age"));
    }

    #[test]
    fn usage_stream_suitability_names_the_setting() {
        let cfg: NatsConfig = toml::from_str("url = \"nats://x:1\"").unwrap();
        let usage = UsageConfig::default();
        let good = usage_stream_config(&cfg, &usage);
        assert_eq!(good.subjects, vec!["virt.usage.v1.>".to_string()]);
        assert!(check_usage_suitable(&good, &usage).is_ok());
        let mut c = good.clone();
        c.duplicate_window = Duration::ZERO;
        assert!(check_usage_suitable(&c, &usage)
            .unwrap_err()
            .contains("duplicate_window"));
        let mut c = good.clone();
        c.subjects = vec!["virt.events.v1.>".into()];
        assert!(check_usage_suitable(&c, &usage)
            .unwrap_err()
            .contains("virt.usage.v1"));
        let mut c = good;
        c.max_messages_per_subject = 1;
        assert!(check_usage_suitable(&c, &usage)
            .unwrap_err()
            .contains("max_messages_per_subject"));
    }

    #[test]
    fn suitability_names_the_setting() {
        let cfg: NatsConfig = toml::from_str("url = \"nats://x:1\"").unwrap();
        let good = events_stream_config(&cfg);
        assert!(check_suitable(&good, &cfg).is_ok());
        let mut c = good.clone();
        c.storage = stream::StorageType::Memory;
        assert!(check_suitable(&c, &cfg).unwrap_err().contains("memory"));
        let mut c = good.clone();
        c.max_messages_per_subject = 1;
        assert!(check_suitable(&c, &cfg)
            .unwrap_err()
            .contains("max_messages_per_subject"));
        let mut c = good.clone();
        c.subjects = vec!["other.>".into()];
        assert!(check_suitable(&c, &cfg).unwrap_err().contains("subjects"));
        let mut c = good;
        c.duplicate_window = Duration::ZERO;
        assert!(check_suitable(&c, &cfg)
            .unwrap_err()
            .contains("duplicate_window"));
    }
}
