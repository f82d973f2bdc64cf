//! The session and its connection: set-up, outage and reconnection (backoff, the
//! conversation re-sent), fallback, and renewal make-before-break.
//!
//! States: [`Link`] (the connection in use), [`Service`] (never up yet, up, or in an outage
//! since when), [`Renewal`] (a new session beside the old one). Deadlines live in the timer
//! table: `Setup` while [`Link::Connecting`], `Retry` while [`Link::Waiting`], `Renew` and
//! `RenewalSetup` while [`Link::Ready`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate_agent::Speaker;
use callgate_proto::Protocol;
use serde_json::{Value, json};

use super::response::Owed;
use super::timer::Timer;
use super::{Core, Counted, Lost, Outgoing, Output};
use crate::protocol::{ApiError, ServerEvent, client};

/// How long a failed renewal waits before the next try (the old session goes on meanwhile).
pub(crate) const RENEW_RETRY: Duration = Duration::from_secs(30);

/// The connection in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    /// Connection `conn` is being opened and set up (until `session.updated`).
    Connecting { conn: u64 },
    /// Connection `conn` is ready: the session serves the call.
    Ready { conn: u64 },
    /// No connection; the next attempt is due (timer `Retry`).
    Waiting,
    /// Given up (the fallback message plays and the call hangs up), or the call ended.
    Failed,
}

/// Whether the service has served this call, and since when it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    /// No session yet: being set up since the call began.
    Starting { since: Instant },
    /// A session was ready and has not been lost since.
    Up,
    /// The connection was lost at `since` (mid-call); no session since.
    Outage { since: Instant },
}

/// A new session being set up while the old one still serves the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// None: the next is due when timer `Renew` fires.
    Idle,
    /// Due: it starts at the next quiet moment.
    Due,
    /// Connection `conn` is being set up (given up when timer `RenewalSetup` fires).
    Connecting { conn: u64 },
    /// Connection `conn` is ready: it takes over at the next quiet moment.
    Ready { conn: u64 },
}

/// The caller's audio on its way to the session.
#[derive(Debug, Default)]
pub(crate) struct Input {
    /// Kept while no session is ready (service format), oldest first.
    buffered: VecDeque<Bytes>,
    buffered_bytes: u64,
    /// Appended in this session, bytes (service format).
    appended_bytes: u64,
    /// Call time of the last append, ms.
    last_append_ms: u64,
}

impl Input {
    /// Keeps `chunk` for the next session, dropping the oldest audio beyond `max` bytes.
    pub(crate) fn buffer(&mut self, chunk: Bytes, max: u64) {
        self.buffered_bytes += chunk.len() as u64;
        self.buffered.push_back(chunk);
        while self.buffered_bytes > max {
            match self.buffered.pop_front() {
                Some(old) => self.buffered_bytes -= old.len() as u64,
                None => break,
            }
        }
    }

    /// Maps a position in this session's input audio to call time, ms.
    pub(crate) fn to_call_ms(&self, audio_ms: u64, bytes_per_ms: u64) -> u64 {
        let appended_ms = self.appended_bytes / bytes_per_ms;
        self.last_append_ms
            .saturating_sub(appended_ms.saturating_sub(audio_ms))
    }
}

/// The session's state.
#[derive(Debug)]
pub(crate) struct Session {
    link: Link,
    /// The last connection number handed out.
    last_conn: u64,
    service: Service,
    /// Connection attempts since the last ready session.
    attempts: u32,
    renewal: Renewal,
    /// The caller's audio.
    pub(crate) input: Input,
}

