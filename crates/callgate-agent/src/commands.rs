//! The bounded channel of commands from an agent to its call.
//!
//! Policy when full ([`COMMAND_QUEUE`] commands waiting): the sender waits (backpressure). The
//! call takes commands only while its playout has room, so an agent that produces audio faster
//! than real time waits here; control commands wait behind audio, in order.
//!
//! Many senders (the agent and the tasks it spawned, through cloned [`AgentSender`]s), one
//! receiver (the call task).
//!
//! Wake-ups: the receiver's waker is kept in the channel, armed while the receiver waits,
//! and a push wakes it only then. The call task polls its agent's future itself, so most
//! pushes happen while it runs: it says so ([`Receiver::busy`]) when a turn starts, and looks
//! again before it sleeps, so those pushes wake nothing (a wake-up would only poll the whole
//! call again for nothing).
//!
//! Fast path: a word of flags beside the lock says whether anything is there to take
//! (`READY`: a command, or every sender gone) and whether the receiver's waker is armed
//! (`ARMED`). The flags change only with the lock held, except `ARMED`, which the receiver
//! sets and clears on its own; both sides change them with read-modify-write operations, so
//! each sees the other's bit. So the receiver looks without the lock when nothing is there
//! (the call's last look each turn, its poll while it waits for input), waits again with the
//! same waker without the lock or a clone, and [`Receiver::busy`] is one atomic operation. A push cannot
//! be missed: it sets `READY` and reads `ARMED` in one operation, the receiver sets `ARMED`
//! and reads `READY` in one, so whichever comes second sees the first.
//!
//! A small mutex-guarded queue that grows on demand instead of a tokio mpsc channel: a tokio
//! channel preallocates a block of 32 slots per call (~1.5 KB), while most agents keep one
//! command in flight at a time.
//!
//! [`AgentSender`]: crate::AgentSender

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use crate::{Epoch, Error, Link, Stamped};

/// Capacity of an agent's command channel.
pub const COMMAND_QUEUE: usize = 64;

/// Something is there to take: a command, or every sender is gone. Set and cleared only with
/// the lock held, in step with the state.
const READY: u8 = 1;
/// The receiver waits and `State::waiter` holds its waker: the next push wakes it.
const ARMED: u8 = 2;

struct State {
    items: VecDeque<Stamped>,
    senders: usize,
    receiver_alive: bool,
    /// The receiver's task: the last waker it waited with, woken by a push while `ARMED`.
    /// Only the receiver puts one here; it stays while the channel lives.
    waiter: Option<Waker>,
}

/// The channel's state, in the call's [`Link`] (beside the event queue and the epochs).
pub(crate) struct Shared {
    state: Mutex<State>,
    /// `READY` and `ARMED` (see the module docs).
    flags: AtomicU8,
    /// Senders wait here for room (or the receiver's drop).
    writable: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding this lock, and the queue stays valid if one did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Says that something is there to take (with the lock held) and returns the receiver's
    /// waker if it was armed (disarmed now: one push, one wake-up).
    fn ready(&self, state: &State) -> Option<Waker> {
        if self.flags.fetch_or(READY, Ordering::AcqRel) & ARMED == 0 {
            return None;
        }
        self.flags.fetch_and(!ARMED, Ordering::AcqRel);
        state.waiter.clone()
    }
}

impl Shared {
    /// An empty channel with one sender.
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                senders: 1,
                receiver_alive: true,
                waiter: None,
            }),
            flags: AtomicU8::new(0),
            writable: Notify::new(),
        }
    }
}

/// The two ends of `link`'s command channel (its one sender counted already).
pub(crate) fn ends(link: &Arc<Link>) -> (Sender, Receiver) {
    (
        Sender {
            shared: Channel(link.clone()),
        },
        Receiver {
            shared: Channel(link.clone()),
            kept: None,
        },
    )
}

/// A handle on the command channel in a [`Link`].
struct Channel(Arc<Link>);

impl std::ops::Deref for Channel {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0.commands
    }
}

/// The receiver is gone: the call has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Closed;

/// What a push found.
enum Push {
    Done,
    Full(Stamped),
}

/// A sending end. Cloning adds a sender; the channel closes for the receiver when the last
/// sender is dropped.
pub(crate) struct Sender {
    shared: Channel,
}

impl Sender {
    /// The link this channel is part of.
    pub(crate) fn link(&self) -> &Link {
        &self.shared.0
    }

