//! One call = one owning task: the WebSocket, the protocol session, the record and the agent
//! handle all belong to the task running [`serve`].
//!
//! The task runs one `select!` over: the socket, the agent's commands, the agent task's end,
//! operator commands, the session deadline, the progress tick and shutdown. After each input
//! it drains the session's outputs before awaiting anything else (the proto drive invariant).
//! Only this task writes to the socket, and every write has a timeout.

use std::any::Any;
use std::future::{Future, pending, poll_fn};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use callgate_agent::queue::{self, EventSender, Pushed, SendError};
use callgate_agent::{AgentCommand, AgentEvent, AgentRun, CallInfo, ClearWatch, Commands};
use callgate_audio::playout::PlayoutEvent;
use callgate_audio::vad::VadEvent;
use callgate_proto::detect::{self, Start};
use callgate_proto::{
    AudioFormat, CallEvent, Close, CloseCode, Command, Digit, Disconnect, EndReason,
    Error as ProtoError, Frame, Output, Protocol, Session, inbound,
};
use callgate_store::{CallId, NewCall, UnixMillis};
use futures_util::future::CatchUnwind;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::handshake::server::{Request as Upgrade, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{Instrument, debug, error, info, warn};

use crate::Shared;
use crate::live::{Mailbox, Reply, Request};
use crate::media::{Media, MediaEvent};
use crate::pii::Pii;
use crate::record::Record;

type Ws = WebSocketStream<TcpStream>;

/// How long a closing connection is read after our close frame, so the peer gets the close
/// (dropping a socket with unread data makes the kernel send a reset that can destroy it).
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// The most agent commands carried out per turn, so one chatty agent cannot starve its own
/// socket or other calls.
const AGENT_COMMANDS_PER_TURN: usize = 16;
/// How long an ended call waits for its agent before cancelling it.
const AGENT_EXIT_WAIT: Duration = Duration::from_secs(1);
/// How long a control event (DTMF, end of call) may wait for room in the agent's queue. Zero:
/// the agent is polled by the call task, so it cannot make room while the call waits; a queue
/// full of unread control events means the agent is stuck.
const AGENT_CONTROL_TIMEOUT: Duration = Duration::ZERO;

/// Serves one accepted connection: upgrade, first message, then the call.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let span = tracing::debug_span!("conn", %peer);
    async move {
        let _ = stream.set_nodelay(true);
        // Setup futures are boxed: they are large and finish before the call, so they must not
        // size the task's allocation for the whole call.
        let Some((mut ws, forced)) = Box::pin(upgrade(&shared, stream)).await else {
            return;
        };
        let Some(start) = Box::pin(first_message(&shared, &mut ws, forced)).await else {
            return;
        };
        Box::pin(run_call(shared, ws, start, peer)).await;
    }
    .instrument(span)
    .await
}

/// Refuses a connection because the call limit is reached: upgrade, then close 1013.
pub(crate) async fn refuse(shared: Arc<Shared>, stream: TcpStream, _permit: OwnedSemaphorePermit) {
    shared
        .metrics
        .connections_refused
        .get_or_create(&[("reason", "call_limit")])
        .inc();
    if let Some((mut ws, _)) = upgrade(&shared, stream).await {
        let reason = format!(
            "call limit reached ({} live calls)",
            shared.config.max_calls
        );
        close(
            &mut ws,
            Close::new(CloseCode::TRY_AGAIN_LATER, reason),
            shared.config.write_timeout,
        )
        .await;
    }
}

async fn upgrade(shared: &Shared, stream: TcpStream) -> Option<(Ws, Option<Protocol>)> {
    let mut path = String::new();
    #[allow(
        clippy::result_large_err,
        reason = "the callback's signature is tungstenite's"
    )]
    let callback = |req: &Upgrade, resp: Response| {
        path = req.uri().path().to_owned();
        Ok(resp)
    };
    let accept =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(shared.ws_config));
    let result = timeout(shared.config.handshake_timeout, accept).await;
    match result {
        Ok(Ok(ws)) => Some((ws, Protocol::from_path(&path))),
        Ok(Err(error)) => {
            debug!(%error, "WebSocket upgrade failed.");
            refused(shared, "websocket_handshake");
            None
        }
        Err(_) => {
            debug!("WebSocket upgrade timed out.");
            refused(shared, "websocket_handshake");
            None
        }
    }
}

