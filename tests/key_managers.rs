//! Key managers that are not SoftHSM, and several that disagree.
//!
//! - Two tokens holding *different* key material under one label (two
//!   tokens initialized separately, a replication that did not happen):
//!   the one that differs from the reference never serves that key.
//! - A token that refuses read-only sessions (AWS CloudHSM's SDK 5) is
//!   served with read-write ones.
//! - `hsm probe` gives the verdict and the settings for each kind of token
//!   the tests can make: the implementation under test (SoftHSM or
//!   Kryoptic), vendor IV behaviours (the filter module), a refused PIN,
//!   and a network HSM behind `p11-kit`.
//! - Two instances starting and stopping together on one token, again and
//!   again, each exit 0.
//!
//! openCryptoki (a token without AES-GCM) has its own binary,
//! `tests/opencryptoki.rs`: it needs root and its daemon.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::load::Load;
use common::network_hsm::{
    ekm_statuses, p11_kit_prefix, p11_kit_server, status_of, two_tokens_with, SHARED_KEY,
};
use common::*;

/// "xks-test" (`token-a`) and "second-hsm" (`token-b`), each holding
/// [`SHARED_KEY`] made in it: same label, different key material.
fn diverging_tokens() -> Options {
    two_tokens_with(Arc::new(|dir: &Path, hsm: &TestToken| {
        hsm.add_token("second-hsm");
        for (token, n) in [("xks-test", 1u8), ("second-hsm", 2u8)] {
            let key = dir.join(format!("key-{n}"));
            let mut material = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut material)
                .unwrap();
            write_private(&key, "");
            std::fs::write(&key, material).unwrap();
            hsm.import_aes_key(token, SHARED_KEY, &key);
            std::fs::remove_file(&key).unwrap();
        }
        Vec::new()
    }))
}

#[test]
fn a_key_manager_holding_other_material_never_serves_that_key() {
    let p = Proxy::start_with(diverging_tokens());
    let c = p.h1();
    // Found at startup, before any request, and named.
    assert!(
        p.wait_for_log("holds different key material for the key than the reference"),
        "{}",
        p.log()
    );
    let line = p
        .log()
        .lines()
        .find(|l| l.contains("holds different key material"))
        .unwrap()
        .to_string();
    assert!(
        line.contains(SHARED_KEY) && line.contains("token-b") && line.contains("token-a"),
        "{line}"
    );
    // Round trips, spread over both key managers by the routing: every one
    // succeeds, because token-b never encrypts or decrypts the key.
    let load = Load::start(&c, SHARED_KEY);
    load.wait_for(300, &p);
    let (failures, _) = load.finish();
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(3)]
    );
    let encrypts = |ekm: &str| {
        metric(
            &p,
            &format!("xks_hsm_call_duration_seconds_count{{call=\"encrypt\",ekm_id=\"{ekm}\"}}"),
        )
    };
    assert_eq!(
        encrypts("token-b"),
        0.0,
        "token-b encrypted with its own key"
    );
    assert!(encrypts("token-a") >= 300.0);
    assert_eq!(
        metric(&p, "xks_hsm_keys_diverging{ekm_id=\"token-b\"}"),
        1.0
    );
    assert_eq!(
        metric(&p, "xks_hsm_keys_diverging{ekm_id=\"token-a\"}"),
        0.0
    );
    // GetHealthStatus: token-b serves, but not every key.
    assert_eq!(status_of(&c, "token-b"), "DEGRADED");
    assert_eq!(status_of(&c, "token-a"), "ACTIVE");
    // `keys show` says which holds which.
    let shown = p.cli(&["keys", "show", SHARED_KEY]);
    assert!(
        shown.contains("token-a") && shown.contains("reference"),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .any(|l| l.contains("token-b") && l.contains("DIFFERENT")),
        "{shown}"
    );
}

#[test]
fn key_managers_holding_the_same_key_both_serve_it() {
    let p = Proxy::start_with(common::network_hsm::two_tokens());
    let c = p.h1();
    assert!(eventually(10, || ekm_statuses(&c)
        .iter()
        .all(|(_, s)| s == "ACTIVE")));
    let load = Load::start(&c, SHARED_KEY);
    load.wait_for(300, &p);
    let (failures, _) = load.finish();
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(3)]
    );
    for ekm in ["token-a", "token-b"] {
        assert_eq!(
            metric(&p, &format!("xks_hsm_keys_diverging{{ekm_id=\"{ekm}\"}}")),
            0.0
        );
    }
    let shown = p.cli(&["keys", "show", SHARED_KEY]);
    assert!(
        shown
            .lines()
            .any(|l| l.contains("token-b") && l.contains("same key")),
        "{shown}"
    );
    assert!(!p.log().contains("holds different key material"));
}