    /// Queues `command`, waiting while the channel is full. With `stamp`, the command is
    /// stamped with that epoch when the send is first polled (the epoch current when it
    /// runs, as an `async fn` would read it). Cancel-safe: a dropped send queues nothing.
    pub(crate) fn send<'a>(
        &'a self,
        command: Stamped,
        stamp: Option<&'a AtomicU64>,
    ) -> Sending<'a> {
        Sending {
            sender: self,
            command: Some(command),
            stamp,
            room: None,
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
        let waiter = self.shared.ready(&state);
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
            shared: Channel(self.shared.0.clone()),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.senders -= 1;
        let waiter = if state.senders == 0 {
            self.shared.ready(&state)
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

/// A send in progress ([`Sender::send`]): written out rather than an `async fn`, so that
/// the common send (room in the channel) is one small struct and one lock, with no nested
/// state machines moving the command from one to the next.
pub(crate) struct Sending<'a> {
    sender: &'a Sender,
    /// The command, until it is queued.
    command: Option<Stamped>,
    /// Where the command's epoch is read at the first poll, if it is to be read then.
    stamp: Option<&'a AtomicU64>,
    /// Registered for room while the channel is full (boxed: only a send that waits needs
    /// it, and every send would otherwise carry it).
    room: Option<Pin<Box<Notified<'a>>>>,
}

impl Future for Sending<'_> {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let (Some(stamp), Some(command)) = (this.stamp.take(), this.command.as_mut()) {
            command.epoch = Epoch(stamp.load(Ordering::Acquire));
        }
        loop {
            if let Some(room) = &mut this.room {
                if room.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.room = None;
            }
            // Polled again after it completed: nothing left to send.
            let Some(command) = this.command.take() else {
                return Poll::Ready(Ok(()));
            };
            let command = match this.sender.push(command) {
                Err(Closed) => return Poll::Ready(Err(Error::CallGone)),
                Ok(Push::Done) => return Poll::Ready(Ok(())),
                Ok(Push::Full(command)) => command,
            };
            // Registered before looking again, so a pop in between is not missed.
            let mut room = Box::pin(this.sender.shared.writable.notified());
            room.as_mut().enable();
            match this.sender.push(command) {
                Err(Closed) => return Poll::Ready(Err(Error::CallGone)),
                Ok(Push::Done) => return Poll::Ready(Ok(())),
                Ok(Push::Full(command)) => {
                    this.command = Some(command);
                    this.room = Some(room);
                }
            }
        }
    }
}

/// The call's end.
pub(crate) struct Receiver {
    shared: Channel,
    /// A copy of the waker in `State::waiter` (the receiver alone puts one there), to tell
    /// without the lock whether the task polling now is the one a push would wake.
    kept: Option<Waker>,
}

impl Receiver {
    /// The next command; `None` once every sender is gone and the queue is empty.
    /// Cancel-safe: a receive dropped while it waits leaves no wake-up behind.
    pub(crate) async fn recv(&mut self) -> Option<Stamped> {
        /// Disarms the waker if the receive is dropped while it waits.
        struct Waiting<'a>(&'a AtomicU8);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_and(!ARMED, Ordering::AcqRel);
            }
        }
        let shared: &Shared = &self.shared;
        let kept = &mut self.kept;
        let _waiting = Waiting(&shared.flags);
        poll_fn(|cx| poll(shared, kept, cx)).await
    }

    /// Polls for the next command. With nothing there and the same waker as last time, no
    /// lock is taken; otherwise one, and the waker is cloned only when it is not the one
    /// kept already. The next push wakes it.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Stamped>> {
        poll(&self.shared, &mut self.kept, cx)
    }

    /// The next command if one is waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Stamped> {
        if self.shared.flags.load(Ordering::Acquire) & READY == 0 {
            return None;
        }
        match pop(&self.shared, self.shared.lock()) {
            Pop::Command(c) => Some(c),
            Pop::Closed | Pop::Empty(_) => None,
        }
    }

    /// The receiver's task is running and polls again before it sleeps: pushes until then
    /// need not wake it.
    pub(crate) fn busy(&mut self) {
        let flags = &self.shared.flags;
        if flags.load(Ordering::Relaxed) & ARMED != 0 {
            flags.fetch_and(!ARMED, Ordering::AcqRel);
        }
    }
}

