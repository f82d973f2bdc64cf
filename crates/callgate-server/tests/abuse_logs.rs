//! Item 4 of issue 10: text from the wire in logs. A test binary of its own: it installs the
//! process's subscriber (the server runs on threads of its own, see `abuse/support.rs`).

#[allow(
    dead_code,
    reason = "this binary uses part of the abuse tests' support"
)]
#[path = "abuse/support.rs"]
mod support;

use std::sync::{Arc, Mutex};

use callgate_testkit::callbridge_start;
use callgate_testkit::phone::WAIT;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use support::*;

/// Captures what the server logs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// Item 4: text from the wire used to be logged raw (a newline in `sessionId` forged a log
/// line, ANSI codes reached terminals) and unbounded (a 1 MB `callerId` became a 1 MB line of
/// `*` that told the number's length). Now it is escaped, bounded, and redaction has a fixed
/// width.
#[tokio::test]
async fn text_from_the_wire_is_escaped_and_bounded_in_logs() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    let mut rig = Rig::start("item 4: text from the wire in logs", |_| {}).await;
    let canary = rig.canary().await;
    let server = &rig.server;

    let forged = "evil\n2026-11-22T00:00:00.000000Z ERROR FORGED: operator action needed\u{1b}[2J";
    let long_caller = format!("{}88", "0".repeat(500_000));
    let attacks = [
        // A forged line in sessionId, a huge caller number.
        json!({"event": "incoming_call", "callerId": long_caller, "didNumber": "0212345678", "sessionId": forged}),
        // A forged line in cdrId.
        serde_json::from_str(
            &callbridge_start("x").replace("\"x\"", &serde_json::to_string(forged).unwrap()),
        )
        .unwrap(),
        // A forged line and 100 KB in a refusal reason.
        json!({"event": format!("{forged}{}", "e".repeat(100_000))}),
        // A forged line in a CallBridge agentId no route takes is refused with a reason
        // naming it; here with the default route it is simply a call.
        serde_json::from_str(
            &callbridge_start("y").replace("agent-main", "agent\\nFORGED\\u001b[31m"),
        )
        .unwrap(),
    ];
    for attack in attacks {
        let mut ws = ws_from(server, ATTACKER, "/").await.unwrap();
        ws.send(Message::Text(attack.to_string().into()))
            .await
            .unwrap();
        let _ = tokio::time::timeout(WAIT, ws.next()).await;
        let _ = ws.close(None).await;
        let _ = close_of(&mut ws).await;
    }
    // A short caller number, to compare its redaction with the long one's.
    let mut short = place_call(server, CALLER, "short").await.unwrap();
    short.close(None).await.unwrap();
    let _ = close_of(&mut short).await;
    server.ended_call("short").await;

    // What was logged of the attacks (the canary's end and the shutdown come after).
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let forged_lines = text.lines().filter(|l| l.contains("FORGED:")).count();
    let longest = text.lines().map(str::len).max().unwrap_or(0);
    let escapes = text.matches('\u{1b}').count();
    let callers: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Call started."))
        .filter_map(|l| l.split("caller=").nth(1)?.split(' ').next())
        .collect();
    // A line without its time, level and spans, cut to 200 characters.
    let shown = |l: &str| {
        let message = l
            .split_once("callgate_server::call: ")
            .map_or(l, |(_, m)| m);
        message.chars().take(200).collect::<String>()
    };
    for line in text
        .lines()
        .filter(|l| l.contains("callgate_server::call: "))
    {
        eprintln!("  log: {}", shown(line));
    }
    rig.figure("log lines", text.lines().count());
    rig.figure("longest line (bytes)", longest);
    rig.figure("raw ESC", escapes);
    rig.figure(
        "lines with the forged text (escaped, inside a line)",
        forged_lines,
    );
    rig.figure("callers as logged", callers.join(" "));
    rig.expect(
        !text
            .lines()
            .any(|l| l.starts_with("2026-11-22T00:00:00.000000Z")),
        "a forged line",
    );
    rig.expect(escapes == 0, "raw ANSI escapes reach the terminal");
    rig.expect(longest < 2048, format!("a log line of {longest} bytes"));
    // The 500,002-digit number and the 11-digit ones redact alike: no length is told.
    let ending_88: Vec<&&str> = callers.iter().filter(|c| c.ends_with("88")).collect();
    rig.expect(
        ending_88.len() >= 3
            && ending_88.iter().all(|c| c == &ending_88[0])
            && callers.iter().all(|c| c.len() <= 16),
        format!("callers: {callers:?}"),
    );
    rig.expect(text.contains("evil\\n2026"), "the id is not shown escaped");
    rig.finish(canary).await;
}
