//! `hsm probe`: what an operator runs against their own HSM before the first
//! deployment, to learn whether it will do and how to configure it.
//!
//! Every check uses the code that serves KMS (token search, mechanism
//! questions, the GCM core in [`super::gcm`]) on the operator's real token,
//! and leaves the token as it found it: the keys and the data object it
//! makes are *session* objects (`CKA_TOKEN = false`), gone when its session
//! closes, and it destroys them itself before that.
//!
//! The outcome is a list of findings and a verdict: ready (exit 0), usable
//! with the changes it names (exit 2), or not usable (exit 1).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::config::{IvSource, SessionKind, TokenSelector};
use super::gcm::{self, IvInput, Sealed};
use super::mechanisms::{self, NEEDS};
use super::objects::protected_key_template;
use super::token::{find_slot, load_module, login};
use super::token_info::{Limit, TokenInfo};
use xks_spec::aead::hsm_aad;

/// What to probe, and (from a configuration, when there is one) what the
/// proxy would be configured to do there.
pub struct Target {
    pub module: PathBuf,
    pub token: TokenSelector,
    pub pin: Zeroizing<String>,
    pub iv_source: Option<IvSource>,
    pub session_kind: Option<SessionKind>,
    pub sessions: Option<usize>,
}

/// How bad one finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Info,
    /// Works, with the configuration change the finding names.
    Change,
    /// A feature beside serving KMS (the audit trail, key disabling,
    /// lockdowns) cannot work on this token.
    Limited,
    /// The proxy cannot serve KMS from this token.
    Fail,
}

impl Level {
    fn tag(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Info => "info",
            Level::Change => "CHANGE",
            Level::Limited => "LIMITED",
            Level::Fail => "FAIL",
        }
    }
}

/// One finding.
#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub text: String,
}

/// The probe's findings, in the order they were made.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// The settings the findings call for.
    pub iv_source: Option<IvSource>,
    pub session_kind: Option<SessionKind>,
    pub sessions: Option<usize>,
}

/// The verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    Changes,
    NotUsable,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Ready => 0,
            Verdict::NotUsable => 1,
            Verdict::Changes => 2,
        }
    }
}

impl Report {
    fn add(&mut self, level: Level, text: impl Into<String>) {
        self.findings.push(Finding {
            level,
            text: text.into(),
        });
    }

    pub fn verdict(&self) -> Verdict {
        match self.findings.iter().map(|f| f.level).max() {
            Some(Level::Fail) => Verdict::NotUsable,
            Some(Level::Change | Level::Limited) => Verdict::Changes,
            _ => Verdict::Ready,
        }
    }

    /// The findings, one per line, then the verdict line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&format!("{:<8}{}\n", f.level.tag(), f.text));
        }
        let settings: Vec<String> = [
            self.iv_source
                .map(|v| format!("iv_source = {:?}", iv_name(v))),
            self.session_kind
                .map(|v| format!("session_kind = {:?}", kind_name(v))),
            self.sessions.map(|n| format!("sessions = {n}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !settings.is_empty() {
            out.push_str(&format!(
                "[hsm] settings for this token: {}\n",
                settings.join(", ")
            ));
        }
        let changes = |l| self.findings.iter().filter(|f| f.level == l).count();
        out.push_str(&match self.verdict() {
            Verdict::Ready => "verdict: READY: the proxy can serve KMS from this token\n".into(),
            Verdict::Changes => format!(
                "verdict: USABLE WITH CHANGES: {} setting(s) to change, {} feature limit(s) (see \
                 CHANGE and LIMITED above)\n",
                changes(Level::Change),
                changes(Level::Limited)
            ),
            Verdict::NotUsable => format!(
                "verdict: NOT USABLE: {} problem(s) that no setting fixes (see FAIL above)\n",
                changes(Level::Fail)
            ),
        });
        out
    }
}

pub fn iv_name(v: IvSource) -> &'static str {
    match v {
        IvSource::HsmRng => "hsm-rng",
        IvSource::HsmGenerated => "hsm-generated",
        IvSource::HsmGeneratedAppended => "hsm-generated-appended",
    }
}

