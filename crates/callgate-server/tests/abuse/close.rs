//! Item 11: the peer gets the close frame, not a reset.

use callgate_server::Tasks;
use callgate_testkit::phone::WAIT;
use callgate_testkit::{callbridge_start, spawn_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

use super::support::*;

/// A client frame header (masked with a zero key, so the payload goes as is).
fn frame_header(opcode: u8, len: usize) -> Vec<u8> {
    let mut h = vec![0x80 | opcode];
    if len < 126 {
        h.push(0x80 | len as u8);
    } else if len <= 0xffff {
        h.push(0x80 | 126);
        h.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        h.push(0x80 | 127);
        h.extend_from_slice(&(len as u64).to_be_bytes());
    }
    h.extend_from_slice(&[0, 0, 0, 0]);
    h
}

fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = frame_header(opcode, payload.len());
    f.extend_from_slice(payload);
    f
}

/// Upgrades a raw TCP connection by hand, reading exactly the server's response.
async fn raw_upgrade(stream: &mut TcpStream) {
    stream
        .write_all(
            b"GET / HTTP/1.1\r\nHost: callgate\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("the upgrade request is written");
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        assert!(response.len() < 4096);
        let mut byte = [0u8];
        stream
            .read_exact(&mut byte)
            .await
            .expect("the upgrade response");
        response.push(byte[0]);
    }
    assert!(response.starts_with(b"HTTP/1.1 101"));
}

/// Reads one server frame: its opcode and payload.
async fn read_frame(r: &mut OwnedReadHalf) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h).await?;
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        len = u64::from(r.read_u16().await?);
    } else if len == 127 {
        len = r.read_u64().await?;
    }
    assert!(len < 1 << 20, "a server frame of {len} bytes");
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    Ok((h[0] & 0x0f, payload))
}

/// Reads server frames until a close: its code. `Err` if the connection failed first.
async fn read_close(r: &mut OwnedReadHalf) -> std::io::Result<u16> {
    loop {
        let (opcode, payload) = read_frame(r).await?;
        if opcode == 8 {
            return Ok(u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

/// Item 11: after a 1009/1007 close the connection used to be reset at once while the peer
/// was still sending, so the peer could see ECONNRESET instead of the close frame. Now the
/// server sends its close, then reads (and discards) what the peer still sends, for a bounded
/// time and amount, so the peer gets the close and a clean end of stream.
#[tokio::test]
async fn the_peer_gets_the_close_frame_not_a_reset() {
    let server = spawn_server(|c| c.max_message_size = 4096).await;
    let mut canary = Canary::start(&server, "canary-close").await;
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
        let mut stream = connect_from(&server, ATTACKER).await.unwrap();
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
        eprintln!("figure: {name}: close {close:?}, then {end:?}; the phone's writes: {written:?}");
        if close.as_ref().ok() != Some(&expected) || end.is_err() || written.is_err() {
            failures.push(name);
        }
        canary.echo().await;
    }
    assert!(failures.is_empty(), "{failures:?}");
    canary.end(&server).await;
    server.shutdown().await;
}
