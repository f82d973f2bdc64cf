//! The audio side of one call, owned by the call task: conversion at the edges (the agent
//! works in its own format), the playout clock every outbound frame goes through, voice
//! activity and barge-in, in-band DTMF detection, and the recording.
//!
//! Nothing here touches a socket or decides anything about the call: the call core feeds
//! caller audio and agent audio in, reacts to what the caller's audio revealed (barge-in is
//! its decision), and sends the frames [`Media::poll`] says are due.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate_audio::playout::{Cleared, Playout, PlayoutEvent, Underrun};
use callgate_audio::recording::{Finished, Recorder, Recordings};
use callgate_audio::vad::{Vad, VadConfig, VadEvent};
use callgate_audio::{AudioFormat, Converter, Resampler, dtmf, pcm};
use callgate_proto::detect::Start;
use callgate_proto::{Digit, DtmfDuration};

/// What the call configures for every call's audio.
#[derive(Debug, Clone)]
pub(crate) struct MediaConfig {
    pub(crate) lead: Duration,
    pub(crate) underrun: Underrun,
    pub(crate) vad: Option<VadConfig>,
    pub(crate) inband_dtmf: bool,
    /// Where recordings go and the writer thread that writes them; `None`: not recording.
    pub(crate) recording: Option<(PathBuf, Arc<Recordings>)>,
}

/// The audio formats on a call's line, named by whose audio each carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LineFormats {
    /// What the phone sends: the caller's voice (the protocols' `phone_output`).
    pub(crate) caller_audio: AudioFormat,
    /// What the phone plays: the agent's audio (the protocols' `phone_input`).
    pub(crate) agent_audio: AudioFormat,
}

impl LineFormats {
    /// The formats a call's start message says (CallBridge), or the protocol fixes (Twilio:
    /// mu-law at 8 kHz), or the configuration gives (inbound: `inbound`, both ways).
    pub(crate) fn of(start: &Start, inbound: AudioFormat) -> Self {
        match start {
            Start::CallBridge(s) => Self {
                caller_audio: s.audio_format.phone_output,
                agent_audio: s.audio_format.phone_input,
            },
            Start::Inbound(_) => Self {
                caller_audio: inbound,
                agent_audio: inbound,
            },
            Start::Twilio(_) => Self {
                caller_audio: AudioFormat::Ulaw8000,
                agent_audio: AudioFormat::Ulaw8000,
            },
        }
    }
}

/// The most operator audio one call queues (ms): more is refused until it has played.
pub(crate) const MAX_OPERATOR_MS: u64 = 10 * 60 * 1000;

/// Something the caller's audio revealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MediaEvent {
    /// Speech started or stopped.
    Speech(VadEvent),
    /// An in-band DTMF key.
    InbandDtmf(Digit),
}

/// The audio side of one call.
pub(crate) struct Media {
    started: Instant,
    /// The line's formats: caller audio as the phone sends it, agent audio as it plays it.
    line: LineFormats,
    // The optional parts are boxed: most calls use none of them, and inline they would
    // make every call's state a kilobyte larger.
    /// Caller audio from the line's format to the agent's.
    caller_to_agent: Option<Box<Converter>>,
    /// Agent audio from the agent's format to the line's.
    agent_to_line: Option<Box<Converter>>,
    playout: Playout,
    /// Operator audio (in the line's agent audio format) waiting for room in the playout.
    operator: VecDeque<Bytes>,
    vad: Option<Box<Vad>>,
    dtmf: Option<Box<dtmf::Detector>>,
    recorder: Option<Box<Recorder>>,
    /// Agent audio to the recording's rate, when the two directions differ.
    agent_to_record: Option<Box<Resampler>>,
    samples: Vec<i16>,
    scratch: Vec<i16>,
    digits: Vec<Digit>,
    /// Path of the recording, if the call is recorded.
    recording: Option<PathBuf>,
    /// The finished recording, until the call task waits for it to be on disk.
    finished: Option<Finished>,
    /// Underruns already reported to the metrics.
    underruns_reported: u64,
    /// Stalls and stall-dropped ms already reported to the metrics.
    stalls_reported: (u64, u64),
}

impl std::fmt::Debug for Media {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Media")
            .field("line", &self.line)
            .finish_non_exhaustive()
    }
}

/// The file a call's recording is written to.
pub(crate) fn recording_path(dir: &std::path::Path, call_id: &str) -> PathBuf {
    dir.join(format!("{call_id}.wav"))
}

