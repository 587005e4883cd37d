//! The audit trail end to end, against a real SoftHSM token, on one trail
//! written once for the tests here (requests of every kind, then a clean
//! stop): what a record holds, `audit verify` on an intact trail and on one
//! tamper case at a time (the seals checked in the HSM), `audit report`,
//! `keys disable --dry-run`, `audit init-key`, `audit reconcile` on the live
//! trail; and `audit report` and `audit reconcile` on the fixtures in
//! `tests/fixtures/{audit,cloudtrail}`. The tests that each run a proxy of
//! their own (restarts, a killed run, retirement, a hostile client, a full
//! disk) are in `tests/audit_runs.rs`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use common::audit::*;
use common::*;
use serde_json::Value;
use xks_proxy::client::bodies;

/// A proxy's trail, written once for the tests here: requests of every
/// kind, then a clean stop (SIGTERM).
struct Fixture {
    proxy: Proxy,
    /// The trail's files (one: it is far below the rotation size).
    file: PathBuf,
    lines: Vec<String>,
}

static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();

fn fixture() -> MutexGuard<'static, Fixture> {
    FIXTURE
        .get_or_init(|| Mutex::new(make_fixture()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn make_fixture() -> Fixture {
    let mut p = Proxy::start_with(Options {
        extra_sections: audit_section("instance_id = \"fixture\""),
        ..Options::default()
    });
    let c = p.h1();
    block_on(async {
        let enc = c
            .call(
                "/keys/key-ed/encrypt",
                bodies::encrypt(b"secret data key", Some(b"ctx"), true),
            )
            .await
            .unwrap();
        assert_eq!(enc.status, 200);
        let enc = enc.json();
        let decrypt = bodies::decrypt_from(&enc, Some(b"ctx")).to_string();
        let status = |r: Result<xks_proxy::client::XksResponse, _>| r.unwrap().status.as_u16();
        assert_eq!(
            status(c.call("/keys/key-ed/decrypt", decrypt.clone()).await),
            200
        );
        assert_eq!(
            status(c.call("/keys/key-ed/metadata", bodies::metadata()).await),
            200
        );
        assert_eq!(
            status(c.call("/health", bodies::health("KmsHealthCheck")).await),
            200
        );
        let forger = c.with_credentials(AKID_A, "bm90IHRoZSBzZWNyZXQgb2YgdGhpcyBrZXkgc3RvcmUhISE=");
        let x = || bodies::encrypt(b"x", None, false);
        assert_eq!(status(forger.call("/keys/key-ed/encrypt", x()).await), 401);
        assert_eq!(status(c.call("/keys/no-such-key/encrypt", x()).await), 404);
        // key-d cannot encrypt: the key manager's answer, after every check.
        assert_eq!(status(c.call("/keys/key-d/encrypt", x()).await), 400);
        for _ in 0..6 {
            assert_eq!(status(c.call("/keys/key-ed/encrypt", x()).await), 200);
        }
    });
    let status = p.terminate();
    assert!(status.success(), "{status:?}\n{}", p.log());
    let files = trail_files(&p.dir.path().join("audit"));
    assert_eq!(files.len(), 1, "{files:?}");
    let lines = std::fs::read_to_string(&files[0])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    Fixture {
        proxy: p,
        file: files[0].clone(),
        lines,
    }
}

/// `audit verify` on these lines (written as the fixture's file, in a
/// directory of their own): (exit code, what it printed).
fn verify_lines(f: &Fixture, lines: &[String]) -> (i32, String) {
    verify_lines_with(f, lines, &[])
}

/// [`verify_lines`] with more arguments for `audit verify`.
fn verify_lines_with(f: &Fixture, lines: &[String], args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join(f.file.file_name().unwrap());
    std::fs::write(&copy, lines.join("\n") + "\n").unwrap();
    let mut all = vec!["audit", "verify"];
    all.extend_from_slice(args);
    all.push(dir.path().to_str().unwrap());
    verify_output(f.proxy.cli_raw(&all))
}

/// The index of the first successful Decrypt's record, and its seq.
fn decrypt_record(lines: &[String]) -> (usize, u64) {
    let i = lines
        .iter()
        .position(|l| {
            let v = json(l);
            v["type"] == "request" && v["operation"] == "Decrypt" && v["status"] == 200
        })
        .unwrap();
    (i, json(&lines[i])["seq"].as_u64().unwrap())
}

#[test]
fn records_say_what_happened_and_hold_no_secret() {
    let f = fixture();
    let records: Vec<Value> = f.lines.iter().map(|l| json(l)).collect();
    let requests: Vec<&Value> = records.iter().filter(|r| r["type"] == "request").collect();
    assert_eq!(requests.len(), 13, "{records:#?}");
    for r in &records {
        assert_eq!(r["instance"], "fixture");
        assert_eq!(r["v"], 1);
    }
    let by_status = |s: u64| requests.iter().filter(|r| r["status"] == s).count();
    assert_eq!(by_status(200), 10);
    let forged = requests.iter().find(|r| r["status"] == 401).unwrap();
    assert_eq!(forged["deniedBy"], "authentication");
    assert!(forged.get("accessKeyId").is_none());
    // Key store "test" allows every key: the HSM said it has none.
    let missing = requests.iter().find(|r| r["status"] == 404).unwrap();
    assert_eq!(missing["decision"], "failed");
    assert_eq!(missing["errorName"], "KeyNotFoundException");
    let refused_by_hsm = requests.iter().find(|r| r["status"] == 400).unwrap();
    assert_eq!(refused_by_hsm["decision"], "failed");
    assert_eq!(refused_by_hsm["errorName"], "InvalidKeyUsageException");
    let first = requests[0];
    assert_eq!(first["operation"], "Encrypt");
    assert_eq!(first["kmsRequestId"], "enc-req-1");
    assert_eq!(first["kmsOperation"], "GenerateDataKey");
    assert_eq!(first["kmsViaService"], "ebs");
    assert_eq!(first["awsPrincipalArn"], bodies::PRINCIPAL);
    assert_eq!(first["accessKeyId"], AKID_A);
    assert_eq!(first["keyVersion"], 0);
    assert!(first["clientAddr"]
        .as_str()
        .is_some_and(|a| a.starts_with("127.0.0.1:")));
    // A seal every 4 records, and a clean stop: `stop`, then the last seal.
    let seals = records.iter().filter(|r| r["type"] == "seal").count();
    assert!(seals >= 3, "{seals} seals");
    let n = records.len();
    assert_eq!(records[n - 2]["type"], "stop");
    assert_eq!(records[n - 1]["type"], "seal");
    assert_eq!(records[n - 1]["key"], "xks-proxy-audit-seal");
    // Never the data, the AAD or a secret.
    let text = f.lines.join("\n");
    for secret in [
        "c2VjcmV0IGRhdGEga2V5",
        "Y3R4",
        f.proxy.secret_a.as_str(),
        f.proxy.hsm.pin.as_str(),
    ] {
        assert!(!text.contains(secret), "the trail holds {secret}");
    }
}

#[test]
fn an_intact_trail_verifies_in_the_hsm() {
    let f = fixture();
    let (code, out) = verify_lines(&f, &f.lines);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("INTACT") && out.contains("clean stop"),
        "{out}"
    );
    assert!(out.contains("seal(s) verified in the HSM"), "{out}");
    // The configured directory is the default input.
    let out = f.proxy.cli_raw(&["audit", "verify", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["status"], "intact");
}

#[test]
fn an_edited_record_is_named() {
    let f = fixture();
    let (i, seq) = decrypt_record(&f.lines);
    let mut lines = f.lines.clone();
    lines[i] = lines[i].replace("user/Alice", "user/Mallory");
    let (code, out) = verify_lines(&f, &lines);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("TAMPERED") && out.contains("was modified"),
        "{out}"
    );
    assert!(out.contains(&format!("record seq {seq} ")), "{out}");
}

#[test]
fn a_deleted_record_is_named() {
    let f = fixture();
    let (i, seq) = decrypt_record(&f.lines);
    let mut lines = f.lines.clone();
    lines.remove(i);
    let (code, out) = verify_lines(&f, &lines);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains(&format!("record seq {seq} was deleted")),
        "{out}"
    );
}

