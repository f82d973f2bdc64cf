//! A CallBridge session driven by arbitrary input: the first line is the start message, every
//! further line one input (text, or a control byte selecting audio, commands, time, close).
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate_proto::{callbridge, Command, Disconnect, EndReason, Error, Output};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let Ok(start) = callbridge::Start::parse(lines.next().unwrap_or_default()) else {
        return;
    };
    let t0 = Instant::now();
    let mut s = callbridge::Session::new(t0, start);
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