fn kind_name(v: SessionKind) -> &'static str {
    match v {
        SessionKind::Auto => "auto",
        SessionKind::ReadOnly => "read-only",
        SessionKind::ReadWrite => "read-write",
    }
}

/// Sessions the proxy opens beyond its request pool: the control thread's,
/// and one for a CLI command run beside it.
const EXTRA_SESSIONS: u64 = 2;
/// The default `hsm.sessions`.
const DEFAULT_SESSIONS: usize = 8;
/// Round trips timed for the latency figure.
const TIMED_ROUND_TRIPS: usize = 20;

/// Probes the token. Blocking; every PKCS#11 call is bounded only by the
/// module itself, as in the CLI's other commands.
pub fn run(target: &Target) -> Report {
    let mut r = Report::default();
    let ctx = match load_module(&target.module) {
        Ok(ctx) => ctx,
        Err(e) => {
            r.add(Level::Fail, e.to_string());
            return r;
        }
    };
    match ctx.get_library_info() {
        Ok(i) => r.add(
            Level::Info,
            format!(
                "library {}: {} {} (version {}), PKCS#11 {}",
                target.module.display(),
                i.manufacturer_id().trim(),
                i.library_description().trim(),
                i.library_version(),
                i.cryptoki_version()
            ),
        ),
        Err(e) => r.add(Level::Info, format!("C_GetInfo failed: {e}")),
    }
    let (slot, ti) = match find_slot(&ctx, &target.module, &target.token) {
        Ok(found) => found,
        Err(e) => {
            r.add(Level::Fail, e.to_string());
            return r;
        }
    };
    describe_token(&mut r, slot, &ti);
    let mut usable = true;
    // Asked once each; the HMAC check below reuses the answers.
    let mut supported = [false; NEEDS.len()];
    for (need, ok) in NEEDS.iter().zip(supported.iter_mut()) {
        let support = mechanisms::support(&ctx, slot, need);
        *ok = support.ok();
        match mechanisms::shortfall(need, &support) {
            None => r.add(Level::Ok, format!("{} ({})", need.name, need.for_what)),
            Some(why) if need.required => {
                usable = false;
                r.add(Level::Fail, why);
            }
            Some(why) => r.add(Level::Limited, why),
        }
    }
    sessions(&mut r, &ti, target.sessions);
    let Some(session) = open_sessions(&mut r, &ctx, slot, target.session_kind) else {
        return r;
    };
    if let Err(e) = login(&session, &AuthPin::from(target.pin.as_str().to_owned())) {
        r.add(Level::Fail, e.to_string());
        return r;
    }
    r.add(Level::Ok, "login with the PIN");
    data_objects(&mut r, &session);
    // The audit seal's mechanisms: every optional one.
    let seal_ok = NEEDS.iter().zip(supported).all(|(n, ok)| n.required || ok);
    if seal_ok {
        hmac(&mut r, &session);
    }
    if usable {
        gcm_checks(&mut r, &session, target.iv_source);
    }
    r
}

fn describe_token(r: &mut Report, slot: Slot, ti: &TokenInfo) {
    r.add(
        Level::Info,
        format!(
            "token '{}' in slot {}: {} {}, serial {}, hardware {}.{}, firmware {}.{}",
            ti.label,
            slot.id(),
            ti.manufacturer,
            ti.model,
            ti.serial,
            ti.hardware_version.0,
            ti.hardware_version.1,
            ti.firmware_version.0,
            ti.firmware_version.1
        ),
    );
    for quirk in ti.quirks() {
        r.add(Level::Info, format!("not standard: {quirk}"));
    }
    if ti.write_protected {
        r.add(
            Level::Limited,
            "the token is write-protected: the proxy cannot create keys or store its markers \
             (keys disable, lockdown, the audit witness)",
        );
    }
}

