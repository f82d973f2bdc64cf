//! The playout clock: what the caller hears, sent one 20 ms frame every 20 ms.
//!
//! Neither phone protocol acknowledges playback, so whatever we send is played as it arrives.
//! The playout clock owns that: it queues outbound audio (bounded by a *lead*), sends exactly
//! one frame per 20 ms on absolute deadlines (no drift from sleeping), and therefore always
//! knows, to the millisecond, how much the caller has heard. That makes `clear` (barge-in)
//! exact: dropping the queue drops everything the caller has not heard yet.
//!
//! Sans-IO: [`Playout::push`] queues audio, [`Playout::poll`] returns what is due at `now`,
//! [`Playout::poll_timeout`] the next deadline. The owner sends each [`PlayoutEvent::Frame`].
//!
//! # Timing
//! - Frames have slots 20 ms apart on an absolute grid (each frame moves the grid by its own
//!   duration: a short last frame moves it less). A frame may leave up to one frame *before*
//!   its slot: audio that arrives at real-time pace (the echo agent, streaming speech) is
//!   never held back by jitter, a burst is sent one frame ahead and then one frame per 20 ms,
//!   and at most one frame is ever in flight beyond the caller's slot.
//! - Late audio keeps the grid: pushed into an empty queue up to [`MAX_CATCH_UP`] after its
//!   slot, it goes out at once and what follows catches up back to back. A late frame (jitter,
//!   a short pause, an owner held up briefly) therefore never delays the frames after it: a
//!   grid re-anchored on it would hold every later frame of a real-time relay (an echo) by
//!   its lateness, for the rest of the call. If it came more than a frame late the caller
//!   heard a gap: an underrun.
//! - A gap: nothing pushed by [`MAX_CATCH_UP`] after the next slot (a deadline of
//!   [`Playout::poll_timeout`]). [`Underrun::Nothing`] then goes idle (the caller hears
//!   nothing) and the next push goes out at once and anchors the grid afresh (an underrun);
//!   [`Underrun::Silence`] keeps the grid and fills each empty slot with a silent frame (a
//!   continuous stream).
//! - A stall: the owner wakes more than a frame late for a deadline, or more than
//!   [`MAX_CATCH_UP`] late for a frame's. The grid is kept. Audio whose slot passed more than
//!   [`MAX_CATCH_UP`] ago is dropped (the caller can no longer hear it in time) and counted
//!   ([`Playout::stalls`], [`Playout::stall_dropped_ms`]); the rest goes out back to back
//!   until the grid is on real time again. Marks whose audio was partly dropped this way
//!   report [`MarkEnd::Cleared`].
//! - After a stall, audio pushed into an empty queue may be the backlog the owner piled up
//!   while held up (an echo's caller audio waiting in its socket), which a re-anchored grid
//!   would play at real-time pace and so carry its delay for the rest of the call; or it may
//!   be new (a lone frame, the start of a reply), which must not be dropped for slots nobody
//!   filled. Only the amount tells them apart, so such audio is *held* for one frame
//!   ([`HOLD`]: a backlog is read from the socket in one go), then only its newest
//!   [`MAX_CATCH_UP`] is kept, sent back to back, and the grid is on real time again. The
//!   door for such audio is open for [`MAX_CATCH_UP`] after a stall and for one frame after
//!   a gap the owner was woken for on time (a stall that ended just then), and whenever the
//!   gap's deadline passed with the owner not woken for it.
//! - Pacing jitter ([`PlayoutEvent::Frame::late`]) is how long after it could leave (the later
//!   of its earliest time and its data being queued) a frame actually left.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate_proto::AudioFormat;

/// The frame duration.
pub const FRAME: Duration = Duration::from_millis(20);
/// The most a late owner catches up by sending frames back to back.
pub const MAX_CATCH_UP: Duration = Duration::from_millis(100);
/// How long audio pushed after a stall waits to be told from a backlog (see the module docs).
pub const HOLD: Duration = FRAME;

/// What to do when a deadline passes with nothing queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Underrun {
    /// Send nothing and go idle: the next audio is sent as soon as it comes.
    #[default]
    Nothing,
    /// Send a frame of silence and keep the clock running.
    Silence,
}

/// What the playout produced.
#[derive(Debug, Clone, PartialEq)]
pub enum PlayoutEvent {
    /// Send this frame now.
    Frame {
        /// The audio, in the call's format.
        data: Bytes,
        /// How late it goes out relative to its deadline (pacing jitter).
        late: Duration,
        /// Whether it is generated silence (underrun policy), not queued audio.
        silence: bool,
    },
    /// Everything queued before this mark has been sent, or dropped by a clear.
    Mark {
        /// The mark's id.
        id: u64,
        /// What became of the audio before it.
        end: MarkEnd,
    },
}

/// What became of the audio queued before a mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkEnd {
    /// All of it was sent.
    Played,
    /// A clear dropped some of it.
    Cleared,
}

/// The result of [`Playout::clear`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cleared {
    /// Audio dropped from the queue, ms.
    pub dropped_ms: u64,
    /// Audio of the current utterance the caller had heard, ms.
    pub played_ms: u64,
}

