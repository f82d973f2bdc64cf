//! The driver of one `pipeline` call: the call's events, the providers' answers and time into
//! the [`Core`]; its outputs carried out (requests started and cancelled on the call's
//! `Spawner`, commands to the call through the kit's epoch-aware outbox). It decides nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use callgate_agent::catalog::SettingsError;
use callgate_agent::{
    Agent, AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun, CallInfo, Error, boxed,
};
use callgate_audio::pcm;
use callgate_audio::vad::{Vad, VadConfig, VadEvent};
use callgate_kit::AgentEnv;
use callgate_kit::audio::PromptAudio;
use callgate_kit::callbridge::OpenApi;
use callgate_kit::outbox::{Outbox, send};
use callgate_kit::template::Template;
use callgate_kit::tools::Builtin;
use callgate_kit::tools::{Compiled, ToolDone};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::core::{Config, Core, Output};
use crate::providers::{self, Api, Msg};
use crate::settings::PipelineSettings;

/// Provider answers waiting for the driver. Policy when full: the provider's task waits (one
/// STT, one LLM and one TTS request run at a time, and tools).
const MESSAGES: usize = 64;

/// What every call of a route shares.
#[derive(Debug)]
pub(crate) struct Plan {
    settings: PipelineSettings,
    instructions: Template,
    greeting: Template,
    tools: Compiled,
    declarations: Vec<Value>,
    http: reqwest::Client,
    stt: callgate_kit::stt::Stt,
    llm: Api,
    /// Speech streamed from an OpenAI-compatible API.
    tts: Option<(Api, crate::settings::TtsSettings)>,
    /// Or a kit provider (espeak-ng, the server's `[tts]`) and its voice.
    speaker: Option<(Arc<dyn callgate_kit::tts::Provider>, String)>,
    fallback: Arc<PromptAudio>,
    /// CallBridge's OPEN API with its key (for `agent_terminate` and `send_sms`).
    callbridge: Option<OpenApi>,
}

/// The built-in tools that need CallBridge's OPEN API (offered on CallBridge calls only).
fn needs_open_api(tool: Builtin) -> bool {
    tool.needs_open_api()
}

impl Plan {
    pub(crate) fn build(settings: PipelineSettings, env: &AgentEnv) -> Result<Self, SettingsError> {
        let instructions = Template::parse(&settings.instructions)
            .map_err(|e| SettingsError::caused("instructions", e))?;
        let greeting = Template::parse(&settings.greeting)
            .map_err(|e| SettingsError::caused("greeting", e))?;
        let tools = Compiled::new(&settings.tools)?;
        let function = |name: &str, description: &str, parameters: Value| {
            json!({"type": "function", "function": {"name": name, "description": description,
                   "parameters": parameters}})
        };
        let mut declarations: Vec<Value> = settings
            .builtin_tools
            .iter()
            .map(|b| function(b.name(), b.description(), b.parameters()))
            .collect();
        declarations.extend(
            settings
                .tools
                .iter()
                .map(|t| function(&t.name, &t.description, t.parameters.clone())),
        );
        let http = callgate_kit::http::client().map_err(|e| SettingsError::caused("", e))?;
        let callbridge = match settings.builtin_tools.iter().find(|b| needs_open_api(**b)) {
            Some(tool) => {
                let api = env.callbridge.as_ref().ok_or_else(|| {
                    SettingsError::caused(
                        "builtin_tools",
                        callgate_kit::callbridge::missing(tool.name()),
                    )
                })?;
                api.check(tool.name())
                    .map_err(|e| SettingsError::caused("builtin_tools", e))?;
                api.open()
            }
            None => None,
        };
        let s = &settings;
        let stt = callgate_kit::stt::Stt::build(&s.stt, &http)
            .map_err(|e| SettingsError::caused("stt", e))?;
        let llm = Api::new(&s.llm.base_url, s.llm.api_key_env.as_ref(), s.llm.timeout.0);
        let (tts, speaker) = match &s.tts {
            Some(t) if t.provider == "openai" => (
                Some((
                    Api::new(&t.base_url, t.api_key_env.as_ref(), t.timeout.0),
                    t.clone(),
                )),
                None,
            ),
            Some(t) => {
                let espeak = callgate_kit::TtsSettings {
                    provider: Some(callgate_kit::tts::ProviderName::EspeakNg),
                    timeout: Some(t.timeout),
                    ..Default::default()
                };
                let p = espeak
                    .provider(&http)
                    .map_err(|e| SettingsError::caused("tts.provider", e))?;
                (None, Some((p, t.voice.clone())))
            }
            None => {
                let p = env
                    .tts
                    .provider(&http)
                    .map_err(|e| SettingsError::new("tts", format!("the server's [tts]: {e}")))?;
                (None, Some((p, env.tts.voice())))
            }
        };
        // The fallback never goes through a provider that may be the one failing: the
        // server's `[tts]` (espeak-ng unless it says otherwise), rendered now.
        let provider = env
            .tts
            .provider(&http)
            .map_err(|e| SettingsError::caused("fallback_message", e))?;
        let cache = callgate_kit::tts::Cache::new(&env.data_dir);
        let fallback = callgate_kit::tts::render_at_load(
            &cache,
            provider.as_ref(),
            &env.tts.voice(),
            &settings.fallback_message,
        )
        .map_err(|e| SettingsError::caused("fallback_message", e))?;
        Ok(Self {
            instructions,
            greeting,
            tools,
            declarations,
            http,
            stt,
            llm,
            tts,
            speaker,
            fallback: Arc::new(fallback),
            callbridge,
            settings,
        })
    }
}

