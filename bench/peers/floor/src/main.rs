//! The benchmark floor: the least a server can do for the inbound flow with the same WebSocket
//! library and the same 4 KiB read buffer callgate uses. `answer` on `incoming_call`, echo every
//! binary message, close after the `cdr`. No records, no agent, no validation.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:4150".into());
    let listener = TcpListener::bind(&addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(async move {
            let config = WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0);
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
            else {
                return;
            };
            while let Some(Ok(message)) = ws.next().await {
                match message {
                    Message::Binary(b) => {
                        if ws.send(Message::Binary(b)).await.is_err() {
                            return;
                        }
                    }
                    Message::Text(t) if t.contains("\"incoming_call\"") => {
                        let _ = ws.send(Message::Text(r#"{"event":"answer"}"#.into())).await;
                    }
                    Message::Text(t) if t.contains("\"cdr\"") => {
                        let _ = ws.close(None).await;
                    }
                    Message::Close(_) => return,
                    _ => {}
                }
            }
        });
    }
}
