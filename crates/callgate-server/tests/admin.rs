//! The admin API: records, operator actions on live calls, errors as JSON, metrics.

use callgate_testkit::{Received, callbridge_start, cdr, incoming_call, spawn_server};
use serde_json::json;

/// A well-formed call id (a UUIDv7) that names no call.
const UNKNOWN: &str = "0190a5d0-ac96-774b-bcce-b302099a8057";

#[tokio::test]
async fn operator_dtmf_and_hangup_reach_an_inbound_call() {
    let server = spawn_server(|_| {}).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("op")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    let live = server.call("op").await;
    assert!(live["ended_at"].is_null());
    let id = live["id"].as_str().unwrap().to_owned();

    let (status, body) = server
        .post(
            &format!("/api/calls/{id}/dtmf"),
            r#"{"digit":"7","duration":150}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        phone.recv().await.json(),
        json!({"event": "dtmf", "digit": "7", "duration": 150})
    );
    let (status, _) = server
        .post(&format!("/api/calls/{id}/dtmf"), r#"{"digit":"0"}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        phone.recv().await.json(),
        json!({"event": "dtmf", "digit": "0", "duration": 200})
    );

    for (body, code, message) in [
        (
            r#"{"digit":"A"}"#,
            "invalid_digit",
            "invalid DTMF digit \"A\" (allowed: 0-9 * #)",
        ),
        (
            r#"{"digit":"12"}"#,
            "invalid_digit",
            "invalid DTMF digit \"12\" (allowed: 0-9 * #)",
        ),
        (
            r#"{"digit":"1","duration":0}"#,
            "invalid_duration",
            "invalid DTMF duration 0 (must be a whole number of ms, 1..=1000)",
        ),
        (
            r#"{"digit":"1","duration":1001}"#,
            "invalid_duration",
            "invalid DTMF duration 1001 (must be a whole number of ms, 1..=1000)",
        ),
        (r#"{"duration":100}"#, "missing_field", "missing digit"),
    ] {
        let (status, err) = server.post(&format!("/api/calls/{id}/dtmf"), body).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(err, json!({"error": message, "code": code}));
    }
    let (status, err) = server.post(&format!("/api/calls/{id}/dtmf"), "{nope").await;
    assert_eq!(status, 400);
    assert_eq!(err["code"], "bad_json");

    let (status, body) = server.post(&format!("/api/calls/{id}/hangup"), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(phone.recv().await.json(), json!({"event": "hangup"}));
    phone.text(cdr("op")).await;
    assert_eq!(phone.closed().await.0, 1000);
    let record = server.ended_call("op").await;
    assert_eq!(record["end_reason"], "operator_hangup");
    assert_eq!(record["hangup_by"], "operator");
    assert!(record["cdr"].is_object());

    let (status, err) = server.post(&format!("/api/calls/{id}/hangup"), "").await;
    assert_eq!(status, 409);
    assert_eq!(err["code"], "call_not_live");
    server.shutdown().await;
}

#[tokio::test]
async fn callbridge_has_no_dtmf_and_operator_hangup_closes_1000() {
    let server = spawn_server(|_| {}).await;
    let mut phone = server.phone("/").await;
    phone.text(callbridge_start("cb-op")).await;
    phone.recv().await;
    let id = server.call("cb-op").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, err) = server
        .post(&format!("/api/calls/{id}/dtmf"), r#"{"digit":"1"}"#)
        .await;
    assert_eq!(status, 409);
    assert_eq!(
        err,
        json!({"error": "DTMF is not supported by the callbridge protocol", "code": "unsupported"})
    );
    let (status, _) = server.post(&format!("/api/calls/{id}/hangup"), "").await;
    assert_eq!(status, 200);
    assert_eq!(
        phone.closed().await,
        (1000, "call ended by operator".to_owned())
    );
    assert_eq!(
        server.ended_call("cb-op").await["end_reason"],
        "operator_hangup"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn errors_are_json_with_the_right_status() {
    let server = spawn_server(|_| {}).await;
    let (status, err) = server.get(&format!("/api/calls/{UNKNOWN}")).await;
    assert_eq!(status, 404);
    assert_eq!(
        err,
        json!({"error": format!("no call with id \"{UNKNOWN}\""), "code": "call_not_found"})
    );
    let (status, err) = server.get(&format!("/api/calls/{UNKNOWN}/events")).await;
    assert_eq!(status, 404);
    assert_eq!(err["code"], "call_not_found");
    let (status, err) = server
        .post(&format!("/api/calls/{UNKNOWN}/hangup"), "")
        .await;
    assert_eq!(status, 404);
    assert_eq!(err["code"], "call_not_found");
    for bad in ["0", "1001", "-1", "ten"] {
        let (status, err) = server.get(&format!("/api/calls?limit={bad}")).await;
        assert_eq!(status, 400);
        assert_eq!(err["code"], "bad_limit");
    }
    let (status, err) = server.get("/no/such/thing").await;
    assert_eq!(status, 404);
    assert_eq!(err["code"], "not_found");
    let (status, err) = server.post("/healthz", "").await;
    assert_eq!(status, 405);
    assert_eq!(err["code"], "method_not_allowed");
    let (status, health) = server.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(health, json!({"status": "ok", "live_calls": 0}));
    server.shutdown().await;
}

#[tokio::test]
async fn list_is_newest_first_and_limited_and_metrics_count_calls() {
    let server = spawn_server(|_| {}).await;
    for n in 0..3 {
        let mut phone = server.phone("/").await;
        phone.text(incoming_call(&format!("list-{n}"))).await;
        phone.recv().await;
        phone.binary(vec![1u8; 320]).await;
        assert!(matches!(phone.recv().await, Received::Binary(_)));
        phone.text(r#"{"event":"hangup"}"#).await;
        phone.text(cdr(&format!("list-{n}"))).await;
        phone.closed().await;
    }
    let calls = server.calls().await;
    let ids: Vec<&str> = calls
        .iter()
        .map(|c| c["external_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["list-2", "list-1", "list-0"]);
    let (_, two) = server.get("/api/calls?limit=2").await;
    assert_eq!(two["calls"].as_array().unwrap().len(), 2);

    let metrics = server.metrics_text().await;
    for line in [
        r#"callgate_calls_started_total{protocol="inbound"} 3"#,
        r#"callgate_calls_ended_total{protocol="inbound",end_reason="peer_hangup"} 3"#,
        r#"callgate_audio_bytes_total{direction="in"} 960"#,
        r#"callgate_audio_frames_total{direction="out"} 3"#,
        "callgate_calls_live 0",
        "callgate_call_duration_seconds_count 3",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    server.shutdown().await;
}

/// Sends a request head and `body_len` zero bytes to the admin API and returns the response's
/// status line, headers and body.
async fn raw(addr: std::net::SocketAddr, head: &[u8], body_len: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head).await.expect("write");
    let chunk = vec![0u8; 64 * 1024];
    let mut left = body_len;
    while left > 0 {
        let n = left.min(chunk.len());
        // The server stops reading once the body is over its limit.
        if stream.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        left -= n;
    }
    let mut out = Vec::new();
    // The server may close before reading a refused body: what it answered is what counts.
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn axums_own_rejections_are_json_too() {
    let server = spawn_server(|_| {}).await;
    // A body over the play limit (32 MiB).
    let len = 33 * 1024 * 1024;
    let big = format!(
        "POST /api/calls/x/play HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
         Content-Length: {len}\r\n\r\n"
    );
    let response = raw(server.admin_addr, big.as_bytes(), len).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("application/json"), "{response}");
    assert!(response.contains(r#""code":"too_large""#), "{response}");
    // A path that is not UTF-8 once decoded.
    let (status, body) =
        callgate_testkit::http::request(server.admin_addr, "GET", "/api/calls/%FF%FE", None).await;
    assert_eq!(status, 400, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["code"], "bad_request");
    assert!(body["error"].as_str().unwrap().contains("UTF-8"), "{body}");
    // A JSON body that is not JSON.
    let (status, body) = server.post("/api/calls/x/dtmf", "{nope").await;
    assert!(status == 400 || status == 422, "{status} {body}");
    assert!(
        body["error"].is_string() && body["code"].is_string(),
        "{body}"
    );
    server.shutdown().await;
}

/// A mono 16-bit WAV header claiming `frames` frames at `rate`, with `body` bytes of audio.
fn wav_head(rate: u32, frames: u32, body: usize) -> Vec<u8> {
    let data = frames * 2;
    let mut w = Vec::new();
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&rate.to_le_bytes());
    w.extend_from_slice(&(rate * 2).to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data.to_le_bytes());
    w.extend(std::iter::repeat_n(0u8, body));
    w
}

async fn post_raw(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    let response = raw(addr, &request, 0).await;
    let status = response[9..12].parse().expect("status");
    let body = response.split_once("\r\n\r\n").expect("head").1;
    (status, serde_json::from_str(body).expect("JSON error"))
}

#[tokio::test]
async fn play_refuses_absurd_audio_before_doing_any_work_for_it() {
    let server = spawn_server(|_| {}).await;
    // No such call: 404 before the body is looked at.
    let (status, body) = post_raw(
        server.admin_addr,
        &format!("/api/calls/{UNKNOWN}/play"),
        b"garbage",
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("call_not_found"))
    );

    let mut phone = server.phone("/").await;
    phone.text(incoming_call("play-limits")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    let id = server.call("play-limits").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/calls/{id}/play");
    // 1 Hz: resampled to 8 kHz, 40 KB would become 8000 times larger.
    let (status, body) = post_raw(server.admin_addr, &path, &wav_head(1, 20_000, 40_000)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("bad_rate")),
        "{body}"
    );
    // A header promising 11 minutes: refused before anything is allocated.
    let (status, body) =
        post_raw(server.admin_addr, &path, &wav_head(8000, 8000 * 660, 1000)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("too_long")),
        "{body}"
    );
    // 100 ms at 8 kHz plays.
    let (status, body) = post_raw(server.admin_addr, &path, &wav_head(8000, 800, 1600)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["queued_ms"], 100);
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(cdr("play-limits")).await;
    phone.closed().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_logs_come_in_bounded_pages() {
    let server = spawn_server(|c| c.max_message_size = 2 * 1024 * 1024).await;
    // Ten CallBridge calls whose call_config carries 1 MiB each: one page of ten would be
    // over 10 MB, so the reply is cut and the rest is on the next page.
    let big = "9".repeat(1024 * 1024);
    for k in 0..10 {
        let mut start: serde_json::Value =
            serde_json::from_str(&callbridge_start(&format!("big-{k}"))).unwrap();
        start["call_config"]["siteId"] = json!(big);
        let mut phone = server.phone("/").await;
        phone.text(start.to_string()).await;
        assert_eq!(phone.recv().await.json()["type"], "started");
        phone.close(1000, "bye").await;
        server.ended_call(&format!("big-{k}")).await;
    }
    let (status, first) = server.get("/api/calls?limit=10").await;
    assert_eq!(status, 200);
    let n = first["calls"].as_array().unwrap().len();
    assert!((1..10).contains(&n), "cut below 8 MiB: {n} records");
    let next = first["next"].as_str().expect("a next page").to_owned();
    let (_, second) = server
        .get(&format!("/api/calls?limit=10&before={next}"))
        .await;
    assert_eq!(second["calls"].as_array().unwrap().len(), 10 - n);
    assert!(second["next"].is_null());

    // A call with 2,500 unknown messages: its log comes in pages of at most 1,000.
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("chatty")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    for k in 0..2500 {
        phone.text(format!(r#"{{"event":"noise{k}"}}"#)).await;
    }
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(cdr("chatty")).await;
    phone.closed().await;
    let id = server.ended_call("chatty").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut seen = 0;
    let mut after = 0u64;
    loop {
        let (status, page) = server
            .get(&format!("/api/calls/{id}/events?after={after}"))
            .await;
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().unwrap();
        assert!(events.len() <= 1000);
        seen += events.len();
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    // 2,500 unknown messages, hangup's end, the CDR.
    assert!(seen >= 2502, "{seen}");
    let (status, body) = server
        .get(&format!("/api/calls/{id}/events?limit=5000"))
        .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_limit")));
    server.shutdown().await;
}

#[tokio::test]
async fn a_cdr_nested_too_deep_is_kept_as_text() {
    let server = spawn_server(|_| {}).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("deep")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    phone.text(r#"{"event":"hangup"}"#).await;
    let deep = format!(
        r#"{{"event":"cdr","sessionId":"deep","x":{}1{}}}"#,
        "[".repeat(1000),
        "]".repeat(1000)
    );
    phone.text(deep.clone()).await;
    phone.closed().await;
    let record = server.ended_call("deep").await;
    // The list stays readable by parsers with a depth limit (serde_json's is 128)...
    assert_eq!(
        record["cdr"].as_str(),
        Some(deep.as_str()),
        "kept verbatim, as a string"
    );
    let id = record["id"].as_str().unwrap();
    let (_, log) = server.get(&format!("/api/calls/{id}/events")).await;
    assert!(log["events"].as_array().unwrap().iter().any(|e| {
        e["kind"] == "cdr_invalid"
            && e["detail"]["message"]
                .as_str()
                .unwrap()
                .contains("1001 levels")
    }));
    server.shutdown().await;
}

#[tokio::test]
async fn admin_tokens_have_roles_and_healthz_stays_open() {
    use callgate_server::auth::{Role, Token};
    use callgate_testkit::http::request_with;
    const READ: &str = "read-token-0123456789abcdef";
    const OPS: &str = "ops-token-0123456789abcdef";
    let server = spawn_server(|c| {
        c.admin_auth.tokens = vec![
            Token::from_secret("grafana", Role::Read, READ).unwrap(),
            Token::from_secret("ops", Role::Operator, OPS).unwrap(),
        ];
    })
    .await;
    let addr = server.admin_addr;
    let bearer = |t: &str| format!("Bearer {t}");
    let get = |path: &'static str, token: Option<String>| async move {
        let headers: Vec<(&str, String)> =
            token.into_iter().map(|t| ("Authorization", t)).collect();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        request_with(addr, "GET", path, None, &headers).await
    };
    assert_eq!(
        get("/healthz", None).await.0,
        200,
        "open for load balancers"
    );
    let (status, body) = get("/api/calls", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains(r#""code":"unauthorized""#), "{body}");
    assert_eq!(
        get("/api/calls", Some(bearer("wrong-token-0123456789")))
            .await
            .0,
        401
    );
    assert_eq!(get("/api/calls", Some(bearer(READ))).await.0, 200);
    // The scheme name is case-insensitive (RFC 9110).
    assert_eq!(
        get("/api/calls", Some(format!("BEARER {READ}"))).await.0,
        200
    );
    assert_eq!(
        get("/api/calls", Some(format!("bearer {READ}"))).await.0,
        200
    );
    assert_eq!(get("/metrics", None).await.0, 401);
    assert_eq!(get("/metrics", Some(bearer(READ))).await.0, 200);
    // Acting on calls needs the operator role.
    let auth = bearer(READ);
    let hangup = format!("/api/calls/{UNKNOWN}/hangup");
    let (status, body) =
        request_with(addr, "POST", &hangup, None, &[("Authorization", &auth)]).await;
    assert_eq!(status, 403, "{body}");
    let auth = bearer(OPS);
    let (status, _) = request_with(addr, "POST", &hangup, None, &[("Authorization", &auth)]).await;
    assert_eq!(status, 404, "past the check: no such call");
    let metrics = get("/metrics", Some(bearer(OPS))).await.1;
    assert!(
        metrics.contains(r#"callgate_admin_requests_refused_total{reason="unauthenticated"} 3"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"callgate_admin_requests_refused_total{reason="forbidden"} 1"#));
    assert!(!metrics.contains(READ) && !metrics.contains(OPS));
    server.shutdown().await;
}

#[tokio::test]
async fn replaced_tokens_are_in_force_for_the_next_request() {
    use callgate_server::auth::{AdminAuth, Role, Token};
    use callgate_testkit::http::request_with;
    const OLD: &str = "old-token-0123456789abcdef";
    const NEW: &str = "new-token-0123456789abcdef";
    let token = |secret| Token::from_secret("ops", Role::Operator, secret).unwrap();
    let server = spawn_server(|c| c.admin_auth.tokens = vec![token(OLD)]).await;
    let status = |secret: &'static str| {
        let addr = server.admin_addr;
        async move {
            let auth = format!("Bearer {secret}");
            request_with(addr, "GET", "/api/calls", None, &[("Authorization", &auth)])
                .await
                .0
        }
    };
    assert_eq!((status(OLD).await, status(NEW).await), (200, 401));
    // Rotation: both for a while, then the new one only (what SIGHUP does with the file's).
    server
        .admin_auth
        .replace(AdminAuth {
            tokens: vec![
                token(OLD),
                Token::from_secret("ops-2", Role::Read, NEW).unwrap(),
            ],
            behind_own_auth: false,
        })
        .expect("tokens on loopback");
    assert_eq!((status(OLD).await, status(NEW).await), (200, 200));
    server
        .admin_auth
        .replace(AdminAuth {
            tokens: vec![token(NEW)],
            behind_own_auth: false,
        })
        .expect("tokens on loopback");
    assert_eq!((status(OLD).await, status(NEW).await), (401, 200));
    server.shutdown().await;
}

#[tokio::test]
async fn a_reload_is_checked_against_the_address_really_bound() {
    use callgate_server::auth::{AdminAuth, Role, Token};
    use callgate_testkit::http::request_with;
    // Bound on every address with a token; a reloaded file that says 127.0.0.1 and has no
    // [admin] must not open the port that is really bound.
    const OPS: &str = "ops-token-0123456789";
    let server = spawn_server(|c| {
        c.admin_listen = "0.0.0.0:0".parse().unwrap();
        c.admin_auth.tokens = vec![Token::from_secret("ops", Role::Operator, OPS).unwrap()];
    })
    .await;
    let refused = server.admin_auth.replace(AdminAuth::default());
    let error = refused.expect_err("no token on 0.0.0.0");
    assert_eq!(error.key, "admin.tokens");
    assert!(error.problem.contains("0.0.0.0"), "{}", error.problem);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.admin_addr.port()));
    let (status, body) = request_with(addr, "GET", "/api/calls", None, &[]).await;
    assert_eq!(status, 401, "the token in force stays: {body}");
    let auth = format!("Bearer {OPS}");
    let (status, _) =
        request_with(addr, "GET", "/api/calls", None, &[("Authorization", &auth)]).await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn an_unprotected_admin_api_off_loopback_is_refused_at_start() {
    let dir = callgate_testkit::TempDir::new("admin-open");
    let mut config = callgate_testkit::test_config(dir.path());
    config.admin_listen = "0.0.0.0:0".parse().unwrap();
    let error = callgate_server::Server::bind(config.clone())
        .await
        .err()
        .expect("refused");
    assert!(error.is_config(), "{error}");
    assert!(error.to_string().contains("admin.tokens"), "{error}");
    config.admin_auth.behind_own_auth = true;
    let server = callgate_server::Server::bind(config)
        .await
        .expect("told it is behind auth");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_deletes_an_ended_call_and_its_recording() {
    let server = spawn_server(|c| c.record = true).await;
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("gone")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    phone.binary(vec![1u8; 320]).await;
    let id = server.call("gone").await["id"].as_str().unwrap().to_owned();
    let (status, body) = callgate_testkit::http::request(
        server.admin_addr,
        "DELETE",
        &format!("/api/calls/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 409, "a live call stays: {body}");
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(cdr("gone")).await;
    phone.closed().await;
    server.ended_call("gone").await;
    let wav = server
        .config
        .data_dir
        .join("recordings")
        .join(format!("{id}.wav"));
    assert!(wav.exists());
    // Private to the server's user, whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&wav), 0o600);
    assert_eq!(mode(wav.parent().unwrap()), 0o700);
    assert_eq!(mode(&server.config.data_dir), 0o700);
    assert_eq!(mode(&server.config.data_dir.join("callgate.db")), 0o600);
    // What a flow's `record` steps leave (`messages/<id>/*.wav`) goes with the record too.
    let messages = server.config.data_dir.join("messages").join(&id);
    std::fs::create_dir_all(&messages).unwrap();
    std::fs::write(messages.join("message.wav"), b"RIFF").unwrap();
    std::fs::write(messages.join("second.wav"), b"RIFF").unwrap();
    assert!(files_of(&server.config.data_dir, &id).len() >= 3);
    // Refused while its task finishes (it may still write to the record), then deleted.
    let mut answer = (0, String::new());
    for _ in 0..300 {
        answer = callgate_testkit::http::request(
            server.admin_addr,
            "DELETE",
            &format!("/api/calls/{id}"),
            None,
        )
        .await;
        if answer.0 != 409 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert!(!wav.exists(), "the recording went with the record");
    assert_eq!(
        files_of(&server.config.data_dir, &id),
        Vec::<String>::new(),
        "no file and no directory of the call remains"
    );
    assert!(server.config.data_dir.join("messages").is_dir());
    let (status, _) = server.get(&format!("/api/calls/{id}")).await;
    assert_eq!(status, 404);
    let (status, _) = server.get(&format!("/api/calls/{id}/events")).await;
    assert_eq!(status, 404);
    server.shutdown().await;
}

/// Every path under `dir` (files and directories) whose name mentions the call `id`.
fn files_of(dir: &std::path::Path, id: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the data dir") {
            let path = entry.expect("a directory entry").path();
            if path.to_string_lossy().contains(id) {
                found.push(path.display().to_string());
            }
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    found
}

#[tokio::test]
async fn records_past_their_retention_are_deleted_in_the_background() {
    use callgate_store::{CallId, Counters, Ended, NewCall, SqliteStore, Store, UnixMillis};
    let dir = callgate_testkit::TempDir::new("retention");
    let mut ids = Vec::new();
    {
        // A call that ended two days ago, and one that ended a minute ago.
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let day = 24 * 3600 * 1000;
        for (ext, ended) in [
            ("old", UnixMillis::now().0 - 2 * day),
            ("new", UnixMillis::now().0 - 60_000),
        ] {
            let id = CallId::new();
            // Its recording and the messages a flow left.
            let messages = dir.path().join("messages").join(id.as_str());
            std::fs::create_dir_all(&messages).unwrap();
            std::fs::write(messages.join("vm.wav"), b"RIFF").unwrap();
            std::fs::create_dir_all(dir.path().join("recordings")).unwrap();
            let recording = dir.path().join("recordings").join(format!("{id}.wav"));
            std::fs::write(recording, b"RIFF").unwrap();
            ids.push((ext, id.clone()));
            store
                .insert_call(&NewCall {
                    id: id.clone(),
                    protocol: "inbound".into(),
                    caller: "1".into(),
                    callee: "2".into(),
                    external_id: ext.into(),
                    call_config: None,
                    phone_output_audio_format: "PCM_8000".into(),
                    phone_input_audio_format: "PCM_8000".into(),
                    started_at: UnixMillis(ended - 1000),
                    recording: false,
                    route: None,
                    agent: None,
                    key_name: None,
                    node: None,
                })
                .unwrap();
            store
                .end_call(
                    &id,
                    &Ended {
                        at: UnixMillis(ended),
                        reason: "peer_hangup".into(),
                        hangup_by: "peer".into(),
                        counters: Counters::default(),
                        dtmf: String::new(),
                        usage: None,
                    },
                )
                .unwrap();
        }
    }
    let server = callgate_testkit::spawn_server_in(dir, |c| {
        c.retention = Some(std::time::Duration::from_secs(24 * 3600));
    })
    .await;
    // The first sweep runs at start, through the store writer.
    let left = server
        .until_stored("the sweep of the old record", async || {
            let left = server.calls().await;
            (left.len() == 1).then_some(left)
        })
        .await;
    assert_eq!(left[0]["external_id"], "new");
    // The sweep deletes the record first, then the files: wait for the files too.
    let data_dir = server.config.data_dir.clone();
    let old_id = ids[0].1.as_str().to_owned();
    let new_id = ids[1].1.as_str().to_owned();
    for _ in 0..500 {
        if files_of(&data_dir, &old_id).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(files_of(&data_dir, &old_id), Vec::<String>::new());
    assert_eq!(
        files_of(&data_dir, &new_id).len(),
        3,
        "the live record's files stay"
    );
    assert!(
        server
            .metrics_text()
            .await
            .contains("callgate_calls_expired_total 1")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_call_ids_are_refused_before_any_lookup() {
    let server = spawn_server(|_| {}).await;
    let long = "7".repeat(300);
    let paths = [
        "nope".to_owned(),
        "nope/events".to_owned(),
        "nope/transcript".to_owned(),
        "nope/recording".to_owned(),
        "nope/messages/greeting.wav".to_owned(),
        // A UUID, but version 4: the store only makes version 7.
        "67e55044-10b1-426f-9247-bb680e5fe0c8".to_owned(),
        // Without hyphens, and with a path trick.
        UNKNOWN.replace('-', ""),
        format!("{UNKNOWN}%2F..%2Fx"),
        long.clone(),
    ];
    for path in &paths {
        let (status, err) = server.get(&format!("/api/calls/{path}")).await;
        assert_eq!(status, 400, "GET {path}: {err}");
        assert_eq!(err["code"], "bad_call_id", "GET {path}: {err}");
    }
    for action in ["hangup", "dtmf", "play", "clear"] {
        let (status, err) = server
            .post(&format!("/api/calls/nope/{action}"), r#"{"digit":"1"}"#)
            .await;
        assert_eq!((status, err["code"].as_str()), (400, Some("bad_call_id")));
    }
    let (status, body) =
        callgate_testkit::http::request(server.admin_addr, "DELETE", "/api/calls/nope", None).await;
    assert_eq!(status, 400, "{body}");
    // The message names the id, cut, and what an id looks like.
    let (_, err) = server.get(&format!("/api/calls/{long}")).await;
    let message = err["error"].as_str().unwrap();
    assert!(
        message.contains(&format!("\"{}\"...", &long[..64])),
        "{message}"
    );
    assert!(!message.contains(&long[..65]), "{message}");
    assert!(message.contains("UUIDv7"), "{message}");
    // The list's cursor is an id too.
    let (status, err) = server.get("/api/calls?before=nope").await;
    assert_eq!((status, err["code"].as_str()), (400, Some("bad_call_id")));

    // A real id is found in either case.
    let mut phone = server.phone("/").await;
    phone.text(incoming_call("ids")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    let id = server.call("ids").await["id"].as_str().unwrap().to_owned();
    let (status, record) = server
        .get(&format!("/api/calls/{}", id.to_uppercase()))
        .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["id"], id.as_str());
    let (status, page) = server.get(&format!("/api/calls?before={id}")).await;
    assert_eq!(status, 200, "{page}");
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(cdr("ids")).await;
    assert_eq!(phone.closed().await.0, 1000);
    drop(phone);
    server.shutdown().await;
}

/// A raw request with `Transfer-Encoding: chunked` and one chunk of `len` bytes, read while
/// it is written (a server that refuses the body answers before reading it all).
async fn post_chunked(addr: std::net::SocketAddr, path: &str, len: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
         Transfer-Encoding: chunked\r\n\r\n{len:x}\r\n"
    )
    .into_bytes();
    request.extend(std::iter::repeat_n(b'{', len));
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.split();
    let mut out = Vec::new();
    let _ = tokio::join!(write.write_all(&request), read.read_to_end(&mut out));
    String::from_utf8_lossy(&out).into_owned()
}

/// A request head announcing `len` bytes of body, none of which is sent: a server that
/// refuses it by its length answers at once.
async fn post_announcing(
    addr: std::net::SocketAddr,
    path: &str,
    len: usize,
) -> (u16, serde_json::Value) {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n"
    );
    let response = raw(addr, head.as_bytes(), 0).await;
    let status = response[9..12].parse().expect("status");
    let body = response.split_once("\r\n\r\n").expect("head").1;
    (status, serde_json::from_str(body).expect("JSON error"))
}

#[tokio::test]
async fn request_bodies_are_bounded_per_endpoint() {
    let server = spawn_server(|_| {}).await;
    let addr = server.admin_addr;
    let over = vec![b'{'; 64 * 1024 + 1];
    // Every endpoint but play: 64 KiB, announced or not, read or not.
    for action in ["dtmf", "hangup", "clear"] {
        let path = format!("/api/calls/{UNKNOWN}/{action}");
        let (status, err) = post_announcing(addr, &path, over.len()).await;
        assert_eq!(status, 413, "{action}: {err}");
        assert_eq!(err["code"], "too_large");
        assert_eq!(
            err["error"],
            "the request body (65537 bytes) is over this endpoint's limit of 65536 bytes"
        );
    }
    let response = post_chunked(addr, &format!("/api/calls/{UNKNOWN}/dtmf"), over.len()).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains(r#""code":"too_large""#), "{response}");
    // At the limit the body is read (and is not JSON).
    let (status, err) = post_raw(
        addr,
        &format!("/api/calls/{UNKNOWN}/dtmf"),
        &over[..64 * 1024],
    )
    .await;
    assert_eq!((status, err["code"].as_str()), (400, Some("bad_json")));
    // Play keeps its 32 MiB: the same body passes and the call is looked up.
    let (status, err) = post_raw(addr, &format!("/api/calls/{UNKNOWN}/play"), &over).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (404, Some("call_not_found"))
    );
    let response = post_chunked(addr, &format!("/api/calls/{UNKNOWN}/play"), over.len()).await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_keeps_failing_to_authenticate_is_locked_out_for_a_minute() {
    use callgate_server::auth::{Role, Token};
    use callgate_testkit::http::request_with;
    const OPS: &str = "ops-token-0123456789abcdef";
    let server = spawn_server(|c| {
        c.admin_auth.tokens = vec![Token::from_secret("ops", Role::Operator, OPS).unwrap()];
    })
    .await;
    let addr = server.admin_addr;
    let with = |token: &str| format!("Bearer {token}");
    // Ten wrong tokens and ten wrong console sign-ins: twenty refusals, each a 401.
    for i in 0..10 {
        let wrong = with(&format!("guess-{i}-0123456789abcdef"));
        let (status, body) = request_with(
            addr,
            "GET",
            "/api/calls",
            None,
            &[("Authorization", &wrong)],
        )
        .await;
        assert_eq!(status, 401, "guess {i}: {body}");
        let sign_in = format!(r#"{{"token":"guess-{i}-0123456789abcdef"}}"#);
        let (status, body) = request_with(
            addr,
            "POST",
            "/api/session",
            Some(&sign_in),
            &[("Origin", &format!("http://{addr}"))],
        )
        .await;
        assert_eq!(status, 401, "sign-in {i}: {body}");
    }
    // Now even the right token is refused before it is looked at, with a JSON reason.
    let (status, body) = request_with(
        addr,
        "GET",
        "/api/calls",
        None,
        &[("Authorization", &with(OPS))],
    )
    .await;
    assert_eq!(status, 429, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["code"], "too_many_failures");
    assert!(
        body["error"].as_str().unwrap().contains("try again in"),
        "{body}"
    );
    // Load balancers' probes need no credential and are not refused.
    assert_eq!(
        request_with(addr, "GET", "/healthz", None, &[]).await.0,
        200
    );
    assert_eq!(
        server
            .metrics
            .admin_refused
            .get_or_create(&[("reason", "too_many_failures")])
            .get(),
        1
    );
    server.shutdown().await;
}
