//! `GET /api/openapi.json`: the document a real server serves lists what that server answers,
//! takes the credentials it says, and (with `CALLGATE_TEST_OPENAPI_VALIDATOR`) is valid
//! OpenAPI 3.1 by an independent validator, as are real answers against their schemas.

use std::net::SocketAddr;

use callgate_server::auth::{Role, Token};
use callgate_testkit::http::{exchange, request_with};
use callgate_testkit::{Received, cdr, incoming_call, spawn_server};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A well-formed call id (a UUIDv7) that names no call.
const UNKNOWN: &str = "0190a5d0-ac96-774b-bcce-b302099a8057";
/// Every method a route could be served for (HEAD follows GET, OPTIONS is never served).
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The status of `method path` and, unless it is a 2xx (a stream may never end), its body.
async fn probe(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    let head = format!(
        "{} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Length: 0\r\n\r\n",
        method.to_ascii_uppercase()
    );
    stream.write_all(head.as_bytes()).await.expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.expect("read");
        got.extend_from_slice(&buf[..n]);
        if n == 0 || got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line in {text:?}"));
    if (200..300).contains(&status) {
        return (status, Value::Null);
    }
    stream.read_to_end(&mut got).await.expect("read the error");
    let text = String::from_utf8_lossy(&got).into_owned();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // Errors are small: a chunked one is a single chunk between its size line and the end.
    let body = body
        .find('{')
        .and_then(|start| body.rfind('}').map(|end| &body[start..=end]))
        .unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The console's asset version, as its page names it.
async fn console_version(addr: SocketAddr) -> String {
    let page = exchange(addr, "GET", "/", None, &[]).await.text();
    let at = page.find("/assets/").expect("the page names its assets") + "/assets/".len();
    page[at..].split('/').next().unwrap_or_default().to_owned()
}

/// A concrete path for a documented template: an unknown call, a real console asset.
fn fill(template: &str, version: &str) -> String {
    let mut path = String::new();
    for segment in template.split('/').skip(1) {
        path.push('/');
        let value = match segment {
            "{id}" => UNKNOWN,
            "{version}" => version,
            "{file}" if template.starts_with("/assets/") => "app.js",
            "{file}" => "greeting.wav",
            s if s.starts_with('{') => {
                panic!("no sample value for the parameter {s} of {template}")
            }
            s => s,
        };
        path.push_str(value);
    }
    if path.is_empty() {
        "/".to_owned()
    } else {
        path
    }
}

async fn document(addr: SocketAddr, headers: &[(&str, &str)]) -> Value {
    let answer = exchange(addr, "GET", "/api/openapi.json", None, headers).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    serde_json::from_slice(&answer.body).expect("the document is JSON")
}

#[tokio::test]
async fn every_documented_operation_answers_and_no_other_method_does() {
    let server = spawn_server(|_| {}).await;
    let addr = server.admin_addr;
    let doc = document(addr, &[]).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let version = console_version(addr).await;
    let paths = doc["paths"].as_object().expect("paths");
    for expected in [
        "/api/calls",
        "/api/calls/{id}/play",
        "/api/openapi.json",
        "/api/stream",
        "/",
    ] {
        assert!(paths.contains_key(expected), "{expected} is documented");
    }
    let mut operations = 0;
    for (template, item) in paths {
        let path = fill(template, &version);
        for method in METHODS {
            let (status, body) = probe(addr, method, &path, &[]).await;
            if item.get(method).is_some() {
                operations += 1;
                assert_ne!(
                    status, 405,
                    "{method} {path} is documented but refused: {body}"
                );
                assert!(
                    !(status == 404 && body["code"] == "not_found"),
                    "{method} {path} is documented but not routed: {body}"
                );
                let documented = item[method]["responses"]
                    .as_object()
                    .is_some_and(|r| r.contains_key(&status.to_string()));
                assert!(
                    documented,
                    "{method} {path} answered {status}, which is not documented: {body}"
                );
            } else {
                assert_eq!(
                    (status, body["code"].as_str()),
                    (405, Some("method_not_allowed")),
                    "{method} {path} is served but not documented"
                );
            }
        }
    }
    assert!(operations >= 24, "only {operations} operations");
    server.shutdown().await;
}

#[tokio::test]
async fn the_documented_security_is_what_the_server_asks() {
    const READ: &str = "read-token-0123456789abcdef";
    let server = spawn_server(|c| {
        c.admin_auth.tokens = vec![Token::from_secret("viewer", Role::Read, READ).unwrap()];
    })
    .await;
    let addr = server.admin_addr;
    let (status, body) = request_with(addr, "GET", "/api/openapi.json", None, &[]).await;
    assert_eq!(
        status, 401,
        "the document is a read, like the others: {body}"
    );
    let bearer = format!("Bearer {READ}");
    let doc = document(addr, &[("Authorization", &bearer)]).await;
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["session"]["in"],
        "cookie"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["session"]["name"],
        "callgate_session"
    );
    let version = console_version(addr).await;
    let mut open = 0;
    for (template, item) in doc["paths"].as_object().expect("paths") {
        let path = fill(template, &version);
        for (method, operation) in item.as_object().expect("path item") {
            let security = &operation["security"];
            let documents_401 = operation["responses"].get("401").is_some();
            let (anonymous, body) = probe(addr, method, &path, &[]).await;
            if *security == json!([{}]) {
                open += 1;
                assert!(
                    anonymous != 401 || documents_401,
                    "{method} {path} is documented open but refused: {body}"
                );
                continue;
            }
            let role = security[0]["bearer"][0].as_str().expect("a role");
            assert_eq!(
                *security,
                json!([{"bearer": [role]}, {"session": [role]}, {}])
            );
            assert_eq!(
                (anonymous, body["code"].as_str()),
                (401, Some("unauthorized")),
                "{method} {path} needs credentials"
            );
            let (with_read, body) = probe(addr, method, &path, &[("Authorization", &bearer)]).await;
            match role {
                "read" => assert!(
                    with_read != 401 && with_read != 403,
                    "{method} {path}: {body}"
                ),
                "operator" => assert_eq!(
                    (with_read, body["code"].as_str()),
                    (403, Some("forbidden")),
                    "{method} {path} needs an operator"
                ),
                other => panic!("{method} {path}: unknown role {other}"),
            }
        }
    }
    assert_eq!(
        open, 7,
        "healthz, readyz, the page, its assets and the three session operations"
    );
    server.shutdown().await;
}

