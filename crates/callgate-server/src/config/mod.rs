//! The server's validated configuration: plain data, built once before anything binds.
//!
//! The settings' own types live with what uses them ([`crate::auth`], [`crate::call_auth`],
//! [`crate::webhooks`], [`crate::routes`], [`crate::tls`]); they report a setting that cannot
//! work as a [`ConfigError`], which has a module of its own (`config/error.rs`) so that they
//! need nothing else of this one: the imports run one way, from here to them to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use callgate_agent::Catalog;
use callgate_audio::playout::Underrun;
use callgate_audio::vad::VadConfig;
use callgate_proto::AudioFormat;

use crate::auth::admin_exposure;
use crate::routes::{DEFAULT_ROUTE, RouteError, RouteSpec, RouteTable};

pub(crate) mod error;

pub use error::ConfigError;

/// The most calls or pending connections a budget can count.
const MAX_COUNT: usize = 1_000_000;

/// Everything the server needs to run. Built and validated by the binary (flags, environment,
/// TOML file) or by tests; see `README.md` for each setting's flag, variable and default.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where phone systems connect (both protocols).
    pub listen: SocketAddr,
    /// Where the admin HTTP API listens.
    pub admin_listen: SocketAddr,
    /// Who may place calls (`[call_auth]`): keys, allowlist, trusted proxies.
    pub call_auth: crate::call_auth::CallAuth,
    /// Who may use the admin API (`[admin]`).
    pub admin_auth: crate::auth::AdminAuth,
    /// TLS on the call port (`[tls]`): phone systems connect with `wss://`. `None`: `ws://`.
    pub tls: Option<crate::tls::Files>,
    /// TLS on the admin API (`[admin.tls]`): `https://`. `None`: `http://`.
    pub admin_tls: Option<crate::tls::Files>,
    /// How often the TLS files are looked at for changes (a change is put in force once two
    /// looks in a row see the same contents). Not a command-line setting: 5 s.
    pub tls_watch_interval: Duration,
    /// The agent of the default route when `routes` is empty (`--agent`).
    pub agent: String,
    /// The routes, in order (`[[routes]]`); empty: one default route running `agent`.
    pub routes: Vec<RouteSpec>,
    /// Where the database (and later recordings) live.
    pub data_dir: PathBuf,
    /// The PostgreSQL store (`store_url`); `None`: SQLite in `data_dir`. Its local journal
    /// lives in `data_dir` either way.
    pub store_url: Option<callgate_store::PgUrl>,
    /// This node's name, written into every record it makes (`node`); at start it closes as
    /// `interrupted` only the records it (or no node) left open.
    pub node_id: String,
    /// The URL other nodes use to reach this node's admin API (`http://10.0.0.5:4144`);
    /// `None`: derived from the admin address bound.
    pub advertise_admin: Option<String>,
    /// A node whose heartbeat is older than this is dead: another node closes its open
    /// records as `interrupted`.
    pub node_timeout: Duration,
    /// The cluster secret (`[cluster] token_env`): operator requests for a call another node
    /// holds are forwarded to it with this secret, and requests forwarded by other nodes are
    /// accepted only with it. `None`: nothing is forwarded, nor accepted.
    pub cluster_secret: Option<crate::auth::ClusterSecret>,
    /// How many calls may be live at once; more are refused with 1013.
    pub max_calls: usize,
    /// How many connections may be pending at once (accepted, not a call yet: upgrading,
    /// waiting for the first message, or being refused); a new one evicts the oldest. They
    /// never hold a call's slot.
    pub max_pending: usize,
    /// How many pending connections one source (an IPv4 address, an IPv6 /64) may have; more
    /// are turned away at accept.
    pub max_pending_per_ip: usize,
    /// How long a new connection has, from TCP accept, to complete the WebSocket upgrade and
    /// send its first message: one deadline for both.
    pub handshake_timeout: Duration,
    /// How long to wait for the inbound CDR after a call ends.
    pub cdr_timeout: Duration,
    /// The largest WebSocket message accepted; larger ones close the call with 1009.
    pub max_message_size: usize,
    /// How long one write to a phone may take before the call is dropped as `send_timeout`.
    pub write_timeout: Duration,
    /// How long shutdown waits for live calls to finish.
    pub shutdown_grace: Duration,
    /// After a terminate (SIGTERM), how long live calls may go on to their natural end while
    /// the node takes no new ones; then they end as `server_shutdown`. Zero: end them at once.
    pub drain_timeout: Duration,
    /// Audio format of inbound-protocol calls (the protocol does not say).
    pub inbound_audio_format: AudioFormat,
    /// How often a live call writes its counters to the store.
    pub progress_interval: Duration,
    /// Log phone numbers in clear (default: redacted).
    pub log_pii: bool,
    /// How much audio may be queued ahead for the caller (the playout lead).
    pub playout_lead: Duration,
    /// What the playout sends when it runs dry: nothing (default) or silence.
    pub playout_underrun: Underrun,
    /// Voice activity detection on the caller's audio (`None`: off).
    pub vad: Option<VadConfig>,
    /// Clear the agent's audio when the caller starts speaking over it (needs `vad`).
    pub barge_in: bool,
    /// Detect DTMF tones in the caller's audio.
    pub inband_dtmf: bool,
    /// Record every call to a stereo WAV in `data_dir/recordings`.
    pub record: bool,
    /// Delete call records (events, transcripts, recordings) this long after they ended;
    /// `None`: keep them.
    pub retention: Option<Duration>,
    /// More metrics for `/metrics`, encoded on each scrape (agents' own: the `realtime`
    /// agent's latency, connections, tool calls).
    pub metrics: Vec<std::sync::Arc<dyn prometheus_client::collector::Collector>>,
    /// Where events are POSTed (`[[webhooks]]`), each with the events it takes.
    pub webhooks: Vec<crate::webhooks::Endpoint>,
    /// When failed webhook deliveries are tried again, and when they are given up.
    pub webhook_retry: crate::webhooks::Retry,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 4143)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 4144)),
            admin_auth: crate::auth::AdminAuth::default(),
            call_auth: crate::call_auth::CallAuth::default(),
            tls: None,
            admin_tls: None,
            tls_watch_interval: Duration::from_secs(5),
            agent: "echo".into(),
            routes: Vec::new(),
            data_dir: PathBuf::from("./data"),
            store_url: None,
            node_id: "callgate".into(),
            advertise_admin: None,
            node_timeout: Duration::from_secs(10),
            cluster_secret: None,
            max_calls: 1000,
            max_pending: 512,
            max_pending_per_ip: 128,
            handshake_timeout: Duration::from_secs(5),
            cdr_timeout: Duration::from_secs(10),
            max_message_size: 1024 * 1024,
            write_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(3600),
            inbound_audio_format: AudioFormat::Pcm8000,
            progress_interval: Duration::from_secs(5),
            log_pii: false,
            playout_lead: Duration::from_secs(2),
            playout_underrun: Underrun::Nothing,
            vad: None,
            barge_in: true,
            inband_dtmf: false,
            record: false,
            retention: None,
            metrics: Vec::new(),
            webhooks: Vec::new(),
            webhook_retry: crate::webhooks::Retry::default(),
        }
    }
}

