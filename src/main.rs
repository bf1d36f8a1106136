//! The `virtstream` binary: the agent (`run`) and its tools.
//!
//! Exit codes: 0 success; 1 runtime failure; 64 usage or configuration
//! error (bad flag, unknown key, wrong type, unwritable journal path).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use virtstream::config::{Config, LogFormat};
use virtstream::consumer::replay;

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
        #[arg(long, short, env = "VIRTSTREAM_CONFIG")]
        config: PathBuf,
        #[arg(long, value_enum)]
        bus: Bus,
        /// Start at this time (RFC 3339).
        #[arg(long, conflicts_with_all = ["from_stream_seq", "from_offset"])]
        since: Option<String>,
        /// NATS: start at this JetStream stream sequence.
        #[arg(long, conflicts_with = "from_offset")]
        from_stream_seq: Option<u64>,
        /// Kafka: read one partition from an offset, as PARTITION:OFFSET.
        #[arg(long, value_parser = parse_partition_offset)]
        from_offset: Option<(i32, i64)>,
        /// Only this domain's messages.
        #[arg(long)]
        domain: Option<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Bus {
    Nats,
    Kafka,
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
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|e| {
        eprintln!("virtstream: --since `{s}` is not an RFC 3339 time: {e}");
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::CheckConfig { config } => {
            let cfg = match load_checked(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            print!("{}", cfg.redacted());
            ExitCode::SUCCESS
        }
        Command::Run { config } => {
            virtstream::source::ffi::limit_malloc_arenas();
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
        Command::Replay {
            config,
            bus,
            since,
            from_stream_seq,
            from_offset,
            domain,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let since = match since.as_deref().map(parse_since).transpose() {
                Ok(t) => t,
                Err(code) => return code,
            };
            match bus {
                Bus::Nats => {
                    let Some(ncfg) = cfg.nats.clone() else {
                        eprintln!("virtstream: config key `nats`: replay --bus nats needs a [nats] section");
                        return ExitCode::from(EX_USAGE);
                    };
                    if from_offset.is_some() {
                        eprintln!(
                            "virtstream: --from-offset is for --bus kafka; use --from-stream-seq"
                        );
                        return ExitCode::from(EX_USAGE);
                    }
                    let from = match (since, from_stream_seq) {
                        (Some(t), _) => replay::From::Time(t),
                        (None, Some(n)) => replay::From::StreamSeq(n),
                        (None, None) => replay::From::Start,
                    };
                    replay_exit(runtime().and_then(|rt| {
                        rt.block_on(async {
                            let mut out = std::io::BufWriter::new(std::io::stdout());
                            replay::replay_nats(&ncfg, from, domain.as_deref(), &mut out).await
                        })
                        .map_err(anyhow::Error::from)
                    }))
                }
                Bus::Kafka => {
                    let Some(kcfg) = cfg.kafka.clone() else {
                        eprintln!("virtstream: config key `kafka`: replay --bus kafka needs a [kafka] section");
                        return ExitCode::from(EX_USAGE);
                    };
                    if from_stream_seq.is_some() {
                        eprintln!("virtstream: --from-stream-seq is for --bus nats; use --from-offset PARTITION:OFFSET");
                        return ExitCode::from(EX_USAGE);
                    }
                    let from = match (since, from_offset) {
                        (Some(t), _) => replay::KafkaFrom::Time(t),
                        (None, Some((partition, offset))) => {
                            replay::KafkaFrom::Offset { partition, offset }
                        }
                        (None, None) => replay::KafkaFrom::Start,
                    };
                    let mut out = std::io::BufWriter::new(std::io::stdout());
                    replay_exit(
                        replay::replay_kafka(&kcfg, from, domain.as_deref(), &mut out)
                            .map_err(anyhow::Error::from),
                    )
                }
            }
        }
    }
}
