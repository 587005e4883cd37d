//! The audit trail end to end, against a real SoftHSM token: what a record
//! holds, `audit verify` on an intact trail and on one tamper case at a
//! time (the seals checked in the HSM), `audit report`, `keys disable
//! --dry-run`, `audit reconcile` on the live trail and on the fixtures in
//! `tests/fixtures/{audit,cloudtrail}`, and a disk that fills up under
//! `on_failure = "refuse"`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use xks_proxy::audit::record::{hash_line, hex};
use xks_proxy::client::bodies;

/// `[audit]` for the test proxies: a seal every 4 records, so that a short
/// trail has several.
fn audit_section(extra: &str) -> String {
    format!("[audit]\ndir = \"audit\"\nseal_every_records = 4\nseal_every_secs = 3600\n{extra}\n")
}

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

fn trail_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    files
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

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap()
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

/// (exit code, stdout and stderr) of an `audit verify`.
fn verify_output(out: std::process::Output) -> (i32, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
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

/// `n` Encrypts of `key-ed`, each answered 200.
fn encrypt_n(p: &Proxy, n: usize) {
    block_on(async {
        for _ in 0..n {
            let r = p
                .h1()
                .call("/keys/key-ed/encrypt", bodies::encrypt(b"k", None, false))
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
    })
}

/// Replaces a line's `prev` (always its last field) with the hash of
/// `previous`.
fn relink(line: &str, previous: &str) -> String {
    let cut = line.rfind("\"prev\":\"").unwrap();
    format!(
        "{}\"prev\":\"{}\"}}",
        &line[..cut],
        hex(&hash_line(previous.as_bytes()))
    )
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

/// Cutting the trail back to an earlier seal while the proxy is stopped
/// leaves files that end sealed, as if the instance had stopped there. The
/// HSM's witness of the newest seal catches it; the restarted proxy does not
/// build on the cut files, and the gap stays in the chain until the removed
/// records are given back.
#[test]
fn a_trail_cut_while_stopped_stays_caught_across_a_restart() {
    let mut p = Proxy::start_with(Options {
        extra_sections: audit_section("instance_id = \"cut\""),
        ..Options::default()
    });
    let c = p.h1();
    block_on(async {
        for _ in 0..9 {
            let r = c
                .call("/keys/key-ed/encrypt", bodies::encrypt(b"k", None, false))
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
    });
    let status = p.terminate();
    assert!(status.success(), "{status:?}\n{}", p.log());
    let dir = p.dir.path().join("audit");
    let files = trail_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let original = std::fs::read_to_string(&files[0]).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let last_seal = json(lines.last().unwrap())["seq"].as_u64().unwrap();
    // Back to the first seal (the run's start; how many follow depends on
    // how the writer batched the records): what is left ends with a seal
    // that verifies.
    let cut_at = lines
        .iter()
        .position(|l| json(l)["type"] == "seal")
        .unwrap();
    let kept_seq = json(lines[cut_at])["seq"].as_u64().unwrap();
    assert!(kept_seq + 3 < last_seal, "{original}");
    std::fs::write(&files[0], lines[..=cut_at].join("\n") + "\n").unwrap();

    let (code, out) = verify_output(p.cli_raw(&["audit", "verify"]));
    assert_eq!(code, 3, "{out}\n{}", p.log());
    assert!(
        out.contains(&format!("it ends at seq {kept_seq} "))
            && out.contains(&format!("witnessed a seal at seq {last_seal} ")),
        "{out}"
    );
    // Without the witness this was an intact trail: its seals all verify.
    assert!(out.contains("seal(s) verified in the HSM"), "{out}");

    // Restarted, the proxy goes on from the witnessed seal, not from the
    // cut files, and says so.
    p.start_again();
    assert!(
        p.wait_for_log("the audit files end before the newest seal the HSM witnessed"),
        "{}",
        p.log()
    );
    encrypt_n(&p, 1);
    let status = p.terminate();
    assert!(status.success(), "{status:?}\n{}", p.log());
    let files = trail_files(&dir);
    assert_eq!(files.len(), 2, "{files:?}");
    let second = std::fs::read_to_string(&files[1]).unwrap();
    let start = json(second.lines().nth(1).unwrap());
    assert_eq!(start["type"], "start", "{second}");
    assert_eq!(start["witnessSeq"], last_seal, "{second}");
    assert_eq!(start["filesNextSeq"], kept_seq + 1, "{second}");
    let (code, out) = verify_output(p.cli_raw(&["audit", "verify"]));
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains(&format!(
            "records seq {} to {last_seal} were deleted",
            kept_seq + 1
        )),
        "{out}"
    );
    // The same without the cut file: the new run's start record names the
    // gap.
    let (code, out) = verify_output(p.cli_raw(&["audit", "verify", files[1].to_str().unwrap()]));
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("were removed while the instance was stopped"),
        "{out}"
    );

    // Given back (from an archive, say), the removed records close the gap.
    let restored = tempfile::tempdir().unwrap();
    std::fs::write(
        restored.path().join(files[0].file_name().unwrap()),
        &original,
    )
    .unwrap();
    std::fs::copy(
        &files[1],
        restored.path().join(files[1].file_name().unwrap()),
    )
    .unwrap();
    let (code, out) =
        verify_output(p.cli_raw(&["audit", "verify", restored.path().to_str().unwrap()]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("INTACT"), "{out}");
}

/// Someone who can write the trail's files forges records after a clean
/// stop, each with the right seq and prev. Before: the next run sealed
/// them with the HSM key and `audit verify` said INTACT. Now they are
/// tampering, named, before and after a restart, and the new run's seals
/// never cover them.
#[test]
fn records_forged_after_a_clean_stop_are_never_sealed() {
    let mut p = Proxy::start_with(Options {
        extra_sections: audit_section("instance_id = \"forged\""),
        ..Options::default()
    });
    encrypt_n(&p, 3);
    let status = p.terminate();
    assert!(status.success(), "{status:?}\n{}", p.log());
    let dir = p.dir.path().join("audit");
    let files = trail_files(&dir);
    let original = std::fs::read_to_string(&files[0]).unwrap();
    let last = original.lines().last().unwrap().to_string();
    assert_eq!(json(&last)["type"], "seal", "{original}");
    // Three requests copied from real ones, renumbered and relinked.
    let template = original
        .lines()
        .find(|l| json(l)["type"] == "request")
        .unwrap()
        .to_string();
    let mut previous = last.clone();
    let mut forged = String::new();
    let first_forged = json(&last)["seq"].as_u64().unwrap() + 1;
    for n in 0..3 {
        let mut v = json(&template);
        v["seq"] = (first_forged + n).into();
        v["kmsRequestId"] = format!("forged-{n}").into();
        let line = relink(&serde_json::to_string(&v).unwrap(), &previous);
        forged.push_str(&line);
        forged.push('\n');
        previous = line;
    }
    std::fs::write(&files[0], original + &forged).unwrap();
    let named = |out: &str| {
        out.contains("TAMPERED")
            && out.contains(&format!("3 record(s) from seq {first_forged} "))
            && out.contains("added while the instance was stopped")
    };
    let (code, out) = verify_output(p.cli_raw(&["audit", "verify"]));
    assert_eq!(code, 3, "{out}");
    assert!(named(&out), "{out}");

    // One more run: it leaves them out, says so, and they stay tampering.
    p.start_again();
    assert!(
        p.wait_for_log("they were added while the proxy was stopped"),
        "{}",
        p.log()
    );
    encrypt_n(&p, 1);
    let status = p.terminate();
    assert!(status.success(), "{status:?}\n{}", p.log());
    let (code, out) = verify_output(p.cli_raw(&["audit", "verify"]));
    assert_eq!(code, 3, "{out}");
    assert!(named(&out), "{out}");
    let (code, json_out) = verify_output(p.cli_raw(&["audit", "verify", "--json"]));
    assert_eq!(code, 3, "{json_out}");
    assert!(json_out.contains("after-final-seal"), "{json_out}");
}

/// A run killed after its last seal leaves records nothing proves; the next
/// run does not seal them as if they were proven: `verify` calls them
/// unproven (exit 5), with their range.
#[test]
fn a_killed_runs_unsealed_records_stay_unproven() {
    // Seals only at stops (and every 1000 records): the second run's
    // records stay unsealed until it is killed.
    let mut p = Proxy::start_with(Options {
        extra_sections: "[audit]\ndir = \"audit\"\nseal_every_records = 1000\n\
                         seal_every_secs = 3600\ninstance_id = \"killed\"\n"
            .into(),
        ..Options::default()
    });
    encrypt_n(&p, 2);
    let status = p.terminate();
    assert!(status.success(), "{status:?}\n{}", p.log());
    let dir = p.dir.path().join("audit");
    let written = |n: usize| {
        trail_files(&dir)
            .iter()
            .map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("\"type\":\"request\""))
                    .count()
            })
            .sum::<usize>()
            >= n
    };
    p.start_again();
    encrypt_n(&p, 3);
    assert!(eventually(10, || written(5)));
    p.kill();
    let (code, out) = verify_output(p.cli_raw(&["audit", "verify"]));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("UNSEALED TAIL"), "{out}");
    p.start_again();
    assert!(
        p.wait_for_log("ended without its final seal"),
        "{}",
        p.log()
    );
    let status = p.terminate();
    assert!(status.success(), "{status:?}\n{}", p.log());
    let (code, out) = verify_output(p.cli_raw(&["audit", "verify"]));
    assert_eq!(code, 5, "{out}\n{}", p.log());
    assert!(
        out.contains("UNPROVEN: ") && out.contains(" record(s) from seq "),
        "{out}"
    );
    let (code, json_out) = verify_output(p.cli_raw(&["audit", "verify", "--json"]));
    assert_eq!(code, 5);
    assert!(json_out.contains("\"unproven\""), "{json_out}");
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

