//! Agents by name, each built from its own typed settings.
//!
//! A route names an agent and gives it a `[routes.settings]` table. The agent's builder turns
//! that table into a serde struct (unknown keys and wrong types are errors naming the field)
//! and validates its values, once, when the routes are loaded: a call never meets a bad
//! setting. The builder returns the [`AgentFactory`] every call of that route uses.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::{AgentFactory, Error};

pub use crate::settings::{NoSettings, Settings, SettingsError, parse};

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