#[test]
fn an_inserted_record_is_named() {
    let f = fixture();
    let (i, _) = decrypt_record(&f.lines);
    let mut lines = f.lines.clone();
    let forged = lines[i].replace("dec-req-1", "never-made-by-kms");
    lines.insert(i + 1, forged);
    let (code, out) = verify_lines(&f, &lines);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("was inserted"), "{out}");
    assert!(out.contains(&format!("line {})", i + 2)), "{out}");
}

#[test]
fn a_reordering_is_named() {
    let f = fixture();
    let (i, seq) = decrypt_record(&f.lines);
    let mut lines = f.lines.clone();
    lines.swap(i - 1, i);
    let (code, out) = verify_lines(&f, &lines);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains(&format!("record seq {} ", seq - 1)) && out.contains("out of order"),
        "{out}"
    );
}

/// A trail cut after a request: the HSM witnessed the seals after it, so
/// the cut is tampering; given as a range of the trail (`--partial`), it is
/// an unsealed tail.
#[test]
fn a_truncated_trail_is_caught_by_the_witness() {
    let f = fixture();
    // Cut after the last request: its seal, the stop and the final seal go.
    let last_request = f
        .lines
        .iter()
        .rposition(|l| json(l)["type"] == "request")
        .unwrap();
    let cut = &f.lines[..=last_request];
    let first_unsealed = cut
        .iter()
        .rposition(|l| json(l)["type"] == "seal")
        .map_or(0, |i| i + 1);
    let seq = json(&cut[first_unsealed])["seq"].as_u64().unwrap();
    let last_seal = json(f.lines.last().unwrap())["seq"].as_u64().unwrap();
    let (code, out) = verify_lines(&f, cut);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("TAMPERED: the trail was cut")
            && out.contains(&format!("witnessed a seal at seq {last_seal} ")),
        "{out}"
    );
    let (code, out) = verify_lines_with(&f, cut, &["--partial"]);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains("UNSEALED TAIL") && out.contains(&format!("from seq {seq} ")),
        "{out}"
    );
}

