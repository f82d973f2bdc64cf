//! Settings from flags, `CALLGATE_*` environment variables and an optional TOML file.
//!
//! Precedence: flag > environment > file > default. Every value is checked here, before
//! anything binds; a bad one is reported by name and the process exits with 64.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, anyhow};
use callgate_proto::AudioFormat;
use callgate_server::Config;
use serde::Deserialize;
use tracing_subscriber::filter::Targets;

/// `callgate serve` flags. Each also reads the environment variable shown.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Address for phone-system WebSocket connections (both protocols) [default: 0.0.0.0:4143]
    #[arg(long, env = "CALLGATE_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// Address for the admin HTTP API [default: 127.0.0.1:4144]
    #[arg(long, env = "CALLGATE_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<String>,
    /// The agent that handles calls: echo [default: echo]
    #[arg(long, env = "CALLGATE_AGENT", value_name = "NAME")]
    agent: Option<String>,
    /// Directory for the database [default: ./data]
    #[arg(long, env = "CALLGATE_DATA_DIR", value_name = "DIR")]
    data_dir: Option<String>,
    /// TOML configuration file (unknown keys are an error)
    #[arg(long, env = "CALLGATE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Most live calls; more are refused with close code 1013 [default: 1000]
    #[arg(long, env = "CALLGATE_MAX_CALLS", value_name = "N")]
    max_calls: Option<String>,
    /// Time allowed for the WebSocket upgrade and the first message [default: 5s]
    #[arg(long, env = "CALLGATE_HANDSHAKE_TIMEOUT", value_name = "DURATION")]
    handshake_timeout: Option<String>,
    /// How long an inbound call waits for the CDR after hangup [default: 10s]
    #[arg(long, env = "CALLGATE_CDR_TIMEOUT", value_name = "DURATION")]
    cdr_timeout: Option<String>,
    /// Largest WebSocket message in bytes; larger closes with 1009 [default: 1048576]
    #[arg(long, env = "CALLGATE_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    max_message_size: Option<String>,
    /// Time allowed for one write to a phone system [default: 5s]
    #[arg(long, env = "CALLGATE_WRITE_TIMEOUT", value_name = "DURATION")]
    write_timeout: Option<String>,
    /// How long shutdown waits for live calls [default: 15s]
    #[arg(long, env = "CALLGATE_SHUTDOWN_GRACE", value_name = "DURATION")]
    shutdown_grace: Option<String>,
    /// Audio format of inbound-protocol calls [default: PCM_8000]
    #[arg(long, env = "CALLGATE_INBOUND_AUDIO_FORMAT", value_name = "FORMAT")]
    inbound_audio_format: Option<String>,
    /// How often live calls write their counters to the store [default: 5s]
    #[arg(long, env = "CALLGATE_PROGRESS_INTERVAL", value_name = "DURATION")]
    progress_interval: Option<String>,
    /// Log phone numbers in clear (they are redacted by default)
    #[arg(long, env = "CALLGATE_LOG_PII", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    log_pii: Option<String>,
    /// Log filter, e.g. `info` or `info,callgate_server=debug` [default: info]
    #[arg(long, env = "CALLGATE_LOG", value_name = "FILTER")]
    log: Option<String>,
}

/// The TOML file: the same settings, snake_case, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    agent: Option<String>,
    data_dir: Option<String>,
    max_calls: Option<u64>,
    handshake_timeout: Option<String>,
    cdr_timeout: Option<String>,
    max_message_size: Option<u64>,
    write_timeout: Option<String>,
    shutdown_grace: Option<String>,
    inbound_audio_format: Option<String>,
    progress_interval: Option<String>,
    log_pii: Option<bool>,
    log: Option<String>,
}

/// Everything `serve` needs, validated.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) server: Config,
    pub(crate) log_filter: Targets,
}

/// A flag/env value if given, else the file's, as text for one parser.
fn pick(flag: Option<String>, file: Option<String>) -> Option<String> {
    flag.or(file)
}

fn parse<T: FromStr>(key: &str, value: &str) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    value
        .parse::<T>()
        .map_err(|e| anyhow!("invalid {key} {value:?}: {e}"))
}

fn duration(key: &str, value: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(value)
        .map_err(|e| anyhow!("invalid {key} {value:?}: {e} (write e.g. \"5s\" or \"250ms\")"))
}

impl Settings {
    pub(crate) fn load(args: ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let mut c = Config::default();
        if let Some(v) = pick(args.listen, file.listen) {
            c.listen = parse::<SocketAddr>("listen", &v)?;
        }
        if let Some(v) = pick(args.admin_listen, file.admin_listen) {
            c.admin_listen = parse::<SocketAddr>("admin_listen", &v)?;
        }
        if let Some(v) = pick(args.agent, file.agent) {
            c.agent = v;
        }
        if let Some(v) = pick(args.data_dir, file.data_dir) {
            if v.is_empty() {
                return Err(anyhow!("invalid data_dir: empty path"));
            }
            c.data_dir = PathBuf::from(v);
        }
        if let Some(v) = pick(args.max_calls, file.max_calls.map(|n| n.to_string())) {
            c.max_calls = parse("max_calls", &v)?;
        }
        if let Some(v) = pick(args.handshake_timeout, file.handshake_timeout) {
            c.handshake_timeout = duration("handshake_timeout", &v)?;
        }
        if let Some(v) = pick(args.cdr_timeout, file.cdr_timeout) {
            c.cdr_timeout = duration("cdr_timeout", &v)?;
        }
        if let Some(v) = pick(
            args.max_message_size,
            file.max_message_size.map(|n| n.to_string()),
        ) {
            c.max_message_size = parse("max_message_size", &v)?;
        }
        if let Some(v) = pick(args.write_timeout, file.write_timeout) {
            c.write_timeout = duration("write_timeout", &v)?;
        }
        if let Some(v) = pick(args.shutdown_grace, file.shutdown_grace) {
            c.shutdown_grace = duration("shutdown_grace", &v)?;
        }
        if let Some(v) = pick(args.inbound_audio_format, file.inbound_audio_format) {
            c.inbound_audio_format = parse::<AudioFormat>("inbound_audio_format", &v)?;
        }
        if let Some(v) = pick(args.progress_interval, file.progress_interval) {
            c.progress_interval = duration("progress_interval", &v)?;
        }
        if let Some(v) = pick(args.log_pii, file.log_pii.map(|b| b.to_string())) {
            c.log_pii = match v.as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => return Err(anyhow!("invalid log_pii {v:?}: expected true or false")),
            };
        }
        let log = pick(args.log, file.log).unwrap_or_else(|| "info".to_owned());
        let log_filter = parse::<Targets>("log", &log)?;
        c.validate()?;
        Ok(Self {
            server: c,
            log_filter,
        })
    }
}
