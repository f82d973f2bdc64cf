//! The bounded queue of events toward an agent.
//!
//! Policy when full (STYLE.md §5):
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
use std::time::Duration;

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
    /// The queue stayed full of control events for the whole timeout.
    #[error("the agent did not take events in time")]
    Timeout,
}

struct State {
    items: VecDeque<AgentEvent>,
    capacity: usize,
    sender_alive: bool,
    receiver_alive: bool,
}

struct Shared {
    state: Mutex<State>,
    readable: Notify,
    writable: Notify,
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
            sender_alive: true,
            receiver_alive: true,
        }),
        readable: Notify::new(),
        writable: Notify::new(),
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
                    result = Pushed::DroppedOldest;
                }
                // Full of control events: the newest audio is the one to go.
                None => return Pushed::DroppedOldest,
            }
        }
        state.items.push_back(AgentEvent::Audio(data));
        drop(state);
        self.shared.readable.notify_one();
        result
    }

    /// Queues a control event, waiting at most `timeout` for room (see the module policy).
    pub async fn send_control(
        &self,
        event: AgentEvent,
        timeout: Duration,
    ) -> Result<(), SendError> {
        let wait = async {
            loop {
                {
                    let mut state = self.shared.lock();
                    if !state.receiver_alive {
                        return Err(SendError::Closed);
                    }
                    if state.items.len() >= state.capacity
                        && let Some(i) = state
                            .items
                            .iter()
                            .position(|e| matches!(e, AgentEvent::Audio(_)))
                    {
                        state.items.remove(i);
                    }
                    if state.items.len() < state.capacity {
                        state.items.push_back(event);
                        drop(state);
                        self.shared.readable.notify_one();
                        return Ok(());
                    }
                }
                self.shared.writable.notified().await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| SendError::Timeout)?
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
    /// The next event, or `None` once the sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<AgentEvent> {
        loop {
            {
                let mut state = self.shared.lock();
                if let Some(event) = state.items.pop_front() {
                    drop(state);
                    self.shared.writable.notify_one();
                    return Some(event);
                }
                if !state.sender_alive {
                    return None;
                }
            }
            self.shared.readable.notified().await;
        }
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        self.shared.lock().receiver_alive = false;
        self.shared.writable.notify_one();
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
    async fn audio_drops_oldest_and_control_is_kept() {
        let (tx, mut rx) = channel(3);
        for n in 0..3 {
            assert_eq!(tx.push_audio(Bytes::from(vec![n])), Pushed::Queued);
        }
        assert_eq!(tx.push_audio(Bytes::from(vec![3])), Pushed::DroppedOldest);
        let dtmf = AgentEvent::Dtmf(Digit::D5);
        tx.send_control(dtmf.clone(), Duration::from_millis(10))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(audio(2)));
        assert_eq!(rx.recv().await, Some(audio(3)));
        assert_eq!(rx.recv().await, Some(dtmf));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn control_waits_only_when_full_of_control() {
        let (tx, mut rx) = channel(1);
        let end = AgentEvent::Ended(EndReason::PeerHangup);
        tx.send_control(end.clone(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            tx.send_control(end.clone(), Duration::from_secs(1)).await,
            Err(SendError::Timeout)
        );
        assert_eq!(rx.recv().await, Some(end));
        drop(rx);
        assert_eq!(tx.push_audio(Bytes::new()), Pushed::Closed);
    }
}