#[test]
fn a_rewritten_chain_fails_at_the_next_seal() {
    let f = fixture();
    let (i, _) = decrypt_record(&f.lines);
    let mut lines = f.lines.clone();
    lines[i] = lines[i].replace("user/Alice", "user/Mallory");
    // Every link after the change recomputed, as anyone can.
    for j in i + 1..lines.len() {
        let previous = lines[j - 1].clone();
        lines[j] = relink(&lines[j], &previous);
    }
    let seal = (i..lines.len())
        .find(|&j| json(&lines[j])["type"] == "seal")
        .unwrap();
    let seal_seq = json(&lines[seal])["seq"].as_u64().unwrap();
    let (code, out) = verify_lines(&f, &lines);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains(&format!("the seal seq {seal_seq} "))
            && out.contains("does not verify in the HSM"),
        "{out}"
    );
    // A seal edited by hand does not verify either.
    let mut lines = f.lines.clone();
    let first_seal = lines
        .iter()
        .position(|l| json(l)["type"] == "seal")
        .unwrap();
    let v = json(&lines[first_seal]);
    let mac = v["hmac"].as_str().unwrap();
    let flipped = format!(
        "{}{}",
        if mac.starts_with('0') { "1" } else { "0" },
        &mac[1..]
    );
    lines[first_seal] = lines[first_seal].replace(mac, &flipped);
    let (code, out) = verify_lines(&f, &lines);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("does not verify in the HSM"), "{out}");
}

#[test]
fn the_report_and_a_dry_run_disable_show_who_uses_a_key() {
    let f = fixture();
    let out = f.proxy.cli(&["audit", "report", "--key", "key-ed"]);
    assert!(
        out.contains("key key-ed (key store test): 9 use(s)"),
        "{out}"
    );
    for needle in [
        bodies::PRINCIPAL,
        "ebs",
        "Encrypt/GenerateDataKey",
        "Decrypt/Decrypt",
        "GetKeyMetadata/CreateKey",
        "authentication",
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }
    let json_out = f
        .proxy
        .cli(&["audit", "report", "--key", "key-ed", "--json"]);
    let v: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(v[0]["principals"][bodies::PRINCIPAL]["count"], 9);
    let out = f
        .proxy
        .cli(&["keys", "disable", "--dry-run", "key-ed", "--since", "1d"]);
    assert!(out.contains("dry run: nothing was changed"), "{out}");
    assert!(out.contains(bodies::PRINCIPAL), "{out}");
    let shown: Value =
        serde_json::from_str(&f.proxy.cli(&["keys", "show", "key-ed", "--json"])).unwrap();
    assert_eq!(shown["keyStatus"], "ENABLED", "a dry run disables nothing");
}

