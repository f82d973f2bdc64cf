//! An agent's settings: the `[routes.settings]` table parsed into a serde struct and checked,
//! with errors that name the field.

use std::fmt;

use serde::de::DeserializeOwned;

/// A setting that cannot work, naming its field (`frequency_hz`, `tools[1].url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    /// Path of the field inside the agent's settings; empty for the table as a whole.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

impl SettingsError {
    /// A problem with one field.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "settings: {}", self.problem)
        } else {
            write!(f, "settings.{}: {}", self.field, self.problem)
        }
    }
}

impl std::error::Error for SettingsError {}

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
        SettingsError::new(field, e.into_inner().to_string())
    })?;
    settings.validate()?;
    Ok(settings)
}

/// Settings of an agent that takes none: any key is an error.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

impl Settings for NoSettings {}
