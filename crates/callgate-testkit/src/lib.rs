//! Test helpers (not published): a server on 127.0.0.1:0 with its own data dir, a raw
//! WebSocket phone for driving either protocol byte by byte, a small HTTP client for the admin
//! API, and audio generators; [`realtime`] is a local double of the OpenAI Realtime API (GA) for
//! the `realtime` agent's tests and benchmark; [`twilio_bot`] is a Twilio Media Streams bot
//! double for the `bridge` agent's; [`browser`] drives a real headless Chromium over WebDriver
//! for the console's tests.
//!
//! Tests synchronise on what the server sends (messages, closes, records), never on sleeps.
//! A test waiting for the store to hold something (a record, an end, a flow's step) looks
//! again after each commit of the store writer ([`TestServer::until_stored`]); a test
//! running the server as a child process waits on its live event stream ([`sse`]). Every
//! wait here is bounded: a failure fails with a message naming what was awaited, never
//! hangs.

pub mod audio;
pub mod browser;
pub mod http;
pub mod openai;
pub mod openapi;
pub mod pg;
pub mod phone;
pub mod realtime;
pub mod sse;
pub mod tls;
pub mod twilio_bot;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use callgate_server::{Config, Server, Tasks};
use callgate_store::writer::Commits;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use phone::{Phone, Received};

/// How long a test waits for the store to hold what it expects: a bound, not a pace (the
/// wait ends at the commit that brings it).
pub const STORE_WAIT: Duration = Duration::from_secs(10);

/// How long a test waits for a server to stop once told to (its calls' grace and the store's
/// last commit included).
pub const STOP_WAIT: Duration = Duration::from_secs(60);

/// A data directory removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "callgate-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        Self(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server running in this process.
pub struct TestServer {
    /// Where phones connect.
    pub call_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// The server's metrics registry.
    pub metrics: Arc<callgate_server::Metrics>,
    /// The configuration it runs with.
    pub config: Config,
    /// The route table in force (replace it to re-route new calls).
    pub routes: callgate_server::RouteHandle,
    /// The call-port keys and allowlist in force (replace them to rotate keys).
    pub call_auth: callgate_server::call_auth::CallAuthHandle,
    /// The admin tokens in force (replace them to rotate tokens).
    pub admin_auth: callgate_server::auth::AdminAuthHandle,
    /// The TLS ports' certificates (reload them as SIGHUP does).
    pub certificates: callgate_server::tls::Certificates,
    /// Drain, terminate or interrupt the server as the binary's signals do.
    pub lifecycle: callgate_server::Lifecycle,
    /// The store writer's commit counter, which [`TestServer::until_stored`] waits on.
    commits: Commits,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), callgate_server::Error>>,
    dir: Option<TempDir>,
}

/// A configuration for tests: loopback, port 0, a fresh data dir, short timeouts.
pub fn test_config(dir: &Path) -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.to_path_buf(),
        handshake_timeout: Duration::from_secs(5),
        cdr_timeout: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(10),
        ..Config::default()
    }
}

/// Starts a server with [`test_config`] changed by `tweak`.
pub async fn spawn_server(tweak: impl FnOnce(&mut Config)) -> TestServer {
    let dir = TempDir::new("server");
    let mut config = test_config(dir.path());
    tweak(&mut config);
    let server = Server::bind(config.clone()).await.expect("server binds");
    start(server, config, Some(dir))
}

/// Starts a server on an existing data directory (to check what a previous run left).
pub async fn spawn_server_in(dir: TempDir, tweak: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = test_config(dir.path());
    tweak(&mut config);
    let server = Server::bind(config.clone()).await.expect("server binds");
    start(server, config, Some(dir))
}

/// Starts a server whose routes (`config.routes`) may use the agents of `catalog`.
pub async fn spawn_server_with_catalog(
    catalog: &callgate_agent::Catalog,
    tweak: impl FnOnce(&mut Config),
) -> TestServer {
    let dir = TempDir::new("server");
    let mut config = test_config(dir.path());
    tweak(&mut config);
    let server = Server::bind_with_catalog(config.clone(), catalog)
        .await
        .expect("server binds");
    start(server, config, Some(dir))
}

/// Starts a server with a custom agent.
pub async fn spawn_server_with_agent(
    agent: Arc<dyn callgate_agent::AgentFactory>,
    tweak: impl FnOnce(&mut Config),
) -> TestServer {
    let dir = TempDir::new("server");
    let mut config = test_config(dir.path());
    tweak(&mut config);
    let server = Server::bind_with_agent(config.clone(), agent)
        .await
        .expect("server binds");
    start(server, config, Some(dir))
}

fn start(server: Server, config: Config, dir: Option<TempDir>) -> TestServer {
    let (stop, stopped) = oneshot::channel::<()>();
    let call_addr = server.call_addr();
    let admin_addr = server.admin_addr();
    let metrics = server.metrics();
    let routes = server.routes();
    let call_auth = server.call_auth();
    let admin_auth = server.admin_auth();
    let certificates = server.certificates();
    let lifecycle = server.lifecycle();
    let commits = server.commits();
    let handle = Tasks::new().spawn(server.run(async move {
        let _ = stopped.await;
    }));
    TestServer {
        call_addr,
        admin_addr,
        metrics,
        config,
        routes,
        call_auth,
        admin_auth,
        certificates,
        lifecycle,
        commits,
        stop: Some(stop),
        handle,
        dir,
    }
}

