//! Who may place a call, over real sockets: each key form accepted, a missing or wrong key
//! refused at the upgrade (no record), the allowlist and trusted proxies, a key limited to
//! some routes, the record naming the key, and key rotation without a restart.

use callgate_server::auth::Secret;
use callgate_server::call_auth::{CallAuth, CallKey};
use callgate_server::routes::parse_spec;
use callgate_testkit::{Phone, callbridge_start, incoming_call, spawn_server};
use serde_json::json;

const PROD: &str = "cb-prod-key-0123456789";
const SALES: &str = "sales-only-key-0123456789";

fn key(name: &str, secret: &str, routes: Option<&[&str]>) -> CallKey {
    CallKey::new(
        name,
        Secret::from_text(secret).expect("a long enough secret"),
        routes.map(|r| r.iter().map(|s| (*s).to_owned()).collect()),
    )
}

#[tokio::test]
async fn keys_guard_the_call_port_before_any_websocket_exists() {
    let server = spawn_server(|c| {
        c.call_auth = CallAuth {
            keys: vec![
                key("callbridge-prod", PROD, None),
                key("sales", SALES, Some(&["sales"])),
            ],
            allow: vec!["127.0.0.0/8".parse().unwrap()],
            trusted_proxies: vec!["127.0.0.1/32".parse().unwrap()],
            ..CallAuth::default()
        };
        c.routes = vec![
            parse_spec(
                json!({"name": "sales", "agent": "echo", "match": {"callee": "0700*"}}),
                0,
            )
            .unwrap(),
            parse_spec(json!({"name": "main", "agent": "echo"}), 1).unwrap(),
        ];
    })
    .await;
    let url = server.url("/");
    // No key, a wrong key: refused at the upgrade with 401 and a reason.
    let (status, body) = Phone::try_connect(&url, &[]).await.err().expect("refused");
    assert_eq!(status, 401);
    assert!(body.contains("API key is required"), "{body}");
    let (status, body) = Phone::try_connect(&url, &[("x-api-key", "wrong-key-0123456789")])
        .await
        .err()
        .expect("refused");
    assert_eq!(status, 401);
    let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON refusal");
    assert_eq!(body, json!({"code": "bad_key", "error": "invalid API key"}));
    // Each form of the key is accepted.
    let bearer = format!("Bearer {PROD}");
    let shouted = format!("BEARER {PROD}");
    for (n, (url, headers)) in [
        (url.clone(), vec![("authorization", bearer.as_str())]),
        (url.clone(), vec![("authorization", shouted.as_str())]),
        (url.clone(), vec![("x-api-key", PROD)]),
        (format!("{url}?apiKey={PROD}"), vec![]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut phone = Phone::try_connect(&url, &headers).await.expect("admitted");
        phone.text(callbridge_start(&format!("keyed-{n}"))).await;
        assert_eq!(phone.recv().await.json()["type"], "started");
        phone.close(1000, "bye").await;
        let record = server.ended_call(&format!("keyed-{n}")).await;
        assert_eq!(record["key_name"], "callbridge-prod");
    }
    // A key limited to the sales route: a call it cannot route is refused as no_route.
    let mut phone = Phone::try_connect(&url, &[("x-api-key", SALES)])
        .await
        .expect("admitted");
    phone.text(incoming_call("sales-elsewhere")).await;
    assert_eq!(phone.closed().await.0, 1008);
    let record = server.ended_call("sales-elsewhere").await;
    assert_eq!(record["end_reason"], "no_route");
    assert_eq!(record["key_name"], "sales");
    let mut phone = Phone::try_connect(&url, &[("x-api-key", SALES)])
        .await
        .expect("admitted");
    phone
        .text(
            json!({"event": "incoming_call", "callerId": "1", "didNumber": "07001",
            "sessionId": "sales-ok"})
            .to_string(),
        )
        .await;
    assert_eq!(phone.recv().await.json(), json!({"event": "answer"}));
    phone.close(1000, "bye").await;
    assert_eq!(server.ended_call("sales-ok").await["route"], "sales");
    // From behind the trusted proxy (127.0.0.1), the forwarded client must be allowed too.
    let (status, body) = Phone::try_connect(
        &url,
        &[("x-api-key", PROD), ("x-forwarded-for", "198.51.100.7")],
    )
    .await
    .err()
    .expect("not on the allowlist");
    assert_eq!(status, 403, "{body}");
    // A forged line before the proxy's own: every line is read, from the right.
    let (status, body) = Phone::try_connect(
        &url,
        &[
            ("x-api-key", PROD),
            ("x-forwarded-for", "127.0.0.5"),
            ("x-forwarded-for", "198.51.100.7"),
        ],
    )
    .await
    .err()
    .expect("the proxy's line names a client off the allowlist");
    assert_eq!(status, 403, "{body}");
    // A last hop that is not an address never falls back to the (allowed) proxy.
    for hop in [
        "unknown",
        "8.8.8.8:4444",
        "[2001:db8::1]:443",
        "proxy.internal",
    ] {
        let (status, body) =
            Phone::try_connect(&url, &[("x-api-key", PROD), ("x-forwarded-for", hop)])
                .await
                .err()
                .unwrap_or_else(|| panic!("{hop} must be refused"));
        assert_eq!(status, 403, "{hop}: {body}");
    }
    // A hop with a port is its address.
    let mut phone = Phone::try_connect(
        &url,
        &[("x-api-key", PROD), ("x-forwarded-for", "127.0.0.9:5555")],
    )
    .await
    .expect("an allowed client behind the proxy");
    phone.text(callbridge_start("forwarded-port")).await;
    assert_eq!(phone.recv().await.json()["type"], "started");
    phone.close(1000, "bye").await;
    server.ended_call("forwarded-port").await;
    // Refusals hold nothing: no record, a metric by reason.
    let calls = server.calls().await;
    assert_eq!(calls.len(), 7, "only admitted calls have records");
    let metrics = server.metrics_text().await;
    assert!(metrics.contains(r#"reason="missing_key"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"reason="bad_key"} 1"#));
    assert!(metrics.contains(r#"reason="address_not_allowed"} 6"#));
    assert!(!metrics.contains(PROD));

    // Rotation: a new key is in force for new connections at once, the old one is gone.
    server.call_auth.replace(CallAuth {
        keys: vec![key("callbridge-next", "cb-next-key-0123456789", None)],
        ..CallAuth::default()
    });
    assert_eq!(
        Phone::try_connect(&url, &[("x-api-key", PROD)])
            .await
            .err()
            .map(|e| e.0),
        Some(401)
    );
    let mut phone = Phone::try_connect(&url, &[("x-api-key", "cb-next-key-0123456789")])
        .await
        .expect("the new key");
    phone.text(callbridge_start("rotated")).await;
    assert_eq!(phone.recv().await.json()["type"], "started");
    phone.close(1000, "bye").await;
    assert_eq!(
        server.ended_call("rotated").await["key_name"],
        "callbridge-next"
    );
    server.shutdown().await;
}
