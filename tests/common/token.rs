//! Test tokens: a token of its own per test, more tokens beside it, key
//! imports and OpenSC's `pkcs11-tool` to change a token behind the proxy's
//! back, and the vendor-behaviour filter module built from
//! `tests/fixtures/vendor-module.c`.
//!
//! The suites that exercise the key manager run on more than one PKCS#11
//! implementation, because no single one is PKCS#11: `XKS_TEST_PKCS11`
//! picks it for the whole test binary.
//!
//! - `softhsm` (the default): SoftHSMv2, Debian's `softhsm2`; a token
//!   directory per test (`SOFTHSM2_CONF`).
//! - `kryoptic`: Kryoptic, a PKCS#11 3.x soft token written in Rust, built
//!   by `scripts/kryoptic.sh` (the library's path in `XKS_TEST_KRYOPTIC`,
//!   else the script is run to find or build it); a sqlite database per
//!   token and a config file naming the slots (`KRYOPTIC_CONF`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::random_b64;

/// The SoftHSM PKCS#11 module (Debian package softhsm2).
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The SO PIN of every test token.
const SO_PIN: &str = "test-so-pin";

/// The PKCS#11 implementations the suites run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implementation {
    SoftHsm,
    Kryoptic,
}

impl Implementation {
    /// What its tokens give as `manufacturerID` (GetHealthStatus's
    /// `ekmVendor`).
    pub fn manufacturer(self) -> &'static str {
        match self {
            Implementation::SoftHsm => "SoftHSM project",
            Implementation::Kryoptic => "Kryoptic Project",
        }
    }

    /// A word that its tokens' model string contains.
    pub fn name(self) -> &'static str {
        match self {
            Implementation::SoftHsm => "SoftHSM",
            Implementation::Kryoptic => "Kryoptic",
        }
    }
}

/// The implementation this test binary runs on (`XKS_TEST_PKCS11`).
pub fn implementation() -> Implementation {
    match std::env::var("XKS_TEST_PKCS11").as_deref() {
        Ok("kryoptic") => Implementation::Kryoptic,
        Ok("softhsm") | Err(_) => Implementation::SoftHsm,
        Ok(other) => panic!("XKS_TEST_PKCS11={other}: use softhsm or kryoptic"),
    }
}

/// The PKCS#11 library of [`implementation`].
pub fn module() -> String {
    match implementation() {
        Implementation::SoftHsm => SOFTHSM.to_string(),
        Implementation::Kryoptic => kryoptic_module().to_string(),
    }
}