impl TestServer {
    /// `ws://` URL of the call listener with this path.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.call_addr)
    }

    /// Connects a phone to `path`.
    pub async fn phone(&self, path: &str) -> Phone {
        Phone::connect(&self.url(path)).await
    }

    /// `GET` on the admin API: status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = http::request(self.admin_addr, "GET", path, None).await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    /// `POST` on the admin API with a JSON body: status and JSON body.
    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let (status, body) = http::request(self.admin_addr, "POST", path, Some(body)).await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    /// The metrics text.
    pub async fn metrics_text(&self) -> String {
        http::request(self.admin_addr, "GET", "/metrics", None)
            .await
            .1
    }

    /// The newest call records.
    pub async fn calls(&self) -> Vec<Value> {
        let (status, body) = self.get("/api/calls?limit=1000").await;
        assert_eq!(status, 200, "{body}");
        body["calls"].as_array().cloned().unwrap_or_default()
    }

    /// The record of the call with this external ID, once it has ended.
    pub async fn ended_call(&self, external_id: &str) -> Value {
        self.until_stored(&format!("the end of call {external_id}"), async || {
            self.calls()
                .await
                .into_iter()
                .find(|c| c["external_id"] == external_id && !c["ended_at"].is_null())
        })
        .await
    }

    /// The record of the call with this external ID.
    pub async fn call(&self, external_id: &str) -> Value {
        self.until_stored(&format!("the record of call {external_id}"), async || {
            self.calls()
                .await
                .into_iter()
                .find(|c| c["external_id"] == external_id)
        })
        .await
    }

    /// What `look` finds in the records, once it finds something: it looks now, then again
    /// after each commit of the store writer (never on a timer). Panics, naming `what`, after
    /// [`STORE_WAIT`] or when the writer stops first.
    pub async fn until_stored<T>(&self, what: &str, mut look: impl AsyncFnMut() -> Option<T>) -> T {
        let mut commits = self.commits.clone();
        let wait = async {
            loop {
                // Before the look: a commit that lands while it reads wakes the wait below.
                let seen = commits.mark_seen();
                if let Some(found) = look().await {
                    return Ok(found);
                }
                if commits.changed().await.is_err() {
                    return Err(seen);
                }
            }
        };
        match tokio::time::timeout(STORE_WAIT, wait).await {
            Ok(Ok(found)) => found,
            Ok(Err(seen)) => panic!(
                "waited for {what}: the store writer stopped (after {seen} commits) without it"
            ),
            Err(_) => panic!(
                "waited {STORE_WAIT:?} for {what}: none of the store's commits brought it \
                 ({} so far)",
                self.commits.count()
            ),
        }
    }

    /// Triggers shutdown and waits (at most [`STOP_WAIT`]) for the server to stop.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.until_stopped().await;
    }

    /// Waits at most [`STOP_WAIT`] for the server task to end, and checks it ran well.
    async fn until_stopped(&mut self) {
        let result = tokio::time::timeout(STOP_WAIT, &mut self.handle)
            .await
            .unwrap_or_else(|_| panic!("the server did not stop within {STOP_WAIT:?}"))
            .expect("server task");
        result.expect("server ran");
    }

    /// Triggers shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Whether the server has stopped by itself (after a terminate, once drained).
    pub fn is_stopped(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for a shutdown begun with [`TestServer::begin_shutdown`] (or a terminate through
    /// [`TestServer::lifecycle`]); hands back the data
    /// dir so a test can start another server on it.
    pub async fn stopped(mut self) -> TempDir {
        self.until_stopped().await;
        self.dir.take().expect("the server owns its data dir")
    }
}

/// The realistic CallBridge start message from `callbridge.md`, with this cdrId.
pub fn callbridge_start(cdr_id: &str) -> String {
    format!(
        r#"{{"call_config":{{"siteId":"921004322052","caller":"01012341234","callee":"07012345678","cdrId":"{cdr_id}","callActionId":"1.758187055878E9","ivrIp":"192.168.150.103:29034","agentId":"agent-main","agentType":"voice"}},"audio_format":{{"phone_output_audio_format":"PCM_8000","phone_input_audio_format":"PCM_8000"}}}}"#
    )
}

/// An inbound `incoming_call` with this sessionId.
pub fn incoming_call(session_id: &str) -> String {
    format!(
        r#"{{"event":"incoming_call","callerId":"01099998888","didNumber":"0212345678","sessionId":"{session_id}"}}"#
    )
}

/// A CDR as the gateway documentation shows it: numeric cause code, fractional duration.
pub fn cdr(session_id: &str) -> String {
    format!(
        r#"{{"event":"cdr","sessionId":"{session_id}","destination":"0212345678","startTime":"2026-11-21T10:00:00Z","answerTime":"2026-11-21T10:00:01Z","endTime":"2026-11-21T10:00:04.50Z","duration":4.50,"billableSeconds":3,"disposition":"ANSWERED","hangupBy":"caller","hangupCauseCode":16,"hangupCauseText":"Normal Clearing"}}"#
    )
}
