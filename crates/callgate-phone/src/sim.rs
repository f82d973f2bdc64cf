//! `callgate sim`: one call, placed the way a person would, with a timeline and a summary.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use callgate_audio::{AudioFormat, Resampler, pcm, wav};
use callgate_proto::{Digit, Frame, PhoneEvent, Protocol, callbridge, inbound, twilio};
use futures_util::StreamExt;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::{Instant, sleep_until};

use crate::Error;
use crate::conn::{self, Phone, Ws};

/// What the caller plays.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A WAV file (any rate, channels, 8/16/24/32-bit PCM or float), converted to the call's
    /// format.
    Wav(PathBuf),
    /// A sine tone.
    Tone {
        /// Frequency in Hz.
        hz: f64,
        /// How long.
        duration: Duration,
    },
    /// Nothing: the caller stays silent.
    Nothing,
}

/// How the simulated call is placed.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The server's URL (`ws://host:port/path`, or `wss://`).
    pub url: String,
    /// `wss://`: trust only the CA certificates of this PEM file (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// The protocol to speak.
    pub protocol: Protocol,
    /// Calling number.
    pub caller: String,
    /// Called number.
    pub callee: String,
    /// CallBridge cdrId or inbound sessionId.
    pub call_id: String,
    /// CallBridge siteId.
    pub site_id: String,
    /// CallBridge agentId.
    pub agent_id: String,
    /// CallBridge agentType.
    pub agent_type: String,
    /// CallBridge ivrIp.
    pub ivr_ip: String,
    /// CallBridge callActionId.
    pub call_action_id: String,
    /// Twilio `customParameters` besides `from` and `to` (the numbers).
    pub custom: Vec<(String, String)>,
    /// Format of what the phone sends (CallBridge `phone_output_audio_format`).
    pub send_format: AudioFormat,
    /// Format of what the phone receives (CallBridge `phone_input_audio_format`).
    pub receive_format: AudioFormat,
    /// What the caller plays.
    pub source: Source,
    /// Keys to press, at times after the answer.
    pub dtmf: Vec<(Digit, Duration)>,
    /// Hang up this long after the answer.
    pub hangup_at: Option<Duration>,
    /// Never hang up; wait for the server to.
    pub wait_for_server: bool,
    /// Record what the server sends into this WAV file.
    pub record: Option<PathBuf>,
    /// Send the audio as fast as possible, not in real time.
    pub burst: bool,
    /// Drop the TCP connection abruptly this long after connecting.
    pub drop_at: Option<Duration>,
    /// Send one binary message of 2 MiB after the answer.
    pub oversize: bool,
    /// Send text that is not JSON instead of the start message.
    pub garbage_first: bool,
    /// Never send the CDR (inbound).
    pub no_cdr: bool,
    /// How long to wait for the connection and for the answer.
    pub answer_timeout: Duration,
    /// The longest the whole call may last.
    pub max_duration: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            url: "ws://127.0.0.1:4143/".into(),
            ca_file: None,
            protocol: Protocol::Inbound,
            caller: "01012341234".into(),
            callee: "07012345678".into(),
            call_id: "sim-1".into(),
            site_id: "sim-site".into(),
            agent_id: "agent-main".into(),
            agent_type: "voice".into(),
            ivr_ip: "127.0.0.1:0".into(),
            call_action_id: "1.0E9".into(),
            custom: Vec::new(),
            send_format: AudioFormat::Pcm8000,
            receive_format: AudioFormat::Pcm8000,
            source: Source::Nothing,
            dtmf: Vec::new(),
            hangup_at: None,
            wait_for_server: false,
            record: None,
            burst: false,
            drop_at: None,
            oversize: false,
            garbage_first: false,
            no_cdr: false,
            answer_timeout: Duration::from_secs(10),
            max_duration: Duration::from_secs(600),
        }
    }
}

/// After the caller's audio ends, how long the call stays up before hanging up, so the echoes
/// of the last frames can arrive.
pub const TAIL: Duration = Duration::from_millis(300);

