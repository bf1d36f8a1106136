//! Reading the schema-registry framing: registry ids resolved to shipped
//! schemas, so a registry-framed message decodes like a single-object one.
//!
//! The bus stage learns an id the first time a message carries it
//! (`GET /schemas/ids/{id}`, awaited on NATS, on a runtime of the
//! resolver's own on the Kafka reader's thread) before handing the message
//! on; the record stage then re-frames it without I/O.
//!
//! Invariants:
//! - an id is asked of the registry at most once per read; what came back
//!   (a shipped schema, or why not: an unknown id, a schema not shipped)
//!   is kept for every later message, which is then undecodable, not the
//!   end of the read; only a registry that cannot answer ends the read;
//! - a schema is recognised by the fingerprint of its Parsing Canonical
//!   Form, so the registry's copy may differ in layout and logical types;
//!   a schema this build does not ship is an error naming its id and
//!   fingerprint, never a guess.

use std::collections::HashMap;

use crate::bus::registry::{RegistryClient, RegistryError};
use crate::codec::{self, SchemaEntry};
use crate::config::SchemaRegistryConfig;

/// Registry ids seen in a read, resolved.
pub struct Resolver {
    client: RegistryClient,
    ids: HashMap<u32, Result<&'static SchemaEntry, String>>,
    /// For the blocking (Kafka) reader, made on first use.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("registry", &self.client.url())
            .field("ids", &self.ids.len())
            .finish()
    }
}

impl Resolver {
    pub fn new(cfg: &SchemaRegistryConfig) -> Result<Self, RegistryError> {
        Ok(Resolver {
            client: RegistryClient::new(cfg)?,
            ids: HashMap::new(),
            runtime: None,
        })
    }

    /// The id of a registry-framed payload not resolved yet.
    pub fn unknown(&self, payload: &[u8]) -> Option<u32> {
        codec::confluent_id(payload).filter(|id| !self.ids.contains_key(id))
    }

    /// Asks the registry for `id` and keeps the answer. An id the registry
    /// does not know, or a schema that is not one this build ships, is
    /// kept as the reason its messages are undecodable (the read goes on);
    /// a registry that cannot answer is asked again (three tries, 0.2 s
    /// then 0.4 s apart) before the read fails.
    pub async fn learn(&mut self, id: u32) -> Result<(), RegistryError> {
        let mut delay = std::time::Duration::from_millis(200);
        let mut tries = 0;
        let answer = loop {
            tries += 1;
            match self.client.schema(id).await {
                Err(e)
                    if matches!(
                        e,
                        RegistryError::Unreachable { .. } | RegistryError::Refused { .. }
                    ) && !e.is_fatal()
                        && tries < 3 =>
                {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                other => break other,
            }
        };
        let entry = match answer {
            Ok(text) => codec::by_schema_text(&text).map_err(|e| {
                format!(
                    "schema registry id {id} at {} is not a schema this build ships ({e})",
                    self.client.url()
                )
            }),
            // The registry's own answer about this id (unknown, not Avro).
            Err(RegistryError::BadReply { detail, .. }) => Err(format!(
                "schema registry id {id} at {}: {detail}",
                self.client.url()
            )),
            Err(e) => return Err(e),
        };
        self.ids.insert(id, entry);
        Ok(())
    }

    /// [`Resolver::learn`] from a thread that is not running async code.
    pub fn learn_blocking(&mut self, id: u32) -> Result<(), RegistryError> {
        if self.runtime.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| RegistryError::Config(format!("async runtime: {e}")))?;
            self.runtime = Some(rt);
        }
        let rt = self.runtime.take().expect("made above");
        let r = rt.block_on(self.learn(id));
        self.runtime = Some(rt);
        r
    }

    /// A registry-framed payload as the single-object message every
    /// decoder reads; the error says why it cannot be.
    pub fn single_object(&self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let id = codec::confluent_id(payload).ok_or("not registry-framed")?;
        match self.ids.get(&id) {
            Some(Ok(entry)) => {
                codec::single_object_from_confluent(payload, entry).map_err(|e| e.to_string())
            }
            Some(Err(why)) => Err(why.clone()),
            None => Err(format!(
                "schema registry id {id} could not be resolved at {}",
                self.client.url()
            )),
        }
    }
}
