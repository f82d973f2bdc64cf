//! Two real `callgate serve` processes on one PostgreSQL database (`CALLGATE_TEST_PG`, a
//! schema of each test's own; says SKIPPED otherwise): any node lists, reads and hangs up a
//! call the other holds (forwarded with the cluster secret; the owner refuses a wrong or
//! missing one), and `kill -9` of one node with calls live: its calls are closed as
//! `interrupted` by the other with `node_lost`, the survivor's calls untouched, and the
//! killed node restarted neither reopens nor ends them again.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use callgate_testkit::pg::Schema;
use callgate_testkit::sse::EventStream;
use callgate_testkit::{Phone, Received, TempDir, http, incoming_call};
use common::Proc;
use serde_json::Value;

const SECRET: &str = "cluster-process-test-secret-0123456789";
const NODE_TIMEOUT_S: i64 = 5;

/// A node of the cluster: `callgate serve` on the schema as `id`, with the cluster secret
/// and the extra environment `env`.
fn node(
    schema: &Schema,
    data: &TempDir,
    id: &str,
    config: Option<&std::path::Path>,
    env: &[(&str, &str)],
) -> Proc {
    let timeout = format!("{NODE_TIMEOUT_S}s");
    let mut all = vec![
        ("CALLGATE_STORE_URL", schema.url.as_str()),
        ("CALLGATE_NODE_ID", id),
        ("CALLGATE_NODE_TIMEOUT", timeout.as_str()),
        ("CALLGATE_CLUSTER_TOKEN_ENV", "CG_CLUSTER_SECRET"),
        ("CG_CLUSTER_SECRET", SECRET),
    ];
    all.extend_from_slice(env);
    Proc::serve_on(data, config, Some("127.0.0.1:0"), &all)
}

/// `method path` with these headers: status and JSON body.
async fn call_api(
    admin: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let (status, body) = http::request_with(admin, method, path, None, headers).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// Polls `path` until `want` holds: for the roster, which the heartbeat thread writes every
/// 2 s outside the store writer, so no event announces it. What the store writer commits
/// (calls started, ended, a node declared lost) is awaited on the event stream instead.
async fn until(
    admin: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    want: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    for _ in 0..3000 {
        let (status, body) = call_api(admin, "GET", path, headers).await;
        if status == 200 && want(&body) {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{path} never matched; last {last}");
}

/// An answered inbound call whose echo works.
async fn live_call(node: &Proc, id: &str) -> Phone {
    let mut phone = Phone::connect(&node.url()).await;
    phone.text(incoming_call(id)).await;
    assert_eq!(phone.recv_json().await["event"], "answer");
    echoes(&mut phone).await;
    phone
}

/// The call echoes: a frame sent comes back. A call task the machine wakes late may drop a
/// frame whose time has passed (the playout's stall policy, by design), so a frame is sent
/// again when none came back within a second, at most 20 times.
async fn echoes(phone: &mut Phone) {
    for _ in 0..20 {
        phone.binary(vec![7u8; 320]).await;
        let echoed = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match phone.recv().await {
                    Received::Binary(_) => return,
                    Received::Text(_) => {}
                    other => panic!("the call ended: {other:?}"),
                }
            }
        })
        .await;
        if echoed.is_ok() {
            return;
        }
    }
    panic!("20 frames sent, none echoed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_lists_reads_and_hangs_up_a_call_the_other_node_holds() {
    let Some(schema) = Schema::new("any_node_answers") else {
        return;
    };
    // Each node has its own operator token: B's is worth nothing at A.
    let conf = TempDir::new("cluster-conf");
    let config = conf.path().join("node.toml");
    std::fs::write(
        &config,
        "agent = \"echo\"\n[admin]\ntokens = [{ name = \"ops\", role = \"operator\", \
         token_env = \"CG_OPS\" }]\n[cluster]\ntoken_env = \"CG_CLUSTER_SECRET\"\n",
    )
    .expect("config");
    let (ops_a, ops_b) = (
        "operator-token-of-node-a-0001",
        "operator-token-of-node-b-0002",
    );
    let (data_a, data_b) = (TempDir::new("cluster-a"), TempDir::new("cluster-b"));
    let a = node(
        &schema,
        &data_a,
        "node-a",
        Some(&config),
        &[("CG_OPS", ops_a)],
    );
    let b = node(
        &schema,
        &data_b,
        "node-b",
        Some(&config),
        &[("CG_OPS", ops_b)],
    );
    let bearer_b = format!("Bearer {ops_b}");
    let as_b: &[(&str, &str)] = &[("Authorization", &bearer_b)];
    let bearer_a = format!("Bearer {ops_a}");
    // What A commits (the call's start and end) is announced on A's stream.
    let mut a_events = EventStream::open(a.admin, &[("Authorization", bearer_a.as_str())]).await;

    let mut phone = live_call(&a, "held-by-a").await;
    a_events.wait_for_call("call.started", "held-by-a").await;
    // B lists it live on A, and reads it.
    let (status, listed) = call_api(b.admin, "GET", "/api/calls?live=true&node=node-a", as_b).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(
        listed["calls"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    let id = listed["calls"][0]["id"].as_str().expect("id").to_owned();
    assert_eq!(listed["calls"][0]["external_id"], "held-by-a");
    let (status, record) = call_api(b.admin, "GET", &format!("/api/calls/{id}"), as_b).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["node"], "node-a");
    assert!(record["ended_at"].is_null());

    // A refuses what does not carry its own token or the cluster secret.
    let hangup = format!("/api/calls/{id}/hangup");
    let (status, body) = call_api(a.admin, "POST", &hangup, &[]).await;
    assert_eq!(status, 401, "no token, no secret: {body}");
    let (status, body) = call_api(a.admin, "POST", &hangup, as_b).await;
    assert_eq!(status, 401, "B's token is not A's: {body}");
    let wrong = [(
        "x-callgate-cluster-token",
        "cluster-process-test-secret-012345678X",
    )];
    let (status, body) = call_api(a.admin, "POST", &hangup, &wrong).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "cluster_token_refused");
    echoes(&mut phone).await;

    // Hang it up through B, with B's token: forwarded to A with the secret.
    let (status, body) = call_api(b.admin, "POST", &hangup, as_b).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "hangup_sent");
    loop {
        match phone.recv().await {
            Received::Binary(_) => {}
            other => {
                assert_eq!(other.json()["event"], "hangup");
                break;
            }
        }
    }
    a_events.wait_for_call("call.ended", "held-by-a").await;
    let (status, ended) = call_api(b.admin, "GET", &format!("/api/calls/{id}"), as_b).await;
    assert_eq!(status, 200, "{ended}");
    assert_eq!(ended["end_reason"], "operator_hangup");
    assert_eq!(ended["node"], "node-a");
    // Both sides logged it, A naming who forwarded it and for which token.
    let line = b.wait_for("Operator request forwarded to the node that holds the call.");
    assert!(line.contains("node-a") && line.contains("ops"), "{line}");
    let line = a.wait_for("Operator request forwarded by another node.");
    assert!(line.contains("node-b"), "{line}");
    drop((a, b));
    drop(schema);
}