fn refused(shared: &Shared, reason: &'static str) {
    shared
        .metrics
        .connections_refused
        .get_or_create(&[("reason", reason)])
        .inc();
}

/// Waits for the start message. On a bad one, closes with its code and reason.
async fn first_message(shared: &Shared, ws: &mut Ws, forced: Option<Protocol>) -> Option<Start> {
    let limit = shared.config.handshake_timeout;
    let deadline = Instant::now() + limit;
    let result = loop {
        match timeout_at(deadline, ws.next()).await {
            Err(_) => {
                break Err(ProtoError::HandshakeTimeout {
                    ms: limit.as_millis() as u64,
                });
            }
            Ok(None) => return None,
            Ok(Some(Ok(Message::Text(text)))) => break detect::first_message(&text, forced),
            Ok(Some(Ok(Message::Binary(_)))) => break Err(ProtoError::BinaryBeforeStart),
            Ok(Some(Ok(Message::Close(_)))) => {
                let _ = timeout(shared.config.write_timeout, SinkExt::close(ws)).await;
                return None;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(error))) => match fatal_read_error(&error) {
                Some(e) => break Err(e),
                None => {
                    debug!(%error, "Connection lost before the start message.");
                    return None;
                }
            },
        }
    };
    match result {
        Ok(start) => Some(start),
        Err(error) => {
            shared
                .metrics
                .protocol_errors
                .get_or_create(&[("kind", error.kind())])
                .inc();
            debug!(%error, code = error.close_code().0, "Refusing connection: bad start.");
            close(
                ws,
                Close::new(error.close_code(), error.to_string()),
                shared.config.write_timeout,
            )
            .await;
            None
        }
    }
}

/// A read error that is the peer's protocol fault (we answer it with a close code), as opposed
/// to the connection simply going away.
fn fatal_read_error(error: &WsError) -> Option<ProtoError> {
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { max_size, .. }) => {
            Some(ProtoError::MessageTooBig { max: *max_size })
        }
        WsError::Utf8(_) => Some(ProtoError::InvalidJson {
            detail: "text message is not valid UTF-8".into(),
        }),
        _ => None,
    }
}

