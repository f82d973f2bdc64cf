//! The bounded queue of events toward an agent.
//!
//! Policy when full (docs/contributing.md §5):
//! - **audio**: never waits. The oldest queued audio frame is dropped and counted: for a live
//!   call, fresh audio matters more than complete audio.
//! - **control** (DTMF, end of call): never dropped. It first takes the place of the oldest
//!   queued audio frame; only a queue full of control events makes it wait, and the caller
//!   bounds that wait with a timeout.
//!
//! One sender (the call task) and one receiver (the agent). Dropping the sender closes the
//! queue: the receiver drains what is left, then gets `None`.
//!
//! Wake-ups: a push wakes the receiver's task only if it waits, and not when that task is the
//! sender's own driver (see [`EventSender::polled_by`]): the call task polls its agent's future
//! itself, right after queueing what the agent is to read, so waking it from inside its own
//! turn would only poll the whole call a second time for nothing (once per audio frame).
//!
//! Fast path: a word of flags beside the lock says whether anything is there to read
//! (`READY`) and whether the receiver's waker is in place for the next push (`ARMED`). The
//! flags change only with the lock held, except that the receiver sets `ARMED` on its own;
//! both sides change them with read-modify-write operations, so each sees the other's bit.
//! A receiver that finds nothing to read, with the waker it is polled with already kept,
//! returns `Pending` without the lock (the agent's second look after each frame, and the call
//! task's poll of its agent when the agent's own signal went off). It cannot miss a push: the
//! push sets `READY` and reads `ARMED` in one operation, and the receiver sets `ARMED` and
//! reads `READY` in one, so whichever comes second sees the first. The waker stays in its slot after a wake-up (a
//! copy is woken), so the same task waiting again needs neither the lock nor a clone.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::{AgentEvent, Link};

/// Default capacity: 50 frames is one second of 20 ms audio.
pub const DEFAULT_CAPACITY: usize = 50;

/// Something is there for the receiver: an event, a loss report, or the sender's drop.
/// Set and cleared only with the lock held, in step with the state.
const READY: u8 = 1;
/// The receiver waits, and `State::waiter` holds its waker: the next push wakes it.
const ARMED: u8 = 2;

/// Why a control event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The agent is gone.
    #[error("the agent is gone")]
    Closed,
    /// The queue is full of control events the agent has not read.
    #[error("the agent is not taking its events")]
    Full,
}

struct State {
    items: VecDeque<AgentEvent>,
    capacity: usize,
    /// Caller audio frames dropped since the agent last heard of it.
    lost: u64,
    sender_alive: bool,
    receiver_alive: bool,
    /// The receiver's task: the last waker it waited with (woken while `ARMED`). Only the
    /// receiver puts one here; it stays until another replaces it or the sender's drop.
    waiter: Option<Waker>,
}

/// The queue's state, in the call's [`Link`] (beside the command queue and the epochs).
pub(crate) struct Shared {
    state: Mutex<State>,
    /// `READY` and `ARMED` (see the module docs).
    flags: AtomicU8,
}

impl Shared {
    /// An empty queue holding at most `capacity` events (at least 1).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                // Grows on demand: most agents keep up, so most calls never need the capacity.
                items: VecDeque::new(),
                capacity: capacity.max(1),
                lost: 0,
                sender_alive: true,
                receiver_alive: true,
                waiter: None,
            }),
            flags: AtomicU8::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding this lock, and the state stays valid if one did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Creates a queue holding at most `capacity` events (at least 1), in a link of its own.
pub fn channel(capacity: usize) -> (EventSender, EventReceiver) {
    ends(&Link::new(capacity))
}

/// The two ends of `link`'s event queue.
pub(crate) fn ends(link: &Arc<Link>) -> (EventSender, EventReceiver) {
    (
        EventSender {
            shared: Events(link.clone()),
            driver: None,
        },
        EventReceiver {
            shared: Events(link.clone()),
            kept: None,
        },
    )
}

/// A handle on the event queue in a [`Link`].
struct Events(Arc<Link>);

impl std::ops::Deref for Events {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0.events
    }
}

/// The call's end of the queue.
pub struct EventSender {
    shared: Events,
    /// The task that polls the receiver's future after every push (see
    /// [`EventSender::polled_by`]).
    driver: Option<Waker>,
}

/// The result of queueing audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued with room to spare.
    Queued,
    /// Queued, and the oldest audio frame was dropped to make room.
    DroppedOldest,
    /// The agent is gone; nothing was queued.
    Closed,
}

impl EventSender {
    /// Says that the task whose waker is `driver` polls the receiving agent's future itself
    /// after every push (as the call task does with an agent it runs): a receiver waiting in
    /// that task is not woken by a push, which would only poll the task again for nothing.
    /// A receiver waiting in any other task is woken as usual.
    pub fn polled_by(&mut self, driver: Waker) {
        self.driver = Some(driver);
    }

