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

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

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
}

struct Shared {
    state: Mutex<State>,
    readable: Notify,
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
        }),
        readable: Notify::new(),
    });
    (
        EventSender {
            shared: shared.clone(),
        },
        EventReceiver { shared },
    )
}

/// The call's end of the queue.
pub struct EventSender {
    shared: Arc<Shared>,
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
        drop(state);
        self.shared.readable.notify_one();
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
        drop(state);
        self.shared.readable.notify_one();
        Ok(())
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        self.shared.lock().sender_alive = false;
        self.shared.readable.notify_one();
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
        loop {
            match self.poll_next() {
                Next::Event(event) => return Some(event),
                Next::Closed => return None,
                Next::Empty => self.shared.readable.notified().await,
            }
        }
    }

    /// The next event if one is queued (`None` when the queue is empty or closed).
    pub fn try_recv(&mut self) -> Option<AgentEvent> {
        match self.poll_next() {
            Next::Event(event) => Some(event),
            Next::Closed | Next::Empty => None,
        }
    }

    fn poll_next(&mut self) -> Next {
        let mut state = self.shared.lock();
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
    use bytes::Bytes;
    use callgate_proto::{Digit, EndReason};

    use super::*;

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
