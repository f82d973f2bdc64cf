//! The driver of one bridged call: feeds the core the call's events, the link's events and
//! time, and carries out its outputs (text to the link, the link closed, the call cleared,
//! commands to the call as it takes them). The connection runs on a task from the call's
//! `Spawner`; this loop only moves data.

use std::sync::Arc;

use callgate_agent::{
    Agent, AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun, Error, boxed,
};
use callgate_audio::AudioFormat;
use callgate_kit::outbox::{send, sleep};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Plan;
use crate::core::{BotClosed, Core, Output, StreamIds};
use crate::link::{self, Endpoint, LinkEvent};

/// Makes one bridge agent per call of a route.
#[derive(Debug)]
pub(crate) struct BridgeFactory {
    plan: Arc<Plan>,
}

impl BridgeFactory {
    pub(crate) fn new(plan: Plan) -> Self {
        Self {
            plan: Arc::new(plan),
        }
    }
}

impl AgentFactory for BridgeFactory {
    fn name(&self) -> &str {
        crate::NAME
    }

    /// The bot speaks μ-law 8 kHz; the call converts at its edges.
    fn audio_format(&self) -> Option<AudioFormat> {
        Some(AudioFormat::Ulaw8000)
    }

    fn start(&self, io: AgentIo) -> AgentRun {
        boxed(
            BridgeAgent {
                plan: self.plan.clone(),
            },
            io,
        )
    }
}

#[derive(Debug)]
struct BridgeAgent {
    plan: Arc<Plan>,
}

/// How long the driver waits, at the end, for the link to send `stop` and close.
const LINK_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

impl Agent for BridgeAgent {
    async fn run(self, mut io: AgentIo) -> Result<(), Error> {
        let plan = &self.plan;
        let ids = StreamIds {
            stream_sid: crate::new_stream_sid(),
            call_sid: io.call.call_id.clone(),
            account_sid: plan.settings.account_sid.clone(),
        };
        let mut core = Core::new(
            ids,
            plan.custom_parameters(&io.call),
            plan.fallback.clone(),
            io.epoch(),
            now(),
        );
        let sender = io.sender();
        let (link_tx, mut link_rx) = mpsc::channel::<LinkEvent>(link::EVENTS);
        let mut to_bot: Option<mpsc::Sender<String>> = None;
        match plan.request_for(&io.call) {
            Ok((url, headers)) => {
                let (tx, rx) = mpsc::channel(link::OUTGOING);
                to_bot = Some(tx);
                let endpoint = Endpoint {
                    url,
                    headers,
                    tls: plan.tls.clone(),
                    connect_timeout: plan.settings.connect_timeout.0,
                };
                io.spawner().spawn(link::run(endpoint, rx, link_tx));
            }
            Err(e) => {
                drop(link_tx);
                core.handle_connect_failed(now(), format!("the url cannot be made: {e}"));
            }
        }
        let mut ended = false;
        loop {
            while let Some(output) = core.poll_output() {
                match output {
                    Output::Send(text) => {
                        let Some(tx) = &to_bot else { continue };
                        match tx.try_send(text) {
                            Ok(()) => {}
                            // The link ended: its own report says why.
                            Err(mpsc::error::TrySendError::Closed(_)) => to_bot = None,
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                to_bot = None;
                                core.handle_bot_closed(
                                    now(),
                                    BotClosed {
                                        code: None,
                                        reason: "the bot stopped reading (10 s of audio \
                                                 unread)"
                                            .into(),
                                        close_frame: false,
                                    },
                                );
                            }
                        }
                    }
                    // Dropping the sender closes the connection (1000) after what was queued.
                    Output::CloseBot => to_bot = None,
                    Output::Clear => core.handle_cleared(io.clear()),
                }
            }
            if core.is_finished() || ended {
                // What the record still needs is kept by an ended call; the rest is not.
                while let Some((epoch, command)) = core.front() {
                    core.pop();
                    if matches!(command, AgentCommand::Event(_) | AgentCommand::Usage(_))
                        && sender.send_in(epoch, command).await.is_err()
                    {
                        break;
                    }
                }
                // The link writes what it was given (`stop`) and closes; wait for it, bounded,
                // before the call's end cancels its task.
                to_bot = None;
                drop(to_bot);
                let _ = tokio::time::timeout(LINK_CLOSE_WAIT, async {
                    while link_rx.recv().await.is_some() {}
                })
                .await;
                return Ok(());
            }
            let deadline = core.poll_timeout().map(Instant::from_std);
            let next = core.front();
            let has_next = next.is_some();
            tokio::select! {
                event = io.recv() => {
                    let event = event.unwrap_or(AgentEvent::Ended(
                        callgate_proto::EndReason::AgentHangup));
                    if matches!(event, AgentEvent::Ended(_)) {
                        ended = true;
                    }
                    core.handle_call_event(now(), event);
                }
                Some(event) = link_rx.recv(), if core.accepts_bot_input() => match event {
                    LinkEvent::Opened => core.handle_opened(now()),
                    LinkEvent::Message { message, bytes } => {
                        core.handle_bot(now(), message, bytes);
                    }
                    LinkEvent::Closed(closed) => {
                        to_bot = None;
                        core.handle_bot_closed(now(), closed);
                    }
                    LinkEvent::Failed(reason) => {
                        to_bot = None;
                        core.handle_connect_failed(now(), reason);
                    }
                },
                () = sleep(deadline), if deadline.is_some() => core.handle_timeout(now()),
                sent = send(&sender, next), if has_next => {
                    if sent.is_err() {
                        ended = true;
                        core.handle_call_event(now(), AgentEvent::Ended(
                            callgate_proto::EndReason::AgentHangup));
                        continue;
                    }
                    core.pop();
                }
            }
        }
    }
}
