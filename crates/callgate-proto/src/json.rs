//! Field extraction with precise error paths ("missing call_config.cdrId").
//!
//! Messages are parsed into maps of raw values so that opaque identifiers keep their exact text:
//! CallBridge's `callActionId` looks like a float (`1.758187055878E9`) and must never be
//! re-formatted by a number parser.

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use crate::Error;

/// A JSON object whose values are still raw text.
pub(crate) type RawMap<'a> = BTreeMap<String, &'a RawValue>;

/// Parses text as a JSON object with raw values.
pub(crate) fn raw_map<'a>(text: &'a str, path: &str) -> Result<RawMap<'a>, Error> {
    match serde_json::from_str::<RawMap<'a>>(text) {
        Ok(map) => Ok(map),
        Err(e) => {
            if serde_json::from_str::<IgnoredAny>(text).is_ok() {
                Err(Error::WrongType {
                    field: path.to_owned(),
                    expected: "a JSON object",
                })
            } else {
                Err(Error::InvalidJson {
                    detail: e.to_string(),
                })
            }
        }
    }
}

/// Whether a raw value is absent or `null`.
pub(crate) fn is_absent(raw: Option<&&RawValue>) -> bool {
    raw.is_none_or(|r| r.get() == "null")
}

/// Reads a required opaque identifier: a JSON string as is, or a JSON number kept as its exact
/// text.
pub(crate) fn opaque(map: &RawMap<'_>, name: &str, path: &str) -> Result<String, Error> {
    let Some(raw) = map.get(name).filter(|r| r.get() != "null") else {
        return Err(Error::MissingField {
            field: path.to_owned(),
        });
    };
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(text).map_err(|e| Error::InvalidJson {
            detail: e.to_string(),
        }),
        Some(b'-' | b'0'..=b'9') => Ok(text.to_owned()),
        _ => Err(Error::WrongType {
            field: path.to_owned(),
            expected: "a string",
        }),
    }
}

/// Reads a required JSON string.
pub(crate) fn string(map: &RawMap<'_>, name: &str, path: &str) -> Result<String, Error> {
    let Some(raw) = map.get(name).filter(|r| r.get() != "null") else {
        return Err(Error::MissingField {
            field: path.to_owned(),
        });
    };
    serde_json::from_str::<String>(raw.get()).map_err(|_| Error::WrongType {
        field: path.to_owned(),
        expected: "a string",
    })
}

/// Serialises a string as a JSON string literal.
pub(crate) fn quote(s: &str) -> String {
    // Serialising a &str cannot fail.
    serde_json::to_string(s).unwrap_or_default()
}