impl Media {
    /// The audio side of a call whose line carries caller and agent audio in `line`'s
    /// formats, for an agent working in `agent_format` (`None`: the line's formats,
    /// untouched).
    pub(crate) fn new(
        config: &MediaConfig,
        call_id: &str,
        line: LineFormats,
        agent_format: Option<AudioFormat>,
        now: Instant,
    ) -> Result<Self, callgate_audio::Error> {
        let converter = |from: AudioFormat, to: AudioFormat| -> Result<_, callgate_audio::Error> {
            Ok(if from == to {
                None
            } else {
                Some(Box::new(Converter::new(from, to)?))
            })
        };
        let (caller_to_agent, agent_to_line) = match agent_format {
            Some(agent) => (
                converter(line.caller_audio, agent)?,
                converter(agent, line.agent_audio)?,
            ),
            None => (None, None),
        };
        let rate = line.caller_audio.sample_rate();
        let (recording, recorder) = match &config.recording {
            Some((dir, writer)) => {
                let path = recording_path(dir, call_id);
                // Never blocks: the file is created on the writer thread.
                match writer.create(&path, rate) {
                    Ok(r) => (Some(path), Some(Box::new(r))),
                    Err(error) => {
                        tracing::warn!(%error, "Cannot record this call; it goes on unrecorded.");
                        (None, None)
                    }
                }
            }
            None => (None, None),
        };
        let agent_to_record = if recorder.is_some() && line.agent_audio.sample_rate() != rate {
            Some(Box::new(Resampler::new(
                line.agent_audio.sample_rate(),
                rate,
            )?))
        } else {
            None
        };
        Ok(Self {
            started: now,
            line,
            caller_to_agent,
            agent_to_line,
            playout: Playout::new(line.agent_audio, config.lead, config.underrun),
            operator: VecDeque::new(),
            vad: match config.vad {
                Some(c) => Some(Box::new(Vad::new(rate, c)?)),
                None => None,
            },
            dtmf: config
                .inband_dtmf
                .then(|| Box::new(dtmf::Detector::new(rate))),
            recorder,
            agent_to_record,
            samples: Vec::new(),
            scratch: Vec::new(),
            digits: Vec::new(),
            recording,
            finished: None,
            underruns_reported: 0,
            stalls_reported: (0, 0),
        })
    }

    /// Whether this call is recorded.
    pub(crate) fn is_recorded(&self) -> bool {
        self.recording.is_some()
    }

    /// Whether the agent may send more audio now (its backpressure): the playout has room and
    /// no operator announcement is waiting to play.
    pub(crate) fn has_room(&self) -> bool {
        self.playout.has_room() && self.operator.is_empty()
    }

    /// Whether audio is queued for the caller.
    pub(crate) fn is_playing(&self) -> bool {
        self.playout.is_playing() || !self.operator.is_empty()
    }

    /// Audio sent to the caller since the call started, ms.
    pub(crate) fn played_ms(&self) -> u64 {
        self.playout.played_ms()
    }

    /// Audio of the current utterance sent to the caller, ms (since the last clear or gap).
    pub(crate) fn utterance_played_ms(&self) -> u64 {
        self.playout.utterance_played_ms()
    }

    /// Underruns since the last call of this (for the metrics).
    pub(crate) fn take_underruns(&mut self) -> u64 {
        let total = self.playout.underruns();
        let new = total - self.underruns_reported;
        self.underruns_reported = total;
        new
    }

    /// Stalls and the audio they dropped (ms) since the last call of this (for the metrics).
    pub(crate) fn take_stalls(&mut self) -> (u64, u64) {
        let now = (self.playout.stalls(), self.playout.stall_dropped_ms());
        let new = (
            now.0 - self.stalls_reported.0,
            now.1 - self.stalls_reported.1,
        );
        self.stalls_reported = now;
        new
    }

    /// Audio queued for the caller, ms.
    pub(crate) fn queued_ms(&self) -> u64 {
        self.playout.queued_ms()
            + self
                .operator
                .iter()
                .map(|b| self.ms_of(b.len()))
                .sum::<u64>()
    }

    /// Caller audio as received: recorded and analysed; returns what the agent gets (in its
    /// format) and appends what the audio revealed to `events`.
    pub(crate) fn caller_audio(&mut self, data: &Bytes, events: &mut Vec<MediaEvent>) -> Bytes {
        let analyse = self.vad.is_some() || self.dtmf.is_some() || self.recorder.is_some();
        if analyse {
            self.samples.clear();
            pcm::decode(self.line.caller_audio, data, &mut self.samples);
            if let Some(r) = &mut self.recorder
                && let Err(error) = r.caller(&self.samples)
            {
                tracing::warn!(%error, "Recording failed; the call goes on unrecorded.");
                self.recorder = None;
            }
            if let Some(vad) = &mut self.vad
                && let Some(event) = vad.process(&self.samples)
            {
                events.push(MediaEvent::Speech(event));
            }
            if let Some(d) = &mut self.dtmf {
                self.digits.clear();
                d.process(&self.samples, &mut self.digits);
                events.extend(self.digits.iter().map(|&k| MediaEvent::InbandDtmf(k)));
            }
        }
        match &mut self.caller_to_agent {
            Some(c) => c.convert(data),
            None => data.clone(),
        }
    }

