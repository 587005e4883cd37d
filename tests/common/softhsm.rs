//! SoftHSM tokens: a token directory of its own per test, more tokens beside
//! it, key imports and OpenSC's `pkcs11-tool` to change a token behind the
//! proxy's back, and the IV-generating filter module built from
//! `tests/fixtures/vendor-module.c`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::random_b64;

/// The SoftHSM PKCS#11 module (Debian package softhsm2).
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM token directory with one initialized token.
pub struct SoftHsm {
    pub conf: PathBuf,
    pub pin: String,
    pub label: String,
}

impl SoftHsm {
    /// The directory that holds the token labelled `label`.
    pub fn token_dir(&self, label: &str) -> PathBuf {
        let conf = std::fs::read_to_string(&self.conf).unwrap();
        let tokens = conf
            .lines()
            .find_map(|l| l.strip_prefix("directories.tokendir = "))
            .unwrap()
            .trim()
            .to_string();
        for entry in std::fs::read_dir(&tokens).unwrap() {
            let dir = entry.unwrap().path();
            let object = std::fs::read(dir.join("token.object")).unwrap_or_default();
            if object.windows(label.len()).any(|w| w == label.as_bytes()) {
                return dir;
            }
        }
        panic!("no token directory for {label}");
    }

    /// Another token in the same SoftHSM directory, with the same PIN.
    pub fn add_token(&self, label: &str) {
        init_token(&self.conf, label, &self.pin);
    }

    /// Imports raw AES-256 key material into a token as a sensitive private
    /// key with encrypt and decrypt (OpenSC's pkcs11-tool).
    pub fn import_aes_key(&self, token: &str, label: &str, key_file: &Path) {
        let file = key_file.to_str().unwrap();
        self.pkcs11_tool(
            token,
            &[
                "--write-object",
                file,
                "--type",
                "secrkey",
                "--key-type",
                "AES:32",
                "--label",
                label,
                "--usage-decrypt",
                "--sensitive",
                "--private",
            ],
        );
    }

    /// Runs OpenSC's `pkcs11-tool` on `token`, logged in; asserts success.
    pub fn pkcs11_tool(&self, token: &str, args: &[&str]) -> String {
        let out = Command::new("pkcs11-tool")
            .args(["--module", SOFTHSM, "--token-label", token])
            .args(["--login", "--pin", &self.pin])
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .expect("pkcs11-tool (Debian package opensc) must be installed");
        assert!(
            out.status.success(),
            "pkcs11-tool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Builds the IV-generating PKCS#11 filter module (`tests/fixtures/
/// vendor-module.c`: SoftHSM, returning generated IVs the way CloudHSM or
/// Luna do) into `dir`; returns its path.
pub fn vendor_module(dir: &Path) -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = dir.join("vendor-module.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(format!("{root}/tests/fixtures/vendor-module.c"))
        // pkcs11.h from p11-kit: the one scripts/p11-kit-rpc.sh built, or Debian's.
        .arg(format!("-I{root}/target/p11-kit/include/p11-kit-1"))
        .arg("-I/usr/include/p11-kit-1")
        .args(["-ldl", "-lpthread"])
        .status()
        .expect("cc (gcc) must be installed");
    assert!(status.success(), "building the IV filter module failed");
    out
}

/// `softhsm2-util --init-token` in the first free slot.
fn init_token(conf: &Path, label: &str, pin: &str) {
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args(["--init-token", "--free", "--label", label])
        .args(["--so-pin", "test-so-pin", "--pin", pin])
        .output()
        .expect("softhsm2-util (Debian package softhsm2) must be installed");
    assert!(
        out.status.success(),
        "init-token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A SoftHSM configuration in `dir` (tokens in `dir/tokens`) with one token
/// labelled `label`, its user PIN random.
pub fn make_token(dir: &Path, label: &str) -> SoftHsm {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let pin = format!("pin-{}", &random_b64(9).replace(['+', '/'], "x"));
    init_token(&conf, label, &pin);
    SoftHsm {
        conf,
        pin,
        label: label.to_string(),
    }
}
