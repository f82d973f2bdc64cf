//! `keypad`: a complete small callgate agent, the example of `docs/agents.md`.
//!
//! It answers, plays a short prompt tone, collects the caller's keys until `#` (or
//! `max_digits`), reads them back as DTMF tones in-band (so it works on both protocols), writes
//! the exchange to the call's transcript, and hangs up after the read-back has played. A
//! caller who presses a key during the prompt cuts it short (the agent clears its audio).
//!
//! What it shows: typed settings validated at load ([`KeypadSettings`]), the event loop over
//! [`AgentIo`], marks to know when audio has been heard, clears and epochs, transcript turns
//! and usage, and a hangup that lets the goodbye play.

use std::sync::Arc;

use callgate_agent::catalog::{self, Settings, SettingsError};
use callgate_agent::{
    Agent, AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun, Catalog, Error, MarkState,
    Speaker, Turn, boxed,
};
use callgate_audio::pcm;
use callgate_proto::{Digit, DtmfDuration};

/// The agent's name in routes.
pub const NAME: &str = "keypad";

/// `[routes.settings]` of a keypad route.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeypadSettings {
    /// The most keys collected before the read-back (1 to 32).
    pub max_digits: usize,
    /// The prompt tone's frequency, Hz (200 to 3000).
    pub prompt_hz: f64,
    /// How long the prompt lasts, ms (100 to 5000).
    pub prompt_ms: u32,
}

impl Default for KeypadSettings {
    fn default() -> Self {
        Self {
            max_digits: 8,
            prompt_hz: 880.0,
            prompt_ms: 600,
        }
    }
}

impl Settings for KeypadSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        if !(1..=32).contains(&self.max_digits) {
            return Err(SettingsError::new("max_digits", "must be from 1 to 32"));
        }
        if !(200.0..=3000.0).contains(&self.prompt_hz) {
            return Err(SettingsError::new(
                "prompt_hz",
                "must be from 200 to 3000 Hz",
            ));
        }
        if !(100..=5000).contains(&self.prompt_ms) {
            return Err(SettingsError::new(
                "prompt_ms",
                "must be from 100 to 5000 ms",
            ));
        }
        Ok(())
    }
}

/// Registers the keypad agent in `catalog`, so routes can name it.
pub fn register(catalog: &mut Catalog) {
    catalog.register(NAME, |settings| {
        let settings = catalog::parse::<KeypadSettings>(settings)?;
        Ok(Arc::new(KeypadFactory {
            settings: Arc::new(settings),
        }) as Arc<dyn AgentFactory>)
    });
}

/// Makes one [`Keypad`] per call, sharing the route's validated settings.
#[derive(Debug)]
pub struct KeypadFactory {
    settings: Arc<KeypadSettings>,
}

impl AgentFactory for KeypadFactory {
    fn name(&self) -> &str {
        NAME
    }

    fn start(&self, io: AgentIo) -> AgentRun {
        boxed(
            Keypad {
                settings: self.settings.clone(),
            },
            io,
        )
    }
}

/// The agent of one call.
#[derive(Debug)]
pub struct Keypad {
    settings: Arc<KeypadSettings>,
}

/// Mark ids.
const PROMPT_DONE: u64 = 1;
const READBACK_DONE: u64 = 2;

