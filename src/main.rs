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
        #[arg(long, conflicts_with = "from_stream_seq")]
        since: Option<String>,
        /// Start at this JetStream stream sequence.
        #[arg(long)]
        from_stream_seq: Option<u64>,
        /// Only this domain's messages.
        #[arg(long)]
        domain: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Bus {
    Nats,
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
            bus: Bus::Nats,
            since,
            from_stream_seq,
            domain,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Some(ncfg) = cfg.nats.clone() else {
                eprintln!(
                    "virtstream: config key `nats`: replay --bus nats needs a [nats] section"
                );
                return ExitCode::from(EX_USAGE);
            };
            let from = match (since, from_stream_seq) {
                (Some(s), _) => match time::OffsetDateTime::parse(
                    &s,
                    &time::format_description::well_known::Rfc3339,
                ) {
                    Ok(t) => replay::From::Time(t),
                    Err(e) => {
                        eprintln!("virtstream: --since `{s}` is not an RFC 3339 time: {e}");
                        return ExitCode::from(EX_USAGE);
                    }
                },
                (None, Some(n)) => replay::From::StreamSeq(n),
                (None, None) => replay::From::Start,
            };
            let result = runtime().and_then(|rt| {
                rt.block_on(async {
                    let mut out = std::io::BufWriter::new(std::io::stdout());
                    replay::replay_nats(&ncfg, from, domain.as_deref(), &mut out).await
                })
                .map_err(anyhow::Error::from)
            });
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
    }
}