/// The vendor filter module in front of the implementation under test,
/// with `env` (its switches).
fn vendor_options(
    dir: &Path,
    extra_hsm: &str,
    env: &'static [(&'static str, &'static str)],
) -> Options {
    let module = vendor_module(dir);
    Options {
        module: module.to_str().unwrap().to_string(),
        extra_hsm: extra_hsm.to_string(),
        setup: Some(Arc::new(move |_, hsm: &TestToken| {
            let mut vars: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            vars.push(("XKS_TEST_IVGEN_TARGET".into(), hsm.module()));
            vars
        })),
        ..Options::default()
    }
}

#[test]
fn a_token_that_refuses_read_only_sessions_is_served_with_read_write_ones() {
    let dir = tempfile::tempdir().unwrap();
    const REFUSE: &[(&str, &str)] = &[("XKS_TEST_REFUSE_RO_SESSIONS", "1")];
    // The default, "auto": read-only refused once, read-write from then on.
    let p = Proxy::start_with(vendor_options(dir.path(), "", REFUSE));
    block_on(async {
        let c = p.h1();
        for _ in 0..20 {
            let r = c
                .call(
                    "/keys/key-ed/encrypt",
                    xks_proxy::client::bodies::encrypt(b"x", None, true),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
    });
    assert!(
        p.wait_for_log("the token refused a read-only session"),
        "{}",
        p.log()
    );
    let once = p
        .log()
        .matches("the token refused a read-only session")
        .count();
    assert_eq!(once, 1, "said once, not per session");
    drop(p);

    // "read-only" as configured: the key manager cannot serve, and says why.
    let p = Proxy::start_with(vendor_options(
        dir.path(),
        "session_kind = \"read-only\"",
        REFUSE,
    ));
    let c = p.h1();
    assert!(eventually(10, || status_of(&c, &ekm_statuses(&c)[0].0)
        == "UNAVAILABLE"));
    assert!(p.wait_for_log("cannot open a session"), "{}", p.log());
}

/// Runs `xks-proxy hsm probe ARGS` with `env`; (exit code, stdout).
fn probe(args: &[&str], env: &[(String, String)]) -> (i32, String) {
    let out = std::process::Command::new(bin())
        .args(["hsm", "probe"])
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.code().unwrap_or(-1),
        text + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `hsm probe` of the token `label` of `module`, PIN from `pin`.
fn probe_token(module: &str, label: &str, pin: &str, env: &[(String, String)]) -> (i32, String) {
    probe(
        &[
            "--module",
            module,
            "--token-label",
            label,
            "--pin-file",
            pin,
        ],
        env,
    )
}

#[test]
fn hsm_probe_tells_whether_a_token_will_do_and_how_to_configure_it() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = make_token(dir.path(), "probe-me");
    let pin = dir.path().join("pin");
    write_private(&pin, &hsm.pin);
    let pin = pin.to_str().unwrap();
    let env = vec![(hsm.env_var().to_string(), hsm.conf.display().to_string())];
    let module = hsm.module();
    // The token's objects, in an order of their own (Kryoptic lists them
    // in no fixed order).
    let objects = || {
        let mut lines: Vec<String> = hsm
            .pkcs11_tool("probe-me", &["--list-objects"])
            .lines()
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    };
    let objects_before = objects();

    // The implementation under test: ready, with the default settings.
    let (code, out) = probe_token(&module, "probe-me", pin, &env);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("verdict: READY"), "{out}");
    assert!(out.contains("iv_source = \"hsm-rng\""), "{out}");
    assert!(out.contains(implementation().manufacturer()), "{out}");
    for m in [
        "CKM_AES_GCM",
        "CKM_AES_KEY_GEN",
        "CKM_SHA256_HMAC",
        "CKM_GENERIC_SECRET_KEY_GEN",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with("ok") && l.contains(m)),
            "{m}: {out}"
        );
    }
    assert!(out.contains("tampered tag refused"), "{out}");
    // Read-only on the token: nothing left behind.
    assert_eq!(objects(), objects_before);

    // A token that is not there: every slot named, not usable.
    let (code, out) = probe_token(&module, "no-such", pin, &env);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("slots seen: slot") && out.contains("'probe-me'"),
        "{out}"
    );

    // A wrong PIN: not usable.
    let wrong = dir.path().join("wrong");
    write_private(&wrong, "wrong-pin");
    let (code, out) = probe_token(&module, "probe-me", wrong.to_str().unwrap(), &env);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("login to the token failed"), "{out}");

    // HSMs that make the IV themselves and refuse the caller's: the probe
    // finds the shape and names the setting.
    let vendor = vendor_module(dir.path());
    let vendor = vendor.to_str().unwrap();
    for (mode, setting) in [
        ("parameter", "hsm-generated"),
        ("appended", "hsm-generated-appended"),
    ] {
        let mut env = env.clone();
        env.extend([
            ("XKS_TEST_IVGEN_TARGET".to_string(), module.clone()),
            ("XKS_TEST_IVGEN_MODE".to_string(), mode.to_string()),
            ("XKS_TEST_REFUSE_CALLER_IV".to_string(), "1".to_string()),
        ]);
        let (code, out) = probe_token(vendor, "probe-me", pin, &env);
        assert_eq!(code, 0, "{mode}: {out}");
        assert!(
            out.contains(&format!("iv_source = \"{setting}\"")),
            "{mode}: {out}"
        );
        assert!(
            out.lines().any(|l| l.starts_with("info")
                && l.contains("IV from the caller")
                && l.contains("no (")),
            "{mode}: {out}"
        );
    }

    // A token that refuses read-only sessions: said, and "auto" copes.
    let mut refusing = env.clone();
    refusing.extend([
        ("XKS_TEST_IVGEN_TARGET".to_string(), module.clone()),
        ("XKS_TEST_REFUSE_RO_SESSIONS".to_string(), "1".to_string()),
    ]);
    let (code, out) = probe_token(vendor, "probe-me", pin, &refusing);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("refuses read-only sessions"), "{out}");
}

