//! The values of a call record.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A call's ID: a UUIDv7, so IDs sort by creation time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(
        value_type = String,
        format = "uuid",
        example = "0196f3a4-7c1e-7d2a-9b3c-4d5e6f708192"
    )
)]
#[serde(transparent)]
pub struct CallId(String);

impl CallId {
    /// A fresh ID.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// An ID as given, unchecked (the store's own rows, tests); it may name no call.
    pub fn from_string(id: String) -> Self {
        Self(id)
    }

    /// An ID from outside (a URL): the hyphenated form of a UUIDv7 (36 characters, either
    /// case), in the lowercase form the store keeps; `None` for anything else, so a malformed
    /// ID is refused before any lookup.
    pub fn parse(text: &str) -> Option<Self> {
        // `Uuid::try_parse` also takes the simple, braced and URN forms: ours never are.
        if text.len() != 36 {
            return None;
        }
        let uuid = uuid::Uuid::try_parse(text).ok()?;
        (uuid.get_version_num() == 7 && uuid.get_variant() == uuid::Variant::RFC4122)
            .then(|| Self(uuid.hyphenated().to_string()))
    }

    /// The ID's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for CallId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Wall-clock time in milliseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        Self(i64::try_from(ms).unwrap_or(i64::MAX))
    }

    /// Parses an RFC 3339 time (`2026-11-21T10:49:53Z`, `2026-11-21T19:49:53.5+09:00`; a
    /// space or `t` for `T`, `z` for `Z`); `None` if it is not one. Fractions beyond
    /// milliseconds are cut.
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let b = text.as_bytes();
        let num = |r: std::ops::Range<usize>| -> Option<i64> {
            let s = text.get(r)?;
            (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
            return None;
        }
        if !matches!(b[10], b'T' | b't' | b' ') {
            return None;
        }
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        let mut i = 19;
        let mut millis = 0;
        if b[i] == b'.' {
            let start = i + 1;
            i = start;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let digits = text.get(start..i)?;
            if digits.is_empty() {
                return None;
            }
            let ms: String = digits.chars().chain("00".chars()).take(3).collect();
            millis = ms.parse::<i64>().ok()?;
        }
        let offset_minutes = match text.get(i..)? {
            "Z" | "z" => 0,
            tz if tz.len() == 6 && tz.as_bytes()[3] == b':' => {
                let sign = match tz.as_bytes()[0] {
                    b'+' => 1,
                    b'-' => -1,
                    _ => return None,
                };
                let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
                if h > 23 || m > 59 {
                    return None;
                }
                sign * (h * 60 + m)
            }
            _ => return None,
        };
        if hour > 23 || minute > 59 || second > 60 {
            return None;
        }
        let month = time::Month::try_from(u8::try_from(month).ok()?).ok()?;
        let date = time::Date::from_calendar_date(
            i32::try_from(year).ok()?,
            month,
            u8::try_from(day).ok()?,
        )
        .ok()?;
        let days = i64::from(date.to_julian_day()) - 2_440_588;
        // A leap second counts as the second before the next minute.
        let seconds =
            days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_minutes * 60;
        Some(Self(seconds * 1000 + millis))
    }

    /// RFC 3339 with milliseconds, UTC (`2026-11-21T10:49:53.123Z`).
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| self.0.to_string())
    }
}

/// Serialised as [`UnixMillis::to_rfc3339`]: an RFC 3339 string.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for UnixMillis {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .description(Some("RFC 3339 with milliseconds, UTC"))
            .examples([serde_json::json!("2026-11-21T10:49:53.123Z")])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for UnixMillis {}

impl Serialize for UnixMillis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

/// Audio counters of a call (audio payload only, never signalling).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Audio bytes received from the phone side.
    pub bytes_in: u64,
    /// Audio bytes sent to the phone side.
    pub bytes_out: u64,
    /// Audio messages received.
    pub frames_in: u64,
    /// Audio messages sent.
    pub frames_out: u64,
}

