//! The topics virtstream writes: their roles, the checks of existing
//! topics, provisioning (creating missing ones when allowed), and telling
//! a topic deleted under a running client.
//!
//! Invariants:
//! - the events topic keeps history (`cleanup.policy` without `compact`);
//!   the snapshot topics are compacted; an existing topic that is not is
//!   refused with a message naming the topic and the setting;
//! - while the brokers cannot be reached, at most one diagnostic
//!   connection is made every `DIAGNOSE_EVERY` (one cache per process).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::error::RDKafkaErrorCode;

use super::{diagnose, KafkaContext, KafkaError, REQUEST_TIMEOUT};
use crate::bus::Diagnosis;
use crate::config::KafkaConfig;

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

fn broker_err(cfg: &KafkaConfig, e: impl std::fmt::Display) -> KafkaError {
    KafkaError::Broker {
        brokers: cfg.brokers.0.join(","),
        message: e.to_string(),
    }
}

/// Partition counts of the topics that exist (librdkafka's metadata call
/// blocks, so it runs on the blocking pool).
async fn existing_topics(
    admin: &Arc<AdminClient<KafkaContext>>,
    cfg: &KafkaConfig,
) -> Result<HashMap<String, i32>, KafkaError> {
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
    Ok(partition_counts(&md))
}

/// Partition counts of the topics a metadata answer shows as existing
/// (no error, at least one partition).
pub fn partition_counts(md: &rdkafka::metadata::Metadata) -> HashMap<String, i32> {
    md.topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect()
}

/// Creates missing topics (when allowed) and checks existing ones;
/// returns the partition counts of the events, domain snapshots and host
/// snapshots topics, in that order.
pub async fn ensure_topics(
    admin: &Arc<AdminClient<KafkaContext>>,
    cfg: &KafkaConfig,
) -> Result<[i32; 3], KafkaError> {
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
) -> Result<Provisioned, KafkaError> {
    let mut created = Vec::new();
    let mut existing = existing_topics(admin, cfg).await?;
    let opts = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
    let missing: Vec<(&str, TopicRole)> = topics(cfg)
        .into_iter()
        .filter(|(t, _)| !existing.contains_key(*t))
        .collect();
    if !missing.is_empty() {
        if !cfg.create_topics {
            return Err(KafkaError::Missing {
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
                    let err = KafkaError::Broker {
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
                            KafkaError::Config(err.to_string())
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
        check_cleanup_policy(*role, policy).map_err(|reason| KafkaError::Unsuitable {
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
static DIAGNOSIS: std::sync::Mutex<Option<(std::time::Instant, Option<Diagnosis>)>> =
    std::sync::Mutex::new(None);

#[cfg(test)]
mod tests {
    use super::*;

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
}
