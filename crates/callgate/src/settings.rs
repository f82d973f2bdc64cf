//! Settings from flags, `CALLGATE_*` environment variables and an optional TOML file.
//!
//! Precedence: flag > environment > file > default. Every value is checked here, before
//! anything binds; a bad one is reported by name and the process exits with 64.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, anyhow};
use callgate_audio::playout::Underrun;
use callgate_audio::vad::VadConfig;
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
    /// Audio queued ahead for the caller at most (agents wait beyond it) [default: 2s]
    #[arg(long, env = "CALLGATE_PLAYOUT_LEAD", value_name = "DURATION")]
    playout_lead: Option<String>,
    /// When the playout runs dry: nothing or silence [default: nothing]
    #[arg(long, env = "CALLGATE_PLAYOUT_UNDERRUN", value_name = "POLICY")]
    playout_underrun: Option<String>,
    /// Voice activity detection on caller audio (speech events, barge-in) [default: false]
    #[arg(long, env = "CALLGATE_VAD", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    vad: Option<String>,
    /// VAD score (0..1) that counts as speech [default: 0.5]
    #[arg(long, env = "CALLGATE_VAD_THRESHOLD", value_name = "SCORE")]
    vad_threshold: Option<String>,
    /// Speech this long before it counts as started [default: 64ms]
    #[arg(long, env = "CALLGATE_VAD_START", value_name = "DURATION")]
    vad_start: Option<String>,
    /// Silence this long before speech counts as stopped [default: 400ms]
    #[arg(long, env = "CALLGATE_VAD_STOP", value_name = "DURATION")]
    vad_stop: Option<String>,
    /// Clear the agent's audio when the caller speaks over it (with --vad) [default: true]
    #[arg(long, env = "CALLGATE_BARGE_IN", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    barge_in: Option<String>,
    /// Detect DTMF tones in caller audio [default: false]
    #[arg(long, env = "CALLGATE_INBAND_DTMF", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    inband_dtmf: Option<String>,
    /// Record every call to DIR/recordings/ID.wav (stereo: caller left, agent right) [default: false]
    #[arg(long, env = "CALLGATE_RECORD", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    record: Option<String>,
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
    playout_lead: Option<String>,
    playout_underrun: Option<String>,
    vad: Option<bool>,
    vad_threshold: Option<f64>,
    vad_start: Option<String>,
    vad_stop: Option<String>,
    barge_in: Option<bool>,
    inband_dtmf: Option<bool>,
    record: Option<bool>,
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

fn boolean(key: &str, value: &str) -> anyhow::Result<bool> {
    match value {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(anyhow!("invalid {key} {value:?}: expected true or false")),
    }
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
        let flag = |v: Option<String>, f: Option<bool>| pick(v, f.map(|b| b.to_string()));
        if let Some(v) = flag(args.log_pii, file.log_pii) {
            c.log_pii = boolean("log_pii", &v)?;
        }
        if let Some(v) = pick(args.playout_lead, file.playout_lead) {
            c.playout_lead = duration("playout_lead", &v)?;
        }
        if let Some(v) = pick(args.playout_underrun, file.playout_underrun) {
            c.playout_underrun = match v.as_str() {
                "nothing" => Underrun::Nothing,
                "silence" => Underrun::Silence,
                _ => {
                    return Err(anyhow!(
                        "invalid playout_underrun {v:?}: expected nothing or silence"
                    ));
                }
            };
        }
        let vad_on = match flag(args.vad, file.vad) {
            Some(v) => boolean("vad", &v)?,
            None => false,
        };
        let mut vad = VadConfig::default();
        if let Some(v) = pick(
            args.vad_threshold,
            file.vad_threshold.map(|n| n.to_string()),
        ) {
            vad.threshold = parse("vad_threshold", &v)?;
        }
        let frames = |key: &str, d: Duration| -> anyhow::Result<u32> {
            let n = (d.as_millis() / 16) as u32;
            if n == 0 {
                return Err(anyhow!("invalid {key}: must be at least 16ms"));
            }
            Ok(n)
        };
        if let Some(v) = pick(args.vad_start, file.vad_start) {
            vad.start_frames = frames("vad_start", duration("vad_start", &v)?)?;
        }
        if let Some(v) = pick(args.vad_stop, file.vad_stop) {
            vad.stop_frames = frames("vad_stop", duration("vad_stop", &v)?)?;
        }
        c.vad = vad_on.then_some(vad);
        if let Some(v) = flag(args.barge_in, file.barge_in) {
            c.barge_in = boolean("barge_in", &v)?;
        }
        if let Some(v) = flag(args.inband_dtmf, file.inband_dtmf) {
            c.inband_dtmf = boolean("inband_dtmf", &v)?;
        }
        if let Some(v) = flag(args.record, file.record) {
            c.record = boolean("record", &v)?;
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