/// A call that just started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCall {
    /// Our ID.
    pub id: CallId,
    /// `callbridge` or `inbound`.
    pub protocol: String,
    /// Calling number.
    pub caller: String,
    /// Called number.
    pub callee: String,
    /// The phone system's ID (CallBridge cdrId, inbound sessionId).
    pub external_id: String,
    /// CallBridge's call_config as a JSON object of its fields; `None` for inbound.
    pub call_config: Option<String>,
    /// Format of the audio the phone side sends.
    pub phone_output_audio_format: String,
    /// Format of the audio the phone side receives.
    pub phone_input_audio_format: String,
    /// When the call started.
    #[serde(with = "millis")]
    pub started_at: UnixMillis,
    /// Whether the call is being recorded.
    pub recording: bool,
    /// The name of the route that took the call; `None` if it was refused before routing.
    pub route: Option<String>,
    /// The name of the agent that handled the call; `None` if it was refused before routing.
    pub agent: Option<String>,
    /// The name of the API key the phone system presented; `None` without call keys.
    pub key_name: Option<String>,
    /// The node that holds the call (its `node_id`); `None` only in journals written before
    /// records carried it.
    #[serde(default)]
    pub node: Option<String>,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// When.
    #[serde(with = "millis")]
    pub at: UnixMillis,
    /// A stable end-reason code (`docs/specs/end-reasons.md`).
    pub reason: String,
    /// `peer`, `agent`, `operator` or `server`.
    pub hangup_by: String,
    /// Final audio counters.
    pub counters: Counters,
    /// Digits received, in order.
    pub dtmf: String,
    /// The agent's final usage, a JSON object (`{"input_tokens": 120}`); `None` leaves the
    /// usage last written by [`crate::Store::update_progress`] (or none) in place.
    pub usage: Option<String>,
}

/// One entry to append to a call's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    /// When it happened.
    #[serde(with = "millis")]
    pub at: UnixMillis,
    /// A stable snake_case kind (`dtmf`, `unknown_message`, `protocol_error`...).
    pub kind: String,
    /// Details, a JSON object.
    pub detail: String,
}

/// A call record as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CallRecord {
    /// Our ID.
    pub id: CallId,
    /// `callbridge` or `inbound`.
    pub protocol: String,
    /// Calling number.
    pub caller: String,
    /// Called number.
    pub callee: String,
    /// cdrId (CallBridge) or sessionId (inbound).
    pub external_id: String,
    /// CallBridge's call_config fields (`siteId`, `cdrId`...), or null for inbound.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub call_config: Option<Box<RawValue>>,
    /// The call's audio formats.
    pub audio_format: AudioFormats,
    /// When the call started.
    pub started_at: UnixMillis,
    /// When it was answered.
    pub answered_at: Option<UnixMillis>,
    /// When it ended; null while live.
    pub ended_at: Option<UnixMillis>,
    /// Why it ended.
    pub end_reason: Option<String>,
    /// Who ended it.
    pub hangup_by: Option<String>,
    /// Audio bytes received.
    pub bytes_in: u64,
    /// Audio bytes sent.
    pub bytes_out: u64,
    /// Audio messages received.
    pub frames_in: u64,
    /// Audio messages sent.
    pub frames_out: u64,
    /// Digits received, in order.
    pub dtmf: String,
    /// The phone system's CDR as sent, or null.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub cdr: Option<Box<RawValue>>,
    /// Whether a recording exists (`GET /api/calls/{id}/recording`).
    pub recording: bool,
    /// The route that took the call; null for calls refused before routing and old records.
    pub route: Option<String>,
    /// The agent that handled the call; null for calls refused before routing and old records.
    pub agent: Option<String>,
    /// The agent's usage as stored (a JSON object), or null.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub usage: Option<Box<RawValue>>,
    /// The name of the API key the phone system presented, or null.
    pub key_name: Option<String>,
    /// The node that held the call (its `node_id`); null for records from before nodes.
    pub node: Option<String>,
}

impl CallRecord {
    /// The bytes of its text (the phone's fields, the CDR, usage...): at most the size of its
    /// JSON, which adds keys, numbers and escapes.
    pub fn text_bytes(&self) -> u64 {
        let raw = |v: &Option<Box<RawValue>>| v.as_ref().map_or(0, |r| r.get().len());
        let opt = |v: &Option<String>| v.as_ref().map_or(0, String::len);
        let total = self.id.as_str().len()
            + self.protocol.len()
            + self.caller.len()
            + self.callee.len()
            + self.external_id.len()
            + raw(&self.call_config)
            + self.dtmf.len()
            + raw(&self.cdr)
            + raw(&self.usage)
            + opt(&self.end_reason)
            + opt(&self.hangup_by)
            + opt(&self.route)
            + opt(&self.agent)
            + opt(&self.key_name)
            + opt(&self.node);
        total as u64
    }
}

