//! `callgate load`: many concurrent calls, each streaming real-time 20 ms frames stamped with a
//! sequence number and send time, so every echoed frame's round trip is measured exactly.
//!
//! The generator must never be the bottleneck it claims to measure: it reports its own CPU
//! use and the share of frames it sent more than [`LATE`] after their deadline, and flags a run
//! where it fell behind. It targets only the URL it is given, raises its own file-descriptor
//! limit, and stops by itself: every call ends within ramp + duration + [`GRACE`].
//!
//! Steady state ([`LoadOptions::steady_for`]): each of the `calls` slots re-dials as soon as
//! its call ends, until the total time is up, so `calls` calls stay live the whole time (a
//! rolling restart is run under it). Every call is then either ok (the caller's own hangup
//! ended it), refused (never answered: an HTTP refusal such as a draining node's 503, no
//! connection, a close before the answer, no answer in time) or dropped (answered, then ended
//! by anything but the caller's hangup); frames lost count across all of them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use callgate_audio::AudioFormat;
use callgate_proto::{PhoneEvent, Protocol, callbridge, inbound};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{self, Phone, Ws};
use crate::stamp::{self, Checked};
use crate::{Error, procfs};

/// A frame sent more than this after its deadline counts as late.
pub const LATE: Duration = Duration::from_millis(5);
/// Extra time after ramp + duration before unfinished calls are abandoned.
pub const GRACE: Duration = Duration::from_secs(20);
/// How long a call waits for the echoes of its last frames.
pub const DRAIN: Duration = Duration::from_secs(2);
/// Steady state: how long a slot whose call was refused waits before dialling again.
pub const REDIAL_PAUSE: Duration = Duration::from_millis(200);

/// What each call measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stream stamped frames and measure their echo (the server runs `--agent echo`).
    Echo,
    /// Stay silent and measure how evenly the server's audio arrives (the server plays, e.g.
    /// `--agent tone`): each frame's arrival against an ideal 20 ms grid.
    Playout,
}

/// Which protocol the calls speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// All CallBridge.
    CallBridge,
    /// All inbound.
    Inbound,
    /// Alternating.
    Mixed,
    /// All Twilio Media Streams (μ-law only).
    Twilio,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The server's URL (`ws://` or `wss://`).
    pub url: String,
    /// `wss://`: trust only the CA certificates of this PEM file (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// Concurrent calls.
    pub calls: usize,
    /// Calls started per second (0: all at once).
    pub ramp: f64,
    /// Audio streamed per call.
    pub duration: Duration,
    /// Protocols.
    pub mix: Mix,
    /// Audio format (frames are 20 ms of it).
    pub format: AudioFormat,
    /// The server's pid, to report its CPU and memory (same machine only).
    pub server_pid: Option<u32>,
    /// Time allowed to connect and be answered.
    pub answer_timeout: Duration,
    /// What each call measures.
    pub mode: Mode,
    /// Steady state: keep `calls` calls live for this long, re-dialling each one as it ends
    /// (each lasts `duration`). `None`: one call per slot.
    pub steady_for: Option<Duration>,
    /// Calls are named `{id_prefix}-{n}` (their `cdrId` or `sessionId`), so the records of
    /// two runs can be told apart.
    pub id_prefix: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            url: "ws://127.0.0.1:4143/".into(),
            ca_file: None,
            calls: 100,
            ramp: 200.0,
            duration: Duration::from_secs(10),
            mix: Mix::Inbound,
            format: AudioFormat::Pcm8000,
            server_pid: None,
            answer_timeout: Duration::from_secs(10),
            mode: Mode::Echo,
            steady_for: None,
            id_prefix: "load".into(),
        }
    }
}

/// A live view, once per second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Progress {
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// Calls streaming now.
    pub calls_up: u64,
    /// Calls finished.
    pub calls_done: u64,
    /// Calls failed.
    pub calls_failed: u64,
    /// Echoed frames per second over the last second.
    pub frames_per_s: f64,
    /// p99 round trip over the last second, ms (from a 0.1 ms-bucket histogram: live view only;
    /// the report is exact).
    pub p99_ms: f64,
}

/// Percentiles of a distribution, ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub samples: u64,
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// From samples in microseconds (sorted here).
    pub fn of_micros(mut v: Vec<u32>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            f64::from(v[i]) / 1000.0
        };
        Self {
            samples: v.len() as u64,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }
}

