//! Item 11: the peer gets the close frame, not a reset.

use callgate_server::Tasks;
use callgate_testkit::callbridge_start;
use callgate_testkit::phone::WAIT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::raw::*;
use super::support::*;

/// Item 11: after a 1009/1007 close the connection used to be reset at once while the peer
/// was still sending, so the peer could see ECONNRESET instead of the close frame. Now the
/// server sends its close, then reads (and discards) what the peer still sends, for a bounded
/// time and amount, so the peer gets the close and a clean end of stream.
#[tokio::test]
async fn the_peer_gets_the_close_frame_not_a_reset() {
    let mut rig = Rig::start("item 11: the close frame, not a reset", |c| {
        c.max_message_size = 4096
    })
    .await;
    let canary = rig.canary().await;
    let server = &rig.server;
    let start = client_frame(1, callbridge_start("raw").as_bytes());
    let oversized = |opcode| {
        let mut b = frame_header(opcode, 4 << 20);
        b.extend(std::iter::repeat_n(0u8, 4 << 20));
        b
    };
    let mut bad_text_then_audio = client_frame(1, &[0xff, 0xfe, 0xfd]);
    for _ in 0..10_000 {
        bad_text_then_audio.extend_from_slice(&client_frame(2, &[0u8; 320]));
    }
    let cases: [(&str, Vec<u8>, Vec<u8>, u16); 3] = [
        ("4 MiB first message", Vec::new(), oversized(1), 1009),
        ("4 MiB message mid-call", start.clone(), oversized(2), 1009),
        (
            "invalid UTF-8 mid-call, then 3 MB of audio",
            start.clone(),
            bad_text_then_audio,
            1007,
        ),
    ];
    let mut failures = Vec::new();
    for (name, before, attack, expected) in cases {
        let mut stream = connect_from(server, ATTACKER).await.unwrap();
        raw_upgrade(&mut stream).await;
        let (mut r, mut w) = stream.into_split();
        if !before.is_empty() {
            w.write_all(&before).await.unwrap();
            // The `started` reply (after any ping) before the attack.
            while read_frame(&mut r).await.unwrap().0 != 1 {}
        }
        // The phone keeps writing the whole message while it reads.
        let writer = Tasks::new().spawn(async move {
            let mut result = Ok(());
            for chunk in attack.chunks(16 * 1024) {
                if let Err(e) = w.write_all(chunk).await {
                    result = Err(e.kind());
                    break;
                }
            }
            (result, w)
        });
        let close = tokio::time::timeout(WAIT, read_close(&mut r))
            .await
            .unwrap();
        // After the close frame: a clean end of stream (FIN), not a reset.
        let mut rest = Vec::new();
        let end = tokio::time::timeout(WAIT, r.read_to_end(&mut rest))
            .await
            .unwrap()
            .map_err(|e| e.kind());
        let (written, mut w) = writer.await.unwrap();
        let _ = w.shutdown().await;
        rig.figure(
            name,
            format!("close {close:?}, then {end:?}; the phone's writes: {written:?}"),
        );
        if close.as_ref().ok() != Some(&expected) || end.is_err() || written.is_err() {
            failures.push(name);
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    rig.finish(canary).await;
}