/// The events of call `id` as (kind, detail).
async fn events(admin: SocketAddr, id: &str) -> Vec<(String, Value)> {
    let (status, body) = call_api(admin, "GET", &format!("/api/calls/{id}/events"), &[]).await;
    assert_eq!(status, 200, "{body}");
    body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or("").to_owned(),
                e["detail"].clone(),
            )
        })
        .collect()
}

#[test]
fn times_with_a_short_fraction_or_none_are_read() {
    let base = parse_ms("2026-12-07T21:01:29Z");
    assert_eq!(parse_ms("2026-12-07T21:01:29.9Z"), base + 900);
    assert_eq!(parse_ms("2026-12-07T21:01:29.09Z"), base + 90);
    assert_eq!(parse_ms("2026-12-07T21:01:29.123Z"), base + 123);
}

fn now_ms() -> i64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    i64::try_from(ms).expect("ms")
}

/// RFC 3339 UTC (as the API writes times: the fraction of a second has its trailing zeros
/// cut, `...29.9Z`, or is absent) to Unix milliseconds.
fn parse_ms(text: &str) -> i64 {
    let p = |r: std::ops::Range<usize>| -> i64 { text[r].parse().expect("number") };
    let (y, mo, d) = (p(0..4), p(5..7), p(8..10));
    let (h, mi, s) = (p(11..13), p(14..16), p(17..19));
    let ms = match text[19..].trim_end_matches('Z').strip_prefix('.') {
        Some(fraction) => format!("{fraction:0<3}")[..3]
            .parse()
            .expect("milliseconds"),
        None => 0,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + h) * 60 + mi) * 60_000 + s * 1000 + ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_its_calls_are_closed_by_the_other_once_and_stay_closed() {
    let Some(schema) = Schema::new("kill_9_node") else {
        return;
    };
    let (data_a, data_b) = (TempDir::new("kill-a"), TempDir::new("kill-b"));
    let mut a = node(&schema, &data_a, "node-a", None, &[]);
    let b = node(&schema, &data_b, "node-b", None, &[]);
    let (mut a_events, mut b_events) = (
        EventStream::open(a.admin, &[]).await,
        EventStream::open(b.admin, &[]).await,
    );
    let mut a_phones = vec![live_call(&a, "a-1").await, live_call(&a, "a-2").await];
    let mut b_phone = live_call(&b, "b-1").await;
    a_events.wait_for_call("call.started", "a-1").await;
    a_events.wait_for_call("call.started", "a-2").await;
    b_events.wait_for_call("call.started", "b-1").await;
    drop(a_events);
    let listed = |path: &'static str, n: usize| async move {
        let (status, body) = call_api(b.admin, "GET", path, &[]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["calls"].as_array().map(Vec::len),
            Some(n),
            "{path}: {body}"
        );
        body
    };
    let on_a = listed("/api/calls?live=true&node=node-a", 2).await;
    let a_ids: Vec<String> = on_a["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_owned())
        .collect();
    let on_b = listed("/api/calls?live=true&node=node-b", 1).await;
    let b_id = on_b["calls"][0]["id"].as_str().expect("id").to_owned();

    let killed_at = now_ms();
    a.child.kill().expect("SIGKILL");
    a.child.wait().expect("reaped");
    for phone in &mut a_phones {
        assert_eq!(phone.closed().await.0, 1006, "died with the process");
    }
    // Until the sweep, an action on A's call cannot reach A: a 502 naming it (or, once B
    // has closed the call, B's own 409).
    let (status, body) = call_api(
        b.admin,
        "POST",
        &format!("/api/calls/{}/hangup", a_ids[0]),
        &[],
    )
    .await;
    match status {
        502 => {
            assert_eq!(body["code"], "node_unreachable", "{body}");
            assert_eq!(body["node"], "node-a");
        }
        409 => assert_eq!(body["code"], "call_not_live", "{body}"),
        _ => panic!("{status} {body}"),
    }

    // B closes A's calls as interrupted, once, with node_lost naming both, and then says
    // so on its stream (the sweep's closes and the roster's `dead` are one transaction).
    b_events
        .wait_for("node.lost of node-a", |e| {
            e.event == "node.lost" && e.data["data"]["node"] == "node-a"
        })
        .await;
    let mut closed = Vec::new();
    for id in &a_ids {
        let (status, r) = call_api(b.admin, "GET", &format!("/api/calls/{id}"), &[]).await;
        assert_eq!(status, 200, "{r}");
        assert!(!r["ended_at"].is_null(), "{r}");
        assert_eq!(r["end_reason"], "interrupted", "{r}");
        assert_eq!(r["hangup_by"], "server");
        assert_eq!(r["node"], "node-a");
        let ended = parse_ms(r["ended_at"].as_str().expect("ended_at"));
        // node_timeout, plus one heartbeat period on each side and scheduling.
        assert!(
            ended - killed_at <= (NODE_TIMEOUT_S + 5) * 1000,
            "closed {} ms after the kill",
            ended - killed_at
        );
        let lost: Vec<_> = events(b.admin, id)
            .await
            .into_iter()
            .filter(|(kind, _)| kind == "node_lost")
            .collect();
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(
            lost[0].1,
            serde_json::json!({"node": "node-a", "closed_by": "node-b"})
        );
        closed.push(r);
    }
    let (status, roster) = call_api(b.admin, "GET", "/api/nodes", &[]).await;
    assert_eq!(status, 200, "{roster}");
    assert!(
        roster["nodes"].as_array().is_some_and(|n| n
            .iter()
            .any(|n| n["id"] == "node-a" && n["state"] == "dead")),
        "{roster}"
    );
    assert_eq!(roster["nodes"].as_array().expect("nodes").len(), 2);
    // B's own call goes on.
    let (_, mine) = call_api(b.admin, "GET", &format!("/api/calls/{b_id}"), &[]).await;
    assert!(mine["ended_at"].is_null(), "{mine}");
    echoes(&mut b_phone).await;

    // A comes back: its calls stay closed as they were, not reopened, not ended again.
    let a2 = node(&schema, &data_a, "node-a", None, &[]);
    until(a2.admin, "/api/nodes", &[], |body| {
        body["nodes"].as_array().is_some_and(|n| {
            n.iter()
                .any(|n| n["id"] == "node-a" && n["state"] == "serving")
        })
    })
    .await;
    for (id, before) in a_ids.iter().zip(&closed) {
        let (_, now) = call_api(a2.admin, "GET", &format!("/api/calls/{id}"), &[]).await;
        assert_eq!(now["ended_at"], before["ended_at"], "{now}");
        assert_eq!(now["end_reason"], "interrupted");
        let kinds: Vec<String> = events(a2.admin, id)
            .await
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            kinds.iter().filter(|k| *k == "node_lost").count(),
            1,
            "{kinds:?}"
        );
    }
    // B's call is still live and untouched by A's start; it ends by the caller.
    echoes(&mut b_phone).await;
    b_phone.text(r#"{"event":"hangup"}"#).await;
    b_events.wait_for_call("call.ended", "b-1").await;
    let (status, done) = call_api(a2.admin, "GET", &format!("/api/calls/{b_id}"), &[]).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["end_reason"], "peer_hangup", "{done}");
    drop((a, a2, b));
    drop(schema);
}