impl PartialEq for CallRecord {
    fn eq(&self, other: &Self) -> bool {
        let raw = |v: &Option<Box<RawValue>>| v.as_ref().map(|r| r.get().to_owned());
        self.id == other.id
            && self.protocol == other.protocol
            && self.caller == other.caller
            && self.callee == other.callee
            && self.external_id == other.external_id
            && raw(&self.call_config) == raw(&other.call_config)
            && self.audio_format == other.audio_format
            && self.started_at == other.started_at
            && self.answered_at == other.answered_at
            && self.ended_at == other.ended_at
            && self.end_reason == other.end_reason
            && self.hangup_by == other.hangup_by
            && self.bytes_in == other.bytes_in
            && self.bytes_out == other.bytes_out
            && self.frames_in == other.frames_in
            && self.frames_out == other.frames_out
            && self.dtmf == other.dtmf
            && raw(&self.cdr) == raw(&other.cdr)
            && self.recording == other.recording
            && self.route == other.route
            && self.key_name == other.key_name
            && self.node == other.node
            && self.agent == other.agent
            && raw(&self.usage) == raw(&other.usage)
    }
}

/// The two audio formats, named as CallBridge names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AudioFormats {
    /// What the phone side sends.
    pub phone_output_audio_format: String,
    /// What the phone side receives.
    pub phone_input_audio_format: String,
}

/// One entry of a call's event log.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventRecord {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When it happened.
    pub at: UnixMillis,
    /// The kind.
    pub kind: String,
    /// Details.
    pub detail: serde_json::Value,
}

/// One utterance to append to a call's transcript.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTranscriptEntry {
    /// Who spoke (`caller`, `agent`...).
    pub speaker: String,
    /// What was said.
    pub text: String,
    /// Where the utterance starts, in milliseconds from the start of the call.
    pub start_ms: u64,
    /// Where it ends, in milliseconds from the start of the call.
    pub end_ms: u64,
    /// Whether it was cut short (barge-in).
    pub interrupted: bool,
}

/// One utterance of a call's transcript, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TranscriptEntry {
    /// Position in the transcript, from 1.
    pub seq: u64,
    /// Who spoke.
    pub speaker: String,
    /// What was said.
    pub text: String,
    /// Start, in milliseconds from the start of the call.
    pub start_ms: u64,
    /// End, in milliseconds from the start of the call.
    pub end_ms: u64,
    /// Whether it was cut short.
    pub interrupted: bool,
}

/// Which calls a listing returns: newest first, ordered by (`started_at`, `id`) descending,
/// at most `limit`, keeping only those matching every filter that is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallFilter {
    /// The most records returned. The store applies it as given; callers cap it.
    pub limit: u32,
    /// Only calls taken by this route.
    pub route: Option<String>,
    /// Only calls handled by this agent.
    pub agent: Option<String>,
    /// Only calls of this protocol (`callbridge`, `inbound`).
    pub protocol: Option<String>,
    /// Only calls that ended with this end-reason code.
    pub end_reason: Option<String>,
    /// The page cursor: only calls after this one in the listing order (the ID of the last
    /// call of the previous page). An ID that names no call yields an empty page.
    pub before: Option<CallId>,
    /// Only calls still open (live on some node).
    pub live: bool,
    /// Only calls held by this node.
    pub node: Option<String>,
    /// Only calls started at or after this time.
    pub since: Option<UnixMillis>,
    /// Only calls started before this time.
    pub until: Option<UnixMillis>,
    /// Only calls from this calling number.
    pub caller: Option<TextMatch>,
    /// Only calls to this called number.
    pub callee: Option<TextMatch>,
    /// Stop reading once the records read hold more than this many bytes of text
    /// ([`CallRecord::text_bytes`]), after one record more (so a caller cutting the page by
    /// size knows there is a next one): a page of large records is cut while it is read, not
    /// read whole and cut afterwards. `None`: no limit.
    pub max_bytes: Option<u64>,
}

/// How a text filter matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextMatch {
    /// The whole value.
    Exact(String),
    /// Values that start with this (not empty).
    Prefix(String),
}

impl TextMatch {
    /// `abc` is exact, `abc*` a prefix; `None` for `*` alone or a `*` anywhere else.
    pub fn parse(text: &str) -> Option<Self> {
        match text.strip_suffix('*') {
            Some(p) if !p.is_empty() && !p.contains('*') => Some(Self::Prefix(p.to_owned())),
            None if !text.contains('*') => Some(Self::Exact(text.to_owned())),
            _ => None,
        }
    }

    /// The end of a prefix's range in byte order: the prefix with its last character
    /// incremented (`01` → `02`), so `value >= prefix AND value < end` is read from an index;
    /// `None`: no end (a prefix of `char::MAX` only).
    pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
        let mut chars: Vec<char> = prefix.chars().collect();
        while let Some(last) = chars.pop() {
            let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
            if let Some(next) = next {
                chars.push(next);
                return Some(chars.into_iter().collect());
            }
        }
        None
    }
}

