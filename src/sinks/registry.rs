//! The sinks' side of a schema registry: the shipped schemas registered
//! once per process under the sink's subjects, and the ids that re-frame
//! a journal entry for the bus.
//!
//! At start, per subject: the compatibility level is read and logged (best
//! effort), then each shipped version of the subject's record (oldest
//! first) is looked up; one not registered yet is checked against the
//! latest registered version, then registered. A registry
//! that refuses a schema, or our credentials, ends the sink with its
//! reason (retrying cannot change it); one that cannot be reached leaves
//! the sink not ready and is retried, while the journal keeps every event.
//!
//! Invariants:
//! - ids are fetched once per process and never change afterwards (a
//!   registry gives a registered schema the same id for good);
//! - an entry that cannot be framed is never skipped: the sink stops with
//!   it still in the journal;
//! - every fingerprint a journal entry can carry (current and legacy, of
//!   every shipped version of the subject's record) maps to an id, so an
//!   entry journaled before an upgrade is framed like a new one.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::bus::registry::{RegistryClient, RegistryError};
use crate::codec::{self, CodecError};
use crate::config::Subjects;
use crate::journal::{Entry, Kind};

/// Registry ids by writer fingerprint (current and legacy).
#[derive(Debug, Default)]
pub struct SchemaIds(HashMap<u64, u32>);

impl SchemaIds {
    /// A single-object journal payload re-framed with its registry id.
    pub fn frame(&self, payload: &[u8]) -> Result<Bytes, CodecError> {
        let w = codec::writer_entry(payload)?;
        let id = self.0.get(&w.fingerprint).copied().ok_or_else(|| {
            CodecError::Shape(format!(
                "{} v{} has no schema registry id (not registered under this sink's subjects)",
                w.name, w.version
            ))
        })?;
        codec::confluent_frame(payload, id).map(Bytes::from)
    }

    /// Why `entry` cannot be framed, if it cannot: the caller keeps it in
    /// the journal and stops (skipping it would lose it).
    pub fn unframable(&self, entry: &Entry) -> Option<RegistryError> {
        if entry.kind == Kind::DomainTombstone {
            return None;
        }
        self.frame(&entry.payload)
            .err()
            .map(|e| RegistryError::Unframable {
                host_seq: entry.host_seq,
                reason: e.to_string(),
            })
    }
}

/// Registers a sink's subjects once and keeps the ids.
pub struct Registrar {
    client: RegistryClient,
    subjects: Subjects,
    ids: OnceCell<Arc<SchemaIds>>,
}

impl Registrar {
    pub fn new(client: RegistryClient, subjects: Subjects) -> Self {
        Registrar {
            client,
            subjects,
            ids: OnceCell::new(),
        }
    }

    /// The ids, registering the schemas on the first successful call.
    pub async fn ids(&self) -> Result<Arc<SchemaIds>, RegistryError> {
        self.ids
            .get_or_try_init(|| async {
                register_all(&self.client, &self.subjects)
                    .await
                    .map(Arc::new)
            })
            .await
            .cloned()
    }
}

async fn register_all(
    client: &RegistryClient,
    subjects: &Subjects,
) -> Result<SchemaIds, RegistryError> {
    let mut ids = SchemaIds::default();
    for (subject, record) in subjects {
        // For the log only: a registry that will not tell (a 403 on the
        // global config, an odd reply) must not stop registration.
        let level = match client.compatibility(subject).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(subject = %subject, error = %e, "schema registry compatibility level unknown");
                "unknown".to_string()
            }
        };
        if level.eq_ignore_ascii_case("NONE") {
            tracing::warn!(subject = %subject, registry = %client.url(), "schema registry compatibility level is NONE: the registry will not stop an incompatible schema from reaching consumers");
        }
        let mut versions: Vec<_> = codec::schemas()
            .iter()
            .filter(|s| s.name == *record)
            .collect();
        versions.sort_by_key(|s| s.version);
        for s in versions {
            // Registered before (by this build, an older or a newer one):
            // its id, without checking it again against later versions.
            let id = match client.lookup(subject, s.text).await? {
                Some(id) => id,
                None => {
                    if let Some(reasons) = client.incompatibility(subject, s.text).await? {
                        return Err(RegistryError::Incompatible {
                            url: client.url().to_string(),
                            subject: subject.clone(),
                            schema: format!("{} v{}", s.name, s.version),
                            reasons: format!("{reasons} (compatibility level {level})"),
                        });
                    }
                    client.register(subject, s.text).await?
                }
            };
            tracing::info!(subject = %subject, schema = %s.name, version = s.version, id, compatibility = %level, "schema registered");
            ids.0.insert(s.fingerprint, id);
            ids.0.insert(s.legacy_fingerprint, id);
        }
    }
    Ok(ids)
}

/// Waits for the ids, retrying what retrying can fix with a backoff
/// (200 ms doubling to 5 s) and telling `not_ready` why each try failed;
/// `Ok(None)` when shut down first, `Err` for a refusal.
pub async fn await_ids(
    registrar: &Registrar,
    shutdown: &mut tokio::sync::broadcast::Receiver<()>,
    not_ready: impl Fn(&RegistryError),
) -> Result<Option<Arc<SchemaIds>>, RegistryError> {
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        let r = tokio::select! {
            _ = shutdown.recv() => return Ok(None),
            r = registrar.ids() => r,
        };
        match r {
            Ok(ids) => return Ok(Some(ids)),
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "schema registry not ready; events stay in the journal");
                not_ready(&e);
            }
        }
        tokio::select! {
            _ = shutdown.recv() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::tests::sample;

    #[test]
    fn entries_journaled_with_either_fingerprint_get_the_same_id() {
        let so = codec::encode_event(&sample());
        let w = codec::writer_entry(&so).unwrap();
        let ids = SchemaIds(HashMap::from([
            (w.fingerprint, 7),
            (w.legacy_fingerprint, 7),
        ]));
        let mut legacy = so.clone();
        legacy[2..10].copy_from_slice(&w.legacy_fingerprint.to_le_bytes());
        let a = ids.frame(&so).unwrap();
        assert_eq!(&a[..5], &[0, 0, 0, 0, 7]);
        assert_eq!(a, ids.frame(&legacy).unwrap());
        // A record whose subject was not registered is an error, not a guess.
        let snap = codec::encode_domain_snapshot(&codec::tests::sample_snapshot());
        let e = ids.frame(&snap).unwrap_err().to_string();
        assert!(e.contains("DomainSnapshot v1"), "{e}");
        // Such an entry, or one whose schema this build does not ship, is
        // kept (the sink stops), never skipped; a tombstone has no body.
        let entry = |kind, payload: Vec<u8>| Entry {
            host_seq: 42,
            kind,
            key: "k".into(),
            observed_at: 0,
            payload,
        };
        assert!(ids
            .unframable(&entry(Kind::DomainEvent, so.clone()))
            .is_none());
        let mut foreign = so.clone();
        foreign[2..10].copy_from_slice(&0x1234_u64.to_le_bytes());
        let e = ids.unframable(&entry(Kind::DomainEvent, foreign)).unwrap();
        assert!(
            e.is_fatal() && e.to_string().contains("journal entry 42"),
            "{e}"
        );
        assert!(ids.unframable(&entry(Kind::DomainSnapshot, snap)).is_some());
        assert!(ids
            .unframable(&entry(Kind::DomainTombstone, Vec::new()))
            .is_none());
    }
}
