//! openCryptoki's soft token (Debian `opencryptoki`): a real PKCS#11
//! implementation that lacks `CKM_AES_GCM`, and whose token info is not
//! standard (its `utcTime` is a time of day). The proxy must find the token
//! anyway and refuse it in one sentence that names the missing mechanism:
//! in `hsm probe`, in `check-config`, at startup, and in GetHealthStatus.
//!
//! The token is system-wide (its daemon `pkcsslotd` runs as root):
//! `scripts/opencryptoki.sh` prepares it, and the tests here only read it.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use common::network_hsm::{ekm_statuses, status_of};
use common::*;

const LABEL: &str = "xks-ock";
const SO_PIN: &str = "87654321";
const PIN: &str = "4321";

/// The openCryptoki library, its token prepared (once per test binary).
fn module() -> &'static str {
    static MODULE: OnceLock<String> = OnceLock::new();
    MODULE.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/opencryptoki.sh");
        let out = Command::new("bash")
            .args([script, LABEL, SO_PIN, PIN])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/opencryptoki.sh (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("OPENCRYPTOKI_MODULE="))
            .expect("the script prints OPENCRYPTOKI_MODULE=")
            .to_string()
    })
}

const MISSING: &str = "does not support CKM_AES_GCM";

#[test]
fn hsm_probe_finds_the_token_and_names_the_missing_mechanism() {
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("pin");
    write_private(&pin, PIN);
    let out = Command::new(bin())
        .args(["hsm", "probe", "--module", module(), "--token-label", LABEL])
        .arg("--pin-file")
        .arg(&pin)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    // Found although its clock field is not standard, and said so.
    assert!(text.contains(&format!("token '{LABEL}' in slot")), "{text}");
    assert!(text.contains("utcTime"), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect::<Vec<_>>()
            .len(),
        1,
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL") && l.contains(MISSING)),
        "{text}"
    );
    assert!(text.contains("verdict: NOT USABLE"), "{text}");
    // What it does have is reported as such.
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok") && l.contains("CKM_AES_KEY_GEN")),
        "{text}"
    );
}

/// The implementation under test as `token-a`, openCryptoki as `token-ock`.
fn with_opencryptoki() -> Options {
    Options {
        backends: format!(
            "[[hsm.backends]]\nname = \"token-a\"\ntoken_label = \"xks-test\"\n\n\
             [[hsm.backends]]\nname = \"token-ock\"\nmodule = \"{}\"\ntoken_label = \"{LABEL}\"\n\
             pin_file = \"ock-pin\"\n",
            module()
        ),
        setup: Some(Arc::new(|dir: &Path, _: &TestToken| {
            write_private(&dir.join("ock-pin"), PIN);
            Vec::new()
        })),
        ..Options::default()
    }
}

#[test]
fn a_key_manager_without_aes_gcm_is_unavailable_and_says_why() {
    let p = Proxy::start_with(with_opencryptoki());
    let c = p.h1();
    assert!(
        p.wait_for_log(MISSING),
        "the log does not name the mechanism\n{}",
        p.log()
    );
    assert_eq!(status_of(&c, "token-ock"), "UNAVAILABLE");
    assert!(eventually(10, || status_of(&c, "token-a") == "ACTIVE"));
    assert_eq!(ekm_statuses(&c).len(), 2);
    // The other key manager serves.
    block_on(async {
        let r = c
            .call(
                "/keys/key-ed/encrypt",
                xks_proxy::client::bodies::encrypt(b"x", None, false),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
    });
    // check-config: a key manager that can never serve is a configuration
    // error, named.
    let out = p.cli_raw(&["check-config"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("token-ock") && err.contains(MISSING), "{err}");
}

#[test]
fn the_only_key_manager_without_aes_gcm_stops_startup_with_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let base = Proxy::start();
    let config = std::fs::read_to_string(&base.config).unwrap();
    let ock = config
        .replace(
            &format!("module = \"{}\"", base.hsm.module()),
            &format!("module = \"{}\"", module()),
        )
        .replace(
            "token_label = \"xks-test\"",
            &format!("token_label = \"{LABEL}\""),
        )
        .replace("pin_file = \"hsm-pin\"", "pin_file = \"ock-pin\"");
    assert!(
        ock.contains(module()),
        "the template names no module: {ock}"
    );
    write_private(&base.dir.path().join("ock-pin"), PIN);
    let path = base.dir.path().join("ock.toml");
    std::fs::write(&path, ock).unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&path)
        .env("XKS_TEST_SECRET_B", &base.secret_b)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("xks-proxy: ")
            && l.contains(&format!("token '{LABEL}' cannot serve KMS"))
            && l.contains(MISSING)),
        "{err}"
    );
    // Refused at once: a missing mechanism is not a transient failure.
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