/// [`Receiver::poll_recv`], on the receiver's fields (a receive's drop guard borrows one).
fn poll(shared: &Shared, kept: &mut Option<Waker>, cx: &mut Context<'_>) -> Poll<Option<Stamped>> {
    let flags = &shared.flags;
    let seen = flags.load(Ordering::Acquire);
    if seen & READY == 0 && kept.as_ref().is_some_and(|k| k.will_wake(cx.waker())) {
        // The waker in the slot is this task's: arming it is all waiting takes.
        #[cfg(test)]
        crate::testing::gap();
        if seen & ARMED != 0 || flags.fetch_or(ARMED, Ordering::AcqRel) & READY == 0 {
            return Poll::Pending;
        }
    }
    match pop(shared, shared.lock()) {
        Pop::Command(c) => Poll::Ready(Some(c)),
        Pop::Closed => Poll::Ready(None),
        Pop::Empty(mut state) => {
            if !kept.as_ref().is_some_and(|k| k.will_wake(cx.waker())) {
                let waker = cx.waker().clone();
                state.waiter = Some(waker.clone());
                *kept = Some(waker);
            }
            // Nothing queued, with the lock held: `READY` is clear, and the next push (which
            // takes the lock) finds the waker armed.
            flags.fetch_or(ARMED, Ordering::AcqRel);
            Poll::Pending
        }
    }
}

/// Takes the next command (with the lock held, released here); clears `READY` when that
/// leaves nothing, and lets waiting senders look again if it made room.
fn pop<'a>(shared: &Shared, mut state: MutexGuard<'a, State>) -> Pop<'a> {
    match state.items.pop_front() {
        Some(c) => {
            let left = state.items.len();
            if left == 0 && state.senders > 0 {
                shared.flags.fetch_and(!READY, Ordering::AcqRel);
            }
            drop(state);
            if left + 1 == COMMAND_QUEUE {
                shared.writable.notify_waiters();
            }
            Pop::Command(c)
        }
        None if state.senders == 0 => Pop::Closed,
        None => Pop::Empty(state),
    }
}

