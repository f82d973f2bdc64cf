//! An inbound session driven by arbitrary input: the first line is the incoming_call, every
//! further line one input (text, or a control byte selecting audio, commands, time, close).
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate_proto::{inbound, Command, Digit, Disconnect, DtmfDuration, EndReason, Output};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let Ok(call) = inbound::IncomingCall::parse(lines.next().unwrap_or_default()) else {
        return;
    };
    let t0 = Instant::now();
    let config = inbound::Config { cdr_timeout: Duration::from_millis(500) };
    let mut s = inbound::Session::new(t0, call, config);
    let mut clock = 0u64;
    let mut closed = false;
    for line in lines {
        let now = t0 + Duration::from_millis(clock);
        match line.as_bytes().first() {
            Some(b'\x01') => s.handle_binary(now, Bytes::copy_from_slice(line.as_bytes())),
            Some(b'\x02') => { let _ = s.handle_command(now, Command::Answer); }
            Some(b'\x03') => {
                let digit = Digit::from_char(line.chars().nth(1).unwrap_or('1'));
                if let (Some(digit), Some(duration)) = (digit, DtmfDuration::from_millis(100)) {
                    let _ = s.handle_command(now, Command::Dtmf { digit, duration });
                }
            }
            Some(b'\x04') => { let _ = s.handle_command(now, Command::Hangup(EndReason::AgentHangup)); }
            Some(b'\x05') => s.handle_peer_close(now, Disconnect::Closed),
            Some(b'\x06') => s.handle_shutdown(now),
            Some(b'\x07') => {
                clock += 250;
                s.handle_timeout(t0 + Duration::from_millis(clock));
            }
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