/// Frame accounting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Frames {
    /// Sent.
    pub sent: u64,
    /// Echoed back intact.
    pub received: u64,
    /// Never came back.
    pub lost: u64,
    /// Came back changed (or not a stamped frame).
    pub corrupt: u64,
    /// Came back after a later frame of the same call.
    pub reordered: u64,
}

impl Frames {
    /// Frames sent that have not come back (intact or not).
    fn unanswered(&self) -> u64 {
        self.sent.saturating_sub(self.received + self.corrupt)
    }
}

/// The generator's own health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Sender {
    /// Frames sent more than [`LATE`] after their deadline.
    pub late_frames: u64,
    /// Their share of all frames.
    pub late_share: f64,
    /// The latest any frame went out after its deadline, ms.
    pub max_lateness_ms: f64,
    /// CPU seconds this process used.
    pub cpu_s: f64,
    /// CPU used, as a share of one core over the run.
    pub cpu_share: f64,
    /// True when the generator fell behind (over 1% late frames, or a saturated core):
    /// the run measured the generator, not the server.
    pub fell_behind: bool,
}

/// The server process, when its pid was given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Server {
    /// The pid.
    pub pid: u32,
    /// CPU seconds used during the run.
    pub cpu_s: f64,
    /// CPU microseconds per echoed frame.
    pub cpu_us_per_frame: f64,
    /// CPU used, as a share of one core.
    pub cpu_share: f64,
    /// RSS before the first call.
    pub rss_baseline_bytes: u64,
    /// Highest RSS seen.
    pub rss_peak_bytes: u64,
    /// (peak − baseline) / most concurrent calls.
    pub rss_per_call_bytes: u64,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Calls placed (one per slot; in steady state, every re-dial too).
    pub calls: u64,
    /// Calls that streamed all their audio and ended normally.
    pub calls_ok: u64,
    /// Failed calls by reason.
    pub calls_failed: BTreeMap<String, u64>,
    /// Failed calls that were never answered (refused, no connection, no answer).
    pub calls_refused: u64,
    /// Failed calls that were answered, then ended by anything but the caller's own hangup.
    pub calls_dropped: u64,
    /// Steady state: how long the slots kept re-dialling, s.
    pub steady_for_s: Option<f64>,
    /// Most calls streaming at once.
    pub max_concurrent: u64,
    /// Dial to WebSocket open, ms.
    pub connect_ms: Percentiles,
    /// Dial to answer, ms.
    pub answer_ms: Percentiles,
    /// Round trip of every echoed frame, ms (echo mode).
    pub rtt_ms: Percentiles,
    /// Playout mode: how late each received frame arrived against an ideal 20 ms grid anchored
    /// at the call's first frame (frames ahead of their slot count as on time), ms.
    pub playout_jitter_ms: Option<Percentiles>,
    /// Playout mode: the longest silence between two received frames, ms.
    pub longest_gap_ms: Option<f64>,
    /// Frame accounting.
    pub frames: Frames,
    /// The generator's own health.
    pub sender: Sender,
    /// The server's CPU and memory, if its pid was given.
    pub server: Option<Server>,
    /// Wall-clock seconds of the run.
    pub wall_s: f64,
}

/// Live counters shared by the calls.
#[derive(Default)]
struct Live {
    up: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    echoed: AtomicU64,
    /// 0.1 ms buckets up to 100 ms, then overflow.
    buckets: Vec<AtomicU64>,
}

const BUCKETS: usize = 1001;

impl Live {
    fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            ..Self::default()
        }
    }

    fn record(&self, rtt_us: u32) {
        let i = ((rtt_us / 100) as usize).min(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.echoed.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the last interval's p99 (ms) and resets the histogram.
    fn take_p99(&self) -> f64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let target = (total as f64 * 0.99).ceil() as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return (i + 1) as f64 / 10.0;
            }
        }
        100.0
    }
}