    /// Queues caller audio without waiting (see the module policy).
    pub fn push_audio(&self, data: bytes::Bytes) -> Pushed {
        let mut state = self.shared.lock();
        if !state.receiver_alive {
            return Pushed::Closed;
        }
        let mut result = Pushed::Queued;
        if state.items.len() >= state.capacity {
            match state
                .items
                .iter()
                .position(|e| matches!(e, AgentEvent::Audio(_)))
            {
                Some(i) => {
                    state.items.remove(i);
                    state.lost += 1;
                    result = Pushed::DroppedOldest;
                }
                // Full of control events: the newest audio is the one to go (the queue is
                // not empty, so `READY` is already set).
                None => {
                    state.lost += 1;
                    return Pushed::DroppedOldest;
                }
            }
        }
        state.items.push_back(AgentEvent::Audio(data));
        self.ready(state);
        result
    }

    /// Queues a control event without waiting (see the module policy): it takes the place of
    /// the oldest queued audio frame if the queue is full; a queue full of control events
    /// refuses it ([`SendError::Full`]: the agent is not reading its events).
    pub fn try_send_control(&self, event: AgentEvent) -> Result<(), SendError> {
        let mut state = self.shared.lock();
        if !state.receiver_alive {
            return Err(SendError::Closed);
        }
        if state.items.len() >= state.capacity {
            let Some(i) = state
                .items
                .iter()
                .position(|e| matches!(e, AgentEvent::Audio(_)))
            else {
                return Err(SendError::Full);
            };
            state.items.remove(i);
            state.lost += 1;
        }
        state.items.push_back(event);
        self.ready(state);
        Ok(())
    }

    /// Says that something was queued, and wakes the receiver if it waits, unless it waits
    /// in the task that polls it next anyway.
    fn ready(&self, state: MutexGuard<'_, State>) {
        let flags = &self.shared.flags;
        if flags.fetch_or(READY, Ordering::AcqRel) & ARMED == 0 {
            return;
        }
        let Some(waiter) = &state.waiter else {
            return;
        };
        if self.driver.as_ref().is_some_and(|d| d.will_wake(waiter)) {
            return;
        }
        flags.fetch_and(!ARMED, Ordering::AcqRel);
        let waiter = waiter.clone();
        drop(state);
        waiter.wake();
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.sender_alive = false;
        self.shared.flags.store(READY, Ordering::Release);
        let waiter = state.waiter.take();
        drop(state);
        // Always woken: the driver that dropped its sender may not poll the agent again.
        if let Some(w) = waiter {
            w.wake();
        }
    }
}

impl std::fmt::Debug for EventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSender").finish_non_exhaustive()
    }
}

/// The agent's end of the queue.
pub struct EventReceiver {
    shared: Events,
    /// A copy of the waker in `State::waiter` (the receiver alone puts one there), to tell
    /// without the lock whether the task polling now is the one a push would wake.
    kept: Option<Waker>,
}

impl EventReceiver {
    /// The next event, or `None` once the sender is gone and the queue is empty. Caller audio
    /// dropped because the queue was full is reported first, as [`AgentEvent::AudioLost`].
    pub async fn recv(&mut self) -> Option<AgentEvent> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next event (see [`EventReceiver::recv`]). With nothing to read and the
    /// same waker as last time, no lock is taken; otherwise one, and the waker is cloned only
    /// when it is not the one kept already.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<AgentEvent>> {
        let flags = &self.shared.flags;
        let seen = flags.load(Ordering::Acquire);
        if seen & READY == 0 && self.kept.as_ref().is_some_and(|k| k.will_wake(cx.waker())) {
            // The waker in the slot is this task's: arming it is all waiting takes.
            #[cfg(test)]
            crate::testing::gap();
            if seen & ARMED != 0 || flags.fetch_or(ARMED, Ordering::AcqRel) & READY == 0 {
                return Poll::Pending;
            }
        }
        let mut state = self.shared.lock();
        match self.next(&mut state) {
            Next::Event(event) => Poll::Ready(Some(event)),
            Next::Closed => Poll::Ready(None),
            Next::Empty => {
                if !self.kept.as_ref().is_some_and(|k| k.will_wake(cx.waker())) {
                    let waker = cx.waker().clone();
                    state.waiter = Some(waker.clone());
                    self.kept = Some(waker);
                }
                // Nothing queued, with the lock held: `READY` is clear, and the next push
                // (which takes the lock) finds the waker armed.
                flags.fetch_or(ARMED, Ordering::AcqRel);
                Poll::Pending
            }
        }
    }

    /// The next event if one is queued (`None` when the queue is empty or closed).
    pub fn try_recv(&mut self) -> Option<AgentEvent> {
        if self.shared.flags.load(Ordering::Acquire) & READY == 0 {
            return None;
        }
        let mut state = self.shared.lock();
        match self.next(&mut state) {
            Next::Event(event) => Some(event),
            Next::Closed | Next::Empty => None,
        }
    }

    /// Takes the next event (with the lock held); clears `READY` when that leaves nothing.
    fn next(&self, state: &mut State) -> Next {
        let event = if state.lost > 0 {
            let frames = std::mem::take(&mut state.lost);
            AgentEvent::AudioLost { frames }
        } else if let Some(event) = state.items.pop_front() {
            event
        } else if state.sender_alive {
            return Next::Empty;
        } else {
            return Next::Closed;
        };
        if state.items.is_empty() && state.lost == 0 && state.sender_alive {
            self.shared.flags.fetch_and(!READY, Ordering::AcqRel);
        }
        Next::Event(event)
    }
}

