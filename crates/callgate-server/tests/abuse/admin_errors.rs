//! Item 10: admin API errors are JSON.

use std::net::SocketAddr;

use super::support::*;

/// A request and the error it must get.
struct Case {
    name: &'static str,
    head: String,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn get(name: &'static str, path: &str, status: u16, code: &'static str) -> Case {
    Case {
        name,
        head: format!("GET {path} HTTP/1.1\r\nHost: callgate\r\nConnection: close\r\n\r\n"),
        body: Vec::new(),
        status,
        code,
    }
}

fn send(
    name: &'static str,
    method: &str,
    path: &str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        name,
        head: format!(
            "{method} {path} HTTP/1.1\r\nHost: callgate\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ),
        body,
        status,
        code,
    }
}

/// Sends every case once; a failure names the case.
async fn round(admin: SocketAddr, cases: &[Case]) -> Result<(), String> {
    for case in cases {
        let response = admin_request(admin, &case.head, &case.body).await;
        let body = response.json().map_err(|e| format!("{}: {e}", case.name))?;
        if response.status != case.status
            || !response.is_json()
            || body["code"] != case.code
            || !body["error"].is_string()
        {
            return Err(format!(
                "{}: {} {} {body}",
                case.name, response.status, response.head
            ));
        }
    }
    Ok(())
}

/// Item 10: the 413 and invalid-UTF-8 path errors were `text/plain`. Here every kind of error
/// the admin API gives (axum's own rejections included), again and again from several
/// clients at once while the canary runs: each has its status, a JSON body with `error` and
/// `code`, and `application/json`. What the HTTP layer refuses before the API sees a request
/// (a URI over 64 KiB, a head of 1 MB, bytes that are not HTTP) is JSON too: the admin port
/// checks each head before hyper reads it (`http_guard`, docs/limits.md).
#[tokio::test]
async fn every_admin_error_is_json() {
    let strength = Strength::get();
    let rounds = strength.pick(20, 500);
    let clients = 4;
    let mut rig = Rig::start("item 10: admin errors are JSON", |_| {}).await;
    let canary = rig.canary().await;
    let server = &rig.server;
    let admin = server.admin_addr;
    let live = record_id(admin, "canary").await;
    let too_big = vec![0u8; 33 << 20];
    let cases = vec![
        get("unknown path", "/no/such/thing", 404, "not_found"),
        get(
            "unknown call",
            "/api/calls/0196f3a4-7c1e-7d2a-9b3c-4d5e6f708192",
            404,
            "call_not_found",
        ),
        get("not a call id", "/api/calls/nope", 400, "bad_call_id"),
        get(
            "path traversal",
            "/api/calls/..%2f..%2fetc%2fpasswd",
            400,
            "bad_call_id",
        ),
        get("path not UTF-8", "/api/calls/%FF%FE", 400, "bad_request"),
        get(
            "events of a path not UTF-8",
            "/api/calls/%C3%28/events",
            400,
            "bad_request",
        ),
        get("limit too big", "/api/calls?limit=5000", 400, "bad_limit"),
        get(
            "limit not a number",
            "/api/calls?limit=ten",
            400,
            "bad_limit",
        ),
        get("unknown query", "/api/calls?evil=1", 400, "bad_query"),
        get(
            "events limit",
            &format!("/api/calls/{live}/events?limit=0"),
            400,
            "bad_limit",
        ),
        get(
            "events after",
            &format!("/api/calls/{live}/events?after=x"),
            400,
            "bad_after",
        ),
        get(
            "unknown call's events",
            "/api/calls/0196f3a4-7c1e-7d2a-9b3c-4d5e6f708192/events",
            404,
            "call_not_found",
        ),
        send(
            "wrong method",
            "POST",
            "/healthz",
            Vec::new(),
            405,
            "method_not_allowed",
        ),
        send(
            "hangup of no call",
            "POST",
            "/api/calls/0196f3a4-7c1e-7d2a-9b3c-4d5e6f708192/hangup",
            Vec::new(),
            404,
            "call_not_found",
        ),
        send(
            "body not JSON",
            "POST",
            &format!("/api/calls/{live}/dtmf"),
            b"{nope".to_vec(),
            400,
            "bad_json",
        ),
        send(
            "play: not a WAV",
            "POST",
            &format!("/api/calls/{live}/play"),
            b"garbage".to_vec(),
            415,
            "bad_wav",
        ),
        send(
            "delete a live call",
            "DELETE",
            &format!("/api/calls/{live}"),
            Vec::new(),
            409,
            "call_live",
        ),
    ];
    let phase = rig.phase();
    let results = futures_util::future::join_all((0..clients).map(|_| async {
        for _ in 0..rounds {
            round(admin, &cases).await?;
        }
        Ok::<(), String>(())
    }))
    .await;
    // The 413 (a 33 MiB body: a few of them, not per round).
    let over = send(
        "play: body over 32 MiB",
        "POST",
        &format!("/api/calls/{live}/play"),
        too_big,
        413,
        "too_large",
    );
    let over_limit = round(admin, std::slice::from_ref(&over)).await;
    // Refused before the API sees them (hyper answered these with empty bodies).
    let long_uri = format!(
        "GET /api/calls/{} HTTP/1.1\r\nHost: callgate\r\nConnection: close\r\n\r\n",
        "a".repeat(70_000)
    );
    let big_head = format!(
        "GET /healthz HTTP/1.1\r\nHost: callgate\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(1_000_000)
    );
    let layer: Vec<(u16, String)> = futures_util::future::join_all(
        [
            long_uri.as_str(),
            big_head.as_str(),
            "\u{1}\u{2} garbage\r\n\r\n",
        ]
        .map(|head| async move {
            let r = admin_request(admin, head, &[]).await;
            let code = r.json().map_or_else(
                |e| format!("not JSON: {e}"),
                |v| v["code"].as_str().unwrap_or("no code").to_owned(),
            );
            (r.status, code)
        }),
    )
    .await;
    rig.figure("kinds of error", cases.len() + 1);
    rig.figure("requests", cases.len() * rounds * clients + 1);
    rig.figure("memory growth (MiB)", mib(phase.grew()));
    rig.figure(
        "HTTP layer: URI over 64 KiB, head of 1 MB, not HTTP",
        format!("{layer:?}"),
    );
    for result in results {
        rig.expect(result.is_ok(), format!("{result:?}"));
    }
    rig.expect(over_limit.is_ok(), format!("{over_limit:?}"));
    rig.expect(
        layer
            == [
                (414, "uri_too_long".to_owned()),
                (431, "headers_too_large".to_owned()),
                (400, "bad_request".to_owned()),
            ],
        format!("the HTTP layer: {layer:?}"),
    );
    rig.finish(canary).await;
}