#[test]
fn hsm_probe_with_a_configuration_names_the_settings_to_change() {
    let dir = tempfile::tempdir().unwrap();
    // The proxy as configured says iv_source = "hsm-rng", but its HSM only
    // generates IVs itself (into the parameter, as CloudHSM does).
    let mut opts = vendor_options(
        dir.path(),
        "",
        &[
            ("XKS_TEST_IVGEN_MODE", "parameter"),
            ("XKS_TEST_REFUSE_CALLER_IV", "1"),
        ],
    );
    // Keys are not needed (the probe works on session objects); the proxy
    // itself would fail its health probe with this setting.
    opts.create_keys = false;
    let p = Proxy::start_with(Options {
        extra_hsm: "iv_source = \"hsm-generated\"".into(),
        ..opts
    });
    let out = p.cli_raw(&["hsm", "probe"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    // Now the configuration that does not fit.
    let original = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        original.replace("iv_source = \"hsm-generated\"", "iv_source = \"hsm-rng\""),
    )
    .unwrap();
    let out = p.cli_raw(&["hsm", "probe"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("CHANGE")
            && l.contains("iv_source = \"hsm-rng\" does not work")
            && l.contains("set iv_source = \"hsm-generated\"")),
        "{text}"
    );
    assert!(text.contains("verdict: USABLE WITH CHANGES"), "{text}");
}

#[test]
fn hsm_probe_through_a_network_hsm() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = make_token(dir.path(), "net-token");
    let pin = dir.path().join("pin");
    write_private(&pin, &hsm.pin);
    let sock = dir.path().join("p11.sock");
    let mut server = p11_kit_server(&hsm, &sock, "net-token");
    assert!(eventually(10, || sock.exists()));
    let client = p11_kit_prefix().join("lib/pkcs11/p11-kit-client.so");
    let env = vec![(
        "P11_KIT_SERVER_ADDRESS".to_string(),
        format!("unix:path={}", sock.display()),
    )];
    let (code, out) = probe_token(
        client.to_str().unwrap(),
        "net-token",
        pin.to_str().unwrap(),
        &env,
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("verdict: READY"), "{out}");
    assert!(out.contains("p11-kit") || out.contains("library"), "{out}");
}

/// Two instances on one token start and stop together, again and again:
/// every exit is 0 (a transient failure to read the token while the other
/// writes it is retried; nothing calls into the library while it is torn
/// down at exit).
#[test]
fn two_instances_on_one_token_start_and_stop_cleanly_fifty_times() {
    let mut a = Proxy::start();
    let mut b = a.sibling();
    for round in 0..50 {
        let (status_a, status_b) = std::thread::scope(|s| {
            let stop_b = s.spawn(|| b.terminate());
            (a.terminate(), stop_b.join().unwrap())
        });
        assert!(
            status_a.success() && status_b.success(),
            "round {round}: {status_a:?} {status_b:?}\n{}\n{}",
            a.log(),
            b.log()
        );
        std::thread::scope(|s| {
            s.spawn(|| b.start_on_new_ports());
            a.start_on_new_ports();
        });
    }
}
