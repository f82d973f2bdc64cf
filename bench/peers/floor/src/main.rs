//! The benchmark floors: the least a server can do for the inbound flow with the same WebSocket
//! library and the same 4 KiB read buffer callgate uses. No records, no agent, no validation.
//!
//! ```text
//! callgate-bench-floor [ADDR]           echo floor: echo every binary message
//! callgate-bench-floor [ADDR] --pace    pacing floor: play one 20 ms frame every 20 ms
//! ```
//!
//! Both `answer` on `incoming_call` and close (1000) after the `cdr`, as callgate does. The
//! pacing floor is what `callgate load --mode playout` compares `serve --agent tone` with: one
//! task per call, a tokio interval, one tungstenite write per tick. Nothing else is on the
//! per-frame path, so its jitter is what the tokio timer, the runtime and the socket write cost
//! on this machine under this many calls, plus the generator's own scheduling.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// The frame duration.
const FRAME: Duration = Duration::from_millis(20);
/// PCM_8000: 16-bit little-endian mono at 8 kHz.
const RATE: usize = 8000;
/// 200 ms of 440 Hz holds exactly 88 cycles, so its ten frames loop without a click (the
/// same tone and level as callgate's `--agent tone`).
const LOOP_MS: usize = 200;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut addr = "127.0.0.1:4150".to_owned();
    let mut pace = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--pace" => pace = true,
            _ => addr = arg,
        }
    }
    let tone = tone();
    let listener = TcpListener::bind(&addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        // Two spawns, not one task that branches: the echo floor's task stays exactly as small
        // as before (its memory per call is a figure in the results).
        if pace {
            let tone = tone.clone();
            #[allow(clippy::disallowed_methods)]
            tokio::spawn(async move {
                if let Some(ws) = accept(stream).await {
                    play(ws, tone).await;
                }
            });
        } else {
            #[allow(clippy::disallowed_methods)]
            tokio::spawn(async move {
                if let Some(ws) = accept(stream).await {
                    echo(ws).await;
                }
            });
        }
    }
}

async fn accept(stream: TcpStream) -> Option<WebSocketStream<TcpStream>> {
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0);
    tokio_tungstenite::accept_async_with_config(stream, Some(config))
        .await
        .ok()
}

/// The echo floor: answers, echoes every binary message.
async fn echo(mut ws: WebSocketStream<TcpStream>) {
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Binary(b) => {
                if ws.send(Message::Binary(b)).await.is_err() {
                    return;
                }
            }
            Message::Text(t) if t.contains("\"incoming_call\"") => {
                let _ = ws.send(Message::Text(r#"{"event":"answer"}"#.into())).await;
            }
            Message::Text(t) if t.contains("\"cdr\"") => {
                let _ = ws.close(None).await;
            }
            Message::Close(_) => return,
            _ => {}
        }
    }
}

/// The pacing floor: answers, then writes one frame of `tone` per tick of a 20 ms interval
/// until the caller hangs up (callgate stops its audio there too), and closes after the `cdr`.
///
/// `MissedTickBehavior::Burst` (tokio's default): ticks stay on the absolute grid that started
/// at the answer, and a tick missed by a stall fires at once. That is the grid `load --mode
/// playout` measures against, so the floor pays nothing for a policy. `Delay` would move the
/// grid later after every stall and keep that delay, which the measure counts as jitter on
/// every later frame; `Skip` would drop frames. (Tokio only applies the behaviour to a tick
/// more than 5 ms late; smaller lateness always keeps the grid.) callgate's playout clock
/// bursts too, but re-anchors after a stall over 100 ms: a difference only on such stalls.
async fn play(mut ws: WebSocketStream<TcpStream>, tone: Arc<[Bytes]>) {
    // Ringing: wait for the call.
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"incoming_call\"") => break,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
            Some(Ok(_)) => {}
        }
    }
    if ws
        .send(Message::Text(r#"{"event":"answer"}"#.into()))
        .await
        .is_err()
    {
        return;
    }
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut next = 0;
    let mut playing = true;
    loop {
        tokio::select! {
            _ = tick.tick(), if playing => {
                let frame = tone[next].clone();
                next = (next + 1) % tone.len();
                if ws.send(Message::Binary(frame)).await.is_err() {
                    return;
                }
            }
            message = ws.next() => match message {
                Some(Ok(Message::Text(t))) if t.contains("\"hangup\"") => playing = false,
                Some(Ok(Message::Text(t))) if t.contains("\"cdr\"") => {
                    let _ = ws
                        .close(Some(CloseFrame {
                            code: CloseCode::Normal,
                            reason: "call ended".into(),
                        }))
                        .await;
                    // Read on until the caller's close reply ends the stream.
                    playing = false;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}

/// The tone's frames: 200 ms of 440 Hz at -12 dBFS, cut into ten 320-byte frames that share
/// one buffer (sending one is a reference-count increment, as in callgate).
fn tone() -> Arc<[Bytes]> {
    let samples = RATE * LOOP_MS / 1000;
    let mut pcm = Vec::with_capacity(samples * 2);
    for i in 0..samples {
        let t = i as f64 / RATE as f64;
        let s = (0.25 * 32767.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16;
        pcm.extend_from_slice(&s.to_le_bytes());
    }
    let pcm = Bytes::from(pcm);
    let frame = RATE * FRAME.as_millis() as usize / 1000 * 2;
    (0..pcm.len() / frame)
        .map(|i| pcm.slice(i * frame..(i + 1) * frame))
        .collect()
}
