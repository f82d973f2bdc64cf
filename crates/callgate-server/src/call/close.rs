//! The end of a call's connection: a close frame, then a bounded linger so that the peer
//! reads it rather than a reset.

use std::time::Duration;

use callgate_proto::Close;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;

use super::Ws;

/// How long a closing connection is read after our close frame, so the peer gets the close
/// (dropping a socket with unread data makes the kernel send a reset that can destroy it).
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// The most bytes read and discarded from a closing connection (the rest of an oversized
/// message, audio sent before the peer saw the close) before it is dropped anyway.
const CLOSE_DRAIN_MAX: usize = 16 << 20;

/// Sends a close frame (bounded by `write_timeout`), then lingers at most [`CLOSE_LINGER`]
/// so that the peer gets it: reads through the WebSocket until it can read no more (the
/// peer's close arrived, or an earlier read error ended it, as the rest of an oversized
/// message does), then ends our side of the TCP stream (FIN) and reads and discards whatever
/// the peer still sends, at most [`CLOSE_DRAIN_MAX`] bytes, until it closes too. Dropping a
/// socket with unread data makes the kernel send a reset, which can reach the peer before it
/// has read the close frame (it then sees ECONNRESET, often on a write, and never the close).
pub(super) async fn close(ws: &mut Ws, close: Close, write_timeout: Duration) {
    let frame = CloseFrame {
        code: WsCloseCode::from(close.code.0),
        reason: close.reason.into(),
    };
    if timeout(write_timeout, ws.close(Some(frame))).await.is_err() {
        // The peer does not read: no close frame to save.
        return;
    }
    let _ = timeout(CLOSE_LINGER, async {
        while let Some(Ok(_)) = ws.next().await {}
        let stream = ws.get_mut();
        let _ = stream.shutdown().await;
        let mut scratch = vec![0u8; 16 * 1024];
        let mut drained = 0;
        while drained < CLOSE_DRAIN_MAX {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}