/// One line of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Timeline {
    /// The WebSocket is open.
    Connected {
        /// When, ms since the dial.
        at_ms: u64,
    },
    /// The server answered (`answer` / `started`).
    Answered {
        /// When.
        at_ms: u64,
    },
    /// We pressed a key.
    DtmfSent {
        /// When.
        at_ms: u64,
        /// The key.
        digit: String,
    },
    /// The server played a key.
    DtmfReceived {
        /// When.
        at_ms: u64,
        /// The key.
        digit: String,
        /// Its length.
        duration_ms: u16,
    },
    /// The first audio from the server.
    AudioStarted {
        /// When.
        at_ms: u64,
    },
    /// The server hung up.
    ServerHangup {
        /// When.
        at_ms: u64,
    },
    /// We hung up.
    CallerHangup {
        /// When.
        at_ms: u64,
    },
    /// We sent the CDR.
    CdrSent {
        /// When.
        at_ms: u64,
    },
    /// We misbehaved on purpose.
    Misbehaved {
        /// When.
        at_ms: u64,
        /// How.
        what: String,
    },
    /// A message the protocol does not define, or that breaks it.
    Unexpected {
        /// When.
        at_ms: u64,
        /// What arrived.
        text: String,
    },
    /// The connection ended.
    Closed {
        /// When.
        at_ms: u64,
        /// The close code (1006: no close frame).
        code: u16,
        /// The close reason.
        reason: String,
    },
}

/// Round-trip times of echoed frames.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rtt {
    /// Frames matched to what we sent.
    pub samples: u64,
    /// Fastest, ms.
    pub min_ms: f64,
    /// Mean, ms.
    pub avg_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
}

/// What the call did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The protocol spoken.
    pub protocol: String,
    /// Time from the dial to the answer.
    pub answered_after_ms: Option<u64>,
    /// Audio frames sent.
    pub frames_sent: u64,
    /// Audio bytes sent.
    pub bytes_sent: u64,
    /// Audio sent, ms.
    pub audio_sent_ms: u64,
    /// Audio frames received.
    pub frames_received: u64,
    /// Audio bytes received.
    pub bytes_received: u64,
    /// Audio received, ms.
    pub audio_received_ms: u64,
    /// Round trip of echoed frames, if the server echoes.
    pub rtt: Option<Rtt>,
    /// Longest silence between two received audio frames, ms.
    pub longest_gap_ms: u64,
    /// DTMF keys the server played.
    pub dtmf_received: String,
    /// Who ended the call: `caller`, `server`, `dropped` (our abrupt close), `timeout`.
    pub ended_by: String,
    /// Close code seen (1006 when the connection ended without one).
    pub close_code: u16,
    /// Close reason seen.
    pub close_reason: String,
    /// The call's duration, ms.
    pub duration_ms: u64,
    /// Where the recording was written.
    pub recording: Option<String>,
}

fn ms_between(a: Instant, b: Instant) -> u64 {
    b.saturating_duration_since(a).as_millis() as u64
}

/// Loads and converts the caller's audio into 20 ms frames of `format`.
pub fn prepare_audio(source: &Source, format: AudioFormat) -> Result<Vec<Bytes>, Error> {
    let rate = format.sample_rate();
    let samples = match source {
        Source::Nothing => return Ok(Vec::new()),
        Source::Tone { hz, duration } => {
            let n = (f64::from(rate) * duration.as_secs_f64()) as usize;
            (0..n)
                .map(|i| {
                    let t = i as f64 / f64::from(rate);
                    (0.3 * 32767.0 * (2.0 * std::f64::consts::PI * hz * t).sin()) as i16
                })
                .collect()
        }
        Source::Wav(path) => {
            let audio = wav::read_mono(path)?;
            let mut out = Vec::new();
            let mut r = Resampler::new(audio.rate, rate)?;
            r.process(&audio.samples, &mut out);
            r.flush(&mut out);
            out
        }
    };
    let per_frame = (rate / 50) as usize;
    Ok(samples
        .chunks(per_frame)
        .map(|c| pcm::encode(format, c))
        .collect())
}

/// The WAV file of what the caller heard, with the time axis kept: a gap in the received
/// audio is silence in the file. A message that comes less than its own length late is
/// jitter (scheduling, the network), not a gap: it follows the audio before it without a
/// sliver of silence, so the file drifts from arrival times by less than one message.
struct Recording {
    writer: hound::WavWriter<std::io::BufWriter<std::fs::File>>,
    format: AudioFormat,
    written: u64,
    scratch: Vec<i16>,
}

