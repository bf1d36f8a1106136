//! The `[usage]` section: where `virtstream usage --format cloudevents
//! --publish` sends the usage CloudEvents (a Kafka topic, a JetStream
//! stream and subject prefix), and `[usage.tenant]`, where a tenant id is
//! found in the domain XML's `<metadata>`.
//!
//! Invariants:
//! - the section is optional and every key of `[usage]` has a default;
//!   `[usage.tenant]` is optional, but when present names a namespace and
//!   an element path;
//! - the usage topic, stream and subject prefix never collide with the
//!   agent's own (`[kafka]`, `[nats]`): usage records must not land in the
//!   events or snapshot streams, and the usage stream must not capture
//!   their subjects;
//! - element paths are local names (namespaces are matched by URI, never
//!   by prefix).

use serde::{Deserialize, Serialize};

use super::kafka::valid_topic;
use super::{key_err, ConfigError, KafkaConfig, NatsConfig};

/// `[usage]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    /// Kafka topic of the usage CloudEvents (`--bus kafka --publish`);
    /// created when missing if `kafka.create_topics` allows, with
    /// `kafka.partitions` and `kafka.replication`.
    #[serde(default = "d_kafka_topic")]
    pub kafka_topic: String,
    /// JetStream stream of the usage CloudEvents (`--bus nats --publish`);
    /// created when missing if `nats.create_streams` allows, with
    /// `nats.max_age`, `nats.duplicate_window` and `nats.replicas`.
    #[serde(default = "d_nats_stream")]
    pub nats_stream: String,
    /// Subjects are `<prefix>.<host token>.<domain uuid>`.
    #[serde(default = "d_nats_prefix")]
    pub nats_subject_prefix: String,
    /// Where the tenant id is in the domain XML; absent: no tenant, the
    /// CloudEvent subject is the domain uuid.
    pub tenant: Option<TenantConfig>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            kafka_topic: d_kafka_topic(),
            nats_stream: d_nats_stream(),
            nats_subject_prefix: d_nats_prefix(),
            tenant: None,
        }
    }
}

fn d_kafka_topic() -> String {
    "virt.usage.v1".into()
}
fn d_nats_stream() -> String {
    "VIRT_USAGE".into()
}
fn d_nats_prefix() -> String {
    "virt.usage.v1".into()
}

/// `[usage.tenant]`: the tenant of a domain is the value found at
/// `element` under the element of `namespace` that is a child of the
/// domain XML's `<metadata>` (libvirt keeps one such element per
/// namespace; `virsh metadata DOMAIN --uri NAMESPACE` shows it).
///
/// Nova: `namespace = ["http://openstack.org/xmlns/libvirt/nova/1.1",
/// "http://openstack.org/xmlns/libvirt/nova/1.0"]`, `element =
/// "owner/project"`, `attribute = "uuid"` (the project id of
/// `<nova:instance><nova:owner><nova:project uuid="…">`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The namespace URI, or several, tried in order.
    pub namespace: Namespaces,
    /// `/`-separated local names from the namespace's element under
    /// `<metadata>` (that element itself not included), each in the same
    /// namespace; `""` is that element itself.
    pub element: String,
    /// The attribute holding the tenant id; absent: the element's text.
    pub attribute: Option<String>,
}

impl TenantConfig {
    /// The element path as local names.
    pub fn path(&self) -> Vec<&str> {
        self.element.split('/').filter(|s| !s.is_empty()).collect()
    }
}

/// One namespace URI or a list of them (a TOML string or array).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Namespaces(pub Vec<String>);