/// Session limits against the pool the proxy would open.
fn sessions(r: &mut Report, ti: &TokenInfo, configured: Option<usize>) {
    let want = configured.unwrap_or(DEFAULT_SESSIONS);
    let limit = match (ti.max_sessions, ti.max_rw_sessions) {
        (Limit::Max(a), Limit::Max(b)) => Some(a.min(b)),
        (Limit::Max(n), _) | (_, Limit::Max(n)) => Some(n),
        _ => None,
    };
    let text = format!(
        "session limit: {} ({} read-write); the proxy opens hsm.sessions + 1 per instance",
        ti.max_sessions, ti.max_rw_sessions
    );
    match limit {
        Some(n) if (want as u64) + EXTRA_SESSIONS > n => {
            let fit = n.saturating_sub(EXTRA_SESSIONS).max(1) as usize;
            r.sessions = Some(fit);
            r.add(
                Level::Change,
                format!("{text}: {want} sessions do not fit, set sessions = {fit}"),
            );
        }
        _ => r.add(Level::Ok, text),
    }
}

/// Opens a read-only and a read-write session, reports which the token
/// takes, and returns one to go on with (the kind the proxy would use).
fn open_sessions(
    r: &mut Report,
    ctx: &Pkcs11,
    slot: Slot,
    configured: Option<SessionKind>,
) -> Option<Session> {
    let ro = ctx.open_ro_session(slot);
    let rw = ctx.open_rw_session(slot);
    match (ro, rw) {
        (Ok(s), Ok(_)) => {
            r.add(Level::Ok, "read-only and read-write sessions");
            Some(s)
        }
        (Err(e), Ok(s)) => {
            let text = format!("the token refuses read-only sessions ({e})");
            if configured == Some(SessionKind::ReadOnly) {
                r.session_kind = Some(SessionKind::ReadWrite);
                r.add(
                    Level::Change,
                    format!("{text}: set session_kind = \"read-write\""),
                );
            } else {
                r.add(
                    Level::Info,
                    format!(
                        "{text}; session_kind = \"auto\" falls back to read-write, \
                         \"read-write\" skips the attempt"
                    ),
                );
            }
            Some(s)
        }
        (Ok(s), Err(e)) => {
            r.add(
                Level::Limited,
                format!(
                    "the token refuses read-write sessions ({e}): the proxy cannot create keys \
                     or store its markers there"
                ),
            );
            Some(s)
        }
        (Err(e), Err(_)) => {
            r.add(Level::Fail, format!("cannot open a session: {e}"));
            None
        }
    }
}

/// A session AES-256 key for the GCM checks: like the proxy's keys, but
/// gone with the session.
fn session_key(
    s: &Session,
    key_type: KeyType,
    mechanism: &Mechanism,
    usage: [Attribute; 2],
) -> Result<ObjectHandle, String> {
    let mut t = protected_key_template(key_type, "xks-proxy-probe");
    t.retain(|a| !matches!(a, Attribute::Token(_)));
    t.push(Attribute::Token(false));
    t.extend(usage);
    s.generate_key(mechanism, &t).map_err(|e| e.to_string())
}

/// The proxy keeps its own state (key-disable markers, lockdowns, the audit
/// witness) in data objects: can this token hold one?
fn data_objects(r: &mut Report, s: &Session) {
    let template = vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Application(b"xks-proxy-probe".to_vec()),
        Attribute::Label(b"xks-proxy-probe".to_vec()),
        Attribute::Value(b"probe".to_vec()),
    ];
    let outcome = s.create_object(&template).and_then(|h| {
        let found = s.find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(b"xks-proxy-probe".to_vec()),
        ]);
        s.destroy_object(h)?;
        found
    });
    match outcome {
        Ok(found) if !found.is_empty() => r.add(
            Level::Ok,
            "data objects (CKO_DATA): created, found and destroyed a session one (keys disable, \
             lockdown and the audit witness can work)",
        ),
        Ok(_) => r.add(
            Level::Limited,
            "data objects (CKO_DATA): created one but could not find it again: keys disable, \
             lockdown and the audit witness cannot work on this token",
        ),
        Err(e) => r.add(
            Level::Limited,
            format!(
                "data objects (CKO_DATA) refused ({e}): keys disable, lockdown and the audit \
                 witness cannot work on this token"
            ),
        ),
    }
}