#[test]
fn reconciling_the_live_trail_finds_what_kms_never_made() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let span = [
        "--from",
        "2000-01-01T00:00:00Z",
        "--to",
        "2100-01-01T00:00:00Z",
    ];
    // KMS made the encrypts and the CreateKey, not the Decrypt.
    let partial = cloudtrail_file(
        dir.path(),
        &[("enc-req-1", "GenerateDataKey"), ("md-req-1", "CreateKey")],
    );
    let mut args = vec![
        "audit",
        "reconcile",
        "--cloudtrail",
        partial.to_str().unwrap(),
    ];
    args.extend(span);
    let out = f.proxy.cli_raw(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("ALARM") && text.contains("dec-req-1"),
        "{text}"
    );
    // With the Decrypt's event too, everything served was made by KMS.
    let full = cloudtrail_file(
        dir.path(),
        &[
            ("enc-req-1", "GenerateDataKey"),
            ("md-req-1", "CreateKey"),
            ("dec-req-1", "Decrypt"),
        ],
    );
    let mut args = vec!["audit", "reconcile", "--cloudtrail", full.to_str().unwrap()];
    args.extend(span);
    let out = f.proxy.cli_raw(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("served by the proxy, never made by KMS: 0"),
        "{text}"
    );
}

fn fixture_path(rel: &str) -> String {
    format!("{}/tests/fixtures/{rel}", env!("CARGO_MANIFEST_DIR"))
}

fn run_bin(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn report_and_reconcile_on_the_fixtures() {
    let trail = fixture_path("audit");
    let (code, out) = run_bin(&["audit", "report", &trail, "--key", "payments-key"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("key payments-key (key store payments): 5 use(s)"),
        "{out}"
    );
    for needle in [
        "arn:aws:iam::111122223333:role/app",
        "arn:aws:iam::444455556666:user/mallory",
        "vpce-0a1b2c3d4e5f60789",
        "s3",
        "Decrypt/Decrypt",
        "authorization",
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }
    assert!(!out.contains("analytics-key"), "--key: one key only\n{out}");
    let (_, out) = run_bin(&["audit", "report", &trail, "--since", "2026-11-20T10:21:00Z"]);
    assert!(
        out.contains("key payments-key (key store payments): 2 use(s)"),
        "{out}"
    );

    let records = fixture_path("cloudtrail/kms-records.json");
    let lookup = fixture_path("cloudtrail/lookup-events.json");
    let (code, out) = run_bin(&[
        "audit",
        "reconcile",
        "--cloudtrail",
        &records,
        "--audit",
        &trail,
        "--json",
    ]);
    assert_eq!(code, 3, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["matched"], 6, "{v:#}");
    assert_eq!(v["neverMade"].as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(v["neverMade"][0]["kmsRequestId"], "rogue-0001");
    assert_eq!(v["neverMade"][0]["clientAddr"], "203.0.113.9:51515");
    let reached: Vec<&str> = v["neverReached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["requestId"].as_str().unwrap())
        .collect();
    assert_eq!(
        reached,
        [
            "7c0e6a2e-0000-4000-8000-000000000007",
            "7c0e6a2e-0000-4000-8000-000000000008"
        ]
    );
    assert_eq!(v["neverReached"][1]["errorCode"], "AccessDeniedException");
    // lookup-events output holds the rogue request's event: KMS made it.
    let (code, out) = run_bin(&[
        "audit",
        "reconcile",
        "--cloudtrail",
        &records,
        &lookup,
        "--audit",
        &trail,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("served by the proxy, never made by KMS: 0"),
        "{out}"
    );
}

#[test]
fn init_key_makes_a_protected_seal_key_once() {
    let f = fixture();
    // The proxy made the configured one at startup.
    let out = f.proxy.cli(&["audit", "init-key"]);
    assert!(out.contains("xks-proxy-audit-seal: exists"), "{out}");
    let out = f
        .proxy
        .cli(&["audit", "init-key", "--label", "next-seal-key"]);
    assert!(out.contains("next-seal-key: created"), "{out}");
    let out = f
        .proxy
        .cli(&["audit", "init-key", "--label", "next-seal-key"]);
    assert!(out.contains("next-seal-key: exists"), "{out}");
    // An HMAC key is no AES key: never usable for KMS, listed for what it is.
    let list = f.proxy.cli(&["keys", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("next-seal-key") && l.contains("GENERIC_SECRET_256")),
        "{list}"
    );
}
