//! One call = one owning task: the WebSocket, the call core, the record and the agent's future
//! all belong to the task running [`serve`].
//!
//! This module is the I/O around the call: the upgrade, the first message, routing, and one
//! `select!` over the socket, the agent (its future and its commands), the rare inputs (the
//! agent's clear requests, operator requests, shutdown) and the earliest deadline (playout,
//! session, liveness ping, progress tick). Every decision is the sans-IO [`core::CallCore`]'s:
//! the loop feeds it inputs with the time and carries out its effects (frames, the close,
//! record writes, what the agent is told, the shared epoch) before awaiting anything else. It
//! owns the agent's channels; the core holds none. Only this task writes to the socket, and a
//! write that has to wait does so under `write_timeout`.
//!
//! # Wake-ups
//! The CPU an echoed frame costs is mostly wake-ups and polls, so the loop keeps them to one
//! turn per input: pushes to the agent's event queue do not wake this task, which polls the
//! agent right after a turn that told it something (`EventSender::polled_by`); the command
//! channel keeps this task's waker only while it sleeps (`Commands::busy` when a turn starts);
//! the rare inputs share a flag-raising waker ([`Rare`]) and are polled only when it is up; the
//! timer is moved later only by more than [`TIMER_SLACK`].

pub(crate) mod core;

use std::any::Any;
use std::future::{Future, pending, poll_fn};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use callgate_agent::queue::{self, EventSender, Pushed, SendError};
use callgate_agent::{AgentControl, AgentRun, CallInfo, Commands, PhoneInfo, Spawner, Stamped};
use callgate_proto::detect::{self, Start};
use callgate_proto::{
    AudioFormat, Close, CloseCode, Disconnect, EndReason, Error as ProtoError, Frame, Protocol,
    Session, inbound,
};
use callgate_store::{CallId, NewCall, UnixMillis};
use futures_util::future::CatchUnwind;
use futures_util::task::AtomicWaker;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as Upgrade, Response,
};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use self::core::{AgentExit, CallCore, CoreConfig, Effect, Stats};
use crate::Shared;
use crate::admission::Pending;
use crate::call_auth::{Admission, Refusal as CallRefusal, SignedRequest};
use crate::live::Mailbox;
use crate::media::Media;
use crate::pii::{Pii, Wire};
use crate::record::{Journal, Record};
use crate::routes::{CallFacts, Route};
use crate::tls::CallStream;

type Ws = WebSocketStream<CallStream>;

/// How long a closing connection is read after our close frame, so the peer gets the close
/// (dropping a socket with unread data makes the kernel send a reset that can destroy it).
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// The most bytes read and discarded from a closing connection (the rest of an oversized
/// message, audio sent before the peer saw the close) before it is dropped anyway.
const CLOSE_DRAIN_MAX: usize = 16 << 20;
/// The kernel send buffer of a call's socket (Linux doubles it: 128 KiB, 1.3 s of PCM_48000).
/// Left to itself the kernel grows it to megabytes, which a phone that stopped reading fills
/// for half a minute before a write blocks; bounded, it also bounds the kernel memory a
/// stalled phone holds.
pub(crate) const SEND_BUFFER: usize = 64 * 1024;
/// Pings go out every `write_timeout / PINGS_PER_WRITE_TIMEOUT` (see [`Liveness`]).
const PINGS_PER_WRITE_TIMEOUT: u32 = 4;
/// The most agent commands carried out per turn, so one chatty agent cannot starve its own
/// socket or other calls.
const AGENT_COMMANDS_PER_TURN: usize = 16;
/// How long an ended call waits for its recording to be complete on disk.
const RECORDING_FINISH_WAIT: Duration = Duration::from_secs(2);
/// How long an ended call waits for its agent before cancelling it.
const AGENT_EXIT_WAIT: Duration = Duration::from_secs(1);
/// How much later than needed the call's timer may stay armed rather than be re-armed (it
/// then wakes the call early, finds nothing due and is re-armed).
const TIMER_SLACK: Duration = Duration::from_millis(50);

/// Serves one accepted connection: TLS handshake (on a TLS port), upgrade and first message
/// under one deadline (`handshake_timeout` from accept), then a call slot, then the call.
/// Until its first message makes it a call, the connection holds only its place in the
/// pending budget (`pending`), never a call's slot; at shutdown it is simply dropped.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    pending: Pending,
) {
    let span = tracing::debug_span!("conn", %peer);
    async move {
        let deadline = pending.accepted + shared.config.handshake_timeout;
        let _ = stream.set_nodelay(true);
        if let Err(error) = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER) {
            debug!(%error, "Cannot bound the socket's send buffer.");
        }
        let cancel = shared.cancel.clone();
        // The setup future is boxed: it is large and finishes before the call, so it must not
        // size the task's allocation for the whole call.
        let setup = Box::pin(async {
            // On a TLS port an address the allowlist can never admit is dropped before the
            // handshake, which would cost more than anything it could send. (On a plain port
            // the upgrade answers it 403 with a reason, as cheaply.)
            if shared.tls.is_some() && !shared.call_auth.current().may_come_from(peer.ip()) {
                let refusal = CallRefusal::NotAllowed;
                refused(&shared, refusal.as_str());
                shared.refusal_log.note(refusal, peer.ip());
                return None;
            }
            let stream = crate::tls::call_handshake(&shared, stream, deadline).await?;
            let (mut ws, forced, admitted) = upgrade(&shared, stream, deadline, peer).await?;
            // No call slot is free: refuse now rather than wait for the first message.
            if shared.admission.calls_full() {
                refuse_call(&shared, &mut ws).await;
                return None;
            }
            let start = first_message(&shared, &mut ws, forced, deadline).await?;
            // What the upgrade could not know: whether the call is a Twilio stream.
            if let Err(reason) = shared
                .call_auth
                .current()
                .admits_call(&admitted, start.protocol())
            {
                refused(&shared, "twilio_auth");
                debug!(reason, "Refusing the call: not admitted for its protocol.");
                close(
                    &mut ws,
                    Close::new(CloseCode::POLICY, reason),
                    shared.config.write_timeout,
                )
                .await;
                return None;
            }
            let Some(slot) = shared.admission.call_slot() else {
                refuse_call(&shared, &mut ws).await;
                return None;
            };
            Some((ws, start, slot, admitted))
        });
        let call = tokio::select! {
            _ = cancel.cancelled() => None,
            _ = pending.evicted() => {
                debug!("Dropping the connection: evicted from the full pending budget.");
                None
            }
            call = setup => call,
        };
        drop(pending);
        if let Some((ws, start, slot, admitted)) = call {
            Box::pin(run_call(shared, ws, start, peer, slot, admitted)).await;
        }
    }
    .instrument(span)
    .await
}