impl Session {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            link: Link::Waiting,
            last_conn: 0,
            service: Service::Starting { since: now },
            attempts: 0,
            renewal: Renewal::Idle,
            input: Input::default(),
        }
    }

    /// The connection in use (being set up or ready).
    pub(crate) fn current_conn(&self) -> Option<u64> {
        match self.link {
            Link::Connecting { conn } | Link::Ready { conn } => Some(conn),
            Link::Waiting | Link::Failed => None,
        }
    }

    /// The ready session's connection.
    pub(crate) fn ready_conn(&self) -> Option<u64> {
        match self.link {
            Link::Ready { conn } => Some(conn),
            _ => None,
        }
    }

    pub(crate) fn is_ready(&self) -> bool {
        matches!(self.link, Link::Ready { .. })
    }

    pub(crate) fn is_connecting(&self) -> bool {
        matches!(self.link, Link::Connecting { .. })
    }

    pub(crate) fn has_failed(&self) -> bool {
        self.link == Link::Failed
    }

    /// The renewal's connection, if one is being set up or waits to take over.
    pub(crate) fn renewal_conn(&self) -> Option<u64> {
        match self.renewal {
            Renewal::Connecting { conn } | Renewal::Ready { conn } => Some(conn),
            Renewal::Idle | Renewal::Due => None,
        }
    }

    fn next_conn(&mut self) -> u64 {
        self.last_conn += 1;
        self.last_conn
    }

    /// When the current outage (or the set-up) began.
    fn down_since(&self) -> Option<Instant> {
        match self.service {
            Service::Starting { since } | Service::Outage { since } => Some(since),
            Service::Up => None,
        }
    }
}

/// The wait before reconnection attempt `attempts` + 1: the first retry at once, then 250 ms
/// doubling to 2 s, spread by the call id so calls that lost the service together do not come
/// back in step.
fn backoff(attempts: u32, call_id: &str) -> Duration {
    let base = match attempts {
        0 | 1 => 0,
        n => 250u64 << (n - 2).min(3),
    };
    let spread = call_id
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
        % 100;
    Duration::from_millis(base + base * spread / 400)
}

impl Core {
    /// Connection `conn` ended (or could not be opened).
    pub fn handle_lost(&mut self, now: Instant, conn: u64, lost: Lost) {
        if self.phase == super::Phase::Ended {
            return;
        }
        if self.session.renewal_conn() == Some(conn) {
            self.abandon_renewal(now, &lost.to_string());
            return;
        }
        if self.current_conn() != Some(conn) {
            return;
        }
        self.close(conn);
        self.lose(now, lost);
    }

    /// Opens the next connection.
    pub(super) fn connect(&mut self, now: Instant) {
        let conn = self.session.next_conn();
        self.session.attempts += 1;
        let settings = &self.plan.settings;
        let mut deadline = now + settings.connect_timeout.0;
        if let Some(since) = self.session.down_since() {
            deadline = deadline.min(since + settings.reconnect_within.0);
        }
        self.session.link = Link::Connecting { conn };
        self.timers.stop(Timer::Retry);
        self.timers.set(Timer::Setup, deadline);
        self.out.push_back(Output::Connect { conn });
    }

    /// The link's deadlines (see the module docs for which belong to which state). Every due
    /// timer is consumed, so a deadline the state no longer needs cannot fire again and again.
    pub(super) fn link_timeout(&mut self, now: Instant) {
        let setup = self.timers.fire(Timer::Setup, now);
        let retry = self.timers.fire(Timer::Retry, now);
        let renewal_setup = self.timers.fire(Timer::RenewalSetup, now);
        let renew = self.timers.fire(Timer::Renew, now);
        match self.session.link {
            Link::Connecting { conn } if setup => {
                self.close(conn);
                let within = humantime::format_duration(self.plan.settings.connect_timeout.0);
                self.lose(now, Lost::Broken(format!("no session within {within}")));
            }
            Link::Waiting if retry => self.connect(now),
            Link::Ready { .. } => {
                if renewal_setup && matches!(self.session.renewal, Renewal::Connecting { .. }) {
                    self.abandon_renewal(now, "no new session in time");
                }
                if renew {
                    self.session.renewal = Renewal::Due;
                }
                self.maybe_renew(now);
            }
            _ => {}
        }
    }

