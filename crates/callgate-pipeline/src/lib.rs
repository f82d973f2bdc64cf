//! The `pipeline` agent: the caller's speech to text (STT), an LLM's answer streamed, and that
//! answer spoken (TTS) sentence by sentence, each from any provider that speaks OpenAI's HTTP
//! APIs (issue 17).
//!
//! # Layout (sans-IO pieces: bytes or text in, values out, no clock, no runtime)
//! - [`sse`]: a server-sent events decoder, bounded.
//! - [`chat`]: the accumulator of an OpenAI chat completions stream (content deltas, tool calls
//!   by index, `finish_reason`, usage).
//! - [`sentences`]: an incremental sentence splitter (Korean and CJK punctuation, closing
//!   quotes, a clause boundary for very long sentences).
//! - [`heard`]: an answer's text cut to what the caller heard.
//! - [`core`]: the conversation core of one call (turns, answers, pause and barge-in, tools,
//!   failures, the record).

pub mod chat;
pub mod core;
pub mod heard;
pub mod sentences;
pub mod settings;
pub mod sse;

mod agent;
mod providers;

use std::sync::Arc;

use callgate_agent::catalog;
use callgate_agent::{AgentFactory, Catalog};
use callgate_kit::AgentEnv;

pub use settings::PipelineSettings;

/// The agent's name in routes.
pub const NAME: &str = "pipeline";

/// Registers the `pipeline` agent in `catalog`; `env` gives the data dir (the speech cache)
/// and the server's `[tts]` (for the fallback message).
pub fn register(catalog: &mut Catalog, env: AgentEnv) {
    catalog.register(NAME, move |settings| {
        let settings = catalog::parse::<PipelineSettings>(settings)?;
        let plan = agent::Plan::build(settings, &env)?;
        Ok(Arc::new(agent::PipelineFactory {
            plan: Arc::new(plan),
        }) as Arc<dyn AgentFactory>)
    });
}
