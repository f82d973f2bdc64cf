//! A call's set-up, once its first message made it one: routing, the record (inserted, and
//! the insert awaited, before the call is answered), the agent's view of the call, its audio,
//! and the hand-over to the driver. A call no route takes is refused here, and recorded.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;

use callgate_agent::queue;
use callgate_agent::{CallInfo, PhoneInfo, Spawner};
use callgate_proto::detect::Start;
use callgate_proto::{AudioFormat, Close, CloseCode, EndReason, Session, inbound};
use callgate_store::{CallId, NewCall, UnixMillis};
use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info};

use super::CallContext;
use super::Ws;
use super::close::close;
use super::core::{CallCore, CoreConfig};
use super::driver::{AgentFuture, Call};
use super::media::Media;
use super::record::{EventKind, Journal, Record};
use crate::call_auth::Admission;
use crate::pii::{Pii, Wire};
use crate::routes::{CallFacts, Route};

/// Describes a new call: its record, the agent's view of it, and its session.
fn describe(
    ctx: &CallContext,
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
            let format: AudioFormat = ctx.settings.inbound_audio_format;
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
        cdr_timeout: ctx.settings.cdr_timeout,
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
        node: Some(ctx.settings.node_id.clone()),
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
pub(super) async fn run_call(
    ctx: Arc<CallContext>,
    mut ws: Ws,
    start: Start,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
    admitted: Admission,
) {
    let id = CallId::new();
    let protocol = start.protocol();
    let span = tracing::info_span!("call", call_id = %id, %protocol, %peer);
    let routes = ctx.routes.current();
    // A key limited to some routes only ever reaches those.
    let facts = CallFacts::of(&start);
    let Some(route) = routes
        .route_for(&facts, admitted.routes.as_deref())
        .cloned()
    else {
        return Box::pin(no_route(ctx, ws, id, start, admitted.key).instrument(span)).await;
    };
    drop(routes);
    let started = Instant::now();
    let (mut new_call, mut info, session) = describe(&ctx, &id, start, &route, started.into_std());
    new_call.key_name = admitted.key;
    let (phone_in, phone_out) = (info.input_format, info.output_format);
    let agent_format = route.factory.audio_format();
    if let Some(format) = agent_format {
        info.input_format = format;
        info.output_format = format;
    }
    let call = async move {
        let reveal = ctx.settings.log_pii;
        info!(
            caller = %Pii::new(&info.caller, reveal),
            callee = %Pii::new(&info.callee, reveal),
            external_id = %Wire(&info.external_id),
            route = %route.name,
            agent = %route.agent,
            "Call started."
        );
        let media = Media::new(
            &ctx.media,
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
                    ctx.settings.write_timeout,
                )
                .await;
                return;
            }
        };
        new_call.recording = media.is_recorded();
        let started_wall = new_call.started_at;
        // A call exists only once its record does: refuse it if the store cannot take it.
        if let Err(error) = Box::pin(ctx.store.insert_call(new_call)).await {
            ctx.metrics.store_errors.inc();
            error!(%error, "Could not insert the call record; refusing the call.");
            close(
                &mut ws,
                Close::new(CloseCode::INTERNAL, "call record store unavailable"),
                ctx.settings.write_timeout,
            )
            .await;
            return;
        }
        let record = Record::new(
            id.clone(),
            protocol,
            ctx.store.clone(),
            ctx.metrics.clone(),
            ctx.cancel.clone(),
            started.into_std(),
        );
        let operator = ctx.live.register(id.clone(), phone_out);
        // The agent's tasks end with the call (and shutdown waits for them).
        let agent_tasks = CancellationToken::new();
        let spawner = Spawner::new(ctx.tasks.tracker(), agent_tasks.clone());
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
                barge_in: ctx.settings.barge_in,
            },
        );
        let mut call = Box::new(Call::new(
            ctx.clone(),
            core,
            record,
            side.events,
            side.control.clone(),
        ));
        call.run(&mut ws, side.commands, side.control, agent, operator)
            .await;
        agent_tasks.cancel();
        ctx.live.remove(&id);
    };
    // Boxed: the call's state lives in one heap allocation, not nested in this one.
    Box::pin(call.instrument(span)).await
}

/// Refuses a call no route takes: its record says `no_route`, the phone gets close 1008 with
/// a reason naming what was matched (CallBridge: no `started`; inbound: no `answer`).
async fn no_route(
    ctx: Arc<CallContext>,
    mut ws: Ws,
    id: CallId,
    start: Start,
    key: Option<String>,
) {
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
    ctx.metrics.calls_unrouted.inc();
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
            ctx.settings.inbound_audio_format,
            ctx.settings.inbound_audio_format,
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
        node: Some(ctx.settings.node_id.clone()),
    };
    let started_wall = new_call.started_at;
    match ctx.store.insert_call(new_call).await {
        Ok(()) => {
            let mut record = Record::new(
                id,
                facts.protocol,
                ctx.store.clone(),
                ctx.metrics.clone(),
                ctx.cancel.clone(),
                started,
            );
            let mut journal = Journal::new(started, started_wall);
            journal.event(
                started,
                EventKind::Ended,
                serde_json::json!({ "reason": EndReason::NoRoute.as_str() }),
            );
            record.end(started, EndReason::NoRoute, &mut journal).await;
        }
        Err(error) => {
            ctx.metrics.store_errors.inc();
            error!(%error, "Could not record a call no route takes.");
        }
    }
    close(
        &mut ws,
        Close::new(CloseCode::POLICY, reason),
        ctx.settings.write_timeout,
    )
    .await;
}
