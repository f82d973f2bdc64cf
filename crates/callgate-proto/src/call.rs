//! What every server-side session reports and accepts, whatever its protocol.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::{Close, Digit, DtmfDuration, EndReason, Error, Frame, Output};

/// Something the owner of a server-side session must know. Emitted as
/// [`Output::Event`](crate::Output::Event).
#[derive(Debug, Clone, PartialEq)]
pub enum CallEvent {
    /// We answered the call (sent `answer` / `started`).
    Answered,
    /// Caller audio, exactly as received.
    Audio(Bytes),
    /// The caller pressed a key (protocol DTMF).
    Dtmf(Digit),
    /// The call ended; emitted exactly once. An inbound session may still wait for the CDR
    /// after this, so the connection may outlive the call.
    Ended(EndReason),
    /// The phone system's call detail record (inbound), kept verbatim.
    Cdr(CdrReport),
    /// The call ended and no CDR arrived within the wait (inbound).
    CdrMissing,
    /// A text message the protocol does not define, kept verbatim (never fatal mid-call).
    Unknown(String),
    /// The peer broke the protocol in a way the call survives; recorded.
    Violation(Error),
    /// Twilio returned the mark numbered so (placed with `Session::handle_mark`): the audio
    /// sent before it has played to the caller.
    MarkPlayed(u64),
}

/// A CDR as received: its exact text, plus what is wrong with it if it does not match the
/// documented shape (it is stored either way: a record is never dropped for being odd).
#[derive(Debug, Clone, PartialEq)]
pub struct CdrReport {
    /// The whole `cdr` message, byte for byte as sent.
    pub raw: String,
    /// Why it does not parse as a documented CDR, if it does not.
    pub problem: Option<Error>,
}

/// What the owner asks a server-side session to do (from the agent or an operator).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Answer the call.
    Answer,
    /// Send audio to the caller (played as it arrives).
    Audio(Bytes),
    /// Play a DTMF tone to the caller (inbound only).
    Dtmf {
        /// The key; must be sendable (`0-9 * #`).
        digit: Digit,
        /// How long the tone lasts.
        duration: DtmfDuration,
    },
    /// End the call, for this reason.
    Hangup(EndReason),
}

/// How the peer's side of the connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The peer sent a close frame.
    Closed,
    /// The connection dropped without a close frame.
    Dropped,
    /// A write to the peer timed out: it stopped reading, so the connection was dropped.
    SendTimeout,
}

impl Disconnect {
    /// The end reason when the peer's disconnect ends a live call.
    pub(crate) fn end_reason(self) -> EndReason {
        match self {
            Self::Closed => EndReason::PeerClosed,
            Self::Dropped => EndReason::PeerDisconnected,
            Self::SendTimeout => EndReason::SendTimeout,
        }
    }
}

/// Something a phone-side session reports to its owner (simulator, load generator, tests).
#[derive(Debug, Clone, PartialEq)]
pub enum PhoneEvent {
    /// The server answered (`answer` / `started`).
    Answered,
    /// Audio from the server.
    Audio(Bytes),
    /// The server asked for a DTMF tone (inbound).
    Dtmf {
        /// The key.
        digit: Digit,
        /// The tone's length.
        duration: DtmfDuration,
    },
    /// The server hung up (inbound `hangup`).
    Hangup,
    /// A text message the protocol does not define.
    Unknown(String),
    /// The server broke the protocol.
    Violation(Error),
    /// The connection ended.
    Closed(Disconnect),
}

/// What both protocols' phone sides share: the output queue and the state of the connection.
#[derive(Debug)]
pub(crate) struct PhoneCore {
    answered: bool,
    /// We closed (or sent the CDR): nothing more is sent.
    done_sending: bool,
    /// The connection ended and that was reported.
    gone: bool,
    out: VecDeque<Output<PhoneEvent>>,
}

impl PhoneCore {
    /// A phone whose first message is `first`.
    pub(crate) fn new(first: String) -> Self {
        let mut out = VecDeque::new();
        out.push_back(Output::Send(Frame::Text(first)));
        Self {
            answered: false,
            done_sending: false,
            gone: false,
            out,
        }
    }

    /// Records the server's answer; returns false if it had already answered.
    pub(crate) fn answer(&mut self) -> bool {
        !std::mem::replace(&mut self.answered, true)
    }

    pub(crate) fn is_answered(&self) -> bool {
        self.answered
    }

    pub(crate) fn event(&mut self, event: PhoneEvent) {
        self.out.push_back(Output::Event(event));
    }

    /// Queues a frame, unless we are done sending.
    pub(crate) fn send(&mut self, frame: Frame) {
        if !self.done_sending {
            self.out.push_back(Output::Send(frame));
        }
    }

    /// Closes (once); nothing is sent after.
    pub(crate) fn close(&mut self, close: Close) {
        if !self.done_sending {
            self.done_sending = true;
            self.out.push_back(Output::Close(close));
        }
    }

    /// The server closed or the connection dropped (reported once).
    pub(crate) fn peer_close(&mut self, how: Disconnect) {
        if !self.gone {
            self.gone = true;
            self.done_sending = true;
            self.event(PhoneEvent::Closed(how));
        }
    }

    pub(crate) fn poll_output(&mut self) -> Option<Output<PhoneEvent>> {
        self.out.pop_front()
    }
}