    /// Agent audio (in the agent's format) for the caller.
    pub(crate) fn agent_audio(&mut self, now: Instant, data: Bytes) {
        let data = match &mut self.agent_to_line {
            Some(c) => c.convert(&data),
            None => data,
        };
        self.playout.push(now, data);
    }

    /// An in-band DTMF tone for the caller.
    pub(crate) fn agent_tone(&mut self, now: Instant, digit: Digit, duration: DtmfDuration) {
        let rate = self.line.agent_audio.sample_rate();
        let tone = dtmf::tone(digit, u32::from(duration.as_millis()), rate, 0.25);
        self.playout
            .push(now, pcm::encode(self.line.agent_audio, &tone));
    }

    /// A mark after the audio queued so far.
    pub(crate) fn mark(&mut self, id: u64) {
        self.playout.mark(id);
    }

    /// Drops everything the caller has not heard, operator audio included.
    pub(crate) fn clear(&mut self) -> Cleared {
        let waiting: u64 = self.operator.iter().map(|b| self.ms_of(b.len())).sum();
        self.operator.clear();
        let mut cleared = self.playout.clear();
        cleared.dropped_ms += waiting;
        cleared
    }

    /// Queues an operator announcement (already in the line's agent audio format); returns
    /// its duration, ms, or `None` if the operator queue would then hold more than
    /// [`MAX_OPERATOR_MS`].
    pub(crate) fn operator_play(&mut self, audio: Bytes) -> Option<u64> {
        let ms = self.ms_of(audio.len());
        let waiting: u64 = self.operator.iter().map(|b| self.ms_of(b.len())).sum();
        if waiting + ms > MAX_OPERATOR_MS {
            return None;
        }
        // Fed to the playout as it has room, one second at a time.
        let step = self.line.agent_audio.frame_bytes_20ms() * 50;
        let mut rest = audio;
        while !rest.is_empty() {
            let n = step.min(rest.len());
            self.operator.push_back(rest.split_to(n));
        }
        Some(ms)
    }

    /// The next time [`Media::poll`] has something.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.playout.poll_timeout()
    }

    /// What is due at `now`: frames to send, marks, underruns.
    pub(crate) fn poll(&mut self, now: Instant) -> Option<PlayoutEvent> {
        while self.playout.has_room()
            && let Some(chunk) = self.operator.pop_front()
        {
            self.playout.push(now, chunk);
        }
        let event = self.playout.poll(now)?;
        if let PlayoutEvent::Frame { data, late, .. } = &event
            && self.recorder.is_some()
        {
            let deadline = now.checked_sub(*late).unwrap_or(now);
            self.record_agent(deadline, data);
        }
        Some(event)
    }

    fn record_agent(&mut self, at: Instant, data: &Bytes) {
        self.samples.clear();
        pcm::decode(self.line.agent_audio, data, &mut self.samples);
        let samples = match &mut self.agent_to_record {
            Some(r) => {
                self.scratch.clear();
                r.process(&self.samples, &mut self.scratch);
                &self.scratch
            }
            None => &self.samples,
        };
        let rate = f64::from(self.line.caller_audio.sample_rate());
        let index = (at.saturating_duration_since(self.started).as_secs_f64() * rate) as u64;
        if let Some(r) = &mut self.recorder
            && let Err(error) = r.agent(index, samples)
        {
            tracing::warn!(%error, "Recording failed; the call goes on unrecorded.");
            self.recorder = None;
        }
    }

    /// Makes the recording valid on disk as it stands (periodic, so a crash loses little).
    pub(crate) fn sync(&mut self) {
        if let Some(r) = &mut self.recorder
            && let Err(error) = r.sync()
        {
            tracing::warn!(%error, "Recording sync failed.");
        }
    }

    /// Closes the recording (the writer thread completes the file; see
    /// [`Media::take_finished`]).
    pub(crate) fn finish(&mut self) {
        if let Some(r) = self.recorder.take() {
            self.finished = Some(r.finish());
        }
    }

    /// Resolves once the finished recording is complete on disk.
    pub(crate) fn take_finished(&mut self) -> Option<Finished> {
        self.finished.take()
    }

    /// Recording batches dropped since the last call of this (the writer was behind).
    pub(crate) fn take_recording_dropped(&mut self) -> u64 {
        self.recorder.as_mut().map_or(0, |r| r.take_dropped())
    }

    fn ms_of(&self, bytes: usize) -> u64 {
        (bytes / (self.line.agent_audio.frame_bytes_20ms() / 20)) as u64
    }
}
