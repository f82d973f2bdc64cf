//! `callgate sim` and `callgate load`: command-line front ends of callgate-phone.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use callgate_phone::load::{self, LoadOptions, Mix};
use callgate_phone::sim::{self, SimOptions, Source, Timeline};
use callgate_proto::{AudioFormat, Digit, Protocol};

/// Parses `1.5s`, `250ms`, `2m` or a bare number of seconds.
pub(crate) fn parse_time(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| anyhow!("invalid time {text:?} (write e.g. 2s, 5.5s, 250ms)"))?;
    if !value.is_finite() || value < 0.0 {
        bail!("invalid time {text:?}: must be zero or more");
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// Parses `1@2s,#@5.5s`.
pub(crate) fn parse_dtmf(spec: &str) -> anyhow::Result<Vec<(Digit, Duration)>> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (digit, at) = item
                .trim()
                .split_once('@')
                .ok_or_else(|| anyhow!("invalid DTMF {item:?}: write KEY@TIME, e.g. 1@2s"))?;
            let digit = Digit::parse_sendable(digit)
                .or_else(|| Digit::parse(digit))
                .ok_or_else(|| anyhow!("invalid DTMF key {digit:?} (0-9 * # A-D)"))?;
            Ok((digit, parse_time(at)?))
        })
        .collect()
}

fn protocol(text: &str) -> anyhow::Result<Protocol> {
    match text {
        "callbridge" => Ok(Protocol::CallBridge),
        "inbound" => Ok(Protocol::Inbound),
        "twilio" => Ok(Protocol::Twilio),
        _ => bail!("invalid protocol {text:?}: callbridge, inbound or twilio"),
    }
}

fn format(text: &str) -> anyhow::Result<AudioFormat> {
    text.parse().map_err(|e| anyhow!("{e}"))
}

/// `callgate sim` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct SimArgs {
    /// The server's URL: ws://HOST:PORT/PATH, or wss:// when the server speaks TLS
    #[arg(long, default_value = "ws://127.0.0.1:4143/")]
    url: String,
    /// wss://: trust only the CA certificates in this PEM file [default: the system's]
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// The protocol to speak: callbridge, inbound or twilio (Twilio Media Streams)
    #[arg(long, default_value = "inbound")]
    protocol: String,
    /// Calling number
    #[arg(long, default_value = "01012341234")]
    caller: String,
    /// Called number
    #[arg(long, default_value = "07012345678")]
    callee: String,
    /// The call's ID (CallBridge cdrId, inbound sessionId) [default: sim-MILLIS, from the clock]
    #[arg(long)]
    id: Option<String>,
    /// CallBridge siteId
    #[arg(long, default_value = "sim-site")]
    site_id: String,
    /// CallBridge agentId
    #[arg(long, default_value = "agent-main")]
    agent_id: String,
    /// CallBridge agentType
    #[arg(long, default_value = "voice")]
    agent_type: String,
    /// CallBridge ivrIp
    #[arg(long, default_value = "127.0.0.1:0")]
    ivr_ip: String,
    /// CallBridge callActionId
    #[arg(long, default_value = "1.0E9")]
    call_action_id: String,
    /// A Twilio customParameter besides from/to (the numbers), NAME=VALUE (repeatable)
    #[arg(long, value_name = "NAME=VALUE")]
    custom: Vec<String>,
    /// Audio format both ways (inbound calls use the server's inbound_audio_format)
    /// [default: PCM_8000; ULAW_8000 for twilio, its only format]
    #[arg(long)]
    format: Option<String>,
    /// Format the phone sends (CallBridge phone_output_audio_format) [default: --format]
    #[arg(long)]
    send_format: Option<String>,
    /// Format the phone receives (CallBridge phone_input_audio_format) [default: --format]
    #[arg(long)]
    receive_format: Option<String>,
    /// Play this WAV file (any rate, channels, 8/16/24-bit PCM), converted to the call's format
    #[arg(long, value_name = "FILE", conflicts_with = "tone")]
    wav: Option<PathBuf>,
    /// Play a sine tone of this frequency (Hz)
    #[arg(long, value_name = "HZ")]
    tone: Option<f64>,
    /// How long the tone plays
    #[arg(long, default_value = "3s", value_name = "TIME")]
    tone_duration: String,
    /// Keys to press, after the answer: KEY@TIME,... e.g. "1@2s,#@5.5s" (inbound only)
    #[arg(long, value_name = "SPEC")]
    dtmf: Option<String>,
    /// Hang up this long after the answer [default: when the audio ends, plus 300 ms]
    #[arg(long, value_name = "TIME")]
    hangup_at: Option<String>,
    /// Never hang up: wait for the server to
    #[arg(long)]
    wait_hangup: bool,
    /// Record what the server sends to this WAV file (gaps kept as silence)
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// Misbehave: send the audio as fast as possible
    #[arg(long)]
    burst: bool,
    /// Misbehave: drop the TCP connection abruptly this long after connecting
    #[arg(long, value_name = "TIME")]
    drop_at: Option<String>,
    /// Misbehave: send one 2 MiB message after the answer
    #[arg(long)]
    oversize: bool,
    /// Misbehave: send text that is not JSON instead of the start message
    #[arg(long)]
    garbage_first: bool,
    /// Misbehave: never send the CDR (inbound)
    #[arg(long)]
    no_cdr: bool,
    /// Time allowed to connect and be answered
    #[arg(long, default_value = "10s", value_name = "TIME")]
    answer_timeout: String,
    /// The longest the call may last
    #[arg(long, default_value = "10m", value_name = "TIME")]
    max_duration: String,
    /// Print one JSON object (timeline and summary) instead of text
    #[arg(long)]
    json: bool,
}

