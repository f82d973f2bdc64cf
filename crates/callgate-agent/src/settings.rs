//! An agent's settings: the `[routes.settings]` table parsed into a serde struct and checked,
//! with errors that name the field.

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;

/// A setting that cannot work, naming its field (`frequency_hz`, `tools[1].url`).
///
/// Made with [`SettingsError::caused`] from a typed error, it keeps that error as its
/// [`source`](std::error::Error::source) (the problem is then the cause's message). Two
/// settings errors are equal when they name the same field and the same problem.
#[derive(Debug, Clone)]
pub struct SettingsError {
    /// Path of the field inside the agent's settings; empty for the table as a whole.
    pub field: String,
    /// What is wrong.
    pub problem: String,
    /// The typed error the problem came from, if any (shared: the error stays `Clone`).
    cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl SettingsError {
    /// A problem with one field, in words.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
            cause: None,
        }
    }

    /// A problem with one field that a typed error describes: the problem is its message,
    /// and it stays this error's source.
    pub fn caused(
        field: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            field: field.into(),
            problem: cause.to_string(),
            cause: Some(Arc::new(cause)),
        }
    }
}

impl PartialEq for SettingsError {
    fn eq(&self, other: &Self) -> bool {
        self.field == other.field && self.problem == other.problem
    }
}

impl Eq for SettingsError {}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "settings: {}", self.problem)
        } else {
            write!(f, "settings.{}: {}", self.field, self.problem)
        }
    }
}

impl std::error::Error for SettingsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

/// An agent's settings: a serde struct (use `#[serde(deny_unknown_fields, default)]`) plus the
/// checks types cannot express.
pub trait Settings: DeserializeOwned + Send + Sync + 'static {
    /// Checks values that parse but cannot work.
    fn validate(&self) -> Result<(), SettingsError> {
        Ok(())
    }
}

/// Parses and validates an agent's settings (`null` or a missing table means all defaults).
pub fn parse<S: Settings>(value: &serde_json::Value) -> Result<S, SettingsError> {
    let empty = serde_json::Value::Object(serde_json::Map::new());
    let value = if value.is_null() { &empty } else { value };
    let settings: S = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        SettingsError::caused(field, e.into_inner())
    })?;
    settings.validate()?;
    Ok(settings)
}

/// Settings of an agent that takes none: any key is an error.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

impl Settings for NoSettings {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_cause_is_the_problem_and_the_source() {
        let cause = std::io::Error::new(std::io::ErrorKind::NotFound, "no such voice");
        let error = SettingsError::caused("tts_voice", cause);
        assert_eq!(error.to_string(), "settings.tts_voice: no such voice");
        assert_eq!(error, SettingsError::new("tts_voice", "no such voice"));
        let source = std::error::Error::source(&error).expect("the cause is kept");
        assert_eq!(
            source.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::NotFound)
        );
        assert!(std::error::Error::source(&SettingsError::new("x", "y")).is_none());
    }
}
