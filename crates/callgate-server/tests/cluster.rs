//! Two real nodes on one PostgreSQL database (`CALLGATE_TEST_PG`, a schema of the test's own;
//! says SKIPPED otherwise): any node lists and reads a call the other holds, both nodes are
//! in the roster, and a node whose heartbeat stopped has its open records closed by a
//! survivor with `node_lost`, the survivor's own calls untouched.

use std::time::Duration;

use callgate_store::{CallId, NewCall, NodeInfo, NodeState, PgUrl, Registry, Store, UnixMillis};
use callgate_testkit::pg::Schema;
use callgate_testkit::{TestServer, incoming_call, spawn_server};
use serde_json::Value;

async fn node(url: &PgUrl, id: &str) -> TestServer {
    let (url, id) = (url.clone(), id.to_owned());
    spawn_server(move |c| {
        c.store_url = Some(url);
        c.node_id = id;
        c.node_timeout = Duration::from_secs(5);
    })
    .await
}

/// Polls `path` on `server` until `want` holds (heartbeats and sweeps run every 2 s). For the
/// roster and the sweep's closes, which the heartbeat thread writes outside the store writer
/// (either node may sweep), so no one node's commits announce them.
async fn until(server: &TestServer, path: &str, want: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..1500 {
        let (status, body) = server.get(path).await;
        if status == 200 && want(&body) {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{path} never matched; last {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_answers_for_any_call_and_a_silent_node_is_closed_by_a_survivor() {
    let Some(schema) = Schema::new("cluster") else {
        return;
    };
    let url = PgUrl::parse(&schema.url, None).expect("url");
    let a = node(&url, "node-a").await;
    let b = node(&url, "node-b").await;

    // A call held by A is listed and read by B, live, with its node.
    let mut phone = a.phone("/").await;
    phone.text(incoming_call("held-by-a")).await;
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
    let record = &listed["calls"][0];
    assert_eq!(record["external_id"], "held-by-a");
    assert_eq!(record["node"], "node-a");
    let id = record["id"].as_str().expect("id").to_owned();
    let (status, read) = b.get(&format!("/api/calls/{id}")).await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["node"], "node-a");
    assert!(read["ended_at"].is_null());

    // Both nodes are in the roster, as seen from either.
    let roster = until(&a, "/api/nodes", |body| {
        body["nodes"].as_array().is_some_and(|n| n.len() == 2)
    })
    .await;
    let ids: Vec<&str> = roster["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["node-a", "node-b"]);
    assert!(
        roster["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .all(|n| n["state"] == "serving")
    );

    // A node that stops heartbeating (as a killed process does): "ghost" registered once,
    // long ago, with a live call of its own.
    let url = url.clone();
    let ghost_call = std::thread::spawn(move || {
        let mut roster = Registry::postgres(url.clone());
        let ghost = NodeInfo {
            id: "ghost".into(),
            admin_url: "http://127.0.0.1:9".into(),
            version: "0".into(),
            incarnation: "1".into(),
        };
        let then = UnixMillis(UnixMillis::now().0 - 60_000);
        roster
            .beat(&ghost, NodeState::Serving, 1, then)
            .expect("beat");
        let dir = std::env::temp_dir().join(format!("callgate-ghost-{}", uuid::Uuid::now_v7()));
        let mut store = callgate_store::PgStore::open(&url, &dir).expect("store");
        let id = CallId::new();
        store
            .insert_call(&NewCall {
                id: id.clone(),
                protocol: "inbound".into(),
                caller: "1".into(),
                callee: "2".into(),
                external_id: "held-by-ghost".into(),
                call_config: None,
                phone_output_audio_format: "PCM_8000".into(),
                phone_input_audio_format: "PCM_8000".into(),
                started_at: then,
                recording: false,
                route: None,
                agent: None,
                key_name: None,
                node: Some("ghost".into()),
            })
            .expect("insert");
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
        id
    })
    .join()
    .expect("ghost");
    let closed = until(&b, &format!("/api/calls/{ghost_call}"), |r| {
        !r["ended_at"].is_null()
    })
    .await;
    assert_eq!(closed["end_reason"], "interrupted", "{closed}");
    assert_eq!(closed["hangup_by"], "server");
    let (_, events) = a.get(&format!("/api/calls/{ghost_call}/events")).await;
    let lost: Vec<&Value> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "node_lost")
        .collect();
    assert_eq!(lost.len(), 1, "exactly one survivor closed it: {events}");
    assert_eq!(lost[0]["detail"]["node"], "ghost");
    let closer = lost[0]["detail"]["closed_by"].as_str().expect("closer");
    assert!(["node-a", "node-b"].contains(&closer), "{closer}");
    let roster = until(&b, "/api/nodes", |body| {
        body["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["id"] == "ghost" && n["state"] == "dead"))
    })
    .await;
    assert_eq!(roster["nodes"].as_array().expect("nodes").len(), 3);
    // The live nodes' own call is untouched.
    let (_, still) = b.get(&format!("/api/calls/{id}")).await;
    assert!(still["ended_at"].is_null(), "{still}");

    drop(phone);
    a.shutdown().await;
    // A clean exit leaves the roster.
    until(&b, "/api/nodes", |body| {
        body["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().all(|n| n["id"] != "node-a"))
    })
    .await;
    b.shutdown().await;
    drop(schema);
}
