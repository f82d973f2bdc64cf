//! Test helpers for the channels' races.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// A waker that unparks the thread that made it.
pub(crate) struct Parker {
    woken: AtomicBool,
    thread: Thread,
}

impl Wake for Parker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// A waker for this thread, and its flag.
pub(crate) fn parker() -> (Arc<Parker>, Waker) {
    let parker = Arc::new(Parker {
        woken: AtomicBool::new(false),
        thread: std::thread::current(),
    });
    (parker.clone(), Waker::from(parker))
}

impl Parker {
    /// Waits for a wake-up. Every 10 s without one, `queued` is asked whether something the
    /// wake-up was due for is already there: then a wake-up was lost, and this panics (a
    /// wake-up that was sent arrives in microseconds; only a lost one waits for ever).
    pub(crate) fn wait(&self, mut queued: impl FnMut() -> bool) {
        let mut since = Instant::now();
        while !self.woken.swap(false, Ordering::AcqRel) {
            std::thread::park_timeout(Duration::from_secs(1));
            if since.elapsed() >= Duration::from_secs(10) {
                assert!(
                    !queued(),
                    "lost wake-up: something was queued, nothing woke us"
                );
                since = Instant::now();
            }
        }
    }
}

thread_local! {
    /// What runs once, at the next look-then-arm gap of a channel's fast path.
    static IN_THE_GAP: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` (once) in this thread's next fast-path wait, between the receiver's look at the
/// flags and its arming: where a push would be missed if the arming did not look again.
pub(crate) fn in_the_gap(f: impl FnOnce() + 'static) {
    IN_THE_GAP.with(|gap| *gap.borrow_mut() = Some(Box::new(f)));
}

/// Called by the channels' fast paths in tests, at that gap.
pub(crate) fn gap() {
    if let Some(f) = IN_THE_GAP.with(|gap| gap.borrow_mut().take()) {
        f();
    }
}
