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

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::AgentEvent;

/// Default capacity: 50 frames is one second of 20 ms audio.
pub const DEFAULT_CAPACITY: usize = 50;

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
    /// The receiver's task, while it waits for an event.
    waiter: Option<Waker>,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding this lock, and the state stays valid if one did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Creates a queue holding at most `capacity` events (at least 1).
pub fn channel(capacity: usize) -> (EventSender, EventReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            // Grows on demand: most agents keep up, so most calls never need the capacity.
            items: VecDeque::new(),
            capacity: capacity.max(1),
            lost: 0,
            sender_alive: true,
            receiver_alive: true,
            waiter: None,
        }),
    });
    (
        EventSender {
            shared: shared.clone(),
            driver: None,
        },
        EventReceiver { shared },
    )
}

/// The call's end of the queue.
pub struct EventSender {
    shared: Arc<Shared>,
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
                // Full of control events: the newest audio is the one to go.
                None => {
                    state.lost += 1;
                    return Pushed::DroppedOldest;
                }
            }
        }
        state.items.push_back(AgentEvent::Audio(data));
        self.wake(state);
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
        self.wake(state);
        Ok(())
    }

    /// Wakes the waiting receiver, unless it waits in the task that polls it next anyway.
    fn wake(&self, mut state: MutexGuard<'_, State>) {
        let Some(waiter) = &state.waiter else {
            return;
        };
        if self.driver.as_ref().is_some_and(|d| d.will_wake(waiter)) {
            return;
        }
        let waiter = state.waiter.take();
        drop(state);
        if let Some(w) = waiter {
            w.wake();
        }
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.sender_alive = false;
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
    shared: Arc<Shared>,
}

impl EventReceiver {
    /// The next event, or `None` once the sender is gone and the queue is empty. Caller audio
    /// dropped because the queue was full is reported first, as [`AgentEvent::AudioLost`].
    pub async fn recv(&mut self) -> Option<AgentEvent> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next event (see [`EventReceiver::recv`]): one lock, and the waker is
    /// stored only when it is not the one already stored.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<AgentEvent>> {
        let mut state = self.shared.lock();
        match Self::next(&mut state) {
            Next::Event(event) => Poll::Ready(Some(event)),
            Next::Closed => Poll::Ready(None),
            Next::Empty => {
                match &mut state.waiter {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }

    /// The next event if one is queued (`None` when the queue is empty or closed).
    pub fn try_recv(&mut self) -> Option<AgentEvent> {
        match Self::next(&mut self.shared.lock()) {
            Next::Event(event) => Some(event),
            Next::Closed | Next::Empty => None,
        }
    }

    fn next(state: &mut State) -> Next {
        if state.lost > 0 {
            let frames = std::mem::take(&mut state.lost);
            return Next::Event(AgentEvent::AudioLost { frames });
        }
        if let Some(event) = state.items.pop_front() {
            return Next::Event(event);
        }
        if state.sender_alive {
            Next::Empty
        } else {
            Next::Closed
        }
    }
}

enum Next {
    Event(AgentEvent),
    Empty,
    Closed,
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        self.shared.lock().receiver_alive = false;
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
