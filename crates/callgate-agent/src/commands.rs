//! The bounded channel of commands from an agent to its call.
//!
//! Policy when full ([`COMMAND_QUEUE`] commands waiting): the sender waits (backpressure). The
//! call takes commands only while its playout has room, so an agent that produces audio faster
//! than real time waits here; control commands wait behind audio, in order.
//!
//! Many senders (the agent and the tasks it spawned, through cloned [`AgentSender`]s), one
//! receiver (the call task).
//!
//! Wake-ups: the receiver's waker is kept in the channel while it waits, and a push wakes it
//! only then. The call task polls its agent's future itself, so most pushes happen while it
//! runs: it says so ([`Receiver::busy`]) when a turn starts, and looks again before it sleeps,
//! so those pushes wake nothing (a wake-up would only poll the whole call again for nothing). A small mutex-guarded queue that grows on demand instead of a
//! tokio mpsc channel: a tokio channel preallocates a block of 32 slots per call (~1.5 KB),
//! while most agents keep one command in flight at a time.
//!
//! [`AgentSender`]: crate::AgentSender

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

use crate::Stamped;

/// Capacity of an agent's command channel.
pub const COMMAND_QUEUE: usize = 64;

struct State {
    items: VecDeque<Stamped>,
    senders: usize,
    receiver_alive: bool,
    /// The receiver's task, while it waits for a command (or the last sender's drop): a push
    /// takes and wakes it. Pushes made while the call is busy anyway (the turn that polls the
    /// agent) find none and wake nothing.
    waiter: Option<Waker>,
}

struct Shared {
    state: Mutex<State>,
    /// Senders wait here for room (or the receiver's drop).
    writable: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding this lock, and the queue stays valid if one did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Creates the channel.
pub(crate) fn channel() -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receiver_alive: true,
            waiter: None,
        }),
        writable: Notify::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// The receiver is gone: the call has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// What a push found.
enum Push {
    Done,
    Full(Stamped),
}

/// A sending end. Cloning adds a sender; the channel closes for the receiver when the last
/// sender is dropped.
pub(crate) struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    /// Queues `command`, waiting while the channel is full. Cancel-safe: a dropped send
    /// queues nothing.
    pub(crate) async fn send(&self, command: Stamped) -> Result<(), Closed> {
        // The common case costs one lock: room, push, wake the receiver only if it waits.
        let mut command = match self.push(command)? {
            Push::Done => return Ok(()),
            Push::Full(c) => c,
        };
        loop {
            // Registered before looking again, so a pop in between is not missed.
            let room = self.shared.writable.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            command = match self.push(command)? {
                Push::Done => return Ok(()),
                Push::Full(c) => c,
            };
            room.await;
        }
    }

    fn push(&self, command: Stamped) -> Result<Push, Closed> {
        let mut state = self.shared.lock();
        if !state.receiver_alive {
            return Err(Closed);
        }
        if state.items.len() >= COMMAND_QUEUE {
            return Ok(Push::Full(command));
        }
        state.items.push_back(command);
        let waiter = state.waiter.take();
        drop(state);
        if let Some(w) = waiter {
            w.wake();
        }
        Ok(Push::Done)
    }
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.senders -= 1;
        let waiter = if state.senders == 0 {
            state.waiter.take()
        } else {
            None
        };
        drop(state);
        if let Some(w) = waiter {
            w.wake();
        }
    }
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

/// The call's end.
pub(crate) struct Receiver {
    shared: Arc<Shared>,
}

impl Receiver {
    /// The next command; `None` once every sender is gone and the queue is empty.
    /// Cancel-safe: a receive dropped while it waits leaves no wake-up behind.
    pub(crate) async fn recv(&mut self) -> Option<Stamped> {
        /// Clears the waiter if the receive is dropped while it waits.
        struct Waiting(Arc<Shared>);
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.lock().waiter = None;
            }
        }
        let _waiting = Waiting(self.shared.clone());
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next command: one lock; when there is none, the waker is kept (cloned
    /// only if it is not the one kept already) and the next push wakes it.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Stamped>> {
        match self.pop(Some(cx.waker())) {
            Pop::Command(c) => Poll::Ready(Some(c)),
            Pop::Closed => Poll::Ready(None),
            Pop::Empty => Poll::Pending,
        }
    }

    /// The next command if one is waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Stamped> {
        match self.pop(None) {
            Pop::Command(c) => Some(c),
            Pop::Closed | Pop::Empty => None,
        }
    }

    /// The receiver's task is running and polls again before it sleeps: pushes until then
    /// need not wake it.
    pub(crate) fn busy(&mut self) {
        self.shared.lock().waiter = None;
    }

    /// Takes the next command; with `waker`, if there is none, keeps it for the next push.
    fn pop(&self, waker: Option<&Waker>) -> Pop {
        let mut state = self.shared.lock();
        match state.items.pop_front() {
            Some(c) => {
                let was_full = state.items.len() + 1 == COMMAND_QUEUE;
                drop(state);
                if was_full {
                    self.shared.writable.notify_waiters();
                }
                Pop::Command(c)
            }
            None if state.senders == 0 => Pop::Closed,
            None => {
                if let Some(waker) = waker {
                    match &mut state.waiter {
                        Some(w) if w.will_wake(waker) => {}
                        slot => *slot = Some(waker.clone()),
                    }
                }
                Pop::Empty
            }
        }
    }
}

