//! What a configuration problem looks like: the field, and the rule it
//! broke, in words an operator can act on.

use std::path::PathBuf;

/// A configuration problem, reported with the field it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for xks-proxy: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {rule}")]
    Invalid { field: String, rule: String },
}

pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        rule: rule.into(),
    }
}