impl Recording {
    fn create(path: &PathBuf, format: AudioFormat) -> Result<Self, Error> {
        let writer = hound::WavWriter::create(path, wav::spec(format.sample_rate(), 1))
            .map_err(|e| Error::Recording(format!("{}: {e}", path.display())))?;
        Ok(Self {
            writer,
            format,
            written: 0,
            scratch: Vec::new(),
        })
    }

    fn add(&mut self, since_dial: Duration, data: &[u8]) -> Result<(), Error> {
        self.scratch.clear();
        pcm::decode(self.format, data, &mut self.scratch);
        let end = (since_dial.as_secs_f64() * f64::from(self.format.sample_rate())) as u64;
        let start = end.saturating_sub(self.scratch.len() as u64);
        let late = start.saturating_sub(self.written);
        let silence = if late < self.scratch.len() as u64 {
            0
        } else {
            late
        };
        let err = |e: hound::Error| Error::Recording(e.to_string());
        for _ in 0..silence {
            self.writer.write_sample(0i16).map_err(err)?;
        }
        for &s in &self.scratch {
            self.writer.write_sample(s).map_err(err)?;
        }
        self.written += silence + self.scratch.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<(), Error> {
        self.writer
            .finalize()
            .map_err(|e| Error::Recording(e.to_string()))
    }
}

/// Places one call. `on` sees every timeline event as it happens.
pub async fn run(opts: &SimOptions, mut on: impl FnMut(&Timeline)) -> Result<Summary, Error> {
    if !opts.dtmf.is_empty() && opts.protocol == Protocol::CallBridge {
        return Err(Error::Options(
            "CallBridge has no DTMF: use --protocol inbound to send keys".into(),
        ));
    }
    if opts.protocol == Protocol::Twilio
        && (opts.send_format != AudioFormat::Ulaw8000
            || opts.receive_format != AudioFormat::Ulaw8000)
    {
        return Err(Error::Options(
            "Twilio Media Streams carries ULAW_8000 only, both ways: use --format ULAW_8000".into(),
        ));
    }
    if !opts.custom.is_empty() && opts.protocol != Protocol::Twilio {
        return Err(Error::Options(
            "custom parameters are Twilio's: use --protocol twilio".into(),
        ));
    }
    let connector = conn::Connector::for_url(&opts.url, opts.ca_file.as_deref())?;
    let frames = prepare_audio(&opts.source, opts.send_format)?;
    let mut recording = match &opts.record {
        Some(path) => Some(Recording::create(path, opts.receive_format)?),
        None => None,
    };
    let dialled = Instant::now();
    let wall_start = OffsetDateTime::now_utc();
    let at = |i: Instant| ms_between(dialled, i);
    let mut ws = conn::connect(&opts.url, &connector, opts.answer_timeout).await?;
    on(&Timeline::Connected {
        at_ms: at(Instant::now()),
    });

    let mut phone = match opts.protocol {
        Protocol::CallBridge => Phone::CallBridge(callbridge::Phone::new(&callbridge::Start::new(
            callbridge::CallConfig {
                site_id: opts.site_id.clone(),
                caller: opts.caller.clone(),
                callee: opts.callee.clone(),
                cdr_id: opts.call_id.clone(),
                call_action_id: opts.call_action_id.clone(),
                ivr_ip: opts.ivr_ip.clone(),
                agent_id: opts.agent_id.clone(),
                agent_type: opts.agent_type.clone(),
            },
            callbridge::AudioFormats {
                phone_output: opts.send_format,
                phone_input: opts.receive_format,
            },
        ))),
        Protocol::Inbound => Phone::Inbound(inbound::Phone::new(&inbound::IncomingCall {
            caller_id: opts.caller.clone(),
            did_number: opts.callee.clone(),
            session_id: opts.call_id.clone(),
        })),
        Protocol::Twilio => Phone::Twilio(twilio::Phone::new(&conn::twilio_start(
            &opts.call_id,
            &opts.caller,
            &opts.callee,
            &opts.custom,
        ))),
    };
    if opts.garbage_first {
        conn::send(&mut ws, Frame::Text("this is not JSON {{{".into())).await?;
        on(&Timeline::Misbehaved {
            at_ms: at(Instant::now()),
            what: "sent text that is not JSON as the first message".into(),
        });
        // The start message is not sent: see what the server does with the garbage.
        while phone.poll_output().is_some() {}
    }

    let mut s = State {
        wall_start,
        answered: None,
        next_frame: 0,
        stream_start: None,
        hung_up: false,
        cdr_sent: false,
        ended_by: None,
        close: None,
        frames_sent: 0,
        bytes_sent: 0,
        frames_received: 0,
        bytes_received: 0,
        last_audio: None,
        longest_gap: Duration::ZERO,
        sent_at: HashMap::new(),
        rtts: Vec::new(),
        dtmf_received: String::new(),
        audio_started: false,
    };
    let mut dtmf = opts.dtmf.clone();
    dtmf.sort_by_key(|d| d.1);
    let mut dtmf = dtmf.into_iter().peekable();
    let deadline = dialled + opts.max_duration;
    let answer_deadline = dialled + opts.answer_timeout;
    let frame_ms = Duration::from_millis(20);
    let mut oversize_pending = opts.oversize;

    loop {
        let drained = conn::drain(&mut phone, &mut ws).await?;
        for event in drained.events {
            s.phone_event(event, opts, &mut phone, &mut recording, dialled, &mut on)?;
        }
        if drained.closed && s.close.is_none() && s.ended_by.is_none() {
            s.ended_by = Some("caller");
        }
        if s.close.is_some() {
            break;
        }
        // Whatever the phone queued in reaction (CDR after the server's hangup) goes out now.
        let drained = conn::drain(&mut phone, &mut ws).await?;
        for event in drained.events {
            s.phone_event(event, opts, &mut phone, &mut recording, dialled, &mut on)?;
        }
        if s.close.is_some() {
            break;
        }

        let now = Instant::now();
        let streaming = s.stream_start.is_some() && s.next_frame < frames.len() && !s.hung_up;
        let next_frame_at = s
            .stream_start
            .map(|t| t + frame_ms * s.next_frame as u32)
            .unwrap_or(deadline);
        let next_dtmf_at = match (s.answered, dtmf.peek()) {
            (Some(a), Some((_, t))) if !s.hung_up => a + *t,
            _ => deadline,
        };
        let hangup_at = match s.answered {
            Some(_) if s.hung_up || opts.wait_for_server => deadline,
            Some(a) => match opts.hangup_at {
                Some(t) => a + t,
                None if frames.is_empty() => deadline,
                None => {
                    let audio_end = s.stream_start.unwrap_or(a) + frame_ms * frames.len() as u32;
                    if opts.burst && s.next_frame >= frames.len() {
                        now + TAIL
                    } else {
                        audio_end + TAIL
                    }
                }
            },
            None => answer_deadline,
        };
        let drop_at = opts.drop_at.map_or(deadline, |d| dialled + d);

        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(m)) => {
                    if let Some((code, reason)) = conn::close_of(&m) {
                        s.close = Some((code, reason));
                        if s.ended_by.is_none() {
                            s.ended_by = Some(if s.hung_up { "caller" } else { "server" });
                        }
                    }
                    phone.handle(m);
                }
                Some(Err(_)) | None => {
                    phone.dropped();
                    s.close = Some((1006, String::new()));
                    s.ended_by.get_or_insert("server");
                }
            },
            _ = sleep_until(next_frame_at), if streaming => {
                if let Some(start) = s.stream_start {
                    if oversize_pending {
                        oversize_pending = false;
                        phone.send_audio(Bytes::from(vec![0u8; 2 << 20]));
                        on(&Timeline::Misbehaved { at_ms: at(now), what: "sent a 2 MiB message".into() });
                    }
                    let due = if opts.burst {
                        frames.len()
                    } else {
                        // Absolute deadlines: a late wake-up sends what is due, no drift.
                        (ms_between(start, Instant::now()) / 20 + 1) as usize
                    };
                    while s.next_frame < due.min(frames.len()) {
                        let f = frames[s.next_frame].clone();
                        s.sent_at.insert(hash(&f), Instant::now());
                        s.frames_sent += 1;
                        s.bytes_sent += f.len() as u64;
                        phone.send_audio(f);
                        s.next_frame += 1;
                    }
                }
            }
            _ = sleep_until(next_dtmf_at), if next_dtmf_at < deadline => {
                match (dtmf.next(), &mut phone) {
                    (Some((digit, _)), Phone::Inbound(p)) => {
                        p.send_dtmf(digit);
                        on(&Timeline::DtmfSent { at_ms: at(Instant::now()), digit: digit.to_string() });
                    }
                    (Some((digit, _)), Phone::Twilio(p)) => {
                        p.send_dtmf(digit);
                        on(&Timeline::DtmfSent { at_ms: at(Instant::now()), digit: digit.to_string() });
                    }
                    _ => {}
                }
            }
            _ = sleep_until(hangup_at), if hangup_at < deadline || s.answered.is_none() => {
                if s.answered.is_none() {
                    s.ended_by = Some("timeout");
                    conn::send_close(&mut ws, callgate_proto::Close::new(
                        callgate_proto::CloseCode::NORMAL, "no answer")).await;
                    s.close = Some((1000, "no answer".into()));
                    break;
                }
                s.hung_up = true;
                s.ended_by = Some("caller");
                phone.hangup();
                on(&Timeline::CallerHangup { at_ms: at(Instant::now()) });
                if let Phone::Inbound(p) = &mut phone
                    && !opts.no_cdr {
                        p.send_cdr(&cdr("caller", opts, wall_start, dialled, s.answered, Instant::now()));
                        s.cdr_sent = true;
                        on(&Timeline::CdrSent { at_ms: at(Instant::now()) });
                    }
            }
            _ = sleep_until(drop_at), if opts.drop_at.is_some() => {
                on(&Timeline::Misbehaved { at_ms: at(Instant::now()), what: "dropped the TCP connection".into() });
                drop(ws);
                s.ended_by = Some("dropped");
                s.close = Some((1006, String::new()));
                return s.finish(opts, recording, dialled, &mut on);
            }
            _ = sleep_until(deadline) => {
                s.ended_by = Some("timeout");
                s.close = Some((1006, "the call lasted longer than --max-duration".into()));
                break;
            }
        }
    }
    // Read what is left until the server closes (bounded).
    let _ = tokio::time::timeout(Duration::from_secs(2), drain_rest(&mut ws)).await;
    s.finish(opts, recording, dialled, &mut on)
}

