//! The `flow` agent: drives one call's [`Engine`] with the call's events and time, and carries
//! out its actions: commands to the call, prompt audio in chunks, and the slow work (speech,
//! webhooks, writing recordings) off the call task, through the call's [`Spawner`].
//!
//! [`Spawner`]: callgate_agent::Spawner

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use callgate_agent::{
    Agent, AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun, Error, boxed,
};
use callgate_audio::vad::{Vad, VadConfig, VadEvent};
use callgate_audio::{Converter, pcm};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::audio;
use callgate_kit::callbridge::OpenApi;
use callgate_kit::http::post_json;
use callgate_kit::outbox::{Outbox, send, sleep};

use crate::engine::{Action, Done, Engine};
use crate::messages::{Reservation, Store};
use crate::metrics::FlowMetrics;
use crate::spec::Flow;
use crate::tts::{Provider, ProviderName};

/// Results of off-task work coming back to the call's agent. Policy when full: the task
/// waits (one or two are ever in flight: the engine waits for each before asking for more).
const DONE_QUEUE: usize = 8;

/// What every call of a flow shares.
#[derive(Debug)]
pub(crate) struct Runtime {
    pub(crate) data_dir: PathBuf,
    /// The count of `data_dir/messages`, shared by every flow of the process.
    pub(crate) messages: Arc<Store>,
    pub(crate) metrics: Arc<FlowMetrics>,
    pub(crate) http: reqwest::Client,
    pub(crate) providers: HashMap<ProviderName, Arc<dyn Provider>>,
    /// CallBridge's OPEN API with its key.
    pub(crate) callbridge: Option<OpenApi>,
}

/// Makes one flow agent per call.
#[derive(Debug)]
pub struct FlowFactory {
    pub(crate) flow: Arc<Flow>,
    pub(crate) runtime: Arc<Runtime>,
}

impl FlowFactory {
    /// The flow this factory runs.
    pub fn flow(&self) -> &Flow {
        &self.flow
    }
}

impl AgentFactory for FlowFactory {
    fn name(&self) -> &str {
        crate::NAME
    }

    fn start(&self, io: AgentIo) -> AgentRun {
        boxed(
            FlowAgent {
                flow: self.flow.clone(),
                runtime: self.runtime.clone(),
            },
            io,
        )
    }
}

/// The agent of one call.
#[derive(Debug)]
struct FlowAgent {
    flow: Arc<Flow>,
    runtime: Arc<Runtime>,
}