pub(crate) fn sim(args: SimArgs) -> anyhow::Result<()> {
    let protocol = protocol(&args.protocol)?;
    let default_format = if protocol == Protocol::Twilio {
        "ULAW_8000"
    } else {
        "PCM_8000"
    };
    let base = format(args.format.as_deref().unwrap_or(default_format))?;
    let custom = args
        .custom
        .iter()
        .map(|c| {
            c.split_once('=')
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .ok_or_else(|| anyhow!("invalid --custom {c:?}: write NAME=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let opts = SimOptions {
        url: args.url,
        ca_file: args.ca_file,
        protocol,
        custom,
        caller: args.caller,
        callee: args.callee,
        call_id: args.id.unwrap_or_else(|| {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            format!("sim-{ms}")
        }),
        site_id: args.site_id,
        agent_id: args.agent_id,
        agent_type: args.agent_type,
        ivr_ip: args.ivr_ip,
        call_action_id: args.call_action_id,
        send_format: args.send_format.as_deref().map_or(Ok(base), format)?,
        receive_format: args.receive_format.as_deref().map_or(Ok(base), format)?,
        source: match (args.wav, args.tone) {
            (Some(path), _) => Source::Wav(path),
            (None, Some(hz)) => Source::Tone {
                hz,
                duration: parse_time(&args.tone_duration)?,
            },
            (None, None) => Source::Nothing,
        },
        dtmf: args.dtmf.as_deref().map_or(Ok(Vec::new()), parse_dtmf)?,
        hangup_at: args.hangup_at.as_deref().map(parse_time).transpose()?,
        wait_for_server: args.wait_hangup,
        record: args.record,
        burst: args.burst,
        drop_at: args.drop_at.as_deref().map(parse_time).transpose()?,
        oversize: args.oversize,
        garbage_first: args.garbage_first,
        no_cdr: args.no_cdr,
        answer_timeout: parse_time(&args.answer_timeout)?,
        max_duration: parse_time(&args.max_duration)?,
    };
    let json = args.json;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let mut timeline = Vec::new();
    let summary = runtime.block_on(sim::run(&opts, |event| {
        if json {
            timeline.push(event.clone());
        } else {
            println!("{}", describe(event));
        }
    }))?;
    if json {
        let out = serde_json::json!({ "timeline": timeline, "summary": summary });
        println!("{out}");
    } else {
        let s = &summary;
        println!();
        println!("protocol         {}", s.protocol);
        match s.answered_after_ms {
            Some(ms) => println!("answered after   {ms} ms"),
            None => println!("answered after   (never answered)"),
        }
        println!(
            "audio sent       {} ms ({} frames, {} bytes)",
            s.audio_sent_ms, s.frames_sent, s.bytes_sent
        );
        println!(
            "audio received   {} ms ({} frames, {} bytes)",
            s.audio_received_ms, s.frames_received, s.bytes_received
        );
        match &s.rtt {
            Some(r) => println!(
                "round trip       min {:.1} / avg {:.1} / max {:.1} ms over {} echoed frames",
                r.min_ms, r.avg_ms, r.max_ms, r.samples
            ),
            None => println!("round trip       (the server did not echo our audio)"),
        }
        println!("longest gap      {} ms", s.longest_gap_ms);
        if !s.dtmf_received.is_empty() {
            println!("DTMF received    {}", s.dtmf_received);
        }
        println!(
            "ended by         {} (close {} {:?})",
            s.ended_by, s.close_code, s.close_reason
        );
        println!("duration         {} ms", s.duration_ms);
        if let Some(r) = &s.recording {
            println!("recording        {r}");
        }
    }
    Ok(())
}

fn describe(event: &Timeline) -> String {
    let (at, text) = match event {
        Timeline::Connected { at_ms } => (at_ms, "connected".to_owned()),
        Timeline::Answered { at_ms } => (at_ms, "answered".to_owned()),
        Timeline::DtmfSent { at_ms, digit } => (at_ms, format!("DTMF {digit} sent")),
        Timeline::DtmfReceived {
            at_ms,
            digit,
            duration_ms,
        } => (
            at_ms,
            format!("DTMF {digit} received ({duration_ms} ms tone)"),
        ),
        Timeline::AudioStarted { at_ms } => (at_ms, "audio from the server starts".to_owned()),
        Timeline::ServerHangup { at_ms } => (at_ms, "server hung up".to_owned()),
        Timeline::CallerHangup { at_ms } => (at_ms, "caller hung up".to_owned()),
        Timeline::CdrSent { at_ms } => (at_ms, "CDR sent".to_owned()),
        Timeline::Misbehaved { at_ms, what } => (at_ms, format!("misbehaving: {what}")),
        Timeline::Unexpected { at_ms, text } => (at_ms, format!("unexpected: {text}")),
        Timeline::Closed {
            at_ms,
            code,
            reason,
        } => (at_ms, format!("closed: {code} {reason:?}")),
    };
    format!("{:>9.3}s  {text}", *at as f64 / 1000.0)
}

/// `callgate load` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct LoadArgs {
    /// The server's URL, ws:// or wss:// (the only address load sends to)
    #[arg(long, default_value = "ws://127.0.0.1:4143/")]
    url: String,
    /// wss://: trust only the CA certificates in this PEM file [default: the system's]
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// Concurrent calls
    #[arg(long, default_value_t = 100)]
    calls: usize,
    /// Calls started per second (0: all at once)
    #[arg(long, default_value_t = 200.0)]
    ramp: f64,
    /// Audio streamed per call
    #[arg(long, default_value = "10s", value_name = "TIME")]
    duration: String,
    /// Steady state: keep --calls calls live for this long, re-dialling each one as it ends
    /// (each lasts --duration), and report calls refused and dropped [default: one call each]
    #[arg(long = "for", value_name = "TIME")]
    steady_for: Option<String>,
    /// Calls are named PREFIX-N (their cdrId or sessionId)
    #[arg(long, default_value = "load", value_name = "PREFIX")]
    id_prefix: String,
    /// callbridge, inbound, mixed or twilio (with --format ULAW_8000)
    #[arg(long, default_value = "inbound")]
    protocol: String,
    /// Audio format (20 ms frames of it)
    #[arg(long, default_value = "PCM_8000")]
    format: String,
    /// The server's pid, to report its CPU per frame and memory per call (same machine)
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Time allowed to connect and be answered
    #[arg(long, default_value = "10s", value_name = "TIME")]
    answer_timeout: String,
    /// echo: stream stamped frames and time their echo (server --agent echo); playout: stay
    /// silent and measure how evenly the server's audio arrives (server --agent tone)
    #[arg(long, default_value = "echo")]
    mode: String,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

pub(crate) fn load(args: LoadArgs) -> anyhow::Result<bool> {
    let opts = LoadOptions {
        url: args.url,
        ca_file: args.ca_file,
        calls: args.calls,
        ramp: args.ramp,
        duration: parse_time(&args.duration)?,
        mix: match args.protocol.as_str() {
            "callbridge" => Mix::CallBridge,
            "inbound" => Mix::Inbound,
            "mixed" => Mix::Mixed,
            "twilio" => Mix::Twilio,
            other => bail!("invalid protocol {other:?}: callbridge, inbound, mixed or twilio"),
        },
        format: format(&args.format)?,
        server_pid: args.server_pid,
        answer_timeout: parse_time(&args.answer_timeout)?,
        mode: match args.mode.as_str() {
            "echo" => load::Mode::Echo,
            "playout" => load::Mode::Playout,
            other => bail!("invalid mode {other:?}: echo or playout"),
        },
        steady_for: args.steady_for.as_deref().map(parse_time).transpose()?,
        id_prefix: args.id_prefix,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let tty = std::io::stderr().is_terminal();
    let report = runtime.block_on(load::run(&opts, |p| {
        let line = format!(
            "{:>6.1}s  calls up {:>5}  done {:>5}  failed {:>4}  frames/s {:>7.0}  p99 {:>6.1} ms",
            p.elapsed_s, p.calls_up, p.calls_done, p.calls_failed, p.frames_per_s, p.p99_ms
        );
        let mut err = std::io::stderr();
        let _ = if tty {
            write!(err, "\r{line}")
        } else {
            writeln!(err, "{line}")
        };
    }))?;
    if tty {
        eprintln!();
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    let clean =
        report.calls_failed.is_empty() && report.frames.lost == 0 && report.frames.corrupt == 0;
    Ok(clean)
}

fn print_report(r: &load::Report) {
    let row = |name: &str, p: &load::Percentiles| {
        println!(
            "{name:<12} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10}",
            p.p50, p.p90, p.p99, p.p999, p.max, p.samples
        );
    };
    match r.steady_for_s {
        None => println!(
            "calls        {} asked, {} ok, {} most at once",
            r.calls, r.calls_ok, r.max_concurrent
        ),
        Some(s) => println!(
            "calls        {} placed over {s:.0} s, {} ok, {} most at once",
            r.calls, r.calls_ok, r.max_concurrent
        ),
    }
    println!(
        "             {} refused (never answered), {} dropped (answered, not ended by the caller)",
        r.calls_refused, r.calls_dropped
    );
    for (reason, n) in &r.calls_failed {
        println!("  failed     {n} {reason}");
    }
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "ms", "p50", "p90", "p99", "p99.9", "max", "samples"
    );
    row("connect", &r.connect_ms);
    row("answer", &r.answer_ms);
    if let Some(j) = &r.playout_jitter_ms {
        row("pacing", j);
        if let Some(gap) = r.longest_gap_ms {
            println!("longest gap  {gap:.1} ms between two frames");
        }
    } else {
        row("round trip", &r.rtt_ms);
    }
    let f = &r.frames;
    println!(
        "frames       {} sent, {} echoed, {} lost, {} corrupt, {} reordered",
        f.sent, f.received, f.lost, f.corrupt, f.reordered
    );
    let s = &r.sender;
    println!(
        "generator    {:.2} CPU s ({:.0}% of a core), {} late frames ({:.3}%), latest {:.1} ms{}",
        s.cpu_s,
        s.cpu_share * 100.0,
        s.late_frames,
        s.late_share * 100.0,
        s.max_lateness_ms,
        if s.fell_behind {
            "  FELL BEHIND: this run measured the generator"
        } else {
            ""
        }
    );
    if let Some(sv) = &r.server {
        println!(
            "server       pid {}: {:.2} CPU s ({:.0}% of a core), {:.1} us per echoed frame, RSS {} -> {} kB ({} B per call)",
            sv.pid,
            sv.cpu_s,
            sv.cpu_share * 100.0,
            sv.cpu_us_per_frame,
            sv.rss_baseline_bytes / 1024,
            sv.rss_peak_bytes / 1024,
            sv.rss_per_call_bytes
        );
    }
    println!("wall         {:.1} s", r.wall_s);
}
