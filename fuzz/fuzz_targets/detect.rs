//! Any text as a first message, with and without a protocol forced by the path.
#![no_main]

use callgate_proto::{detect, Protocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for forced in [None, Some(Protocol::CallBridge), Some(Protocol::Inbound)] {
        if let Err(e) = detect::first_message(&text, forced) {
            let _ = (e.close_code(), e.kind(), e.to_string());
        }
    }
});