/// Makes one pipeline agent per call of a route.
#[derive(Debug)]
pub(crate) struct PipelineFactory {
    pub(crate) plan: Arc<Plan>,
}

impl AgentFactory for PipelineFactory {
    fn name(&self) -> &str {
        crate::NAME
    }

    fn start(&self, io: AgentIo) -> AgentRun {
        boxed(
            PipelineAgent {
                plan: self.plan.clone(),
            },
            io,
        )
    }
}

#[derive(Debug)]
struct PipelineAgent {
    plan: Arc<Plan>,
}

fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
    move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
}

impl Agent for PipelineAgent {
    async fn run(self, mut io: AgentIo) -> Result<(), Error> {
        let plan = self.plan.clone();
        let s = &plan.settings;
        let call = io.call.clone();
        let input = call.input_format;
        let output = call.output_format;
        let vars = call.variables();
        let config = Config {
            instructions: plan.instructions.render(lookup(&vars)),
            greeting: plan.greeting.render(lookup(&vars)),
            end_of_speech_ms: millis(s.turn.end_of_speech.0),
            min_barge_in_ms: millis(s.turn.min_barge_in.0),
            backchannels: s.turn.backchannels.clone(),
            tools: offered(&plan, &call),
            output_bytes_per_ms: (output.frame_bytes_20ms() / 20) as u64,
            input_samples_per_ms: u64::from(input.sample_rate() / 1000),
            max_duration_ms: io.now_ms() + millis(s.max_duration.0),
            protocol: call.protocol,
            output_format: output,
        };
        let mut vad = Vad::new(
            input.sample_rate(),
            VadConfig {
                stop_frames: 5,
                ..VadConfig::default()
            },
        )
        .map_err(Error::failed)?;
        let sender = io.sender();
        let spawner = io.spawner();
        let (tx, mut rx) = mpsc::channel::<Msg>(MESSAGES);
        let mut running: HashMap<u64, AbortHandle> = HashMap::new();
        let mut outbox = Outbox::new(io.epoch());
        outbox.push(AgentCommand::Answer);
        let mut core = Core::new(config, io.started_at(), io.now());
        let mut voiced = false;
        let mut samples = Vec::new();
        let mut ended = false;
        loop {
            while let Some(out) = core.poll_output() {
                match out {
                    Output::Transcribe { req, samples } => {
                        let (plan, tx) = (plan.clone(), tx.clone());
                        let rate = input.sample_rate();
                        let h = spawner.spawn(async move {
                            let result = providers::transcribe(&plan.stt, &samples, rate).await;
                            let _ = tx.send(Msg::Transcript(req, result)).await;
                        });
                        running.insert(req, h.abort_handle());
                    }
                    Output::Complete { req, messages } => {
                        let (plan, tx) = (plan.clone(), tx.clone());
                        let h = spawner.spawn(async move {
                            let body = providers::chat_body(
                                &plan.settings.llm,
                                &messages,
                                &plan.declarations,
                            );
                            let result =
                                providers::complete(&plan.http, &plan.llm, &body, req, &tx).await;
                            let _ = tx.send(Msg::LlmDone(req, result)).await;
                        });
                        running.insert(req, h.abort_handle());
                    }
                    Output::Speak { req, text } => {
                        let (plan, tx) = (plan.clone(), tx.clone());
                        let tasks = spawner.clone();
                        let h = spawner.spawn(async move {
                            let result = match (&plan.tts, &plan.speaker) {
                                (Some((api, s)), _) => {
                                    providers::speak_openai(
                                        &plan.http, api, s, &text, output, req, &tx,
                                    )
                                    .await
                                }
                                (None, Some((p, voice))) => {
                                    providers::speak_with(&tasks, p, voice, &text, output, req, &tx)
                                        .await
                                }
                                (None, None) => Err(crate::core::Failure {
                                    reason: "tts: no provider".into(),
                                    retryable: false,
                                }),
                            };
                            let _ = tx.send(Msg::TtsDone(req, result)).await;
                        });
                        running.insert(req, h.abort_handle());
                    }
                    Output::Cancel { req } => {
                        if let Some(h) = running.remove(&req) {
                            h.abort();
                        }
                    }
                    Output::Tool(tool) => {
                        let (plan, tx, call) = (plan.clone(), tx.clone(), call.clone());
                        spawner.spawn(async move {
                            let done = run_tool(&plan, &call, tool).await;
                            let _ = tx.send(Msg::Tool(done)).await;
                        });
                    }
                    Output::Clear => outbox.cleared(io.clear()),
                    Output::Command(command) => outbox.push(command),
                    Output::Fallback => {
                        let prompt = plan.fallback.clone();
                        let chunks = spawner
                            .spawn_blocking(move || prompt.chunks(output))
                            .await
                            .unwrap_or_default();
                        outbox.extend(chunks.into_iter().map(AgentCommand::Audio));
                        outbox.push(AgentCommand::Hangup);
                    }
                }
            }
            if ended {
                return Ok(());
            }
            let wait = core.poll_timeout().map(tokio::time::Instant::from_std);
            let next = outbox.front();
            tokio::select! {
                event = io.recv() => {
                    let now = io.now();
                    match event {
                        None | Some(AgentEvent::Ended(_)) => {
                            ended = true;
                            for (_, h) in running.drain() {
                                h.abort();
                            }
                        }
                        Some(AgentEvent::Audio(data)) => {
                            samples.clear();
                            pcm::decode(input, &data, &mut samples);
                            match vad.process(&samples) {
                                Some(VadEvent::SpeechStarted { .. }) => voiced = true,
                                Some(VadEvent::SpeechStopped { .. }) => voiced = false,
                                None => {}
                            }
                            core.handle_audio(now, &samples, voiced);
                        }
                        Some(AgentEvent::Mark { id, played_ms, state, .. }) => {
                            core.handle_mark(now, id, played_ms, state);
                        }
                        Some(AgentEvent::BargeIn(i)) => {
                            outbox.barged_in(i.epoch);
                            core.handle_cleared(now, i.played_ms);
                        }
                        Some(AgentEvent::Cleared(i)) => {
                            outbox.advance(i.epoch);
                            core.handle_cleared(now, i.played_ms);
                        }
                        Some(AgentEvent::Refused { command, reason }) => {
                            tracing::debug!(?command, %reason, "Pipeline command refused.");
                        }
                        Some(_) => {}
                    }
                }
                Some(msg) = rx.recv() => {
                    let now = io.now();
                    match msg {
                        Msg::Transcript(req, result) => {
                            running.remove(&req);
                            core.handle_transcript(now, req, result);
                        }
                        Msg::LlmDelta(req, text) => core.handle_llm_delta(now, req, &text),
                        Msg::LlmDone(req, result) => {
                            running.remove(&req);
                            core.handle_llm_done(now, req, result);
                        }
                        Msg::TtsAudio(req, audio) => core.handle_tts_audio(now, req, &audio),
                        Msg::TtsDone(req, result) => {
                            running.remove(&req);
                            core.handle_tts_done(now, req, result);
                        }
                        Msg::Tool(done) => core.handle_tool_done(now, done),
                    }
                }
                () = sleep_until(wait) => core.handle_timeout(io.now()),
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The tools offered on `call`: the OPEN API's only on CallBridge calls.
fn offered(plan: &Plan, call: &CallInfo) -> Vec<Value> {
    let callbridge = call.protocol == callgate_proto::Protocol::CallBridge;
    plan.declarations
        .iter()
        .filter(|d| {
            callbridge
                || !plan
                    .settings
                    .builtin_tools
                    .iter()
                    .any(|b| needs_open_api(*b) && d["function"]["name"] == b.name())
        })
        .cloned()
        .collect()
}

/// Runs a tool the model called: a built-in one that needs the OPEN API (on CallBridge calls
/// only), or an HTTP tool (arguments checked against its schema first).
async fn run_tool(plan: &Plan, call: &CallInfo, tool: crate::chat::ToolCall) -> ToolDone {
    let fail = |error: String| ToolDone {
        call_id: tool.id.clone(),
        ok: false,
        output: json!({ "error": error }).to_string(),
    };
    let builtin = plan
        .settings
        .builtin_tools
        .iter()
        .copied()
        .find(|b| needs_open_api(*b) && b.name() == tool.name);
    if let Some(builtin) = builtin {
        if call.protocol != callgate_proto::Protocol::CallBridge {
            return fail(format!("{} works on CallBridge calls only", tool.name));
        }
        let arguments: Value = match serde_json::from_str(&tool.arguments) {
            Ok(v) => v,
            Err(e) => return fail(format!("the arguments are not JSON: {e}")),
        };
        return match builtin {
            Builtin::AgentTerminate => {
                callgate_kit::tools::agent_terminate(
                    &plan.http,
                    plan.callbridge.as_ref(),
                    call,
                    tool.id.clone(),
                    &arguments,
                )
                .await
            }
            Builtin::SendSms => {
                callgate_kit::tools::send_sms(
                    &plan.http,
                    plan.callbridge.as_ref(),
                    call,
                    tool.id.clone(),
                    &arguments,
                )
                .await
            }
            _ => fail(format!("no tool named {:?}", tool.name)),
        };
    }
    let Some(i) = plan.settings.tools.iter().position(|t| t.name == tool.name) else {
        return fail(format!("no tool named {:?}", tool.name));
    };
    let arguments: Value = match serde_json::from_str(&tool.arguments) {
        Ok(v) => v,
        Err(e) => return fail(format!("the arguments are not JSON: {e}")),
    };
    if let Err(e) = plan.tools.schemas[i].validate(&arguments) {
        return fail(format!("invalid arguments: {e}"));
    }
    callgate_kit::tools::run_http(
        &plan.http,
        &plan.settings.tools[i],
        &plan.tools.urls[i],
        &plan.tools.headers[i],
        call,
        tool.id.clone(),
        &arguments,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use callgate_agent::PhoneInfo;
    use callgate_audio::AudioFormat;
    use callgate_proto::Protocol;

    fn call(protocol: Protocol) -> CallInfo {
        CallInfo {
            call_id: "c1".into(),
            protocol,
            caller: "0101".into(),
            callee: "0202".into(),
            external_id: "e".into(),
            phone: PhoneInfo::Inbound {
                caller_id: "0101".into(),
                did_number: "0202".into(),
                session_id: "e".into(),
            },
            route: "r".into(),
            agent: "pipeline".into(),
            input_format: AudioFormat::Pcm8000,
            output_format: AudioFormat::Pcm8000,
        }
    }

    #[test]
    fn open_api_tools_are_offered_on_callbridge_calls_only() {
        let dir = std::env::temp_dir().join(format!("pipeline-offered-{}", std::process::id()));
        let env = AgentEnv {
            data_dir: dir.clone(),
            tts: Default::default(),
            callbridge: Some(callgate_kit::CallBridgeApi {
                base_url: "http://127.0.0.1:9/api".into(),
                // Set in every process (tests cannot set variables).
                api_key_env: "PATH".into(),
            }),
            stt: None,
        };
        let settings = PipelineSettings {
            builtin_tools: vec![
                Builtin::HangUp,
                Builtin::SendDtmf,
                Builtin::AgentTerminate,
                Builtin::SendSms,
            ],
            ..PipelineSettings::default()
        };
        let plan = Plan::build(settings, &env).expect("a plan");
        let names = |protocol| -> Vec<String> {
            offered(&plan, &call(protocol))
                .iter()
                .map(|d| d["function"]["name"].as_str().unwrap_or("").to_owned())
                .collect()
        };
        assert_eq!(
            names(Protocol::CallBridge),
            ["hang_up", "send_dtmf", "agent_terminate", "send_sms"]
        );
        assert_eq!(names(Protocol::Inbound), ["hang_up", "send_dtmf"]);
        assert_eq!(names(Protocol::Twilio), ["hang_up", "send_dtmf"]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
