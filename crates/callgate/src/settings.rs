//! Settings from flags, `CALLGATE_*` environment variables and an optional TOML file.
//!
//! [`Settings`] is the one definition of every setting: each field is a flag and an
//! environment variable (clap) and a key of the TOML file (serde), with one typed parser per
//! kind of value ([`FromText`]) used by both. Precedence: flag > environment (clap) > file
//! ([`Settings::or`]) > default ([`Config::default`]). Everything is checked here, routes and
//! their agents included, before anything binds; a bad value is reported by name and the
//! process exits with 64.

use std::ffi::OsStr;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use callgate_agent::Catalog;
use callgate_audio::playout::Underrun;
use callgate_audio::vad::VadConfig;
use callgate_proto::AudioFormat;
use callgate_server::auth::{AdminAuth, ClusterSecret, Role, Secret, Token};
use callgate_server::call_auth::{CallAuth, CallKey, Net, TwilioToken};
use callgate_server::routes::{RouteSpec, parse_spec};
use callgate_server::{Config, RouteTable};
use serde::{Deserialize, Deserializer};
use tracing_subscriber::filter::Targets;

/// Declares the settings struct and [`Settings::or`], which takes each setting not given on
/// the command line (or in the environment) from the file: the field names are written once.
macro_rules! settings {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$field_meta:meta])* $field:ident: Option<$ty:ty>, )*
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[$field_meta])* $field: Option<$ty>, )*
        }

        impl $name {
            /// These settings, each one not given taken from `file` (flag > env > file).
            pub(crate) fn or(self, file: Self) -> Self {
                Self { $( $field: self.$field.or(file.$field), )* }
            }
        }
    };
}

