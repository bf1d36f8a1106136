//! The sinks a configuration names, built and run alike, so the agent
//! starts them in one loop.
//!
//! Invariants:
//! - sinks come in one fixed order (NATS, then Kafka, then the actions in
//!   configuration order): the order of their cursors in the journal and
//!   the order they are started in;
//! - a sink's name is its journal cursor's and its metrics label; an
//!   action's is `action:<name>`, made once per process.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use super::actions::{self, ActionError, ActionSink};
use super::kafka::service::KafkaSink;
use super::kafka::KafkaSinkError;
use super::nats::encoding::EncodingContext;
use super::nats::service::NatsSink;
use super::nats::NatsError;
use super::registry::Registrar;
use crate::bus::registry::{RegistryClient, RegistryError};
use crate::config::{Config, RegistrySink, SchemaRegistryConfig, Subjects};
use crate::journal::Journal;
use crate::telemetry::{Health, Metrics};

/// A sink that failed in a way retrying cannot fix (or NATS could not be
/// connected to at start).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Kafka(#[from] KafkaSinkError),
    #[error(transparent)]
    Action(#[from] ActionError),
}

/// A kind of sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    Nats,
    Kafka,
    /// `actions[index]`, with its sink name.
    Action(&'static str, usize),
}

/// What every sink is built with.
pub struct SinkContext {
    pub host_id: String,
    pub epoch: String,
    /// The journal's head when it was opened (this epoch).
    pub host_seq: u64,
    pub journal: Journal,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
}

impl SinkKind {
    /// The sinks `cfg` configures, in order.
    pub fn configured(cfg: &Config) -> Vec<SinkKind> {
        let mut kinds = Vec::new();
        if cfg.nats.is_some() {
            kinds.push(SinkKind::Nats);
        }
        if cfg.kafka.is_some() {
            kinds.push(SinkKind::Kafka);
        }
        for (i, a) in cfg.actions.iter().enumerate() {
            // Leaked once per configured action: names live as long as
            // the process, like the other sinks' constants.
            let name: &'static str = Box::leak(actions::sink_name(&a.name).into_boxed_str());
            kinds.push(SinkKind::Action(name, i));
        }
        kinds
    }

    /// The sink's name in the journal's cursor table and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Nats => super::nats::service::SINK_NAME,
            SinkKind::Kafka => super::kafka::service::SINK_NAME,
            SinkKind::Action(name, _) => name,
        }
    }

    /// Builds the sink (a NATS sink connects its client); `None` when
    /// `cfg` does not configure it.
    pub async fn build(self, cfg: &Config, ctx: &SinkContext) -> Result<Option<Sink>, SinkError> {
        let client_name = format!("virtstream-{}", ctx.host_id);
        Ok(match self {
            SinkKind::Nats => match &cfg.nats {
                None => None,
                Some(ncfg) => {
                    let client = crate::bus::nats::connect(ncfg, &client_name)
                        .await
                        .map_err(super::nats::NatsError::from)?;
                    Some(Sink::Nats(NatsSink {
                        cfg: ncfg.clone(),
                        client,
                        journal: ctx.journal.clone(),
                        encoding: Arc::new(EncodingContext::new(&ctx.host_id, &ctx.epoch, ncfg)),
                        health: ctx.health.clone(),
                        metrics: ctx.metrics.clone(),
                        observer: None,
                        registry: registrar(cfg, |r| r.nats_subjects(ncfg), RegistrySink::Nats)
                            .map_err(NatsError::from)?,
                    }))
                }
            },
            SinkKind::Kafka => match &cfg.kafka {
                None => None,
                Some(kcfg) => Some(Sink::Kafka(KafkaSink {
                    cfg: kcfg.clone(),
                    client_id: client_name,
                    host_id: ctx.host_id.clone(),
                    epoch: ctx.epoch.clone(),
                    journal: ctx.journal.clone(),
                    health: ctx.health.clone(),
                    metrics: ctx.metrics.clone(),
                    observer: None,
                    sent_upto: Arc::new(AtomicU64::new(ctx.host_seq)),
                    registry: registrar(cfg, |r| r.kafka_subjects(kcfg), RegistrySink::Kafka)
                        .map_err(KafkaSinkError::from)?,
                })),
            },
            SinkKind::Action(name, i) => match cfg.actions.get(i) {
                None => None,
                Some(a) => Some(Sink::Action(ActionSink::new(
                    i,
                    a,
                    name,
                    ctx.journal.clone(),
                    &cfg.journal.path,
                    ctx.health.clone(),
                    ctx.metrics.clone(),
                )?)),
            },
        })
    }
}

/// The registrar of a sink that publishes in schema-registry framing.
fn registrar(
    cfg: &Config,
    subjects: impl FnOnce(&SchemaRegistryConfig) -> Subjects,
    sink: RegistrySink,
) -> Result<Option<Arc<Registrar>>, RegistryError> {
    match &cfg.schema_registry {
        Some(r) if r.applies_to(sink) => Ok(Some(Arc::new(Registrar::new(
            RegistryClient::new(r)?,
            subjects(r),
        )))),
        _ => Ok(None),
    }
}

/// A built sink.
pub enum Sink {
    Nats(NatsSink),
    Kafka(KafkaSink),
    Action(ActionSink),
}

impl Sink {
    /// Runs until shutdown (then drains within `drain_deadline`); returns
    /// `Err` only for errors retrying cannot fix.
    pub async fn run(
        self,
        shutdown: broadcast::Receiver<()>,
        drain_deadline: Duration,
    ) -> Result<(), SinkError> {
        match self {
            Sink::Nats(s) => Ok(s.run(shutdown, drain_deadline).await?),
            Sink::Kafka(s) => Ok(s.run(shutdown, drain_deadline).await?),
            Sink::Action(s) => Ok(s.run(shutdown, drain_deadline).await?),
        }
    }
}