impl<'de> Deserialize<'de> for Namespaces {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Namespaces;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a namespace URI or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Namespaces, E> {
                Ok(Namespaces(vec![s.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Namespaces, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(Namespaces(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Do subject prefixes `a` and `b` capture each other's subjects?
fn overlaps(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}.")) || b.starts_with(&format!("{a}."))
}

impl UsageConfig {
    /// Names, and that they stay clear of the agent's own topics, streams
    /// and subjects; then the tenant rule.
    pub(super) fn validate(
        &self,
        nats: Option<&NatsConfig>,
        kafka: Option<&KafkaConfig>,
    ) -> Result<(), ConfigError> {
        if !valid_topic(&self.kafka_topic) {
            return Err(key_err(
                "usage.kafka_topic",
                format!(
                    "`{}` is not a valid Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)",
                    self.kafka_topic
                ),
            ));
        }
        if let Some(k) = kafka {
            for (key, t) in [
                ("kafka.events_topic", &k.events_topic),
                ("kafka.domain_snapshots_topic", &k.domain_snapshots_topic),
                ("kafka.host_snapshots_topic", &k.host_snapshots_topic),
            ] {
                if *t == self.kafka_topic {
                    return Err(key_err(
                        "usage.kafka_topic",
                        format!("`{t}` is already {key}"),
                    ));
                }
            }
        }
        let s = &self.nats_stream;
        if s.is_empty() || s.contains(['.', '*', '>', ' ']) {
            return Err(key_err(
                "usage.nats_stream",
                format!("`{s}` is not a valid JetStream stream name"),
            ));
        }
        let p = &self.nats_subject_prefix;
        if p.is_empty() || p.contains(['*', '>', ' ']) || p.ends_with('.') || p.starts_with('.') {
            return Err(key_err(
                "usage.nats_subject_prefix",
                format!("`{p}` is not a valid subject prefix"),
            ));
        }
        if let Some(n) = nats {
            for (key, name) in [
                ("nats.events_stream", &n.events_stream),
                ("nats.snapshots_stream", &n.snapshots_stream),
            ] {
                if name == s {
                    return Err(key_err(
                        "usage.nats_stream",
                        format!("`{s}` is already {key}"),
                    ));
                }
            }
            for (key, other) in [
                ("nats.events_subject_prefix", &n.events_subject_prefix),
                ("nats.snapshots_subject_prefix", &n.snapshots_subject_prefix),
                ("nats.hosts_subject_prefix", &n.hosts_subject_prefix),
            ] {
                if overlaps(p, other) {
                    return Err(key_err(
                        "usage.nats_subject_prefix",
                        format!("`{p}` overlaps {key} `{other}`"),
                    ));
                }
            }
        }
        match &self.tenant {
            Some(t) => t.validate(),
            None => Ok(()),
        }
    }
}

impl TenantConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.namespace.0.is_empty() || self.namespace.0.iter().any(|n| n.trim().is_empty()) {
            return Err(key_err(
                "usage.tenant.namespace",
                "must name the namespace URI of the metadata element (e.g. \
                 http://openstack.org/xmlns/libvirt/nova/1.1)",
            ));
        }
        if let Some(seg) = self.path().into_iter().find(|s| {
            s.contains(':') || s.contains(char::is_whitespace) || s.contains(['[', '@', '*'])
        }) {
            return Err(key_err(
                "usage.tenant.element",
                format!(
                    "`{seg}` is not a local element name: write the path as local names \
                     without prefixes (e.g. owner/project); the namespace is matched by \
                     usage.tenant.namespace"
                ),
            ));
        }
        if let Some(a) = &self.attribute {
            if a.is_empty() || a.contains(':') || a.contains(char::is_whitespace) {
                return Err(key_err(
                    "usage.tenant.attribute",
                    format!(
                        "`{a}` is not an attribute name (leave it out to use the element's text)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testutil::{parse, KAFKA, SAMPLE};

    const NOVA: &str = "\n[usage.tenant]\nnamespace = \"http://openstack.org/xmlns/libvirt/nova/1.1\"\nelement = \"owner/project\"\nattribute = \"uuid\"\n";

    #[test]
    fn usage_defaults_without_the_section() {
        let c = parse(SAMPLE, &[]).unwrap();
        assert_eq!(c.usage.kafka_topic, "virt.usage.v1");
        assert_eq!(c.usage.nats_stream, "VIRT_USAGE");
        assert_eq!(c.usage.nats_subject_prefix, "virt.usage.v1");
        assert!(c.usage.tenant.is_none());
    }

    #[test]
    fn the_nova_tenant_rule_parses() {
        let c = parse(&format!("{SAMPLE}{NOVA}"), &[]).unwrap();
        let t = c.usage.tenant.unwrap();
        assert_eq!(
            t.namespace.0,
            vec!["http://openstack.org/xmlns/libvirt/nova/1.1"]
        );
        assert_eq!(t.path(), vec!["owner", "project"]);
        assert_eq!(t.attribute.as_deref(), Some("uuid"));
        // A list of namespaces, and the element's text.
        let c = parse(
            &format!(
                "{SAMPLE}\n[usage.tenant]\nnamespace = [\"urn:a\", \"urn:b\"]\nelement = \"owner\"\n"
            ),
            &[],
        )
        .unwrap();
        let t = c.usage.tenant.unwrap();
        assert_eq!(t.namespace.0, vec!["urn:a", "urn:b"]);
        assert_eq!(t.attribute, None);
        // The environment overrides `[usage]` keys.
        let c = parse(SAMPLE, &[("VIRTSTREAM_USAGE_KAFKA_TOPIC", "billing.v1")]).unwrap();
        assert_eq!(c.usage.kafka_topic, "billing.v1");
    }

    #[test]
    fn unknown_usage_keys_are_refused() {
        let err = parse(&format!("{SAMPLE}\n[usage]\nkafka_topics = \"x\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("usage.kafka_topics") && err.contains("unknown field"),
            "{err}"
        );
        let err = parse(&format!("{SAMPLE}{NOVA}xpath = \"//x\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("usage.tenant.xpath") && err.contains("unknown field"),
            "{err}"
        );
        let err = parse(&format!("{SAMPLE}\n[usage.tenant]\nelement = \"a\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("usage.tenant.namespace"), "{err}");
    }

    #[test]
    fn usage_errors_name_the_key() {
        let cases = [
            ("[usage]\nkafka_topic = \"bad topic\"", "usage.kafka_topic"),
            (
                "[usage]\nkafka_topic = \"virt.domain.events.v1\"",
                "kafka.events_topic",
            ),
            (
                "[usage]\nnats_stream = \"VIRT_EVENTS\"",
                "usage.nats_stream",
            ),
            ("[usage]\nnats_stream = \"a.b\"", "usage.nats_stream"),
            (
                "[usage]\nnats_subject_prefix = \"virt.events.v1.usage\"",
                "usage.nats_subject_prefix",
            ),
            (
                "[usage.tenant]\nnamespace = \"urn:x\"\nelement = \"nova:owner/nova:project\"",
                "usage.tenant.element",
            ),
            (
                "[usage.tenant]\nnamespace = []\nelement = \"a\"",
                "usage.tenant.namespace",
            ),
            (
                "[usage.tenant]\nnamespace = \"urn:x\"\nelement = \"a\"\nattribute = \"\"",
                "usage.tenant.attribute",
            ),
        ];
        for (body, key) in cases {
            let err = parse(&format!("{SAMPLE}{KAFKA}\n{body}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{body}: {err}");
        }
    }
}
