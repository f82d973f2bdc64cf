//! The flow file (TOML): parsed and validated once, at load, into a [`Flow`].
//!
//! ```toml
//! start = "greet"              # optional: the first step by default
//! [tts]                        # optional: overrides the server's [tts], key by key
//! voice = "en-us"
//! [messages]                   # optional: what record steps may store (messages::Limits)
//! max_total_bytes = 268435456
//!
//! [[step]]
//! name = "greet"
//! kind = "play"
//! file = "prompts/welcome.wav" # relative to the flow file
//! next = "menu"                # optional: the following step by default
//! ```
//!
//! Everything a call could trip over is found here: unknown keys and kinds, targets that name
//! no step, bad durations and digits, templates that do not parse, audio files that cannot be
//! read, speech that cannot be rendered. The error names the file, the step and the field.
//! Steps nothing can reach are reported as warnings.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use callgate_proto::{Digit, DtmfDuration};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::Error;
use crate::audio::PromptAudio;
use crate::messages::Limits;
use crate::stt::{Stt, SttSettings};
use crate::template::{Template, UrlTemplate, is_name};
use crate::tts::{ProviderName, TtsSettings};

/// A flow that cannot work: the file, the step (when the problem is in one) and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FlowError {
    /// The flow file.
    pub file: PathBuf,
    /// The step's name (or `step[i]` when it has none); `None` for the file as a whole.
    pub step: Option<String>,
    /// The field (`next`, `on.1`, `first_digit_timeout`); empty for the step as a whole.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "flow {}", self.file.display())?;
        if let Some(step) = &self.step {
            write!(f, ": step {step}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.problem)
    }
}

pub use callgate_kit::Dur;

/// A string or a list of strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Either::deserialize(d)? {
            Either::One(s) => Self(vec![s]),
            Either::Many(v) => Self(v),
        })
    }
}

/// Where a step goes next: a step, or the end of the flow (the call is hung up).
pub type Next = Option<usize>;

/// A validated flow.
#[derive(Debug)]
pub struct Flow {
    /// The file it was read from.
    pub file: PathBuf,
    /// The steps, in file order.
    pub steps: Vec<Step>,
    /// The first step.
    pub start: usize,
    /// The flow's TTS settings (the server's, overridden by the file's).
    pub tts: TtsSettings,
    /// What its `record` steps may store (`[messages]`).
    pub messages: Limits,
    /// Steps nothing can reach (and other things worth a look), in words.
    pub warnings: Vec<String>,
}

/// One step.
#[derive(Debug)]
pub struct Step {
    /// Its name.
    pub name: String,
    /// What it does.
    pub kind: StepKind,
}

/// What a step does.
#[derive(Debug)]
pub enum StepKind {
    /// Answer the call (steps that need an answered call answer it anyway).
    Answer {
        /// Then.
        next: Next,
    },
    /// Play a prompt: `play` (files) or `say` (speech); the step ends when it has played.
    Play {
        /// `play` or `say`.
        kind: &'static str,
        /// What to play.
        prompt: Prompt,
        /// Then.
        next: Next,
    },
    /// Wait.
    Pause {
        /// How long.
        duration: Duration,
        /// Then.
        next: Next,
    },
    /// Collect keys.
    Gather(Box<Gather>),
    /// Set variables.
    Set {
        /// Names and values.
        vars: Vec<(String, Template)>,
        /// Then.
        next: Next,
    },
    /// Go to a step.
    Goto {
        /// The step.
        next: Next,
    },
    /// Go to a step chosen by a variable's value.
    Branch {
        /// The variable.
        variable: String,
        /// Value → step.
        on: Vec<(String, Next)>,
        /// When no value matches.
        next: Next,
    },
    /// Hang up once what was queued has played.
    Hangup,
    /// Send keys: protocol DTMF on inbound calls, in-band tones on CallBridge.
    SendDtmf {
        /// The keys.
        digits: Vec<Digit>,
        /// Each tone's length.
        duration: DtmfDuration,
        /// Then.
        next: Next,
    },
    /// Send the caller's audio back.
    Echo {
        /// How long.
        duration: Duration,
        /// Then.
        next: Next,
    },
    /// Record the caller to a WAV file.
    Record(Box<Record>),
    /// POST the call's data to a URL; the answer may set variables and choose the next step.
    Http(Box<Http>),
    /// CallBridge only: end the call through CallBridge's OPEN API, which announces `ment`
    /// and drops the line.
    AgentTerminate {
        /// The announcement (template; may be empty).
        ment: Template,
        /// How long the API request may take.
        timeout: Duration,
        /// After a failure (or on an inbound call); the end of the flow (a hangup) by default.
        on_error: Next,
    },
    /// CallBridge only: send the caller a text message through CallBridge's OPEN API.
    SendSms(Box<SendSms>),
}

/// A `send_sms` step.
#[derive(Debug, Clone)]
pub struct SendSms {
    /// The message (template; at most 2,000 characters once rendered).
    pub content: Template,
    /// A title (template; at most 40 characters; makes it an LMS).
    pub title: Option<Template>,
    /// How long the API request may take.
    pub timeout: Duration,
    /// After the message was accepted.
    pub next: Next,
    /// After a failure (or on an inbound call); `next` by default.
    pub on_error: Next,
}

impl StepKind {
    /// The kind's name as written in the file.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Answer { .. } => "answer",
            Self::Play { kind, .. } => kind,
            Self::Pause { .. } => "pause",
            Self::Gather(_) => "gather",
            Self::Set { .. } => "set",
            Self::Goto { .. } => "goto",
            Self::Branch { .. } => "branch",
            Self::Hangup => "hangup",
            Self::SendDtmf { .. } => "send_dtmf",
            Self::Echo { .. } => "echo",
            Self::Record(_) => "record",
            Self::Http(_) => "http",
            Self::AgentTerminate { .. } => "agent_terminate",
            Self::SendSms(_) => "send_sms",
        }
    }

    fn targets(&self) -> Vec<Next> {
        match self {
            Self::Answer { next }
            | Self::Play { next, .. }
            | Self::Pause { next, .. }
            | Self::Set { next, .. }
            | Self::Goto { next }
            | Self::SendDtmf { next, .. }
            | Self::Echo { next, .. } => vec![*next],
            Self::Gather(g) => {
                let mut all = vec![g.next, g.no_input, g.no_match];
                all.extend(g.on.iter().map(|(_, t)| *t));
                if let Some(listen) = &g.speech {
                    all.extend(listen.expect.iter().map(|(_, _, t)| *t));
                }
                all
            }
            Self::Branch { on, next, .. } => {
                let mut all = vec![*next];
                all.extend(on.iter().map(|(_, t)| *t));
                all
            }
            Self::Hangup => vec![],
            Self::Record(r) => vec![r.next, r.on_full],
            Self::Http(h) => vec![h.next, h.on_error],
            Self::AgentTerminate { on_error, .. } => vec![*on_error],
            Self::SendSms(s) => vec![s.next, s.on_error],
        }
    }
}