settings! {
    /// The server's settings (`callgate serve`, `callgate routes`). Each is a flag, a
    /// `CALLGATE_*` environment variable and a key of the `--config` TOML file.
    #[derive(Debug, Clone, Default, PartialEq, clap::Args, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub(crate) struct Settings {
        /// Address for phone-system WebSocket connections (both protocols) [default: 0.0.0.0:4143]
        #[arg(long, env = "CALLGATE_LISTEN", value_name = "ADDR", value_parser = text::<SocketAddr>())]
        #[serde(deserialize_with = "from_text")]
        listen: Option<SocketAddr>,
        /// Address for the admin HTTP API [default: 127.0.0.1:4144]
        #[arg(long, env = "CALLGATE_ADMIN_LISTEN", value_name = "ADDR", value_parser = text::<SocketAddr>())]
        #[serde(deserialize_with = "from_text")]
        admin_listen: Option<SocketAddr>,
        /// The agent that answers every call (one default route; not with `[[routes]]` or --flow): echo, tone or flow [default: flow, the demo menu]
        #[arg(long, env = "CALLGATE_AGENT", value_name = "NAME")]
        agent: Option<String>,
        /// Run this flow file for every call (one default route; not with --agent or `[[routes]]`) [default: the built-in demo menu]
        #[arg(long, env = "CALLGATE_FLOW", value_name = "FILE", value_parser = text::<PathBuf>())]
        #[serde(deserialize_with = "from_text")]
        flow: Option<PathBuf>,
        /// Directory for the database and recordings [default: ./data]
        #[arg(long, env = "CALLGATE_DATA_DIR", value_name = "DIR", value_parser = text::<PathBuf>())]
        #[serde(deserialize_with = "from_text")]
        data_dir: Option<PathBuf>,
        /// Keep call records in PostgreSQL: postgres://user:password@host:port/db?sslmode=disable|require|verify-full [default: none, SQLite in the data directory]
        #[arg(long, env = "CALLGATE_STORE_URL", value_name = "URL")]
        store_url: Option<String>,
        /// This node's name in the cluster, written into every call record it makes: 1-64 of A-Z a-z 0-9 . - _ [default: the host name]
        #[arg(long, env = "CALLGATE_NODE_ID", value_name = "NAME")]
        node_id: Option<String>,
        /// The URL other nodes use to reach this node's admin API, e.g. http://10.0.0.5:4144 [default: from admin_listen; its port with node_id as host when it listens on all addresses]
        #[arg(long, env = "CALLGATE_ADVERTISE_ADMIN", value_name = "URL")]
        advertise_admin: Option<String>,
        /// A node whose heartbeat (every 2s) lapsed this long is dead: another node closes its open records as interrupted; at least 5s [default: 10s]
        #[arg(long, env = "CALLGATE_NODE_TIMEOUT", value_name = "DURATION", value_parser = text::<Duration>())]
        #[serde(deserialize_with = "from_text")]
        node_timeout: Option<Duration>,
        /// The environment variable that holds the cluster secret (32 bytes or more, the same on every node): operator requests for calls held by another node are forwarded to it with this secret (file: `[cluster] token_env`) [default: none, no forwarding]
        #[arg(long, env = "CALLGATE_CLUSTER_TOKEN_ENV", value_name = "VAR")]
        #[serde(skip)]
        cluster_token_env: Option<String>,
        /// The `[cluster]` table of the file: the cluster secret's variable (as --cluster-token-env).
        #[arg(skip)]
        cluster: Option<ClusterFile>,
        /// PEM file of the CA that signed PostgreSQL's certificate (with sslmode=verify-full)
        #[arg(long, env = "CALLGATE_STORE_CA_FILE", value_name = "FILE", value_parser = text::<PathBuf>())]
        #[serde(deserialize_with = "from_text")]
        store_ca_file: Option<PathBuf>,
        /// Delete call records (events, transcripts, recordings) this long after they ended, e.g. `30d` [default: keep them]
        #[arg(long, env = "CALLGATE_RETENTION", value_name = "DURATION", value_parser = text::<Duration>())]
        #[serde(deserialize_with = "from_text")]
        retention: Option<Duration>,
        /// The `[admin]` table of the file (file only): tokens and roles for the admin API.
        #[arg(skip)]
        admin: Option<AdminFile>,
        /// The `[call_auth]` table of the file (file only): who may place calls.
        #[arg(skip)]
        call_auth: Option<CallAuthFile>,
        /// The `[tls]` table of the file: the call port's certificate (as --tls-cert, --tls-key).
        #[arg(skip)]
        tls: Option<TlsFile>,
        /// PEM certificate chain of the call port, which then speaks wss:// (with --tls-key; file: `[tls] cert`) [default: none, plain ws://]
        #[arg(long, env = "CALLGATE_TLS_CERT", value_name = "FILE", value_parser = text::<PathBuf>())]
        #[serde(skip)]
        tls_cert: Option<PathBuf>,
        /// PEM private key of the call port's certificate (file: `[tls] key`)
        #[arg(long, env = "CALLGATE_TLS_KEY", value_name = "FILE", value_parser = text::<PathBuf>())]
        #[serde(skip)]
        tls_key: Option<PathBuf>,
        /// PEM certificate chain of the admin API, which then speaks https:// (with --admin-tls-key; file: `[admin.tls] cert`) [default: none, plain http://]
        #[arg(long, env = "CALLGATE_ADMIN_TLS_CERT", value_name = "FILE", value_parser = text::<PathBuf>())]
        #[serde(skip)]
        admin_tls_cert: Option<PathBuf>,
        /// PEM private key of the admin API's certificate (file: `[admin.tls] key`)
        #[arg(long, env = "CALLGATE_ADMIN_TLS_KEY", value_name = "FILE", value_parser = text::<PathBuf>())]
        #[serde(skip)]
        admin_tls_key: Option<PathBuf>,
        /// TOML configuration file: these settings and `[[routes]]` (unknown keys are an error)
        #[arg(long, env = "CALLGATE_CONFIG", value_name = "FILE")]
        #[serde(skip)]
        config: Option<PathBuf>,
        /// Most live calls; more are refused with close code 1013 [default: 1000]
        #[arg(long, env = "CALLGATE_MAX_CALLS", value_name = "N", value_parser = text::<usize>())]
        max_calls: Option<usize>,
        /// Most connections that are not calls yet (upgrading, before the first message); a new one evicts the oldest [default: 512]
        #[arg(long, env = "CALLGATE_MAX_PENDING", value_name = "N", value_parser = text::<usize>())]
        max_pending: Option<usize>,
        /// Most connections that are not calls yet from one address (IPv6: one /64); more are turned away [default: 128]
        #[arg(long, env = "CALLGATE_MAX_PENDING_PER_IP", value_name = "N", value_parser = text::<usize>())]
        max_pending_per_ip: Option<usize>,
        /// Time allowed for the WebSocket upgrade and the first message [default: 5s]
        #[arg(long, env = "CALLGATE_HANDSHAKE_TIMEOUT", value_name = "DURATION", value_parser = text::<Duration>())]
        #[serde(deserialize_with = "from_text")]
        handshake_timeout: Option<Duration>,
        /// How long an inbound call waits for the CDR after hangup [default: 10s]
        #[arg(long, env = "CALLGATE_CDR_TIMEOUT", value_name = "DURATION", value_parser = text::<Duration>())]
        #[serde(deserialize_with = "from_text")]
        cdr_timeout: Option<Duration>,
        /// Largest WebSocket message in bytes; larger closes with 1009 [default: 1048576]
        #[arg(long, env = "CALLGATE_MAX_MESSAGE_SIZE", value_name = "BYTES", value_parser = text::<usize>())]
        max_message_size: Option<usize>,
        /// Time allowed for one write to a phone system [default: 5s]
        #[arg(long, env = "CALLGATE_WRITE_TIMEOUT", value_name = "DURATION", value_parser = text::<Duration>())]
        #[serde(deserialize_with = "from_text")]
        write_timeout: Option<Duration>,
        /// How long shutdown waits for live calls [default: 15s]
        #[arg(long, env = "CALLGATE_SHUTDOWN_GRACE", value_name = "DURATION", value_parser = text::<Duration>())]
        #[serde(deserialize_with = "from_text")]
        shutdown_grace: Option<Duration>,
        /// After SIGTERM, how long live calls may go on to their natural end while the node takes no new ones; then they end as server_shutdown (0s: at once) [default: 1h]
        #[arg(long, env = "CALLGATE_DRAIN_TIMEOUT", value_name = "DURATION", value_parser = text::<Duration>())]
        #[serde(deserialize_with = "from_text")]
        drain_timeout: Option<Duration>,
        /// Audio format of inbound-protocol calls: PCM_8000/16000/24000/48000, ULAW_8000, ALAW_8000 [default: PCM_8000]
        #[arg(long, env = "CALLGATE_INBOUND_AUDIO_FORMAT", value_name = "FORMAT", value_parser = text::<AudioFormat>())]
        #[serde(deserialize_with = "from_text")]
        inbound_audio_format: Option<AudioFormat>,
        /// How often live calls write their counters to the store [default: 5s]
        #[arg(long, env = "CALLGATE_PROGRESS_INTERVAL", value_name = "DURATION", value_parser = text::<Duration>())]
        #[serde(deserialize_with = "from_text")]
        progress_interval: Option<Duration>,
        /// Log phone numbers in clear (they are redacted by default) [default: false]
        #[arg(long, env = "CALLGATE_LOG_PII", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = text::<bool>())]
        log_pii: Option<bool>,
        /// Log filter, e.g. `info` or `info,callgate_server=debug` [default: info]
        #[arg(long, env = "CALLGATE_LOG", value_name = "FILTER", value_parser = text::<LogFilter>())]
        #[serde(deserialize_with = "from_text")]
        log: Option<LogFilter>,
        /// Audio queued ahead for the caller at most (agents wait beyond it) [default: 2s]
        #[arg(long, env = "CALLGATE_PLAYOUT_LEAD", value_name = "DURATION", value_parser = text::<Duration>())]
        #[serde(deserialize_with = "from_text")]
        playout_lead: Option<Duration>,
        /// When the playout runs dry: nothing or silence [default: nothing]
        #[arg(long, env = "CALLGATE_PLAYOUT_UNDERRUN", value_name = "POLICY", value_parser = text::<Underrun>())]
        #[serde(deserialize_with = "from_text")]
        playout_underrun: Option<Underrun>,
        /// Voice activity detection on caller audio (speech events, barge-in) [default: false]
        #[arg(long, env = "CALLGATE_VAD", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = text::<bool>())]
        vad: Option<bool>,
        /// VAD score (0..1) that counts as speech [default: 0.5]
        #[arg(long, env = "CALLGATE_VAD_THRESHOLD", value_name = "SCORE", value_parser = text::<f32>())]
        vad_threshold: Option<f32>,
        /// Speech this long before it counts as started (at least 16ms) [default: 64ms]
        #[arg(long, env = "CALLGATE_VAD_START", value_name = "DURATION", value_parser = text::<Duration>())]
        #[serde(deserialize_with = "from_text")]
        vad_start: Option<Duration>,
        /// Silence this long before speech counts as stopped (at least 16ms) [default: 400ms]
        #[arg(long, env = "CALLGATE_VAD_STOP", value_name = "DURATION", value_parser = text::<Duration>())]
        #[serde(deserialize_with = "from_text")]
        vad_stop: Option<Duration>,
        /// Clear the agent's audio when the caller speaks over it (with --vad) [default: true]
        #[arg(long, env = "CALLGATE_BARGE_IN", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = text::<bool>())]
        barge_in: Option<bool>,
        /// Detect DTMF tones in caller audio [default: false]
        #[arg(long, env = "CALLGATE_INBAND_DTMF", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = text::<bool>())]
        inband_dtmf: Option<bool>,
        /// Record every call to DIR/recordings/ID.wav (stereo: caller left, agent right) [default: false]
        #[arg(long, env = "CALLGATE_RECORD", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = text::<bool>())]
        record: Option<bool>,
        /// The `[[routes]]` tables of the file (file only), parsed by `routes::parse_spec`.
        #[arg(skip)]
        routes: Option<Vec<toml::Value>>,
        /// The `[[webhooks]]` tables of the file (file only): where events are POSTed.
        #[arg(skip)]
        webhooks: Option<Vec<WebhookFile>>,
        /// The `[tts]` table of the file (file only): text-to-speech for flows.
        #[arg(skip)]
        tts: Option<callgate_flow::TtsSettings>,
        /// The `[stt]` table of the file (file only): speech to text for flows that listen.
        #[arg(skip)]
        stt: Option<callgate_flow::SttSettings>,
        /// The `[callbridge]` table of the file (file only): CallBridge's OPEN API, for
        /// `agent_terminate` and `send_sms` (flow steps, AI agents' built-in tools).
        #[arg(skip)]
        callbridge: Option<callgate_flow::CallBridgeApi>,
    }
}

