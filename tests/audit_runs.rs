//! The audit trail of a proxy of each test's own, against a real SoftHSM
//! token: a trail cut, or records forged, while the proxy is stopped, caught
//! across a restart; a killed run's unsealed records, left unproven; a
//! retired chain; request metadata from a hostile client, escaped in every
//! report; and a disk that fills up under `on_failure = "refuse"`. The tests
//! on the one trail written for them all are in `tests/audit.rs`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::audit::*;
use common::*;
use serde_json::Value;
use xks_proxy::client::bodies;

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
        p.wait_for_log("cannot write the audit trail"),
        "{}",
        p.log()
    );
}