/// Audio to play, in order.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    /// The parts.
    pub parts: Vec<PromptPart>,
    /// What the prompt's files say (`text` beside `play`/`file`), for the transcript; `None`:
    /// each part as its [`PromptPart`] variant says (a file by its name in brackets).
    pub words: Option<String>,
}

impl Prompt {
    /// Whether there is nothing to play.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

/// One piece of a prompt.
#[derive(Debug, Clone)]
pub enum PromptPart {
    /// A recorded file, ready at load; the transcript shows its name in brackets
    /// (`[prompts/en/welcome.wav]`) unless the prompt has `words`.
    File(Arc<PromptAudio>),
    /// Speech whose text has no variables, rendered at load; the transcript has its text.
    Audio(Arc<PromptAudio>),
    /// Keys read out one by one from recorded digit files (`say_digits`): no TTS needed.
    Digits {
        /// The keys to read (usually `{{caller}}`).
        text: Template,
        /// The audio of each key.
        files: Arc<HashMap<char, Arc<PromptAudio>>>,
    },
    /// Speech whose text has variables: rendered per call, off the call task.
    Speak {
        /// The text.
        text: Template,
        /// The voice.
        voice: String,
        /// The provider (index into the factory's providers).
        provider: ProviderName,
    },
}

/// A `gather` step.
#[derive(Debug)]
pub struct Gather {
    /// Played first (may be empty).
    pub prompt: Prompt,
    /// Played on each retry (the prompt unless `retry_play`/`retry_say`).
    pub retry_prompt: Prompt,
    /// Keys at most.
    pub max_digits: usize,
    /// The key that ends the input early (not part of the digits).
    pub terminator: Option<Digit>,
    /// How long to wait for the first key once the prompt has played.
    pub first_digit_timeout: Duration,
    /// How long to wait for each further key.
    pub inter_digit_timeout: Duration,
    /// Extra attempts after no input or a wrong key.
    pub retries: u32,
    /// The variable the digits are stored in.
    pub variable: String,
    /// Digits → step; empty: any input goes to `next`.
    pub on: Vec<(String, Next)>,
    /// After input (no `on`, or the `on` entry's own step).
    pub next: Next,
    /// After the last attempt brought no input.
    pub no_input: Next,
    /// After the last attempt brought digits no `on` entry has.
    pub no_match: Next,
    /// The caller may answer with keys (`input` has `dtmf`).
    pub dtmf: bool,
    /// How the caller's speech is heard (`input` has `speech`), or none.
    pub speech: Option<Listen>,
}

/// A gather's speech input.
#[derive(Debug)]
pub struct Listen {
    /// The recogniser (the step's `stt`, else the server's `[stt]`).
    pub stt: Stt,
    /// Step name → its phrases (normalised); empty: any speech goes to `next`.
    pub expect: Vec<(String, Vec<String>, Next)>,
    /// Silence that ends the caller's speech.
    pub end_of_speech: Duration,
}

impl Listen {
    /// The branch a transcript picks: of its phrases that begin a word of the transcript
    /// (compared normalised, see [`crate::stt::normalize`]: case, spaces and punctuation do
    /// not count, and what follows the phrase may be glued to it, as Korean particles are:
    /// "요금" is in "요금이요"; "네" is not in "좋네요"), the one said first; of two starting
    /// at the same word, the longer. `None`: no phrase is in it.
    pub fn pick(&self, transcript: &str) -> Option<(&str, Next)> {
        let mut heard = String::new();
        let mut starts = Vec::new();
        for word in transcript.split(|c: char| !c.is_alphanumeric()) {
            let word = crate::stt::normalize(word);
            if !word.is_empty() {
                starts.push(heard.len());
                heard.push_str(&word);
            }
        }
        let mut best: Option<(usize, usize, &str, Next)> = None;
        for (key, phrases, target) in &self.expect {
            for phrase in phrases {
                let Some(&at) = starts
                    .iter()
                    .find(|&&at| heard[at..].starts_with(phrase.as_str()))
                else {
                    continue;
                };
                let better = match best {
                    None => true,
                    Some((b_at, b_len, ..)) => at < b_at || (at == b_at && phrase.len() > b_len),
                };
                if better {
                    best = Some((at, phrase.len(), key, *target));
                }
            }
        }
        best.map(|(_, _, key, target)| (key, target))
    }
}

/// A `record` step.
#[derive(Debug)]
pub struct Record {
    /// The longest recording.
    pub max_length: Duration,
    /// End after this much silence (none: only `max_length` or the terminator end it).
    pub silence: Option<Duration>,
    /// The key that ends the recording.
    pub terminator: Option<Digit>,
    /// The variable the file's path (relative to the data dir) is stored in; `NAME_ms` gets
    /// its length.
    pub variable: String,
    /// Then.
    pub next: Next,
    /// When nothing can be recorded (`data_dir/messages` is full, or the call has used its
    /// share): `next` by default.
    pub on_full: Next,
}

/// An `http` step.
#[derive(Debug)]
pub struct Http {
    /// Where to POST: the call's values are data in the path and the query (see
    /// [`UrlTemplate`]).
    pub url: UrlTemplate,
    /// How long the whole request may take.
    pub timeout: Duration,
    /// After a good answer that names no step.
    pub next: Next,
    /// After a failure, a timeout or an answer that makes no sense.
    pub on_error: Next,
}

/// What loading a flow needs from its surroundings.
pub trait Loader {
    /// Reads a file (the flow, its audio).
    fn read(&self, path: &Path) -> Result<Vec<u8>, Error>;
    /// Renders fixed speech at load (cached in the data dir).
    fn speak(
        &self,
        tts: &TtsSettings,
        provider: ProviderName,
        voice: &str,
        text: &str,
    ) -> Result<PromptAudio, Error>;
    /// Checks that speech can be rendered per call with this provider.
    fn check_provider(&self, tts: &TtsSettings, provider: ProviderName) -> Result<(), Error>;
    /// Checks that CallBridge's OPEN API is configured (for `what`: `agent_terminate`,
    /// `send_sms`).
    fn check_callbridge_api(&self, what: &str) -> Result<(), Error>;
    /// The speech recogniser of a gather that listens: the step's own `stt`, else the
    /// server's `[stt]`; `None` when there is neither.
    fn stt(&self, step: Option<&SttSettings>) -> Result<Option<Stt>, Error>;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlow {
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    tts: Option<TtsSettings>,
    #[serde(default)]
    messages: Option<Limits>,
    #[serde(default)]
    step: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NextOnly {
    #[serde(default)]
    next: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaySpec {
    file: OneOrMany,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    next: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SaySpec {
    text: String,
    #[serde(default)]
    voice: Option<String>,
    #[serde(default)]
    provider: Option<ProviderName>,
    #[serde(default)]
    next: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SayDigitsSpec {
    digits: String,
    dir: String,
    #[serde(default)]
    next: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DurationSpec {
    duration: Dur,
    #[serde(default)]
    next: Option<String>,
}

fn default_max_digits() -> usize {
    1
}
fn default_terminator() -> String {
    "#".into()
}
fn default_first() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_inter() -> Dur {
    Dur(Duration::from_secs(3))
}
fn default_retries() -> u32 {
    2
}
fn default_digits_var() -> String {
    "digits".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GatherSpec {
    #[serde(default)]
    play: OneOrMany,
    #[serde(default)]
    say: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    retry_play: Option<OneOrMany>,
    #[serde(default)]
    retry_text: Option<String>,
    #[serde(default)]
    retry_say: Option<String>,
    #[serde(default)]
    voice: Option<String>,
    #[serde(default = "default_max_digits")]
    max_digits: usize,
    #[serde(default = "default_terminator")]
    terminator: String,
    #[serde(default = "default_first")]
    first_digit_timeout: Dur,
    #[serde(default = "default_inter")]
    inter_digit_timeout: Dur,
    #[serde(default = "default_retries")]
    retries: u32,
    #[serde(default = "default_digits_var")]
    variable: String,
    #[serde(default)]
    on: BTreeMap<String, String>,
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    no_input: Option<String>,
    #[serde(default)]
    no_match: Option<String>,
    #[serde(default = "default_input")]
    input: Vec<String>,
    #[serde(default)]
    expect: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    end_of_speech: Option<Dur>,
    #[serde(default)]
    stt: Option<SttSettings>,
    #[serde(default)]
    speech_optional: bool,
}

fn default_input() -> Vec<String> {
    vec!["dtmf".into()]
}

/// The default silence that ends the caller's speech (the pipeline's `end_of_speech`).
pub const END_OF_SPEECH: Duration = Duration::from_millis(600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetSpec {
    vars: BTreeMap<String, String>,
    #[serde(default)]
    next: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GotoSpec {
    next: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BranchSpec {
    variable: String,
    on: BTreeMap<String, String>,
    #[serde(default)]
    next: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn default_dtmf_ms() -> Dur {
    Dur(Duration::from_millis(200))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendDtmfSpec {
    digits: String,
    #[serde(default = "default_dtmf_ms")]
    duration: Dur,
    #[serde(default)]
    next: Option<String>,
}

fn default_max_length() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_recording_var() -> String {
    "recording".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordSpec {
    #[serde(default = "default_max_length")]
    max_length: Dur,
    #[serde(default)]
    silence: Option<Dur>,
    #[serde(default = "default_terminator")]
    terminator: String,
    #[serde(default = "default_recording_var")]
    variable: String,
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    on_full: Option<String>,
}

fn default_http_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentTerminateSpec {
    #[serde(default)]
    ment: String,
    #[serde(default = "default_http_timeout")]
    timeout: Dur,
    #[serde(default)]
    on_error: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendSmsSpec {
    content: String,
    #[serde(default)]
    title: Option<String>,
    #[serde(default = "default_http_timeout")]
    timeout: Dur,
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    on_error: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSpec {
    url: String,
    #[serde(default = "default_http_timeout")]
    timeout: Dur,
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    on_error: Option<String>,
}

/// The step kinds, for error messages.
const KINDS: &str = "answer, play, say, say_digits, pause, gather, set, goto, branch, hangup, \
                     send_dtmf, echo, record, http, agent_terminate, send_sms";

/// The longest `max_length` of a recording (its audio is held in memory until written).
pub const MAX_RECORDING: Duration = Duration::from_secs(600);
/// The longest `http` timeout.
pub const MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest `pause`, `echo` or gather timeout.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Compiles one flow file.
struct Compiler<'a> {
    file: &'a Path,
    dir: PathBuf,
    names: HashMap<String, usize>,
    tts: TtsSettings,
    loader: &'a dyn Loader,
    /// Files and speech already loaded, shared by the steps that use them.
    files: HashMap<PathBuf, Arc<PromptAudio>>,
}

impl Flow {
    /// Reads and validates the flow file at `path`, with the server's TTS settings under the
    /// file's own.
    pub fn load(path: &Path, tts: &TtsSettings, loader: &dyn Loader) -> Result<Self, FlowError> {
        let whole = |problem: String| FlowError {
            file: path.to_owned(),
            step: None,
            field: String::new(),
            problem,
        };
        let bytes = loader
            .read(path)
            .map_err(|e| whole(format!("cannot read: {e}")))?;
        let text = String::from_utf8(bytes).map_err(|_| whole("not UTF-8 text".into()))?;
        Self::parse(path, &text, tts, loader)
    }

    /// Validates flow `text` as if read from `path` (relative files are found next to it).
    pub fn parse(
        path: &Path,
        text: &str,
        tts: &TtsSettings,
        loader: &dyn Loader,
    ) -> Result<Self, FlowError> {
        let whole = |field: &str, problem: String| FlowError {
            file: path.to_owned(),
            step: None,
            field: field.to_owned(),
            problem,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| whole("", e.to_string()))?;
        let json = serde_json::to_value(table).map_err(|e| whole("", e.to_string()))?;
        let raw: RawFlow = serde_path_to_error::deserialize(json).map_err(|e| {
            let path = e.path().to_string();
            whole(
                if path == "." { "" } else { path.as_str() },
                e.into_inner().to_string(),
            )
        })?;
        if raw.step.is_empty() {
            return Err(whole("step", "a flow needs at least one [[step]]".into()));
        }
        let mut names = HashMap::new();
        let mut labels = Vec::new();
        for (i, step) in raw.step.iter().enumerate() {
            let label = match step.get("name") {
                Some(serde_json::Value::String(n)) => format!("{n:?}"),
                _ => format!("step[{i}]"),
            };
            let err = |field: &str, problem: &str| FlowError {
                file: path.to_owned(),
                step: Some(label.clone()),
                field: field.to_owned(),
                problem: problem.to_owned(),
            };
            let Some(serde_json::Value::String(name)) = step.get("name") else {
                return Err(err("name", "every step needs a name (a string)"));
            };
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                || name.is_empty()
            {
                return Err(err("name", "a step name is letters, digits, - and _"));
            }
            if names.insert(name.clone(), i).is_some() {
                return Err(err("name", "another step already has this name"));
            }
            labels.push(label);
        }
        let flow_tts = raw.tts.unwrap_or_default().over(tts);
        let messages = raw.messages.unwrap_or_default();
        if messages.max_call_bytes == 0 || messages.max_total_bytes == 0 {
            return Err(whole(
                "messages",
                "max_call_bytes and max_total_bytes must be more than zero".into(),
            ));
        }
        let mut compiler = Compiler {
            file: path,
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            names,
            tts: flow_tts,
            loader,
            files: HashMap::new(),
        };
        let mut steps = Vec::with_capacity(raw.step.len());
        for (i, value) in raw.step.into_iter().enumerate() {
            let following = (i + 1 < labels.len()).then_some(i + 1);
            steps.push(compiler.step(&labels[i], value, following)?);
        }
        let start = match &raw.start {
            None => 0,
            Some(name) => *compiler
                .names
                .get(name)
                .ok_or_else(|| whole("start", format!("no step is named {name:?}")))?,
        };
        let warnings = unreachable(&steps, start)
            .into_iter()
            .map(|i| {
                format!(
                    "flow {}: step {:?} is never reached",
                    path.display(),
                    steps[i].name
                )
            })
            .collect();
        Ok(Self {
            file: path.to_owned(),
            steps,
            start,
            tts: compiler.tts,
            messages,
            warnings,
        })
    }

    /// The step named `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}

/// Steps no path from `start` reaches.
fn unreachable(steps: &[Step], start: usize) -> Vec<usize> {
    let mut seen = vec![false; steps.len()];
    let mut todo = vec![start];
    while let Some(i) = todo.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        todo.extend(steps[i].kind.targets().into_iter().flatten());
    }
    (0..steps.len()).filter(|&i| !seen[i]).collect()
}

impl Compiler<'_> {
    fn err(&self, label: &str, field: impl Into<String>, problem: impl Into<String>) -> FlowError {
        FlowError {
            file: self.file.to_owned(),
            step: Some(label.to_owned()),
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn fields<T: DeserializeOwned>(
        &self,
        label: &str,
        value: serde_json::Value,
    ) -> Result<T, FlowError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            self.err(
                label,
                if path == "." { String::new() } else { path },
                e.into_inner().to_string(),
            )
        })
    }

    fn target(&self, label: &str, field: &str, name: &str) -> Result<Next, FlowError> {
        self.names
            .get(name)
            .map(|&i| Some(i))
            .ok_or_else(|| self.err(label, field, format!("no step is named {name:?}")))
    }

    fn next(
        &self,
        label: &str,
        field: &str,
        name: Option<&str>,
        default: Next,
    ) -> Result<Next, FlowError> {
        match name {
            Some(name) => self.target(label, field, name),
            None => Ok(default),
        }
    }

    fn duration(
        &self,
        label: &str,
        field: &str,
        d: Dur,
        max: Duration,
    ) -> Result<Duration, FlowError> {
        if d.0.is_zero() {
            return Err(self.err(label, field, "must be longer than zero"));
        }
        if d.0 > max {
            return Err(self.err(label, field, format!("must be at most {max:?}")));
        }
        Ok(d.0)
    }

    fn terminator(&self, label: &str, text: &str) -> Result<Option<Digit>, FlowError> {
        match text {
            "" => Ok(None),
            t => Digit::parse(t).map(Some).ok_or_else(|| {
                self.err(
                    label,
                    "terminator",
                    format!("{t:?} is not a key (0-9 * # A-D), or \"\" for none"),
                )
            }),
        }
    }

    /// The words a file prompt says (`text`, `retry_text`): any text but blank.
    fn words(
        &self,
        label: &str,
        field: &str,
        text: Option<&String>,
    ) -> Result<Option<String>, FlowError> {
        match text.map(|t| t.trim()) {
            None => Ok(None),
            Some("") => Err(self.err(
                label,
                field,
                "is empty: give the words the files say, or leave it out",
            )),
            Some(words) => Ok(Some(words.to_owned())),
        }
    }

    fn file_prompt(
        &mut self,
        label: &str,
        field: &str,
        files: &[String],
    ) -> Result<Prompt, FlowError> {
        let mut parts = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let field = if files.len() > 1 {
                format!("{field}[{i}]")
            } else {
                field.to_owned()
            };
            let path = self.dir.join(file);
            if let Some(audio) = self.files.get(&path) {
                parts.push(PromptPart::File(audio.clone()));
                continue;
            }
            let bytes = self
                .loader
                .read(&path)
                .map_err(|e| self.err(label, &field, format!("{}: {e}", path.display())))?;
            let audio = hound::WavReader::new(std::io::Cursor::new(bytes))
                .map_err(callgate_audio::Error::from)
                .and_then(callgate_audio::wav::read_mono_from)
                .map_err(|e| self.err(label, &field, format!("{}: {e}", path.display())))?;
            if audio.samples.is_empty() || audio.rate == 0 {
                return Err(self.err(label, &field, format!("{}: no audio", path.display())));
            }
            let prompt = PromptAudio::new(file.clone(), &audio)
                .map_err(|e| self.err(label, &field, format!("{}: {e}", path.display())))?;
            let prompt = Arc::new(prompt);
            self.files.insert(path, prompt.clone());
            parts.push(PromptPart::File(prompt));
        }
        Ok(Prompt { parts, words: None })
    }

    fn say_prompt(
        &mut self,
        label: &str,
        field: &str,
        text: &str,
        voice: Option<&str>,
        provider: Option<ProviderName>,
    ) -> Result<Prompt, FlowError> {
        let template = Template::parse(text).map_err(|p| self.err(label, field, p))?;
        let provider = provider.unwrap_or(self.tts.provider.unwrap_or_default());
        let voice = voice.map_or_else(
            || {
                TtsSettings {
                    provider: Some(provider),
                    ..self.tts.clone()
                }
                .voice()
            },
            str::to_owned,
        );
        if template.is_fixed() {
            let audio = self
                .loader
                .speak(&self.tts, provider, &voice, text)
                .map_err(|p| self.err(label, field, p.to_string()))?;
            return Ok(Prompt {
                parts: vec![PromptPart::Audio(Arc::new(audio))],
                words: None,
            });
        }
        self.loader
            .check_provider(&self.tts, provider)
            .map_err(|p| self.err(label, field, p.to_string()))?;
        Ok(Prompt {
            parts: vec![PromptPart::Speak {
                text: template,
                voice,
                provider,
            }],
            words: None,
        })
    }

    fn step(
        &mut self,
        label: &str,
        mut value: serde_json::Value,
        following: Next,
    ) -> Result<Step, FlowError> {
        let serde_json::Value::Object(map) = &mut value else {
            return Err(self.err(label, "", "a step is a table"));
        };
        let name = match map.remove("name") {
            Some(serde_json::Value::String(n)) => n,
            _ => return Err(self.err(label, "name", "missing")),
        };
        let kind = match map.remove("kind") {
            Some(serde_json::Value::String(k)) => k,
            Some(_) => return Err(self.err(label, "kind", "must be a string")),
            None => return Err(self.err(label, "kind", format!("missing ({KINDS})"))),
        };
        let kind = match kind.as_str() {
            "answer" => {
                let s: NextOnly = self.fields(label, value)?;
                StepKind::Answer {
                    next: self.next(label, "next", s.next.as_deref(), following)?,
                }
            }
            "play" => {
                let s: PlaySpec = self.fields(label, value)?;
                if s.file.0.is_empty() {
                    return Err(self.err(label, "file", "no file given"));
                }
                let words = self.words(label, "text", s.text.as_ref())?;
                StepKind::Play {
                    kind: "play",
                    prompt: Prompt {
                        words,
                        ..self.file_prompt(label, "file", &s.file.0)?
                    },
                    next: self.next(label, "next", s.next.as_deref(), following)?,
                }
            }
            "say" => {
                let s: SaySpec = self.fields(label, value)?;
                StepKind::Play {
                    kind: "say",
                    prompt: self.say_prompt(
                        label,
                        "text",
                        &s.text,
                        s.voice.as_deref(),
                        s.provider,
                    )?,
                    next: self.next(label, "next", s.next.as_deref(), following)?,
                }
            }
            "say_digits" => {
                let s: SayDigitsSpec = self.fields(label, value)?;
                let text = Template::parse(&s.digits).map_err(|p| self.err(label, "digits", p))?;
                let mut files = HashMap::new();
                for (key, file) in [
                    ('0', "0"),
                    ('1', "1"),
                    ('2', "2"),
                    ('3', "3"),
                    ('4', "4"),
                    ('5', "5"),
                    ('6', "6"),
                    ('7', "7"),
                    ('8', "8"),
                    ('9', "9"),
                    ('*', "star"),
                    ('#', "pound"),
                ] {
                    let rel = format!("{}/{file}.wav", s.dir.trim_end_matches('/'));
                    // 0-9 are required; * and # only when present.
                    if key.is_ascii_digit() || self.loader.read(&self.dir.join(&rel)).is_ok() {
                        let prompt = self.file_prompt(label, "dir", &[rel])?;
                        if let Some(PromptPart::File(a)) = prompt.parts.into_iter().next() {
                            files.insert(key, a);
                        }
                    }
                }
                StepKind::Play {
                    kind: "say_digits",
                    prompt: Prompt {
                        parts: vec![PromptPart::Digits {
                            text,
                            files: Arc::new(files),
                        }],
                        words: None,
                    },
                    next: self.next(label, "next", s.next.as_deref(), following)?,
                }
            }
            "pause" => {
                let s: DurationSpec = self.fields(label, value)?;
                StepKind::Pause {
                    duration: self.duration(label, "duration", s.duration, MAX_WAIT)?,
                    next: self.next(label, "next", s.next.as_deref(), following)?,
                }
            }
            "echo" => {
                let s: DurationSpec = self.fields(label, value)?;
                StepKind::Echo {
                    duration: self.duration(label, "duration", s.duration, MAX_WAIT)?,
                    next: self.next(label, "next", s.next.as_deref(), following)?,
                }
            }
            "gather" => StepKind::Gather(Box::new(self.gather(label, value, following)?)),
            "set" => {
                let s: SetSpec = self.fields(label, value)?;
                let mut vars = Vec::new();
                for (k, v) in s.vars {
                    if !is_name(&k) {
                        return Err(self.err(
                            label,
                            format!("vars.{k}"),
                            "a variable name is letters, digits and _",
                        ));
                    }
                    let t =
                        Template::parse(&v).map_err(|p| self.err(label, format!("vars.{k}"), p))?;
                    vars.push((k, t));
                }
                StepKind::Set {
                    vars,
                    next: self.next(label, "next", s.next.as_deref(), following)?,
                }
            }
            "goto" => {
                let s: GotoSpec = self.fields(label, value)?;
                StepKind::Goto {
                    next: self.target(label, "next", &s.next)?,
                }
            }
            "branch" => {
                let s: BranchSpec = self.fields(label, value)?;
                if !is_name(&s.variable) {
                    return Err(self.err(
                        label,
                        "variable",
                        "a variable name is letters, digits and _",
                    ));
                }
                let mut on = Vec::new();
                for (value, target) in &s.on {
                    on.push((
                        value.clone(),
                        self.target(label, &format!("on.{value}"), target)?,
                    ));
                }
                StepKind::Branch {
                    variable: s.variable,
                    on,
                    next: self.next(label, "next", s.next.as_deref(), following)?,
                }
            }
            "hangup" => {
                let _: Empty = self.fields(label, value)?;
                StepKind::Hangup
            }
            "send_dtmf" => {
                let s: SendDtmfSpec = self.fields(label, value)?;
                let mut digits = Vec::new();
                for c in s.digits.chars() {
                    let d = Digit::from_char(c)
                        .filter(|d| d.is_sendable())
                        .ok_or_else(|| {
                            self.err(label, "digits", format!("{c:?} cannot be sent (0-9 * #)"))
                        })?;
                    digits.push(d);
                }
                if digits.is_empty() {
                    return Err(self.err(label, "digits", "no keys given"));
                }
                let duration = u64::try_from(s.duration.0.as_millis())
                    .ok()
                    .and_then(DtmfDuration::from_millis)
                    .ok_or_else(|| self.err(label, "duration", "must be 1ms to 1s"))?;
                StepKind::SendDtmf {
                    digits,
                    duration,
                    next: self.next(label, "next", s.next.as_deref(), following)?,
                }
            }
            "record" => {
                let s: RecordSpec = self.fields(label, value)?;
                if !is_name(&s.variable) {
                    return Err(self.err(
                        label,
                        "variable",
                        "a variable name is letters, digits and _",
                    ));
                }
                let next = self.next(label, "next", s.next.as_deref(), following)?;
                StepKind::Record(Box::new(Record {
                    max_length: self.duration(label, "max_length", s.max_length, MAX_RECORDING)?,
                    silence: s
                        .silence
                        .map(|d| self.duration(label, "silence", d, MAX_RECORDING))
                        .transpose()?,
                    terminator: self.terminator(label, &s.terminator)?,
                    variable: s.variable,
                    next,
                    on_full: self.next(label, "on_full", s.on_full.as_deref(), next)?,
                }))
            }
            "agent_terminate" => {
                let s: AgentTerminateSpec = self.fields(label, value)?;
                self.loader
                    .check_callbridge_api("agent_terminate")
                    .map_err(|p| self.err(label, "", p.to_string()))?;
                StepKind::AgentTerminate {
                    ment: Template::parse(&s.ment).map_err(|p| self.err(label, "ment", p))?,
                    timeout: self.duration(label, "timeout", s.timeout, MAX_HTTP_TIMEOUT)?,
                    on_error: self.next(label, "on_error", s.on_error.as_deref(), None)?,
                }
            }
            "send_sms" => {
                let s: SendSmsSpec = self.fields(label, value)?;
                self.loader
                    .check_callbridge_api("send_sms")
                    .map_err(|p| self.err(label, "", p.to_string()))?;
                let content =
                    Template::parse(&s.content).map_err(|p| self.err(label, "content", p))?;
                let title = s
                    .title
                    .as_deref()
                    .map(Template::parse)
                    .transpose()
                    .map_err(|p| self.err(label, "title", p))?;
                // Text without variables is checked now (empty, too long); with variables,
                // when it is rendered (the step's error branch).
                if content.is_fixed() && title.as_ref().is_none_or(Template::is_fixed) {
                    let render = |t: &Template| t.render(|_| None);
                    callgate_kit::callbridge::Sms::new(
                        &render(&content),
                        title.as_ref().map(render).as_deref(),
                    )
                    .map_err(|e| self.err(label, "content", e.to_string()))?;
                }
                let next = self.next(label, "next", s.next.as_deref(), following)?;
                StepKind::SendSms(Box::new(SendSms {
                    content,
                    title,
                    timeout: self.duration(label, "timeout", s.timeout, MAX_HTTP_TIMEOUT)?,
                    next,
                    on_error: self.next(label, "on_error", s.on_error.as_deref(), next)?,
                }))
            }
            "http" => {
                let s: HttpSpec = self.fields(label, value)?;
                let url = UrlTemplate::parse(&s.url).map_err(|p| self.err(label, "url", p))?;
                let next = self.next(label, "next", s.next.as_deref(), following)?;
                StepKind::Http(Box::new(Http {
                    url,
                    timeout: self.duration(label, "timeout", s.timeout, MAX_HTTP_TIMEOUT)?,
                    next,
                    on_error: self.next(label, "on_error", s.on_error.as_deref(), next)?,
                }))
            }
            other => {
                return Err(self.err(
                    label,
                    "kind",
                    format!("unknown step kind {other:?} ({KINDS})"),
                ));
            }
        };
        Ok(Step { name, kind })
    }

    fn gather(
        &mut self,
        label: &str,
        value: serde_json::Value,
        following: Next,
    ) -> Result<Gather, FlowError> {
        let s: GatherSpec = self.fields(label, value)?;
        if !(1..=32).contains(&s.max_digits) {
            return Err(self.err(label, "max_digits", "must be from 1 to 32"));
        }
        if !is_name(&s.variable) {
            return Err(self.err(
                label,
                "variable",
                "a variable name is letters, digits and _",
            ));
        }
        if !s.play.0.is_empty() && s.say.is_some() {
            return Err(self.err(label, "say", "give play or say, not both"));
        }
        if s.retry_play.is_some() && s.retry_say.is_some() {
            return Err(self.err(label, "retry_say", "give retry_play or retry_say, not both"));
        }
        if s.text.is_some() && s.play.0.is_empty() {
            return Err(self.err(
                label,
                "text",
                "gives the words of `play`'s files: there is no `play` (`say` is spoken as written)",
            ));
        }
        if s.retry_text.is_some() && s.retry_play.is_none() {
            return Err(self.err(
                label,
                "retry_text",
                "gives the words of `retry_play`'s files: there is no `retry_play`",
            ));
        }
        let prompt = match &s.say {
            Some(text) => self.say_prompt(label, "say", text, s.voice.as_deref(), None)?,
            None => Prompt {
                words: self.words(label, "text", s.text.as_ref())?,
                ..self.file_prompt(label, "play", &s.play.0)?
            },
        };
        let retry_prompt = match (&s.retry_play, &s.retry_say) {
            (Some(files), _) => Prompt {
                words: self.words(label, "retry_text", s.retry_text.as_ref())?,
                ..self.file_prompt(label, "retry_play", &files.0)?
            },
            (_, Some(text)) => {
                self.say_prompt(label, "retry_say", text, s.voice.as_deref(), None)?
            }
            _ => prompt.clone(),
        };
        let terminator = self.terminator(label, &s.terminator)?;
        let mut on = Vec::new();
        for (digits, target) in &s.on {
            let field = format!("on.{digits}");
            if digits.is_empty() || digits.len() > s.max_digits {
                return Err(self.err(
                    label,
                    &field,
                    format!("must be 1 to max_digits ({}) keys", s.max_digits),
                ));
            }
            if let Some(bad) = digits.chars().find(|&c| Digit::from_char(c).is_none()) {
                return Err(self.err(label, &field, format!("{bad:?} is not a key (0-9 * # A-D)")));
            }
            if terminator.is_some_and(|t| digits.contains(t.as_char())) {
                return Err(self.err(
                    label,
                    &field,
                    "contains the terminator, which ends the input",
                ));
            }
            on.push((digits.clone(), self.target(label, &field, target)?));
        }
        let next = self.next(label, "next", s.next.as_deref(), following)?;
        let no_input = self.next(label, "no_input", s.no_input.as_deref(), next)?;
        let (dtmf, speech) = self.inputs(label, &s.input)?;
        if !dtmf && !s.on.is_empty() {
            return Err(self.err(label, "on", "keys route nothing: `input` has no \"dtmf\""));
        }
        let speech = if speech {
            self.listen(label, &s)?
        } else {
            for (field, given) in [
                ("speech_optional", s.speech_optional),
                ("expect", !s.expect.is_empty()),
                ("end_of_speech", s.end_of_speech.is_some()),
                ("stt", s.stt.is_some()),
            ] {
                if given {
                    return Err(self.err(
                        label,
                        field,
                        "applies to speech: add \"speech\" to `input`",
                    ));
                }
            }
            None
        };
        Ok(Gather {
            prompt,
            retry_prompt,
            max_digits: s.max_digits,
            terminator,
            first_digit_timeout: self.duration(
                label,
                "first_digit_timeout",
                s.first_digit_timeout,
                MAX_WAIT,
            )?,
            inter_digit_timeout: self.duration(
                label,
                "inter_digit_timeout",
                s.inter_digit_timeout,
                MAX_WAIT,
            )?,
            retries: s.retries.min(10),
            variable: s.variable,
            on,
            next,
            no_input,
            no_match: self.next(label, "no_match", s.no_match.as_deref(), no_input)?,
            dtmf,
            speech,
        })
    }

    /// `input`: `dtmf`, `speech` or both.
    fn inputs(&self, label: &str, input: &[String]) -> Result<(bool, bool), FlowError> {
        let (mut dtmf, mut speech) = (false, false);
        for kind in input {
            let seen = match kind.as_str() {
                "dtmf" => std::mem::replace(&mut dtmf, true),
                "speech" => std::mem::replace(&mut speech, true),
                other => {
                    return Err(self.err(
                        label,
                        "input",
                        format!("{other:?}: the inputs are \"dtmf\" and \"speech\""),
                    ));
                }
            };
            if seen {
                return Err(self.err(label, "input", format!("{kind:?} is given twice")));
            }
        }
        if !dtmf && !speech {
            return Err(self.err(label, "input", "give \"dtmf\", \"speech\" or both"));
        }
        Ok((dtmf, speech))
    }

    /// A gather's speech input: its branches, its end of speech and its recogniser; `None`
    /// when there is no recogniser and the step says speech is optional.
    fn listen(&self, label: &str, s: &GatherSpec) -> Result<Option<Listen>, FlowError> {
        let mut expect = Vec::new();
        let mut seen: HashMap<String, String> = HashMap::new();
        for (key, phrases) in &s.expect {
            let field = format!("expect.{key}");
            let target = self.target(label, &field, key).map_err(|_| {
                self.err(
                    label,
                    &field,
                    format!(
                        "a branch is the name of the step it goes to: no step is named {key:?}"
                    ),
                )
            })?;
            if phrases.0.is_empty() {
                return Err(self.err(label, &field, "give at least one phrase"));
            }
            let mut normalised = Vec::new();
            for phrase in &phrases.0 {
                let n = crate::stt::normalize(phrase);
                if n.is_empty() {
                    return Err(self.err(
                        label,
                        &field,
                        format!("{phrase:?} has no letter or digit to listen for"),
                    ));
                }
                if let Some(other) = seen.insert(n.clone(), key.clone())
                    && other != *key
                {
                    return Err(self.err(
                        label,
                        &field,
                        format!("{phrase:?} is also a phrase of expect.{other}: which one?"),
                    ));
                }
                normalised.push(n);
            }
            expect.push((key.clone(), normalised, target));
        }
        let end_of_speech = match s.end_of_speech {
            Some(d) => {
                let d = self.duration(label, "end_of_speech", d, Duration::from_secs(10))?;
                if d < Duration::from_millis(100) {
                    return Err(self.err(label, "end_of_speech", "must be at least 100ms"));
                }
                d
            }
            None => END_OF_SPEECH,
        };
        let stt = self
            .loader
            .stt(s.stt.as_ref())
            .map_err(|e| self.err(label, "stt", e.to_string()))?;
        let Some(stt) = stt else {
            if s.speech_optional {
                return Ok(None);
            }
            return Err(self.err(
                label,
                "input",
                "\"speech\" needs a recogniser: give the step an `stt` table or the server's \
                 config an [stt] section (or set speech_optional = true to take keys only \
                 without one)",
            ));
        };
        Ok(Some(Listen {
            stt,
            expect,
            end_of_speech,
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A loader whose speech is a short beep and whose providers always work.
    pub(crate) struct FakeLoader;

    impl Loader for FakeLoader {
        fn read(&self, path: &Path) -> Result<Vec<u8>, Error> {
            std::fs::read(path).map_err(Error::Read)
        }
        fn speak(
            &self,
            _: &TtsSettings,
            _: ProviderName,
            _: &str,
            text: &str,
        ) -> Result<PromptAudio, Error> {
            let audio = callgate_audio::wav::MonoAudio {
                rate: 8000,
                samples: vec![1000; 800],
            };
            Ok(PromptAudio::new(text, &audio)?)
        }
        fn check_provider(&self, _: &TtsSettings, _: ProviderName) -> Result<(), Error> {
            Ok(())
        }
        fn check_callbridge_api(&self, _: &str) -> Result<(), Error> {
            Ok(())
        }
        fn stt(&self, step: Option<&SttSettings>) -> Result<Option<Stt>, Error> {
            let settings = step.cloned().unwrap_or_default();
            let http = callgate_kit::http::client()?;
            Ok(Some(Stt::build(&settings, &http)?))
        }
    }

    pub(crate) fn parse(text: &str) -> Result<Flow, FlowError> {
        Flow::parse(
            Path::new("/nowhere/test.toml"),
            text,
            &TtsSettings::default(),
            &FakeLoader,
        )
    }

    fn error(text: &str) -> String {
        parse(text).expect_err("the flow is refused").to_string()
    }

    #[test]
    fn a_valid_flow_compiles_with_defaults() {
        let flow = parse(
            r#"
            [[step]]
            name = "hello"
            kind = "say"
            text = "Hello {{caller}}"
            [[step]]
            name = "menu"
            kind = "gather"
            say = "Press 1"
            on = { "1" = "bye" }
            [[step]]
            name = "bye"
            kind = "hangup"
            "#,
        )
        .unwrap();
        assert_eq!(flow.start, 0);
        assert!(flow.warnings.is_empty(), "{:?}", flow.warnings);
        let StepKind::Gather(g) = &flow.steps[1].kind else {
            panic!()
        };
        assert_eq!(g.max_digits, 1);
        assert_eq!(g.terminator, Some(Digit::Pound));
        assert_eq!(g.first_digit_timeout, Duration::from_secs(5));
        assert_eq!(g.on, vec![("1".to_owned(), Some(2))]);
        assert_eq!(g.next, Some(2), "the following step");
        assert!(matches!(
            flow.steps[0].kind,
            StepKind::Play { kind: "say", .. }
        ));
    }

    #[test]
    fn errors_name_the_file_the_step_and_the_field() {
        let e = error("[[step]]\nname = \"a\"\nkind = \"dance\"\n");
        assert!(
            e.starts_with("flow /nowhere/test.toml: step \"a\": kind: unknown step kind \"dance\""),
            "{e}"
        );
        let e = error("[[step]]\nname = \"a\"\nkind = \"pause\"\nduration = \"soon\"\n");
        assert!(
            e.contains("step \"a\": duration: invalid duration \"soon\""),
            "{e}"
        );
        let e = error("[[step]]\nname = \"a\"\nkind = \"pause\"\nduraton = \"1s\"\n");
        assert!(
            e.contains("step \"a\"") && e.contains("unknown field `duraton`"),
            "{e}"
        );
        let e = error("[[step]]\nname = \"a\"\nkind = \"goto\"\nnext = \"b\"\n");
        assert!(
            e.contains("step \"a\": next: no step is named \"b\""),
            "{e}"
        );
        let e = error("[[step]]\nname = \"a\"\nkind = \"play\"\nfile = \"missing.wav\"\n");
        assert!(e.contains("step \"a\": file: /nowhere/missing.wav"), "{e}");
        let e = error("[[step]]\nname = \"a\"\nkind = \"gather\"\non = { \"12\" = \"a\" }\n");
        assert!(
            e.contains("step \"a\": on.12: must be 1 to max_digits (1) keys"),
            "{e}"
        );
        let e = error("[[step]]\nname = \"a\"\nkind = \"send_dtmf\"\ndigits = \"1A\"\n");
        assert!(e.contains("step \"a\": digits: 'A' cannot be sent"), "{e}");
        let e = error(
            "[[step]]\nname = \"a\"\nkind = \"send_dtmf\"\ndigits = \"1\"\nduration = \"2s\"\n",
        );
        assert!(e.contains("step \"a\": duration"), "{e}");
        let e = error("[[step]]\nname = \"a\"\nkind = \"say\"\ntext = \"hi {{x\"\n");
        assert!(e.contains("step \"a\": text: unclosed"), "{e}");
        let e = error("start = \"z\"\n[[step]]\nname = \"a\"\nkind = \"hangup\"\n");
        assert!(e.contains("start: no step is named \"z\""), "{e}");
        let e = error("[[step]]\nkind = \"hangup\"\n");
        assert!(e.contains("step step[0]: name"), "{e}");
        let e = error(
            "[[step]]\nname = \"a\"\nkind = \"hangup\"\n[[step]]\nname = \"a\"\nkind = \"hangup\"\n",
        );
        assert!(e.contains("another step already has this name"), "{e}");
        let e = error("stepz = 1\n");
        assert!(e.contains("stepz"), "{e}");
        let e = error("[[step]]\nname = \"a\"\nkind = \"http\"\nurl = \"ftp://x\"\n");
        assert!(e.contains("step \"a\": url"), "{e}");
        let e = error("[[step]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://{{ivrIp}}/x\"\n");
        assert!(
            e.contains("step \"a\": url: {{ivrIp}} is in the URL's user, host or port"),
            "{e}"
        );
        let e = error("[[step]]\nname = \"a\"\nkind = \"record\"\nmax_length = \"0s\"\n");
        assert!(
            e.contains("step \"a\": max_length: must be longer than zero"),
            "{e}"
        );
    }

    #[test]
    fn unreachable_steps_are_warnings() {
        let flow = parse(
            "[[step]]\nname = \"a\"\nkind = \"hangup\"\n[[step]]\nname = \"lost\"\nkind = \"hangup\"\n",
        )
        .unwrap();
        assert_eq!(flow.warnings.len(), 1);
        assert!(flow.warnings[0].contains("\"lost\" is never reached"));
    }

    #[test]
    fn a_gather_that_listens_is_checked_at_load() {
        let gather = |fields: &str| {
            format!(
                "[[step]]\nname = \"menu\"\nkind = \"gather\"\n{fields}\n\
                 [[step]]\nname = \"billing\"\nkind = \"hangup\"\n"
            )
        };
        let ok = parse(&gather(
            "input = [\"speech\"]\nexpect = { billing = [\"요금\", \"Billing!\"] }",
        ))
        .expect("valid");
        let StepKind::Gather(g) = &ok.steps[0].kind else {
            panic!("a gather");
        };
        assert!(!g.dtmf);
        let listen = g.speech.as_ref().expect("listens");
        assert_eq!(
            listen.expect[0].1,
            ["요금", "billing"],
            "normalised at load"
        );
        assert_eq!(listen.end_of_speech, END_OF_SPEECH);
        for (fields, expected) in [
            ("input = [\"voice\"]", "input: \"voice\": the inputs are"),
            ("input = []", "input: give \"dtmf\", \"speech\" or both"),
            (
                "input = [\"dtmf\", \"dtmf\"]",
                "input: \"dtmf\" is given twice",
            ),
            (
                "expect = { billing = [\"요금\"] }",
                "expect: applies to speech",
            ),
            (
                "speech_optional = true",
                "speech_optional: applies to speech",
            ),
            (
                "input = [\"speech\"]\non = { \"1\" = \"billing\" }",
                "on: keys route nothing",
            ),
            (
                "input = [\"speech\"]\nexpect = { nowhere = [\"x\"] }",
                "expect.nowhere: a branch is the name of the step it goes to",
            ),
            (
                "input = [\"speech\"]\nexpect = { billing = [\"?!\"] }",
                "expect.billing: \"?!\" has no letter or digit",
            ),
            (
                "input = [\"speech\"]\nexpect = { billing = [\"요금\"], menu = [\"요 금\"] }",
                "is also a phrase of expect.billing",
            ),
            (
                "input = [\"speech\"]\nend_of_speech = \"50ms\"",
                "end_of_speech: must be at least 100ms",
            ),
            (
                "input = [\"speech\"]\nstt = { provider = \"whisper\" }",
                "stt: stt.provider: \"whisper\": openai or vosk",
            ),
        ] {
            let e = error(&gather(fields));
            assert!(e.contains(expected), "{fields}: {e}");
        }
    }
}
