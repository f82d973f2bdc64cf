//! The Grafana dashboard (`deploy/grafana/callgate.json`) uses only metrics `callgate serve`
//! really exports, each with the type its expression assumes: `_total` a counter, `_bucket` a
//! histogram, a bare name a gauge. Read from the real binary's `/metrics`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use callgate_testkit::{TempDir, http};
use common::Proc;

/// The metric names in a PromQL expression (every `callgate_...` word).
fn names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("callgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The `# TYPE` of each family in an exposition.
fn types(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect()
}

#[tokio::test]
async fn every_dashboard_expression_uses_metrics_the_server_exports() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/callgate.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        exprs.extend(
            targets
                .iter()
                .map(|t| t["expr"].as_str().expect("expr").to_owned()),
        );
    }
    let dir = TempDir::new("grafana");
    let server = Proc::serve(&dir, None);
    let (status, text) = http::request(server.admin, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let exported = types(&text);
    let type_of = |family: &str| {
        exported
            .iter()
            .find(|(n, _)| n == family)
            .map(|(_, t)| t.as_str())
    };
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let found = names(expr);
        assert!(!found.is_empty(), "no callgate metric in {expr}");
        for name in found {
            let (family, want) = if let Some(f) = name.strip_suffix("_total") {
                (f, "counter")
            } else if let Some(f) = name.strip_suffix("_bucket") {
                (f, "histogram")
            } else {
                (name.as_str(), "gauge")
            };
            assert_eq!(
                type_of(family),
                Some(want),
                "{name} in {expr}: /metrics has no {want} {family}"
            );
            used.insert(family.to_owned());
        }
    }
    // The areas the dashboard covers (issue 19): each has at least one of its metrics.
    for area in [
        "callgate_calls_live",
        "callgate_connections_refused",
        "callgate_playout_jitter_seconds",
        "callgate_agent_audio_dropped_frames",
        "callgate_realtime_backend_latency_seconds",
        "callgate_store_backlog",
        "callgate_webhook_attempts",
        "callgate_webhook_pending",
    ] {
        assert!(used.contains(area), "the dashboard shows nothing of {area}");
    }
}

#[test]
fn names_are_read_from_expressions() {
    assert_eq!(
        names(
            "histogram_quantile(0.9, sum by (le) (rate(callgate_a_bucket{x=\"callgate\"}[5m]))) + callgate_b"
        ),
        ["callgate_a_bucket", "callgate_b"]
    );
}
