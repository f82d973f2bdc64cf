//! Notices: what happened to a call (or a node), as the live event stream and webhooks tell
//! it. The writer makes them from the operations of a batch, and hands them to its [`Tap`]
//! only after the batch committed, so nothing is announced that the store does not hold.
//!
//! A notice's body is the Standard Webhooks shape: `{"type", "timestamp", "data"}`, with
//! `data.call_id` and `data.external_id` on every call notice.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use crate::{CallId, Ended, NewCall, NewEvent, NewTranscriptEntry, UnixMillis};

/// The types of notices, with their stable names (`call.started`...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// A call's record was created (protocol, caller, callee, route, agent, node).
    CallStarted,
    /// The call was answered (`answered_at`).
    CallAnswered,
    /// A key from the caller (`digit`, `source`).
    CallDtmf,
    /// A finished transcript turn (`speaker`, `text`, `start_ms`, `end_ms`, `interrupted`).
    CallTranscript,
    /// The call ended (`reason`, `hangup_by`, `duration_ms`).
    CallEnded,
    /// This node serves calls again (after an undrain, or at start).
    NodeServing,
    /// This node drains: it takes no new calls, live calls go on.
    NodeDraining,
    /// This node stops.
    NodeStopping,
    /// Another node's heartbeat lapsed: it was declared dead and its open records closed.
    NodeLost,
}

impl Kind {
    /// Every kind, in documentation order.
    pub const ALL: [Self; 9] = [
        Self::CallStarted,
        Self::CallAnswered,
        Self::CallDtmf,
        Self::CallTranscript,
        Self::CallEnded,
        Self::NodeServing,
        Self::NodeDraining,
        Self::NodeStopping,
        Self::NodeLost,
    ];

    /// The stable name (`call.started`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CallStarted => "call.started",
            Self::CallAnswered => "call.answered",
            Self::CallDtmf => "call.dtmf",
            Self::CallTranscript => "call.transcript",
            Self::CallEnded => "call.ended",
            Self::NodeServing => "node.serving",
            Self::NodeDraining => "node.draining",
            Self::NodeStopping => "node.stopping",
            Self::NodeLost => "node.lost",
        }
    }

    /// The kind with this name; `None` for an unknown name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// One event, as the stream and webhooks carry it.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// Unique and stable: `msg_` and a UUIDv7 in hex (so ids sort by creation). The SSE `id:`
    /// and the webhook's `webhook-id` (the same on every retry).
    pub id: String,
    /// What happened.
    pub kind: Kind,
    /// When it happened.
    pub at: UnixMillis,
    /// The event's fields (for a call: `call_id`, `external_id` and the event's own).
    pub data: Map<String, Value>,
}

impl Notice {
    /// A notice with a fresh id.
    pub fn new(kind: Kind, at: UnixMillis, data: Map<String, Value>) -> Self {
        Self {
            id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
            kind,
            at,
            data,
        }
    }

    /// The JSON body, Standard Webhooks shape: `{"type","timestamp","data"}`.
    pub fn body(&self) -> String {
        json!({
            "type": self.kind.as_str(),
            "timestamp": self.at.to_rfc3339(),
            "data": self.data,
        })
        .to_string()
    }
}

/// Where the writer hands the notices of each committed batch. Called on the writer thread:
/// an implementation must never block (it delays every write of every call).
pub trait Tap: Send + Sync + 'static {
    /// The notices of one committed batch, in the order of its operations.
    fn publish(&self, notices: &[Notice]);
}

/// What the writer remembers of a live call to fill in later notices: its external id and
/// start. Bounded by the live calls: an entry goes when the call ends.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    live: HashMap<CallId, (String, UnixMillis)>,
}

impl Calls {
    fn call_data(&self, id: &CallId) -> Map<String, Value> {
        let external = self.live.get(id).map_or("", |(e, _)| e.as_str());
        let mut data = Map::new();
        data.insert("call_id".into(), id.as_str().into());
        data.insert("external_id".into(), external.into());
        data
    }

    pub(crate) fn started(&mut self, call: &NewCall) -> Notice {
        self.live
            .insert(call.id.clone(), (call.external_id.clone(), call.started_at));
        let mut data = self.call_data(&call.id);
        data.insert("protocol".into(), call.protocol.as_str().into());
        data.insert("caller".into(), call.caller.as_str().into());
        data.insert("callee".into(), call.callee.as_str().into());
        data.insert("route".into(), call.route.clone().into());
        data.insert("agent".into(), call.agent.clone().into());
        data.insert("node".into(), call.node.clone().into());
        data.insert("recording".into(), call.recording.into());
        Notice::new(Kind::CallStarted, call.started_at, data)
    }

    pub(crate) fn answered(&self, id: &CallId, at: UnixMillis) -> Notice {
        let mut data = self.call_data(id);
        data.insert("answered_at".into(), at.to_rfc3339().into());
        Notice::new(Kind::CallAnswered, at, data)
    }

    /// The DTMF among `events` (the other kinds of the event log are not notices).
    pub(crate) fn events(&self, id: &CallId, events: &[NewEvent], out: &mut Vec<Notice>) {
        for e in events.iter().filter(|e| e.kind == "dtmf") {
            let mut data = self.call_data(id);
            if let Ok(Value::Object(detail)) = serde_json::from_str::<Value>(&e.detail) {
                for (k, v) in detail {
                    data.entry(k).or_insert(v);
                }
            }
            out.push(Notice::new(Kind::CallDtmf, e.at, data));
        }
    }

    pub(crate) fn transcript(
        &self,
        id: &CallId,
        entries: &[NewTranscriptEntry],
        out: &mut Vec<Notice>,
    ) {
        let start = self.live.get(id).map(|(_, s)| *s);
        for e in entries {
            let mut data = self.call_data(id);
            data.insert("speaker".into(), e.speaker.as_str().into());
            data.insert("text".into(), e.text.as_str().into());
            data.insert("start_ms".into(), e.start_ms.into());
            data.insert("end_ms".into(), e.end_ms.into());
            data.insert("interrupted".into(), e.interrupted.into());
            // On the call clock: when the turn finished.
            let at = start.map_or_else(UnixMillis::now, |s| {
                UnixMillis(s.0.saturating_add(i64::try_from(e.end_ms).unwrap_or(i64::MAX)))
            });
            out.push(Notice::new(Kind::CallTranscript, at, data));
        }
    }

    /// The end; `None` for a call not live here (a second end is no notice).
    pub(crate) fn ended(&mut self, id: &CallId, ended: &Ended) -> Option<Notice> {
        let mut data = self.call_data(id);
        let (_, started) = self.live.remove(id)?;
        data.insert("reason".into(), ended.reason.as_str().into());
        data.insert("hangup_by".into(), ended.hangup_by.as_str().into());
        data.insert(
            "duration_ms".into(),
            ended.at.0.saturating_sub(started.0).max(0).into(),
        );
        Some(Notice::new(Kind::CallEnded, ended.at, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("call.nope"), None);
    }

    #[test]
    fn body_has_the_standard_webhooks_shape() {
        let mut data = Map::new();
        data.insert("call_id".into(), "c".into());
        let n = Notice::new(Kind::CallEnded, UnixMillis(1_700_000_000_123), data);
        assert!(n.id.starts_with("msg_") && n.id.len() == 36, "{}", n.id);
        let v: Value = serde_json::from_str(&n.body()).unwrap();
        assert_eq!(v["type"], "call.ended");
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["data"]["call_id"], "c");
    }
}
