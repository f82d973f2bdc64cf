//! The sans-IO core of callgate's three phone protocols: CallBridge, the inbound-call API and
//! Twilio Media Streams.
//!
//! No sockets, no tasks, no clock: every input carries the current time, and every effect comes
//! out of `poll_output` as an [`Output`] (send a frame, close, or report a [`CallEvent`]).
//!
//! # Layout
//! - [`detect`]: which protocol a connection speaks, from its first text message.
//! - [`callbridge`]: CallBridge's start message, its server [`callbridge::Session`] and its
//!   phone side [`callbridge::Phone`].
//! - [`inbound`]: the inbound-call messages, [`inbound::Session`] and [`inbound::Phone`].
//! - [`twilio`]: Twilio Media Streams' messages (public serde types, both directions),
//!   [`twilio::Session`] (callgate as the bot) and [`twilio::Phone`] (as Twilio).
//! - [`session`]: [`Session`], any protocol's server session behind one type.
//! - Shared values: [`Frame`], [`Close`], [`CloseCode`], [`Digit`], [`DtmfDuration`],
//!   [`AudioFormat`], [`EndReason`], [`Error`].
//!
//! # Driving a session
//! The owner (one task per call in callgate-server) feeds inputs with `handle_text`,
//! `handle_binary`, `handle_peer_close`, `handle_command`, `handle_timeout` and
//! `handle_shutdown`. **Invariant: after every `handle_*` call, drain `poll_output` to `None`
//! before awaiting any I/O**, then sleep until `poll_timeout` at the latest. An
//! [`Output::Close`] is always the last output of a session.
//!
//! # Decoding contract
//! A text message that cannot be parsed is fatal only as the first message (the caller closes
//! with [`Error::close_code`]); mid-call it becomes a [`CallEvent::Violation`] or
//! [`CallEvent::Unknown`] and the call goes on. Nothing here panics on any input.

mod call;
pub mod callbridge;
pub mod detect;
mod dtmf;
mod end;
mod error;
mod format;
mod frame;
pub mod inbound;
mod json;
pub mod session;
pub mod twilio;

pub use call::{CallEvent, CdrReport, Command, Disconnect, PhoneEvent};
pub use detect::Protocol;
pub use dtmf::{Digit, DtmfDuration};
pub use end::{EndReason, HangupBy};
pub use error::Error;
pub use format::{AudioFormat, UnsupportedFormat};
pub use frame::{Close, CloseCode, Frame, Output};
pub use session::Session;