/// A validated configuration, ready to bind.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// The server's configuration.
    pub(crate) config: Config,
    /// The route table `config` describes, built with the built-in agents.
    pub(crate) table: RouteTable,
    /// The log filter.
    pub(crate) log_filter: Targets,
    /// The effective settings without what a reload changes (routes, call keys, admin
    /// tokens): what a reload cannot change.
    pub(crate) fixed: Settings,
}

impl Settings {
    /// The `--config` file, if any.
    pub(crate) fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// Reads the file (if any), merges it under these settings and validates the result the
    /// way `serve` needs it: every setting, every route and its agent's settings.
    pub(crate) fn load(&self) -> anyhow::Result<Loaded> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => Self::default(),
        };
        self.clone().merge(file)?.validate()
    }

    /// These settings (flags and environment) over the file's, refusing an agent given in
    /// either place together with the file's routes.
    fn merge(self, file: Self) -> anyhow::Result<Self> {
        if file.routes.as_ref().is_some_and(|r| !r.is_empty()) {
            let path = file.config.as_deref().unwrap_or(Path::new("?")).display();
            if self.flow.is_some() || file.flow.is_some() {
                bail!(
                    "--flow (or CALLGATE_FLOW, or the file's `flow`) and the [[routes]] of config \
                     file {path} cannot be used together: use one or the other (a route with \
                     agent = \"flow\" and settings.file runs a flow)"
                );
            }
            if self.agent.is_some() {
                bail!(
                    "--agent (or CALLGATE_AGENT) and the [[routes]] of config file {path} cannot \
                     be used together: use one or the other (a route without [routes.match] is \
                     the default)"
                );
            }
            if file.agent.is_some() {
                bail!(
                    "config file {path}: `agent` and [[routes]] cannot be used together: use one \
                     or the other (a route without [routes.match] is the default)"
                );
            }
        }
        let merged = self.or(file);
        if merged.agent.is_some() && merged.flow.is_some() {
            bail!("--agent and --flow (or their variables or file keys) cannot be used together");
        }
        Ok(merged)
    }

    /// Maps merged settings into the server's `Config` (the one place defaults meet
    /// settings) and checks it, routes included.
    fn validate(self) -> anyhow::Result<Loaded> {
        let file = self.config.clone();
        let in_file = || match &file {
            Some(path) => format!("config file {}", path.display()),
            None => "the settings".to_owned(),
        };
        let routes = self
            .routes
            .clone()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(index, value)| route_spec(value, index))
            .collect::<anyhow::Result<_>>()
            .with_context(in_file)?;
        let mut c = Config {
            routes,
            metrics: vec![Arc::new(callgate_realtime::metrics::RealtimeCollector(
                realtime_metrics(),
            ))],
            ..Config::default()
        };
        if let Some(v) = &self.agent {
            c.agent.clone_from(v);
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.admin_listen {
            c.admin_listen = v;
        }
        if let Some(v) = &self.data_dir {
            c.data_dir.clone_from(v);
        }
        c.store_url = match &self.store_url {
            Some(url) => Some(
                callgate_store::PgUrl::parse(url, self.store_ca_file.as_deref())
                    .with_context(in_file)?,
            ),
            None if self.store_ca_file.is_some() => {
                bail!(
                    "store_ca_file is set without store_url: it is the CA of the PostgreSQL store"
                )
            }
            None => None,
        };
        c.node_id = match &self.node_id {
            Some(v) => v.clone(),
            None => host_name()
                .context("node_id is not set and the host name could not be read: set node_id")?,
        };
        c.advertise_admin.clone_from(&self.advertise_admin);
        if let Some(v) = self.node_timeout {
            c.node_timeout = v;
        }
        c.cluster_secret = cluster_secret(
            self.cluster_token_env
                .as_deref()
                .or(self.cluster.as_ref().and_then(|c| c.token_env.as_deref())),
            |var| std::env::var(var).ok(),
        )
        .with_context(in_file)?;
        if let Some(v) = self.max_calls {
            c.max_calls = v;
        }
        if let Some(v) = self.max_pending {
            c.max_pending = v;
        }
        if let Some(v) = self.max_pending_per_ip {
            c.max_pending_per_ip = v;
        }
        if let Some(v) = self.handshake_timeout {
            c.handshake_timeout = v;
        }
        if let Some(v) = self.cdr_timeout {
            c.cdr_timeout = v;
        }
        if let Some(v) = self.max_message_size {
            c.max_message_size = v;
        }
        if let Some(v) = self.write_timeout {
            c.write_timeout = v;
        }
        if let Some(v) = self.shutdown_grace {
            c.shutdown_grace = v;
        }
        if let Some(v) = self.drain_timeout {
            c.drain_timeout = v;
        }
        if let Some(v) = self.inbound_audio_format {
            c.inbound_audio_format = v;
        }
        if let Some(v) = self.progress_interval {
            c.progress_interval = v;
        }
        if let Some(v) = self.log_pii {
            c.log_pii = v;
        }
        if let Some(v) = self.playout_lead {
            c.playout_lead = v;
        }
        if let Some(v) = self.playout_underrun {
            c.playout_underrun = v;
        }
        let mut vad = VadConfig::default();
        if let Some(v) = self.vad_threshold {
            vad.threshold = v;
        }
        if let Some(v) = self.vad_start {
            vad.start_frames = vad_frames("vad_start", v)?;
        }
        if let Some(v) = self.vad_stop {
            vad.stop_frames = vad_frames("vad_stop", v)?;
        }
        c.vad = self.vad.unwrap_or(false).then_some(vad);
        if let Some(v) = self.barge_in {
            c.barge_in = v;
        }
        if let Some(v) = self.inband_dtmf {
            c.inband_dtmf = v;
        }
        if let Some(v) = self.record {
            c.record = v;
        }
        if let Some(v) = self.retention {
            c.retention = Some(v);
        }
        if let Some(admin) = &self.admin {
            c.admin_auth = admin.auth().with_context(in_file)?;
        }
        if let Some(call_auth) = &self.call_auth {
            c.call_auth = call_auth.auth().with_context(in_file)?;
        }
        c.webhooks = self
            .webhooks
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, w)| w.endpoint(i))
            .collect::<anyhow::Result<_>>()
            .with_context(in_file)?;
        c.tls = tls_files(
            "tls",
            "--tls",
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls.as_ref(),
        )?;
        c.admin_tls = tls_files(
            "admin.tls",
            "--admin-tls",
            self.admin_tls_cert.clone(),
            self.admin_tls_key.clone(),
            self.admin.as_ref().and_then(|a| a.tls.as_ref()),
        )?;
        let log_filter = self.log.clone().unwrap_or_default().targets;
        // One default route running a flow: `--flow FILE`, or the demo menu when no agent,
        // flow or routes are given.
        if c.routes.is_empty() && self.agent.is_none() {
            let settings = match &self.flow {
                Some(file) => serde_json::json!({ "file": file }),
                None => serde_json::json!({ "demo": "menu" }),
            };
            c.routes = vec![RouteSpec {
                name: callgate_server::routes::DEFAULT_ROUTE.to_owned(),
                agent: callgate_flow::NAME.to_owned(),
                matcher: None,
                settings,
            }];
        }
        // `Config::validate`, keeping the table it builds.
        c.validate_limits()?;
        if let Some(stt) = &self.stt {
            stt.check()
                .map_err(|(field, why)| anyhow!("stt.{field}: {why}"))
                .with_context(in_file)?;
        }
        let flow_env = callgate_flow::FlowEnv {
            data_dir: c.data_dir.clone(),
            tts: self.tts.clone().unwrap_or_default(),
            callbridge: self.callbridge.clone(),
            stt: self.stt.clone(),
        };
        let table = match c.route_table(&catalog(flow_env)) {
            Ok(table) => table,
            // A route from `--agent`: the error names it (`route "default": agent: ...`).
            Err(e) if file.is_none() => return Err(e.into()),
            Err(e) => return Err(anyhow::Error::new(e).context(in_file())),
        };
        for (i, key) in c.call_auth.keys.iter().enumerate() {
            for name in key.routes.iter().flatten() {
                if !table.routes().iter().any(|r| *r.name == **name) {
                    return Err(anyhow!(
                        "call_auth.keys[{i}] ({:?}): routes: there is no route named {name:?}",
                        key.name
                    ))
                    .with_context(in_file);
                }
            }
        }
        Ok(Loaded {
            config: c,
            table,
            log_filter,
            fixed: Self {
                routes: None,
                call_auth: None,
                admin: self.admin.clone().map(|admin| AdminFile {
                    tokens: Vec::new(),
                    ..admin
                }),
                ..self
            },
        })
    }
}

