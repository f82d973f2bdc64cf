//! The driver of a live call: one wait over the socket, the agent (its future and its
//! commands), the rare inputs (the agent's clear requests, operator requests, shutdown) and
//! the earliest deadline (playout, session, liveness ping, progress tick). It feeds each input
//! to the sans-IO [`CallCore`] with the time and carries out the core's effects (frames, the
//! close, record writes, what the agent is told, the shared epoch) before awaiting anything
//! else; it decides nothing itself. Only this task writes to the socket, and a write that has
//! to wait does so under `write_timeout`.
//!
//! # Wake-ups
//! The CPU an echoed frame costs is mostly wake-ups, polls and the cache lines they touch, so
//! the loop keeps them to one turn per input and polls only what can have something:
//! - the socket and the agent's command queue are looked at every turn (they take turns at
//!   going first, so neither starves the other);
//! - the rare inputs (shutdown, operator requests, the agent's clear requests), the agent's
//!   future and the timer are polled with a waker of their own ([`Signals`]) and looked at only
//!   when it went off (or, for the timer, when it was reset);
//! - pushes to the agent's event queue do not wake this task, which polls the agent right
//!   after a turn that told it something (`EventSender::polled_by`);
//! - the command channel keeps this task's waker but wakes it only while it sleeps
//!   (`Commands::busy` when a turn starts);
//! - the timer is moved later only by more than [`TIMER_SLACK`].

use std::any::Any;
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use callgate_agent::queue::{EventSender, Pushed, SendError};
use callgate_agent::{AgentControl, AgentRun, Commands, Stamped};
use callgate_proto::{Disconnect, EndReason, Frame};
use callgate_store::UnixMillis;
use futures_util::future::CatchUnwind;
use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, error, info, warn};

use super::CallContext;
use super::close::close;
use super::core::{AgentExit, CallCore, Effect, Stats};
use super::liveness::{Check, Liveness};
use super::record::Record;
use super::{Ws, fatal_read_error, now};
use crate::live::Mailbox;

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

/// The rare inputs (shutdown, operator requests, the agent's clear requests) woke the task.
const RARE: u8 = 1;
/// Something the agent's future waits for woke it (its timers, sockets, spawned tasks).
const AGENT: u8 = 2;
/// The call's timer fired.
const TIMER: u8 = 4;
/// Every signal: what the task polls on its first turn, so that each source registers.
const ALL: u8 = RARE | AGENT | TIMER;

/// Which of a call's signalled inputs woke its task. The rare inputs, the agent's future and
/// the timer are polled with a waker of their own ([`Signal`]) that raises their bit here and
/// then wakes the task, and the task polls each of them only when its bit is up: an echoed
/// frame polls the socket and the command queue, not everything (polling a waiting `Notified`
/// takes a lock, re-polling the agent walks its whole future, a timer's poll re-registers it).
#[derive(Debug, Default)]
struct Signals {
    raised: AtomicU8,
    /// The call task's waker; replaced only if the task is polled with another one.
    task: Mutex<Option<Waker>>,
}

impl Signals {
    /// Keeps `waker` as the task's if it is not the one kept already (`kept`: the task's copy,
    /// compared without the lock).
    fn keep_task(&self, waker: &Waker, kept: &mut Option<Waker>) {
        if kept.as_ref().is_some_and(|k| k.will_wake(waker)) {
            return;
        }
        *kept = Some(waker.clone());
        *self.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
    }

    /// Takes the bits raised since the last look.
    fn take(&self) -> u8 {
        // A plain load first: most turns find nothing raised, and then write nothing.
        if self.raised.load(Ordering::Acquire) == 0 {
            return 0;
        }
        self.raised.swap(0, Ordering::AcqRel)
    }
}

/// The waker of one signalled input: raises its bit, then wakes the call task.
#[derive(Debug)]
struct Signal {
    signals: Arc<Signals>,
    bit: u8,
}

