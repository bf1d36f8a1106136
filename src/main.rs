//! The `virtstream` binary: the agent (`run`) and its tools. Here are
//! only the command line and the wiring: the tools run in
//! `consumer` and their outputs are rendered by `consumer::report`; this
//! file writes them out and picks the exit code.
//!
//! Exit codes: 0 success; 1 runtime failure; 64 usage or configuration
//! error (bad flag, unknown key, wrong type, unwritable journal path).

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use virtstream::clock::now_micros;
use virtstream::config::{Config, LogFormat};
use virtstream::consumer::bus::StartAt;
use virtstream::consumer::{self, replay, report, BusKind};

const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "virtstream",
    version,
    about = "libvirt domain events → NATS JetStream / Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long, short, env = "VIRTSTREAM_CONFIG")]
        config: PathBuf,
    },
    /// Validate the configuration and print it (secrets redacted).
    CheckConfig {
        #[arg(long, short, env = "VIRTSTREAM_CONFIG")]
        config: PathBuf,
    },
    /// Decode messages from a bus as JSON lines.
    Replay {
        #[command(flatten)]
        target: BusArgs,
        #[command(flatten)]
        start: StartArgs,
        /// Only this domain's messages.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Rebuild the state of every domain on every host from the bus.
    State {
        #[command(flatten)]
        target: BusArgs,
        #[command(flatten)]
        silence: SilenceArgs,
        #[arg(long, value_enum, default_value = "json")]
        format: StateFormat,
    },
    /// Check continuity per host and domain; exit 1 when anything is wrong.
    Audit {
        #[command(flatten)]
        target: BusArgs,
        #[command(flatten)]
        silence: SilenceArgs,
        #[command(flatten)]
        start: StartArgs,
        #[arg(long, value_enum, default_value = "text")]
        format: AuditFormat,
    },
    /// Running/paused seconds, vCPU·s and GiB·s per domain and host.
    Usage {
        #[command(flatten)]
        target: BusArgs,
        #[command(flatten)]
        silence: SilenceArgs,
        /// Window start (RFC 3339).
        #[arg(long)]
        from: String,
        /// Window end (RFC 3339).
        #[arg(long)]
        to: String,
        #[arg(long, value_enum, default_value = "json")]
        format: UsageFormat,
        /// Also publish the CloudEvents (needs --format cloudevents) to
        /// the bus read (--bus): Kafka topic `usage.kafka_topic`, or
        /// JetStream stream `usage.nats_stream`; exit 1 unless the broker
        /// acknowledged every one.
        #[arg(long)]
        publish: bool,
    },
    /// libvirt hook script entry: `virtstream hook qemu GUEST OPERATION
    /// SUBOPERATION EXTRA` with the domain XML on stdin. Hands the call to
    /// the agent (or its spool) and always exits 0; never calls libvirt.
    /// `virtstream-hook` does the same with a faster start.
    Hook(virtstream::source::hooks::cli::HookArgs),
}

/// The config file and the bus a tool reads.
#[derive(clap::Args)]
struct BusArgs {
    #[arg(long, short, env = "VIRTSTREAM_CONFIG")]
    config: PathBuf,
    #[arg(long, value_enum)]
    bus: Bus,
}

/// When a host counts as silent (`state`, `audit`, `usage`).
#[derive(clap::Args)]
struct SilenceArgs {
    /// A host with no heartbeat for this many `snapshot.heartbeat`
    /// periods is silent: its domains are stale and its time from then on
    /// is unknown, never billed.
    #[arg(long, default_value_t = consumer::liveness::DEFAULT_SILENT_AFTER_HEARTBEATS, value_parser = clap::value_parser!(u32).range(1..))]
    silent_after_heartbeats: u32,
}

/// Where a tool starts reading the events.
#[derive(clap::Args)]
struct StartArgs {
    /// Start at this time (RFC 3339).
    #[arg(long, conflicts_with_all = ["from_stream_seq", "from_offset"])]
    since: Option<String>,
    /// NATS: start at this JetStream stream sequence.
    #[arg(long, conflicts_with = "from_offset")]
    from_stream_seq: Option<u64>,
    /// Kafka: read a partition from an offset, as PARTITION:OFFSET
    /// (audit: repeatable; other partitions are not read).
    #[arg(long, value_parser = parse_partition_offset)]
    from_offset: Vec<(i32, i64)>,
}