impl Agent for Keypad {
    async fn run(self, mut io: AgentIo) -> Result<(), Error> {
        io.send(AgentCommand::Answer).await?;
        let format = io.call.output_format;
        let rate = format.sample_rate();
        let prompt: Vec<i16> = (0..rate * self.settings.prompt_ms / 1000)
            .map(|i| {
                let t = f64::from(i) / f64::from(rate);
                (8000.0 * (std::f64::consts::TAU * self.settings.prompt_hz * t).sin()) as i16
            })
            .collect();
        let prompt_start = io.now_ms();
        io.send(AgentCommand::Audio(pcm::encode(format, &prompt)))
            .await?;
        io.send(AgentCommand::Mark(PROMPT_DONE)).await?;
        let mut prompt = Prompt {
            start_ms: prompt_start,
            done: false,
        };
        let mut digits = String::new();
        let mut first_key_ms = None;
        while let Some(event) = io.recv().await {
            match event {
                AgentEvent::Mark {
                    id: PROMPT_DONE,
                    at_ms,
                    state,
                    ..
                } => prompt.finished(&io, at_ms, state).await?,
                AgentEvent::Dtmf(digit) if digit != Digit::Pound => {
                    if !prompt.done {
                        // Typing over the prompt: stop it at once (its mark comes back as
                        // cleared).
                        io.clear();
                    }
                    first_key_ms.get_or_insert(io.now_ms());
                    digits.push(digit.as_char());
                    if digits.len() >= self.settings.max_digits {
                        return self.read_back(&mut io, prompt, &digits, first_key_ms).await;
                    }
                }
                AgentEvent::Dtmf(_) => {
                    return self.read_back(&mut io, prompt, &digits, first_key_ms).await;
                }
                AgentEvent::Ended(_) => break,
                _ => {}
            }
        }
        Ok(())
    }
}

/// The prompt and whether it is over (played or cut short).
#[derive(Debug)]
struct Prompt {
    start_ms: u64,
    done: bool,
}

impl Prompt {
    /// Its mark came back: write its turn.
    async fn finished(&mut self, io: &AgentIo, at_ms: u64, state: MarkState) -> Result<(), Error> {
        self.done = true;
        io.send(AgentCommand::Transcript(Box::new(Turn {
            speaker: Speaker::Agent,
            text: "(prompt tone)".into(),
            start_ms: self.start_ms,
            end_ms: at_ms,
            interrupted: state == MarkState::Cleared,
        })))
        .await
    }
}

impl Keypad {
    /// Reads `digits` back as tones, records the turns, and hangs up once they have played.
    async fn read_back(
        &self,
        io: &mut AgentIo,
        mut prompt: Prompt,
        digits: &str,
        first_key_ms: Option<u64>,
    ) -> Result<(), Error> {
        // The prompt was cleared when the first key came; its mark is on its way. The
        // read-back starts once it is gone, so the transcript stays in order.
        while !prompt.done {
            match io.recv().await {
                Some(AgentEvent::Mark {
                    id: PROMPT_DONE,
                    at_ms,
                    state,
                    ..
                }) => prompt.finished(io, at_ms, state).await?,
                Some(AgentEvent::Ended(_)) | None => return Ok(()),
                Some(_) => {}
            }
        }
        let now = io.now_ms();
        io.send(AgentCommand::Transcript(Box::new(Turn {
            speaker: Speaker::Caller,
            text: digits.to_owned(),
            start_ms: first_key_ms.unwrap_or(now),
            end_ms: now,
            interrupted: false,
        })))
        .await?;
        let tone = DtmfDuration::from_millis(120).ok_or_else(|| Error::failed("tone"))?;
        for c in digits.chars() {
            if let Some(digit) = Digit::from_char(c) {
                io.send(AgentCommand::DtmfTone {
                    digit,
                    duration: tone,
                })
                .await?;
            }
        }
        io.send(AgentCommand::Mark(READBACK_DONE)).await?;
        io.send(AgentCommand::Usage(vec![(
            "digits".into(),
            digits.len() as f64,
        )]))
        .await?;
        // Hangup waits for the read-back to play: the caller hears all of it.
        io.send(AgentCommand::Hangup).await?;
        while let Some(event) = io.recv().await {
            if let AgentEvent::Mark {
                id: READBACK_DONE,
                at_ms,
                ..
            } = event
            {
                io.send(AgentCommand::Transcript(Box::new(Turn {
                    speaker: Speaker::Agent,
                    text: format!("(read back {digits})"),
                    start_ms: now,
                    end_ms: at_ms,
                    interrupted: false,
                })))
                .await?;
            }
        }
        Ok(())
    }
}
