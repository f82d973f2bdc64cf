//! A connection on the call port until it is a call: the new connection taken or turned away
//! ([`take`]), the TLS handshake, the WebSocket upgrade (with the call port's keys and
//! allowlist: a refusal is an HTTP answer, before any WebSocket exists), the first message,
//! and a call slot. Everything until the first message runs under one deadline
//! (`handshake_timeout` from accept), holding only a place in the pending budget.

use std::net::SocketAddr;
use std::sync::Arc;

use callgate_proto::detect::{self, Start};
use callgate_proto::{Close, CloseCode, Error as ProtoError, Protocol};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request as Upgrade, Response};
use tracing::{Instrument, debug};

use super::CallContext;
use super::admission::{self, Pending};
use super::close::close;
use super::refusal;
use super::setup::run_call;
use super::{Ws, fatal_read_error};
use crate::Phase;
use crate::call_auth::{Admission, Refusal as CallRefusal, SignedRequest};
use crate::pii::Escaped;
use crate::tls::CallStream;

/// The kernel send buffer of a call's socket (Linux doubles it: 128 KiB, 1.3 s of PCM_48000).
/// Left to itself the kernel grows it to megabytes, which a phone that stopped reading fills
/// for half a minute before a write blocks; bounded, it also bounds the kernel memory a
/// stalled phone holds.
const SEND_BUFFER: usize = 64 * 1024;

/// A new connection: served while the node takes calls, refused while it drains (`503` with
/// `Retry-After` to its upgrade request), or turned away at once when the pending budget has
/// no place for it.
pub(crate) fn take(ctx: &Arc<CallContext>, phase: Phase, stream: TcpStream, peer: SocketAddr) {
    let refuse = |reason: &'static str| {
        ctx.metrics
            .connections_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    };
    match ctx.budgets.admit(peer.ip()) {
        Ok(pending) if phase.takes_calls() => {
            let counted = Counted::new(ctx);
            let serve = serve(ctx.clone(), stream, peer, pending);
            ctx.tasks.spawn(async move {
                serve.await;
                drop(counted);
            });
        }
        Ok(pending) => {
            refuse("draining");
            ctx.tasks.spawn(admission::refuse_draining(
                ctx.clone(),
                stream,
                peer,
                pending,
            ));
        }
        Err(refusal) => {
            refuse(refusal.as_str());
            // A TLS client could not read a plain 503: it just sees the connection close.
            admission::turn_away(stream, refusal, ctx.tls.is_none());
        }
    }
}

/// A connection the server serves, counted from accept until its task ends (a drain waits for
/// the count to reach zero).
struct Counted(Arc<CallContext>);