    fn stop_link_timers(&mut self) {
        for timer in [
            Timer::Setup,
            Timer::Retry,
            Timer::Renew,
            Timer::RenewalSetup,
        ] {
            self.timers.stop(timer);
        }
    }

    /// The connection in use is gone: reconnect (after a backoff), or give up.
    pub(super) fn lose(&mut self, now: Instant, lost: Lost) {
        let reason = lost.to_string();
        if lost.is_fatal() {
            self.fail(now, &reason, true);
            return;
        }
        let was_ready = self.session.is_ready();
        self.reset_session();
        if was_ready || self.session.service == Service::Up {
            self.session.service = Service::Outage { since: now };
            self.session.attempts = 0;
            self.event("backend_lost", json!({ "reason": reason }));
            self.count(Counted::Outage);
            tracing::warn!(%reason, "The AI connection dropped; reconnecting.");
            // A session was ready before (the set-up is not an outage): the caller hears
            // the hold message, if any.
            if !self.hanging_up()
                && let Some(hold) = self.plan.hold.clone()
            {
                self.play_prompt(&hold);
            }
        } else {
            let attempt = self.session.attempts;
            tracing::debug!(%reason, attempt, "AI connection attempt failed.");
        }
        let since = self.session.down_since().unwrap_or(now);
        let give_up = since + self.plan.settings.reconnect_within.0;
        if now >= give_up {
            let within = humantime::format_duration(self.plan.settings.reconnect_within.0);
            let reason = format!("no AI session within {within} ({reason})");
            self.fail(now, &reason, false);
            return;
        }
        let wait = backoff(self.session.attempts, &self.call.call_id);
        self.session.link = Link::Waiting;
        self.timers.stop(Timer::Setup);
        self.timers.set(Timer::Retry, (now + wait).min(give_up));
    }

    /// Forgets what belonged to the session that is gone: its response, its pending hang-up,
    /// the caller's half-heard turn, a renewal in progress. (Its items stay on the timeline:
    /// their audio still plays; they are no longer the new session's to cut.)
    fn reset_session(&mut self) {
        self.response.session_lost();
        self.tools.session_lost();
        self.turns.session_lost();
        self.timeline.session_lost();
        if let Some(conn) = self.session.renewal_conn() {
            self.close(conn);
        }
        self.session.renewal = Renewal::Idle;
        self.timers.stop(Timer::Renew);
        self.timers.stop(Timer::RenewalSetup);
    }

    /// Gives up on the service: the fallback message plays and the call hangs up.
    pub(super) fn fail(&mut self, now: Instant, reason: &str, fatal: bool) {
        if self.session.has_failed() {
            return;
        }
        if let Some(conn) = self.current_conn() {
            self.close(conn);
        }
        self.session.link = Link::Failed;
        self.stop_link_timers();
        tracing::warn!(%reason, fatal, "The AI is unreachable: playing the fallback message.");
        self.count(Counted::Fallback);
        let at_ms = self.ms(now);
        self.event(
            "backend_failed",
            json!({"reason": reason, "fatal": fatal, "at_ms": at_ms}),
        );
        if !self.hanging_up() {
            let fallback = self.plan.fallback.clone();
            self.play_prompt(&fallback);
            self.hang_up();
        }
    }

    /// The call ended: every connection closes.
    pub(super) fn session_ended(&mut self) {
        if let Some(conn) = self.current_conn() {
            self.close(conn);
        }
        if let Some(conn) = self.session.renewal_conn() {
            self.close(conn);
        }
        self.session.renewal = Renewal::Idle;
        self.session.link = Link::Failed;
    }

    /// `session.created` on the connection being set up: the session's settings go out.
    pub(super) fn session_created(&mut self) {
        if let Link::Connecting { conn } = self.session.link {
            let update = client::session_update(&self.session_config());
            self.send_on(conn, update);
        }
    }