enum Next {
    Event(AgentEvent),
    Empty,
    Closed,
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiver_alive = false;
        // Freed now: the link may live on in an agent's senders after the agent is gone.
        let unread = std::mem::take(&mut state.items);
        drop(state);
        drop(unread);
    }
}

impl std::fmt::Debug for EventReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReceiver").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use bytes::Bytes;
    use callgate_proto::{Digit, EndReason};

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn a_push_wakes_a_waiting_receiver_unless_it_waits_in_the_driver() {
        let (mut tx, mut rx) = channel(4);
        let (agent_task, agent_waker) = counter();
        let woken = |c: &Count| c.0.load(Ordering::SeqCst);
        let mut cx = Context::from_waker(&agent_waker);
        // The agent runs in a task of its own: every push to a waiting receiver wakes it.
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.push_audio(Bytes::from_static(b"a"));
        assert_eq!(woken(&agent_task), 1);
        // A push while it is not waiting wakes nothing.
        tx.push_audio(Bytes::from_static(b"b"));
        assert_eq!(woken(&agent_task), 1);
        assert_eq!(rx.try_recv(), Some(audio_of(b"a")));
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(Some(_))));
        // The agent runs in the driver's task, which polls it after every push: no wake-up.
        tx.polled_by(agent_waker.clone());
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.push_audio(Bytes::from_static(b"c"));
        tx.try_send_control(AgentEvent::Dtmf(Digit::D1)).unwrap();
        assert_eq!(woken(&agent_task), 1, "the driver polls its agent itself");
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(Some(_))));
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(Some(_))));
        // Polled from another task (an agent that moved its events into a spawned task): woken.
        let (other_task, other_waker) = counter();
        assert!(
            rx.poll_recv(&mut Context::from_waker(&other_waker))
                .is_pending()
        );
        tx.push_audio(Bytes::from_static(b"d"));
        assert_eq!(woken(&other_task), 1);
        // Closing the queue always wakes the receiver, whichever task it waits in.
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(Some(_))));
        assert!(rx.poll_recv(&mut cx).is_pending());
        drop(tx);
        assert_eq!(woken(&agent_task), 2);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_receiver_waiting_again_with_the_same_waker_is_woken_by_the_next_push() {
        let (tx, mut rx) = channel(4);
        let (task, waker) = counter();
        let woken = || task.0.load(Ordering::SeqCst);
        let mut cx = Context::from_waker(&waker);
        for round in 1..=3 {
            // After the first round the waker is kept: waiting again takes the fast path
            // (no lock), and must still be seen by the push that follows.
            assert!(rx.poll_recv(&mut cx).is_pending());
            assert!(rx.poll_recv(&mut cx).is_pending(), "still nothing to read");
            assert_eq!(woken(), round - 1);
            tx.push_audio(Bytes::from(vec![round as u8]));
            assert_eq!(woken(), round, "the push wakes the waiting receiver");
            // One push, one wake-up: the next push before the receiver waits again wakes
            // nothing.
            tx.push_audio(Bytes::from(vec![0]));
            assert_eq!(woken(), round);
            assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(audio(round as u8))));
            assert_eq!(rx.try_recv(), Some(audio(0)));
            assert_eq!(rx.try_recv(), None);
        }
        // Polled from another task now: that task is the one woken.
        let (other, other_waker) = counter();
        assert!(
            rx.poll_recv(&mut Context::from_waker(&other_waker))
                .is_pending()
        );
        tx.push_audio(Bytes::new());
        assert_eq!(other.0.load(Ordering::SeqCst), 1);
        assert_eq!(woken(), 3);
    }

    #[test]
    fn a_push_between_the_receivers_look_and_its_arming_is_not_missed() {
        let (tx, mut rx) = channel(4);
        let tx = std::rc::Rc::new(tx);
        let (task, waker) = counter();
        let woken = || task.0.load(Ordering::SeqCst);
        let mut cx = Context::from_waker(&waker);
        // Waiting once keeps the waker; the push that wakes it disarms it.
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.push_audio(Bytes::from_static(b"a"));
        assert_eq!(woken(), 1);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(audio_of(b"a"))));
        // Not armed, nothing there: the fast path looks, then arms. A push in between finds
        // it not armed and wakes nothing, so the arming must see it.
        let sender = tx.clone();
        crate::testing::in_the_gap(move || {
            sender.push_audio(Bytes::from_static(b"b"));
        });
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(audio_of(b"b"))));
        assert_eq!(woken(), 1);
        // Armed already: the fast path only looks. A push in between finds it armed and
        // wakes it.
        let sender = tx.clone();
        crate::testing::in_the_gap(move || {
            sender.push_audio(Bytes::from_static(b"c"));
        });
        assert!(rx.poll_recv(&mut cx).is_pending());
        assert_eq!(woken(), 2, "the push in the gap woke the receiver");
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(audio_of(b"c"))));
    }

    #[test]
    fn no_push_is_missed_by_a_receiver_in_another_thread() {
        // The sender and the receiver race on the flags from two threads. A lost wake-up
        // leaves the receiver waiting while a frame is queued: `wait` then fails.
        const N: u32 = 200_000;
        let (mut tx, mut rx) = channel(8);
        let (got, lost) = std::thread::scope(|s| {
            let receiver = s.spawn(move || {
                let (parker, waker) = crate::testing::parker();
                let mut cx = Context::from_waker(&waker);
                let (mut got, mut lost, mut last) = (0u64, 0u64, None);
                loop {
                    match rx.poll_recv(&mut cx) {
                        // Anything to read now was there when the wake-up was due.
                        Poll::Pending => parker.wait(|| rx.try_recv().is_some()),
                        Poll::Ready(Some(AgentEvent::Audio(data))) => {
                            let n = u32::from_le_bytes(data[..].try_into().expect("4 bytes"));
                            assert!(last.is_none_or(|l| n > l), "in order");
                            last = Some(n);
                            got += 1;
                        }
                        Poll::Ready(Some(AgentEvent::AudioLost { frames })) => lost += frames,
                        Poll::Ready(Some(other)) => panic!("unexpected {other:?}"),
                        Poll::Ready(None) => return (got, lost),
                    }
                }
            });
            // Not the receiver's task: every push to a waiting receiver must wake it.
            tx.polled_by(Waker::noop().clone());
            for n in 0..N {
                let pushed = tx.push_audio(Bytes::copy_from_slice(&n.to_le_bytes()));
                assert_ne!(pushed, Pushed::Closed);
            }
            drop(tx);
            receiver.join().expect("the receiver thread")
        });
        assert_eq!(
            got + lost,
            u64::from(N),
            "every frame was read or reported lost"
        );
    }

    fn audio_of(b: &'static [u8]) -> AgentEvent {
        AgentEvent::Audio(Bytes::from_static(b))
    }

    fn audio(n: u8) -> AgentEvent {
        AgentEvent::Audio(Bytes::from(vec![n]))
    }

    #[tokio::test]
    async fn audio_drops_oldest_reports_the_loss_and_control_is_kept() {
        let (tx, mut rx) = channel(3);
        for n in 0..3 {
            assert_eq!(tx.push_audio(Bytes::from(vec![n])), Pushed::Queued);
        }
        assert_eq!(tx.push_audio(Bytes::from(vec![3])), Pushed::DroppedOldest);
        let dtmf = AgentEvent::Dtmf(Digit::D5);
        tx.try_send_control(dtmf.clone()).unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(AgentEvent::AudioLost { frames: 2 }));
        assert_eq!(rx.recv().await, Some(audio(2)));
        assert_eq!(rx.recv().await, Some(audio(3)));
        assert_eq!(rx.recv().await, Some(dtmf));
        assert_eq!(rx.recv().await, None);
    }

    #[test]
    fn control_is_refused_only_when_full_of_control() {
        let (tx, mut rx) = channel(1);
        let end = AgentEvent::Ended(EndReason::PeerHangup);
        tx.try_send_control(end.clone()).unwrap();
        assert_eq!(tx.try_send_control(end.clone()), Err(SendError::Full));
        assert_eq!(rx.try_recv(), Some(end));
        assert_eq!(rx.try_recv(), None);
        drop(rx);
        assert_eq!(tx.push_audio(Bytes::new()), Pushed::Closed);
        assert_eq!(
            tx.try_send_control(AgentEvent::Dtmf(Digit::D1)),
            Err(SendError::Closed)
        );
    }
}