/// Refuses a connection because the call limit is reached: close 1013.
async fn refuse_call(shared: &Shared, ws: &mut Ws) {
    refused(shared, "call_limit");
    let reason = format!(
        "call limit reached ({} live calls)",
        shared.config.max_calls
    );
    debug!("Refusing the call: call limit reached.");
    close(
        ws,
        Close::new(CloseCode::TRY_AGAIN_LATER, reason),
        shared.config.write_timeout,
    )
    .await;
}

async fn upgrade(
    shared: &Shared,
    stream: CallStream,
    deadline: Instant,
    peer: SocketAddr,
) -> Option<(Ws, Option<Protocol>, Admission)> {
    let mut path = String::new();
    let auth = shared.call_auth.current();
    let mut admitted = Admission::default();
    let mut refusal = None;
    #[allow(
        clippy::result_large_err,
        reason = "the callback's signature is tungstenite's"
    )]
    let callback = |req: &Upgrade, resp: Response| {
        path = req.uri().path().to_owned();
        if !auth.is_enabled() {
            return Ok(resp);
        }
        let headers = req.headers();
        let forwarded = headers.get_all("x-forwarded-for").into_iter();
        let client = auth.client(peer.ip(), forwarded.map(|v| v.as_bytes()));
        let signed = SignedRequest {
            signature: headers.get("x-twilio-signature").map(|v| v.as_bytes()),
            host: headers.get("host").and_then(|v| v.to_str().ok()),
            path_and_query: req.uri().path_and_query().map_or("/", |pq| pq.as_str()),
            twilio_path: Protocol::from_path(req.uri().path()) == Some(Protocol::Twilio),
        };
        match auth.admit_signed(
            client,
            headers.get("authorization").map(|v| v.as_bytes()),
            headers.get("x-api-key").map(|v| v.as_bytes()),
            req.uri().query(),
            signed,
        ) {
            Ok(admission) => {
                admitted = admission;
                Ok(resp)
            }
            Err(r) => {
                refusal = Some((r, client.unwrap_or(peer.ip())));
                Err(refusal_response(r))
            }
        }
    };
    let accept =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(shared.ws_config));
    let result = timeout_at(deadline, accept).await;
    if let Some((r, client)) = refusal {
        refused(shared, r.as_str());
        shared.refusal_log.note(r, client);
        return None;
    }
    match result {
        Ok(Ok(ws)) => Some((ws, Protocol::from_path(&path), admitted)),
        Ok(Err(error)) => {
            debug!(error = %Wire(&error.to_string()), "WebSocket upgrade failed.");
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

/// The HTTP answer to a refused upgrade: 401 (with `WWW-Authenticate`) or 403, a short reason.
fn refusal_response(r: CallRefusal) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(r.reason().to_owned()));
    *response.status_mut() = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::FORBIDDEN);
    if r.status() == 401 {
        response
            .headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    response
}

fn refused(shared: &Shared, reason: &'static str) {
    shared
        .metrics
        .connections_refused
        .get_or_create(&[("reason", reason)])
        .inc();
}