/// The file's `[cluster]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClusterFile {
    /// The environment variable holding the cluster secret.
    token_env: Option<String>,
}

/// The cluster secret from the variable named `var` (flag, `CALLGATE_CLUSTER_TOKEN_ENV` or
/// `[cluster] token_env`): it must be set, and at least 32 bytes long.
fn cluster_secret(
    var: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<ClusterSecret>> {
    let Some(var) = var else {
        return Ok(None);
    };
    if var.is_empty() {
        bail!("cluster.token_env: give the name of an environment variable");
    }
    let text = env(var).ok_or_else(|| {
        anyhow!("cluster.token_env: the environment variable {var} is not set (or not UTF-8)")
    })?;
    ClusterSecret::new(&text)
        .map(Some)
        .map_err(|e| anyhow!("cluster.token_env: {var}: {e}"))
}

/// The file's `[admin]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminFile {
    /// Bearer tokens, each with a name and a role.
    #[serde(default)]
    tokens: Vec<AdminTokenFile>,
    /// A proxy in front of the admin API authenticates every request: no token needed even
    /// off loopback.
    #[serde(default)]
    behind_auth: bool,
    /// `[admin.tls]`: the admin API's certificate (as --admin-tls-cert, --admin-tls-key).
    tls: Option<TlsFile>,
}

