//! Operator actions forwarded to the node that holds the call: nodes in this process on one
//! PostgreSQL database (`CALLGATE_TEST_PG`, a schema of the test's own; SKIPPED otherwise).
//! DTMF, play, clear, hangup and the recording through the other node; the owner refuses a
//! wrong secret; a node without a secret, an owner that does not answer and a dead owner are
//! clear JSON errors naming the node; a forwarded request is never forwarded again.

use std::time::Duration;

use callgate_server::auth::ClusterSecret;
use callgate_server::forward::{FORWARDED_BY, NODE_HEADER, TOKEN_HEADER};
use callgate_store::{CallId, NewCall, NodeInfo, NodeState, PgUrl, Registry, Store, UnixMillis};
use callgate_testkit::pg::Schema;
use callgate_testkit::{TestServer, incoming_call, spawn_server};
use serde_json::{Value, json};

const SECRET: &str = "forward-test-secret-0123456789abcdef";

/// A node on the schema, with `secret` (None: no cluster secret) and recording on.
async fn node(url: &PgUrl, id: &str, secret: Option<&str>) -> TestServer {
    let (url, id) = (url.clone(), id.to_owned());
    let secret = secret.map(|s| ClusterSecret::new(s).expect("secret"));
    spawn_server(move |c| {
        c.store_url = Some(url);
        c.node_id = id;
        // Long: the fake nodes of these tests stay "serving" as long as they need.
        c.node_timeout = Duration::from_secs(120);
        c.cluster_secret = secret;
        c.record = true;
    })
    .await
}

/// An HTTP client that shows headers (the testkit's does not).
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().expect("client")
}

/// `method path` on `server` with `body` and extra `headers`: status, headers, body bytes.
async fn send(
    server: &TestServer,
    method: &str,
    path: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut request = client()
        .request(
            method.parse().expect("method"),
            format!("http://{}{path}", server.admin_addr),
        )
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let answer = request.send().await.expect("answer");
    let status = answer.status().as_u16();
    let headers = answer.headers().clone();
    let body = answer.bytes().await.expect("body").to_vec();
    (status, headers, body)
}

/// `callgate_admin_forwarded_total{result}` of `server`.
fn forwarded(server: &TestServer, result: &'static str) -> u64 {
    server
        .metrics
        .admin_forwarded
        .get_or_create(&[("result", result)])
        .get()
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|_| json!(String::from_utf8_lossy(body)))
}