/// A CloudTrail log file with KMS events for these request ids.
fn cloudtrail_file(dir: &Path, ids: &[(&str, &str)]) -> PathBuf {
    let records: Vec<Value> = ids
        .iter()
        .map(|(id, name)| {
            serde_json::json!({
                "eventVersion": "1.08",
                "eventTime": "2026-01-01T00:00:00Z",
                "eventSource": "kms.amazonaws.com",
                "eventName": name,
                "awsRegion": "us-east-1",
                "requestParameters": {"keyId": bodies::KEY_ARN},
                "additionalEventData": {"customKeyStoreId": "cks-1234567890abcdef0"},
                "requestID": id,
                "eventID": format!("event-{id}"),
                "resources": [{"accountId": "123456789012", "type": "AWS::KMS::Key", "ARN": bodies::KEY_ARN}],
                "eventType": "AwsApiCall",
            })
        })
        .collect();
    let path = dir.join(format!("ct-{}.json", ids.len()));
    std::fs::write(&path, serde_json::json!({ "Records": records }).to_string()).unwrap();
    path
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

/// A mount namespace in which the audit directory is a tiny tmpfs: the
/// disk fills up under the running proxy. `None` where the system does not
/// allow unprivileged mount namespaces.
fn small_disk_wrapper() -> Option<Vec<String>> {
    let ok = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| {
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs -o size=96k tmpfs \"$XKS_TEST_AUDIT_DIR\" && exec \"$0\" \"$@\"",
        ]
        .map(String::from)
        .to_vec()
    })
}

