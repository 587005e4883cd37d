//! The key checks: what CreateKey, and then a first GenerateDataKey and
//! Decrypt, would find about one key.
//!
//! A key problem (not found, wrong spec or usage, disabled) does not stop KMS
//! from connecting; it is reported against the key. Hence the nested results
//! here: the outer error is a connection verdict, the inner one a key verdict.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::report::{failure, mark_last, step_failed, Failure, Report, Verdict};
use super::schema::{validate_encrypt, validate_metadata, Encrypted};
use super::wire::{call, key_problem, request_id, KeyErrors, KeyProblem, Wire};

/// The principal the check's requests name, so they stand out in the proxy's
/// access log and policy decisions.
const PRINCIPAL: &str = "arn:aws:iam::111122223333:role/xks-proxy-check";
/// The KMS key the Encrypt and Decrypt requests name.
const KEY_ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000";

/// Key-level result: `Ok(Ok(()))` usable, `Ok(Err((code, why)))` a key problem,
/// `Err` a connection-level failure. The steps run in KMS's order and the
/// first key problem ends them, as it would end CreateKey.
pub(super) async fn check_key(
    wire: &mut Wire,
    key_id: &str,
    report: &mut Report,
) -> Result<Result<(), KeyProblem>, Failure> {
    let key_path = format!("/keys/{key_id}");
    if let Err(problem) = metadata(wire, &key_path, report).await? {
        return Ok(Err(problem));
    }
    let sample = Sample::random()?;
    let enc = match encrypt(wire, &key_path, &sample, report).await? {
        Ok(enc) => enc,
        Err(problem) => return Ok(Err(problem)),
    };
    decrypt(wire, &key_path, &sample, &enc, report).await
}

/// GetKeyMetadata as CreateKey sends it, then KMS's requirements on the key.
async fn metadata(
    wire: &mut Wire,
    key_path: &str,
    report: &mut Report,
) -> Result<Result<(), KeyProblem>, Failure> {
    let body = json!({"requestMetadata": {
        "awsPrincipalArn": PRINCIPAL,
        "kmsOperation": "CreateKey", "kmsRequestId": request_id()}});
    let answer = match key_step(wire, key_path, "metadata", &body, report).await? {
        Ok(v) => v,
        Err(problem) => return Ok(Err(problem)),
    };
    let (spec, usages, status) = validate_metadata(&answer).map_err(|why| {
        step_failed(
            report,
            Verdict::XksProxyInvalidResponse,
            format!("GetKeyMetadata: {why}"),
        )
    })?;
    mark_last(
        report,
        true,
        format!("{spec} {} {status}", usages.join(",")),
    );
    Ok(usable(&spec, &usages, &status))
}

/// Whether KMS can use a key with this metadata: an AES_256 key, enabled,
/// that may both encrypt and decrypt. A valid answer can still describe a
/// key KMS refuses, and KMS then names the key, not the connection.
fn usable(spec: &str, usages: &[String], status: &str) -> Result<(), KeyProblem> {
    if spec != "AES_256" {
        return Err((
            "XKS_KEY_INVALID_CONFIGURATION",
            format!("keySpec is {spec}; KMS needs AES_256"),
        ));
    }
    if !(usages.iter().any(|u| u == "ENCRYPT") && usages.iter().any(|u| u == "DECRYPT")) {
        return Err((
            "XKS_KEY_INVALID_CONFIGURATION",
            format!(
                "keyUsage is [{}]; KMS needs ENCRYPT and DECRYPT",
                usages.join(",")
            ),
        ));
    }
    if status != "ENABLED" {
        return Err((
            "XKS_KEY_DISABLED",
            "the key is DISABLED in the key manager; KMS cannot use it".into(),
        ));
    }
    Ok(())
}

/// The plaintext and AAD of the round trip. Random, so that only a proxy
/// that really encrypts and decrypts can give the plaintext back.
struct Sample {
    plaintext: Zeroizing<[u8; 32]>,
    aad: [u8; 24],
}