enum Pop {
    Command(Stamped),
    Empty,
    Closed,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiver_alive = false;
        state.items.clear();
        drop(state);
        self.shared.writable.notify_waiters();
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use bytes::Bytes;

    use super::*;
    use crate::{AgentCommand, Epoch};

    fn audio(n: u8) -> Stamped {
        Stamped {
            epoch: Epoch(0),
            command: AgentCommand::Audio(Bytes::from(vec![n])),
        }
    }

    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn a_full_channel_makes_senders_wait_and_keeps_order() {
        let (tx, mut rx) = channel();
        for n in 0..COMMAND_QUEUE {
            tx.send(audio(n as u8)).await.unwrap();
        }
        let tx2 = tx.clone();
        {
            let mut waiting = pin!(tx2.send(audio(200)));
            assert!(poll_once(waiting.as_mut()).is_pending(), "no room");
            assert_eq!(rx.try_recv(), Some(audio(0)));
            assert_eq!(poll_once(waiting.as_mut()), Poll::Ready(Ok(())));
        }
        for n in 1..COMMAND_QUEUE {
            assert_eq!(rx.recv().await, Some(audio(n as u8)));
        }
        assert_eq!(rx.recv().await, Some(audio(200)));
        drop(tx);
        assert_eq!(rx.try_recv(), None);
        drop(tx2);
        assert_eq!(rx.recv().await, None, "every sender is gone");
    }

    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn only_a_waiting_receiver_is_woken() {
        let (tx, mut rx) = channel();
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let woken = || count.0.load(std::sync::atomic::Ordering::SeqCst);
        {
            let mut recv = pin!(rx.recv());
            assert!(
                recv.as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            );
            assert!(poll_once(pin!(tx.send(audio(1)))).is_ready());
            assert_eq!(woken(), 1, "the waiting receiver is woken");
            assert_eq!(
                recv.as_mut().poll(&mut Context::from_waker(&waker)),
                Poll::Ready(Some(audio(1)))
            );
        }
        // The call is busy (it will look with try_recv): a push wakes nothing.
        assert!(poll_once(pin!(tx.send(audio(2)))).is_ready());
        assert_eq!(rx.try_recv(), Some(audio(2)));
        // Polled and pending, then busy (a turn started): a push wakes nothing; once pending
        // again, the next push wakes it.
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        rx.busy();
        assert!(poll_once(pin!(tx.send(audio(4)))).is_ready());
        assert_eq!(woken(), 1, "a busy receiver is not woken");
        assert_eq!(
            rx.poll_recv(&mut Context::from_waker(&waker)),
            Poll::Ready(Some(audio(4)))
        );
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        assert!(poll_once(pin!(tx.send(audio(5)))).is_ready());
        assert_eq!(woken(), 2, "a pending receiver is woken");
        assert_eq!(rx.try_recv(), Some(audio(5)));
        {
            // A receive that was cancelled while waiting leaves no wake-up behind either.
            let mut recv = pin!(rx.recv());
            assert!(
                recv.as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            );
        }
        assert!(poll_once(pin!(tx.send(audio(3)))).is_ready());
        assert_eq!(woken(), 2);
        assert_eq!(rx.try_recv(), Some(audio(3)));
    }

    #[tokio::test]
    async fn a_dropped_receiver_releases_waiting_senders() {
        let (tx, rx) = channel();
        for n in 0..COMMAND_QUEUE {
            tx.send(audio(n as u8)).await.unwrap();
        }
        let mut waiting = pin!(tx.send(audio(1)));
        assert!(poll_once(waiting.as_mut()).is_pending());
        drop(rx);
        assert_eq!(poll_once(waiting.as_mut()), Poll::Ready(Err(Closed)));
    }

    #[tokio::test]
    async fn a_cancelled_send_queues_nothing() {
        let (tx, mut rx) = channel();
        for n in 0..COMMAND_QUEUE {
            tx.send(audio(n as u8)).await.unwrap();
        }
        {
            let mut cancelled = pin!(tx.send(audio(99)));
            assert!(poll_once(cancelled.as_mut()).is_pending());
        }
        for _ in 0..COMMAND_QUEUE {
            assert!(rx.try_recv().is_some());
        }
        assert_eq!(rx.try_recv(), None);
    }
}
