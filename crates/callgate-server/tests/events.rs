//! The live event stream over real sockets: an HTTP client reads `GET /api/stream` while a
//! real call runs (started, answered, DTMF, a transcript turn, ended), resumes with
//! `Last-Event-ID`, is told when its id is too old, and needs the read role.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use callgate_agent::{AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun, Speaker, Turn};
use callgate_server::auth::{Role, Token};
use callgate_testkit::{TestServer, incoming_call, spawn_server_with_agent};
use serde_json::{Value, json};

/// Answers; for each key, writes a transcript turn; on `#`, hangs up.
struct Keys;

impl AgentFactory for Keys {
    fn name(&self) -> &str {
        "keys"
    }

    fn start(&self, mut io: AgentIo) -> AgentRun {
        Box::pin(async move {
            io.send(AgentCommand::Answer).await?;
            while let Some(event) = io.recv().await {
                match event {
                    AgentEvent::Dtmf(digit) if digit.as_char() == '#' => {
                        io.send(AgentCommand::Hangup).await?;
                    }
                    AgentEvent::Dtmf(digit) => {
                        let now = io.now_ms();
                        io.send(AgentCommand::Transcript(Box::new(Turn {
                            speaker: Speaker::Caller,
                            text: format!("pressed {}", digit.as_char()),
                            start_ms: now,
                            end_ms: now,
                            interrupted: false,
                        })))
                        .await?;
                    }
                    AgentEvent::Ended(_) => break,
                    _ => {}
                }
            }
            Ok(())
        })
    }
}

/// An HTTP client (rustls on ring, as the server's).
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// One server-sent event.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: String,
    data: Value,
}

/// Reads server-sent events from a streaming response (comments are skipped).
struct SseReader {
    response: reqwest::Response,
    buffer: String,
    ready: VecDeque<Sse>,
}

impl SseReader {
    async fn open(server: &TestServer, headers: &[(&str, &str)]) -> Self {
        let mut request = http().get(format!("http://{}/api/stream", server.admin_addr));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("the stream answers");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().expect("ASCII"),
            "text/event-stream"
        );
        Self {
            response,
            buffer: String::new(),
            ready: VecDeque::new(),
        }
    }

    /// The next event; `None` when the stream ends.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            let chunk = self.response.chunk().await.expect("stream readable")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                let data = serde_json::from_str(&data).expect("data is JSON");
                self.ready.push_back(Sse { event, id, data });
            }
        }
    }

    /// Events up to and including the first of type `last`.
    async fn until(&mut self, last: &str) -> Vec<Sse> {
        let mut got = Vec::new();
        loop {
            let e = self.next().await.expect("the stream goes on");
            let done = e.event == last;
            got.push(e);
            if done {
                return got;
            }
        }
    }
}

