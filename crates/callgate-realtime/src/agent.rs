//! The driver of one AI call: feeds the core the call's events, the connections' events, the
//! tools' results and time, and carries out its outputs (commands to the call, connections
//! opened and closed, tools started). All slow work (connecting, JSON, base64, tools) runs on
//! tasks from the call's `Spawner`; this loop only moves data.

use std::collections::HashMap;
use std::sync::Arc;

use callgate_agent::catalog::SettingsError;
use callgate_agent::{Agent, AgentEvent, AgentFactory, AgentIo, AgentRun, Error, boxed};
use callgate_kit::AgentEnv;
use callgate_kit::callbridge::OpenApi;
use callgate_kit::outbox::{Outbox, send, sleep};
use callgate_kit::tools;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Plan;
use crate::core::{Core, Outgoing, Output, ToolDone, ToolKind};
use crate::link::{self, Endpoint, LinkEvent};
use crate::metrics::RealtimeMetrics;

/// Tool results waiting for the agent. Policy when full: the tool's task waits (a handful
/// run at once: each is one function call of the model).
const TOOL_RESULTS: usize = 16;

/// Makes one realtime agent per call of a route.
#[derive(Debug)]
pub(crate) struct RealtimeFactory {
    plan: Arc<Plan>,
    shared: Arc<Shared>,
}

/// What every call of a route shares besides the plan.
#[derive(Debug)]
struct Shared {
    endpoint: Arc<Endpoint>,
    http: reqwest::Client,
    /// Each HTTP tool's headers, secrets read at load.
    headers: Vec<Vec<(String, String)>>,
    /// CallBridge's OPEN API with its key.
    callbridge: Option<OpenApi>,
    metrics: Arc<RealtimeMetrics>,
}

impl RealtimeFactory {
    pub(crate) fn build(
        settings: crate::RealtimeSettings,
        env: &AgentEnv,
        metrics: Arc<RealtimeMetrics>,
    ) -> Result<Self, SettingsError> {
        let key = std::env::var(&settings.api_key_env).map_err(|_| {
            SettingsError::new(
                "api_key_env",
                format!("${} is not set", settings.api_key_env),
            )
        })?;
        let tls = tls_config(settings.ca_file.as_deref())
            .map_err(|e| SettingsError::new("ca_file", e))?;
        let http = callgate_kit::http::client()
            .map_err(|e| SettingsError::new("", format!("cannot build the HTTP client: {e}")))?;
        let headers = tools::Compiled::new(&settings.tools)?.headers;
        callgate_kit::plaintext::warn_if_exposed("realtime url", &settings.url);
        let callbridge = env.callbridge.as_ref().and_then(|api| api.open());
        if let Some(tool) = settings.builtin_tools.iter().find(|b| b.needs_open_api())
            && callbridge.is_none()
        {
            return Err(SettingsError::new(
                "builtin_tools",
                callgate_kit::callbridge::missing(tool.name()),
            ));
        }
        let endpoint = Arc::new(Endpoint {
            url: settings.connect_url(),
            key,
            tls,
            connect_timeout: settings.connect_timeout.0,
        });
        let plan = crate::plan(settings, env)?;
        Ok(Self {
            plan: Arc::new(plan),
            shared: Arc::new(Shared {
                endpoint,
                http,
                headers,
                callbridge,
                metrics,
            }),
        })
    }
}

/// TLS for `wss://`: the platform's trusted roots, or only the authorities in `ca_file`.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match ca_file {
        None => {
            use rustls_platform_verifier::ConfigVerifierExt;
            rustls::ClientConfig::with_platform_verifier().map_err(|e| e.to_string())?
        }
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no certificate in it", path.display()));
            }
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

impl AgentFactory for RealtimeFactory {
    fn name(&self) -> &str {
        crate::NAME
    }

    fn start(&self, io: AgentIo) -> AgentRun {
        boxed(
            RealtimeAgent {
                plan: self.plan.clone(),
                shared: self.shared.clone(),
            },
            io,
        )
    }
}

#[derive(Debug)]
struct RealtimeAgent {
    plan: Arc<Plan>,
    shared: Arc<Shared>,
}