impl Signal {
    fn waker(signals: &Arc<Signals>, bit: u8) -> Waker {
        Waker::from(Arc::new(Self {
            signals: signals.clone(),
            bit,
        }))
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.signals.raised.fetch_or(self.bit, Ordering::AcqRel);
        let task = self.signals.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// Polls the call's timer with its signal's waker (the signal is then taken care of).
fn poll_timer(
    timer: Pin<&mut tokio::time::Sleep>,
    pending: &mut u8,
    timer_waker: &Waker,
) -> Poll<Input> {
    *pending &= !TIMER;
    timer
        .poll(&mut Context::from_waker(timer_waker))
        .map(|()| Input::Timer)
}

/// Polls the rare inputs with their signal's waker; the first that is ready gives its input.
fn poll_rare<const N: usize>(
    rare_waker: &Waker,
    inputs: [Option<RareInput<'_>>; N],
) -> Option<Input> {
    let mut rcx = Context::from_waker(rare_waker);
    for (future, input) in inputs.into_iter().flatten() {
        if future.poll(&mut rcx).is_ready() {
            return Some(input);
        }
    }
    None
}

/// A rare input for [`poll_rare`]: its future, and the input it gives when it is ready.
type RareInput<'a> = (Pin<&'a mut dyn Future<Output = ()>>, Input);

/// A rare input's future, as [`poll_rare`] takes it.
fn rare_input<F: Future<Output = ()>>(future: Pin<&mut F>) -> Pin<&mut dyn Future<Output = ()>> {
    future
}

/// The state the call task owns besides the socket and the agent's future and commands.
pub(super) struct Call {
    ctx: Arc<CallContext>,
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

impl Call {
    /// A call's driver state, before its loop runs: the agent is told events through
    /// `events`, and shares its epoch and clear requests through `control`.
    pub(super) fn new(
        ctx: Arc<CallContext>,
        core: CallCore,
        record: Record,
        events: EventSender,
        control: AgentControl,
    ) -> Self {
        Self {
            liveness: Liveness::new(Instant::now(), ctx.settings.write_timeout),
            ctx,
            core,
            record,
            socket_open: true,
            events: Some(events),
            control,
            told_agent: false,
        }
    }

    /// Runs the call until its socket is closed and its record ended, then gives its agent a
    /// moment to stop.
    pub(super) async fn run(
        &mut self,
        ws: &mut Ws,
        mut commands: Commands,
        control: AgentControl,
        agent: AgentFuture,
        operator: Arc<Mailbox>,
    ) {
        let interval = self.ctx.settings.progress_interval;
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
        let cancel = self.ctx.cancel.clone();
        // Created once: re-creating it every turn would register a waiter every turn.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        // Likewise for the operator mailbox and the agent's clear requests.
        let posted = operator.notified();
        tokio::pin!(posted);
        let clear_signal = control.notified();
        tokio::pin!(clear_signal);
        // The rare inputs, the agent's future and the timer are polled only when their signal
        // is up (see `Signals`); all three are up at first, so that each registers.
        let signals = Arc::new(Signals::default());
        let rare_waker = Signal::waker(&signals, RARE);
        let agent_waker = Signal::waker(&signals, AGENT);
        let timer_waker = Signal::waker(&signals, TIMER);
        // Pushes to the agent's queue do not wake it: this task polls it after every turn that
        // told it something.
        if let Some(events) = &mut self.events {
            events.polled_by(agent_waker.clone());
        }
        let mut kept_task: Option<Waker> = None;
        // Signals taken but not yet acted on (an input returned before their source was polled).
        let mut pending = ALL;
        // Which of the socket and the agent's commands is looked at first: they take turns, so
        // neither a phone's burst nor a chatty agent starves the other.
        let mut socket_first = true;
        let mut closed_by_us = false;
        // When the last turn started.
        let mut last_turn = Instant::now();

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
                // A reset timer registers again when it is polled.
                pending |= TIMER;
            }
            // Audio from the agent is taken only while the playout has room: its backpressure.
            let take_commands = commands_open && self.core.takes_agent_commands();
            socket_first = !socket_first;
            // A timer whose deadline had passed by the last turn is looked at first, so a
            // socket or an agent that is always ready cannot starve it (its poll needs tokio's
            // cooperative budget, which a long run of reads would have used up).
            let timer_first = timer.deadline() <= last_turn;
            let input = poll_fn(|cx| {
                signals.keep_task(cx.waker(), &mut kept_task);
                pending |= signals.take();
                if pending & RARE != 0 {
                    let ready = poll_rare(
                        &rare_waker,
                        [
                            (!shutting_down)
                                .then(|| (rare_input(cancelled.as_mut()), Input::Shutdown)),
                            Some((rare_input(posted.as_mut()), Input::Operator)),
                            Some((rare_input(clear_signal.as_mut()), Input::AgentClear)),
                        ],
                    );
                    match ready {
                        // The others may be ready too: they are looked at in the next turn.
                        Some(input) => return Poll::Ready(input),
                        None => pending &= !RARE,
                    }
                }
                if timer_first
                    && let ready @ Poll::Ready(_) =
                        poll_timer(timer.as_mut(), &mut pending, &timer_waker)
                {
                    return ready;
                }
                if pending & AGENT != 0 {
                    pending &= !AGENT;
                    if let Some(a) = agent.as_mut()
                        && let Poll::Ready(outcome) =
                            Pin::new(a).poll(&mut Context::from_waker(&agent_waker))
                    {
                        return Poll::Ready(Input::AgentDone(outcome));
                    }
                }
                let mut socket = |cx: &mut Context<'_>| {
                    if self.socket_open {
                        ws.poll_next_unpin(cx).map(Input::Socket)
                    } else {
                        Poll::Pending
                    }
                };
                let mut command = |cx: &mut Context<'_>| {
                    if take_commands {
                        commands.poll_recv(cx).map(Input::Agent)
                    } else {
                        Poll::Pending
                    }
                };
                let ready = if socket_first {
                    match socket(cx) {
                        Poll::Pending => command(cx),
                        ready => ready,
                    }
                } else {
                    match command(cx) {
                        Poll::Pending => socket(cx),
                        ready => ready,
                    }
                };
                if ready.is_ready() {
                    return ready;
                }
                // Last: a frame that came in with the timer's deadline (the playout's gap
                // deadline races the next echoed frame) is taken first, and the timer is then
                // re-armed for the new deadline instead of waking a turn that finds nothing
                // due. (An overdue timer went first, above.)
                if pending & TIMER != 0 {
                    return poll_timer(timer.as_mut(), &mut pending, &timer_waker);
                }
                Poll::Pending
            })
            .await;
            // This task polls the agent and looks for commands again before it sleeps: what
            // the agent sends until then need not wake it.
            commands.busy();
            let now = now();
            last_turn = Instant::from_std(now);
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
            // in this same turn: an echo costs one turn, not two.
            if !self.core.is_closed() {
                // Only if this turn told it something: otherwise it has nothing new to react
                // to (what wakes it on its own raises its signal, and the next turn polls it).
                if std::mem::take(&mut self.told_agent)
                    && let Some(a) = agent.as_mut()
                    && let Poll::Ready(outcome) =
                        Pin::new(a).poll(&mut Context::from_waker(&agent_waker))
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
                // What those commands made the core tell the agent (a mark reported at once, a
                // refusal) was pushed without a wake-up, the agent being this task's: look at
                // it in the next turn, not only after the next input.
                if std::mem::take(&mut self.told_agent) {
                    pending |= AGENT;
                }
            }
        }

        // From here on no operator request can be carried out: refuse them at once.
        operator.close();
        if !closed_by_us {
            // The peer closed (or vanished): flush tungstenite's close reply if it can be sent.
            // `SinkExt::close` flushes the queued reply; the inherent `close` would try to send
            // a second close frame and fail.
            let _ = Box::pin(timeout(self.ctx.settings.write_timeout, SinkExt::close(ws))).await;
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
        self.ctx
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
            Poll::Pending => timeout(self.ctx.settings.write_timeout, send).await,
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
        let write_timeout = self.ctx.settings.write_timeout;
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
        self.ctx
            .metrics
            .playout_queue_depth
            .observe(self.core.queued_ms() as f64 / 1000.0);
    }

    /// Adds the call's own counts to the server's metrics.
    fn merge_stats(&mut self) {
        let mut stats: Stats = self.core.take_stats();
        let m = &self.ctx.metrics;
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

/// A call's agent, polled by the call task, with panics caught (`AgentRun` is boxed already:
/// no second box around it).
pub(super) type AgentFuture = CatchUnwind<AssertUnwindSafe<AgentRun>>;

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