/// The audit trail's seal: HMAC-SHA256 with a key generated in the token.
fn hmac(r: &mut Report, s: &Session) {
    let outcome = session_key(
        s,
        KeyType::GENERIC_SECRET,
        &Mechanism::GenericSecretKeyGen,
        [Attribute::Sign(true), Attribute::Verify(true)],
    )
    .and_then(|key| {
        let data = b"xks-proxy probe: audit seal";
        let mac = s
            .sign(&Mechanism::Sha256Hmac, key, data)
            .map_err(|e| e.to_string())?;
        let good = s.verify(&Mechanism::Sha256Hmac, key, data, &mac).is_ok();
        let forged = s
            .verify(&Mechanism::Sha256Hmac, key, b"another record", &mac)
            .is_ok();
        let _ = s.destroy_object(key);
        match (mac.len(), good, forged) {
            (32, true, false) => Ok(()),
            _ => Err(format!(
                "HMAC-SHA256 answered a {}-byte MAC, verified it: {good}, verified another \
                 message with it: {forged}",
                mac.len()
            )),
        }
    });
    match outcome {
        Ok(()) => r.add(
            Level::Ok,
            "audit seal: HMAC-SHA256 sign and verify with a key generated in the token",
        ),
        Err(e) => r.add(
            Level::Limited,
            format!("audit seal: {e}: the audit trail cannot be sealed here"),
        ),
    }
}

/// Which IV shapes the token takes, the setting that follows, and a timed
/// round trip with it (a tampered tag must be refused).
fn gcm_checks(r: &mut Report, s: &Session, configured: Option<IvSource>) {
    let key = match session_key(
        s,
        KeyType::AES,
        &Mechanism::AesKeyGen,
        [Attribute::Encrypt(true), Attribute::Decrypt(true)],
    ) {
        Ok(k) => k,
        Err(e) => {
            r.add(
                Level::Fail,
                format!("cannot generate an AES-256 session key: {e}"),
            );
            return;
        }
    };
    let aad = hsm_aad(b"xks-proxy probe", b"");
    let plaintext = [0x5a_u8; 32];
    let shapes: Vec<(IvSource, Result<Sealed, String>)> = [
        IvSource::HsmRng,
        IvSource::HsmGenerated,
        IvSource::HsmGeneratedAppended,
    ]
    .into_iter()
    .map(|source| {
        let input = match IvInput::for_source(source, || IvInput::random_iv(s)) {
            Ok(input) => input,
            Err(e) => return (source, Err(format!("C_GenerateRandom: {e}"))),
        };
        let sealed = gcm::seal(s, key, input, &aad, &plaintext)
            .map_err(|e| e.to_string())
            .and_then(|sealed| {
                let back = gcm::open(s, key, &sealed.iv, &aad, &sealed.ciphertext, &sealed.tag)
                    .map_err(|e| format!("its output does not decrypt: {e}"))?;
                match bool::from(back.as_slice().ct_eq(&plaintext)) {
                    true => Ok(sealed),
                    false => Err("its output decrypts to something else".into()),
                }
            });
        (source, sealed)
    })
    .collect();
    for (source, outcome) in &shapes {
        let what = match source {
            IvSource::HsmRng => "an IV from the caller (C_GenerateRandom, then passed in)",
            IvSource::HsmGenerated => "an IV generated by the token into the zeroed parameter",
            IvSource::HsmGeneratedAppended => {
                "an IV generated by the token, appended to the output"
            }
        };
        match outcome {
            Ok(sealed) => r.add(
                Level::Ok,
                format!(
                    "AES-GCM with {what} ({} bytes): iv_source = {:?} works",
                    sealed.iv.len(),
                    iv_name(*source)
                ),
            ),
            Err(e) => r.add(Level::Info, format!("AES-GCM with {what}: no ({e})")),
        }
    }
    let Some((works, _)) = shapes.iter().find(|(_, o)| o.is_ok()) else {
        r.add(
            Level::Fail,
            "AES-GCM works with none of the IV sources the proxy knows: it cannot serve KMS here",
        );
        let _ = s.destroy_object(key);
        return;
    };
    let chosen = match configured {
        Some(c) if shapes.iter().any(|(src, o)| *src == c && o.is_ok()) => c,
        Some(c) => {
            r.iv_source = Some(*works);
            r.add(
                Level::Change,
                format!(
                    "iv_source = {:?} does not work on this token: set iv_source = {:?}",
                    iv_name(c),
                    iv_name(*works)
                ),
            );
            *works
        }
        None => {
            r.iv_source = Some(*works);
            *works
        }
    };
    round_trip(r, s, key, chosen, &aad);
    let _ = s.destroy_object(key);
}