/// The grid is behind real time after a stall: see [`Playout`]'s `behind`.
#[derive(Debug, Clone, Copy)]
struct Behind {
    /// Audio pushed into an empty queue until then is backlog.
    until: Instant,
    /// Whether this was counted as a stall (a gap's wake is counted only if it had backlog).
    counted: bool,
}

/// The playout clock of one call.
#[derive(Debug)]
pub struct Playout {
    format: AudioFormat,
    frame_bytes: usize,
    /// Bytes per millisecond of audio.
    bytes_per_ms: usize,
    /// The most audio queued ahead, in bytes.
    lead_bytes: usize,
    underrun: Underrun,
    queue: VecDeque<Bytes>,
    queued: usize,
    /// Marks: the total-pushed byte position each waits for, its id, how it ends, and the
    /// stall drops counted when it was placed.
    marks: VecDeque<(u64, u64, MarkEnd, u64)>,
    pushed_total: u64,
    sent_total: u64,
    /// Bytes of the current utterance sent (reset by `clear` and after a gap).
    utterance_sent: u64,
    /// The earliest the next frame may leave (one frame before its slot); `None`: idle.
    next_at: Option<Instant>,
    /// When the data at the head of the queue was queued (for jitter).
    ready_at: Option<Instant>,
    underruns: u64,
    /// Stalls: times the owner woke too late for a deadline (see the module docs).
    stalls: u64,
    /// After a stall (or the wake for a gap): until when audio pushed into an empty queue is
    /// the owner's backlog and takes the grid's late slots, and whether the stall was counted.
    /// Over once the grid is on real time again.
    behind: Option<Behind>,
    /// A gap made the grid idle: the next push counts an underrun.
    gap_pending: bool,
    /// Audio pushed into an empty queue after a stall waits until then: a backlog or new
    /// audio, told apart by how much of it came (see the module docs).
    hold: Option<Instant>,
    /// Bytes dropped because a stall made them too late to play.
    skipped_total: u64,
}

impl Playout {
    /// A playout for audio in `format`, queueing at most `lead` ahead.
    pub fn new(format: AudioFormat, lead: Duration, underrun: Underrun) -> Self {
        let frame_bytes = format.frame_bytes_20ms();
        let bytes_per_ms = frame_bytes / 20;
        Self {
            format,
            frame_bytes,
            bytes_per_ms,
            lead_bytes: (lead.as_millis() as usize).max(20) * bytes_per_ms,
            underrun,
            queue: VecDeque::new(),
            queued: 0,
            marks: VecDeque::new(),
            pushed_total: 0,
            sent_total: 0,
            utterance_sent: 0,
            next_at: None,
            ready_at: None,
            underruns: 0,
            stalls: 0,
            behind: None,
            gap_pending: false,
            hold: None,
            skipped_total: 0,
        }
    }

    /// Whether more audio may be queued (producers wait while this is false).
    pub fn has_room(&self) -> bool {
        self.queued < self.lead_bytes
    }

    /// Audio queued and not yet sent, ms.
    pub fn queued_ms(&self) -> u64 {
        (self.queued / self.bytes_per_ms) as u64
    }

    /// Audio sent since the call started, ms (what the caller has heard).
    pub fn played_ms(&self) -> u64 {
        self.sent_total / self.bytes_per_ms as u64
    }

    /// Audio of the current utterance sent, ms.
    pub fn utterance_played_ms(&self) -> u64 {
        self.utterance_sent / self.bytes_per_ms as u64
    }

    /// Whether audio is queued or a frame is in flight on the clock.
    pub fn is_playing(&self) -> bool {
        self.queued > 0
    }

    /// Gaps: slots the grid reached with nothing queued (the caller heard silence).
    pub fn underruns(&self) -> u64 {
        self.underruns
    }

    /// Stalls: times the owner woke too late for a deadline (see the module docs).
    pub fn stalls(&self) -> u64 {
        self.stalls
    }

    /// Audio dropped because a stall made it too late to play, ms.
    pub fn stall_dropped_ms(&self) -> u64 {
        self.skipped_total / self.bytes_per_ms as u64
    }

    /// Queues audio in the call's format. Always accepted: callers check [`Playout::has_room`]
    /// before taking more from a producer, so the queue exceeds the lead by one chunk at most.
    pub fn push(&mut self, now: Instant, data: Bytes) {
        if data.is_empty() {
            return;
        }
        if self.queued == 0 {
            self.ready_at = Some(now);
            self.place(now);
        }
        self.pushed_total += data.len() as u64;
        self.queued += data.len();
        self.queue.push_back(data);
    }