/// Sends a close frame (bounded by `write_timeout`), then reads until the peer's close or EOF
/// for at most [`CLOSE_LINGER`].
async fn close(ws: &mut Ws, close: Close, write_timeout: Duration) {
    let frame = CloseFrame {
        code: WsCloseCode::from(close.code.0),
        reason: close.reason.into(),
    };
    if timeout(write_timeout, ws.close(Some(frame))).await.is_err() {
        return;
    }
    let _ = timeout(CLOSE_LINGER, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// What woke the call task.
enum Input {
    Shutdown,
    Socket(Option<Result<Message, WsError>>),
    Agent(Option<AgentCommand>),
    AgentClear,
    AgentDone(AgentOutcome),
    Operator,
    /// The timer fired: a session deadline, a playout slot or progress.
    Timer,
}

/// Describes a new call: its record, the agent's view of it, and its session.
fn describe(shared: &Shared, id: &CallId, start: Start) -> (NewCall, CallInfo, Session) {
    let now = std::time::Instant::now();
    let (caller, callee, external_id, call_config, input, output, session) = match start {
        Start::CallBridge(s) => {
            let cc = &s.call_config;
            (
                cc.caller.clone(),
                cc.callee.clone(),
                cc.cdr_id.clone(),
                serde_json::to_string(cc).ok(),
                s.audio_format.phone_output,
                s.audio_format.phone_input,
                Session::new(now, Start::CallBridge(s), inbound::Config::default()),
            )
        }
        Start::Inbound(call) => {
            let format: AudioFormat = shared.config.inbound_audio_format;
            let config = inbound::Config {
                cdr_timeout: shared.config.cdr_timeout,
            };
            (
                call.caller_id.clone(),
                call.did_number.clone(),
                call.session_id.clone(),
                None,
                format,
                format,
                Session::new(now, Start::Inbound(call), config),
            )
        }
    };
    let protocol = session.protocol();
    let record = NewCall {
        id: id.clone(),
        protocol: protocol.as_str().to_owned(),
        caller: caller.clone(),
        callee: callee.clone(),
        external_id: external_id.clone(),
        call_config,
        phone_output_audio_format: input.as_str().to_owned(),
        phone_input_audio_format: output.as_str().to_owned(),
        started_at: UnixMillis::now(),
        // Set once the call's audio (and so its recorder) exists.
        recording: false,
    };
    let info = CallInfo {
        call_id: id.to_string(),
        protocol,
        caller,
        callee,
        external_id,
        input_format: input,
        output_format: output,
    };
    (record, info, session)
}

async fn run_call(shared: Arc<Shared>, mut ws: Ws, start: Start, peer: SocketAddr) {
    let id = CallId::new();
    let protocol = start.protocol();
    let (mut new_call, mut info, session) = describe(&shared, &id, start);
    let (phone_in, phone_out) = (info.input_format, info.output_format);
    if let Some(format) = shared.agent.audio_format() {
        info.input_format = format;
        info.output_format = format;
    }
    let span = tracing::info_span!("call", call_id = %id, %protocol, %peer);
    let call = async move {
        let reveal = shared.config.log_pii;
        info!(
            caller = %Pii::new(&info.caller, reveal),
            callee = %Pii::new(&info.callee, reveal),
            external_id = %info.external_id,
            "Call started."
        );
        let media = Media::new(
            &shared.media,
            id.as_str(),
            phone_in,
            phone_out,
            shared.agent.audio_format(),
            std::time::Instant::now(),
        )
        .map(Box::new);
        // Boxed, like the call below: the task's state machine keeps a slot for every value
        // it ever held across an await, so large values live on the heap, once.
        let media = match media {
            Ok(media) => media,
            Err(error) => {
                error!(%error, "Could not set up the call's audio; refusing the call.");
                close(
                    &mut ws,
                    Close::new(CloseCode::INTERNAL, "call audio setup failed"),
                    shared.config.write_timeout,
                )
                .await;
                return;
            }
        };
        new_call.recording = media.is_recorded();
        // A call exists only once its record does: refuse it if the store cannot take it.
        if let Err(error) = Box::pin(shared.store.insert_call(new_call)).await {
            shared.metrics.store_errors.inc();
            error!(%error, "Could not insert the call record; refusing the call.");
            close(
                &mut ws,
                Close::new(CloseCode::INTERNAL, "call record store unavailable"),
                shared.config.write_timeout,
            )
            .await;
            return;
        }
        let record = Record::new(
            id.clone(),
            protocol,
            shared.store.clone(),
            shared.metrics.clone(),
            shared.cancel.clone(),
        );
        let operator = shared.live.register(id.clone());
        let (io, side) = callgate_agent::wire(info, queue::DEFAULT_CAPACITY);
        // The agent's future is owned and polled by this task (see `Call::run`).
        let agent: AgentFuture = Box::pin(AssertUnwindSafe(shared.agent.start(io)).catch_unwind());
        let mut call = Box::new(Call {
            shared: shared.clone(),
            session,
            record,
            media,
            agent_events: Some(side.events),
            ended: None,
            socket_open: true,
            hangup_after_playout: false,
            media_events: Vec::new(),
            discard_agent_audio: false,
        });
        call.run(&mut ws, side.commands, side.clears, agent, operator)
            .await;
        shared.live.remove(&id);
    };
    // Boxed: the call's state lives in one heap allocation, not nested in this one.
    Box::pin(call.instrument(span)).await
}

/// The state the call task owns besides the socket and channels.
struct Call {
    shared: Arc<Shared>,
    session: Session,
    record: Record,
    /// Events toward the agent; dropped when the call ends, which ends the agent.
    agent_events: Option<EventSender>,
    /// Why the call ended, once it has.
    ended: Option<EndReason>,
    /// Whether the socket may still yield messages.
    socket_open: bool,
    /// The call's audio: conversion, playout, VAD, DTMF detection, recording.
    media: Box<Media>,
    /// The agent hung up with audio still queued: hang up once it has played.
    hangup_after_playout: bool,
    /// Scratch space for what the caller's audio revealed.
    media_events: Vec<MediaEvent>,
    /// The playout was cleared by the call itself (barge-in, operator): audio the agent sent
    /// before that must not play.
    discard_agent_audio: bool,
}

impl Call {
    async fn run(
        &mut self,
        ws: &mut Ws,
        mut commands: Commands,
        clears: ClearWatch,
        agent: AgentFuture,
        operator: Arc<Mailbox>,
    ) {
        let interval = self.shared.config.progress_interval;
        let mut next_progress = Instant::now() + interval;
        // One timer for everything time-driven (session deadline, playout slot, progress),
        // reset only when the earliest deadline moves: no timer is created per turn.
        let timer = tokio::time::sleep_until(next_progress);
        tokio::pin!(timer);
        let mut agent = Some(agent);
        let mut commands_open = true;
        let mut shutting_down = false;
        let cancel = self.shared.cancel.clone();
        // Created once: re-creating it every turn would register a waiter every turn.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        // Likewise for the operator mailbox and the agent's clear requests.
        let posted = operator.notified();
        tokio::pin!(posted);
        let clear_signal = clears.notified();
        tokio::pin!(clear_signal);
        let mut closed_by_us = false;

        while !self.session.is_closed() {
            let deadline = earliest(self.session.poll_timeout(), self.media.poll_timeout())
                .map_or(next_progress, |d| Instant::from_std(d).min(next_progress));
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            // Audio from the agent is taken only while the playout has room: its backpressure.
            let take_commands = commands_open && self.media.has_room();
            // Not biased: a phone's burst must not starve the agent's output (or the reverse),
            // so the branches are polled in random order.
            let input = tokio::select! {
                _ = &mut cancelled, if !shutting_down => Input::Shutdown,
                r = poll_agent(&mut agent) => Input::AgentDone(r),
                m = ws.next(), if self.socket_open => Input::Socket(m),
                c = commands.recv(), if take_commands => Input::Agent(c),
                _ = &mut clear_signal => Input::AgentClear,
                _ = &mut posted => Input::Operator,
                _ = &mut timer => Input::Timer,
            };
            let now = std::time::Instant::now();
            match input {
                Input::Shutdown => {
                    shutting_down = true;
                    self.session.handle_shutdown(now);
                }
                Input::AgentDone(result) => {
                    agent = None;
                    self.agent_done(now, result);
                }
                Input::Socket(message) => self.socket_input(now, message),
                // More of what the agent queued is taken right below, bounded per turn.
                Input::Agent(Some(command)) => self.agent_command(now, command),
                Input::Agent(None) => commands_open = false,
                Input::AgentClear => {
                    clear_signal.set(clears.notified());
                    if clears.take() {
                        let c = self.media.clear();
                        self.notify_agent(AgentEvent::Cleared {
                            played_ms: c.played_ms,
                            dropped_ms: c.dropped_ms,
                        })
                        .await;
                    }
                }
                Input::Operator => {
                    posted.set(operator.notified());
                    while let Some(op) = operator.try_recv() {
                        let reply = self.operator(now, op.request);
                        let _ = op.reply.send(reply);
                    }
                }
                Input::Timer => {
                    self.session.handle_timeout(now);
                    if Instant::now() >= next_progress {
                        next_progress = Instant::now() + interval;
                        self.record.progress();
                        self.media.sync();
                        self.report_underruns();
                        self.shared
                            .metrics
                            .playout_queue_depth
                            .observe(self.media.queued_ms() as f64 / 1000.0);
                    }
                }
            }
            self.run_playout(now).await;
            if self.drain(ws).await {
                closed_by_us = true;
            }
            if std::mem::take(&mut self.discard_agent_audio) {
                commands.discard_queued_audio();
            }
            // Let the agent react to what this turn queued for it, and carry out its commands,
            // in this same turn: an echo costs one trip through the select, not two.
            if !self.session.is_closed() {
                if let Some(a) = agent.as_mut()
                    && let Poll::Ready(outcome) =
                        poll_fn(|cx| Poll::Ready(a.as_mut().poll(cx))).await
                {
                    agent = None;
                    self.agent_done(now, outcome);
                }
                let mut took = false;
                for _ in 0..AGENT_COMMANDS_PER_TURN {
                    if !self.media.has_room() {
                        break;
                    }
                    match commands.try_recv() {
                        Some(command) => {
                            self.agent_command(now, command);
                            took = true;
                        }
                        None => break,
                    }
                }
                if took {
                    self.run_playout(now).await;
                }
                if (took || agent.is_none()) && self.drain(ws).await {
                    closed_by_us = true;
                }
            }
        }

        // From here on no operator request can be carried out: refuse them at once.
        operator.close();
        if !closed_by_us {
            // The peer closed (or vanished): flush tungstenite's close reply if it can be sent.
            // `SinkExt::close` flushes the queued reply; the inherent `close` would try to send
            // a second close frame and fail.
            let _ = Box::pin(timeout(
                self.shared.config.write_timeout,
                SinkExt::close(ws),
            ))
            .await;
        }
        drop(self.agent_events.take());
        // The agent sees its queue close and returns; give it a moment, then drop it (which
        // cancels it wherever it is).
        if let Some(mut agent) = agent
            && timeout(AGENT_EXIT_WAIT, &mut agent).await.is_err()
        {
            warn!("Agent did not stop after the call ended; cancelling it.");
        }
        self.media.finish();
        if self.ended.is_none() {
            // Every session path emits Ended before it closes; this is the safety net.
            error!("Call closed without an end reason.");
            Box::pin(self.record.end(EndReason::InternalError)).await;
        }
        Box::pin(self.record.flush_events()).await;
    }

    fn socket_input(&mut self, now: std::time::Instant, message: Option<Result<Message, WsError>>) {
        match message {
            Some(Ok(Message::Binary(data))) => self.session.handle_binary(now, data),
            Some(Ok(Message::Text(text))) => self.session.handle_text(now, &text),
            Some(Ok(Message::Close(_))) => {
                self.socket_open = false;
                self.session.handle_peer_close(now, Disconnect::Closed);
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => match fatal_read_error(&error) {
                // The socket can still carry our close frame with the reason.
                Some(e) => self.session.handle_violation(now, e),
                None => {
                    debug!(%error, "Connection lost.");
                    self.socket_open = false;
                    self.session.handle_peer_close(now, Disconnect::Dropped);
                }
            },
            None => {
                self.socket_open = false;
                self.session.handle_peer_close(now, Disconnect::Dropped);
            }
        }
    }

    fn agent_command(&mut self, now: std::time::Instant, command: AgentCommand) {
        if self.ended.is_some() || self.hangup_after_playout {
            // The call is over (or about to be): nothing more is played.
            return;
        }
        let command = match command {
            AgentCommand::Answer => Command::Answer,
            // Audio goes through the playout clock, which sends it frame by frame.
            AgentCommand::Audio(data) => return self.media.agent_audio(now, data),
            AgentCommand::DtmfTone { digit, duration } => {
                return self.media.agent_tone(now, digit, duration);
            }
            AgentCommand::Mark(id) => return self.media.mark(id),
            AgentCommand::Dtmf { digit, duration } => Command::Dtmf { digit, duration },
            AgentCommand::Hangup if self.media.is_playing() => {
                self.hangup_after_playout = true;
                return;
            }
            AgentCommand::Hangup => Command::Hangup(EndReason::AgentHangup),
        };
        if let Err(error) = self.session.handle_command(now, command) {
            debug!(%error, "Agent command refused.");
            self.record.event(
                "agent_command_refused",
                serde_json::json!({ "message": error.to_string() }),
            );
        }
    }

    fn agent_done(&mut self, now: std::time::Instant, result: AgentOutcome) {
        let reason = match result {
            // A normal end is a hangup: what the agent queued last (a goodbye) still plays.
            Ok(Ok(())) => return self.agent_command(now, AgentCommand::Hangup),
            Ok(Err(error)) => {
                warn!(%error, "Agent failed.");
                self.record.event(
                    "agent_failed",
                    serde_json::json!({ "message": error.to_string() }),
                );
                EndReason::AgentFailed
            }
            Err(panic) => {
                let error = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                error!(%error, "Agent panicked.");
                self.record.event(
                    "agent_failed",
                    serde_json::json!({ "message": format!("agent panicked: {error}") }),
                );
                EndReason::AgentFailed
            }
        };
        if self.ended.is_none() {
            let _ = self.session.handle_command(now, Command::Hangup(reason));
        }
    }

    /// Carries out the session's outputs. Returns true if it sent a close frame.
    async fn drain(&mut self, ws: &mut Ws) -> bool {
        let write_timeout = self.shared.config.write_timeout;
        while let Some(output) = self.session.poll_output() {
            match output {
                Output::Send(frame) => {
                    let message = match frame {
                        Frame::Binary(data) => {
                            self.record.audio_out(data.len());
                            Message::Binary(data)
                        }
                        Frame::Text(text) => Message::Text(text.into()),
                    };
                    let failure = match timeout(write_timeout, ws.send(message)).await {
                        Ok(Ok(())) => None,
                        Ok(Err(error)) => {
                            debug!(%error, "Write failed.");
                            Some(Disconnect::Dropped)
                        }
                        Err(_) => {
                            debug!("Write timed out.");
                            Some(Disconnect::SendTimeout)
                        }
                    };
                    if let Some(how) = failure {
                        self.socket_open = false;
                        self.session
                            .handle_peer_close(std::time::Instant::now(), how);
                    }
                }
                Output::Close(frame) => {
                    // The record is complete before the phone sees the close.
                    Box::pin(self.record.flush_events()).await;
                    if self.socket_open {
                        Box::pin(close(ws, frame, write_timeout)).await;
                        self.socket_open = false;
                    }
                    return true;
                }
                Output::Event(event) => self.call_event(event).await,
            }
        }
        self.record.offer_events();
        false
    }

    async fn call_event(&mut self, event: CallEvent) {
        match event {
            CallEvent::Audio(data) => {
                self.record.audio_in(data.len());
                let mut events = std::mem::take(&mut self.media_events);
                let for_agent = self.media.caller_audio(&data, &mut events);
                if let Some(tx) = &self.agent_events
                    && tx.push_audio(for_agent) == Pushed::DroppedOldest
                {
                    self.shared.metrics.agent_audio_dropped.inc();
                }
                for event in events.drain(..) {
                    self.media_event(event).await;
                }
                self.media_events = events;
            }
            CallEvent::Answered => self.record.answered(),
            CallEvent::Dtmf(digit) => self.dtmf(digit, "protocol").await,
            CallEvent::Ended(reason) => {
                self.ended = Some(reason);
                info!(end_reason = %reason, "Call ended.");
                // Nothing more is heard or played: the recording is complete now.
                self.media.finish();
                self.report_underruns();
                Box::pin(self.record.end(reason)).await;
                self.notify_agent(AgentEvent::Ended(reason)).await;
                // Closing the queue ends the agent once it has read everything.
                drop(self.agent_events.take());
            }
            CallEvent::Cdr(report) => {
                if let Some(problem) = &report.problem {
                    self.record.event(
                        "cdr_invalid",
                        serde_json::json!({ "message": problem.to_string() }),
                    );
                }
                self.record.event("cdr_received", serde_json::json!({}));
                Box::pin(self.record.cdr(report.raw)).await;
            }
            CallEvent::CdrMissing => {
                self.record.event("cdr_missing", serde_json::json!({}));
            }
            CallEvent::Unknown(text) => {
                debug!("Unknown message kept in the call's events.");
                self.record
                    .event("unknown_message", serde_json::json!({ "text": text }));
            }
            CallEvent::Violation(error) => {
                self.shared
                    .metrics
                    .protocol_errors
                    .get_or_create(&[("kind", error.kind())])
                    .inc();
                debug!(%error, "Protocol error in a live call.");
                self.record.event(
                    "protocol_error",
                    serde_json::json!({ "kind": error.kind(), "message": error.to_string() }),
                );
            }
        }
    }

    /// A key from the caller, by protocol message or in-band tone.
    async fn dtmf(&mut self, digit: Digit, source: &'static str) {
        self.shared
            .metrics
            .dtmf
            .get_or_create(&[("source", source)])
            .inc();
        self.record.dtmf(digit.as_char());
        self.record.event(
            "dtmf",
            serde_json::json!({ "digit": digit.to_string(), "source": source }),
        );
        self.notify_agent(AgentEvent::Dtmf(digit)).await;
    }

    /// What the caller's audio revealed.
    async fn media_event(&mut self, event: MediaEvent) {
        match event {
            MediaEvent::Speech(VadEvent::SpeechStarted { at_ms }) => {
                self.record
                    .event("speech_started", serde_json::json!({ "at_ms": at_ms }));
                self.notify_agent(AgentEvent::SpeechStarted { at_ms }).await;
            }
            MediaEvent::Speech(VadEvent::SpeechStopped { at_ms }) => {
                self.record
                    .event("speech_stopped", serde_json::json!({ "at_ms": at_ms }));
                self.notify_agent(AgentEvent::SpeechStopped { at_ms }).await;
            }
            MediaEvent::BargeIn(c) => {
                self.shared.metrics.barge_ins.inc();
                self.hangup_after_playout = false;
                self.discard_agent_audio = true;
                self.record.event(
                    "barge_in",
                    serde_json::json!({ "played_ms": c.played_ms, "dropped_ms": c.dropped_ms }),
                );
                self.notify_agent(AgentEvent::BargeIn {
                    played_ms: c.played_ms,
                    dropped_ms: c.dropped_ms,
                })
                .await;
            }
            MediaEvent::InbandDtmf(digit) => self.dtmf(digit, "inband").await,
        }
    }

    /// Sends what the playout clock says is due, and reacts to marks and underruns.
    async fn run_playout(&mut self, now: std::time::Instant) {
        while let Some(event) = self.media.poll(now) {
            match event {
                PlayoutEvent::Frame {
                    data,
                    late,
                    silence,
                } => {
                    if !silence {
                        self.shared
                            .metrics
                            .playout_jitter
                            .observe(late.as_secs_f64());
                    }
                    // Refused only when the call is not answered yet or is over: dropped.
                    let _ = self.session.handle_command(now, Command::Audio(data));
                }
                PlayoutEvent::Mark(id) => {
                    let played_ms = self.media.played_ms();
                    self.notify_agent(AgentEvent::Mark { id, played_ms }).await;
                }
            }
        }
        if self.hangup_after_playout && !self.media.is_playing() && self.ended.is_none() {
            self.hangup_after_playout = false;
            let _ = self
                .session
                .handle_command(now, Command::Hangup(EndReason::AgentHangup));
        }
    }

    fn report_underruns(&mut self) {
        let n = self.media.take_underruns();
        if n > 0 {
            self.shared.metrics.playout_underruns.inc_by(n);
        }
    }

    /// An operator's request.
    fn operator(&mut self, now: std::time::Instant, request: Request) -> Result<Reply, ProtoError> {
        match request {
            Request::Command(c) => self.session.handle_command(now, c).map(|()| Reply::Done),
            Request::Play { .. } | Request::Clear if self.ended.is_some() => {
                Err(ProtoError::InvalidState {
                    operation: "playing audio",
                    state: "over",
                })
            }
            Request::Play { samples, rate } => match self.media.operator_play(&samples, rate) {
                Ok(ms) => {
                    self.record
                        .event("operator_play", serde_json::json!({ "ms": ms }));
                    Ok(Reply::Queued { ms })
                }
                Err(error) => {
                    warn!(%error, "Operator audio could not be converted.");
                    Err(ProtoError::Unsupported {
                        operation: "audio at this sample rate",
                        protocol: self.protocol(),
                    })
                }
            },
            Request::Clear => {
                let c = self.media.clear();
                self.discard_agent_audio = true;
                self.record.event(
                    "operator_clear",
                    serde_json::json!({ "played_ms": c.played_ms, "dropped_ms": c.dropped_ms }),
                );
                Ok(Reply::Cleared {
                    dropped_ms: c.dropped_ms,
                    played_ms: c.played_ms,
                })
            }
        }
    }

    fn protocol(&self) -> Protocol {
        self.session.protocol()
    }

    /// Sends a control event to the agent. If the agent does not take it in time, the call
    /// ends: an agent that cannot hear DTMF or hangups cannot handle a call.
    async fn notify_agent(&mut self, event: AgentEvent) {
        let Some(tx) = &self.agent_events else {
            return;
        };
        match Box::pin(tx.send_control(event, AGENT_CONTROL_TIMEOUT)).await {
            Ok(()) | Err(SendError::Closed) => {}
            Err(SendError::Timeout) => {
                warn!("Agent stopped taking events; ending the call.");
                self.record.event(
                    "agent_failed",
                    serde_json::json!({ "message": "agent stopped taking events" }),
                );
                if self.ended.is_none() {
                    let _ = self.session.handle_command(
                        std::time::Instant::now(),
                        Command::Hangup(EndReason::AgentFailed),
                    );
                }
            }
        }
    }
}

/// How a call's agent ended: its own result, or the payload of its panic.
type AgentOutcome = Result<Result<(), callgate_agent::Error>, Box<dyn Any + Send>>;

/// A call's agent, polled by the call task, with panics caught.
type AgentFuture = Pin<Box<CatchUnwind<AssertUnwindSafe<AgentRun>>>>;

async fn poll_agent(agent: &mut Option<AgentFuture>) -> AgentOutcome {
    match agent {
        Some(a) => a.await,
        None => pending().await,
    }
}

fn earliest(
    a: Option<std::time::Instant>,
    b: Option<std::time::Instant>,
) -> Option<std::time::Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