fn round_trip(r: &mut Report, s: &Session, key: ObjectHandle, source: IvSource, aad: &[u8]) {
    let mut plaintext = Zeroizing::new(vec![0u8; 32]);
    let mut times = Vec::with_capacity(TIMED_ROUND_TRIPS);
    for _ in 0..TIMED_ROUND_TRIPS {
        let started = Instant::now();
        let outcome = s
            .generate_random_slice(&mut plaintext)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let input = IvInput::for_source(source, || IvInput::random_iv(s))
                    .map_err(|e| e.to_string())?;
                let sealed =
                    gcm::seal(s, key, input, aad, &plaintext).map_err(|e| e.to_string())?;
                let back = gcm::open(s, key, &sealed.iv, aad, &sealed.ciphertext, &sealed.tag)
                    .map_err(|e| e.to_string())?;
                if !bool::from(back.as_slice().ct_eq(plaintext.as_slice())) {
                    return Err("the decryption returned another plaintext".into());
                }
                let mut tag = sealed.tag.clone();
                tag[0] ^= 1;
                if gcm::open(s, key, &sealed.iv, aad, &sealed.ciphertext, &tag).is_ok() {
                    return Err("a ciphertext with a tampered tag decrypted".into());
                }
                Ok(())
            });
        if let Err(e) = outcome {
            r.add(Level::Fail, format!("round trip: {e}"));
            return;
        }
        times.push(started.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    r.add(
        Level::Ok,
        format!(
            "round trip ({} runs of encrypt, decrypt and a tampered tag refused): median {:.2} ms, \
             slowest {:.2} ms",
            times.len(),
            ms(times[times.len() / 2]),
            ms(times[times.len() - 1])
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(levels: &[Level]) -> Report {
        let mut r = Report::default();
        for l in levels {
            r.add(*l, "x");
        }
        r
    }

    #[test]
    fn the_worst_finding_decides() {
        assert_eq!(report(&[Level::Ok, Level::Info]).verdict(), Verdict::Ready);
        assert_eq!(
            report(&[Level::Ok, Level::Limited]).verdict(),
            Verdict::Changes
        );
        assert_eq!(
            report(&[Level::Change, Level::Ok]).verdict(),
            Verdict::Changes
        );
        assert_eq!(
            report(&[Level::Change, Level::Fail]).verdict(),
            Verdict::NotUsable
        );
        assert_eq!(Verdict::Changes.exit_code(), 2);
        assert!(report(&[Level::Fail])
            .render()
            .contains("verdict: NOT USABLE"));
    }

    #[test]
    fn a_session_limit_below_the_pool_asks_for_fewer_sessions() {
        let mut ti = crate::token_info::tests_support::blank();
        ti.max_sessions = Limit::Max(4);
        let mut r = Report::default();
        sessions(&mut r, &ti, None);
        assert_eq!(r.sessions, Some(2));
        assert_eq!(r.verdict(), Verdict::Changes);
        ti.max_sessions = Limit::Unknown;
        let mut r = Report::default();
        sessions(&mut r, &ti, None);
        assert_eq!(r.verdict(), Verdict::Ready);
    }
}
