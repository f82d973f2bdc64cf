//! The driver of one AI call: feeds the core the call's events, the connections' events, the
//! tools' results and time, and carries out its outputs (commands to the call, connections
//! opened and closed, tools started). All slow work (connecting, JSON, base64, tools) runs on
//! tasks from the call's `Spawner`; this loop only moves data and time, and decides nothing.
//!
//! The clock is read here only ([`now`]): tokio's, so `tokio::time::pause` drives a whole call
//! in a test.

use std::collections::HashMap;
use std::sync::Arc;

use callgate_agent::catalog::SettingsError;
use callgate_agent::{
    Agent, AgentEvent, AgentFactory, AgentIo, AgentRun, CallInfo, Error, Spawner, boxed,
};
use callgate_kit::AgentEnv;
use callgate_kit::callbridge::OpenApi;
use callgate_kit::outbox::{send, sleep};
use callgate_kit::tools;
use tokio::sync::mpsc;

use crate::Plan;
use crate::core::{Core, Lost, Outgoing, Output, ToolCall, ToolDone, ToolKind};
use crate::link::{self, Endpoint, LinkEvent};
use crate::metrics::RealtimeMetrics;

/// Tool results waiting for the agent. Policy when full: the tool's task waits (a handful
/// run at once: each is one function call of the model).
const TOOL_RESULTS: usize = 16;

/// The time now, for the core: tokio's clock (paused in tests), as a `std` instant.
#[allow(
    clippy::disallowed_methods,
    reason = "the driver is where the clock is read: the core takes time as an argument"
)]
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

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
        let tls = callgate_kit::tls::client_config(settings.ca_file.as_deref())
            .map_err(|e| SettingsError::caused("ca_file", e))?;
        let http = callgate_kit::http::client().map_err(|e| SettingsError::caused("", e))?;
        let headers = tools::Compiled::new(&settings.tools)?.headers;
        callgate_kit::plaintext::warn_if_exposed("realtime url", &settings.url);
        let callbridge = env.callbridge.as_ref().and_then(|api| api.open());
        if let Some(tool) = settings.builtin_tools.iter().find(|b| b.needs_open_api())
            && callbridge.is_none()
        {
            return Err(SettingsError::caused(
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
        let start = now();
        let began = start
            .checked_sub(std::time::Duration::from_millis(io.now_ms()))
            .unwrap_or(start);
        let mut core = Core::new(self.plan.clone(), io.call.clone(), io.epoch(), began, start);
        let sender = io.sender();
        let (link_tx, mut link_rx) = mpsc::channel::<LinkEvent>(link::EVENTS);
        let (tool_tx, mut tool_rx) = mpsc::channel::<ToolDone>(TOOL_RESULTS);
        let mut hands = Hands {
            links: HashMap::new(),
            link_events: link_tx,
            tool_results: tool_tx,
            spawner: io.spawner(),
        };
        loop {
            while let Some(output) = core.poll_output() {
                hands.carry_out(&self, &io, &mut core, output);
            }
            if core.is_finished() {
                // The record's last entries (the core kept only those); an ended call takes
                // them without pacing.
                while let Some((epoch, command)) = core.front() {
                    core.pop();
                    if sender.send_in(epoch, command).await.is_err() {
                        break;
                    }
                }
                // The connections close as their senders drop.
                return Ok(());
            }
            let deadline = core.poll_timeout().map(tokio::time::Instant::from_std);
            let next = core.front();
            let has_next = next.is_some();
            tokio::select! {
                event = io.recv() => {
                    // The call's channel closed: it is over for the agent.
                    let event = event.unwrap_or(AgentEvent::Ended(
                        callgate_proto::EndReason::AgentHangup));
                    core.handle_call_event(now(), event);
                }
                Some(event) = link_rx.recv() => match event {
                    LinkEvent::Opened { conn } => core.handle_opened(now(), conn),
                    LinkEvent::Event { conn, event, received } => {
                        core.handle_server(now(), conn, event, received);
                    }
                    LinkEvent::Lost { conn, lost } => {
                        hands.links.remove(&conn);
                        core.handle_lost(now(), conn, lost);
                    }
                },
                Some(done) = tool_rx.recv() => core.handle_tool_done(now(), done),
                () = sleep(deadline), if deadline.is_some() => core.handle_timeout(now()),
                sent = send(&sender, next), if has_next => match sent {
                    Ok(()) => core.pop(),
                    // The call is gone.
                    Err(_) => core.handle_call_event(now(), AgentEvent::Ended(
                        callgate_proto::EndReason::AgentHangup)),
                },
            }
        }
    }
}

/// What carries the core's outputs out: the open connections' outgoing channels, and the
/// senders the connections' and tools' tasks report on.
#[derive(Debug)]
struct Hands {
    /// Each open connection's outgoing channel ([`link::OUTGOING`] deep), by connection.
    links: HashMap<u64, mpsc::Sender<Outgoing>>,
    link_events: mpsc::Sender<LinkEvent>,
    tool_results: mpsc::Sender<ToolDone>,
    spawner: Spawner,
}

impl Hands {
    /// Carries out one output of `core`.
    fn carry_out(&mut self, agent: &RealtimeAgent, io: &AgentIo, core: &mut Core, output: Output) {
        match output {
            Output::Send { conn, message } => {
                if let Err(lost) = self.send(conn, message) {
                    core.handle_lost(now(), conn, lost);
                }
            }
            Output::Clear => core.handle_cleared(io.clear()),
            Output::Connect { conn } => {
                let (tx, rx) = mpsc::channel(link::OUTGOING);
                self.links.insert(conn, tx);
                let endpoint = agent.shared.endpoint.clone();
                let events = self.link_events.clone();
                self.spawner.spawn(link::run(conn, endpoint, rx, events));
            }
            // Dropping the sender closes the connection (1000).
            Output::Close { conn } => drop(self.links.remove(&conn)),
            Output::Tool(call) => {
                let results = self.tool_results.clone();
                agent.run_tool(&self.spawner, &io.call, call, results);
            }
            Output::Count(counted) => agent.shared.metrics.count(counted),
            Output::Latency { backend, callgate } => {
                let m = &agent.shared.metrics;
                m.backend_latency.observe(backend.as_secs_f64());
                m.callgate_latency.observe(callgate.as_secs_f64());
            }
        }
    }

    /// Hands `message` to connection `conn`'s task; a connection whose task cannot keep up
    /// is reported lost (its channel holds 10 s of the caller's audio). A connection that
    /// is gone drops it: its own report says why.
    fn send(&mut self, conn: u64, message: Outgoing) -> Result<(), Lost> {
        let Some(tx) = self.links.get(&conn) else {
            return Ok(());
        };
        match tx.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.links.remove(&conn);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.links.remove(&conn);
                Err(Lost::Broken(
                    "the service stopped reading (10 s of audio unread)".into(),
                ))
            }
        }
    }
}

impl RealtimeAgent {
    /// Runs `call` on a task of the call's; its result comes back on `results`.
    fn run_tool(
        &self,
        spawner: &Spawner,
        info: &CallInfo,
        call: ToolCall,
        results: mpsc::Sender<ToolDone>,
    ) {
        let shared = self.shared.clone();
        let plan = self.plan.clone();
        let info = info.clone();
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
            let _ = results.send(done).await;
        });
    }
}
