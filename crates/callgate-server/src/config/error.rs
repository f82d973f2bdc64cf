//! Why a configuration cannot work. A leaf: the modules that own the settings' types
//! (`auth`, ...) report through it, and the configuration imports them, never the reverse.

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting {key}: {problem}")]
pub struct ConfigError {
    /// The setting's name as in the TOML file (`max_calls`).
    pub key: &'static str,
    /// What is wrong with it.
    pub problem: String,
}
