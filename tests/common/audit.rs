//! The audit trail's helpers for `tests/audit.rs` and `tests/audit_runs.rs`:
//! the `[audit]` section of a test proxy, the trail's files and records,
//! `audit verify`'s answer, traffic, relinking a forged record, and CloudTrail
//! log files to reconcile against.

use std::path::{Path, PathBuf};

use serde_json::Value;
use xks_proxy::audit::record::{hash_line, hex};
use xks_proxy::client::bodies;

use super::*;

/// `[audit]` for the test proxies: a seal every 4 records, so that a short
/// trail has several.
pub fn audit_section(extra: &str) -> String {
    format!("[audit]\ndir = \"audit\"\nseal_every_records = 4\nseal_every_secs = 3600\n{extra}\n")
}

pub fn trail_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    files
}

pub fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap()
}

/// (exit code, stdout and stderr) of an `audit verify`.
pub fn verify_output(out: std::process::Output) -> (i32, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `n` Encrypts of `key-ed`, each answered 200.
pub fn encrypt_n(p: &Proxy, n: usize) {
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
pub fn relink(line: &str, previous: &str) -> String {
    let cut = line.rfind("\"prev\":\"").unwrap();
    format!(
        "{}\"prev\":\"{}\"}}",
        &line[..cut],
        hex(&hash_line(previous.as_bytes()))
    )
}

/// A CloudTrail log file with KMS events for these request ids.
pub fn cloudtrail_file(dir: &Path, ids: &[(&str, &str)]) -> PathBuf {
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