async fn drain_rest(ws: &mut Ws) {
    while let Some(Ok(_)) = ws.next().await {}
}

fn hash(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// A CDR consistent with what happened on this call; `hangup_by` is `caller` when the sim hung
/// up, `callee` when the server did.
fn cdr(
    hangup_by: &str,
    opts: &SimOptions,
    wall_start: OffsetDateTime,
    dialled: Instant,
    answered: Option<Instant>,
    ended: Instant,
) -> inbound::Cdr {
    let stamp = |i: Instant| {
        (wall_start + time::Duration::milliseconds(ms_between(dialled, i) as i64))
            .format(&Rfc3339)
            .unwrap_or_default()
    };
    let duration = ended.saturating_duration_since(dialled).as_secs_f64();
    let billable = answered.map_or(0.0, |a| ended.saturating_duration_since(a).as_secs() as f64);
    inbound::Cdr {
        session_id: opts.call_id.clone(),
        destination: opts.callee.clone(),
        start_time: stamp(dialled),
        answer_time: answered.map(stamp),
        end_time: stamp(ended),
        duration: (duration * 1000.0).round() / 1000.0,
        billable_seconds: billable,
        disposition: if answered.is_some() {
            "ANSWERED"
        } else {
            "NO ANSWER"
        }
        .into(),
        hangup_by: hangup_by.into(),
        hangup_cause_code: "16".into(),
        hangup_cause_text: "Normal Clearing".into(),
    }
}

struct State {
    wall_start: OffsetDateTime,
    answered: Option<Instant>,
    next_frame: usize,
    stream_start: Option<Instant>,
    hung_up: bool,
    cdr_sent: bool,
    ended_by: Option<&'static str>,
    close: Option<(u16, String)>,
    frames_sent: u64,
    bytes_sent: u64,
    frames_received: u64,
    bytes_received: u64,
    last_audio: Option<Instant>,
    longest_gap: Duration,
    sent_at: HashMap<u64, Instant>,
    rtts: Vec<Duration>,
    dtmf_received: String,
    audio_started: bool,
}

impl State {
    fn phone_event(
        &mut self,
        event: PhoneEvent,
        opts: &SimOptions,
        phone: &mut Phone,
        recording: &mut Option<Recording>,
        dialled: Instant,
        on: &mut impl FnMut(&Timeline),
    ) -> Result<(), Error> {
        let now = Instant::now();
        let at_ms = ms_between(dialled, now);
        match event {
            PhoneEvent::Answered => {
                self.answered = Some(now);
                self.stream_start = Some(now);
                on(&Timeline::Answered { at_ms });
            }
            PhoneEvent::Audio(data) => {
                if !self.audio_started {
                    self.audio_started = true;
                    on(&Timeline::AudioStarted { at_ms });
                }
                if let Some(last) = self.last_audio {
                    self.longest_gap = self.longest_gap.max(now - last);
                }
                self.last_audio = Some(now);
                self.frames_received += 1;
                self.bytes_received += data.len() as u64;
                if let Some(sent) = self.sent_at.remove(&hash(&data)) {
                    self.rtts.push(now - sent);
                }
                if let Some(r) = recording {
                    r.add(now - dialled, &data)?;
                }
            }
            PhoneEvent::Dtmf { digit, duration } => {
                self.dtmf_received.push(digit.as_char());
                on(&Timeline::DtmfReceived {
                    at_ms,
                    digit: digit.to_string(),
                    duration_ms: duration.as_millis(),
                });
            }
            PhoneEvent::Hangup => {
                on(&Timeline::ServerHangup { at_ms });
                self.ended_by.get_or_insert("server");
                self.hung_up = true;
                if let Phone::Inbound(p) = phone
                    && !opts.no_cdr
                    && !self.cdr_sent
                {
                    p.send_cdr(&cdr(
                        "callee",
                        opts,
                        self.wall_start,
                        dialled,
                        self.answered,
                        now,
                    ));
                    self.cdr_sent = true;
                    on(&Timeline::CdrSent { at_ms });
                }
            }
            PhoneEvent::Unknown(text) => on(&Timeline::Unexpected { at_ms, text }),
            PhoneEvent::Violation(e) => on(&Timeline::Unexpected {
                at_ms,
                text: e.to_string(),
            }),
            PhoneEvent::Closed(_) => {}
        }
        Ok(())
    }

    fn finish(
        self,
        opts: &SimOptions,
        recording: Option<Recording>,
        dialled: Instant,
        on: &mut impl FnMut(&Timeline),
    ) -> Result<Summary, Error> {
        let (code, reason) = self.close.clone().unwrap_or((1006, String::new()));
        let now = Instant::now();
        on(&Timeline::Closed {
            at_ms: ms_between(dialled, now),
            code,
            reason: reason.clone(),
        });
        if let Some(r) = recording {
            r.finish()?;
        }
        let bytes_per_ms =
            |f: AudioFormat| u64::from(f.sample_rate() / 1000 * f.bytes_per_sample());
        let rtt = (!self.rtts.is_empty()).then(|| {
            let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
            Rtt {
                samples: self.rtts.len() as u64,
                min_ms: self.rtts.iter().map(ms).fold(f64::MAX, f64::min),
                avg_ms: self.rtts.iter().map(ms).sum::<f64>() / self.rtts.len() as f64,
                max_ms: self.rtts.iter().map(ms).fold(0.0, f64::max),
            }
        });
        Ok(Summary {
            protocol: opts.protocol.as_str().into(),
            answered_after_ms: self.answered.map(|a| ms_between(dialled, a)),
            frames_sent: self.frames_sent,
            bytes_sent: self.bytes_sent,
            audio_sent_ms: self.bytes_sent / bytes_per_ms(opts.send_format),
            frames_received: self.frames_received,
            bytes_received: self.bytes_received,
            audio_received_ms: self.bytes_received / bytes_per_ms(opts.receive_format),
            rtt,
            longest_gap_ms: self.longest_gap.as_millis() as u64,
            dtmf_received: self.dtmf_received,
            ended_by: self.ended_by.unwrap_or("server").into(),
            close_code: code,
            close_reason: reason,
            duration_ms: ms_between(dialled, now),
            recording: opts.record.as_ref().map(|p| p.display().to_string()),
        })
    }
}