/// Waits for the start message until `deadline` (the handshake's, from accept). On a bad
/// one, closes with its code and reason.
async fn first_message(
    shared: &Shared,
    ws: &mut Ws,
    forced: Option<Protocol>,
    deadline: Instant,
) -> Option<Start> {
    let limit = shared.config.handshake_timeout;
    // Twilio's call starts with its second message (`start`, after `connected`): the
    // handshake takes messages until a start, all under the one deadline.
    let mut handshake = detect::Handshake::new(forced);
    let result = loop {
        match timeout_at(deadline, ws.next()).await {
            Err(_) => {
                break Err(ProtoError::HandshakeTimeout {
                    ms: limit.as_millis() as u64,
                });
            }
            Ok(None) => return None,
            Ok(Some(Ok(Message::Text(text)))) => match handshake.handle_text(&text) {
                Ok(Some(start)) => break Ok(start),
                Ok(None) => continue,
                Err(error) => break Err(error),
            },
            Ok(Some(Ok(Message::Binary(_)))) => break Err(ProtoError::BinaryBeforeStart),
            Ok(Some(Ok(Message::Close(_)))) => {
                let _ = timeout(shared.config.write_timeout, SinkExt::close(ws)).await;
                return None;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(error))) => match fatal_read_error(&error) {
                Some(e) => break Err(e),
                None => {
                    debug!(error = %Wire(&error.to_string()), "Connection lost before the start message.");
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
            debug!(
                error = %Wire(&error.to_string()),
                code = error.close_code().0,
                "Refusing connection: bad start."
            );
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

/// Sends a close frame (bounded by `write_timeout`), then lingers at most [`CLOSE_LINGER`]
/// so that the peer gets it: reads through the WebSocket until it can read no more (the
/// peer's close arrived, or an earlier read error ended it, as the rest of an oversized
/// message does), then ends our side of the TCP stream (FIN) and reads and discards whatever
/// the peer still sends, at most [`CLOSE_DRAIN_MAX`] bytes, until it closes too. Dropping a
/// socket with unread data makes the kernel send a reset, which can reach the peer before it
/// has read the close frame (it then sees ECONNRESET, often on a write, and never the close).
async fn close(ws: &mut Ws, close: Close, write_timeout: Duration) {
    let frame = CloseFrame {
        code: WsCloseCode::from(close.code.0),
        reason: close.reason.into(),
    };
    if timeout(write_timeout, ws.close(Some(frame))).await.is_err() {
        // The peer does not read: no close frame to save.
        return;
    }
    let _ = timeout(CLOSE_LINGER, async {
        while let Some(Ok(_)) = ws.next().await {}
        let stream = ws.get_mut();
        let _ = stream.shutdown().await;
        let mut scratch = vec![0u8; 16 * 1024];
        let mut drained = 0;
        while drained < CLOSE_DRAIN_MAX {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// What woke the call task.
enum Input {
    Shutdown,
    Socket(Option<Result<Message, WsError>>),
    Agent(Option<Stamped>),
    AgentClear,
    AgentDone(AgentOutcome),
    Operator,
    /// The timer fired: a session deadline, a playout slot or progress.
    Timer,
}

/// The waker of a call's rare inputs (shutdown, operator requests, the agent's clear
/// requests): it raises a flag, then wakes the call task. The task polls those three only when
/// the flag is up, instead of in every turn (polling a waiting `Notified` takes a lock).
#[derive(Debug)]
struct Rare {
    /// One of the rare inputs woke the task (up at first, so that all three register).
    raised: AtomicBool,
    /// The call task.
    task: AtomicWaker,
}

impl Default for Rare {
    fn default() -> Self {
        Self {
            raised: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }
    }
}

impl Wake for Rare {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.raised.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Polls the rare inputs (the first of each pair that is ready gives its input) if the flag
/// says one of them woke the task. They are polled with the flag-raising waker; one that is
/// ready raises the flag again, so the others are looked at in the next turn too.
fn poll_rare<const N: usize>(
    cx: &mut Context<'_>,
    rare: &Rare,
    rare_waker: &Waker,
    inputs: [Option<RareInput<'_>>; N],
) -> Poll<Input> {
    rare.task.register(cx.waker());
    if !rare.raised.swap(false, Ordering::AcqRel) {
        return Poll::Pending;
    }
    let mut rcx = Context::from_waker(rare_waker);
    for (future, input) in inputs.into_iter().flatten() {
        if future.poll(&mut rcx).is_ready() {
            rare.raised.store(true, Ordering::Release);
            return Poll::Ready(input);
        }
    }
    Poll::Pending
}

/// A rare input for [`poll_rare`]: its future, and the input it gives when it is ready.
type RareInput<'a> = (Pin<&'a mut dyn Future<Output = ()>>, Input);

/// A rare input's future, as [`poll_rare`] takes it.
fn rare_input<F: Future<Output = ()>>(future: Pin<&mut F>) -> Pin<&mut dyn Future<Output = ()>> {
    future
}

/// The call's clock (tokio's, so `tokio::time::pause` drives a whole call), as the std
/// `Instant` the sans-IO parts take.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Describes a new call: its record, the agent's view of it, and its session.
fn describe(
    shared: &Shared,
    id: &CallId,
    start: Start,
    route: &Route,
    now: std::time::Instant,
) -> (NewCall, CallInfo, Session) {
    let (phone, caller, callee, external_id, call_config, input, output) = match &start {
        Start::CallBridge(s) => {
            let cc = &s.call_config;
            (
                PhoneInfo::CallBridge(cc.clone()),
                cc.caller.clone(),
                cc.callee.clone(),
                cc.cdr_id.clone(),
                serde_json::to_string(cc).ok(),
                s.audio_format.phone_output,
                s.audio_format.phone_input,
            )
        }
        Start::Inbound(call) => {
            let format: AudioFormat = shared.config.inbound_audio_format;
            (
                PhoneInfo::Inbound {
                    caller_id: call.caller_id.clone(),
                    did_number: call.did_number.clone(),
                    session_id: call.session_id.clone(),
                },
                call.caller_id.clone(),
                call.did_number.clone(),
                call.session_id.clone(),
                None,
                format,
                format,
            )
        }
        Start::Twilio(s) => (
            PhoneInfo::Twilio {
                call_sid: s.info.call_sid.clone(),
                stream_sid: s.info.stream_sid.clone(),
                account_sid: s.info.account_sid.clone(),
                custom_parameters: s.info.custom_parameters.clone(),
            },
            s.caller().to_owned(),
            s.callee().to_owned(),
            s.info.call_sid.clone(),
            twilio_call_config(s),
            AudioFormat::Ulaw8000,
            AudioFormat::Ulaw8000,
        ),
    };
    let config = inbound::Config {
        cdr_timeout: shared.config.cdr_timeout,
    };
    let session = Session::new(now, start, config);
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
        route: Some(route.name.to_string()),
        agent: Some(route.agent.to_string()),
        key_name: None,
        node: Some(shared.config.node_id.clone()),
    };
    let info = CallInfo {
        call_id: id.to_string(),
        protocol,
        caller,
        callee,
        external_id,
        phone,
        route: route.name.to_string(),
        agent: route.agent.to_string(),
        input_format: input,
        output_format: output,
    };
    (record, info, session)
}

/// What a Twilio call's record keeps of its `start` (the record's `call_config` column): the
/// stream's ids and its `customParameters`, as sent.
fn twilio_call_config(start: &callgate_proto::twilio::Start) -> Option<String> {
    serde_json::to_string(&serde_json::json!({
        "streamSid": start.info.stream_sid,
        "accountSid": start.info.account_sid,
        "callSid": start.info.call_sid,
        "customParameters": start.info.custom_parameters,
    }))
    .ok()
}

/// Runs a call; `_slot` is its place in the call limit, held until it ends.
async fn run_call(
    shared: Arc<Shared>,
    mut ws: Ws,
    start: Start,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
    admitted: Admission,
) {
    let id = CallId::new();
    let protocol = start.protocol();
    let span = tracing::info_span!("call", call_id = %id, %protocol, %peer);
    let routes = shared.routes.current();
    // A key limited to some routes only ever reaches those.
    let facts = CallFacts::of(&start);
    let Some(route) = routes
        .route_for(&facts, admitted.routes.as_deref())
        .cloned()
    else {
        return Box::pin(no_route(shared, ws, id, start, admitted.key).instrument(span)).await;
    };
    drop(routes);
    let started = Instant::now();
    let (mut new_call, mut info, session) =
        describe(&shared, &id, start, &route, started.into_std());
    new_call.key_name = admitted.key;
    let (phone_in, phone_out) = (info.input_format, info.output_format);
    let agent_format = route.factory.audio_format();
    if let Some(format) = agent_format {
        info.input_format = format;
        info.output_format = format;
    }
    let call = async move {
        let reveal = shared.config.log_pii;
        info!(
            caller = %Pii::new(&info.caller, reveal),
            callee = %Pii::new(&info.callee, reveal),
            external_id = %Wire(&info.external_id),
            route = %route.name,
            agent = %route.agent,
            "Call started."
        );
        let media = Media::new(
            &shared.media,
            id.as_str(),
            phone_in,
            phone_out,
            agent_format,
            started.into_std(),
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
        let started_wall = new_call.started_at;
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
            started.into_std(),
        );
        let operator = shared.live.register(id.clone(), phone_out);
        // The agent's tasks end with the call (and shutdown waits for them).
        let agent_tasks = CancellationToken::new();
        let spawner = Spawner::new(shared.tasks.tracker(), agent_tasks.clone());
        let (io, mut side) = callgate_agent::wire(info, queue::DEFAULT_CAPACITY, spawner, started);
        // The agent's future is owned and polled by this task (see `Call::run`), after every
        // turn that queued events for it: those pushes need not wake this task again.
        side.events
            .polled_by(poll_fn(|cx| Poll::Ready(cx.waker().clone())).await);
        let agent: AgentFuture = Box::pin(AssertUnwindSafe(route.factory.start(io)).catch_unwind());
        let core = CallCore::new(
            session,
            media,
            Journal::new(started.into_std(), started_wall),
            CoreConfig {
                barge_in: shared.config.barge_in,
            },
        );
        let mut call = Box::new(Call {
            liveness: Liveness::new(Instant::now(), shared.config.write_timeout),
            shared: shared.clone(),
            core,
            record,
            socket_open: true,
            events: Some(side.events),
            control: side.control.clone(),
            told_agent: false,
        });
        call.run(&mut ws, side.commands, side.control, agent, operator)
            .await;
        agent_tasks.cancel();
        shared.live.remove(&id);
    };
    // Boxed: the call's state lives in one heap allocation, not nested in this one.
    Box::pin(call.instrument(span)).await
}

/// Refuses a call no route takes: its record says `no_route`, the phone gets close 1008 with
/// a reason naming what was matched (CallBridge: no `started`; inbound: no `answer`).
async fn no_route(shared: Arc<Shared>, mut ws: Ws, id: CallId, start: Start, key: Option<String>) {
    let facts = CallFacts::of(&start);
    let reason = match &start {
        Start::CallBridge(s) => format!(
            "no route for this call (callbridge agentId {:?}, agentType {:?}, siteId {:?}) and no default route",
            s.call_config.agent_id, s.call_config.agent_type, s.call_config.site_id
        ),
        Start::Inbound(call) => format!(
            "no route for this call (inbound didNumber {:?}) and no default route",
            call.did_number
        ),
        Start::Twilio(s) => format!(
            "no route for this call (twilio callee {:?}) and no default route",
            s.callee()
        ),
    };
    debug!(reason = %Wire(&reason), "Refusing the call: no route.");
    shared.metrics.calls_unrouted.inc();
    let started = Instant::now().into_std();
    let (caller, callee, external_id, call_config, input, output) = match &start {
        Start::CallBridge(s) => (
            s.call_config.caller.clone(),
            s.call_config.callee.clone(),
            s.call_config.cdr_id.clone(),
            serde_json::to_string(&s.call_config).ok(),
            s.audio_format.phone_output,
            s.audio_format.phone_input,
        ),
        Start::Inbound(call) => (
            call.caller_id.clone(),
            call.did_number.clone(),
            call.session_id.clone(),
            None,
            shared.config.inbound_audio_format,
            shared.config.inbound_audio_format,
        ),
        Start::Twilio(s) => (
            s.caller().to_owned(),
            s.callee().to_owned(),
            s.info.call_sid.clone(),
            twilio_call_config(s),
            AudioFormat::Ulaw8000,
            AudioFormat::Ulaw8000,
        ),
    };
    let new_call = NewCall {
        id: id.clone(),
        protocol: facts.protocol.as_str().to_owned(),
        caller,
        callee,
        external_id,
        call_config,
        phone_output_audio_format: input.as_str().to_owned(),
        phone_input_audio_format: output.as_str().to_owned(),
        started_at: UnixMillis::now(),
        recording: false,
        route: None,
        agent: None,
        key_name: key,
        node: Some(shared.config.node_id.clone()),
    };
    let started_wall = new_call.started_at;
    match shared.store.insert_call(new_call).await {
        Ok(()) => {
            let mut record = Record::new(
                id,
                facts.protocol,
                shared.store.clone(),
                shared.metrics.clone(),
                shared.cancel.clone(),
                started,
            );
            let mut journal = Journal::new(started, started_wall);
            journal.event(
                started,
                crate::record::EventKind::Ended,
                serde_json::json!({ "reason": EndReason::NoRoute.as_str() }),
            );
            record.end(started, EndReason::NoRoute, &mut journal).await;
        }
        Err(error) => {
            shared.metrics.store_errors.inc();
            error!(%error, "Could not record a call no route takes.");
        }
    }
    close(
        &mut ws,
        Close::new(CloseCode::POLICY, reason),
        shared.config.write_timeout,
    )
    .await;
}

/// The state the call task owns besides the socket and the agent's future and commands.
struct Call {
    shared: Arc<Shared>,
    core: CallCore,
    record: Record,
    /// Whether the socket may still yield messages.
    socket_open: bool,
    /// How far behind the phone reads.
    liveness: Liveness,
    /// The agent's event queue, until the core closes it (or the agent stopped reading it).
    events: Option<EventSender>,
    /// The epoch shared with the agent, and its clear requests.
    control: AgentControl,
    /// Something was queued for the agent since it was last polled after a turn.
    told_agent: bool,
}

/// Measures how far behind the phone reads, at any audio format and whatever the socket
/// buffers hold: a ping goes out every `write_timeout / 4`, and a phone answers it only once it
/// has read everything sent before it. A phone that has answered a ping before and leaves one
/// unanswered for `write_timeout` is that far behind: it has stopped reading, and the call
/// ends as `send_timeout` (at most 1.25 × `write_timeout` after it stopped). The first ping
/// goes out one interval into the call, after the answer. A phone that has
/// never answered a ping (a non-conforming one) is bounded by the send buffer and the write
/// timeout alone; its unanswered pings are given up, one every `write_timeout`.
#[derive(Debug)]
struct Liveness {
    interval: Duration,
    limit: Duration,
    next_ping: Instant,
    /// The ping not answered yet: its number and when it went out.
    outstanding: Option<(u64, Instant)>,
    sent: u64,
    /// Whether the phone has answered a ping.
    answers: bool,
}

/// What the liveness check asks of the I/O loop.
#[derive(Debug, PartialEq)]
enum Check {
    Nothing,
    /// Send a ping with this payload.
    Ping([u8; 8]),
    /// The phone has stopped reading.
    Stalled,
}

impl Liveness {
    fn new(now: Instant, write_timeout: Duration) -> Self {
        let interval = (write_timeout / PINGS_PER_WRITE_TIMEOUT).max(Duration::from_millis(50));
        Self {
            interval,
            limit: write_timeout,
            // Not at once: the answer goes first.
            next_ping: now + interval,
            outstanding: None,
            sent: 0,
            answers: false,
        }
    }

    /// When [`Liveness::check`] has something to do.
    fn deadline(&self) -> Instant {
        self.outstanding
            .map_or(self.next_ping, |(_, sent)| sent + self.limit)
    }

    fn check(&mut self, now: Instant) -> Check {
        if let Some((_, sent)) = self.outstanding {
            if now < sent + self.limit {
                return Check::Nothing;
            }
            if self.answers {
                return Check::Stalled;
            }
            self.outstanding = None;
        }
        if now < self.next_ping {
            return Check::Nothing;
        }
        self.sent += 1;
        self.outstanding = Some((self.sent, now));
        self.next_ping = now + self.interval;
        Check::Ping(self.sent.to_be_bytes())
    }

    /// A pong arrived (a phone may also send unsolicited ones: only an answer counts).
    fn pong(&mut self, payload: &[u8]) {
        let Ok(n) = <[u8; 8]>::try_from(payload).map(u64::from_be_bytes) else {
            return;
        };
        if n == 0 || n > self.sent {
            return;
        }
        self.answers = true;
        if self.outstanding.is_some_and(|(m, _)| m == n) {
            self.outstanding = None;
        }
    }
}

impl Call {
    async fn run(
        &mut self,
        ws: &mut Ws,
        mut commands: Commands,
        control: AgentControl,
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
        // How the agent's future ended, until the commands it sent before are carried out.
        let mut exit: Option<AgentExit> = None;
        let mut commands_open = true;
        let mut shutting_down = false;
        let cancel = self.shared.cancel.clone();
        // Created once: re-creating it every turn would register a waiter every turn.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        // Likewise for the operator mailbox and the agent's clear requests.
        let posted = operator.notified();
        tokio::pin!(posted);
        let clear_signal = control.notified();
        tokio::pin!(clear_signal);
        // The three rare inputs are polled only when one of them woke the task (see `Rare`).
        let rare = Arc::new(Rare::default());
        let rare_waker = Waker::from(rare.clone());
        let mut closed_by_us = false;

        while !self.core.is_closed() {
            let deadline = self
                .core
                .poll_timeout()
                .map_or(next_progress, |d| Instant::from_std(d).min(next_progress));
            let deadline = if self.watches_liveness() {
                deadline.min(self.liveness.deadline())
            } else {
                deadline
            };
            // Moved earlier at once; moved later only by more than TIMER_SLACK: an echo moves
            // the playout's gap deadline 20 ms later with every frame, and re-arming the timer
            // each time costs more than the rare early wake-up (which finds nothing due and
            // re-arms it).
            let armed = timer.deadline();
            if deadline < armed || deadline > armed + TIMER_SLACK || timer.is_elapsed() {
                timer.as_mut().reset(deadline);
            }
            // Audio from the agent is taken only while the playout has room: its backpressure.
            let take_commands = commands_open && self.core.takes_agent_commands();
            // Not biased: a phone's burst must not starve the agent's output (or the reverse),
            // so the branches are polled in random order.
            let input = tokio::select! {
                input = poll_fn(|cx| {
                    poll_rare(
                        cx,
                        &rare,
                        &rare_waker,
                        [
                            (!shutting_down).then(|| (rare_input(cancelled.as_mut()), Input::Shutdown)),
                            Some((rare_input(posted.as_mut()), Input::Operator)),
                            Some((rare_input(clear_signal.as_mut()), Input::AgentClear)),
                        ],
                    )
                }) => input,
                r = poll_agent(&mut agent) => Input::AgentDone(r),
                m = ws.next(), if self.socket_open => Input::Socket(m),
                c = poll_fn(|cx| commands.poll_recv(cx)), if take_commands => Input::Agent(c),
                _ = &mut timer => Input::Timer,
            };
            // This task polls the agent and looks for commands again before it sleeps: what
            // the agent sends until then need not wake it.
            commands.busy();
            let now = now();
            match input {
                Input::Shutdown => {
                    shutting_down = true;
                    self.core.handle_shutdown(now);
                }
                Input::AgentDone(outcome) => {
                    agent = None;
                    exit = Some(exit_of(outcome));
                }
                Input::Socket(message) => self.socket_input(now, message),
                // More of what the agent queued is taken right below, bounded per turn.
                Input::Agent(Some(command)) => self.agent_command(now, command),
                Input::Agent(None) => commands_open = false,
                Input::AgentClear => {
                    clear_signal.set(control.notified());
                    self.agent_clear(now);
                }
                Input::Operator => {
                    posted.set(operator.notified());
                    while let Some(op) = operator.try_recv() {
                        let reply = self.core.handle_operator(now, op.request);
                        let _ = op.reply.send(reply);
                    }
                }
                Input::Timer => {
                    self.core.handle_timeout(now);
                    let at = Instant::from_std(now);
                    if at >= next_progress {
                        next_progress = at + interval;
                        self.progress();
                    }
                    self.check_liveness(ws).await;
                }
            }
            if self.drain(ws).await {
                closed_by_us = true;
            }
            // Let the agent react to what this turn queued for it, and carry out its commands,
            // in this same turn: an echo costs one trip through the select, not two.
            if !self.core.is_closed() {
                // Only if this turn told it something: otherwise it has nothing new to react
                // to (what wakes it on its own wakes this task, whose select polls it).
                if std::mem::take(&mut self.told_agent)
                    && let Some(a) = agent.as_mut()
                    && let Poll::Ready(outcome) =
                        poll_fn(|cx| Poll::Ready(a.as_mut().poll(cx))).await
                {
                    agent = None;
                    exit = Some(exit_of(outcome));
                }
                let mut drained = false;
                for _ in 0..AGENT_COMMANDS_PER_TURN {
                    if !self.core.takes_agent_commands() {
                        break;
                    }
                    match commands.try_recv() {
                        Some(command) => self.agent_command(now, command),
                        None => {
                            drained = true;
                            break;
                        }
                    }
                }
                // An agent that returned is done once what it sent before returning has been
                // carried out (its last words, keys, record entries); a failure ends at once.
                if let Some(e) = exit.take_if(|e| drained || *e != AgentExit::Returned) {
                    self.core.handle_agent_exit(now, e);
                }
                if self.drain(ws).await {
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
        // The agent sees its queue close and returns; give it a moment (taking what it still
        // writes to the record), then drop it, which cancels it wherever it is.
        self.core.finish();
        self.events = None;
        if let Some(mut agent) = agent {
            let wait = async {
                loop {
                    tokio::select! {
                        _ = &mut agent => break,
                        Some(command) = commands.recv() => {
                            self.agent_command(now(), command);
                        }
                    }
                }
            };
            if timeout(AGENT_EXIT_WAIT, wait).await.is_err() {
                warn!("Agent did not stop after the call ended; cancelling it.");
            }
        }
        while let Some(command) = commands.try_recv() {
            self.agent_command(now(), command);
        }
        if !self.core.has_ended() {
            // Every session path emits Ended before it closes; this is the safety net.
            error!("Call closed without an end reason.");
            Box::pin(
                self.record
                    .end(now(), EndReason::InternalError, self.core.journal()),
            )
            .await;
        }
        self.merge_stats();
        Box::pin(self.record.flush(self.core.journal())).await;
    }

    /// A command from the agent. A clear the agent asked for before sending it applies first.
    fn agent_command(&mut self, now: std::time::Instant, command: Stamped) {
        self.agent_clear(now);
        self.core.handle_agent_command(now, command);
    }

    /// Hands the agent's clear request, if it made one, to the core with the agent's epoch.
    fn agent_clear(&mut self, now: std::time::Instant) {
        if self.control.take_clear_request() {
            self.core.handle_agent_clear(now, self.control.epoch());
        }
    }

    /// Whether the phone's reading is watched: while the call is live (after its end, e.g.
    /// waiting for an inbound CDR, a gateway need not read).
    fn watches_liveness(&self) -> bool {
        self.socket_open && !self.core.has_ended()
    }

    /// Pings the phone when due; ends the call if it has stopped reading.
    async fn check_liveness(&mut self, ws: &mut Ws) {
        if !self.watches_liveness() {
            return;
        }
        match self.liveness.check(Instant::now()) {
            Check::Nothing => {}
            Check::Ping(payload) => {
                let ping = Message::Ping(bytes::Bytes::copy_from_slice(&payload));
                self.write(ws, ping).await;
            }
            Check::Stalled => {
                debug!(
                    limit = ?self.liveness.limit,
                    "The phone has not answered a ping in time; it stopped reading."
                );
                self.stalled("ping");
                self.socket_open = false;
                self.core.handle_peer_close(now(), Disconnect::SendTimeout);
            }
        }
    }

    fn stalled(&self, detected_by: &'static str) {
        self.shared
            .metrics
            .send_timeouts
            .get_or_create(&[("detected_by", detected_by)])
            .inc();
    }

    /// Writes one message under `write_timeout`; a failure ends the call as the peer's.
    async fn write(&mut self, ws: &mut Ws, message: Message) {
        let mut send = std::pin::pin!(ws.send(message));
        // Almost every write completes at once: the timer (a clock read and a timer entry)
        // is set up only for one that has to wait.
        let sent = match poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await {
            Poll::Ready(result) => Ok(result),
            Poll::Pending => timeout(self.shared.config.write_timeout, send).await,
        };
        let failure = match sent {
            Ok(Ok(())) => None,
            Ok(Err(error)) => {
                debug!(%error, "Write failed.");
                Some(Disconnect::Dropped)
            }
            Err(_) => {
                debug!("Write timed out.");
                self.stalled("write");
                Some(Disconnect::SendTimeout)
            }
        };
        if let Some(how) = failure {
            self.socket_open = false;
            self.core.handle_peer_close(now(), how);
        }
    }

    fn socket_input(&mut self, now: std::time::Instant, message: Option<Result<Message, WsError>>) {
        match message {
            Some(Ok(Message::Pong(payload))) => self.liveness.pong(&payload),
            Some(Ok(Message::Binary(data))) => self.core.handle_binary(now, data),
            Some(Ok(Message::Text(text))) => self.core.handle_text(now, &text),
            Some(Ok(Message::Close(_))) => {
                self.socket_open = false;
                self.core.handle_peer_close(now, Disconnect::Closed);
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => match fatal_read_error(&error) {
                // The socket can still carry our close frame with the reason.
                Some(e) => self.core.handle_violation(now, e),
                None => {
                    debug!(%error, "Connection lost.");
                    self.socket_open = false;
                    self.core.handle_peer_close(now, Disconnect::Dropped);
                }
            },
            None => {
                self.socket_open = false;
                self.core.handle_peer_close(now, Disconnect::Dropped);
            }
        }
    }

    /// Carries out the core's effects. Returns true if it sent a close frame.
    async fn drain(&mut self, ws: &mut Ws) -> bool {
        let write_timeout = self.shared.config.write_timeout;
        while let Some(effect) = self.core.poll_output() {
            match effect {
                Effect::Send(frame) => {
                    let message = match frame {
                        Frame::Binary(data) => Message::Binary(data),
                        Frame::Text(text) => Message::Text(text.into()),
                    };
                    if !self.socket_open {
                        continue;
                    }
                    self.write(ws, message).await;
                }
                Effect::Close(frame) => {
                    // The record is complete before the phone sees the close.
                    Box::pin(self.record.flush(self.core.journal())).await;
                    if self.socket_open {
                        Box::pin(close(ws, frame, write_timeout)).await;
                        self.socket_open = false;
                    }
                    return true;
                }
                Effect::Answered => self.record.answered(UnixMillis::now()),
                Effect::Ended(reason) => {
                    info!(end_reason = %reason, "Call ended.");
                    // The record says the call has a recording: it is complete before the end.
                    if let Some(finished) = self.core.take_recording() {
                        match timeout(RECORDING_FINISH_WAIT, finished).await {
                            Ok(Ok(())) => {}
                            Ok(Err(error)) => {
                                warn!(%error, "The recording could not be completed.")
                            }
                            Err(_) => warn!(
                                "The recording writer is behind; ending the record before the file is complete."
                            ),
                        }
                    }
                    self.merge_stats();
                    Box::pin(self.record.end(now(), reason, self.core.journal())).await;
                }
                Effect::Cdr(raw) => Box::pin(self.record.cdr(raw)).await,
                Effect::AgentAudio(data) => {
                    self.told_agent = true;
                    if let Some(events) = &self.events
                        && events.push_audio(data) == Pushed::DroppedOldest
                    {
                        self.core.handle_agent_audio_dropped();
                    }
                }
                Effect::AgentEvent(event) => {
                    self.told_agent = true;
                    if let Some(events) = &self.events
                        && events.try_send_control(event) == Err(SendError::Full)
                    {
                        // Not reading: it is told nothing more (its queue closes) and the core
                        // ends the call.
                        self.events = None;
                        self.core.handle_agent_stuck(now());
                    }
                }
                Effect::AdvanceEpoch => {
                    let epoch = self.control.advance_epoch();
                    self.core.handle_epoch(now(), epoch);
                }
                Effect::CloseAgent => {
                    self.told_agent = true;
                    self.events = None;
                }
            }
        }
        self.record.offer(self.core.journal());
        false
    }

    /// The periodic write: record, recording, metrics.
    fn progress(&mut self) {
        self.record.progress(self.core.journal());
        self.core.sync_recording();
        self.merge_stats();
        self.shared
            .metrics
            .playout_queue_depth
            .observe(self.core.queued_ms() as f64 / 1000.0);
    }

    /// Adds the call's own counts to the server's metrics.
    fn merge_stats(&mut self) {
        let mut stats: Stats = self.core.take_stats();
        let m = &self.shared.metrics;
        m.playout_jitter.merge(&mut stats.jitter);
        let dropped = self.core.take_recording_dropped();
        if dropped > 0 {
            m.recording_batches_dropped.inc_by(dropped);
        }
        let underruns = self.core.take_underruns();
        if underruns > 0 {
            m.playout_underruns.inc_by(underruns);
        }
        if stats.barge_ins > 0 {
            m.barge_ins.inc_by(stats.barge_ins);
        }
        if stats.stalls > 0 {
            m.playout_stalls.inc_by(stats.stalls);
        }
        // Apart: a stall's late audio is dropped as its backlog comes in, which can be after
        // the merge that counted the stall.
        if stats.stall_dropped_ms > 0 {
            m.playout_stall_dropped
                .inc_by(stats.stall_dropped_ms as f64 / 1000.0);
        }
        if stats.record_dropped > 0 {
            m.record_entries_dropped.inc_by(stats.record_dropped);
        }
        if stats.agent_audio_dropped > 0 {
            m.agent_audio_dropped.inc_by(stats.agent_audio_dropped);
        }
        for (source, n) in [
            ("protocol", stats.dtmf_protocol),
            ("inband", stats.dtmf_inband),
        ] {
            if n > 0 {
                m.dtmf.get_or_create(&[("source", source)]).inc_by(n);
            }
        }
        for kind in stats.protocol_errors {
            m.protocol_errors.get_or_create(&[("kind", kind)]).inc();
        }
        for command in stats.refused {
            m.agent_commands_refused
                .get_or_create(&[("command", command)])
                .inc();
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

fn exit_of(outcome: AgentOutcome) -> AgentExit {
    match outcome {
        Ok(Ok(())) => AgentExit::Returned,
        Ok(Err(error)) => {
            warn!(%error, "Agent failed.");
            AgentExit::Failed(error.to_string())
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            error!(error = %message, "Agent panicked.");
            AgentExit::Failed(format!("agent panicked: {message}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phone_that_answers_pings_is_stalled_once_one_goes_unanswered_for_the_limit() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Liveness::new(t0, ms(2000));
        assert_eq!(l.deadline(), t0 + ms(500));
        assert_eq!(l.check(t0), Check::Nothing);
        assert_eq!(l.check(t0 + ms(500)), Check::Ping(1u64.to_be_bytes()));
        assert_eq!(l.deadline(), t0 + ms(2500));
        assert_eq!(l.check(t0 + ms(600)), Check::Nothing);
        l.pong(&1u64.to_be_bytes());
        assert_eq!(l.deadline(), t0 + ms(1000));
        assert_eq!(l.check(t0 + ms(1000)), Check::Ping(2u64.to_be_bytes()));
        // Unsolicited or foreign pongs do not count as an answer.
        l.pong(b"hello");
        l.pong(&7u64.to_be_bytes());
        assert_eq!(l.check(t0 + ms(2999)), Check::Nothing);
        assert_eq!(l.check(t0 + ms(3000)), Check::Stalled);
    }

    #[test]
    fn a_phone_that_never_answers_pings_is_not_judged_by_them() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Liveness::new(t0, ms(2000));
        assert_eq!(l.check(t0 + ms(500)), Check::Ping(1u64.to_be_bytes()));
        assert_eq!(l.check(t0 + ms(2500)), Check::Ping(2u64.to_be_bytes()));
        assert_eq!(l.check(t0 + ms(4500)), Check::Ping(3u64.to_be_bytes()));
        // A late answer to an old ping proves the phone answers: the current one now counts.
        l.pong(&2u64.to_be_bytes());
        assert_eq!(l.check(t0 + ms(6500)), Check::Stalled);
    }
}
