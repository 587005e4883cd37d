//! The config loader: any text must load or give a ConfigError naming a
//! field, never a panic. Paths are resolved against an empty directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xks_proxy::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::from_toml(text, std::path::Path::new("/nonexistent-fuzz-base"));
    }
});