/// Why a generated call failed. Its text is the stable code the report counts it under
/// (`calls_failed`: `no_answer`, `closed_1008_mid_call`...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Failure {
    /// The upgrade was refused with this HTTP status.
    #[error("refused_{0}")]
    Refused(u16),
    /// The connection or the upgrade failed otherwise.
    #[error("connect_failed")]
    ConnectFailed,
    /// A message could not be sent.
    #[error("send_failed")]
    SendFailed,
    /// No answer within the answer timeout.
    #[error("no_answer")]
    NoAnswer,
    /// The server closed with this code before answering.
    #[error("closed_{0}_before_answer")]
    ClosedBeforeAnswer(u16),
    /// The connection dropped before the answer.
    #[error("dropped_before_answer")]
    DroppedBeforeAnswer,
    /// The server closed with this code during the call.
    #[error("closed_{0}_mid_call")]
    ClosedMidCall(u16),
    /// The server hung up during the call.
    #[error("server_hung_up")]
    ServerHungUp,
    /// The connection dropped during the call.
    #[error("dropped_mid_call")]
    DroppedMidCall,
    /// A playout call heard no audio at all.
    #[error("no_audio")]
    NoAudio,
    /// The task generating the call failed (panicked).
    #[error("generator_task_failed")]
    GeneratorTaskFailed,
    /// The call was still running at the run's hard stop.
    #[error("generator_deadline")]
    GeneratorDeadline,
}

/// What one call measured.
#[derive(Default)]
struct CallResult {
    failure: Option<Failure>,
    connect_us: Option<u32>,
    answer_us: Option<u32>,
    rtts: Vec<u32>,
    jitter: Vec<u32>,
    longest_gap: Duration,
    frames: Frames,
    late: u64,
    max_late: Duration,
}