#[test]
fn a_full_disk_refuses_key_operations_but_not_health() {
    let Some(wrapper) = small_disk_wrapper() else {
        eprintln!("skipped: this system does not allow unshare --user --mount");
        return;
    };
    let p = Proxy::start_with(Options {
        extra_sections: "[audit]\ndir = \"audit\"\nseal_every_records = 100000\n".into(),
        wrapper,
        setup: Some(std::sync::Arc::new(|dir: &Path, _: &TestToken| {
            let audit = dir.join("audit");
            std::fs::create_dir_all(&audit).unwrap();
            vec![(
                "XKS_TEST_AUDIT_DIR".to_string(),
                audit.to_str().unwrap().to_string(),
            )]
        })),
        ..Options::default()
    });
    let c = p.h1();
    let started = Instant::now();
    let (served, refused) = block_on(async {
        let mut conn = c.connect().await.unwrap();
        let mut served = 0;
        while started.elapsed() < Duration::from_secs(60) {
            let r = conn.send(signed_encrypt(&c)).await.unwrap();
            match r.status.as_u16() {
                200 => served += 1,
                _ => return (served, Some((r.status.as_u16(), r.error_name()))),
            }
        }
        (served, None)
    });
    eprintln!("the 96 KiB audit disk took {served} requests, then: {refused:?}");
    assert_eq!(
        refused,
        Some((503, Some("DependencyTimeoutException".to_string()))),
        "log:\n{}",
        p.log()
    );
    assert!(served > 20, "{served}");
    // Health is not refused; the load balancer is told to go elsewhere.
    let health = block_on(async {
        c.call("/health", bodies::health("KmsHealthCheck"))
            .await
            .unwrap()
    });
    assert_eq!(health.status, 200);
    assert!(eventually(10, || ping_status(&p).0 == 503));
    assert!(metric(&p, "xks_audit_requests_refused_total") >= 1.0);
    assert!(
        p.log().contains("cannot write the audit trail"),
        "{}",
        p.log()
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

/// Whoever holds stolen SigV4 credentials chooses the request metadata the
/// reports print. Before: an Encrypt whose kmsRequestId held `\r\x1b[2K` or
/// `\n` plus a fake line erased or forged lines of `audit reconcile`'s
/// "served by the proxy, never made by KMS" list. Now every such field is
/// shown escaped, in `report`, `reconcile` and `verify`.
#[test]
fn what_a_client_put_in_a_request_cannot_rewrite_the_reports() {
    let mut p = Proxy::start_with(Options {
        extra_sections: audit_section("instance_id = \"hostile\""),
        ..Options::default()
    });
    let hostile_id = "evil\r\u{1b}[2K\nserved by the proxy, never made by KMS: 0\u{0}";
    let hostile_arn = "arn:aws:iam::111122223333:role/x\u{2028}\u{202e}gnp.exe";
    let body = serde_json::json!({
        "requestMetadata": {
            "awsPrincipalArn": hostile_arn,
            "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/k",
            "kmsOperation": "Encrypt",
            "kmsRequestId": hostile_id,
            "kmsViaService": "s3\u{1b}]0;title\u{7}",
        },
        "plaintext": "AAAA",
        "encryptionAlgorithm": "AES_GCM",
    });
    block_on(async {
        let r = p
            .h1()
            .call("/keys/key-ed/encrypt", body.to_string().into_bytes())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
    });
    let status = p.terminate();
    assert!(status.success(), "{status:?}\n{}", p.log());
    let hostile = |text: &str| {
        text.chars().any(|c| {
            (c.is_control() && c != '\n')
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}')
        }) || text
            .lines()
            .any(|l| l.starts_with("served by the proxy, never made by KMS: 0"))
    };
    let report = p.cli(&["audit", "report", "--key", "key-ed"]);
    assert!(!hostile(&report), "{report:?}");
    assert!(
        report.contains("\\u{2028}") && report.contains("\\u{1b}"),
        "{report}"
    );
    let dir = tempfile::tempdir().unwrap();
    let none = cloudtrail_file(dir.path(), &[]);
    let out = p.cli_raw(&[
        "audit",
        "reconcile",
        "--cloudtrail",
        none.to_str().unwrap(),
        "--from",
        "2000-01-01T00:00:00Z",
        "--to",
        "2100-01-01T00:00:00Z",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(!hostile(&text), "{text:?}");
    assert!(
        text.contains("ALARM") && text.contains("evil\\u{d}\\u{1b}[2K\\u{a}served"),
        "{text}"
    );
    let (code, out) = verify_output(p.cli_raw(&["audit", "verify"]));
    assert_eq!(code, 0, "{out}");
    assert!(!hostile(&out), "{out:?}");
}

/// Each instance keeps one witness object in the HSM; an instance gone for
/// good is retired: only when its trail verifies whole and ends at a clean
/// stop, with a sealed `retire` record, and then the object goes.
#[test]
fn a_retired_chain_leaves_no_object_in_the_hsm_and_verifies_as_closed() {
    let mut p = Proxy::start_with(Options {
        extra_sections: audit_section("instance_id = \"retiring\""),
        ..Options::default()
    });
    encrypt_n(&p, 1);
    let witness_objects = |p: &Proxy| {
        p.pkcs11_tool(&["--list-objects", "--type", "data"])
            .matches("xks-proxy-audit-head:retiring")
            .count()
    };
    // Running: its chain is locked, and it does not end at a stop.
    let out = p.cli_raw(&["audit", "retire", "--instance", "retiring"]);
    assert!(!out.status.success());
    let status = p.terminate();
    assert!(status.success(), "{status:?}\n{}", p.log());
    assert!(witness_objects(&p) >= 1);
    let out = p.cli(&["audit", "retire", "--instance", "retiring"]);
    assert!(
        out.contains("retired (sealed at seq") && out.contains("removed"),
        "{out}"
    );
    assert_eq!(witness_objects(&p), 0, "the witness is gone");
    let (code, out) = verify_output(p.cli_raw(&["audit", "verify"]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("at its retirement"), "{out}");
    // Records forged after the retirement are tampering, like after a stop.
    let dir = p.dir.path().join("audit");
    let file = trail_files(&dir).pop().unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let last = text.lines().last().unwrap().to_string();
    let mut forged: Value = serde_json::from_str(
        text.lines()
            .find(|l| l.contains("\"type\":\"request\""))
            .unwrap(),
    )
    .unwrap();
    forged["seq"] = (json(&last)["seq"].as_u64().unwrap() + 1).into();
    let forged = relink(&serde_json::to_string(&forged).unwrap(), &last);
    std::fs::write(&file, format!("{text}{forged}\n")).unwrap();
    let (code, out) = verify_output(p.cli_raw(&["audit", "verify"]));
    assert_eq!(code, 3, "{out}");
    std::fs::write(&file, &text).unwrap();
    // The id used again later: the chain goes on, and is whole.
    p.start_again();
    let status = p.terminate();
    assert!(status.success(), "{status:?}\n{}", p.log());
    let (code, out) = verify_output(p.cli_raw(&["audit", "verify"]));
    assert_eq!(code, 0, "{out}");
    assert!(witness_objects(&p) >= 1);
}
