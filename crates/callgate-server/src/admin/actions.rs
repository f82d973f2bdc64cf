//! Operator actions on a live call: hang up, send a DTMF digit, play a WAV file, clear what
//! the operator queued. Each is a request posted to the call's task, which answers it.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use callgate_audio::{AudioFormat, Resampler, pcm};
use callgate_proto::{Command, Digit, DtmfDuration, EndReason, Error as ProtoError};
use callgate_store::CallId;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;
use utoipa::ToSchema;

use crate::Shared;
use crate::admin::calls::{Done, DoneStatus, Wav, no_call};
use crate::admin::error::{ApiError, ErrorBody};
use crate::admin::forward::Forwarding;
use crate::admin::params::ValidId;
use crate::live::{Mailbox, Operator, Refused, Reply, Request as CallRequest};

/// DTMF tone length when the request gives none.
pub(crate) const DEFAULT_DTMF_MS: u64 = 200;

/// The operator mailbox of live call `id`: 404 for an unknown call, 409 for one that ended.
async fn live_mailbox(shared: &Shared, id: &CallId) -> Result<Arc<Mailbox>, ApiError> {
    if let Some(mailbox) = shared.call.live.get(id) {
        return Ok(mailbox);
    }
    let exists = shared
        .call
        .store
        .call(id.clone())
        .await
        .map_err(ApiError::store)?
        .is_some();
    Err(if exists {
        ApiError::new(
            StatusCode::CONFLICT,
            "call_not_live",
            format!("call {:?} has ended", id.as_str()),
        )
    } else {
        no_call(id)
    })
}

/// Sends a request to a live call's task and waits for its answer.
async fn act(shared: &Shared, call_id: &CallId, request: CallRequest) -> Result<Reply, ApiError> {
    let tx = live_mailbox(shared, call_id).await?;
    let id = call_id.as_str();
    let gone = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "call_not_live",
            format!("call {id:?} has ended"),
        )
    };
    let (reply, verdict) = oneshot::channel();
    tx.post(Operator { request, reply })
        .map_err(|refused| match refused {
            Refused::Full => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "call_busy",
                format!("call {id:?} has too many operator requests waiting"),
            ),
            Refused::Closed => gone(),
        })?;
    match verdict.await.map_err(|_| gone())? {
        Ok(reply) => Ok(reply),
        Err(e @ ProtoError::Unsupported { .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "unsupported",
            e.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "call_not_live",
            e.to_string(),
        )),
    }
}

/// Hangs up a live call (its end reason: `operator_hangup`).
#[utoipa::path(
    post,
    path = "/api/calls/{id}/hangup",
    tag = "actions",
    params(ValidId),
    responses(
        (status = 200, description = "The call was told to hang up", body = Done,
            example = json!({"id": "0196f3a4-7c1e-7d2a-9b3c-4d5e6f708192", "status": "hangup_sent"})),
        (status = 400, description = "`bad_call_id`", body = ErrorBody),
        (status = 404, description = "`call_not_found`", body = ErrorBody),
        (status = 409, description = "`call_not_live`", body = ErrorBody),
        Forwarding,
        (status = 503, description = "`call_busy` or `store_unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn hangup(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
) -> Result<Json<Done>, ApiError> {
    act(
        &shared,
        &id,
        CallRequest::Command(Command::Hangup(EndReason::OperatorHangup)),
    )
    .await?;
    Ok(Json(Done {
        id,
        status: DoneStatus::HangupSent,
    }))
}

/// The body of `POST /api/calls/{id}/dtmf`. Other fields are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct DtmfRequest {
    /// The digit to send: one of 0-9, `*`, `#`.
    #[schema(required = true, value_type = String, pattern = "^[0-9*#]$", example = "5")]
    digit: Option<String>,
    /// The tone's length, ms, 1 to 1000 (default 200).
    #[schema(minimum = 1, maximum = 1000, default = 200)]
    duration: Option<u64>,
}

/// The answer of `POST /api/calls/{id}/dtmf`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DtmfSent {
    /// The digit sent.
    digit: String,
    /// Its length, ms.
    duration: u16,
    /// The call.
    id: CallId,
    /// `dtmf_sent`.
    status: DtmfStatus,
}