impl Agent for FlowAgent {
    async fn run(self, mut io: AgentIo) -> Result<(), Error> {
        let mut engine = Engine::new(self.flow.clone(), &io.call, io.started_at());
        let sender = io.sender();
        let spawner = io.spawner();
        let input = io.call.input_format;
        let output = io.call.output_format;
        let (done_tx, mut done_rx) = mpsc::channel::<Done>(DONE_QUEUE);
        let mut outbox = Outbox::new(io.epoch());
        let mut echo: Option<Converter> = None;
        let mut saving: Option<(u64, JoinHandle<Result<(), crate::Error>>)> = None;
        // The room reserved for the recording in progress; given back when dropped.
        let mut reservation: Option<Reservation> = None;
        let mut samples = Vec::new();
        // A gather that listens: the voice detector (made at the first one) and the
        // utterance being recognised (audio pushed as it comes; the recogniser works off
        // this task, see callgate_kit::stt).
        let mut vad: Option<Vad> = None;
        let mut voiced = false;
        let mut was_listening = false;
        // (Or why the recogniser could not start: the engine hears it at the speech's end.)
        let mut utterance: Option<(u64, Result<callgate_kit::stt::Utterance, crate::Error>)> = None;
        let mut ended = false;
        engine.start(io.now());
        loop {
            while let Some(action) = engine.poll_output() {
                match action {
                    Action::Command(command) => outbox.push(command),
                    Action::Play(prompt) => {
                        let chunks = if prompt.is_ready(output) {
                            prompt.chunks(output)
                        } else {
                            // The first call at this rate converts the prompt, off the call
                            // task (once per prompt and rate for the whole process).
                            spawner
                                .spawn_blocking(move || prompt.chunks(output))
                                .await
                                .unwrap_or_default()
                        };
                        outbox.extend(chunks.into_iter().map(AgentCommand::Audio));
                    }
                    Action::PlayPcm(pcm16) => outbox.extend(
                        audio::chunks(&pcm16, output)
                            .into_iter()
                            .map(AgentCommand::Audio),
                    ),
                    Action::Clear => outbox.cleared(io.clear()),
                    Action::Speak {
                        seq,
                        text,
                        voice,
                        provider,
                    } => {
                        let runtime = self.runtime.clone();
                        let tx = done_tx.clone();
                        let rate = output.sample_rate();
                        spawner.spawn(async move {
                            let result = speak(&runtime, provider, &voice, &text, rate).await;
                            let _ = tx.send(Done::Speech { seq, result }).await;
                        });
                    }
                    Action::Http {
                        seq,
                        url,
                        body,
                        timeout,
                    } => {
                        let http = self.runtime.http.clone();
                        let tx = done_tx.clone();
                        spawner.spawn(async move {
                            let result = post_json(&http, &url, None, &body, timeout)
                                .await
                                .map_err(crate::Error::Request);
                            let _ = tx.send(Done::Http { seq, result }).await;
                        });
                    }
                    Action::Terminate { seq, body, timeout } => {
                        let http = self.runtime.http.clone();
                        let api = self.runtime.callbridge.clone();
                        let tx = done_tx.clone();
                        spawner.spawn(async move {
                            let result = match &api {
                                Some(api) => api
                                    .terminate(&http, &body, timeout)
                                    .await
                                    .map_err(crate::Error::Request),
                                None => Err(crate::Error::NoOpenApi),
                            };
                            let _ = tx.send(Done::Http { seq, result }).await;
                        });
                    }
                    Action::SendSms { seq, body, timeout } => {
                        let http = self.runtime.http.clone();
                        let api = self.runtime.callbridge.clone();
                        let tx = done_tx.clone();
                        spawner.spawn(async move {
                            let result = match &api {
                                Some(api) => api
                                    .send_sms(&http, &body, timeout)
                                    .await
                                    .map_err(crate::Error::Sms),
                                None => Err(crate::Error::NoOpenApi),
                            };
                            let _ = tx.send(Done::Sms { seq, result }).await;
                        });
                    }
                    Action::Reserve {
                        seq,
                        bytes,
                        min_bytes,
                    } => {
                        let store = &self.runtime.messages;
                        let cap = self.flow.messages.max_total_bytes;
                        let mut held = store.try_reserve(bytes, min_bytes, cap);
                        if held.is_none() && store.claim_rescan() {
                            // Full by the count: files may have gone with their calls.
                            let again = store.clone();
                            let _ = spawner.spawn_blocking(move || again.rescan()).await;
                            held = store.try_reserve(bytes, min_bytes, cap);
                        }
                        let granted = held.as_ref().map(Reservation::bytes);
                        reservation = held;
                        engine.handle_done(io.now(), Done::Reserved { seq, granted });
                    }
                    Action::MessageRefused { reason } => {
                        tracing::debug!(reason, "A record step stored nothing.");
                        self.runtime.metrics.refused(reason);
                    }
                    Action::Save {
                        seq,
                        path,
                        rate,
                        samples,
                    } => {
                        let full = self.runtime.data_dir.join(path);
                        let store = self.runtime.messages.clone();
                        let held = reservation.take();
                        // Awaited by this loop (not a cancellable task): a message left just
                        // before the caller hung up is still written.
                        let handle = spawner.spawn_blocking(move || {
                            let held = held.ok_or(crate::Error::NotReserved)?;
                            store.write(held, &full, rate, &samples).map(|_| ())
                        });
                        saving = Some((seq, handle));
                    }
                    Action::Listen { seq, step, samples } => {
                        let stt = match &self.flow.steps[step].kind {
                            crate::spec::StepKind::Gather(g) => {
                                g.speech.as_ref().map(|l| l.stt.clone())
                            }
                            _ => None,
                        };
                        let started = stt
                            .ok_or(crate::Error::NotListening)
                            .and_then(|stt| Ok(stt.start(input.sample_rate())?));
                        utterance = Some((
                            seq,
                            started.map(|mut u| {
                                u.push(&samples);
                                u
                            }),
                        ));
                    }
                    Action::Hear { seq, samples } => {
                        if let Some((s, Ok(u))) = &mut utterance
                            && *s == seq
                        {
                            u.push(&samples);
                        }
                    }
                    Action::Transcribe { seq } => {
                        // The engine waits for an answer to every Transcribe: always give one.
                        let pending = match utterance.take() {
                            Some((s, pending)) if s == seq => pending,
                            _ => Err(crate::Error::NoUtterance),
                        };
                        let tx = done_tx.clone();
                        spawner.spawn(async move {
                            let result = match pending {
                                Ok(u) => u.finish().await.map_err(crate::Error::Stt),
                                Err(error) => Err(error),
                            };
                            let _ = tx.send(Done::Transcript { seq, result }).await;
                        });
                    }
                    Action::StopListening { seq } => {
                        if utterance.as_ref().is_some_and(|(s, _)| *s == seq) {
                            utterance = None;
                        }
                    }
                    Action::Finished => {}
                }
            }
            // Once the flow is over, the agent stays until the call has ended (its hangup
            // ends it): returning at once could let the call act on the return before the
            // commands still in its channel.
            if ended && saving.is_none() && outbox.is_empty() {
                return Ok(());
            }
            let deadline = engine
                .poll_timeout()
                .filter(|_| !ended)
                .map(tokio::time::Instant::from_std);
            let next = outbox.front();
            tokio::select! {
                event = io.recv(), if !ended => {
                    let now = io.now();
                    match event {
                        None | Some(AgentEvent::Ended(_)) => {
                            ended = true;
                            engine.handle_ended(now);
                        }
                        Some(AgentEvent::Audio(data)) => {
                            let listening = engine.is_listening();
                            if listening && !was_listening {
                                // A new attempt: the detector starts afresh.
                                vad = None;
                                voiced = false;
                            }
                            was_listening = listening;
                            if engine.is_echoing() {
                                let data = if input == output {
                                    data
                                } else {
                                    match &mut echo {
                                        Some(c) => c.convert(&data),
                                        None => match Converter::new(input, output) {
                                            Ok(mut c) => {
                                                let out = c.convert(&data);
                                                echo = Some(c);
                                                out
                                            }
                                            Err(e) => return Err(Error::failed(e)),
                                        },
                                    }
                                };
                                outbox.push(AgentCommand::Audio(data));
                            } else if engine.is_recording() {
                                samples.clear();
                                pcm::decode(input, &data, &mut samples);
                                engine.handle_audio(now, &samples);
                            } else if listening {
                                samples.clear();
                                pcm::decode(input, &data, &mut samples);
                                if vad.is_none() {
                                    let config = VadConfig {
                                        stop_frames: 5,
                                        ..VadConfig::default()
                                    };
                                    vad = Some(
                                        Vad::new(input.sample_rate(), config)
                                            .map_err(Error::failed)?,
                                    );
                                }
                                if let Some(vad) = &mut vad {
                                    match vad.process(&samples) {
                                        Some(VadEvent::SpeechStarted { .. }) => voiced = true,
                                        Some(VadEvent::SpeechStopped { .. }) => voiced = false,
                                        None => {}
                                    }
                                }
                                engine.handle_speech(now, &samples, voiced);
                            }
                        }
                        Some(AgentEvent::Dtmf(digit)) => engine.handle_dtmf(now, digit),
                        Some(AgentEvent::Mark { id, state, .. }) => {
                            engine.handle_mark(now, id, state);
                        }
                        // The call cut its playout (a barge-in with `--vad`, an operator's
                        // clear): a flow goes on with what it queued, in the new epoch.
                        Some(AgentEvent::BargeIn(i)) => outbox.carry_over(i.epoch),
                        Some(AgentEvent::Cleared(i)) => outbox.carry_over(i.epoch),
                        Some(AgentEvent::Refused { command, reason }) => {
                            tracing::debug!(?command, %reason, "Flow command refused.");
                        }
                        Some(_) => {}
                    }
                }
                () = sleep(deadline), if deadline.is_some() => {
                    engine.handle_timeout(io.now());
                }
                Some(done) = done_rx.recv() => engine.handle_done(io.now(), done),
                joined = async {
                    match &mut saving {
                        Some((_, handle)) => handle.await,
                        None => std::future::pending().await,
                    }
                }, if saving.is_some() => {
                    let seq = saving.take().map_or(0, |(seq, _)| seq);
                    let result = joined.unwrap_or_else(|e| Err(crate::Error::Task(e)));
                    engine.handle_done(io.now(), Done::Saved { seq, result });
                }
                sent = send(&sender, next), if !outbox.is_empty() => {
                    if sent.is_err() {
                        return Ok(());
                    }
                    outbox.pop();
                }
            }
        }
    }
}

/// Speech for one call, from the provider, resampled to the call's rate.
async fn speak(
    runtime: &Runtime,
    provider: ProviderName,
    voice: &str,
    text: &str,
    rate: u32,
) -> Result<Bytes, crate::Error> {
    let provider = runtime
        .providers
        .get(&provider)
        .ok_or(crate::Error::NoProvider(provider))?;
    // Not cached: a text with variables is per call (often a phone number: personal data that
    // should not pile up on disk, one file per caller).
    let audio = provider.synthesize(text, voice).await?;
    Ok(tokio::task::spawn_blocking(move || audio::resampled_pcm(&audio, rate)).await??)
}
