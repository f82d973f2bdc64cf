//! The driver of one bridged call: feeds the core the call's events, the link's events and
//! time, and carries out its outputs (text to the link, the link closed, the call cleared,
//! commands to the call as it takes them). The bot's connection is polled here too, on the
//! call's own task (`link`); this loop only moves data.

use std::sync::Arc;

use callgate_agent::{Agent, AgentEvent, AgentFactory, AgentIo, AgentRun, Error, boxed};
use callgate_audio::AudioFormat;
use callgate_kit::outbox::send;
use tokio::time::Instant;

use crate::Plan;
use crate::core::{ConnectFailure, Core, Output, StreamIds};
use crate::link::{Endpoint, Link, LinkEvent};
use crate::metrics::BridgeMetrics;

/// Makes one bridge agent per call of a route.
#[derive(Debug)]
pub(crate) struct BridgeFactory {
    plan: Arc<Plan>,
    metrics: Arc<BridgeMetrics>,
}

impl BridgeFactory {
    pub(crate) fn new(plan: Plan, metrics: Arc<BridgeMetrics>) -> Self {
        Self {
            plan: Arc::new(plan),
            metrics,
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
                metrics: self.metrics.clone(),
            },
            io,
        )
    }
}

#[derive(Debug)]
struct BridgeAgent {
    plan: Arc<Plan>,
    metrics: Arc<BridgeMetrics>,
}

/// How long the driver waits, at the end, for `stop` and the close to be written.
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
        let mut link = match plan.request_for(&io.call) {
            Ok((url, headers)) => Link::connect(Endpoint {
                url,
                headers,
                tls: plan.tls.clone(),
                connect_timeout: plan.settings.connect_timeout.0,
            }),
            Err(e) => {
                let failure = ConnectFailure {
                    kind: "url",
                    reason: format!("the url cannot be made: {e}"),
                };
                core.handle_connect_failed(now(), failure);
                Link::none()
            }
        };
        let mut ended = false;
        // One timer for the core's deadline, reset only when the deadline moves: a timer made
        // per turn would be registered and removed again for every frame.
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        loop {
            while let Some(output) = core.poll_output() {
                match output {
                    // Queued; written when `link.next` is polled below (one write per turn).
                    Output::Send(text) => {
                        if let Err(closed) = link.send(text) {
                            core.handle_bot_closed(now(), closed);
                        }
                    }
                    Output::CloseBot => link.close(LINK_CLOSE_WAIT).await,
                    Output::Clear => core.handle_cleared(io.clear()),
                }
            }
            if core.is_finished() || ended {
                // What the record still needs is kept by an ended call; the rest is not.
                while let Some((epoch, command)) = core.front() {
                    core.pop();
                    if command.is_kept_after_end() && sender.send_in(epoch, command).await.is_err()
                    {
                        break;
                    }
                }
                self.metrics.merge(&core.take_stats());
                // `stop` and the close, if the core did not close already (bounded).
                link.close(LINK_CLOSE_WAIT).await;
                return Ok(());
            }
            let deadline = core.poll_timeout().map(Instant::from_std);
            if let Some(at) = deadline
                && armed != Some(at)
            {
                timer.as_mut().reset(at);
                armed = Some(at);
            }
            let next = core.front();
            let has_next = next.is_some();
            let read = core.accepts_bot_input();
            tokio::select! {
                event = io.recv() => {
                    let event = event.unwrap_or(AgentEvent::Ended(
                        callgate_proto::EndReason::AgentHangup));
                    if matches!(event, AgentEvent::Ended(_)) {
                        ended = true;
                    }
                    core.handle_call_event(now(), event);
                }
                event = link.next(read) => match event {
                    LinkEvent::Opened => core.handle_opened(now()),
                    LinkEvent::Message { message, bytes } => {
                        core.handle_bot(now(), message, bytes);
                    }
                    LinkEvent::Closed(closed) => core.handle_bot_closed(now(), closed),
                    LinkEvent::Failed(failure) => core.handle_connect_failed(now(), failure),
                },
                () = &mut timer, if deadline.is_some() => {
                    core.handle_timeout(now());
                    // Every second: the shared metrics are told what this call counted.
                    self.metrics.merge(&core.take_stats());
                }
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