/// A WAV of `ms` milliseconds of a quiet tone at 8 kHz.
fn wav(ms: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::new(&mut out, spec).expect("wav");
    for i in 0..(8 * ms) {
        w.write_sample(if i % 16 < 8 { 800i16 } else { -800 })
            .expect("sample");
    }
    w.finalize().expect("wav");
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_on_another_nodes_call_are_forwarded_and_answered_as_if_local() {
    let Some(schema) = Schema::new("forward") else {
        return;
    };
    let url = PgUrl::parse(&schema.url, None).expect("url");
    let a = node(&url, "node-a", Some(SECRET)).await;
    let b = node(&url, "node-b", Some(SECRET)).await;

    let mut phone = a.phone("/").await;
    phone.text(incoming_call("forwarded")).await;
    assert_eq!(phone.recv_json().await["event"], "answer");
    // A's writer commits the record; B reads it from the shared database.
    let listed = a
        .until_stored(
            "the call listed live on node-a, read through B",
            async || {
                let (status, body) = b.get("/api/calls?live=true&node=node-a").await;
                (status == 200 && body["calls"].as_array().is_some_and(|c| c.len() == 1))
                    .then_some(body)
            },
        )
        .await;
    let id = listed["calls"][0]["id"].as_str().expect("id").to_owned();

    // DTMF through B reaches A's phone; the answer is A's, marked with who gave it.
    let (status, headers, body) = send(
        &b,
        "POST",
        &format!("/api/calls/{id}/dtmf"),
        br#"{"digit":"7","duration":120}"#.to_vec(),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(status, 200, "{}", json_of(&body));
    assert_eq!(json_of(&body)["status"], "dtmf_sent");
    assert_eq!(headers[NODE_HEADER], "node-a");
    assert_eq!(
        phone.recv().await.json(),
        json!({"event": "dtmf", "digit": "7", "duration": 120})
    );
    // A bad request is A's own 422, relayed as it is.
    let (status, headers, body) = send(
        &b,
        "POST",
        &format!("/api/calls/{id}/dtmf"),
        br#"{"digit":"x"}"#.to_vec(),
        &[],
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(json_of(&body)["code"], "invalid_digit");
    assert_eq!(headers[NODE_HEADER], "node-a");

    // Play, then clear: the body (a WAV) goes along; the answers are A's.
    let (status, _, body) = send(
        &b,
        "POST",
        &format!("/api/calls/{id}/play"),
        wav(3000),
        &[("content-type", "audio/wav")],
    )
    .await;
    assert_eq!(status, 200, "{}", json_of(&body));
    assert!(
        json_of(&body)["queued_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0)
    );
    let (status, _, body) = send(&b, "POST", &format!("/api/calls/{id}/clear"), vec![], &[]).await;
    assert_eq!(status, 200, "{}", json_of(&body));
    assert!(json_of(&body)["dropped_ms"].is_u64());

    // A forwarded request is never forwarded again: B, asked with the secret, answers for
    // itself (it does not hold the call), not by asking A.
    let (status, headers, body) = send(
        &b,
        "POST",
        &format!("/api/calls/{id}/clear"),
        vec![],
        &[(TOKEN_HEADER, SECRET), (FORWARDED_BY, "node-x")],
    )
    .await;
    assert_eq!(status, 409, "{}", json_of(&body));
    assert_eq!(json_of(&body)["code"], "call_not_live");
    assert!(headers.get(NODE_HEADER).is_none());

    // The owner refuses a wrong secret, whatever its admin tokens (here none: open).
    let (status, _, body) = send(
        &a,
        "POST",
        &format!("/api/calls/{id}/hangup"),
        vec![],
        &[(TOKEN_HEADER, "forward-test-secret-0123456789abcdeX")],
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(json_of(&body)["code"], "cluster_token_refused");
    // A node with another secret is refused by the owner: a 502 naming it.
    let c = node(&url, "node-c", Some("another-secret-0123456789abcdef-xyz")).await;
    let (status, _, body) = send(&c, "POST", &format!("/api/calls/{id}/hangup"), vec![], &[]).await;
    assert_eq!(status, 502, "{}", json_of(&body));
    assert_eq!(json_of(&body)["code"], "cluster_token_refused");
    assert_eq!(json_of(&body)["node"], "node-a");
    // A node without a secret says where the call is.
    let d = node(&url, "node-d", None).await;
    let (status, _, body) = send(&d, "POST", &format!("/api/calls/{id}/hangup"), vec![], &[]).await;
    assert_eq!(status, 421, "{}", json_of(&body));
    let body = json_of(&body);
    assert_eq!(body["code"], "call_on_other_node");
    assert_eq!(body["node"], "node-a");
    assert_eq!(body["admin_url"], format!("http://{}", a.admin_addr));
    assert_eq!(forwarded(&c, "token_refused"), 1);
    assert_eq!(forwarded(&d, "no_secret"), 1);
    // None of them touched the call.
    let (_, record) = a.get(&format!("/api/calls/{id}")).await;
    assert!(record["ended_at"].is_null(), "{record}");

    // Hang up through B: the call ends on A as an operator's hangup.
    let (status, _, body) = send(&b, "POST", &format!("/api/calls/{id}/hangup"), vec![], &[]).await;
    assert_eq!(status, 200, "{}", json_of(&body));
    assert_eq!(json_of(&body)["status"], "hangup_sent");
    // (Audio of the play may come first.)
    loop {
        match phone.recv().await {
            callgate_testkit::Received::Binary(_) => {}
            other => {
                assert_eq!(other.json(), json!({"event": "hangup"}));
                break;
            }
        }
    }
    let ended = a
        .until_stored("the end of the call, read through B", async || {
            let (status, r) = b.get(&format!("/api/calls/{id}")).await;
            (status == 200 && !r["ended_at"].is_null()).then_some(r)
        })
        .await;
    assert_eq!(ended["end_reason"], "operator_hangup");
    assert_eq!(ended["hangup_by"], "operator");
    // Ended: B answers itself, without asking A.
    let (status, headers, body) =
        send(&b, "POST", &format!("/api/calls/{id}/hangup"), vec![], &[]).await;
    assert_eq!(status, 409, "{}", json_of(&body));
    assert!(headers.get(NODE_HEADER).is_none());

    // The recording lives on A; B serves it through A, byte for byte.
    let (own, mut at_a) = (format!("/api/calls/{id}/recording"), (0, Vec::new()));
    for _ in 0..1500 {
        let (status, _, body) = send(&a, "GET", &own, vec![], &[]).await;
        at_a = (status, body);
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(at_a.0, 200, "A serves its recording");
    assert!(at_a.1.starts_with(b"RIFF"));
    let (status, headers, body) = send(&b, "GET", &own, vec![], &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "audio/wav");
    assert_eq!(headers[NODE_HEADER], "node-a");
    assert_eq!(body, at_a.1);
    // A byte range (the console's player seeks with one): B passes it on, relays A's 206.
    let (status, headers, body) = send(&b, "GET", &own, vec![], &[("range", "bytes=4-11")]).await;
    assert_eq!(status, 206);
    assert_eq!(
        headers["content-range"],
        format!("bytes 4-11/{}", at_a.1.len()).as_str()
    );
    assert_eq!(headers["accept-ranges"], "bytes");
    assert_eq!(body, at_a.1[4..12]);
    // A message that is not there: A's 404, relayed.
    let (status, _, body) = send(
        &b,
        "GET",
        &format!("/api/calls/{id}/messages/voicemail.wav"),
        vec![],
        &[],
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(json_of(&body)["code"], "no_message");
    // DTMF, the refused DTMF, play, clear, hangup, the recording, its range, the message: the
    // loop-guarded clear and the ended call's hangup were answered by B itself.
    assert_eq!(
        forwarded(&b, "relayed"),
        8,
        "B counts each request it relayed"
    );
    assert_eq!(forwarded(&a, "relayed"), 0, "A forwarded nothing");

    for n in [a, b, c, d] {
        n.shutdown().await;
    }
    drop(schema);
}

/// Registers `id` in the roster with a heartbeat at `at` and an open call on it.
fn fake_node(url: &PgUrl, id: &str, admin_url: &str, at: UnixMillis, recording: bool) -> CallId {
    let (url, id, admin_url) = (url.clone(), id.to_owned(), admin_url.to_owned());
    std::thread::spawn(move || {
        let mut roster = Registry::postgres(url.clone());
        let info = NodeInfo {
            id: id.clone(),
            admin_url,
            version: "0".into(),
            incarnation: "1".into(),
        };
        roster.beat(&info, NodeState::Serving, 1, at).expect("beat");
        let dir = std::env::temp_dir().join(format!("callgate-fake-{}", uuid::Uuid::now_v7()));
        let mut store = callgate_store::PgStore::open(&url, &dir).expect("store");
        let call = CallId::new();
        store
            .insert_call(&NewCall {
                id: call.clone(),
                protocol: "inbound".into(),
                caller: "1".into(),
                callee: "2".into(),
                external_id: format!("held-by-{id}"),
                call_config: None,
                phone_output_audio_format: "PCM_8000".into(),
                phone_input_audio_format: "PCM_8000".into(),
                started_at: at,
                recording,
                route: None,
                agent: None,
                key_name: None,
                node: Some(id),
            })
            .expect("insert");
        drop(store);
        roster.disconnect();
        let _ = std::fs::remove_dir_all(dir);
        call
    })
    .join()
    .expect("fake node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_does_not_answer_or_is_dead_is_a_502_naming_it() {
    let Some(schema) = Schema::new("forward_unreachable") else {
        return;
    };
    let url = PgUrl::parse(&schema.url, None).expect("url");
    let b = node(&url, "node-b", Some(SECRET)).await;
    // A port nobody listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let gone = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let now = UnixMillis::now();
    let silent = fake_node(&url, "silent", &gone, now, false);
    let (status, _, body) = send(
        &b,
        "POST",
        &format!("/api/calls/{silent}/hangup"),
        vec![],
        &[],
    )
    .await;
    assert_eq!(status, 502, "{}", json_of(&body));
    let body = json_of(&body);
    assert_eq!(body["code"], "node_unreachable");
    assert_eq!(body["node"], "silent");
    assert_eq!(body["admin_url"], gone);

    // A node whose heartbeat lapsed long ago is dead: not even tried. (Its call is closed by
    // B's sweep sooner or later; its recording is still only on it.)
    let dead = fake_node(&url, "dead", &gone, UnixMillis(now.0 - 10 * 60_000), true);
    let (status, _, body) = send(
        &b,
        "GET",
        &format!("/api/calls/{dead}/recording"),
        vec![],
        &[],
    )
    .await;
    assert_eq!(status, 502, "{}", json_of(&body));
    let body = json_of(&body);
    assert_eq!(body["code"], "node_unreachable");
    assert_eq!(body["node"], "dead");
    assert_eq!(body["state"], "dead");
    assert_eq!(forwarded(&b, "unreachable"), 2);
    assert_eq!(forwarded(&b, "relayed"), 0);
    b.shutdown().await;
    drop(schema);
}
