//! A real token for this crate's unit tests: a SoftHSM token in a temp dir,
//! made once per test process (SoftHSM reads `SOFTHSM2_CONF` when it is
//! loaded, so every test of the process shares it), with one logged-in
//! session and fresh keys per test. No mock: the GCM core is tested against
//! a PKCS#11 implementation. Needs the Debian package `softhsm2`
//! (`scripts/test.sh` installs it).

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LABEL: &str = "xks-hsm-unit";
const PIN: &str = "unit-test-pin";

pub(crate) struct TestToken {
    pkcs11: Pkcs11,
    slot: Slot,
    _dir: tempfile::TempDir,
}

/// The process's token.
pub(crate) fn token() -> &'static TestToken {
    static TOKEN: OnceLock<TestToken> = OnceLock::new();
    TOKEN.get_or_init(|| {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} is missing: install the Debian package softhsm2"
        );
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        // Set before the module is loaded, which is below; no other test of
        // this crate loads SoftHSM.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", LABEL])
            .args(["--pin", PIN, "--so-pin", "unit-test-so-pin"])
            .output()
            .expect("softhsm2-util");
        assert!(out.status.success(), "{out:?}");
        let pkcs11 = Pkcs11::new(MODULE).unwrap();
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        let slot = pkcs11
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| pkcs11.get_token_info(*s).is_ok_and(|t| t.label() == LABEL))
            .expect("the test token");
        // Logging in once logs in every session of the process.
        let s = pkcs11.open_rw_session(slot).unwrap();
        s.login(UserType::User, Some(&AuthPin::new(PIN.into())))
            .unwrap();
        std::mem::forget(s);
        TestToken {
            pkcs11,
            slot,
            _dir: dir,
        }
    })
}

impl TestToken {
    /// A new logged-in read-write session.
    pub(crate) fn session(&self) -> Session {
        self.pkcs11.open_rw_session(self.slot).unwrap()
    }

    /// A new AES-256 session key that encrypts and decrypts.
    pub(crate) fn aes_key(&self, s: &Session) -> ObjectHandle {
        s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
            ],
        )
        .unwrap()
    }
}