/// What `POST /api/calls/{id}/dtmf` did.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DtmfStatus {
    /// The call was told to send the digit.
    DtmfSent,
}

/// Sends a DTMF digit to the phone of a live inbound call.
#[utoipa::path(
    post,
    path = "/api/calls/{id}/dtmf",
    tag = "actions",
    params(ValidId),
    request_body = DtmfRequest,
    responses(
        (status = 200, description = "The call was told to send the digit", body = DtmfSent),
        (status = 400, description = "`bad_call_id` or `bad_json`", body = ErrorBody),
        (status = 404, description = "`call_not_found`", body = ErrorBody),
        (status = 409, description = "`call_not_live` or `unsupported` (CallBridge has no DTMF)",
            body = ErrorBody),
        (status = 413, description = "`too_large`", body = ErrorBody),
        (status = 422, description = "`missing_field`, `invalid_digit` or `invalid_duration`",
            body = ErrorBody),
        Forwarding,
        (status = 503, description = "`call_busy` or `store_unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn dtmf(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    body: Bytes,
) -> Result<Json<DtmfSent>, ApiError> {
    let bad =
        |code, message: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message);
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("body is not JSON: {e}"),
        )
    })?;
    let bad_duration = || {
        bad(
            "invalid_duration",
            format!(
                "invalid DTMF duration {} (must be a whole number of ms, 1..=1000)",
                body.get("duration").unwrap_or(&Value::Null)
            ),
        )
    };
    let missing = || bad("missing_field", "missing digit".into());
    if !body.is_object() {
        return Err(missing());
    }
    let request: DtmfRequest =
        serde_path_to_error::deserialize(&body).map_err(|e| match e.path().iter().next() {
            Some(serde_path_to_error::Segment::Map { key }) if key == "digit" => {
                bad("invalid_digit", "digit must be a string".into())
            }
            Some(serde_path_to_error::Segment::Map { key }) if key == "duration" => bad_duration(),
            _ => missing(),
        })?;
    let digit_text = request.digit.ok_or_else(missing)?;
    let digit = Digit::parse_sendable(&digit_text).ok_or_else(|| {
        bad(
            "invalid_digit",
            format!("invalid DTMF digit {digit_text:?} (allowed: 0-9 * #)"),
        )
    })?;
    let duration = DtmfDuration::from_millis(request.duration.unwrap_or(DEFAULT_DTMF_MS))
        .ok_or_else(bad_duration)?;
    act(
        &shared,
        &id,
        CallRequest::Command(Command::Dtmf { digit, duration }),
    )
    .await?;
    Ok(Json(DtmfSent {
        digit: digit.to_string(),
        duration: duration.as_millis(),
        id,
        status: DtmfStatus::DtmfSent,
    }))
}

/// The answer of `POST /api/calls/{id}/play`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Played {
    /// The call.
    id: CallId,
    /// How much audio was queued, ms (it plays after what is queued already).
    queued_ms: u64,
}