/// A `[tls]` or `[admin.tls]` table: the port's PEM certificate chain and private key.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsFile {
    /// The PEM certificate chain, the server's own certificate first.
    cert: Option<PathBuf>,
    /// The PEM private key of the first certificate.
    key: Option<PathBuf>,
}

/// A TLS port's files from its flags (`{flag}-cert`, `{flag}-key`, which win) and its
/// table of the file (`[{table}]`); both or neither must be given.
fn tls_files(
    table: &str,
    flag: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    file: Option<&TlsFile>,
) -> anyhow::Result<Option<callgate_server::tls::Files>> {
    let cert = cert.or_else(|| file.and_then(|f| f.cert.clone()));
    let key = key.or_else(|| file.and_then(|f| f.key.clone()));
    for path in [&cert, &key].into_iter().flatten() {
        if path.as_os_str().is_empty() {
            bail!("{table}: an empty path (give the PEM file's path)");
        }
    }
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(callgate_server::tls::Files { cert, key })),
        (None, None) => Ok(None),
        (Some(_), None) => {
            bail!("{table}: a certificate without its key: give {table}.key (or {flag}-key) too")
        }
        (None, Some(_)) => {
            bail!("{table}: a key without its certificate: give {table}.cert (or {flag}-cert) too")
        }
    }
}

/// One `[admin] tokens` entry: its secret from exactly one of an environment variable, a
/// file, or its SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminTokenFile {
    name: String,
    role: String,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    token_sha256: Option<String>,
}

impl AdminFile {
    fn auth(&self) -> anyhow::Result<AdminAuth> {
        let mut tokens = Vec::with_capacity(self.tokens.len());
        for (i, t) in self.tokens.iter().enumerate() {
            let at = format!("admin.tokens[{i}] ({:?})", t.name);
            if t.name.trim().is_empty() {
                bail!("{at}: name: must not be empty");
            }
            if self.tokens[..i].iter().any(|o| o.name == t.name) {
                bail!("{at}: name: another token already has this name");
            }
            let role: Role = t.role.parse().map_err(|e| anyhow!("{at}: role: {e}"))?;
            let token = match (&t.token_env, &t.token_file, &t.token_sha256) {
                (Some(var), None, None) => {
                    let secret = std::env::var(var).map_err(|_| {
                        anyhow!("{at}: token_env: the environment variable {var} is not set")
                    })?;
                    Token::from_secret(&t.name, role, &secret)
                }
                (None, Some(path), None) => {
                    let secret = std::fs::read_to_string(path).map_err(|e| {
                        anyhow!("{at}: token_file: cannot read {}: {e}", path.display())
                    })?;
                    Token::from_secret(&t.name, role, &secret)
                }
                (None, None, Some(hex)) => Token::from_sha256_hex(&t.name, role, hex),
                _ => bail!("{at}: give exactly one of token_env, token_file, token_sha256"),
            }
            .map_err(|e| anyhow!("{at}: {e}"))?;
            tokens.push(token);
        }
        Ok(AdminAuth {
            tokens,
            behind_own_auth: self.behind_auth,
        })
    }
}

/// The default time one webhook attempt may take.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// One `[[webhooks]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebhookFile {
    /// Where events are POSTed.
    url: String,
    /// The event types it takes (`*`: all) [default: all].
    events: Option<Vec<String>>,
    /// The environment variable holding the secret, `whsec_` and base64.
    secret_env: String,
    /// How long one attempt may take [default: 10s].
    #[serde(default, deserialize_with = "from_text")]
    timeout: Option<Duration>,
}

impl WebhookFile {
    fn endpoint(&self, i: usize) -> anyhow::Result<callgate_server::webhooks::Endpoint> {
        let at = format!("webhooks[{i}] ({:?})", self.url);
        let var = &self.secret_env;
        let secret = std::env::var(var)
            .map_err(|_| anyhow!("{at}: secret_env: the environment variable {var} is not set"))?;
        let timeout = self.timeout.unwrap_or(WEBHOOK_TIMEOUT);
        if timeout.is_zero() || timeout > Duration::from_secs(300) {
            bail!("{at}: timeout: must be more than 0 and at most 5m");
        }
        let events = self.events.clone().unwrap_or_else(|| vec!["*".to_owned()]);
        callgate_server::webhooks::Endpoint::parse(&self.url, &events, &secret, timeout)
            .map_err(|e| anyhow!("{at}: {e}"))
    }
}

