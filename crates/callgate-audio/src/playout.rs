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
//! - Idle (never played, or after a gap), the next push goes out at once and anchors the grid.
//! - An underrun (the grid reached a slot with nothing queued) is noticed at the next push,
//!   without a timer: [`Underrun::Nothing`] re-anchors there (the caller heard a gap);
//!   [`Underrun::Silence`] keeps the grid and fills each empty slot with a silent frame (a
//!   continuous stream; that needs the timer).
//! - A stall (the owner wakes more than [`MAX_CATCH_UP`] late): audio whose slot passed more
//!   than [`MAX_CATCH_UP`] ago is dropped (the caller can no longer hear it in time) and
//!   counted ([`Playout::stalls`], [`Playout::stall_dropped_ms`]); the rest goes out back to
//!   back. The call is on real time again at once and never carries the stall's delay (a
//!   re-anchored grid would keep the whole backlog queued, and its delay, for the rest of the
//!   call). Marks whose audio was partly dropped this way report [`MarkEnd::Cleared`].
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
    /// Stalls: times the owner woke more than [`MAX_CATCH_UP`] late.
    stalls: u64,
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

    /// Stalls: times the owner woke more than [`MAX_CATCH_UP`] late.
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
            let slack = now.checked_sub(FRAME).unwrap_or(now);
            match self.next_at {
                None => self.next_at = Some(slack),
                // A whole slot after the last frame passed with nothing to play: a gap.
                // (Audio later than its slot by less than a frame is jitter, not a gap.)
                Some(at) if self.underrun == Underrun::Nothing && now > at + 2 * FRAME => {
                    self.underruns += 1;
                    self.utterance_sent = 0;
                    self.next_at = Some(slack);
                }
                Some(_) => {}
            }
        }
        self.pushed_total += data.len() as u64;
        self.queued += data.len();
        self.queue.push_back(data);
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
        if self.underrun == Underrun::Nothing {
            self.next_at = None;
        }
        cleared
    }

    /// The next deadline, if any. Marks never need one: a mark becomes due only through
    /// `mark`, `clear` or a sent frame, and the owner polls after each of those anyway (drive
    /// invariant: after every input, poll until `None`).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.underrun {
            _ if self.queued > 0 => self.next_at,
            Underrun::Silence => self.next_at,
            // Nothing queued and nothing to send: no timer (a gap is noticed at the next push).
            Underrun::Nothing => None,
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
        let mut at = self.next_at?;
        if now < at {
            return None;
        }
        if now.duration_since(at) > MAX_CATCH_UP {
            at = self.stall(now, at);
        }
        if self.queued == 0 {
            if self.underrun == Underrun::Nothing {
                return None;
            }
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

    /// The owner woke at `now`, long after the slot at `at`: drops the audio of the slots that
    /// passed more than [`MAX_CATCH_UP`] ago and returns the slot the grid resumes from.
    fn stall(&mut self, now: Instant, at: Instant) -> Instant {
        self.stalls += 1;
        let resume = now - MAX_CATCH_UP;
        let late = resume.duration_since(at);
        // Whole frames only, so the audio that remains stays frame-aligned.
        let frames = (late.as_micros() / FRAME.as_micros()) as usize;
        let mut skip = (frames * self.frame_bytes).min(self.queued);
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
        if self.queued == 0 {
            self.ready_at = None;
        }
        resume
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
        // Nothing queued: no timer at all.
        assert_eq!(p.poll_timeout(), None);
        assert_eq!(p.underruns(), 0);
        // Audio after a gap goes out at once, counts the gap, and re-anchors.
        p.push(at(95), Bytes::from(vec![2u8; 320]));
        assert_eq!(sizes(&frames(&mut p, at(95))), [320]);
        assert_eq!(p.underruns(), 1);
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
            assert_eq!(p.poll_timeout(), None);
        }
        assert_eq!(p.underruns(), 0);
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
}