impl Sample {
    fn random() -> Result<Sample, Failure> {
        let mut plaintext = Zeroizing::new([0u8; 32]);
        let mut aad = [0u8; 24];
        let rng = ring::rand::SystemRandom::new();
        ring::rand::SecureRandom::fill(&rng, plaintext.as_mut())
            .and_then(|_| ring::rand::SecureRandom::fill(&rng, &mut aad))
            .map_err(|_| failure(Verdict::XksProxyInvalidResponse, "system RNG failed"))?;
        Ok(Sample { plaintext, aad })
    }
}

/// Encrypt as GenerateDataKey sends it, with AAD and a CDIV asked for; the
/// answer is checked down to the CDIV, recomputed here, because KMS checks it
/// too.
async fn encrypt(
    wire: &mut Wire,
    key_path: &str,
    sample: &Sample,
    report: &mut Report,
) -> Result<Result<Encrypted, KeyProblem>, Failure> {
    let body = json!({
        "requestMetadata": {"awsPrincipalArn": PRINCIPAL,
            "kmsKeyArn": KEY_ARN, "kmsOperation": "GenerateDataKey", "kmsRequestId": request_id()},
        "plaintext": B64.encode(*sample.plaintext),
        "encryptionAlgorithm": "AES_GCM",
        "additionalAuthenticatedData": B64.encode(sample.aad),
        "ciphertextDataIntegrityValueAlgorithm": "SHA_256",
    });
    let answer = match key_step(wire, key_path, "encrypt", &body, report).await? {
        Ok(v) => v,
        Err(problem) => return Ok(Err(problem)),
    };
    let enc = validate_encrypt(&answer, &sample.aad, sample.plaintext.len()).map_err(|why| {
        step_failed(
            report,
            Verdict::XksProxyInvalidResponse,
            format!("Encrypt: {why}"),
        )
    })?;
    mark_last(report, true, "ciphertext well-formed, CDIV verified".into());
    Ok(Ok(enc))
}

/// Decrypt of what Encrypt returned, as KMS's Decrypt sends it, and the
/// plaintext compared: a proxy whose round trip loses data would lose every
/// data key KMS wraps with it.
async fn decrypt(
    wire: &mut Wire,
    key_path: &str,
    sample: &Sample,
    enc: &Encrypted,
    report: &mut Report,
) -> Result<Result<(), KeyProblem>, Failure> {
    let mut body = json!({
        "requestMetadata": {"awsPrincipalArn": PRINCIPAL,
            "kmsKeyArn": KEY_ARN, "kmsOperation": "Decrypt", "kmsRequestId": request_id()},
        "ciphertext": B64.encode(&enc.ciphertext),
        "encryptionAlgorithm": "AES_GCM",
        "initializationVector": B64.encode(&enc.iv),
        "authenticationTag": B64.encode(&enc.tag),
        "additionalAuthenticatedData": B64.encode(sample.aad),
    });
    if let Some(md) = &enc.metadata {
        body["ciphertextMetadata"] = B64.encode(md).into();
    }
    let answer = match key_step(wire, key_path, "decrypt", &body, report).await? {
        Ok(v) => v,
        Err(problem) => return Ok(Err(problem)),
    };
    let got = answer["plaintext"]
        .as_str()
        .and_then(|p| B64.decode(p).ok())
        .map(Zeroizing::new);
    match got {
        Some(p) if p.as_slice() == sample.plaintext.as_slice() => {
            mark_last(report, true, "plaintext matches".into());
            Ok(Ok(()))
        }
        Some(_) => Err(step_failed(
            report,
            Verdict::XksProxyInvalidResponse,
            "Decrypt returned a different plaintext than was encrypted".into(),
        )),
        None => Err(step_failed(
            report,
            Verdict::XksProxyInvalidResponse,
            "Decrypt: plaintext missing or not base64".into(),
        )),
    }
}

/// One key operation (`metadata`, `encrypt`, `decrypt`): its JSON answer, or
/// the key problem KMS would report.
async fn key_step(
    wire: &mut Wire,
    key_path: &str,
    op: &'static str,
    body: &Value,
    report: &mut Report,
) -> Result<Result<Value, KeyProblem>, Failure> {
    let path = format!("{key_path}/{op}");
    let r = call(wire, &path, body, report, op, KeyErrors::Return).await?;
    Ok(match key_problem(&r) {
        Some(problem) => Err(problem),
        None => Ok(r.json()),
    })
}