/// The shortest `node_timeout`: more than two heartbeats.
pub const MIN_NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a value [`check_admin_url`] or [`check_node_id`] checks is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// An `advertise_admin` URL that is not `http://` or `https://`.
    #[error("{0:?} must start with http:// or https://")]
    UrlScheme(String),
    /// An `advertise_admin` URL that is more than scheme, host and port.
    #[error("{0:?} must be scheme://host:port, like http://10.0.0.5:4144")]
    UrlShape(String),
    /// A node ID that is empty or longer than [`MAX_NODE_ID`] (its length).
    #[error("must be 1 to {MAX_NODE_ID} characters, not {0}")]
    NodeIdLength(usize),
    /// A node ID with a character it may not have.
    #[error("{0:?} is not allowed: use ASCII letters, digits, '.', '-' and '_'")]
    NodeIdChar(char),
}

/// `advertise_admin` is a full `http://` or `https://` URL with a host, and no path beyond `/`.
pub fn check_admin_url(url: &str) -> Result<(), ValueError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| ValueError::UrlScheme(url.to_owned()))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty()
        || authority.contains(['/', '?', '#', '@'])
        || authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ValueError::UrlShape(url.to_owned()));
    }
    Ok(())
}

/// The longest `node_id`.
pub const MAX_NODE_ID: usize = 64;

