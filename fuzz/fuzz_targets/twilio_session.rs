//! A Twilio Media Streams handshake and session driven by arbitrary input: lines go to the
//! handshake until it starts a call, then every further line is one input (text, or a control
//! byte selecting audio, commands, marks, clears, close).
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate_proto::detect::{Handshake, Start};
use callgate_proto::{twilio, Command, Disconnect, EndReason, Error, Output};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let mut handshake = Handshake::new(None);
    let start = loop {
        let Some(line) = lines.next() else { return };
        match handshake.handle_text(line) {
            Ok(None) => continue,
            Ok(Some(Start::Twilio(s))) => break s,
            Ok(Some(_)) | Err(_) => return,
        }
    };
    let t0 = Instant::now();
    let mut s = twilio::Session::new(t0, start);
    let mut closed = false;
    for (i, line) in lines.enumerate() {
        let now = t0 + Duration::from_millis(i as u64 * 20);
        match line.as_bytes().first() {
            Some(b'\x01') => s.handle_binary(now, Bytes::copy_from_slice(line.as_bytes())),
            Some(b'\x02') => { let _ = s.handle_command(now, Command::Answer); }
            Some(b'\x03') => { let _ = s.handle_command(now, Command::Audio(Bytes::from_static(b"ab"))); }
            Some(b'\x04') => { let _ = s.handle_command(now, Command::Hangup(EndReason::AgentHangup)); }
            Some(b'\x05') => s.handle_peer_close(now, Disconnect::Dropped),
            Some(b'\x06') => s.handle_shutdown(now),
            Some(b'\x07') => s.handle_violation(now, Error::MessageTooBig { max: 1 }),
            Some(b'\x08') => { let _ = s.handle_mark(now); }
            Some(b'\x09') => s.handle_clear(now),
            _ => s.handle_text(now, line),
        }
        while let Some(o) = s.poll_output() {
            assert!(!closed, "output after close");
            if let Output::Close(_) = o {
                closed = true;
            }
        }
    }
});