    /// `session.updated` on the connection being set up: the session is ready.
    pub(super) fn session_updated(&mut self, now: Instant) {
        let Link::Connecting { conn } = self.session.link else {
            return;
        };
        self.session.link = Link::Ready { conn };
        self.timers.stop(Timer::Setup);
        self.session.input.appended_bytes = 0;
        if !self.hanging_up() {
            self.timers
                .set(Timer::Renew, now + self.plan.settings.session_max.0);
        }
        let first = matches!(self.session.service, Service::Starting { .. });
        let down_ms = self.session.down_since().map_or(0, |since| {
            now.saturating_duration_since(since).as_millis() as u64
        });
        self.session.service = Service::Up;
        let attempts = self.session.attempts;
        self.count(Counted::Connected);
        if first {
            let detail = json!({"attempts": attempts, "setup_ms": down_ms});
            self.event("backend_connected", detail);
        } else {
            let turns = self.turns.history_len();
            let detail = json!({"outage_ms": down_ms, "attempts": attempts, "seeded_turns": turns});
            self.event("backend_reconnected", detail);
            self.seed(conn);
            if self.response.take_owed(Owed::Reanswer) && !self.hanging_up() {
                self.request_response(false);
            }
        }
        self.session.attempts = 0;
        // Caller audio kept while there was no session.
        let buffered = std::mem::take(&mut self.session.input.buffered);
        self.session.input.buffered_bytes = 0;
        for chunk in buffered {
            self.append(now, chunk);
        }
        if first && self.plan.settings.greeting && !self.hanging_up() {
            let prompt = self.plan.settings.greeting_prompt.clone();
            self.send(client::text_item("user", &prompt));
            self.request_response(false);
        }
    }

    /// The conversation so far, as text items on connection `conn` (the service cannot
    /// resume a session).
    fn seed(&mut self, conn: u64) {
        let items: Vec<String> = self
            .turns
            .history()
            .map(|turn| {
                let role = if turn.speaker == Speaker::Caller {
                    "user"
                } else {
                    "assistant"
                };
                client::text_item(role, &turn.text)
            })
            .collect();
        for item in items {
            self.send_on(conn, item);
        }
    }

    /// Sends caller audio to the ready session.
    pub(super) fn append(&mut self, now: Instant, chunk: Bytes) {
        if let Some(conn) = self.session.ready_conn() {
            self.session.input.appended_bytes += chunk.len() as u64;
            self.session.input.last_append_ms = self.ms(now);
            self.out.push_back(Output::Send {
                conn,
                message: Outgoing::Append(chunk),
            });
        }
    }

    /// Nothing is happening on the line: no response, no agent audio, no caller speech, no
    /// tool.
    fn quiet(&self) -> bool {
        self.response.is_idle()
            && self.timeline.is_empty()
            && !self.turns.caller_speaking()
            && self.tools.none_running()
            && !self.hanging_up()
    }

    /// Renewal, make-before-break: once due and the line is quiet, a new session is set up
    /// beside the old one, which serves the call until the new one is ready and the line is
    /// quiet again; then the new one takes over, seeded with the conversation.
    pub(super) fn maybe_renew(&mut self, now: Instant) {
        let Some(old) = self.session.ready_conn() else {
            return;
        };
        match self.session.renewal {
            Renewal::Due if self.quiet() => {
                let conn = self.session.next_conn();
                self.session.renewal = Renewal::Connecting { conn };
                self.timers.set(
                    Timer::RenewalSetup,
                    now + self.plan.settings.connect_timeout.0,
                );
                self.out.push_back(Output::Connect { conn });
            }
            Renewal::Ready { conn } if self.quiet() => {
                self.session.renewal = Renewal::Idle;
                self.close(old);
                self.session.link = Link::Ready { conn };
                self.session.input.appended_bytes = 0;
                self.timers
                    .set(Timer::Renew, now + self.plan.settings.session_max.0);
                self.count(Counted::Connected);
                let turns = self.turns.history_len();
                self.event("backend_renewed", json!({ "seeded_turns": turns }));
                self.seed(conn);
            }
            _ => {}
        }
    }

