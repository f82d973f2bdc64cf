//! WebSocket frames written and read by hand, for attacks no client library would make.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

/// A client frame header (masked with a zero key, so the payload goes as is).
pub(crate) fn frame_header(opcode: u8, len: usize) -> Vec<u8> {
    fragment_header(true, opcode, len)
}

/// A client frame header, `fin` or not (a fragment of a message, opcode 0 for continuations).
pub(crate) fn fragment_header(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
    let mut h = vec![if fin { 0x80 } else { 0 } | opcode];
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

pub(crate) fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = frame_header(opcode, payload.len());
    f.extend_from_slice(payload);
    f
}

/// Upgrades a raw TCP connection by hand, reading exactly the server's response.
pub(crate) async fn raw_upgrade(stream: &mut TcpStream) {
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
pub(crate) async fn read_frame(r: &mut OwnedReadHalf) -> std::io::Result<(u8, Vec<u8>)> {
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
pub(crate) async fn read_close(r: &mut OwnedReadHalf) -> std::io::Result<u16> {
    loop {
        let (opcode, payload) = read_frame(r).await?;
        if opcode == 8 {
            return Ok(u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}
