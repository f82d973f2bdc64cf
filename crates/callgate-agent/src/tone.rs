//! The tone agent: answers and plays a steady 440 Hz tone (-12 dBFS) until the call ends,
//! through the playout clock. For diagnostics (does the caller hear a clean, unbroken tone?)
//! and for measuring pacing (`callgate load --mode playout`).

use bytes::Bytes;
use callgate_audio::pcm;

use crate::{Agent, AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun, Error, boxed};

/// The tone's frequency.
pub const HZ: f64 = 440.0;
/// Audio per command: 200 ms holds exactly 88 cycles, so chunks join without a click.
pub const CHUNK_MS: u32 = 200;

/// Plays a tone.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tone;

impl Agent for Tone {
    async fn run(self, mut io: AgentIo) -> Result<(), Error> {
        let format = io.call.output_format;
        let rate = format.sample_rate();
        let n = (rate * CHUNK_MS / 1000) as usize;
        let samples: Vec<i16> = (0..n)
            .map(|i| {
                let t = i as f64 / f64::from(rate);
                (0.25 * 32767.0 * (2.0 * std::f64::consts::PI * HZ * t).sin()) as i16
            })
            .collect();
        let chunk: Bytes = pcm::encode(format, &samples);
        let sender = io.sender();
        if sender.send(AgentCommand::Answer).await.is_err() {
            return Ok(());
        }
        loop {
            tokio::select! {
                event = io.recv() => match event {
                    None | Some(AgentEvent::Ended(_)) => return Ok(()),
                    Some(_) => {}
                },
                // Waits while the playout is full: the call's backpressure paces this loop.
                sent = sender.send(AgentCommand::Audio(chunk.clone())) => {
                    if sent.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Makes [`Tone`] agents.
#[derive(Debug, Default, Clone, Copy)]
pub struct ToneFactory;

impl AgentFactory for ToneFactory {
    fn name(&self) -> &'static str {
        "tone"
    }

    fn start(&self, io: AgentIo) -> AgentRun {
        boxed(Tone, io)
    }
}