/// A node ID is 1 to [`MAX_NODE_ID`] ASCII letters, digits, `.`, `-` or `_` (a host name
/// fits): it goes into records, logs and the URL filter `node=`.
pub fn check_node_id(id: &str) -> Result<(), ValueError> {
    if id.is_empty() || id.len() > MAX_NODE_ID {
        return Err(ValueError::NodeIdLength(id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(ValueError::NodeIdChar(c));
    }
    Ok(())
}

impl Config {
    /// Checks values that parse but cannot work, including the routes and their agents
    /// (built-in ones).
    pub fn validate(&self) -> Result<(), crate::Error> {
        self.validate_limits()?;
        self.route_table(&Catalog::builtin())?;
        Ok(())
    }

    /// The route table this configuration describes, its agents taken from `catalog`.
    pub fn route_table(&self, catalog: &Catalog) -> Result<RouteTable, RouteError> {
        if self.routes.is_empty() {
            let spec = RouteSpec {
                name: DEFAULT_ROUTE.to_owned(),
                agent: self.agent.clone(),
                matcher: None,
                settings: serde_json::Value::Null,
            };
            return RouteTable::build(&[spec], catalog);
        }
        RouteTable::build(&self.routes, catalog)
    }

    /// Where the call records live: PostgreSQL with `store_url`, else SQLite in `data_dir`.
    pub fn store_location(&self) -> callgate_store::Location {
        match &self.store_url {
            Some(url) => callgate_store::Location::Postgres {
                url: url.clone(),
                data_dir: self.data_dir.clone(),
            },
            None => callgate_store::Location::Sqlite {
                data_dir: self.data_dir.clone(),
            },
        }
    }

    /// Checks the numeric settings.
    pub fn validate_limits(&self) -> Result<(), ConfigError> {
        let bad = |key, problem: &str| {
            Err(ConfigError {
                key,
                problem: problem.to_owned(),
            })
        };
        if let Err(problem) = check_node_id(&self.node_id) {
            return bad("node_id", &problem.to_string());
        }
        if let Err(problem) = crate::webhooks::check(&self.webhooks) {
            return bad("webhooks", &problem.to_string());
        }
        if self.node_timeout < MIN_NODE_TIMEOUT {
            return bad(
                "node_timeout",
                "must be at least 5s: a node heartbeats every 2s, and one late heartbeat must \
                 not make it dead",
            );
        }
        if let Some(url) = &self.advertise_admin
            && let Err(problem) = check_admin_url(url)
        {
            return bad("advertise_admin", &problem.to_string());
        }
        for (key, value) in [
            ("max_calls", self.max_calls),
            ("max_pending", self.max_pending),
            ("max_pending_per_ip", self.max_pending_per_ip),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
            // Each is a semaphore, which cannot count that high.
            if value > MAX_COUNT {
                return bad(key, "must be at most 1000000");
            }
        }
        admin_exposure(self.admin_listen, &self.admin_auth)?;
        if let Some(v) = &self.vad
            && !(0.0..=1.0).contains(&v.threshold)
        {
            return bad("vad_threshold", "must be between 0 and 1");
        }
        if self.max_message_size < 1024 {
            return bad("max_message_size", "must be at least 1024 bytes");
        }
        if let Some(r) = self.retention
            && r < Duration::from_secs(60)
        {
            return bad("retention", "must be at least a minute");
        }
        for (key, value) in [
            ("handshake_timeout", self.handshake_timeout),
            ("write_timeout", self.write_timeout),
            ("progress_interval", self.progress_interval),
            ("playout_lead", self.playout_lead),
            ("tls_watch_interval", self.tls_watch_interval),
        ] {
            if value.is_zero() {
                return bad(key, "must be longer than zero");
            }
        }
        Ok(())
    }
}