fn kryoptic_module() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("XKS_TEST_KRYOPTIC") {
            return p;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kryoptic.sh");
        let out = Command::new("bash").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "scripts/kryoptic.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// A token configuration with one initialized token (and maybe more).
pub struct TestToken {
    /// The implementation's configuration file.
    pub conf: PathBuf,
    pub pin: String,
    pub label: String,
    pub implementation: Implementation,
}

impl TestToken {
    /// The environment variable that points the library at [`Self::conf`].
    pub fn env_var(&self) -> &'static str {
        match self.implementation {
            Implementation::SoftHsm => "SOFTHSM2_CONF",
            Implementation::Kryoptic => "KRYOPTIC_CONF",
        }
    }

    /// The library these tokens are in.
    pub fn module(&self) -> String {
        match self.implementation {
            Implementation::SoftHsm => SOFTHSM.to_string(),
            Implementation::Kryoptic => kryoptic_module().to_string(),
        }
    }

    /// The storage of the token labelled `label`: SoftHSM's token
    /// directory, or Kryoptic's database file. Tests remove it to make the
    /// token vanish.
    pub fn token_dir(&self, label: &str) -> PathBuf {
        let conf = std::fs::read_to_string(&self.conf).unwrap();
        if self.implementation == Implementation::Kryoptic {
            let dir = self.conf.parent().unwrap();
            return dir.join(format!("{label}.sql"));
        }
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

    /// Another token beside the first, with the same PIN (before the proxy
    /// starts: Kryoptic reads its slots when the library is initialized).
    pub fn add_token(&self, label: &str) {
        match self.implementation {
            Implementation::SoftHsm => init_softhsm_token(&self.conf, label, &self.pin),
            Implementation::Kryoptic => add_kryoptic_token(&self.conf, label, &self.pin),
        }
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
        let mut all = vec!["--token-label", token, "--login", "--pin", &self.pin];
        all.extend_from_slice(args);
        pkcs11_tool(&self.module(), (self.env_var(), &self.conf), &all)
    }
}

/// Runs OpenSC's `pkcs11-tool` on `module`, its configuration in `env`;
/// asserts success and returns what it printed.
fn pkcs11_tool(module: &str, env: (&str, &Path), args: &[&str]) -> String {
    let out = Command::new("pkcs11-tool")
        .args(["--module", module])
        .args(args)
        .env(env.0, env.1)
        .output()
        .expect("pkcs11-tool (Debian package opensc) must be installed");
    assert!(
        out.status.success(),
        "pkcs11-tool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the vendor-behaviour PKCS#11 filter module
/// (`tests/fixtures/vendor-module.c`: a real token, with the IV generation
/// of CloudHSM or Luna, refused caller IVs, or refused read-only sessions,
/// as its environment says) into `dir`; returns its path.
pub fn vendor_module(dir: &Path) -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = dir.join("vendor-module.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(format!("{root}/tests/fixtures/vendor-module.c"))
        // pkcs11.h from p11-kit: the one scripts/p11-kit-rpc.sh built, or Debian's.
        .args(
            std::env::var_os("XKS_P11_KIT_PREFIX")
                .map(|p| format!("-I{}/include/p11-kit-1", Path::new(&p).display())),
        )
        .arg("-I/usr/include/p11-kit-1")
        .args(["-ldl", "-lpthread"])
        .status()
        .expect("cc (gcc) must be installed");
    assert!(status.success(), "building the vendor filter module failed");
    out
}

/// `softhsm2-util --init-token` in the first free slot.
fn init_softhsm_token(conf: &Path, label: &str, pin: &str) {
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args(["--init-token", "--free", "--label", label])
        .args(["--so-pin", SO_PIN, "--pin", pin])
        .output()
        .expect("softhsm2-util (Debian package softhsm2) must be installed");
    assert!(
        out.status.success(),
        "init-token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new slot in the Kryoptic configuration `conf` (database
/// `<label>.sql` beside it), and its token initialized with `pin`.
fn add_kryoptic_token(conf: &Path, label: &str, pin: &str) {
    let existing = std::fs::read_to_string(conf).unwrap_or_default();
    let slot = 10 + existing.matches("[[slots]]").count();
    let db = conf.parent().unwrap().join(format!("{label}.sql"));
    std::fs::write(
        conf,
        format!(
            "{existing}[[slots]]\nslot = {slot}\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n",
            db.display()
        ),
    )
    .unwrap();
    let slot = slot.to_string();
    let tool = |args: &[&str]| {
        let mut all = vec!["--slot", slot.as_str()];
        all.extend_from_slice(args);
        pkcs11_tool(kryoptic_module(), ("KRYOPTIC_CONF", conf), &all);
    };
    tool(&["--init-token", "--label", label, "--so-pin", SO_PIN]);
    tool(&[
        "--init-pin",
        "--login",
        "--login-type",
        "so",
        "--so-pin",
        SO_PIN,
        "--new-pin",
        pin,
    ]);
}

/// A token configuration in `dir` with one token labelled `label`, its user
/// PIN random, on [`implementation`].
pub fn make_token(dir: &Path, label: &str) -> TestToken {
    let pin = format!("pin-{}", &random_b64(9).replace(['+', '/'], "x"));
    let implementation = implementation();
    let conf = match implementation {
        Implementation::SoftHsm => {
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
            init_softhsm_token(&conf, label, &pin);
            conf
        }
        Implementation::Kryoptic => {
            let conf = dir.join("kryoptic.conf");
            add_kryoptic_token(&conf, label, &pin);
            conf
        }
    };
    TestToken {
        conf,
        pin,
        label: label.to_string(),
        implementation,
    }
}