/// What [`pop`] found.
enum Pop<'a> {
    Command(Stamped),
    /// Nothing yet: the lock is still held, to keep a waker.
    Empty(MutexGuard<'a, State>),
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

    /// A channel in a link of its own.
    fn channel() -> (Sender, Receiver) {
        ends(&Link::new(1))
    }

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
            tx.send(audio(n as u8), None).await.unwrap();
        }
        let tx2 = tx.clone();
        {
            let mut waiting = pin!(tx2.send(audio(200), None));
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
            assert!(poll_once(pin!(tx.send(audio(1), None))).is_ready());
            assert_eq!(woken(), 1, "the waiting receiver is woken");
            assert_eq!(
                recv.as_mut().poll(&mut Context::from_waker(&waker)),
                Poll::Ready(Some(audio(1)))
            );
        }
        // The call is busy (it will look with try_recv): a push wakes nothing.
        assert!(poll_once(pin!(tx.send(audio(2), None))).is_ready());
        assert_eq!(rx.try_recv(), Some(audio(2)));
        // Polled and pending, then busy (a turn started): a push wakes nothing; once pending
        // again, the next push wakes it.
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        rx.busy();
        assert!(poll_once(pin!(tx.send(audio(4), None))).is_ready());
        assert_eq!(woken(), 1, "a busy receiver is not woken");
        assert_eq!(
            rx.poll_recv(&mut Context::from_waker(&waker)),
            Poll::Ready(Some(audio(4)))
        );
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        assert!(poll_once(pin!(tx.send(audio(5), None))).is_ready());
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
        assert!(poll_once(pin!(tx.send(audio(3), None))).is_ready());
        assert_eq!(woken(), 2);
        assert_eq!(rx.try_recv(), Some(audio(3)));
    }

    #[test]
    fn a_receiver_waiting_again_with_the_same_waker_is_woken_by_the_next_push() {
        let (tx, mut rx) = channel();
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let woken = || count.0.load(std::sync::atomic::Ordering::SeqCst);
        let mut cx = Context::from_waker(&waker);
        for round in 1..=3u8 {
            // After the first round the waker is kept: waiting again takes the fast path
            // (no lock), and must still be seen by the push that follows.
            assert!(rx.poll_recv(&mut cx).is_pending());
            assert!(rx.poll_recv(&mut cx).is_pending(), "still nothing there");
            assert_eq!(woken(), usize::from(round - 1));
            assert!(poll_once(pin!(tx.send(audio(round), None))).is_ready());
            assert_eq!(
                woken(),
                usize::from(round),
                "the push wakes the waiting receiver"
            );
            // One push, one wake-up.
            assert!(poll_once(pin!(tx.send(audio(0), None))).is_ready());
            assert_eq!(woken(), usize::from(round));
            assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(audio(round))));
            assert_eq!(rx.try_recv(), Some(audio(0)));
            assert_eq!(rx.try_recv(), None);
        }
        // Busy, then waiting again: armed again, woken again.
        assert!(rx.poll_recv(&mut cx).is_pending());
        rx.busy();
        assert!(poll_once(pin!(tx.send(audio(7), None))).is_ready());
        assert_eq!(woken(), 3, "a busy receiver is not woken");
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(audio(7))));
        assert!(rx.poll_recv(&mut cx).is_pending());
        drop(tx);
        assert_eq!(
            woken(),
            4,
            "the last sender's drop wakes the waiting receiver"
        );
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_push_between_the_receivers_look_and_its_arming_is_not_missed() {
        let (tx, mut rx) = channel();
        let tx = std::rc::Rc::new(tx);
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let woken = || count.0.load(std::sync::atomic::Ordering::SeqCst);
        let mut cx = Context::from_waker(&waker);
        // Waiting once keeps the waker; a turn (busy) disarms it.
        assert!(rx.poll_recv(&mut cx).is_pending());
        rx.busy();
        // Not armed, nothing there: the fast path looks, then arms. A push in between finds
        // it not armed and wakes nothing, so the arming must see it.
        let sender = tx.clone();
        crate::testing::in_the_gap(move || {
            assert!(poll_once(pin!(sender.send(audio(1), None))).is_ready());
        });
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(audio(1))));
        assert_eq!(woken(), 0);
        // Armed already: the fast path only looks. A push in between finds it armed and
        // wakes it.
        assert!(rx.poll_recv(&mut cx).is_pending());
        let sender = tx.clone();
        crate::testing::in_the_gap(move || {
            assert!(poll_once(pin!(sender.send(audio(2), None))).is_ready());
        });
        assert!(rx.poll_recv(&mut cx).is_pending());
        assert_eq!(woken(), 1, "the push in the gap woke the receiver");
        assert_eq!(rx.try_recv(), Some(audio(2)));
    }

    #[test]
    fn no_push_is_missed_by_a_receiver_that_turns_like_the_call() {
        // The agent's sends (another thread here) race the call's turns: busy, take what is
        // there, wait again. A lost wake-up leaves the receiver waiting while a command is
        // queued: `wait` then fails.
        const N: u32 = 200_000;
        let (tx, mut rx) = channel();
        let sender = std::thread::spawn(move || {
            for n in 0..N {
                let command = Stamped {
                    epoch: Epoch(u64::from(n)),
                    command: AgentCommand::Answer,
                };
                let mut send = pin!(tx.send(command, None));
                // Room is made by the receiver: wait for it like a task would.
                let (parker, waker) = crate::testing::parker();
                let mut cx = Context::from_waker(&waker);
                while send.as_mut().poll(&mut cx).is_pending() {
                    parker.wait(|| false);
                }
            }
        });
        let (parker, waker) = crate::testing::parker();
        let mut cx = Context::from_waker(&waker);
        let mut next = 0u64;
        loop {
            let first = match rx.poll_recv(&mut cx) {
                Poll::Ready(first) => first,
                Poll::Pending => {
                    parker.wait(|| rx.try_recv().is_some());
                    continue;
                }
            };
            // A turn: pushes from here on need not wake us; we look again before we wait.
            rx.busy();
            let Some(first) = first else { break };
            assert_eq!(first.epoch, Epoch(next), "in order");
            next += 1;
            while let Some(c) = rx.try_recv() {
                assert_eq!(c.epoch, Epoch(next), "in order");
                next += 1;
            }
        }
        sender.join().expect("the sender thread");
        assert_eq!(next, u64::from(N), "every command arrived");
    }

    #[tokio::test]
    async fn a_dropped_receiver_releases_waiting_senders() {
        let (tx, rx) = channel();
        for n in 0..COMMAND_QUEUE {
            tx.send(audio(n as u8), None).await.unwrap();
        }
        let mut waiting = pin!(tx.send(audio(1), None));
        assert!(poll_once(waiting.as_mut()).is_pending());
        drop(rx);
        assert_eq!(
            poll_once(waiting.as_mut()),
            Poll::Ready(Err(Error::CallGone))
        );
    }

    #[tokio::test]
    async fn a_cancelled_send_queues_nothing() {
        let (tx, mut rx) = channel();
        for n in 0..COMMAND_QUEUE {
            tx.send(audio(n as u8), None).await.unwrap();
        }
        {
            let mut cancelled = pin!(tx.send(audio(99), None));
            assert!(poll_once(cancelled.as_mut()).is_pending());
        }
        for _ in 0..COMMAND_QUEUE {
            assert!(rx.try_recv().is_some());
        }
        assert_eq!(rx.try_recv(), None);
    }
}