    /// Audio is pushed into an empty queue at `now`: keeps, anchors or re-anchors the grid.
    fn place(&mut self, now: Instant) {
        let slack = now.checked_sub(FRAME).unwrap_or(now);
        let Some(at) = self.next_at else {
            // Idle: the audio goes out at once and anchors the grid.
            if std::mem::take(&mut self.gap_pending) {
                self.underruns += 1;
            }
            self.next_at = Some(slack);
            return;
        };
        if let Some(behind) = self.behind {
            if now < behind.until {
                // A stall's backlog, or new audio: the amount that comes tells.
                self.hold = Some(now + HOLD);
                return;
            }
            // Later audio is new.
            self.behind = None;
            self.gap();
            self.underruns += 1;
            self.next_at = Some(slack);
            return;
        }
        if self.underrun == Underrun::Silence {
            // The grid never stops; `poll` deals with lateness.
            return;
        }
        let deadline = at + FRAME + MAX_CATCH_UP;
        if now <= deadline {
            // On time, or late: either way the grid is kept. More than a frame late, the
            // caller heard a gap.
            if now > at + 2 * FRAME {
                self.gap();
                self.underruns += 1;
            }
            return;
        }
        // The gap's deadline passed and the owner was not woken for it: held up. This audio
        // may be its backlog, or new audio that came after the gap: the amount tells.
        self.woke(now, now.duration_since(deadline));
        self.hold = Some(now + HOLD);
    }

    /// The owner woke at `now`, `late` after a deadline with nothing queued: a stall (more
    /// than a frame late) or a gap. Either way audio pushed soon after is backlog: for
    /// [`MAX_CATCH_UP`] after a stall, for a frame after a gap's wake (a stall that ended just
    /// then; counted if it comes).
    fn woke(&mut self, now: Instant, late: Duration) {
        if late > FRAME {
            self.stalls += 1;
            self.behind = Some(Behind {
                until: now + MAX_CATCH_UP,
                counted: true,
            });
        } else {
            self.gap();
            self.behind = Some(Behind {
                until: now + FRAME,
                counted: false,
            });
        }
    }

    /// The caller hears a gap: a new utterance begins.
    fn gap(&mut self) {
        self.utterance_sent = 0;
    }

    /// Places a mark after everything queued so far; [`PlayoutEvent::Mark`] comes out once it
    /// has all been sent (at the next poll if nothing is queued).
    pub fn mark(&mut self, id: u64) {
        self.marks
            .push_back((self.pushed_total, id, MarkEnd::Played, self.skipped_total));
    }

    /// Drops everything queued now. Marks still pending are reported at the next poll (their
    /// audio will never play).
    pub fn clear(&mut self) -> Cleared {
        let cleared = Cleared {
            dropped_ms: self.queued_ms(),
            played_ms: self.utterance_played_ms(),
        };
        self.queue.clear();
        self.pushed_total -= self.queued as u64;
        self.queued = 0;
        for mark in &mut self.marks {
            if mark.0 > self.pushed_total {
                mark.0 = self.pushed_total;
                mark.2 = MarkEnd::Cleared;
            }
        }
        self.utterance_sent = 0;
        self.ready_at = None;
        self.behind = None;
        self.hold = None;
        if self.underrun == Underrun::Nothing {
            self.next_at = None;
        }
        cleared
    }