/// Runs the load. `progress` is called about once per second.
pub async fn run(opts: &LoadOptions, mut progress: impl FnMut(&Progress)) -> Result<Report, Error> {
    if opts.calls == 0 {
        return Err(Error::Options("--calls must be at least 1".into()));
    }
    if opts.mix == Mix::Twilio && opts.format != AudioFormat::Ulaw8000 {
        return Err(Error::Options(
            "Twilio Media Streams carries ULAW_8000 only: use --format ULAW_8000".into(),
        ));
    }
    let connector = conn::Connector::for_url(&opts.url, opts.ca_file.as_deref())?;
    // Every call needs a socket; ask the kernel for enough (best effort: the report shows
    // connection failures if it was not enough).
    let _ = rlimit::increase_nofile_limit(opts.calls as u64 * 2 + 256);
    let live = Arc::new(Live::new());
    let own_cpu_start = procfs::cpu_time(procfs::own_pid()).unwrap_or_default();
    let server_start = opts.server_pid.map(|pid| {
        (
            pid,
            procfs::cpu_time(pid).unwrap_or_default(),
            procfs::rss_bytes(pid).unwrap_or(0),
        )
    });
    let mut rss_peak = server_start.map_or(0, |s| s.2);
    let t_run = Instant::now();
    let ramp_time = if opts.ramp > 0.0 {
        Duration::from_secs_f64(opts.calls as f64 / opts.ramp)
    } else {
        Duration::ZERO
    };
    let steady = opts.steady_for.unwrap_or(Duration::ZERO);
    // No call starts after `redial_until`; the last ones run their whole duration.
    let redial_until = t_run + ramp_time + steady;
    let hard_stop =
        t_run + ramp_time + steady + opts.duration + opts.answer_timeout + DRAIN + GRACE;

    let mut set = JoinSet::new();
    let slots = opts.calls;
    for i in 0..slots {
        let start = if opts.ramp > 0.0 {
            t_run + Duration::from_secs_f64(i as f64 / opts.ramp)
        } else {
            t_run
        };
        let protocol = match opts.mix {
            Mix::CallBridge => Protocol::CallBridge,
            Mix::Inbound => Protocol::Inbound,
            Mix::Mixed if i % 2 == 0 => Protocol::Inbound,
            Mix::Mixed => Protocol::CallBridge,
            Mix::Twilio => Protocol::Twilio,
        };
        let (opts, live, connector) = (opts.clone(), live.clone(), connector.clone());
        set.spawn(async move {
            sleep_until(start).await;
            let mut results = Vec::new();
            // Each call of the run has its own number (stamped in its frames).
            let mut idx = i as u32;
            loop {
                let result = one_call(idx, protocol, &opts, &connector, &live, t_run).await;
                let refused = result.failure.is_some() && result.answer_us.is_none();
                results.push(result);
                if opts.steady_for.is_none() || Instant::now() >= redial_until {
                    break;
                }
                idx = idx.wrapping_add(slots as u32);
                // A refused call is dialled again after a pause, so a node (or a balancer)
                // that refuses everything is not hammered; a call that ended is replaced at
                // once.
                if refused {
                    tokio::time::sleep(REDIAL_PAUSE).await;
                }
            }
            results
        });
    }

    let mut results = Vec::with_capacity(opts.calls);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last_echoed = 0;
    let mut max_concurrent = 0;
    loop {
        tokio::select! {
            joined = set.join_next() => match joined {
                Some(Ok(r)) => results.extend(r),
                Some(Err(_)) => results.push(CallResult {
                    failure: Some(Failure::GeneratorTaskFailed),
                    ..CallResult::default()
                }),
                None => break,
            },
            _ = tick.tick() => {
                let echoed = live.echoed.load(Ordering::Relaxed);
                let up = live.up.load(Ordering::Relaxed);
                max_concurrent = max_concurrent.max(up);
                if let Some((pid, _, _)) = server_start {
                    rss_peak = rss_peak.max(procfs::rss_bytes(pid).unwrap_or(0));
                }
                progress(&Progress {
                    elapsed_s: t_run.elapsed().as_secs_f64(),
                    calls_up: up,
                    calls_done: live.done.load(Ordering::Relaxed),
                    calls_failed: live.failed.load(Ordering::Relaxed),
                    frames_per_s: (echoed - last_echoed) as f64,
                    p99_ms: live.take_p99(),
                });
                last_echoed = echoed;
            }
            _ = sleep_until(hard_stop) => {
                let unfinished = set.len();
                set.abort_all();
                for _ in 0..unfinished {
                    results.push(CallResult {
                        failure: Some(Failure::GeneratorDeadline),
                        ..CallResult::default()
                    });
                }
                break;
            }
        }
    }
    let wall = t_run.elapsed();
    let own_cpu = procfs::cpu_time(procfs::own_pid())
        .unwrap_or_default()
        .saturating_sub(own_cpu_start);

    let mut report = Report {
        calls: results.len() as u64,
        calls_ok: 0,
        calls_failed: BTreeMap::new(),
        calls_refused: 0,
        calls_dropped: 0,
        steady_for_s: opts.steady_for.map(|d| d.as_secs_f64()),
        max_concurrent,
        connect_ms: Percentiles::default(),
        answer_ms: Percentiles::default(),
        rtt_ms: Percentiles::default(),
        playout_jitter_ms: None,
        longest_gap_ms: None,
        frames: Frames::default(),
        sender: Sender::default(),
        server: None,
        wall_s: wall.as_secs_f64(),
    };
    let (mut connect, mut answer, mut rtts) = (Vec::new(), Vec::new(), Vec::new());
    let (mut jitter, mut longest_gap) = (Vec::new(), Duration::ZERO);
    let mut max_late = Duration::ZERO;
    for r in results {
        match r.failure {
            None => report.calls_ok += 1,
            Some(reason) => {
                if r.answer_us.is_some() {
                    report.calls_dropped += 1;
                } else {
                    report.calls_refused += 1;
                }
                *report.calls_failed.entry(reason.to_string()).or_default() += 1;
            }
        }
        connect.extend(r.connect_us);
        answer.extend(r.answer_us);
        rtts.extend(r.rtts);
        jitter.extend(r.jitter);
        longest_gap = longest_gap.max(r.longest_gap);
        report.frames.sent += r.frames.sent;
        report.frames.received += r.frames.received;
        report.frames.lost += r.frames.lost;
        report.frames.corrupt += r.frames.corrupt;
        report.frames.reordered += r.frames.reordered;
        report.sender.late_frames += r.late;
        max_late = max_late.max(r.max_late);
    }
    report.connect_ms = Percentiles::of_micros(connect);
    report.answer_ms = Percentiles::of_micros(answer);
    report.rtt_ms = Percentiles::of_micros(rtts);
    if opts.mode == Mode::Playout {
        report.playout_jitter_ms = Some(Percentiles::of_micros(jitter));
        report.longest_gap_ms = Some(longest_gap.as_secs_f64() * 1000.0);
    }
    report.sender.late_share = if report.frames.sent > 0 {
        report.sender.late_frames as f64 / report.frames.sent as f64
    } else {
        0.0
    };
    report.sender.max_lateness_ms = max_late.as_secs_f64() * 1000.0;
    report.sender.cpu_s = own_cpu.as_secs_f64();
    report.sender.cpu_share = own_cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9);
    report.sender.fell_behind = report.sender.late_share > 0.01 || report.sender.cpu_share > 0.9;
    if let Some((pid, cpu0, rss0)) = server_start {
        let cpu = procfs::cpu_time(pid)
            .unwrap_or_default()
            .saturating_sub(cpu0);
        rss_peak = rss_peak.max(procfs::rss_bytes(pid).unwrap_or(0));
        report.server = Some(Server {
            pid,
            cpu_s: cpu.as_secs_f64(),
            cpu_us_per_frame: cpu.as_secs_f64() * 1e6 / report.frames.received.max(1) as f64,
            cpu_share: cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9),
            rss_baseline_bytes: rss0,
            rss_peak_bytes: rss_peak,
            rss_per_call_bytes: rss_peak.saturating_sub(rss0) / max_concurrent.max(1),
        });
    }
    Ok(report)
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

