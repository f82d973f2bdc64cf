//! The operator's console over real sockets: the page and its assets (policy, caching), the
//! session cookie (sign-in, roles, cross-site refusals, sign-out, rotation), ranges on
//! recordings; and, with `CALLGATE_TEST_CHROMIUM=1`, a real headless Chromium driving the
//! pages: sign-in, live calls appearing and leaving, the operator's hang-up, the read role,
//! a finished call's page, both languages, and screenshots under `target/console-screenshots`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use callgate_agent::{AgentCommand, AgentEvent, AgentFactory, AgentIo, AgentRun, Speaker, Turn};
use callgate_audio::pcm;
use callgate_server::auth::{AdminAuth, Role, Token};
use callgate_testkit::browser::{self, Browser};
use callgate_testkit::http::{Answer, exchange};
use callgate_testkit::{Phone, Received, TestServer, cdr, incoming_call, spawn_server};
use serde_json::{Value, json};

const READ: &str = "read-secret-0123456789";
const OPERATOR: &str = "operator-secret-0123456789";

fn tokens() -> AdminAuth {
    AdminAuth {
        tokens: vec![
            Token::from_secret("wallboard", Role::Read, READ).expect("as set up"),
            Token::from_secret("supervisor", Role::Operator, OPERATOR).expect("as set up"),
        ],
        behind_own_auth: false,
    }
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Answer {
    exchange(addr, method, path, body.map(str::as_bytes), headers).await
}

fn json_of(answer: &Answer) -> Value {
    serde_json::from_slice(&answer.body).unwrap_or(Value::Null)
}

/// Signs in with `token`; returns the `name=value` cookie to send back.
async fn sign_in(addr: SocketAddr, token: &str) -> String {
    let origin = format!("http://{addr}");
    let answer = send(
        addr,
        "POST",
        "/api/session",
        Some(&json!({ "token": token }).to_string()),
        &[("Origin", &origin)],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let cookie = answer.header("set-cookie").expect("a session cookie");
    cookie.split(';').next().expect("as set up").to_owned()
}

/// A call id that names no call.
const UNKNOWN: &str = "0190a5d0-ac96-774b-bcce-b302099a8057";

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_a_strict_policy_and_caching() {
    let server = spawn_server(|c| c.admin_auth = tokens()).await;
    let addr = server.admin_addr;
    let page = send(addr, "GET", "/", None, &[]).await;
    assert_eq!(page.status, 200, "the page needs no token");
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(page.header("cache-control"), Some("no-cache"));
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe") && !csp.contains('*'), "{csp}");
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    let html = page.text();
    assert!(html.contains("input name=\"token\""), "{html}");
    // The assets the page names, versioned and immutable.
    let script = html
        .split("src=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a script URL")
        .to_owned();
    assert!(script.starts_with("/assets/"), "{script}");
    let js = send(addr, "GET", &script, None, &[]).await;
    assert_eq!(js.status, 200);
    assert_eq!(
        js.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(
        js.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    let etag = page.header("etag").expect("an ETag").to_owned();
    let again = send(addr, "GET", "/", None, &[("If-None-Match", &etag)]).await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    let stale = send(addr, "GET", "/assets/0000000000000000/app.js", None, &[]).await;
    assert_eq!(stale.status, 404, "only the current version is served");
    // The data behind the page still needs a token.
    assert_eq!(send(addr, "GET", "/api/calls", None, &[]).await.status, 401);
    server.shutdown().await;
}

#[tokio::test]
async fn a_token_becomes_a_session_cookie_that_acts_as_the_token_does() {
    let server = spawn_server(|c| c.admin_auth = tokens()).await;
    let addr = server.admin_addr;
    let origin = format!("http://{addr}");

    let bad = send(
        addr,
        "POST",
        "/api/session",
        Some(r#"{"token":"not-a-token-at-all-0000"}"#),
        &[("Origin", &origin)],
    )
    .await;
    assert_eq!(bad.status, 401, "{}", bad.text());
    assert!(bad.header("set-cookie").is_none());
    let cross = send(
        addr,
        "POST",
        "/api/session",
        Some(&json!({ "token": OPERATOR }).to_string()),
        &[("Origin", "http://evil.example")],
    )
    .await;
    assert_eq!(cross.status, 403, "{}", cross.text());
    assert_eq!(json_of(&cross)["code"], "cross_site");

    let answer = send(
        addr,
        "POST",
        "/api/session",
        Some(&json!({ "token": OPERATOR }).to_string()),
        &[("Origin", &origin)],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(json_of(&answer)["role"], "operator");
    let set = answer.header("set-cookie").expect("as set up");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    assert!(!set.contains("Secure"), "no TLS on this admin port: {set}");
    assert!(
        !set.contains(OPERATOR),
        "the cookie is not the token: {set}"
    );
    let cookie = set.split(';').next().expect("as set up").to_owned();

    let me = send(addr, "GET", "/api/session", None, &[("Cookie", &cookie)]).await;
    assert_eq!(json_of(&me)["role"], "operator", "{}", me.text());
    assert_eq!(json_of(&me)["name"], "supervisor");
    assert_eq!(
        send(addr, "GET", "/api/session", None, &[]).await.status,
        401
    );
    let list = send(addr, "GET", "/api/calls", None, &[("Cookie", &cookie)]).await;
    assert_eq!(list.status, 200, "{}", list.text());

    // A change by cookie needs this host's Origin; with it, the request reaches the handler.
    let hangup = format!("/api/calls/{UNKNOWN}/hangup");
    let bare = send(addr, "POST", &hangup, None, &[("Cookie", &cookie)]).await;
    assert_eq!(bare.status, 403, "{}", bare.text());
    assert_eq!(json_of(&bare)["code"], "cross_site");
    let elsewhere = [
        ("Cookie", cookie.as_str()),
        ("Origin", "http://evil.example"),
    ];
    let refused = send(addr, "POST", &hangup, None, &elsewhere).await;
    assert_eq!(json_of(&refused)["code"], "cross_site");
    let same = [("Cookie", cookie.as_str()), ("Origin", origin.as_str())];
    let reached = send(addr, "POST", &hangup, None, &same).await;
    assert_eq!(reached.status, 404, "{}", reached.text());
    assert_eq!(json_of(&reached)["code"], "call_not_found");
    let metrics = send(addr, "GET", "/metrics", None, &[("Cookie", &cookie)]).await;
    assert!(
        metrics
            .text()
            .contains("callgate_admin_requests_refused_total{reason=\"cross_site\"} 3"),
        "cross-site refusals are counted: {}",
        metrics.text()
    );

    // A read session reads and may not act.
    let read = sign_in(addr, READ).await;
    let me = send(addr, "GET", "/api/session", None, &[("Cookie", &read)]).await;
    assert_eq!(json_of(&me)["role"], "read");
    let same = [("Cookie", read.as_str()), ("Origin", origin.as_str())];
    let forbidden = send(addr, "POST", &hangup, None, &same).await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(json_of(&forbidden)["code"], "forbidden");

    // Sign-out ends the session and removes the cookie.
    let same = [("Cookie", cookie.as_str()), ("Origin", origin.as_str())];
    let out = send(addr, "DELETE", "/api/session", None, &same).await;
    assert_eq!(out.status, 200, "{}", out.text());
    assert!(
        out.header("set-cookie")
            .expect("as set up")
            .contains("Max-Age=0")
    );
    let after = send(addr, "GET", "/api/calls", None, &[("Cookie", &cookie)]).await;
    assert_eq!(after.status, 401, "a signed-out cookie is refused");

    // Rotating the tokens ends the sessions opened with the old ones.
    assert_eq!(
        send(addr, "GET", "/api/calls", None, &[("Cookie", &read)])
            .await
            .status,
        200
    );
    server
        .admin_auth
        .replace(AdminAuth {
            tokens: vec![
                Token::from_secret("supervisor", Role::Operator, OPERATOR).expect("as set up"),
            ],
            behind_own_auth: false,
        })
        .expect("as set up");
    assert_eq!(
        send(addr, "GET", "/api/calls", None, &[("Cookie", &read)])
            .await
            .status,
        401,
        "the read token is gone, and its session with it"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn without_tokens_no_sign_in_is_needed_but_other_sites_are_refused() {
    let server = spawn_server(|_| {}).await;
    let addr = server.admin_addr;
    let me = send(addr, "GET", "/api/session", None, &[]).await;
    assert_eq!(me.status, 200);
    assert_eq!(
        json_of(&me),
        json!({"role": "operator", "name": null, "auth": false})
    );
    let hangup = format!("/api/calls/{UNKNOWN}/hangup");
    let evil = send(
        addr,
        "POST",
        &hangup,
        None,
        &[("Origin", "http://evil.example")],
    )
    .await;
    assert_eq!(evil.status, 403, "{}", evil.text());
    let site = send(
        addr,
        "POST",
        &hangup,
        None,
        &[("Sec-Fetch-Site", "cross-site")],
    )
    .await;
    assert_eq!(site.status, 403, "{}", site.text());
    let curl = send(addr, "POST", &hangup, None, &[]).await;
    assert_eq!(curl.status, 404, "a client without Origin acts as before");
    server.shutdown().await;
}

/// Answers, says a greeting turn, echoes, and on a key writes the caller's turn, says goodbye
/// and hangs up.
struct Chatty;

impl AgentFactory for Chatty {
    fn name(&self) -> &str {
        "chatty"
    }

    fn start(&self, mut io: AgentIo) -> AgentRun {
        Box::pin(async move {
            io.send(AgentCommand::Answer).await?;
            let start_ms = io.now_ms();
            // 400 ms of a tone the recording's right channel keeps.
            let tone: Vec<i16> = (0..3200)
                .map(|i| if (i / 8) % 2 == 0 { 8000 } else { -8000 })
                .collect();
            io.send(AgentCommand::Audio(pcm::encode(
                io.call.output_format,
                &tone,
            )))
            .await?;
            io.send(AgentCommand::Transcript(Box::new(Turn {
                speaker: Speaker::Agent,
                text: "Hello, this is the front desk.".into(),
                start_ms,
                end_ms: start_ms + 400,
                interrupted: false,
            })))
            .await?;
            while let Some(event) = io.recv().await {
                match event {
                    AgentEvent::Audio(bytes) => io.send(AgentCommand::Audio(bytes)).await?,
                    AgentEvent::Dtmf(digit) => {
                        let now = io.now_ms();
                        io.send(AgentCommand::Transcript(Box::new(Turn {
                            speaker: Speaker::Caller,
                            text: format!("I pressed {digit}"),
                            start_ms: now.saturating_sub(300),
                            end_ms: now,
                            interrupted: false,
                        })))
                        .await?;
                        io.send(AgentCommand::Hangup).await?;
                    }
                    AgentEvent::Ended(_) => break,
                    _ => {}
                }
            }
            Ok(())
        })
    }
}

/// A recorded call with two turns, ended; returns its id.
async fn finished_call(server: &TestServer, external_id: &str) -> String {
    let mut phone = server.phone("/").await;
    phone.text(incoming_call(external_id)).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    // A second of the caller's audio (8 kHz, 16-bit: 320 bytes per 20 ms).
    let speech = callgate_testkit::audio::speechlike_pcm16(1000, 8000, 7);
    for frame in callgate_testkit::audio::frames(&speech, 320) {
        phone.binary(frame).await;
    }
    let mut echoed = 0;
    while echoed < speech.len() {
        if let Received::Binary(b) = phone.recv().await {
            echoed += b.len();
        }
    }
    phone.text(r#"{"event":"dtmf","digit":"5"}"#).await;
    loop {
        if let Received::Text(text) = phone.recv().await
            && text.contains("hangup")
        {
            break;
        }
    }
    phone.text(cdr(external_id)).await;
    phone.closed().await;
    let record = server.ended_call(external_id).await;
    record["id"].as_str().expect("as set up").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_answer_byte_ranges_so_the_player_can_seek() {
    let server = callgate_testkit::spawn_server_with_agent(Arc::new(Chatty), |c| {
        c.record = true;
        c.admin_auth = tokens();
    })
    .await;
    let addr = server.admin_addr;
    let cookie = sign_in(addr, READ).await;
    let id = {
        // The admin client of the testkit has no token: read through the cookie.
        let mut phone = server.phone("/").await;
        phone.text(incoming_call("ranged")).await;
        assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
        phone.text(r#"{"event":"dtmf","digit":"1"}"#).await;
        loop {
            match phone.recv().await {
                Received::Text(text) if text.contains("hangup") => break,
                Received::Close(..) | Received::Eof => panic!("closed before the hangup"),
                _ => {}
            }
        }
        phone.text(cdr("ranged")).await;
        phone.closed().await;
        let list = send(
            addr,
            "GET",
            "/api/calls?limit=1",
            None,
            &[("Cookie", &cookie)],
        )
        .await;
        json_of(&list)["calls"][0]["id"]
            .as_str()
            .expect("as set up")
            .to_owned()
    };
    let path = format!("/api/calls/{id}/recording");
    let whole = send(addr, "GET", &path, None, &[("Cookie", &cookie)]).await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert!(whole.body.starts_with(b"RIFF"));
    let len = whole.body.len();
    let part = send(
        addr,
        "GET",
        &path,
        None,
        &[("Cookie", &cookie), ("Range", "bytes=4-11")],
    )
    .await;
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 4-11/{len}").as_str())
    );
    assert_eq!(part.body, whole.body[4..12]);
    let tail = send(
        addr,
        "GET",
        &path,
        None,
        &[("Cookie", &cookie), ("Range", "bytes=-2")],
    )
    .await;
    assert_eq!(tail.body, whole.body[len - 2..]);
    let past = format!("bytes={len}-");
    let beyond = send(
        addr,
        "GET",
        &path,
        None,
        &[("Cookie", &cookie), ("Range", &past)],
    )
    .await;
    assert_eq!(beyond.status, 416);
    server.shutdown().await;
}

// ---- Chromium ------------------------------------------------------------------------------

/// One browser at a time: they are heavy on a 2-core machine.
static CHROMIUM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Generous bounds for the page to change at all (a failure, not a measurement).
const PAGE: Duration = Duration::from_secs(15);

fn epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("as set up")
        .as_secs_f64()
        * 1000.0
}

async fn shot(browser: &Browser, name: &str) {
    browser
        .screenshot(&browser::screenshot_dir().join(format!("{name}.png")))
        .await;
}

/// Opens the console and signs in with `token` through its form.
async fn sign_in_page(browser: &Browser, server: &TestServer, token: &str) {
    browser
        .goto(&format!("http://{}/", server.admin_addr))
        .await;
    let field = browser.element("form input[name=token]", PAGE).await;
    browser.type_text(&field, token).await;
    let submit = browser.element("form button[type=submit]", PAGE).await;
    browser.click(&submit).await;
    assert!(
        browser
            .wait_for("#nav:not([hidden]) a[data-nav=live]", PAGE)
            .await,
        "signed in"
    );
    let stored = browser
        .execute(
            "return JSON.stringify(localStorage) + document.cookie + location.href;",
            json!([]),
        )
        .await;
    let stored = stored.as_str().unwrap_or_default();
    assert!(
        !stored.contains(token),
        "the token is kept nowhere a script can read: {stored}"
    );
}

/// Records, in the page, when each `[data-call-id]` row appears and leaves (epoch ms).
async fn watch_rows(browser: &Browser) {
    browser
        .execute(
            "window.seen = {};
             const note = (node, key) => {
               if (node.nodeType !== 1) return;
               for (const el of [node, ...node.querySelectorAll('[data-call-id]')]) {
                 const id = el.getAttribute && el.getAttribute('data-call-id');
                 if (id) { window.seen[id] = window.seen[id] || {}; window.seen[id][key] = Date.now(); }
               }
             };
             new MutationObserver((list) => {
               for (const m of list) {
                 m.addedNodes.forEach((n) => note(n, 'added'));
                 m.removedNodes.forEach((n) => note(n, 'removed'));
               }
             }).observe(document.body, {subtree: true, childList: true});",
            json!([]),
        )
        .await;
}

/// When the page saw row `id` appear or leave (`key`), epoch ms.
async fn seen(browser: &Browser, id: &str, key: &str) -> f64 {
    assert!(
        browser
            .wait_until(
                "window.seen[args[0]] && window.seen[args[0]][args[1]]",
                json!([id, key]),
                PAGE
            )
            .await,
        "row {id} {key}"
    );
    browser
        .execute(
            "return window.seen[arguments[0]][arguments[1]];",
            json!([id, key]),
        )
        .await
        .as_f64()
        .expect("as set up")
}

/// Starts an inbound call; returns the phone, when its first message went, and its id.
async fn place_call(server: &TestServer, cookie: &str, external_id: &str) -> (Phone, f64, String) {
    let mut phone = server.phone("/").await;
    let sent = epoch_ms();
    phone.text(incoming_call(external_id)).await;
    assert_eq!(phone.recv_json().await, json!({"event": "answer"}));
    let list = send(
        server.admin_addr,
        "GET",
        "/api/calls?live=true&limit=1000",
        None,
        &[("Cookie", cookie)],
    )
    .await;
    let id = json_of(&list)["calls"]
        .as_array()
        .expect("as set up")
        .iter()
        .find(|c| c["external_id"] == external_id)
        .expect("the live call is listed")["id"]
        .as_str()
        .expect("as set up")
        .to_owned();
    (phone, sent, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_an_operator_watches_live_calls_and_hangs_one_up() {
    if !browser::enabled() {
        eprintln!("CALLGATE_TEST_CHROMIUM is not 1: browser test skipped");
        return;
    }
    let _one = CHROMIUM.lock().await;
    let server = callgate_testkit::spawn_server_with_agent(Arc::new(Chatty), |c| {
        c.admin_auth = tokens();
    })
    .await;
    let cookie = sign_in(server.admin_addr, READ).await;
    let browser = Browser::start("en-US").await;
    sign_in_page(&browser, &server, OPERATOR).await;
    assert!(
        browser.wait_for("[data-live-mode=stream]", PAGE).await,
        "Live follows the event stream"
    );
    watch_rows(&browser).await;

    // A call appears within 1 s of the phone's first message...
    let (mut phone, sent, id) = place_call(&server, &cookie, "live-1").await;
    let added = seen(&browser, &id, "added").await;
    eprintln!(
        "on Live {:.0} ms after the phone's first message",
        added - sent
    );
    assert!(
        added - sent < 1000.0,
        "on Live {:.0} ms after the phone's first message",
        added - sent
    );
    let row = format!("[data-call-id=\"{id}\"]");
    assert!(
        browser
            .wait_for(&format!("{row} [data-action=hangup]"), PAGE)
            .await
    );
    // The agent's greeting turn is the call's last line.
    assert!(
        browser
            .wait_until(
                "document.querySelector(args[0]).textContent.includes('Hello, this is the front desk.')",
                json!([format!("{row} td.last")]),
                PAGE
            )
            .await,
        "the last transcript line on Live"
    );
    shot(&browser, "live-operator").await;
    // ...and leaves within 1 s of the phone's hang-up.
    let hung = epoch_ms();
    phone.text(r#"{"event":"hangup"}"#).await;
    let removed = seen(&browser, &id, "removed").await;
    eprintln!(
        "off Live {:.0} ms after the phone's hang-up",
        removed - hung
    );
    assert!(
        removed - hung < 1000.0,
        "left Live {:.0} ms after the hang-up",
        removed - hung
    );
    phone.text(cdr("live-1")).await;
    phone.closed().await;

    // The operator hangs up a live call from the page.
    let (mut phone, _, id) = place_call(&server, &cookie, "live-2").await;
    let row = format!("[data-call-id=\"{id}\"]");
    let hangup = browser
        .element(&format!("{row} [data-action=hangup]"), PAGE)
        .await;
    browser.click(&hangup).await;
    let confirm = browser
        .element(&format!("{row} button[data-action=confirm]"), PAGE)
        .await;
    let clicked = epoch_ms();
    browser.click(&confirm).await;
    loop {
        match phone.recv().await {
            Received::Text(text) if text.contains("hangup") => break,
            Received::Close(..) | Received::Eof => break,
            _ => {}
        }
    }
    let heard = epoch_ms();
    eprintln!(
        "the phone heard the hang-up {:.0} ms after the click",
        heard - clicked
    );
    assert!(
        heard - clicked < 1000.0,
        "the phone heard the hang-up {:.0} ms after the click",
        heard - clicked
    );
    phone.text(cdr("live-2")).await;
    phone.closed().await;
    let record = send(
        server.admin_addr,
        "GET",
        &format!("/api/calls/{id}"),
        None,
        &[("Cookie", &cookie)],
    )
    .await;
    assert_eq!(
        json_of(&record)["end_reason"],
        "operator_hangup",
        "{}",
        record.text()
    );
    assert!(
        browser.wait_gone(&row, PAGE).await,
        "the ended call leaves Live"
    );

    // Calls and Nodes.
    let calls = browser.element("a[data-nav=calls]", PAGE).await;
    browser.click(&calls).await;
    assert!(
        browser
            .wait_for(&format!("a[data-call-link=\"{id}\"]"), PAGE)
            .await
    );
    shot(&browser, "calls").await;
    let nodes = browser.element("a[data-nav=nodes]", PAGE).await;
    browser.click(&nodes).await;
    assert!(
        browser
            .wait_for("table.nodes tbody tr[data-node-id]", PAGE)
            .await
    );
    shot(&browser, "nodes").await;
    browser.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_the_read_role_sees_no_buttons_in_korean_or_english() {
    if !browser::enabled() {
        eprintln!("CALLGATE_TEST_CHROMIUM is not 1: browser test skipped");
        return;
    }
    let _one = CHROMIUM.lock().await;
    let server = spawn_server(|c| c.admin_auth = tokens()).await;
    let cookie = sign_in(server.admin_addr, READ).await;
    let browser = Browser::start("ko-KR").await;
    browser
        .goto(&format!("http://{}/", server.admin_addr))
        .await;
    assert!(browser.wait_for("form button[type=submit]", PAGE).await);
    let korean = browser
        .execute(
            "return document.querySelector('form button[type=submit]').textContent;",
            json!([]),
        )
        .await;
    assert_eq!(
        korean, "로그인",
        "the browser's language (Korean) is followed"
    );
    shot(&browser, "sign-in-ko").await;
    sign_in_page(&browser, &server, READ).await;
    let (mut phone, _, id) = place_call(&server, &cookie, "read-1").await;
    let row = format!("[data-call-id=\"{id}\"]");
    assert!(browser.wait_for(&row, PAGE).await);
    assert!(
        browser
            .find(&format!("{row} [data-action=hangup]"))
            .await
            .is_none()
            && browser.find("[data-action=hangup]").await.is_none(),
        "the read role has no hang-up button"
    );
    let nav = browser
        .execute(
            "return document.querySelector('a[data-nav=live]').textContent;",
            json!([]),
        )
        .await;
    assert_eq!(nav, "실시간");
    shot(&browser, "live-read-ko").await;
    // Switched to English.
    let switch = browser.element("[data-action=lang]", PAGE).await;
    browser.click(&switch).await;
    assert!(
        browser
            .wait_until(
                "document.querySelector('a[data-nav=live]').textContent === 'Live'",
                json!([]),
                PAGE
            )
            .await,
        "the switch changes the language"
    );
    assert_eq!(
        browser
            .execute("return document.documentElement.lang;", json!([]))
            .await,
        "en"
    );
    assert!(
        browser.wait_for(&row, PAGE).await,
        "the Live page is drawn again"
    );
    assert!(browser.find("[data-action=hangup]").await.is_none());
    shot(&browser, "live-read-en").await;
    phone.text(r#"{"event":"hangup"}"#).await;
    phone.text(cdr("read-1")).await;
    phone.closed().await;
    browser.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_a_finished_calls_page_shows_its_transcript_timeline_and_recording() {
    if !browser::enabled() {
        eprintln!("CALLGATE_TEST_CHROMIUM is not 1: browser test skipped");
        return;
    }
    let _one = CHROMIUM.lock().await;
    let server = callgate_testkit::spawn_server_with_agent(Arc::new(Chatty), |c| {
        c.record = true;
    })
    .await;
    let id = finished_call(&server, "done-1").await;
    let browser = Browser::start("en-US").await;
    browser
        .goto(&format!("http://{}/#/calls", server.admin_addr))
        .await;
    let link = browser
        .element(&format!("a[data-call-link=\"{id}\"]"), PAGE)
        .await;
    browser.click(&link).await;
    assert!(
        browser.wait_for("ol.timeline li[data-turn]", PAGE).await,
        "the transcript"
    );
    let texts = browser
        .execute(
            "return [...document.querySelectorAll('ol.timeline li')].map((li) => li.className + ':' + li.textContent);",
            json!([]),
        )
        .await;
    let texts = texts.to_string();
    assert!(texts.contains("Hello, this is the front desk."), "{texts}");
    assert!(texts.contains("I pressed 5"), "{texts}");
    assert!(
        texts.contains("event:"),
        "events on the same timeline: {texts}"
    );
    let record = browser
        .execute(
            "return [...document.querySelectorAll('dl.record dd')].map((dd) => dd.textContent);",
            json!([]),
        )
        .await
        .to_string();
    assert!(
        record.contains("01099998888") && record.contains(&id),
        "the record: {record}"
    );
    let page = browser
        .execute(
            "return document.getElementById('main').textContent;",
            json!([]),
        )
        .await
        .to_string();
    assert!(
        !page.contains("[object"),
        "nothing is drawn as an object's name: {page}"
    );
    // The recording plays: the browser read its header through the session (no token here:
    // this server has none) and knows its length; the waveform was computed from it.
    let loaded = browser
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const audio = document.querySelector('audio[data-recording]');
             const report = () => done({ready: audio.readyState, duration: audio.duration, error: audio.error && audio.error.code});
             if (audio.readyState >= 1) report();
             else { audio.addEventListener('loadedmetadata', report); audio.addEventListener('error', report); }",
            json!([]),
        )
        .await;
    assert!(loaded["ready"].as_u64().unwrap_or(0) >= 1, "{loaded}");
    let duration = loaded["duration"].as_f64().unwrap_or(0.0);
    assert!(duration > 0.5, "{loaded}");
    assert!(
        browser
            .wait_for("canvas[data-waveform][data-peaks]", PAGE)
            .await,
        "the waveform"
    );
    // A click on the caller's turn moves the player there.
    let turn = browser.element("ol.timeline li.turn.caller", PAGE).await;
    let start_ms = browser
        .execute(
            "return Number(document.querySelector('ol.timeline li.turn.caller').dataset.startMs);",
            json!([]),
        )
        .await
        .as_f64()
        .expect("as set up");
    assert!(
        start_ms > 500.0,
        "the caller's turn is past the start: {start_ms}"
    );
    browser.click(&turn).await;
    let at = browser
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const audio = document.querySelector('audio[data-recording]');
             if (!audio.seeking && audio.currentTime > 0) done(audio.currentTime);
             else audio.addEventListener('seeked', () => done(audio.currentTime), {once: true});",
            json!([]),
        )
        .await
        .as_f64()
        .expect("as set up");
    assert!(
        at >= start_ms / 1000.0 - 0.05,
        "the player jumped to {at} s, the turn is at {start_ms} ms"
    );
    shot(&browser, "call").await;
    browser.close().await;
    server.shutdown().await;
}