    /// The renewal failed: the old session goes on, and the renewal is tried again later.
    fn abandon_renewal(&mut self, now: Instant, reason: &str) {
        let Some(conn) = self.session.renewal_conn() else {
            return;
        };
        self.session.renewal = Renewal::Idle;
        self.timers.stop(Timer::RenewalSetup);
        self.close(conn);
        tracing::info!(%reason, "Session renewal failed; the current session goes on.");
        self.event("backend_renewal_failed", json!({ "reason": reason }));
        if self.session.is_ready() {
            self.timers.set(Timer::Renew, now + RENEW_RETRY);
        }
    }

    /// The call hangs up: the session serving it serves it to the end, so no renewal is
    /// due, and one being set up is closed (its deadlines with it).
    pub(super) fn renewal_stopped(&mut self) {
        if let Some(conn) = self.session.renewal_conn() {
            self.close(conn);
        }
        self.session.renewal = Renewal::Idle;
        self.timers.stop(Timer::Renew);
        self.timers.stop(Timer::RenewalSetup);
    }

    /// An event of the session being set up for a renewal.
    pub(super) fn renewal_event(&mut self, now: Instant, conn: u64, event: ServerEvent) {
        match event {
            ServerEvent::SessionCreated => {
                let update = client::session_update(&self.session_config());
                self.send_on(conn, update);
            }
            ServerEvent::SessionUpdated => {
                if self.session.renewal == (Renewal::Connecting { conn }) {
                    self.session.renewal = Renewal::Ready { conn };
                    self.timers.stop(Timer::RenewalSetup);
                }
                self.maybe_renew(now);
            }
            ServerEvent::Error(e) if refuses_session(&e) => {
                let reason = format!("the new session was refused ({})", e.code());
                self.abandon_renewal(now, &reason);
            }
            _ => {}
        }
    }

    /// The service's `session_expired`: the connection is lost (and set up again).
    pub(super) fn session_expired(&mut self, now: Instant) {
        if let Some(conn) = self.current_conn() {
            self.close(conn);
            self.lose(now, Lost::Broken("the session expired".into()));
        }
    }

    /// The session's configuration (`session.update`).
    fn session_config(&self) -> Value {
        let s = &self.plan.settings;
        let instructions = self.plan.instructions.render(|name| {
            self.call
                .variables()
                .into_iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
        });
        let mut tools: Vec<Value> = s
            .builtin_tools
            .iter()
            .filter(|b| !b.needs_open_api() || self.call.protocol == Protocol::CallBridge)
            .map(|b| crate::settings::builtin_declaration(*b))
            .collect();
        tools.extend(s.tools.iter().map(|t| {
            json!({"type": "function", "name": t.name, "description": t.description,
                   "parameters": t.parameters})
        }));
        let transcription = if s.transcription.enabled {
            let mut t = json!({"model": s.transcription.model});
            if let Some(lang) = &s.transcription.language {
                t["language"] = json!(lang);
            }
            t
        } else {
            Value::Null
        };
        let noise = match s.noise_reduction {
            crate::settings::NoiseReduction::Off => Value::Null,
            kind => json!({ "type": kind }),
        };
        let formats = self.formats.session;
        json!({
            "type": "realtime",
            "model": s.model,
            "instructions": instructions,
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": formats.input.json(),
                    "transcription": transcription,
                    "noise_reduction": noise,
                    "turn_detection": s.turn_detection_json(),
                },
                "output": {"format": formats.output.json(), "voice": s.voice},
            },
            "tools": tools,
            "tool_choice": s.tool_choice,
        })
    }
}

/// Whether `e` refuses a session being set up: a fatal error, or one answering our
/// `session.update`.
pub(super) fn refuses_session(e: &ApiError) -> bool {
    e.is_fatal() || e.event_id.as_deref() == Some("cg_session")
}
