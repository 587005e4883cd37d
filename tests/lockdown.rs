//! The kill switch across a fleet: two proxy processes on one SoftHSM
//! token. `xks-proxy lockdown` makes both refuse Encrypt and Decrypt for the
//! key store (GetKeyMetadata says DISABLED, health is unaffected, the other
//! key store keeps serving); `unlock` lifts it; a lock `--for` a while lifts
//! itself; each instance's audit trail records what it saw. The time from
//! the command to the effect on each instance is measured and printed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use xks_proxy::client::{bodies, XksClient};

/// The answer to one Encrypt: (status, errorName).
fn encrypt(c: &XksClient, key: &str) -> (u16, Option<String>) {
    block_on(async {
        let r = c
            .call(
                &format!("/keys/{key}/encrypt"),
                bodies::encrypt(b"data key", None, false),
            )
            .await
            .unwrap();
        (r.status.as_u16(), r.error_name())
    })
}

fn locked(c: &XksClient) -> bool {
    encrypt(c, "key-ed") == (400, Some("InvalidStateException".into()))
}

/// Polls both instances until `cond` holds for each (at most `secs`);
/// returns how long each took.
fn until_both(
    clients: &[&XksClient; 2],
    secs: u64,
    cond: impl Fn(&XksClient) -> bool,
) -> [Option<Duration>; 2] {
    let start = Instant::now();
    let mut took = [None, None];
    while start.elapsed() < Duration::from_secs(secs) && took.iter().any(Option::is_none) {
        for (i, c) in clients.iter().enumerate() {
            if took[i].is_none() && cond(c) {
                took[i] = Some(start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    took
}

#[test]
fn a_lockdown_reaches_every_instance_and_lifts() {
    let mut a = Proxy::start_with(Options {
        extra_sections: "[audit]\ndir = \"audit\"\n".into(),
        ..Options::default()
    });
    let mut b = a.sibling();
    let (ca, cb) = (a.h1(), b.h1());
    assert_eq!(encrypt(&ca, "key-ed").0, 200);
    assert_eq!(encrypt(&cb, "key-ed").0, 200);

    a.cli(&[
        "lockdown",
        "--key-store",
        "test",
        "--reason",
        "drill: the SigV4 secret may have leaked",
    ]);
    let took = until_both(&[&ca, &cb], 30, locked);
    eprintln!(
        "lockdown took effect after {:?} (instance A) and {:?} (instance B)",
        took[0], took[1]
    );
    assert!(took.iter().all(Option::is_some), "{took:?}\n{}", a.log());
    // The spec of this feature is 2 s (a poll every second); on a loaded
    // machine allow more, but not the test's whole budget.
    assert!(
        took.iter().flatten().all(|t| *t < Duration::from_secs(10)),
        "{took:?}"
    );

    // Decrypt too; GetKeyMetadata says DISABLED; health and the other key
    // store are untouched.
    let enc = block_on(async {
        let oc = a.other_store_h1();
        let r = oc
            .call(
                "/keys/other-key/encrypt",
                bodies::encrypt(b"k", None, false),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "the other key store still serves");
        let dec = ca
            .call(
                "/keys/key-ed/decrypt",
                bodies::decrypt_from(&r.json(), None).to_string(),
            )
            .await
            .unwrap();
        assert_eq!(dec.error_name().as_deref(), Some("InvalidStateException"));
        let md = cb
            .call("/keys/key-ed/metadata", bodies::metadata())
            .await
            .unwrap();
        assert_eq!(md.status, 200);
        assert_eq!(md.json()["keyStatus"], "DISABLED");
        let health = ca
            .call("/health", bodies::health("KmsHealthCheck"))
            .await
            .unwrap();
        assert_eq!(health.status, 200);
        assert_eq!(
            health.json()["ekmFleetDetails"][0]["healthStatus"],
            "ACTIVE"
        );
        r
    });
    assert_eq!(enc.status, 200);
    assert_eq!(ping_status(&a).0, 200, "/ping is unaffected");
    let status = a.cli(&["lockdown", "--status"]);
    assert!(
        status.contains("ACTIVE") && status.contains("test") && status.contains("may have leaked"),
        "{status}"
    );
    assert_eq!(metric(&b, "xks_lockdown_active_locks"), 1.0);

    a.cli(&["unlock", "--key-store", "test"]);
    let took = until_both(&[&ca, &cb], 30, |c| encrypt(c, "key-ed").0 == 200);
    eprintln!(
        "unlock took effect after {:?} (A) and {:?} (B)",
        took[0], took[1]
    );
    assert!(took.iter().all(Option::is_some), "{took:?}");
    assert!(a
        .cli(&["lockdown", "--status"])
        .contains("no lockdown in force"));

    // A lock on every key store for 6 s lifts itself.
    a.cli(&[
        "lockdown",
        "--all",
        "--for",
        "6s",
        "--reason",
        "short drill",
    ]);
    let on = until_both(&[&ca, &cb], 30, locked);
    assert!(on.iter().all(Option::is_some), "{on:?}");
    let off = until_both(&[&ca, &cb], 30, |c| encrypt(c, "key-ed").0 == 200);
    eprintln!("a 6 s lock: on after {on:?}, off {off:?} later");
    assert!(off.iter().all(Option::is_some), "{off:?}");

    // The board lifts an expired lock by itself, at its expiry time; the
    // poller notices (and records it) at its next read of the markers, up
    // to a second later. Wait for that before stopping the instances.
    for p in [&a, &b] {
        assert!(p.wait_for_log("lock-expired"), "{}", p.log());
    }

    // Each instance recorded what it saw, in its own sealed chain.
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    let dir = a.dir.path().join("audit");
    let mut kinds: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "jsonl") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let kind = v["type"].as_str().unwrap().to_string();
            if ["lockdown", "unlock", "lock-expired"].contains(&kind.as_str()) {
                kinds
                    .entry(v["instance"].as_str().unwrap().to_string())
                    .or_default()
                    .push(kind);
            }
        }
    }
    assert_eq!(kinds.len(), 2, "one chain per instance: {kinds:?}");
    for seen in kinds.values() {
        assert_eq!(
            seen,
            &["lockdown", "unlock", "lockdown", "lock-expired"],
            "{kinds:?}"
        );
    }
    let out = a.cli(&["audit", "verify"]);
    assert_eq!(out.matches("INTACT").count(), 2, "{out}");
}

#[test]
fn lockdown_commands_check_what_they_are_told() {
    let p = Proxy::start();
    let out = p.cli_raw(&["lockdown", "--key-store", "no-such-store", "--reason", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key store is named"));
    let out = p.cli_raw(&["lockdown", "--key-store", "test"]);
    assert_eq!(out.status.code(), Some(2), "a reason is required");
    let out = p.cli_raw(&["lockdown", "--all", "--for", "soon", "--reason", "x"]);
    assert_eq!(out.status.code(), Some(2));
    // Without [audit] the proxy still honours locks (and has no trail).
    p.cli(&[
        "lockdown",
        "--key-store",
        "other",
        "--reason",
        "only the other store",
    ]);
    let c = p.h1();
    assert!(eventually(30, || encrypt(&c, "key-ed").0 == 200));
    let oc = p.other_store_h1();
    assert!(eventually(30, || locked_other(&oc)), "{}", p.log());
    p.cli(&["unlock", "--all"]);
    assert!(eventually(30, || !locked_other(&oc)));
}

fn locked_other(c: &XksClient) -> bool {
    encrypt(c, "other-key") == (400, Some("InvalidStateException".into()))
}

/// A second lockdown on a scope never weakens the first: `--for 10m` after
/// an indefinite lock leaves it indefinite (before: it replaced the marker
/// and the lock lifted itself ten minutes later); a longer one lengthens a
/// shorter one; `unlock` lifts it.
#[test]
fn a_second_lockdown_never_shortens_the_first() {
    let p = Proxy::start();
    let c = p.h1();
    let status = || -> Value {
        let out = p.cli(&["lockdown", "--status", "--json"]);
        serde_json::from_str(out.lines().next().unwrap_or("null")).unwrap_or(Value::Null)
    };
    p.cli(&["lockdown", "--all", "--reason", "incident"]);
    let first = status();
    let out = p.cli(&[
        "lockdown",
        "--all",
        "--for",
        "10m",
        "--reason",
        "maintenance",
    ]);
    assert!(
        out.contains("already locked down") && out.contains("until unlocked"),
        "{out}"
    );
    let second = status();
    assert_eq!(second["id"], first["id"], "the same lock: {second}");
    assert!(second["until"].is_null(), "still without end: {second}");
    assert!(
        second["reason"]
            .as_str()
            .is_some_and(|r| r.contains("incident") && r.contains("maintenance")),
        "{second}"
    );
    assert!(eventually(10, || locked(&c)));
    p.cli(&["unlock", "--all"]);
    assert!(eventually(10, || !locked(&c)));

    // A short lock, then a longer one: the longer end stands.
    p.cli(&["lockdown", "--all", "--for", "10m", "--reason", "short"]);
    p.cli(&["lockdown", "--all", "--for", "2h", "--reason", "longer"]);
    let short_then_long = status()["until"].as_str().unwrap().to_string();
    p.cli(&[
        "lockdown",
        "--all",
        "--for",
        "1m",
        "--reason",
        "shorter again",
    ]);
    assert_eq!(status()["until"].as_str().unwrap(), short_then_long);
    p.cli(&["unlock", "--all"]);
}
