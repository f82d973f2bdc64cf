//! A call's set-up, once its first message made it one: routing, the record (inserted, and
//! the insert awaited, before the call is answered), the agent's view of the call, its audio,
//! and the hand-over to the driver. A call no route takes is refused here, and recorded.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use callgate_agent::queue;
use callgate_agent::{CallInfo, PhoneInfo, Spawner};
use callgate_proto::detect::Start;
use callgate_proto::{Close, CloseCode, EndReason, Session, inbound};
use callgate_store::{CallId, NewCall, UnixMillis};
use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info};

use super::Ws;
use super::close::close;
use super::core::{CallCore, CoreConfig};
use super::driver::{AgentFuture, Call};
use super::media::{LineFormats, Media};
use super::record::{EventKind, Journal, Record};
use super::{CallContext, Settings};
use crate::call_auth::Admission;
use crate::pii::{Escaped, Pii};
use crate::routes::{CallFacts, Route};

/// A new call's record: what its start message says of it (caller, callee, the phone
/// system's id, its call configuration, the line's formats), the route that took it (`None`:
/// none did, and the call is refused as `no_route`), the key it was admitted with, and this
/// node. Routed or not, a call's record comes from here, so the two say the same of a call.
pub(super) fn new_call(
    id: &CallId,
    start: &Start,
    route: Option<&Route>,
    key: Option<String>,
    settings: &Settings,
) -> NewCall {
    let (caller, callee, external_id, call_config) = match start {
        Start::CallBridge(s) => {
            let cc = &s.call_config;
            (
                cc.caller.clone(),
                cc.callee.clone(),
                cc.cdr_id.clone(),
                serde_json::to_string(cc).ok(),
            )
        }
        Start::Inbound(call) => (
            call.caller_id.clone(),
            call.did_number.clone(),
            call.session_id.clone(),
            None,
        ),
        Start::Twilio(s) => (
            s.caller().to_owned(),
            s.callee().to_owned(),
            s.info.call_sid.clone(),
            twilio_call_config(s),
        ),
    };
    let formats = LineFormats::of(start, settings.inbound_audio_format);
    NewCall {
        id: id.clone(),
        protocol: start.protocol().as_str().to_owned(),
        caller,
        callee,
        external_id,
        call_config,
        phone_output_audio_format: formats.caller_audio.as_str().to_owned(),
        phone_input_audio_format: formats.agent_audio.as_str().to_owned(),
        started_at: UnixMillis::now(),
        // Set once the call's audio (and so its recorder) exists.
        recording: false,
        route: route.map(|r| r.name.to_string()),
        agent: route.map(|r| r.agent.to_string()),
        key_name: key,
        node: Some(settings.node_id.clone()),
    }
}

