//! virtstream: libvirt domain lifecycle events as schema-versioned,
//! sequence-numbered messages on NATS JetStream (and Kafka), with the tools
//! to rebuild fleet state from them.
//!
//! Data flow, one module per stage:
//! `source` (libvirt) → `tracker` → `journal` → `sinks` (NATS, Kafka) on
//! the agent's side; `bus` → `consumer` (lanes → feed → report) on the
//! reading side, `bus` being how both sides reach NATS and Kafka;
//! `codec` and `model` define the messages;
//! `config` and `telemetry` serve the operator; `agent` wires it together;
//! `clock` is a small helper every stage may use.
//!
//! `unsafe` is denied here and allowed in one module only,
//! `source::ffi`, where libvirt's and glibc's C calls live.

#![deny(unsafe_code)]

pub mod agent;
pub mod bus;
pub mod clock;
pub mod codec;
pub mod config;
pub mod consumer;
pub mod epoch;
pub mod journal;
pub mod model;
pub mod sinks;
pub mod source;
pub mod telemetry;
pub mod tracker;
