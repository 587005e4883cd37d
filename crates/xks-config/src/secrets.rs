//! Secrets come from files or environment variables, never from the config
//! itself; a file that group or others can read is refused.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::error::{invalid, ConfigError};
use super::paths::resolve;

/// Reads a secret from exactly one of a file or an environment variable.
/// Trailing newlines are trimmed (editors and `echo` add them).
pub(super) fn read_secret(
    file_field: &str,
    env_field: &str,
    file: Option<PathBuf>,
    env: Option<String>,
    base: &Path,
) -> Result<Zeroizing<String>, ConfigError> {
    match (file, env) {
        (Some(file), None) => {
            let path = resolve(base, &file);
            check_private_file(file_field, &path)?;
            let mut text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
                invalid(file_field, format!("cannot read {}: {e}", path.display()))
            })?);
            let trimmed_len = text.trim_end_matches(['\n', '\r']).len();
            text.truncate(trimmed_len);
            Ok(text)
        }
        (None, Some(var)) => match std::env::var(&var) {
            Ok(v) => Ok(Zeroizing::new(v)),
            Err(_) => Err(invalid(
                env_field,
                format!("environment variable {var} is not set (or not UTF-8)"),
            )),
        },
        _ => Err(invalid(
            format!("{file_field} / {env_field}"),
            "set exactly one of them",
        )),
    }
}

/// Refuses a secret file that group or others can read or write: a secret that
/// every local user can read is not a secret.
pub(super) fn check_private_file(field: &str, path: &Path) -> Result<(), ConfigError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(invalid(
                field,
                format!(
                    "{} has mode {:o}; it holds a secret and must not be accessible by group \
                     or others (chmod 600 {})",
                    path.display(),
                    mode & 0o777,
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}