async fn one_call(
    idx: u32,
    protocol: Protocol,
    opts: &LoadOptions,
    connector: &conn::Connector,
    live: &Live,
    t_run: Instant,
) -> CallResult {
    let mut r = CallResult::default();
    let dial = Instant::now();
    let mut ws = match conn::connect(&opts.url, connector, opts.answer_timeout).await {
        Ok(ws) => ws,
        Err(error) => {
            live.failed.fetch_add(1, Ordering::Relaxed);
            r.failure = Some(match error {
                Error::Refused { status, .. } => Failure::Refused(status),
                _ => Failure::ConnectFailed,
            });
            return r;
        }
    };
    r.connect_us = Some(micros(dial.elapsed()));
    let id = format!("{}-{idx}", opts.id_prefix);
    let mut phone = match protocol {
        Protocol::CallBridge => Phone::CallBridge(callbridge::Phone::new(&callbridge::Start::new(
            callbridge::CallConfig {
                site_id: "load".into(),
                caller: format!("010{idx:08}"),
                callee: "07000000000".into(),
                cdr_id: id.clone(),
                call_action_id: format!("{idx}.0"),
                ivr_ip: "127.0.0.1:0".into(),
                agent_id: "load".into(),
                agent_type: "voice".into(),
            },
            callbridge::AudioFormats {
                phone_output: opts.format,
                phone_input: opts.format,
            },
        ))),
        Protocol::Inbound => Phone::Inbound(inbound::Phone::new(&inbound::IncomingCall {
            caller_id: format!("010{idx:08}"),
            did_number: "0200000000".into(),
            session_id: id.clone(),
        })),
        Protocol::Twilio => Phone::Twilio(callgate_proto::twilio::Phone::new(&conn::twilio_start(
            &id,
            &format!("010{idx:08}"),
            "0200000000",
            &[],
        ))),
    };
    let call = Ctx {
        idx,
        opts,
        live,
        t_run,
    };
    let outcome = stream(&mut r, &mut phone, &mut ws, &call, dial).await;
    if let Err(reason) = outcome {
        live.failed.fetch_add(1, Ordering::Relaxed);
        r.failure = Some(reason);
    } else {
        live.done.fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// What every step of one generated call needs to know.
struct Ctx<'a> {
    /// The call's number in the run.
    idx: u32,
    opts: &'a LoadOptions,
    live: &'a Live,
    /// When the run started (stamps are ns since then).
    t_run: Instant,
}

async fn stream(
    r: &mut CallResult,
    phone: &mut Phone,
    ws: &mut Ws,
    call: &Ctx<'_>,
    dial: Instant,
) -> Result<(), Failure> {
    let Ctx {
        idx, opts, live, ..
    } = *call;
    let send_err = |_| Failure::SendFailed;
    // Start, then wait for the answer.
    let started = conn::drain(phone, ws).await.map_err(send_err)?;
    let answer_deadline = dial + opts.answer_timeout;
    // Twilio has no answer: its stream is live once started.
    while !started.events.contains(&PhoneEvent::Answered) {
        let message = tokio::select! {
            m = ws.next() => m,
            _ = sleep_until(answer_deadline) => return Err(Failure::NoAnswer),
        };
        match message {
            Some(Ok(m)) => {
                if let Some((code, _)) = conn::close_of(&m) {
                    return Err(Failure::ClosedBeforeAnswer(code));
                }
                phone.handle(m);
            }
            _ => return Err(Failure::DroppedBeforeAnswer),
        }
        let drained = conn::drain(phone, ws).await.map_err(send_err)?;
        if drained.events.contains(&PhoneEvent::Answered) {
            break;
        }
    }
    r.answer_us = Some(micros(dial.elapsed()));
    live.up.fetch_add(1, Ordering::Relaxed);
    let result = match opts.mode {
        Mode::Echo => echo_loop(r, phone, ws, call).await,
        Mode::Playout => listen_loop(r, phone, ws, call).await,
    };
    live.up.fetch_sub(1, Ordering::Relaxed);
    result?;
    // Hang up like the caller would, then wait (bounded) for the server to close.
    phone.hangup();
    if let Phone::Inbound(p) = phone {
        p.send_cdr(&inbound::Cdr {
            session_id: format!("{}-{idx}", opts.id_prefix),
            destination: "0200000000".into(),
            start_time: "1970-01-01T00:00:00Z".into(),
            answer_time: Some("1970-01-01T00:00:00Z".into()),
            end_time: "1970-01-01T00:00:00Z".into(),
            duration: opts.duration.as_secs_f64(),
            billable_seconds: opts.duration.as_secs_f64().floor(),
            disposition: "ANSWERED".into(),
            hangup_by: "caller".into(),
            hangup_cause_code: "16".into(),
            hangup_cause_text: "Normal Clearing".into(),
        });
    }
    conn::drain(phone, ws).await.map_err(send_err)?;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    Ok(())
}

async fn echo_loop(
    r: &mut CallResult,
    phone: &mut Phone,
    ws: &mut Ws,
    call: &Ctx<'_>,
) -> Result<(), Failure> {
    let Ctx {
        idx,
        opts,
        live,
        t_run,
    } = *call;
    let frame_len = opts.format.frame_bytes_20ms();
    let total = (opts.duration.as_millis() / 20) as u32;
    let start = Instant::now();
    let mut seq = 0u32;
    let mut highest: Option<u32> = None;
    let mut drain_until = None;
    loop {
        if seq >= total && drain_until.is_none() {
            drain_until = Some(Instant::now() + DRAIN);
        }
        if r.frames.received + r.frames.corrupt >= u64::from(total) && seq >= total {
            break;
        }
        let deadline = start + Duration::from_millis(20) * seq;
        let stop = drain_until.unwrap_or(deadline + Duration::from_secs(3600));
        tokio::select! {
            biased;
            message = ws.next() => match message {
                Some(Ok(Message::Binary(b))) => receive(r, &b, idx, live, t_run, &mut highest),
                Some(Ok(m)) => {
                    if let Some((code, _)) = conn::close_of(&m) {
                        r.frames.lost = r.frames.unanswered();
                        return Err(Failure::ClosedMidCall(code));
                    }
                    phone.handle(m);
                    let drained = conn::drain(phone, ws).await.map_err(|_| Failure::SendFailed)?;
                    if drained.events.contains(&PhoneEvent::Hangup) {
                        return Err(Failure::ServerHungUp);
                    }
                    // Twilio's audio comes in text messages.
                    for event in drained.events {
                        if let PhoneEvent::Audio(b) = event {
                            receive(r, &b, idx, live, t_run, &mut highest);
                        }
                    }
                }
                Some(Err(_)) | None => {
                    r.frames.lost = r.frames.unanswered();
                    return Err(Failure::DroppedMidCall);
                }
            },
            _ = sleep_until(deadline), if seq < total => {
                let now = Instant::now();
                let late = now.saturating_duration_since(deadline);
                if late > LATE {
                    r.late += 1;
                }
                r.max_late = r.max_late.max(late);
                let sent_ns = now.duration_since(t_run).as_nanos() as u64;
                let frame = stamp::build(idx, seq, sent_ns, frame_len);
                phone.send_audio(Bytes::from(frame));
                conn::drain(phone, ws).await.map_err(|_| Failure::SendFailed)?;
                r.frames.sent += 1;
                seq += 1;
            }
            _ = sleep_until(stop), if drain_until.is_some() => break,
        }
    }
    r.frames.lost = r.frames.unanswered();
    Ok(())
}

/// Playout mode: receives the server's audio for the call's duration, recording each
/// frame's arrival against the ideal grid.
async fn listen_loop(
    r: &mut CallResult,
    phone: &mut Phone,
    ws: &mut Ws,
    call: &Ctx<'_>,
) -> Result<(), Failure> {
    let Ctx { opts, live, .. } = *call;
    let end = Instant::now() + opts.duration;
    let frame_bytes = opts.format.frame_bytes_20ms() as f64;
    // (arrival, audio position in ms) of every frame.
    let mut arrivals: Vec<(Instant, f64)> = Vec::new();
    let mut position_ms = 0.0;
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Binary(b))) => {
                    arrivals.push((Instant::now(), position_ms));
                    position_ms += b.len() as f64 / frame_bytes * 20.0;
                    r.frames.received += 1;
                    live.echoed.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(m)) => {
                    if let Some((code, _)) = conn::close_of(&m) {
                        return Err(Failure::ClosedMidCall(code));
                    }
                    phone.handle(m);
                    let drained = conn::drain(phone, ws).await.map_err(|_| Failure::SendFailed)?;
                    // Twilio's audio comes in text messages.
                    for event in drained.events {
                        if let PhoneEvent::Audio(b) = event {
                            arrivals.push((Instant::now(), position_ms));
                            position_ms += b.len() as f64 / frame_bytes * 20.0;
                            r.frames.received += 1;
                            live.echoed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Some(Err(_)) | None => return Err(Failure::DroppedMidCall),
            },
            _ = sleep_until(end) => break,
        }
    }
    let Some(&(first, _)) = arrivals.first() else {
        return Err(Failure::NoAudio);
    };
    // How late each frame arrived against the grid anchored at the call's first frame: the
    // caller plays frame k at first + 20k ms, so a frame that arrives before that is on time
    // (a server may send one frame ahead), one that arrives after it is late by the difference.
    r.jitter = arrivals
        .iter()
        .map(|(at, pos)| {
            let late_ms = at.duration_since(first).as_secs_f64() * 1000.0 - pos;
            (late_ms.max(0.0) * 1000.0).round() as u32
        })
        .collect();
    for pair in arrivals.windows(2) {
        r.longest_gap = r.longest_gap.max(pair[1].0 - pair[0].0);
    }
    for &us in &r.jitter {
        live.record(us);
    }
    Ok(())
}