    /// The next deadline, if any. Marks never need one: a mark becomes due only through
    /// `mark`, `clear` or a sent frame, and the owner polls after each of those anyway (drive
    /// invariant: after every input, poll until `None`).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let at = self.next_at?;
        if self.queued > 0 {
            return Some(self.hold.unwrap_or(at));
        }
        match (self.behind, self.underrun) {
            // The end of the door left open for a backlog.
            (Some(behind), _) => Some(behind.until),
            (None, Underrun::Silence) => Some(at),
            // The start of a gap: woken on time, it is one; late, a stall.
            (None, Underrun::Nothing) => Some(at + FRAME + MAX_CATCH_UP),
        }
    }

    /// What is due at `now`. Call until it returns `None`.
    pub fn poll(&mut self, now: Instant) -> Option<PlayoutEvent> {
        if let Some(&(at, id, end, skipped)) = self.marks.front()
            && at <= self.sent_total + self.skipped_total
        {
            self.marks.pop_front();
            let end = if self.skipped_total > skipped {
                MarkEnd::Cleared
            } else {
                end
            };
            return Some(PlayoutEvent::Mark { id, end });
        }
        if let Some(until) = self.hold {
            if self.queued > 0 && now < until {
                return None;
            }
            self.hold = None;
            if self.queued > 0 {
                self.release(now);
            }
        }
        let mut at = self.next_at?;
        if self.queued == 0 {
            match (self.behind, self.underrun) {
                (Some(behind), _) => {
                    if now < behind.until {
                        return None;
                    }
                    // No backlog came: what comes next is new.
                    self.behind = None;
                    if self.underrun == Underrun::Nothing {
                        self.next_at = None;
                        self.gap_pending = true;
                        return None;
                    }
                    // The stream of silence goes on from now.
                    at = now;
                }
                (None, Underrun::Nothing) => {
                    let deadline = at + FRAME + MAX_CATCH_UP;
                    if now >= deadline {
                        self.woke(now, now.duration_since(deadline));
                    }
                    return None;
                }
                (None, Underrun::Silence) => {
                    if now > at + FRAME {
                        // Woken late with nothing queued: the backlog, not silence, fills the
                        // late slots.
                        self.woke(now, now.duration_since(at).saturating_sub(FRAME));
                        return None;
                    }
                }
            }
        }
        if now < at {
            return None;
        }
        if now.duration_since(at) > MAX_CATCH_UP {
            match self.stall(now, at) {
                Some(resume) => at = resume,
                // All of it was too late; more backlog may follow.
                None => return None,
            }
        }
        if self.queued == 0 {
            // A continuous stream: the empty slot is filled with silence.
            self.underruns += 1;
            self.next_at = Some(at + FRAME);
            return Some(PlayoutEvent::Frame {
                data: Bytes::from(silence(self.format, self.frame_bytes)),
                late: now.duration_since(at),
                silence: true,
            });
        }
        let ready = self.ready_at.map_or(at, |r| r.max(at));
        let data = self.take_frame();
        // Integer nanoseconds: a long stream accumulates no rounding.
        let nanos = data.len() as u64 * 1_000_000 / self.bytes_per_ms as u64;
        self.next_at = Some(at + Duration::from_nanos(nanos));
        self.sent_total += data.len() as u64;
        self.utterance_sent += data.len() as u64;
        if self.behind.is_some() && at + 2 * FRAME >= now {
            // On real time again: this frame's slot was less than a frame ago.
            self.behind = None;
        }
        if self.queued > 0 {
            // The rest of the queue has been ready all along.
            self.ready_at = Some(at.min(now));
        }
        Some(PlayoutEvent::Frame {
            data,
            late: now.saturating_duration_since(ready),
            silence: false,
        })
    }

    /// The owner woke at `now`, long after the slot at `at` (or pushed a stall's backlog into
    /// a grid that is behind): drops the audio of the whole slots that passed more than
    /// [`MAX_CATCH_UP`] ago and returns the slot the grid resumes from (the first one not
    /// dropped), or `None` when that left nothing queued (the grid then moved on by what was
    /// dropped, for the backlog still to come).
    fn stall(&mut self, now: Instant, at: Instant) -> Option<Instant> {
        match &mut self.behind {
            Some(behind) if behind.counted => {}
            Some(behind) => {
                // The wake for a gap had backlog after all: a stall.
                behind.counted = true;
                self.stalls += 1;
            }
            None => {
                self.stalls += 1;
                self.behind = Some(Behind {
                    until: now + MAX_CATCH_UP,
                    counted: true,
                });
            }
        }
        let resume = now - MAX_CATCH_UP;
        let late = resume.duration_since(at);
        // Whole frames only, so the audio that remains stays frame-aligned.
        let frames = (late.as_micros() / FRAME.as_micros()) as usize;
        let skipped = self.drop_front(frames * self.frame_bytes);
        // The dropped audio's slots are gone; the grid keeps its phase (an echo's audio keeps
        // coming when its slots come: a grid moved to `resume` would hold it up to a frame).
        let nanos = skipped * 1_000_000 / self.bytes_per_ms as u64;
        let resumed = at + Duration::from_nanos(nanos);
        if self.queued == 0 {
            self.ready_at = None;
            self.next_at = Some(resumed);
            return None;
        }
        Some(resumed)
    }

    /// The hold is over. A backlog is at most what a real-time source sent while the grid was
    /// behind: of the audio held, only what is both older than [`MAX_CATCH_UP`] by the grid
    /// (the slots that passed) and beyond the newest [`MAX_CATCH_UP`] of it is dropped, in
    /// whole frames. A lone frame keeps everything; a long utterance loses no more than a
    /// stall would have dropped from it. What is kept starts at most [`MAX_CATCH_UP`] behind
    /// real time, so it goes out back to back and then on the grid.
    fn release(&mut self, now: Instant) {
        let at = self.next_at.unwrap_or(now);
        let late = now
            .checked_sub(MAX_CATCH_UP)
            .map_or(Duration::ZERO, |resume| {
                resume.saturating_duration_since(at)
            });
        let by_slots = (late.as_micros() / FRAME.as_micros()) as usize * self.frame_bytes;
        let keep = (MAX_CATCH_UP.as_millis() / FRAME.as_millis()) as usize * self.frame_bytes;
        let beyond_newest = self.queued.saturating_sub(keep).div_ceil(self.frame_bytes);
        let skipped = self.drop_front(by_slots.min(beyond_newest * self.frame_bytes));
        if skipped > 0 {
            match &mut self.behind {
                Some(behind) if behind.counted => {}
                Some(behind) => {
                    // The wake for a gap had backlog after all: a stall.
                    behind.counted = true;
                    self.stalls += 1;
                }
                None => self.stalls += 1,
            }
        }
        let kept = Duration::from_nanos(self.queued as u64 * 1_000_000 / self.bytes_per_ms as u64);
        let behind_by = kept.min(MAX_CATCH_UP);
        self.next_at = Some(now.checked_sub(behind_by).unwrap_or(now));
        self.behind = None;
    }

    /// Drops up to `bytes` from the front of the queue as too late to play; returns how many.
    fn drop_front(&mut self, bytes: usize) -> u64 {
        let mut skip = bytes.min(self.queued);
        let skipped = skip as u64;
        while skip > 0 {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            if front.len() <= skip {
                skip -= front.len();
                self.queued -= front.len();
                self.queue.pop_front();
            } else {
                let _ = front.split_to(skip);
                self.queued -= skip;
                skip = 0;
            }
        }
        self.skipped_total += skipped;
        skipped
    }

    /// Up to one frame's worth of bytes from the front of the queue (zero-copy when a queued
    /// chunk is exactly a frame or less).
    fn take_frame(&mut self) -> Bytes {
        let Some(front) = self.queue.front_mut() else {
            return Bytes::new();
        };
        let data = if front.len() <= self.frame_bytes {
            self.queue.pop_front().unwrap_or_default()
        } else {
            front.split_to(self.frame_bytes)
        };
        self.queued -= data.len();
        data
    }
}