impl StartArgs {
    /// The start point for `bus`; usage errors are reported here.
    fn resolve(&self, bus: Bus) -> Result<StartAt, ExitCode> {
        let usage = |msg: &str| {
            eprintln!("virtstream: {msg}");
            ExitCode::from(EX_USAGE)
        };
        if let Some(t) = &self.since {
            return parse_since(t).map(StartAt::Time);
        }
        match (bus, self.from_stream_seq, self.from_offset.is_empty()) {
            (Bus::Nats, Some(n), _) => Ok(StartAt::StreamSeq(n)),
            (Bus::Nats, None, false) => Err(usage(
                "--from-offset is for --bus kafka; use --from-stream-seq",
            )),
            (Bus::Kafka, Some(_), _) => Err(usage(
                "--from-stream-seq is for --bus nats; use --from-offset PARTITION:OFFSET",
            )),
            (Bus::Kafka, None, false) => Ok(StartAt::Offsets(self.from_offset.clone())),
            (_, None, true) => Ok(StartAt::Start),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StateFormat {
    Json,
    Table,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuditFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum UsageFormat {
    Json,
    Csv,
    /// One CloudEvent (structured JSON) per line, for metering systems.
    Cloudevents,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Bus {
    Nats,
    Kafka,
}

impl std::convert::From<Bus> for BusKind {
    fn from(b: Bus) -> Self {
        match b {
            Bus::Nats => BusKind::Nats,
            Bus::Kafka => BusKind::Kafka,
        }
    }
}

fn parse_partition_offset(s: &str) -> Result<(i32, i64), String> {
    let bad = || format!("`{s}` is not PARTITION:OFFSET (e.g. 3:1500)");
    let (p, o) = s.split_once(':').ok_or_else(bad)?;
    let p: i32 = p.parse().map_err(|_| bad())?;
    let o: i64 = o.parse().map_err(|_| bad())?;
    if p < 0 || o < 0 {
        return Err(bad());
    }
    Ok((p, o))
}

fn parse_since(s: &str) -> Result<time::OffsetDateTime, ExitCode> {
    parse_time("--since", s)
}

fn parse_time(flag: &str, s: &str) -> Result<time::OffsetDateTime, ExitCode> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|e| {
        eprintln!("virtstream: {flag} `{s}` is not an RFC 3339 time: {e}");
        ExitCode::from(EX_USAGE)
    })
}

/// Exit status of a replay: 1 when any message could not be decoded.
fn replay_exit(result: anyhow::Result<replay::ReplayStats>) -> ExitCode {
    match result {
        Ok(stats) if stats.undecodable == 0 => ExitCode::SUCCESS,
        Ok(stats) => {
            eprintln!(
                "virtstream: {} message(s) could not be decoded",
                stats.undecodable
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("virtstream: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path, std::env::vars()).map_err(|e| {
        eprintln!("virtstream: {e}");
        ExitCode::from(EX_USAGE)
    })
}

/// Loads the config and checks the journal directory (both usage errors).
fn load_checked(path: &std::path::Path) -> Result<Config, ExitCode> {
    let cfg = load(path)?;
    cfg.check_journal_writable().map_err(|e| {
        eprintln!("virtstream: {e}");
        ExitCode::from(EX_USAGE)
    })?;
    Ok(cfg)
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIRTSTREAM_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

/// One thread is enough for the async side (sinks, HTTP, NATS client):
/// libvirt, the tracker and the journal writer have threads of their own.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// Diagnostics on stderr, each as `virtstream: <line>`.
fn diagnose(lines: Vec<String>) {
    for line in lines {
        eprintln!("virtstream: {line}");
    }
}

fn tool_failed(e: consumer::ConsumerError) -> ExitCode {
    eprintln!("virtstream: {e}");
    match e {
        consumer::ConsumerError::MissingSection(_) => ExitCode::from(EX_USAGE),
        _ => ExitCode::FAILURE,
    }
}

fn write_out(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtstream: writing output: {e}");
            ExitCode::FAILURE
        }
    }
}

fn state_cmd(cfg: &Config, bus: BusKind, silent_after: u32, table: bool) -> ExitCode {
    let (fleet, out) = match consumer::state(cfg, bus, silent_after, now_micros()) {
        Ok(r) => r,
        Err(e) => return tool_failed(e),
    };
    diagnose(report::undecodable(&out));
    let domains = fleet.domains();
    diagnose(report::stale_hosts(&fleet.hosts()));
    diagnose(report::migrations(&domains));
    write_out(&if table {
        report::state_table(&domains)
    } else {
        report::json(&domains)
    })
}

fn audit_cmd(
    cfg: &Config,
    bus: BusKind,
    from: &StartAt,
    silent_after: u32,
    json: bool,
) -> ExitCode {
    let audit = match consumer::audit(cfg, bus, from, silent_after, now_micros()) {
        Ok(r) => r,
        Err(e) => return tool_failed(e),
    };
    let text = if json {
        report::audit_json(&audit)
    } else {
        report::audit_text(&audit)
    };
    match write_out(&text) {
        code if code != ExitCode::SUCCESS => code,
        _ if audit.continuous => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

fn usage_cmd(
    cfg: &Config,
    bus: BusKind,
    (from_us, to_us): (i64, i64),
    silent_after: u32,
    format: UsageFormat,
    publish: bool,
) -> ExitCode {
    if cfg.usage.tenant.is_some() && cfg.libvirt.xml == virtstream::config::XmlMode::Off {
        diagnose(vec![
            "usage.tenant is set but libvirt.xml = \"off\": an agent with this config \
             publishes no domain XML, so its domains have no tenant (subject = domain uuid)"
                .into(),
        ]);
    }
    let (rows, out) = match consumer::usage(cfg, bus, from_us, to_us, silent_after, now_micros()) {
        Ok(r) => r,
        Err(e) => return tool_failed(e),
    };
    diagnose(report::undecodable(&out));
    let tenants = cfg.usage.tenant.is_some();
    let events = report::usage_events(&rows, from_us, to_us, tenants);
    let code = write_out(&match format {
        UsageFormat::Csv => report::usage_csv(&rows),
        UsageFormat::Json => report::json(&rows),
        UsageFormat::Cloudevents => report::usage_cloudevents(&events),
    });
    if !publish || code != ExitCode::SUCCESS {
        return code;
    }
    match consumer::publish::publish(cfg, bus, &events) {
        Ok(p) => {
            let dup = match p.duplicates {
                0 => String::new(),
                n => format!(" ({n} already stored: same id within the duplicate window)"),
            };
            diagnose(vec![format!(
                "published {} usage event(s) to {}{dup}",
                p.acked, p.target
            )]);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("virtstream: usage --publish: {e}");
            match e {
                consumer::publish::PublishError::MissingSection(_) => ExitCode::from(EX_USAGE),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // The hook never fails libvirt's operation, not even on bad
            // arguments.
            let hook = std::env::args().nth(1).as_deref() == Some("hook");
            let code = if e.use_stderr() && !hook { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Hook(hook) => {
            hook.forward();
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => {
            let cfg = match load_checked(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            print!("{}", cfg.redacted());
            ExitCode::SUCCESS
        }
        Command::Run { config } => {
            virtstream::source::heap::limit_arenas();
            let cfg = match load_checked(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(&cfg);
            let result = runtime().and_then(|rt| {
                rt.block_on(virtstream::agent::run(cfg))
                    .map_err(anyhow::Error::from)
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "agent failed");
                    eprintln!("virtstream: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::State {
            target,
            silence,
            format,
        } => match load(&target.config) {
            Ok(cfg) => state_cmd(
                &cfg,
                target.bus.into(),
                silence.silent_after_heartbeats,
                format == StateFormat::Table,
            ),
            Err(code) => code,
        },
        Command::Audit {
            target,
            silence,
            start,
            format,
        } => {
            let (cfg, from) = match (load(&target.config), start.resolve(target.bus)) {
                (Ok(c), Ok(f)) => (c, f),
                (Err(code), _) | (_, Err(code)) => return code,
            };
            audit_cmd(
                &cfg,
                target.bus.into(),
                &from,
                silence.silent_after_heartbeats,
                format == AuditFormat::Json,
            )
        }
        Command::Usage {
            target,
            silence,
            from,
            to,
            format,
            publish,
        } => {
            if publish && format != UsageFormat::Cloudevents {
                eprintln!(
                    "virtstream: --publish publishes the usage CloudEvents: it needs --format cloudevents"
                );
                return ExitCode::from(EX_USAGE);
            }
            let cfg = match load(&target.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let (from, to) = match (parse_time("--from", &from), parse_time("--to", &to)) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(code), _) | (_, Err(code)) => return code,
            };
            if to <= from {
                eprintln!("virtstream: --to must be after --from");
                return ExitCode::from(EX_USAGE);
            }
            let us = |t: time::OffsetDateTime| (t.unix_timestamp_nanos() / 1000) as i64;
            usage_cmd(
                &cfg,
                target.bus.into(),
                (us(from), us(to)),
                silence.silent_after_heartbeats,
                format,
                publish,
            )
        }
        Command::Replay {
            target,
            start,
            domain,
        } => {
            let (cfg, from) = match (load(&target.config), start.resolve(target.bus)) {
                (Ok(c), Ok(f)) => (c, f),
                (Err(code), _) | (_, Err(code)) => return code,
            };
            let from = match (target.bus, from) {
                (Bus::Nats, _) if cfg.nats.is_none() => {
                    eprintln!(
                        "virtstream: config key `nats`: replay --bus nats needs a [nats] section"
                    );
                    return ExitCode::from(EX_USAGE);
                }
                (Bus::Kafka, _) if cfg.kafka.is_none() => {
                    eprintln!("virtstream: config key `kafka`: replay --bus kafka needs a [kafka] section");
                    return ExitCode::from(EX_USAGE);
                }
                (Bus::Kafka, StartAt::Offsets(o)) if o.len() > 1 => {
                    eprintln!("virtstream: replay reads one partition from an offset; give --from-offset once");
                    return ExitCode::from(EX_USAGE);
                }
                (_, from) => from,
            };
            let mut out = std::io::BufWriter::new(std::io::stdout());
            replay_exit(
                consumer::replay(&cfg, target.bus.into(), &from, domain.as_deref(), &mut out)
                    .map_err(anyhow::Error::from),
            )
        }
    }
}
