//! The Realtime API double in benchmark mode, for measuring callgate's own latency with the
//! `realtime` agent at hundreds of concurrent calls.
//!
//! ```text
//! cargo run --release -p callgate-testkit --example realtime-double -- \
//!     --listen 127.0.0.1:9300 [--answer-ms 1000] [--speech-every-ms 3000] \
//!     [--api-key test-key] [--audio-per-delta-ms 100]
//! ```
//!
//! Every session answers at once: each `response.create` gets a whole spoken response of
//! `--answer-ms` of audio (in the session's output format, one burst), and a scripted VAD emits a
//! caller turn (speech_started, speech_stopped, committed, the user item) after every
//! `--speech-every-ms` of appended caller audio, followed at once by an answer when the session's
//! `create_response` is on (`--speech-every-ms 0` turns the VAD off). One task per session;
//! caller audio is counted, not kept.
//!
//! The first line on stdout is the bound address; a line of totals goes to stderr every 10 s.
//! Ctrl-C stops it.

use std::net::SocketAddr;
use std::time::Duration;

use callgate_testkit::realtime::{Auto, Double, DoubleConfig};

const USAGE: &str = "usage: realtime-double [--listen ADDR] [--answer-ms MS] \
[--speech-every-ms MS] [--api-key KEY] [--audio-per-delta-ms MS]";

#[tokio::main]
async fn main() {
    let config = match parse(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("{message}\n{USAGE}");
            std::process::exit(64);
        }
    };
    let double = Double::start(config).await;
    // The benchmark reads this line to learn the port.
    println!("{}", double.addr());
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => eprintln!("realtime-double: {} connections so far", double.connections()),
        }
    }
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<DoubleConfig, String> {
    let mut auto = Auto::default();
    let mut config = DoubleConfig::default();
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u32>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--listen" => {
                config.listen = value
                    .parse::<SocketAddr>()
                    .map_err(|e| format!("--listen {value}: {e}"))?;
            }
            "--answer-ms" => auto.answer_ms = number()?,
            "--speech-every-ms" => auto.speech_every_ms = Some(number()?).filter(|&ms| ms > 0),
            "--audio-per-delta-ms" => config.audio_per_delta_ms = number()?.max(1),
            "--api-key" => config.api_key = value,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    config.auto = Some(auto);
    Ok(config)
}