/// The file's `[call_auth]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CallAuthFile {
    /// API keys for the call port.
    #[serde(default)]
    keys: Vec<CallKeyFile>,
    /// Where calls may come from (CIDR, v4 and v6); empty: anywhere.
    #[serde(default)]
    allow: Vec<String>,
    /// Proxies whose `X-Forwarded-For` is believed.
    #[serde(default)]
    trusted_proxies: Vec<String>,
    /// The environment variable holding the Twilio account's auth token: Twilio Media
    /// Streams are admitted by a valid `X-Twilio-Signature`.
    #[serde(default)]
    twilio_auth_token_env: Option<String>,
}

/// One `[call_auth] keys` entry: a name, its secret from exactly one source, and optionally
/// the routes it may take.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallKeyFile {
    name: String,
    key_env: Option<String>,
    key_file: Option<PathBuf>,
    key_sha256: Option<String>,
    routes: Option<Vec<String>>,
}

/// A secret from exactly one of an environment variable, a file, or its SHA-256 digest.
fn secret(
    at: &str,
    env: Option<&String>,
    file: Option<&PathBuf>,
    sha256: Option<&String>,
    what: &str,
) -> anyhow::Result<Secret> {
    match (env, file, sha256) {
        (Some(var), None, None) => {
            let text = std::env::var(var).map_err(|_| {
                anyhow!("{at}: {what}_env: the environment variable {var} is not set")
            })?;
            Secret::from_text(&text).map_err(|e| anyhow!("{at}: {what}_env: {e}"))
        }
        (None, Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow!("{at}: {what}_file: cannot read {}: {e}", path.display()))?;
            Secret::from_text(&text).map_err(|e| anyhow!("{at}: {what}_file: {e}"))
        }
        (None, None, Some(hex)) => {
            Secret::from_sha256_hex(hex).map_err(|e| anyhow!("{at}: {what}_sha256: {e}"))
        }
        _ => bail!("{at}: give exactly one of {what}_env, {what}_file, {what}_sha256"),
    }
}

impl CallAuthFile {
    fn auth(&self) -> anyhow::Result<CallAuth> {
        let mut keys = Vec::with_capacity(self.keys.len());
        for (i, k) in self.keys.iter().enumerate() {
            let at = format!("call_auth.keys[{i}] ({:?})", k.name);
            if k.name.trim().is_empty() {
                bail!("{at}: name: must not be empty");
            }
            if self.keys[..i].iter().any(|o| o.name == k.name) {
                bail!("{at}: name: another key already has this name");
            }
            if k.routes.as_ref().is_some_and(Vec::is_empty) {
                bail!("{at}: routes: an empty list would refuse every call; leave it out");
            }
            let secret = secret(
                &at,
                k.key_env.as_ref(),
                k.key_file.as_ref(),
                k.key_sha256.as_ref(),
                "key",
            )?;
            keys.push(CallKey::new(&k.name, secret, k.routes.clone()));
        }
        let nets = |field: &str, all: &[String]| -> anyhow::Result<Vec<Net>> {
            all.iter()
                .enumerate()
                .map(|(i, n)| {
                    n.parse()
                        .map_err(|e| anyhow!("call_auth.{field}[{i}]: {e}"))
                })
                .collect()
        };
        let twilio = match &self.twilio_auth_token_env {
            None => None,
            Some(var) => {
                let token = std::env::var(var).map_err(|_| {
                    anyhow!(
                        "call_auth.twilio_auth_token_env: the environment variable {var} is not set"
                    )
                })?;
                let token = token.trim();
                if token.is_empty() {
                    bail!(
                        "call_auth.twilio_auth_token_env: the environment variable {var} is empty"
                    );
                }
                Some(TwilioToken::new(token))
            }
        };
        Ok(CallAuth {
            keys,
            allow: nets("allow", &self.allow)?,
            trusted_proxies: nets("trusted_proxies", &self.trusted_proxies)?,
            twilio,
        })
    }
}

/// The host name, the default `node_id`: the kernel's (Linux), else `$HOSTNAME`.
fn host_name() -> anyhow::Result<String> {
    let name = match std::fs::read_to_string("/proc/sys/kernel/hostname") {
        Ok(name) => name,
        Err(e) => std::env::var("HOSTNAME").map_err(|_| anyhow!(e))?,
    };
    let name = name.trim();
    if name.is_empty() {
        bail!("the host name is empty");
    }
    Ok(name.to_owned())
}

/// The `realtime` agent's metrics: one set for the process, shared by every reload of the
/// routes (the server's `/metrics` encodes it on each scrape).
fn realtime_metrics() -> Arc<callgate_realtime::RealtimeMetrics> {
    static METRICS: std::sync::OnceLock<Arc<callgate_realtime::RealtimeMetrics>> =
        std::sync::OnceLock::new();
    METRICS
        .get_or_init(callgate_realtime::RealtimeMetrics::new)
        .clone()
}

/// The agents `serve` can run: the built-in ones, `flow`, `realtime`, `pipeline` and `bridge`.
/// A flow's warnings (unreachable steps) go to stderr: the configuration is loaded before
/// logging is set up.
pub(crate) fn catalog(flow_env: callgate_flow::FlowEnv) -> Catalog {
    let mut catalog = Catalog::builtin();
    callgate_realtime::register(&mut catalog, flow_env.clone(), realtime_metrics());
    callgate_pipeline::register(&mut catalog, flow_env.clone());
    callgate_bridge::register(&mut catalog, flow_env.clone());
    callgate_flow::register_with(&mut catalog, flow_env, |warning| {
        eprintln!("callgate: warning: {warning}");
    });
    catalog
}

/// Reads and parses the TOML file (unknown keys are errors).
fn read_file(path: &Path) -> anyhow::Result<Settings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let mut file: Settings =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    file.config = Some(path.to_owned());
    Ok(file)
}

/// One `[[routes]]` table, checked by the server's parser so errors name the route and field.
fn route_spec(value: toml::Value, index: usize) -> anyhow::Result<RouteSpec> {
    let value = serde_json::to_value(value)
        .with_context(|| format!("routes[{index}]: not representable as JSON"))?;
    Ok(parse_spec(value, index)?)
}

