//! This node in the roster (SQLite: the table holds this node only): `GET /api/nodes`, the
//! record's `node`, the state following a drain, and the row removed at a clean exit.

use std::time::Duration;

use callgate_store::{Registry, SqliteStore, UnixMillis};
use callgate_testkit::{Received, TestServer, incoming_call, spawn_server};
use serde_json::Value;

/// Polls `GET /api/nodes` until `want` holds for the one node listed (the heartbeat runs every
/// 2 s); its last value if it never does.
async fn node_until(server: &TestServer, want: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..1000 {
        let (status, body) = server.get("/api/nodes").await;
        assert_eq!(status, 200, "{body}");
        let nodes = body["nodes"].as_array().expect("nodes").clone();
        assert!(nodes.len() <= 1, "SQLite holds this node only: {body}");
        if let Some(node) = nodes.first() {
            if want(node) {
                return node.clone();
            }
            last = node.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the node never matched; last {last}");
}

#[tokio::test]
async fn the_node_lists_itself_marks_its_records_and_leaves_at_exit() {
    let mut server = spawn_server(|c| c.node_id = "node-x".into()).await;
    let node = node_until(&server, |n| n["live_calls"] == 0).await;
    assert_eq!(node["id"], "node-x");
    assert_eq!(node["state"], "serving");
    assert_eq!(
        node["admin_url"],
        format!("http://{}", server.admin_addr),
        "derived from the admin address bound"
    );
    assert_eq!(node["version"], env!("CARGO_PKG_VERSION"));
    assert!(node["started_at"].is_string() && node["heartbeat_at"].is_string());

    let mut phone = server.phone("/").await;
    phone.text(incoming_call("n-1")).await;
    assert_eq!(phone.recv_json().await["event"], "answer");
    phone.binary(vec![3; 320]).await;
    assert!(matches!(phone.recv().await, Received::Binary(_)));
    let record = server.call("n-1").await;
    assert_eq!(record["node"], "node-x", "{record}");
    let node = node_until(&server, |n| n["live_calls"] == 1).await;
    assert_eq!(node["state"], "serving");

    let (status, body) = server.post("/api/admin/drain", "").await;
    assert_eq!(status, 200, "{body}");
    node_until(&server, |n| n["state"] == "draining").await;

    server.begin_shutdown();
    drop(phone);
    let dir = server.stopped().await;
    // The store is opened (and migrated) before the roster is read, as the server does.
    let _store = SqliteStore::open(dir.path()).expect("store");
    let mut roster = Registry::sqlite(dir.path()).expect("roster");
    let nodes = roster
        .nodes(Duration::from_secs(10), UnixMillis::now())
        .expect("read");
    assert!(nodes.is_empty(), "a clean exit removes the node: {nodes:?}");
}

#[tokio::test]
async fn advertise_admin_is_what_other_nodes_are_told() {
    let server = spawn_server(|c| {
        c.node_id = "node-y".into();
        c.advertise_admin = Some("http://10.0.0.5:4144".into());
    })
    .await;
    let node = node_until(&server, |_| true).await;
    assert_eq!(node["id"], "node-y");
    assert_eq!(node["admin_url"], "http://10.0.0.5:4144");
    server.shutdown().await;
}

/// `GET /api/calls` with the cluster filters, and their bad values refused as 400 `bad_query`.
#[tokio::test]
async fn the_listing_filters_by_live_node_time_and_numbers() {
    let server = spawn_server(|c| c.node_id = "node-z".into()).await;
    let before = "2000-01-01T00:00:00Z";
    let mut phones = Vec::new();
    for id in ["f-1", "f-2"] {
        let mut phone = server.phone("/").await;
        phone.text(incoming_call(id)).await;
        assert_eq!(phone.recv_json().await["event"], "answer");
        phones.push(phone);
    }
    // f-1 ends (the caller hangs up); f-2 stays live.
    let mut first = phones.remove(0);
    first.text(r#"{"event":"hangup"}"#).await;
    first.text(callgate_testkit::cdr("f-1")).await;
    assert_eq!(first.closed().await.0, 1000);
    server.ended_call("f-1").await;
    server.call("f-2").await;
    let ids = |body: &Value| {
        let mut ids: Vec<String> = body["calls"]
            .as_array()
            .expect("calls")
            .iter()
            .map(|c| c["external_id"].as_str().expect("id").to_owned())
            .collect();
        ids.sort();
        ids
    };
    let get = |q: String| {
        let server = &server;
        async move {
            let (status, body) = server.get(&format!("/api/calls?{q}")).await;
            assert_eq!(status, 200, "{q}: {body}");
            body
        }
    };
    assert_eq!(ids(&get("live=true".into()).await), ["f-2"]);
    assert_eq!(ids(&get("live=false".into()).await), ["f-1", "f-2"]);
    assert_eq!(ids(&get("node=node-z".into()).await), ["f-1", "f-2"]);
    assert!(ids(&get("node=other".into()).await).is_empty());
    assert_eq!(ids(&get(format!("since={before}")).await), ["f-1", "f-2"]);
    assert!(ids(&get(format!("until={before}")).await).is_empty());
    // incoming_call's callerId is 01099998888, its didNumber 0212345678.
    assert_eq!(ids(&get("caller=010999*&live=true".into()).await), ["f-2"]);
    assert_eq!(ids(&get("caller=01099998888".into()).await), ["f-1", "f-2"]);
    assert!(ids(&get("caller=010999".into()).await).is_empty());
    assert_eq!(ids(&get("callee=0212345678".into()).await), ["f-1", "f-2"]);
    assert!(ids(&get("callee=03*".into()).await).is_empty());
    for bad in [
        "live=yes",
        "node=a%20b",
        "since=yesterday",
        "until=2026-11-21",
        "caller=*",
        "callee=0*2",
    ] {
        let (status, body) = server.get(&format!("/api/calls?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["code"], "bad_query", "{bad}: {body}");
    }
    drop(phones);
    server.shutdown().await;
}
