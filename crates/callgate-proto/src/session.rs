//! A server session of any protocol, for owners that handle both (the call task, the
//! golden-vector runner). Same inputs and outputs as [`callbridge::Session`] and
//! [`inbound::Session`]; see the crate docs for the drive loop.

use std::time::Instant;

use bytes::Bytes;

use crate::call::{CallEvent, Command, Disconnect};
use crate::detect::Start;
use crate::{Error, Output, Protocol, callbridge, inbound, twilio};

/// The server side of one call, whichever protocol it speaks.
#[derive(Debug)]
pub enum Session {
    /// A CallBridge call.
    CallBridge(callbridge::Session),
    /// An inbound call.
    Inbound(inbound::Session),
    /// A Twilio Media Streams call.
    Twilio(twilio::Session),
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Session::CallBridge($s) => $e,
            Session::Inbound($s) => $e,
            Session::Twilio($s) => $e,
        }
    };
}

impl Session {
    /// The session for a call that began with `start` (`config` applies to inbound calls).
    pub fn new(now: Instant, start: Start, config: inbound::Config) -> Self {
        match start {
            Start::CallBridge(s) => Self::CallBridge(callbridge::Session::new(now, s)),
            Start::Inbound(c) => Self::Inbound(inbound::Session::new(now, c, config)),
            Start::Twilio(s) => Self::Twilio(twilio::Session::new(now, s)),
        }
    }

    /// The call's protocol.
    pub fn protocol(&self) -> Protocol {
        match self {
            Self::CallBridge(_) => Protocol::CallBridge,
            Self::Inbound(_) => Protocol::Inbound,
            Self::Twilio(_) => Protocol::Twilio,
        }
    }

    /// Asks the phone side to confirm when the audio sent so far has played: Twilio places a
    /// mark and returns its number ([`CallEvent::MarkPlayed`] follows). The other protocols
    /// play what they are sent as it arrives: `None`, nothing to confirm.
    pub fn handle_mark(&mut self, now: Instant) -> Option<u64> {
        match self {
            Self::Twilio(s) => s.handle_mark(now),
            Self::CallBridge(_) | Self::Inbound(_) => None,
        }
    }

    /// Audio sent to the phone side and not played yet must be dropped (Twilio: `clear`; the
    /// other protocols buffer nothing, so nothing is sent).
    pub fn handle_clear(&mut self, now: Instant) {
        if let Self::Twilio(s) = self {
            s.handle_clear(now);
        }
    }

    /// A text message from the phone side.
    pub fn handle_text(&mut self, now: Instant, text: &str) {
        each!(self, s => s.handle_text(now, text))
    }

    /// A binary message (audio) from the phone side.
    pub fn handle_binary(&mut self, now: Instant, data: Bytes) {
        each!(self, s => s.handle_binary(now, data))
    }

    /// The phone side closed or the connection dropped.
    pub fn handle_peer_close(&mut self, now: Instant, how: Disconnect) {
        each!(self, s => s.handle_peer_close(now, how))
    }

    /// A fatal problem found below the session.
    pub fn handle_violation(&mut self, now: Instant, error: Error) {
        each!(self, s => s.handle_violation(now, error))
    }

    /// A command from the agent or an operator.
    pub fn handle_command(&mut self, now: Instant, command: Command) -> Result<(), Error> {
        each!(self, s => s.handle_command(now, command))
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        each!(self, s => s.handle_timeout(now))
    }

    /// The server is shutting down.
    pub fn handle_shutdown(&mut self, now: Instant) {
        each!(self, s => s.handle_shutdown(now))
    }

    /// The next deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        each!(self, s => s.poll_timeout())
    }

    /// The next output.
    pub fn poll_output(&mut self) -> Option<Output<CallEvent>> {
        each!(self, s => s.poll_output())
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        each!(self, s => s.is_closed())
    }
}