impl Counted {
    fn new(ctx: &Arc<CallContext>) -> Self {
        ctx.connections.send_modify(|n| *n += 1);
        Self(ctx.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.send_modify(|n| *n -= 1);
    }
}

/// Serves one accepted connection: TLS handshake (on a TLS port), upgrade and first message
/// under one deadline (`handshake_timeout` from accept), then a call slot, then the call.
/// Until its first message makes it a call, the connection holds only its place in the
/// pending budget (`pending`), never a call's slot; at shutdown it is simply dropped.
async fn serve(ctx: Arc<CallContext>, stream: TcpStream, peer: SocketAddr, pending: Pending) {
    let span = tracing::debug_span!("conn", %peer);
    async move {
        let deadline = pending.accepted + ctx.settings.handshake_timeout;
        let _ = stream.set_nodelay(true);
        if let Err(error) = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER) {
            debug!(%error, "Cannot bound the socket's send buffer.");
        }
        let cancel = ctx.cancel.clone();
        // The setup future is boxed: it is large and finishes before the call, so it must not
        // size the task's allocation for the whole call.
        let setup = Box::pin(async {
            // On a TLS port an address the allowlist can never admit is dropped before the
            // handshake, which would cost more than anything it could send. (On a plain port
            // the upgrade answers it 403 with a reason, as cheaply.)
            if ctx.tls.is_some() && !ctx.call_auth.current().may_come_from(peer.ip()) {
                let refusal = CallRefusal::NotAllowed;
                refused(&ctx, refusal.as_str());
                ctx.refusal_log.note(refusal, peer.ip());
                return None;
            }
            let stream =
                crate::tls::call_handshake(ctx.tls.as_ref(), &ctx.metrics, stream, deadline)
                    .await?;
            let (mut ws, forced, admitted) = upgrade(&ctx, stream, deadline, peer).await?;
            // No call slot is free: refuse now rather than wait for the first message.
            if ctx.budgets.calls_full() {
                refuse_call(&ctx, &mut ws).await;
                return None;
            }
            let start = first_message(&ctx, &mut ws, forced, deadline).await?;
            // What the upgrade could not know: whether the call is a Twilio stream.
            if let Err(reason) = ctx
                .call_auth
                .current()
                .admits_call(&admitted, start.protocol())
            {
                refused(&ctx, "twilio_auth");
                debug!(reason, "Refusing the call: not admitted for its protocol.");
                close(
                    &mut ws,
                    Close::new(CloseCode::POLICY, reason),
                    ctx.settings.write_timeout,
                )
                .await;
                return None;
            }
            let Some(slot) = ctx.budgets.call_slot() else {
                refuse_call(&ctx, &mut ws).await;
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
            Box::pin(run_call(ctx, ws, start, peer, slot, admitted)).await;
        }
    }
    .instrument(span)
    .await
}

/// Refuses a connection because the call limit is reached: close 1013.
async fn refuse_call(ctx: &CallContext, ws: &mut Ws) {
    refused(ctx, "call_limit");
    let reason = format!("call limit reached ({} live calls)", ctx.settings.max_calls);
    debug!("Refusing the call: call limit reached.");
    close(
        ws,
        Close::new(CloseCode::TRY_AGAIN_LATER, reason),
        ctx.settings.write_timeout,
    )
    .await;
}

async fn upgrade(
    ctx: &CallContext,
    stream: CallStream,
    deadline: Instant,
    peer: SocketAddr,
) -> Option<(Ws, Option<Protocol>, Admission)> {
    let mut path = String::new();
    let auth = ctx.call_auth.current();
    let mut admitted = Admission::default();
    let mut denied = None;
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
                denied = Some((r, client.unwrap_or(peer.ip())));
                Err(refusal::unauthorized(r))
            }
        }
    };
    let accept =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ctx.ws_config));
    let result = timeout_at(deadline, accept).await;
    if let Some((r, client)) = denied {
        refused(ctx, r.as_str());
        ctx.refusal_log.note(r, client);
        return None;
    }
    match result {
        Ok(Ok(ws)) => Some((ws, Protocol::from_path(&path), admitted)),
        Ok(Err(error)) => {
            debug!(error = %Escaped(&error.to_string()), "WebSocket upgrade failed.");
            refused(ctx, "websocket_handshake");
            None
        }
        Err(_) => {
            debug!("WebSocket upgrade timed out.");
            refused(ctx, "websocket_handshake");
            None
        }
    }
}

fn refused(ctx: &CallContext, reason: &'static str) {
    ctx.metrics
        .connections_refused
        .get_or_create(&[("reason", reason)])
        .inc();
}

/// Waits for the start message until `deadline` (the handshake's, from accept). On a bad
/// one, closes with its code and reason.
async fn first_message(
    ctx: &CallContext,
    ws: &mut Ws,
    forced: Option<Protocol>,
    deadline: Instant,
) -> Option<Start> {
    let limit = ctx.settings.handshake_timeout;
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
                let _ = timeout(ctx.settings.write_timeout, SinkExt::close(ws)).await;
                return None;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(error))) => match fatal_read_error(&error) {
                Some(e) => break Err(e),
                None => {
                    debug!(error = %Escaped(&error.to_string()), "Connection lost before the start message.");
                    return None;
                }
            },
        }
    };
    match result {
        Ok(start) => Some(start),
        Err(error) => {
            ctx.metrics
                .protocol_errors
                .get_or_create(&[("kind", error.kind())])
                .inc();
            debug!(
                error = %Escaped(&error.to_string()),
                code = error.close_code().0,
                "Refusing connection: bad start."
            );
            close(
                ws,
                Close::new(error.close_code(), error.to_string()),
                ctx.settings.write_timeout,
            )
            .await;
            None
        }
    }
}
