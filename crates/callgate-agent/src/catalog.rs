//! Agents by name, each built from its own typed settings.
//!
//! A route names an agent and gives it a `[routes.settings]` table. The agent's builder turns
//! that table into a serde struct (unknown keys and wrong types are errors naming the field)
//! and validates its values, once, when the routes are loaded: a call never meets a bad
//! setting. The builder returns the [`AgentFactory`] every call of that route uses.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::{AgentFactory, Error};

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

type Build =
    dyn Fn(&serde_json::Value) -> Result<Arc<dyn AgentFactory>, SettingsError> + Send + Sync;

/// The agents a server can run, by name.
#[derive(Clone)]
pub struct Catalog {
    agents: BTreeMap<String, Arc<Build>>,
}

impl fmt::Debug for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.agents.keys()).finish()
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Catalog {
    /// The built-in agents: `echo` and `tone`.
    pub fn builtin() -> Self {
        let mut catalog = Self::empty();
        catalog.register("echo", |s| {
            parse::<NoSettings>(s)?;
            Ok(Arc::new(crate::echo::EchoFactory) as Arc<dyn AgentFactory>)
        });
        catalog.register("tone", |s| {
            let settings = parse::<crate::tone::ToneSettings>(s)?;
            Ok(Arc::new(crate::tone::ToneFactory::new(settings)) as Arc<dyn AgentFactory>)
        });
        catalog
    }

    /// No agents at all.
    pub fn empty() -> Self {
        Self {
            agents: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) an agent: `build` turns a route's settings into its factory; use
    /// [`parse`] for typed settings.
    pub fn register(
        &mut self,
        name: impl Into<String>,
        build: impl Fn(&serde_json::Value) -> Result<Arc<dyn AgentFactory>, SettingsError>
        + Send
        + Sync
        + 'static,
    ) {
        self.agents.insert(name.into(), Arc::new(build));
    }

    /// Whether an agent has this name.
    pub fn contains(&self, name: &str) -> bool {
        self.agents.contains_key(name)
    }

    /// The names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.agents.keys().map(String::as_str).collect()
    }

    /// Builds the factory of agent `name` from its settings (`null`: defaults).
    pub fn build(
        &self,
        name: &str,
        settings: &serde_json::Value,
    ) -> Result<Arc<dyn AgentFactory>, Error> {
        let build = self.agents.get(name).ok_or_else(|| Error::UnknownAgent {
            name: name.to_owned(),
            available: self.names().join(", "),
        })?;
        build(settings).map_err(|error| Error::Settings {
            agent: name.to_owned(),
            error,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn settings_errors_name_the_field() {
        let catalog = Catalog::builtin();
        let error = catalog
            .build("tone", &json!({"frequency_hz": "loud"}))
            .err()
            .expect("a string is no frequency");
        assert!(
            error.to_string().contains("settings.frequency_hz"),
            "{error}"
        );
        let error = catalog
            .build("tone", &json!({"frequency": 400}))
            .err()
            .expect("unknown key");
        assert!(
            error.to_string().contains("unknown field `frequency`"),
            "{error}"
        );
        let error = catalog
            .build("tone", &json!({"frequency_hz": 0}))
            .err()
            .expect("out of range");
        assert!(
            error.to_string().contains("settings.frequency_hz"),
            "{error}"
        );
        let error = catalog
            .build("echo", &json!({"x": 1}))
            .err()
            .expect("echo takes no settings");
        assert!(error.to_string().contains("unknown field `x`"), "{error}");
        assert!(matches!(
            catalog.build("nope", &serde_json::Value::Null),
            Err(Error::UnknownAgent { .. })
        ));
    }

    #[test]
    fn defaults_apply_without_settings() {
        let catalog = Catalog::builtin();
        let tone = catalog.build("tone", &serde_json::Value::Null).unwrap();
        assert_eq!(tone.name(), "tone");
        assert!(catalog.build("echo", &json!({})).is_ok());
    }
}