/// An inbound call that presses 4, 2 and # (the agent hangs up on #); returns when closed.
async fn call(server: &TestServer, session: &str) {
    let mut phone = server.phone("/").await;
    phone.text(incoming_call(session)).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    for digit in ["4", "2", "#"] {
        phone
            .text(format!(r#"{{"event":"dtmf","digit":"{digit}"}}"#))
            .await;
    }
    let _ = phone.recv().await; // the hangup
    phone.text(callgate_testkit::cdr(session)).await;
    phone.closed().await;
}

fn types(events: &[Sse]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

#[tokio::test]
async fn a_client_reads_a_real_call_as_it_happens_and_resumes_where_it_left() {
    let server = spawn_server_with_agent(Arc::new(Keys), |_| {}).await;
    let mut stream = SseReader::open(&server, &[]).await;
    call(&server, "sess-stream").await;
    let events = stream.until("call.ended").await;
    // Started, answered, then DTMF and transcript turns (a turn after its key), then ended.
    let t = types(&events);
    assert_eq!(t[..2], ["call.started", "call.answered"], "{events:?}");
    assert_eq!(t.last(), Some(&"call.ended"));
    let of = |kind: &str| -> Vec<&Sse> { events.iter().filter(|e| e.event == kind).collect() };
    let (dtmf, turns) = (of("call.dtmf"), of("call.transcript"));
    assert_eq!(events.len(), 2 + dtmf.len() + turns.len() + 1, "{t:?}");
    let record = server.ended_call("sess-stream").await;
    for e in &events {
        assert!(e.id.starts_with("msg_"), "{e:?}");
        assert_eq!(e.data["type"], e.event.as_str());
        assert!(e.data["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(e.data["data"]["call_id"], record["id"]);
        assert_eq!(e.data["data"]["external_id"], "sess-stream");
    }
    let first = &events[0].data["data"];
    assert_eq!(first["caller"], "01099998888");
    assert_eq!(first["protocol"], "inbound");
    let digits: Vec<&Value> = dtmf.iter().map(|e| &e.data["data"]["digit"]).collect();
    assert_eq!(digits, [&json!("4"), &json!("2"), &json!("#")]);
    let texts: Vec<&Value> = turns.iter().map(|e| &e.data["data"]["text"]).collect();
    assert_eq!(texts, [&json!("pressed 4"), &json!("pressed 2")]);
    assert_eq!(turns[0].data["data"]["speaker"], "caller");
    let at = |id: &str| events.iter().position(|e| e.id == id).unwrap();
    assert!(at(&turns[0].id) > at(&dtmf[0].id) && at(&turns[1].id) > at(&dtmf[1].id));
    let end = &events[events.len() - 1].data["data"];
    assert_eq!(end["reason"], record["end_reason"]);
    assert_eq!(end["reason"], "agent_hangup");
    assert_eq!(end["hangup_by"], "agent");
    let mut ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "ids are unique");

    // Resuming after the answer gives the rest of the call, in order.
    let mut resumed = SseReader::open(&server, &[("Last-Event-ID", &events[1].id)]).await;
    let again = resumed.until("call.ended").await;
    let expected: Vec<&str> = events[2..].iter().map(|e| e.id.as_str()).collect();
    let got: Vec<&str> = again.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(got, expected);

    // An id the hub does not hold: told so, then everything it holds.
    let mut lost = SseReader::open(&server, &[("Last-Event-ID", "msg_gone")]).await;
    let reset = lost.next().await.expect("an event");
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.data["last_event_id"], "msg_gone");
    let all = lost.until("call.ended").await;
    assert_eq!(all.len(), events.len());
    assert_eq!(all[0].id, events[0].id);

    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("callgate_events_published_total{type=\"call.dtmf\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("callgate_event_stream_clients 3"),
        "{metrics}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_stream_ends_after_the_last_event_of_a_shutdown() {
    let server = spawn_server_with_agent(Arc::new(Keys), |_| {}).await;
    let mut stream = SseReader::open(&server, &[]).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("sess-stop")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    assert_eq!(stream.until("call.answered").await.len(), 2);
    let read = async {
        let mut rest = Vec::new();
        while let Some(e) = stream.next().await {
            rest.push(e);
        }
        rest
    };
    // The inbound goodbye: a hangup, then the CDR the server waits for.
    let goodbye = async {
        let _ = phone.recv().await;
        phone.text(callgate_testkit::cdr("sess-stop")).await;
        phone.closed().await;
    };
    let (rest, (), ()) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(read, server.shutdown(), goodbye)
    })
    .await
    .expect("the stream ends and the server stops");
    // The stream ended by itself: the node stopping, then the call ended by the shutdown.
    let t = types(&rest);
    assert!(t.contains(&"node.stopping"), "{t:?}");
    let ended = rest
        .iter()
        .find(|e| e.event == "call.ended")
        .expect("the call's end is delivered before the stream ends");
    assert_eq!(ended.data["data"]["reason"], "server_shutdown");
}

#[tokio::test]
async fn the_stream_needs_the_read_role() {
    const SECRET: &str = "read-token-0123456789abcdef0123456789";
    let server = spawn_server_with_agent(Arc::new(Keys), |c| {
        c.admin_auth.tokens = vec![Token::from_secret("viewer", Role::Read, SECRET).unwrap()];
    })
    .await;
    let url = format!("http://{}/api/stream", server.admin_addr);
    let refused = http().get(&url).send().await.expect("answers");
    assert_eq!(refused.status(), 401);
    let bearer = format!("Bearer {SECRET}");
    let mut stream = SseReader::open(&server, &[("Authorization", &bearer)]).await;
    call(&server, "sess-auth").await;
    assert_eq!(stream.until("call.ended").await[0].event, "call.started");
    server.shutdown().await;
}