fn receive(
    r: &mut CallResult,
    frame: &[u8],
    idx: u32,
    live: &Live,
    t_run: Instant,
    highest: &mut Option<u32>,
) {
    match stamp::check(frame) {
        Checked::Intact { call, seq, sent_ns } if call == idx => {
            let now_ns = t_run.elapsed().as_nanos() as u64;
            let rtt_us = u32::try_from(now_ns.saturating_sub(sent_ns) / 1000).unwrap_or(u32::MAX);
            r.rtts.push(rtt_us);
            live.record(rtt_us);
            r.frames.received += 1;
            match highest {
                Some(h) if seq < *h => r.frames.reordered += 1,
                _ => *highest = Some(seq),
            }
        }
        _ => r.frames.corrupt += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_keep_the_codes_the_report_counts_them_under() {
        for (failure, code) in [
            (Failure::Refused(503), "refused_503"),
            (Failure::ConnectFailed, "connect_failed"),
            (Failure::SendFailed, "send_failed"),
            (Failure::NoAnswer, "no_answer"),
            (
                Failure::ClosedBeforeAnswer(1013),
                "closed_1013_before_answer",
            ),
            (Failure::DroppedBeforeAnswer, "dropped_before_answer"),
            (Failure::ClosedMidCall(1008), "closed_1008_mid_call"),
            (Failure::ServerHungUp, "server_hung_up"),
            (Failure::DroppedMidCall, "dropped_mid_call"),
            (Failure::NoAudio, "no_audio"),
            (Failure::GeneratorTaskFailed, "generator_task_failed"),
            (Failure::GeneratorDeadline, "generator_deadline"),
        ] {
            assert_eq!(failure.to_string(), code);
        }
    }
}