/// A frame of silence in `format`.
pub fn silence(format: AudioFormat, bytes: usize) -> Vec<u8> {
    match format {
        // G.711 encodes zero as 0xFF (mu-law) and 0xD5 (A-law).
        AudioFormat::Ulaw8000 => vec![0xFF; bytes],
        AudioFormat::Alaw8000 => vec![0xD5; bytes],
        _ => vec![0; bytes],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(p: &mut Playout, now: Instant) -> Vec<PlayoutEvent> {
        std::iter::from_fn(|| p.poll(now)).collect()
    }

    fn sizes(events: &[PlayoutEvent]) -> Vec<usize> {
        events
            .iter()
            .filter_map(|e| match e {
                PlayoutEvent::Frame { data, .. } => Some(data.len()),
                PlayoutEvent::Mark { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_burst_goes_one_frame_ahead_then_one_frame_per_20ms() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut p = Playout::new(
            AudioFormat::Pcm8000,
            Duration::from_secs(2),
            Underrun::Nothing,
        );
        p.push(t0, Bytes::from(vec![1u8; 320 * 3 + 100]));
        assert_eq!(p.queued_ms(), 66);
        // Two frames at once (the one-frame slack), then the grid.
        assert_eq!(sizes(&frames(&mut p, t0)), [320, 320]);
        assert_eq!(p.poll_timeout(), Some(at(20)));
        // A late wake-up (23 ms) reports 3 ms of jitter and keeps the grid.
        let e = frames(&mut p, at(23));
        assert!(
            matches!(&e[..], [PlayoutEvent::Frame { late, .. }] if *late == Duration::from_millis(3))
        );
        assert_eq!(p.poll_timeout(), Some(at(40)));
        assert!(frames(&mut p, at(39)).is_empty());
        // The short last frame (100 bytes = 6.25 ms) moves the grid by its own duration.
        assert_eq!(sizes(&frames(&mut p, at(40))), [100]);
        assert_eq!(p.played_ms(), 1060 / 16);
        // Nothing queued: the only deadline is the start of a gap, MAX_CATCH_UP after the next
        // slot (the next frame could leave at 46.25 ms, its slot is 66.25 ms).
        let slot = at(40) + Duration::from_micros(6250) + FRAME;
        assert_eq!(p.poll_timeout(), Some(slot + MAX_CATCH_UP));
        assert_eq!(p.underruns(), 0);
        // Audio a little late keeps the grid: back to back until on time (and the frame of
        // slack), then one per 20 ms. The caller heard a gap.
        p.push(at(95), Bytes::from(vec![2u8; 320 * 4]));
        assert_eq!(sizes(&frames(&mut p, at(95))), [320, 320, 320]);
        assert_eq!(p.underruns(), 1);
        assert_eq!(p.poll_timeout(), Some(slot + 2 * FRAME));
        assert_eq!(sizes(&frames(&mut p, slot + 2 * FRAME)), [320]);
        // Woken on time for the start of a gap (and the frame after it, for a stall's
        // backlog), the playout goes idle: no timer at all.
        let gap = p.poll_timeout().expect("the start of a gap");
        assert!(frames(&mut p, gap).is_empty());
        assert_eq!(p.poll_timeout(), Some(gap + FRAME));
        assert!(frames(&mut p, gap + FRAME).is_empty());
        assert_eq!(p.poll_timeout(), None);
        // Audio after a gap goes out at once, counts the gap, and anchors the grid afresh.
        let later = gap + Duration::from_millis(500);
        p.push(later, Bytes::from(vec![3u8; 320 * 3]));
        assert_eq!(sizes(&frames(&mut p, later)), [320, 320]);
        assert_eq!(p.poll_timeout(), Some(later + FRAME));
        assert_eq!((p.underruns(), p.stalls()), (2, 0));
    }

    #[test]
    fn audio_at_real_time_pace_is_never_held_back() {
        // Echo: one frame arrives every 20 ms, with a few ms of jitter either way.
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Playout::new(
            AudioFormat::Pcm8000,
            Duration::from_secs(2),
            Underrun::Nothing,
        );
        for (k, jitter) in [0i64, 3, -4, 2, -1, 4, -3, 0].iter().enumerate() {
            let arrival = t0 + Duration::from_millis((20 * k as i64 + 5 + jitter) as u64);
            p.push(arrival, Bytes::from(vec![k as u8; 320]));
            let e = frames(&mut p, arrival);
            assert!(
                matches!(&e[..], [PlayoutEvent::Frame { late, .. }] if late.is_zero()),
                "frame {k} went out on arrival"
            );
            // Only the start of a gap, were the next frame not to come.
            assert!(p.poll_timeout().is_some_and(|d| d > arrival + FRAME));
        }
        assert_eq!(p.underruns(), 0);
    }

    /// An echo: each 20 ms frame is pushed when the caller's arrives, and goes out at once.
    /// Returns the push times of `count` frames from `from` (ms), every 20 ms.
    fn echo(p: &mut Playout, t0: Instant, from: u64, count: u64, tag: u8) -> Vec<Vec<usize>> {
        (0..count)
            .map(|k| {
                let now = t0 + Duration::from_millis(from + 20 * k);
                p.push(now, Bytes::from(vec![tag; 320]));
                sizes(&frames(p, now))
            })
            .collect()
    }

    #[test]
    fn an_echo_that_stalled_is_back_on_real_time_at_once() {
        // Both ways an owner can notice its stall: the gap's deadline first (the timer), or
        // the backlog first (the socket).
        for timer_first in [true, false] {
            // (The grid's slots are one frame of slack after the audio's earliest time.)
            let t0 = Instant::now() + Duration::from_secs(1);
            let mut p = Playout::new(
                AudioFormat::Pcm8000,
                Duration::from_secs(2),
                Underrun::Nothing,
            );
            echo(&mut p, t0, 0, 10, 1);
            // The owner stalls from 200 ms to 500 ms: the caller's 15 frames of that time
            // pile up in the socket and are read in one go when it wakes.
            let woke = t0 + Duration::from_millis(500);
            if timer_first {
                let deadline = p.poll_timeout().expect("the gap's deadline");
                assert!(deadline < woke - MAX_CATCH_UP, "{deadline:?}");
                assert!(frames(&mut p, woke).is_empty());
            }
            let mut sent = 0;
            for _ in 0..15 {
                p.push(woke, Bytes::from(vec![2u8; 320]));
                sent += frames(&mut p, woke).len();
            }
            // Held for a frame, while the backlog is read.
            assert_eq!(sent, 0, "{timer_first}");
            assert_eq!(p.poll_timeout(), Some(woke + HOLD));
            // Then all but the newest 100 ms is dropped; those 100 ms go out back to back, and
            // the grid is on real time again.
            let released = woke + HOLD;
            assert_eq!(frames(&mut p, released).len(), 5, "{timer_first}");
            assert_eq!(
                (p.stalls(), p.stall_dropped_ms()),
                (1, 200),
                "{timer_first}"
            );
            assert_eq!(p.queued_ms(), 0);
            // The caller's next frames come at real-time pace and go out at once, as before.
            let after = echo(&mut p, t0, 520, 50, 3);
            assert!(after.iter().all(|f| f == &[320]), "{after:?}");
            assert_eq!((p.underruns(), p.stalls()), (0, 1));
        }
    }

    #[test]
    fn a_late_frame_never_holds_up_the_frames_after_it() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Playout::new(
            AudioFormat::Pcm8000,
            Duration::from_secs(2),
            Underrun::Nothing,
        );
        echo(&mut p, t0, 0, 10, 1);
        // Frame 10 is 36 ms late (scheduling, the network); frame 11 comes on time.
        let late = t0 + Duration::from_millis(236);
        p.push(late, Bytes::from(vec![2u8; 320]));
        assert_eq!(sizes(&frames(&mut p, late)), [320]);
        let after = echo(&mut p, t0, 220, 50, 3);
        assert!(after.iter().all(|f| f == &[320]), "{after:?}");
        assert_eq!((p.underruns(), p.stalls()), (1, 0));
    }

    #[test]
    fn a_stall_that_ends_as_a_gap_begins_is_still_a_stall() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Playout::new(
            AudioFormat::Pcm8000,
            Duration::from_secs(2),
            Underrun::Nothing,
        );
        echo(&mut p, t0, 0, 10, 1);
        // Held up from 190 ms until just after the start of a gap: woken (nearly) on time for
        // it, with the caller's frames of that time still unread.
        let gap = p.poll_timeout().expect("the start of a gap");
        let woke = gap + Duration::from_millis(5);
        assert!(frames(&mut p, woke).is_empty());
        let backlog = (woke - t0).as_millis() as u64 / 20 - 9;
        for _ in 0..backlog {
            p.push(woke, Bytes::from(vec![2u8; 320]));
            frames(&mut p, woke);
        }
        assert_eq!(p.stalls(), 0, "held: backlog or new audio");
        frames(&mut p, woke + HOLD);
        assert_eq!(p.stalls(), 1, "the backlog came");
        // (The caller's frame due during the hold belongs to the backlog: real time resumes
        // after it.)
        let after = echo(&mut p, t0, 20 * (11 + backlog), 50, 3);
        assert!(after.iter().all(|f| f == &[320]), "{after:?}");
    }

    #[test]
    fn a_pause_polled_on_time_is_a_gap_not_a_stall() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Playout::new(
            AudioFormat::Pcm8000,
            Duration::from_secs(2),
            Underrun::Nothing,
        );
        echo(&mut p, t0, 0, 10, 1);
        // The caller stops sending for 300 ms; the owner is woken when the gap begins (and a
        // frame later, the end of the door left open for a backlog).
        let gap = p.poll_timeout().expect("the gap's deadline");
        assert!(frames(&mut p, gap).is_empty());
        assert!(frames(&mut p, gap + FRAME).is_empty());
        assert_eq!(p.poll_timeout(), None, "idle");
        // The caller's audio after the pause goes out at once: nothing is dropped.
        let after = echo(&mut p, t0, 500, 10, 2);
        assert!(after.iter().all(|f| f == &[320]), "{after:?}");
        assert_eq!((p.underruns(), p.stalls(), p.stall_dropped_ms()), (1, 0, 0));
    }

    #[test]
    fn audio_pushed_long_after_a_stall_is_new_audio() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Playout::new(
            AudioFormat::Pcm8000,
            Duration::from_secs(2),
            Underrun::Nothing,
        );
        echo(&mut p, t0, 0, 10, 1);
        // A stall noticed by the timer, and no backlog: the caller had stopped sending.
        let woke = t0 + Duration::from_millis(500);
        assert!(frames(&mut p, woke).is_empty());
        assert_eq!(p.stalls(), 1);
        // More than MAX_CATCH_UP later, the next audio is not the stall's: it goes out at once.
        let next = woke + MAX_CATCH_UP + FRAME;
        p.push(next, Bytes::from(vec![2u8; 320 * 3]));
        assert_eq!(sizes(&frames(&mut p, next)), [320, 320]);
        assert_eq!(p.stall_dropped_ms(), 0);
    }

    #[test]
    fn silence_after_a_stall_catches_up_with_the_backlog() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Playout::new(
            AudioFormat::Pcm8000,
            Duration::from_secs(2),
            Underrun::Silence,
        );
        echo(&mut p, t0, 0, 10, 1);
        let woke = t0 + Duration::from_millis(500);
        // Woken late with nothing queued: it waits for the backlog rather than fill silence.
        assert!(frames(&mut p, woke).is_empty());
        assert_eq!(p.poll_timeout(), Some(woke + MAX_CATCH_UP));
        for _ in 0..15 {
            p.push(woke, Bytes::from(vec![2u8; 320]));
            frames(&mut p, woke);
        }
        // Held for a frame (the backlog is being read), then the newest 100 ms is kept.
        let released = frames(&mut p, woke + HOLD);
        let audio = released
            .iter()
            .filter(|e| matches!(e, PlayoutEvent::Frame { silence: false, .. }));
        assert_eq!(audio.count(), 5, "{released:?}");
        assert_eq!(p.stalls(), 1);
        assert!(p.stall_dropped_ms() >= 200, "{}", p.stall_dropped_ms());
        // On real time again: the caller's next frames never wait more than the frame of
        // slack.
        for k in 1..=20u64 {
            let now = woke + FRAME * k as u32;
            frames(&mut p, now);
            p.push(now, Bytes::from(vec![3u8; 320]));
            frames(&mut p, now);
            assert!(
                p.queued_ms() <= 20,
                "frame {k}: {} ms queued",
                p.queued_ms()
            );
        }
        // With no backlog at all, the silence goes on once the wait is over.
        let mut q = Playout::new(
            AudioFormat::Pcm8000,
            Duration::from_secs(2),
            Underrun::Silence,
        );
        echo(&mut q, t0, 0, 10, 1);
        assert!(frames(&mut q, woke).is_empty());
        let later = woke + MAX_CATCH_UP + Duration::from_millis(1);
        assert_eq!(frames(&mut q, later).len(), 1);
        assert_eq!(q.poll_timeout(), Some(later + FRAME));
    }

    #[test]
    fn clear_drops_what_was_not_heard_and_reports_what_was() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Playout::new(
            AudioFormat::Pcm8000,
            Duration::from_secs(2),
            Underrun::Nothing,
        );
        p.push(t0, Bytes::from(vec![0u8; 320 * 50]));
        p.mark(7);
        for ms in [0u64, 20, 40] {
            frames(&mut p, t0 + Duration::from_millis(ms));
        }
        // 0 ms: two frames (slack); 20 and 40 ms: one each.
        assert_eq!(p.queued_ms(), 920);
        let c = p.clear();
        assert_eq!(
            c,
            Cleared {
                dropped_ms: 920,
                played_ms: 80
            }
        );
        assert!(!p.is_playing());
        // The mark's audio will never play: it is released at once, as cleared.
        assert_eq!(
            frames(&mut p, t0 + Duration::from_millis(41)),
            vec![PlayoutEvent::Mark {
                id: 7,
                end: MarkEnd::Cleared
            }]
        );
        assert_eq!(p.played_ms(), 80);
        // After a clear the next audio goes out at once.
        let now = t0 + Duration::from_millis(45);
        p.push(now, Bytes::from(vec![1u8; 320]));
        assert_eq!(sizes(&frames(&mut p, now)), [320]);
    }

    #[test]
    fn marks_follow_the_audio_and_lead_bounds_the_queue() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Playout::new(
            AudioFormat::Ulaw8000,
            Duration::from_millis(100),
            Underrun::Nothing,
        );
        p.push(t0, Bytes::from(vec![0u8; 160]));
        p.mark(1);
        p.push(t0, Bytes::from(vec![0u8; 160 * 4]));
        assert!(!p.has_room());
        p.mark(2);
        let e = frames(&mut p, t0);
        assert!(matches!(
            &e[..],
            [
                PlayoutEvent::Frame { .. },
                PlayoutEvent::Mark {
                    id: 1,
                    end: MarkEnd::Played
                },
                PlayoutEvent::Frame { .. }
            ]
        ));
        assert!(p.has_room());
        for ms in [20u64, 40] {
            assert_eq!(frames(&mut p, t0 + Duration::from_millis(ms)).len(), 1);
        }
        let e = frames(&mut p, t0 + Duration::from_millis(60));
        assert!(matches!(
            &e[..],
            [
                PlayoutEvent::Frame { .. },
                PlayoutEvent::Mark {
                    id: 2,
                    end: MarkEnd::Played
                }
            ]
        ));
    }

    #[test]
    fn silence_policy_keeps_the_clock() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Playout::new(
            AudioFormat::Ulaw8000,
            Duration::from_secs(1),
            Underrun::Silence,
        );
        p.push(t0, Bytes::from(vec![1u8; 160]));
        // The audio, then (one frame ahead, like any frame) silence for the empty next slot.
        let e = frames(&mut p, t0);
        assert!(matches!(&e[..], [
            PlayoutEvent::Frame { silence: false, .. },
            PlayoutEvent::Frame { data, silence: true, .. },
        ] if data.iter().all(|&b| b == 0xFF)));
        // The grid goes on: one silent frame per 20 ms.
        assert_eq!(p.poll_timeout(), Some(t0 + FRAME));
        assert_eq!(frames(&mut p, t0 + FRAME).len(), 1);
        assert_eq!(p.underruns(), 2);
    }

    #[test]
    fn after_a_stall_the_call_is_back_on_real_time_at_once() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Playout::new(
            AudioFormat::Pcm8000,
            Duration::from_secs(2),
            Underrun::Nothing,
        );
        p.push(t0, Bytes::from(vec![0u8; 320 * 50]));
        p.mark(1);
        assert_eq!(sizes(&frames(&mut p, t0)), [320, 320]);
        // The owner stalls for half a second. The 380 ms whose slots passed more than 100 ms
        // ago are dropped; the last 100 ms (and the frame of lead) go out back to back.
        let late = t0 + Duration::from_millis(500);
        assert_eq!(frames(&mut p, late).len(), 6);
        assert_eq!((p.stalls(), p.stall_dropped_ms()), (1, 380));
        // Real time again: the next frame is due one slot from now, not a backlog later.
        assert_eq!(p.poll_timeout(), Some(late + FRAME));
        assert_eq!(p.played_ms(), 160, "dropped audio was never heard");
        // The rest plays on; the mark says some of its audio was dropped.
        let mut events = Vec::new();
        for ms in (520..=1000).step_by(20) {
            events.extend(frames(&mut p, t0 + Duration::from_millis(ms)));
        }
        assert!(events.contains(&PlayoutEvent::Mark {
            id: 1,
            end: MarkEnd::Cleared
        }));
        assert_eq!(p.played_ms() + p.stall_dropped_ms(), 1000);
    }

    #[test]
    fn a_lone_frame_after_a_late_wake_is_played_not_dropped() {
        // A frame every now and then (a canary, a short reply), with the owner held up when a
        // gap began: the frame came long after the grid's last slot, but it is one frame, not a
        // backlog. Both orders in which a late owner can see the deadline and the frame.
        for timer_first in [true, false] {
            let t0 = Instant::now() + Duration::from_secs(1);
            let mut p = Playout::new(
                AudioFormat::Pcm8000,
                Duration::from_secs(2),
                Underrun::Nothing,
            );
            echo(&mut p, t0, 0, 1, 1);
            let deadline = p.poll_timeout().expect("the gap's deadline");
            let woke = deadline + Duration::from_millis(200);
            if timer_first {
                assert!(frames(&mut p, woke).is_empty());
            }
            let arrival = woke + Duration::from_millis(if timer_first { 30 } else { 0 });
            p.push(arrival, Bytes::from(vec![2u8; 320]));
            let mut sent = sizes(&frames(&mut p, arrival));
            // Held at most a frame, while a backlog could still be coming.
            if let Some(next) = p.poll_timeout() {
                assert!(next <= arrival + FRAME, "{timer_first}");
                sent.extend(sizes(&frames(&mut p, next)));
            }
            assert_eq!(sent, [320], "{timer_first}");
            assert_eq!(p.stall_dropped_ms(), 0, "{timer_first}");
            assert_eq!(p.played_ms(), 40, "{timer_first}");
        }
    }
}
