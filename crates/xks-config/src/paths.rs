//! Relative paths in the file resolve against the file's own directory, so
//! a configuration works the same whatever directory the proxy starts from.

use std::path::{Path, PathBuf};

/// Resolves `p` against the config file's directory when it is relative.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}