/// The agent's view of a routed call (from its record) and the call's protocol session.
fn describe(
    settings: &Settings,
    record: &NewCall,
    start: Start,
    route: &Route,
    formats: LineFormats,
    now: std::time::Instant,
) -> (CallInfo, Session) {
    let phone = match &start {
        Start::CallBridge(s) => PhoneInfo::CallBridge(s.call_config.clone()),
        Start::Inbound(call) => PhoneInfo::Inbound {
            caller_id: call.caller_id.clone(),
            did_number: call.did_number.clone(),
            session_id: call.session_id.clone(),
        },
        Start::Twilio(s) => PhoneInfo::Twilio {
            call_sid: s.info.call_sid.clone(),
            stream_sid: s.info.stream_sid.clone(),
            account_sid: s.info.account_sid.clone(),
            custom_parameters: s.info.custom_parameters.clone(),
        },
    };
    let config = inbound::Config {
        cdr_timeout: settings.cdr_timeout,
    };
    let session = Session::new(now, start, config);
    let info = CallInfo {
        call_id: record.id.to_string(),
        protocol: session.protocol(),
        caller: record.caller.clone(),
        callee: record.callee.clone(),
        external_id: record.external_id.clone(),
        phone,
        route: route.name.to_string(),
        agent: route.agent.to_string(),
        input_format: formats.caller_audio,
        output_format: formats.agent_audio,
    };
    (info, session)
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
    let formats = LineFormats::of(&start, ctx.settings.inbound_audio_format);
    let mut new_call = new_call(&id, &start, Some(&route), admitted.key, &ctx.settings);
    let (mut info, session) = describe(
        &ctx.settings,
        &new_call,
        start,
        &route,
        formats,
        started.into_std(),
    );
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
            external_id = %Escaped(&info.external_id),
            route = %route.name,
            agent = %route.agent,
            "Call started."
        );
        let media = Media::new(
            &ctx.media,
            id.as_str(),
            formats,
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
        let operator = ctx.live.register(id.clone(), formats.agent_audio);
        // The agent's tasks end with the call (and shutdown waits for them).
        let agent_tasks = CancellationToken::new();
        let spawner = Spawner::new(ctx.tasks.tracker(), agent_tasks.clone());
        // The agent's future is owned and polled by this task (see `Call::run`).
        let (io, side) = callgate_agent::wire(info, queue::DEFAULT_CAPACITY, spawner, started);
        let agent: AgentFuture = AssertUnwindSafe(route.factory.start(io)).catch_unwind();
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
    debug!(reason = %Escaped(&reason), "Refusing the call: no route.");
    ctx.metrics.calls_unrouted.inc();
    let started = Instant::now().into_std();
    let protocol = start.protocol();
    let new_call = new_call(&id, &start, None, key, &ctx.settings);
    let started_wall = new_call.started_at;
    match ctx.store.insert_call(new_call).await {
        Ok(()) => {
            let mut record = Record::new(
                id,
                protocol,
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

#[cfg(test)]
mod tests {
    use callgate_agent::echo::EchoFactory;
    use callgate_proto::AudioFormat;
    use callgate_proto::detect::Handshake;

    use super::*;
    use crate::config::Config;
    use crate::routes::RouteTable;

    fn start(messages: &[&str]) -> Start {
        let mut handshake = Handshake::new(None);
        messages
            .iter()
            .find_map(|m| handshake.handle_text(m).expect("a valid start"))
            .expect("a start message")
    }

    #[test]
    fn an_unrouted_calls_record_says_what_a_routed_ones_does() {
        let settings = Settings::of(&Config {
            node_id: "node-a".into(),
            inbound_audio_format: AudioFormat::Pcm16000,
            ..Config::default()
        });
        let callbridge = start(&[
            r#"{"call_config":{"siteId":"s","caller":"010","callee":"070","cdrId":"cdr-1","callActionId":"1.5E9","ivrIp":"10.0.0.1:5","agentId":"a","agentType":"voice"},"audio_format":{"phone_output_audio_format":"PCM_16000","phone_input_audio_format":"PCM_8000"}}"#,
        ]);
        let inbound = start(&[
            r#"{"event":"incoming_call","callerId":"0101","didNumber":"0202","sessionId":"s-1"}"#,
        ]);
        let twilio = start(&[
            r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#,
            r#"{"event":"start","sequenceNumber":"1","streamSid":"MZ1","start":{"streamSid":"MZ1","accountSid":"AC1","callSid":"CA1","tracks":["inbound"],"customParameters":{"from":"+1555","to":"+1666"},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#,
        ]);
        // What each start message says: caller, callee, external id, caller audio, agent audio.
        let expected = [
            (
                &callbridge,
                "callbridge",
                "010",
                "070",
                "cdr-1",
                "PCM_16000",
                "PCM_8000",
            ),
            (
                &inbound,
                "inbound",
                "0101",
                "0202",
                "s-1",
                "PCM_16000",
                "PCM_16000",
            ),
            (
                &twilio,
                "twilio",
                "+1555",
                "+1666",
                "CA1",
                "ULAW_8000",
                "ULAW_8000",
            ),
        ];
        let table = RouteTable::single("main", Arc::new(EchoFactory));
        for (start, protocol, caller, callee, external, caller_audio, agent_audio) in expected {
            let route = table
                .route_for(&CallFacts::of(start), None)
                .expect("the default route");
            let id = CallId::new();
            let routed = new_call(&id, start, Some(route), Some("k".into()), &settings);
            let unrouted = new_call(&id, start, None, Some("k".into()), &settings);
            for record in [&routed, &unrouted] {
                assert_eq!(record.protocol, protocol);
                assert_eq!(
                    (
                        record.caller.as_str(),
                        record.callee.as_str(),
                        record.external_id.as_str()
                    ),
                    (caller, callee, external),
                    "{protocol}"
                );
                assert_eq!(
                    (
                        record.phone_output_audio_format.as_str(),
                        record.phone_input_audio_format.as_str()
                    ),
                    (caller_audio, agent_audio),
                    "{protocol}: phone_output is the caller's audio"
                );
                assert_eq!(record.key_name.as_deref(), Some("k"));
                assert_eq!(record.node.as_deref(), Some("node-a"));
            }
            assert_eq!(routed.call_config, unrouted.call_config, "{protocol}");
            assert_eq!(routed.call_config.is_some(), protocol != "inbound");
            assert_eq!(
                (routed.route.as_deref(), routed.agent.as_deref()),
                (Some("main"), Some("echo"))
            );
            assert_eq!((unrouted.route, unrouted.agent), (None, None));
            // Everything else is the same.
            let unrouted = NewCall {
                route: routed.route.clone(),
                agent: routed.agent.clone(),
                started_at: routed.started_at,
                ..new_call(&id, start, None, Some("k".into()), &settings)
            };
            assert_eq!(unrouted, routed, "{protocol}");
        }
    }
}