/// A VAD duration in 16 ms detector frames.
fn vad_frames(key: &str, d: Duration) -> anyhow::Result<u32> {
    match u32::try_from(d.as_millis() / 16) {
        Ok(0) => Err(anyhow!("invalid {key}: must be at least 16ms")),
        Ok(n) => Ok(n),
        Err(_) => Err(anyhow!("invalid {key}: too long")),
    }
}

/// A log filter (`info,callgate_server=debug`), compared by its text.
#[derive(Debug, Clone)]
pub(crate) struct LogFilter {
    text: String,
    targets: Targets,
}

impl Default for LogFilter {
    fn default() -> Self {
        Self {
            text: "info".to_owned(),
            targets: Targets::new().with_default(tracing::Level::INFO),
        }
    }
}

impl PartialEq for LogFilter {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

/// A setting's value parsed from text: a flag, an environment variable or a TOML string. One
/// parser per type, shared by clap ([`text`]) and serde ([`from_text`]).
pub(crate) trait FromText: Sized {
    /// Parses `text`, or says what is wrong with it.
    fn from_text(text: &str) -> Result<Self, String>;
}

impl FromText for Duration {
    fn from_text(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text)
            .map_err(|e| format!("{e} (write e.g. \"5s\", \"250ms\" or \"2m\")"))
    }
}

impl FromText for bool {
    fn from_text(text: &str) -> Result<Self, String> {
        match text {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err("expected true or false (also 1/0, yes/no, on/off)".to_owned()),
        }
    }
}

impl FromText for Underrun {
    fn from_text(text: &str) -> Result<Self, String> {
        match text {
            "nothing" => Ok(Self::Nothing),
            "silence" => Ok(Self::Silence),
            _ => Err("expected nothing or silence".to_owned()),
        }
    }
}

impl FromText for LogFilter {
    fn from_text(text: &str) -> Result<Self, String> {
        let targets = text.parse::<Targets>().map_err(|e| e.to_string())?;
        Ok(Self {
            text: text.to_owned(),
            targets,
        })
    }
}

impl FromText for PathBuf {
    fn from_text(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("empty path".to_owned());
        }
        Ok(Self::from(text))
    }
}

/// Types whose `FromStr` is the parser.
macro_rules! from_str {
    ($($ty:ty),*) => {$(
        impl FromText for $ty {
            fn from_text(text: &str) -> Result<Self, String> {
                text.parse().map_err(|e: <$ty as std::str::FromStr>::Err| e.to_string())
            }
        }
    )*};
}
from_str!(SocketAddr, AudioFormat, usize, f32);

/// The clap side of [`FromText`]: errors name the setting (`invalid cdr_timeout "soon": ...`).
pub(crate) fn text<T>() -> Text<T> {
    Text(PhantomData)
}

/// A clap value parser for a [`FromText`] type.
#[derive(Debug)]
pub(crate) struct Text<T>(PhantomData<fn() -> T>);

impl<T> Clone for Text<T> {
    fn clone(&self) -> Self {
        Self(PhantomData)
    }
}

impl<T: FromText + Clone + Send + Sync + 'static> clap::builder::TypedValueParser for Text<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        use clap::error::ErrorKind;
        let key = arg.map_or("value", |a| a.get_id().as_str());
        let fail = |kind, message: String| Err(clap::Error::raw(kind, message).with_cmd(cmd));
        let Some(text) = value.to_str() else {
            return fail(
                ErrorKind::InvalidUtf8,
                format!("invalid {key}: not UTF-8\n"),
            );
        };
        T::from_text(text).or_else(|problem| {
            fail(
                ErrorKind::ValueValidation,
                format!("invalid {key} {text:?}: {problem}\n"),
            )
        })
    }
}