impl Agent for RealtimeAgent {
    async fn run(self, mut io: AgentIo) -> Result<(), Error> {
        let now = Instant::now();
        let started = now - std::time::Duration::from_millis(io.now_ms());
        let mut core = Core::new(self.plan.clone(), io.call.clone(), started, now);
        let sender = io.sender();
        let spawner = io.spawner();
        let (link_tx, mut link_rx) = mpsc::channel::<LinkEvent>(link::EVENTS);
        let (tool_tx, mut tool_rx) = mpsc::channel::<ToolDone>(TOOL_RESULTS);
        let mut links: HashMap<u64, mpsc::Sender<Outgoing>> = HashMap::new();
        // Commands for the call, each with the epoch it was made in: audio made before a
        // clear or a barge-in is dropped by the call even if it is still queued here.
        let mut outbox = Outbox::new(io.epoch());
        let mut ended = false;
        // The outbox stamps the core's outputs with the epoch the driver last learned of.
        // Audio made from the service's events before the driver read a barge-in (the call
        // has advanced the epoch already) keeps the old epoch, so the call drops it.
        loop {
            while let Some(output) = core.poll_output() {
                match output {
                    Output::Send { conn, message } => {
                        let Some(tx) = links.get(&conn) else { continue };
                        match tx.try_send(message) {
                            Ok(()) => {}
                            // The connection's task ended: its own report says why.
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                links.remove(&conn);
                            }
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                links.remove(&conn);
                                core.handle_lost(
                                    Instant::now(),
                                    conn,
                                    crate::core::Lost {
                                        fatal: false,
                                        reason: "the service stopped reading (10 s of audio \
                                                 unread)"
                                            .into(),
                                    },
                                );
                            }
                        }
                    }
                    Output::Audio(audio) => {
                        outbox.push(callgate_agent::AgentCommand::Audio(audio));
                    }
                    Output::Command(command) => outbox.push(command),
                    Output::Count(counted) => self.shared.metrics.count(counted),
                    Output::Clear => outbox.cleared(io.clear()),
                    Output::Connect { conn } => {
                        let (tx, rx) = mpsc::channel(link::OUTGOING);
                        links.insert(conn, tx);
                        let endpoint = self.shared.endpoint.clone();
                        let events = link_tx.clone();
                        spawner.spawn(link::run(conn, endpoint, rx, events));
                    }
                    Output::Close { conn } => {
                        // Dropping the sender closes the connection (1000).
                        links.remove(&conn);
                    }
                    Output::Tool(call) => {
                        let shared = self.shared.clone();
                        let plan = self.plan.clone();
                        let info = io.call.clone();
                        let tx = tool_tx.clone();
                        spawner.spawn(async move {
                            let done = match call.tool {
                                ToolKind::Http(i) => {
                                    tools::run_http(
                                        &shared.http,
                                        &plan.settings.tools[i],
                                        &plan.tool_urls[i],
                                        &shared.headers[i],
                                        &info,
                                        call.call_id,
                                        &call.arguments,
                                    )
                                    .await
                                }
                                ToolKind::AgentTerminate => {
                                    tools::agent_terminate(
                                        &shared.http,
                                        shared.callbridge.as_ref(),
                                        &info,
                                        call.call_id,
                                        &call.arguments,
                                    )
                                    .await
                                }
                                ToolKind::SendSms => {
                                    tools::send_sms(
                                        &shared.http,
                                        shared.callbridge.as_ref(),
                                        &info,
                                        call.call_id,
                                        &call.arguments,
                                    )
                                    .await
                                }
                            };
                            let _ = tx.send(done).await;
                        });
                    }
                    Output::Latency { backend, callgate } => {
                        let m = &self.shared.metrics;
                        m.backend_latency.observe(backend.as_secs_f64());
                        m.callgate_latency.observe(callgate.as_secs_f64());
                    }
                }
            }
            if core.is_finished() {
                // Closing every connection: their tasks send `1000` and end.
                links.clear();
                if outbox.is_empty() || ended {
                    return Ok(());
                }
            }
            let deadline = core.poll_timeout();
            let next = outbox.front();
            tokio::select! {
                event = io.recv(), if !ended => {
                    let now = Instant::now();
                    match event {
                        None => {
                            ended = true;
                            core.handle_call_event(now, AgentEvent::Ended(
                                callgate_proto::EndReason::AgentHangup));
                        }
                        Some(event) => {
                            if matches!(event, AgentEvent::Ended(_)) {
                                ended = true;
                            }
                            match &event {
                                AgentEvent::BargeIn(i) => outbox.barged_in(i.epoch),
                                AgentEvent::Cleared(i) => outbox.advance(i.epoch),
                                _ => {}
                            }
                            core.handle_call_event(now, event);
                        }
                    }
                }
                Some(event) = link_rx.recv() => {
                    let now = Instant::now();
                    match event {
                        LinkEvent::Opened { conn } => core.handle_opened(now, conn),
                        LinkEvent::Event { conn, event, received } => {
                            core.handle_server(now, conn, event, received);
                        }
                        LinkEvent::Lost { conn, lost } => {
                            links.remove(&conn);
                            core.handle_lost(now, conn, lost);
                        }
                    }
                }
                Some(done) = tool_rx.recv() => core.handle_tool_done(Instant::now(), done),
                () = sleep(deadline), if deadline.is_some() => core.handle_timeout(Instant::now()),
                sent = send(&sender, next), if !outbox.is_empty() && !ended => {
                    if sent.is_err() {
                        ended = true;
                        core.handle_call_event(Instant::now(), AgentEvent::Ended(
                            callgate_proto::EndReason::AgentHangup));
                        continue;
                    }
                    outbox.pop();
                }
            }
        }
    }
}