/// Plays a WAV file (PCM, mono or stereo, 8 to 192 kHz, up to 600 s) to the phone of a live
/// call, after the operator audio already queued.
#[utoipa::path(
    post,
    path = "/api/calls/{id}/play",
    tag = "actions",
    params(ValidId),
    request_body(content = inline(Wav), content_type = "audio/wav",
        description = "A PCM WAV file (up to 32 MiB)"),
    responses(
        (status = 200, description = "Queued", body = Played),
        (status = 400, description = "`bad_call_id`", body = ErrorBody),
        (status = 404, description = "`call_not_found`", body = ErrorBody),
        (status = 409, description = "`call_not_live` or `queue_full`", body = ErrorBody),
        (status = 413, description = "`too_large`", body = ErrorBody),
        (status = 415, description = "`bad_wav`", body = ErrorBody),
        (status = 422, description = "`bad_rate`, `too_long` or `empty_wav`", body = ErrorBody),
        Forwarding,
        (status = 503, description = "`call_busy` or `store_unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn play(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
    body: Bytes,
) -> Result<Json<Played>, ApiError> {
    // The call first: no work for a call that is not there.
    let format = live_mailbox(&shared, &id).await?.format();
    // Decoding and resampling are CPU work proportional to the body: off the async workers
    // and off the call task.
    let audio = shared
        .call
        .tasks
        .spawn_blocking(move || operator_audio(&body, format))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    match act(&shared, &id, CallRequest::Play { audio }).await? {
        Reply::Queued { ms } => Ok(Json(Played { id, queued_ms: ms })),
        // A live call: `call_not_live` would send the operator away.
        Reply::QueueFull => Err(ApiError::new(
            StatusCode::CONFLICT,
            "queue_full",
            format!(
                "call {id:?} already holds {} minutes of operator audio; play more once some \
                 of it has played",
                crate::call::media::MAX_OPERATOR_MS / 60_000
            ),
        )),
        other => Err(unexpected(other)),
    }
}

/// Sample rates a played WAV may have (a 1 Hz file would be resampled 8000-fold).
const PLAY_RATES: std::ops::RangeInclusive<u32> = 8000..=192_000;
/// The longest WAV one request plays.
const MAX_PLAY_SECONDS: u64 = 600;

/// A WAV body as audio in the phone's format, or why not.
fn operator_audio(body: &[u8], format: AudioFormat) -> Result<bytes::Bytes, ApiError> {
    let bad_wav = |e: callgate_audio::Error| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_wav",
            format!("body is not a PCM WAV file: {e}"),
        )
    };
    let reader = hound::WavReader::new(std::io::Cursor::new(body))
        .map_err(|e| bad_wav(callgate_audio::Error::from(e)))?;
    let rate = reader.spec().sample_rate;
    if !PLAY_RATES.contains(&rate) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_rate",
            format!(
                "the WAV's sample rate {rate} Hz is outside {}..={} Hz",
                PLAY_RATES.start(),
                PLAY_RATES.end()
            ),
        ));
    }
    let frames = reader.duration();
    if u64::from(frames) > u64::from(rate) * MAX_PLAY_SECONDS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_long",
            format!("the WAV lasts longer than {MAX_PLAY_SECONDS} s"),
        ));
    }
    let audio = callgate_audio::wav::read_mono_limited(reader, u64::from(rate) * MAX_PLAY_SECONDS)
        .map_err(bad_wav)?;
    if audio.samples.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_wav",
            "the WAV file has no audio",
        ));
    }
    let internal = |e: callgate_audio::Error| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    };
    let mut resampler = Resampler::new(audio.rate, format.sample_rate()).map_err(internal)?;
    let mut out = Vec::new();
    resampler.process(&audio.samples, &mut out);
    resampler.flush(&mut out);
    Ok(pcm::encode(format, &out))
}

/// The answer of `POST /api/calls/{id}/clear`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Cleared {
    /// Audio dropped from the queue, ms.
    dropped_ms: u64,
    /// The call.
    id: CallId,
    /// Audio of the operator's that had played, ms.
    played_ms: u64,
}

/// Drops the operator audio queued for a live call (what is playing stops).
#[utoipa::path(
    post,
    path = "/api/calls/{id}/clear",
    tag = "actions",
    params(ValidId),
    responses(
        (status = 200, description = "Cleared", body = Cleared),
        (status = 400, description = "`bad_call_id`", body = ErrorBody),
        (status = 404, description = "`call_not_found`", body = ErrorBody),
        (status = 409, description = "`call_not_live`", body = ErrorBody),
        Forwarding,
        (status = 503, description = "`call_busy` or `store_unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn clear(
    State(shared): State<Arc<Shared>>,
    ValidId(id): ValidId,
) -> Result<Json<Cleared>, ApiError> {
    match act(&shared, &id, CallRequest::Clear).await? {
        Reply::Cleared {
            dropped_ms,
            played_ms,
        } => Ok(Json(Cleared {
            dropped_ms,
            id,
            played_ms,
        })),
        other => Err(unexpected(other)),
    }
}

fn unexpected(reply: Reply) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("unexpected answer from the call: {reply:?}"),
    )
}