impl CallFilter {
    /// The newest `limit` calls, unfiltered.
    pub fn newest(limit: u32) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }
}

/// [`UnixMillis`] as a plain number of milliseconds, for the PostgreSQL store's journal (the
/// API shows RFC 3339 text instead).
pub(crate) mod millis {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::UnixMillis;

    pub(crate) fn serialize<S: Serializer>(t: &UnixMillis, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(t.0)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<UnixMillis, D::Error> {
        i64::deserialize(d).map(UnixMillis)
    }
}

/// Turns stored JSON text back into a raw value; a damaged row reads as null rather than failing
/// the whole listing.
pub(crate) fn raw_json(text: String) -> Option<Box<RawValue>> {
    RawValue::from_string(text).ok()
}

/// The columns of `calls`, in the order both backends' row mappers read them.
pub(crate) const RECORD_COLUMNS: &str = "id, protocol, caller, callee, external_id, call_config, \
     phone_output_audio_format, phone_input_audio_format, started_at, answered_at, ended_at, \
     end_reason, hangup_by, bytes_in, bytes_out, frames_in, frames_out, dtmf, cdr, recording, \
     route, agent, usage, key_name, node";

/// The value a text filter compares with.
pub(crate) fn text_value(m: &Option<TextMatch>) -> Option<&str> {
    match m {
        Some(TextMatch::Exact(v) | TextMatch::Prefix(v)) => Some(v),
        None => None,
    }
}

/// The end of a prefix filter's range, if it is one and has an end.
pub(crate) fn prefix_end(m: &Option<TextMatch>) -> Option<String> {
    match m {
        Some(TextMatch::Prefix(p)) => TextMatch::prefix_end(p),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_render_as_rfc3339() {
        assert_eq!(UnixMillis(0).to_rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(
            UnixMillis(1_795_000_000_123).to_rfc3339(),
            "2026-11-18T11:06:40.123Z"
        );
    }

    #[test]
    fn call_ids_from_outside_are_hyphenated_uuid_v7() {
        let id = CallId::new();
        assert_eq!(CallId::parse(id.as_str()), Some(id.clone()));
        // Either case; kept in the store's lowercase.
        assert_eq!(CallId::parse(&id.as_str().to_uppercase()), Some(id.clone()));
        let simple = id.as_str().replace('-', "");
        for bad in [
            "",
            "nope",
            &simple,
            &format!("{{{id}}}"),
            &format!("urn:uuid:{id}"),
            // Version 4, not 7.
            "67e55044-10b1-426f-9247-bb680e5fe0c8",
            // Version 7 with the wrong variant.
            "01890a5d-ac96-774b-fcce-b302099a8057",
            "01890a5d-ac96-774b-bcce-b302099a805g",
            "01890a5d-ac96-774b-bcce-b302099a8057/../x",
        ] {
            assert_eq!(CallId::parse(bad), None, "{bad:?}");
        }
        assert!(CallId::parse("01890a5d-ac96-774b-bcce-b302099a8057").is_some());
    }
}

#[cfg(test)]
mod rfc3339_tests {
    use super::UnixMillis;

    #[test]
    fn rfc3339_times_parse_with_offsets_and_fractions() {
        let p = UnixMillis::parse_rfc3339;
        assert_eq!(p("1970-01-01T00:00:00Z"), Some(UnixMillis(0)));
        assert_eq!(
            p("2026-11-21T10:49:53.123Z"),
            Some(UnixMillis(1_795_258_193_123))
        );
        assert_eq!(
            p("2026-11-21T19:49:53.123+09:00"),
            p("2026-11-21T10:49:53.123Z")
        );
        assert_eq!(
            p("2026-11-21t10:49:53.1z"),
            Some(UnixMillis(1_795_258_193_100))
        );
        assert_eq!(
            p("2026-11-21T10:49:53.123456-00:30"),
            Some(UnixMillis(1_795_259_993_123))
        );
        let t = UnixMillis(1_795_258_193_123);
        assert_eq!(p(&t.to_rfc3339()), Some(t));
        for bad in [
            "",
            "2026-11-21",
            "2026-11-21T10:49:53",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-21T24:00:00Z",
            "2026-11-21T10:49:53+0900",
            "2026-11-21T10:49:53.Z",
            "2026-11-21T10:49:5aZ",
        ] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }
}