/// The serde side of [`FromText`], for settings written as TOML strings.
fn from_text<'de, D: Deserializer<'de>, T: FromText>(d: D) -> Result<Option<T>, D::Error> {
    let text = String::deserialize(d)?;
    T::from_text(&text)
        .map(Some)
        .map_err(|problem| serde::de::Error::custom(format!("invalid value {text:?}: {problem}")))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn flags(args: &[&str]) -> Result<Settings, String> {
        Cli::try_parse_from(std::iter::once("callgate").chain(args.iter().copied()))
            .map(|c| c.settings)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn flags_and_toml_share_one_parser_per_type() {
        let s = flags(&["--cdr-timeout", "1m 30s", "--vad", "--record", "off"]).unwrap();
        assert_eq!(s.cdr_timeout, Some(Duration::from_secs(90)));
        assert_eq!(s.vad, Some(true));
        assert_eq!(s.record, Some(false));
        let f: Settings =
            toml::from_str("cdr_timeout = \"1m 30s\"\nvad = true\nrecord = false\n").unwrap();
        assert_eq!(f.cdr_timeout, s.cdr_timeout);
        assert_eq!(f.vad, s.vad);
        assert_eq!(f.record, s.record);

        let e = flags(&["--cdr-timeout", "soon"]).unwrap_err();
        assert!(e.contains("invalid cdr_timeout \"soon\""), "{e}");
        let e = flags(&["--playout-underrun", "loud"]).unwrap_err();
        assert!(
            e.contains("invalid playout_underrun \"loud\": expected nothing or silence"),
            "{e}"
        );
        let e = toml::from_str::<Settings>("cdr_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cdr_timeout") && e.contains("\"soon\""), "{e}");
        // TOML booleans are real booleans.
        assert!(toml::from_str::<Settings>("vad = \"yes\"\n").is_err());
    }

    #[test]
    fn webhooks_are_checked_at_start_naming_the_table_and_field() {
        let load = |toml: &str| {
            let f: Settings = toml::from_str(toml).map_err(|e| e.to_string())?;
            f.validate().map(|_| ()).map_err(|e| format!("{e:#}"))
        };
        let table = |extra: &str| {
            format!("agent = \"echo\"\n[[webhooks]]\nurl = \"http://127.0.0.1:9/h\"\n{extra}")
        };
        let e = load(&table("secret_env = \"CALLGATE_NO_SUCH_VARIABLE_42\"\n")).unwrap_err();
        assert!(
            e.contains("webhooks[0]") && e.contains("CALLGATE_NO_SUCH_VARIABLE_42 is not set"),
            "{e}"
        );
        // PATH is set on every machine, and is no whsec_ secret.
        let e = load(&table("secret_env = \"PATH\"\n")).unwrap_err();
        assert!(e.contains("webhooks[0]") && e.contains("whsec_"), "{e}");
        let e = load(&table("secret_env = \"PATH\"\nevents = [\"call.nope\"]\n")).unwrap_err();
        assert!(e.contains("\"call.nope\" is not an event type"), "{e}");
        let e = load(&table("secret_env = \"PATH\"\ntimeout = \"0s\"\n")).unwrap_err();
        assert!(e.contains("timeout"), "{e}");
        let e = load(&table("secret = \"whsec_x\"\n")).unwrap_err();
        assert!(e.contains("unknown field `secret`"), "{e}");
    }

    #[test]
    fn the_file_fills_what_flags_leave_out() {
        let s = flags(&["--max-calls", "5"]).unwrap();
        let f: Settings = toml::from_str("max_calls = 7\nmax_message_size = 2048\n").unwrap();
        let merged = s.or(f);
        assert_eq!(merged.max_calls, Some(5));
        assert_eq!(merged.max_message_size, Some(2048));
        let loaded = merged.validate().unwrap();
        assert_eq!(loaded.config.max_calls, 5);
        assert_eq!(loaded.config.max_message_size, 2048);
        assert_eq!(loaded.config.cdr_timeout, Config::default().cdr_timeout);
    }

    #[test]
    fn agent_and_routes_together_are_refused() {
        let routes = "[[routes]]\nname = \"a\"\nagent = \"echo\"\n";
        let file: Settings = toml::from_str(&format!("agent = \"echo\"\n{routes}")).unwrap();
        let e = Settings::default().merge(file).unwrap_err().to_string();
        assert!(e.contains("`agent` and [[routes]]"), "{e}");
        let file: Settings = toml::from_str(routes).unwrap();
        let e = flags(&["--agent", "tone"])
            .unwrap()
            .merge(file.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--agent (or CALLGATE_AGENT)"), "{e}");
        let merged = Settings::default().merge(file).unwrap();
        assert_eq!(merged.validate().unwrap().table.routes().len(), 1);
    }

    #[test]
    fn node_id_is_a_flag_a_key_or_the_host_name_and_is_checked() {
        let merged = flags(&["--node-id", "node-a"])
            .unwrap()
            .or(toml::from_str("node_id = \"node-b\"\n").unwrap());
        assert_eq!(merged.validate().unwrap().config.node_id, "node-a");
        let file: Settings = toml::from_str("node_id = \"node-b\"\n").unwrap();
        assert_eq!(file.validate().unwrap().config.node_id, "node-b");
        let file: Settings =
            toml::from_str("node_timeout = \"30s\"\nadvertise_admin = \"http://10.0.0.5:4144\"\n")
                .unwrap();
        let config = file.validate().unwrap().config;
        assert_eq!(config.node_timeout, Duration::from_secs(30));
        assert_eq!(
            config.advertise_admin.as_deref(),
            Some("http://10.0.0.5:4144")
        );
        for (key, bad) in [
            ("node_timeout", "node_timeout = \"4s\""),
            ("advertise_admin", "advertise_admin = \"10.0.0.5:4144\""),
            ("advertise_admin", "advertise_admin = \"http://h:1/api\""),
        ] {
            let file: Settings = toml::from_str(bad).unwrap();
            let e = format!("{:#}", file.validate().unwrap_err());
            assert!(e.contains(key), "{bad}: {e}");
        }
        let default = Settings::default().validate().unwrap().config.node_id;
        assert_eq!(default, host_name().unwrap());
        for bad in ["", "a b", "n\u{e9}", &"x".repeat(65)] {
            let file: Settings = toml::from_str(&format!("node_id = {bad:?}\n")).unwrap();
            let e = format!("{:#}", file.validate().unwrap_err());
            assert!(e.contains("node_id"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_cluster_secret_comes_from_the_variable_named_by_flag_or_file() {
        let merged = flags(&["--cluster-token-env", "FROM_FLAG"])
            .unwrap()
            .or(toml::from_str("[cluster]\ntoken_env = \"FROM_FILE\"\n").unwrap());
        assert_eq!(merged.cluster_token_env.as_deref(), Some("FROM_FLAG"));
        let file: Settings = toml::from_str("[cluster]\ntoken_env = \"FROM_FILE\"\n").unwrap();
        assert_eq!(
            file.cluster.as_ref().and_then(|c| c.token_env.as_deref()),
            Some("FROM_FILE")
        );
        assert!(toml::from_str::<Settings>("[cluster]\ntoken = \"x\"\n").is_err());
        let long = "k".repeat(32);
        let env = |var: &str| match var {
            "LONG" => Some(format!("  {long}\n")),
            "SHORT" => Some("k".repeat(31)),
            "SPACE" => Some(format!("{long} {long}")),
            _ => None,
        };
        assert!(cluster_secret(None, env).unwrap().is_none());
        assert!(cluster_secret(Some("LONG"), env).unwrap().is_some());
        for (var, says) in [
            ("SHORT", "31 bytes long; use at least 32"),
            ("SPACE", "visible ASCII"),
            ("UNSET", "UNSET is not set"),
            ("", "name of an environment variable"),
        ] {
            let e = format!("{:#}", cluster_secret(Some(var), env).unwrap_err());
            assert!(
                e.contains("cluster.token_env") && e.contains(says),
                "{var}: {e}"
            );
        }
    }
}