/// Runs `scripts/openapi-check` with the Python `CALLGATE_TEST_OPENAPI_VALIDATOR` names (one
/// with `openapi-spec-validator` and `jsonschema`) on the document and real answers of a call.
#[tokio::test]
async fn an_independent_validator_accepts_the_document_and_real_answers() {
    let Some(python) = std::env::var_os("CALLGATE_TEST_OPENAPI_VALIDATOR") else {
        eprintln!(
            "SKIPPED: set CALLGATE_TEST_OPENAPI_VALIDATOR to a Python with openapi-spec-validator \
             and jsonschema (.ci/run does) to validate the OpenAPI document"
        );
        return;
    };
    let server = spawn_server(|_| {}).await;
    let addr = server.admin_addr;
    let doc = document(addr, &[]).await;
    let mut samples = Vec::new();
    let mut sample = |path: &str, method: &str, status: u16, body: &Value| {
        samples.push(json!({"path": path, "method": method, "status": status, "body": body}));
    };

    let mut phone = server.phone("/").await;
    phone.text(incoming_call("openapi")).await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    let live = server.call("openapi").await;
    let id = live["id"].as_str().expect("id").to_owned();
    let (status, body) = server
        .post(&format!("/api/calls/{id}/dtmf"), r#"{"digit":"5"}"#)
        .await;
    assert_eq!(status, 200, "{body}");
    sample("/api/calls/{id}/dtmf", "post", status, &body);
    assert!(matches!(phone.recv().await, Received::Text(_)));
    let (status, body) = server
        .post(&format!("/api/calls/{id}/dtmf"), r#"{"digit":"A"}"#)
        .await;
    assert_eq!(status, 422, "{body}");
    sample("/api/calls/{id}/dtmf", "post", status, &body);
    let (status, body) = server.post(&format!("/api/calls/{id}/clear"), "").await;
    assert_eq!(status, 200, "{body}");
    sample("/api/calls/{id}/clear", "post", status, &body);
    let (status, body) = server.get("/api/calls?live=true").await;
    assert_eq!(status, 200, "{body}");
    sample("/api/calls", "get", status, &body);
    let (status, body) = server.post(&format!("/api/calls/{id}/hangup"), "").await;
    assert_eq!(status, 200, "{body}");
    sample("/api/calls/{id}/hangup", "post", status, &body);
    assert_eq!(phone.recv().await.json(), json!({"event": "hangup"}));
    phone.text(cdr("openapi")).await;
    assert_eq!(phone.closed().await.0, 1000);
    server.ended_call("openapi").await;

    for (template, path) in [
        ("/api/calls", "/api/calls".to_owned()),
        ("/api/calls/{id}", format!("/api/calls/{id}")),
        ("/api/calls/{id}/events", format!("/api/calls/{id}/events")),
        (
            "/api/calls/{id}/transcript",
            format!("/api/calls/{id}/transcript"),
        ),
        ("/healthz", "/healthz".to_owned()),
        ("/readyz", "/readyz".to_owned()),
        ("/api/nodes", "/api/nodes".to_owned()),
        (
            "/api/webhooks/deliveries",
            "/api/webhooks/deliveries".to_owned(),
        ),
        ("/api/session", "/api/session".to_owned()),
        ("/api/calls/{id}", format!("/api/calls/{UNKNOWN}")),
        ("/api/calls", "/api/calls?limit=0".to_owned()),
        ("/api/calls/{id}/hangup", format!("/api/calls/{id}/hangup")),
    ] {
        let (status, body) = if template.ends_with("hangup") {
            server.post(&path, "").await
        } else {
            server.get(&path).await
        };
        sample(
            template,
            if template.ends_with("hangup") {
                "post"
            } else {
                "get"
            },
            status,
            &body,
        );
    }
    let answer = exchange(addr, "DELETE", &format!("/api/calls/{id}"), None, &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body: Value = serde_json::from_slice(&answer.body).expect("JSON");
    sample("/api/calls/{id}", "delete", answer.status, &body);
    let statuses: Vec<u64> = samples
        .iter()
        .filter_map(|s| s["status"].as_u64())
        .collect();
    assert!(statuses.contains(&404) && statuses.contains(&400) && statuses.contains(&409));

    let dir = callgate_testkit::TempDir::new("openapi");
    let doc_path = dir.path().join("openapi.json");
    let samples_path = dir.path().join("samples.json");
    std::fs::write(&doc_path, serde_json::to_vec(&doc).expect("JSON")).expect("write");
    std::fs::write(&samples_path, serde_json::to_vec(&samples).expect("JSON")).expect("write");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/openapi-check");
    let output = std::process::Command::new(&python)
        .arg(script)
        .arg(&doc_path)
        .arg(&samples_path)
        .output()
        .expect("run the validator");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{report}");
    assert!(output.status.success(), "the validator refused:\n{report}");
    assert_eq!(
        report.matches("matches its schema").count(),
        samples.len(),
        "every answer was checked:\n{report}"
    );
    server.shutdown().await;
}
