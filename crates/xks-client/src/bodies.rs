//! Request bodies as KMS sends them.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::json;

pub const PRINCIPAL: &str = "arn:aws:iam::123456789012:user/Alice";
pub const KEY_ARN: &str =
    "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";

pub fn health(kms_operation: &str) -> Vec<u8> {
    json!({"requestMetadata": {"kmsRequestId": "health-req-1", "kmsOperation": kms_operation}})
        .to_string()
        .into_bytes()
}

pub fn metadata() -> Vec<u8> {
    json!({"requestMetadata": {"awsPrincipalArn": PRINCIPAL, "kmsOperation": "CreateKey", "kmsRequestId": "md-req-1"}})
        .to_string()
        .into_bytes()
}

pub fn encrypt(plaintext: &[u8], aad: Option<&[u8]>, cdiv: bool) -> Vec<u8> {
    let mut v = json!({
        "requestMetadata": {"awsPrincipalArn": PRINCIPAL, "kmsKeyArn": KEY_ARN,
            "kmsOperation": "GenerateDataKey", "kmsRequestId": "enc-req-1", "kmsViaService": "ebs"},
        "plaintext": B64.encode(plaintext),
        "encryptionAlgorithm": "AES_GCM",
    });
    if let Some(aad) = aad {
        v["additionalAuthenticatedData"] = B64.encode(aad).into();
    }
    if cdiv {
        v["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256".into();
    }
    v.to_string().into_bytes()
}

/// A decrypt body from an encrypt response, with the AAD used to encrypt.
pub fn decrypt_from(encrypted: &serde_json::Value, aad: Option<&[u8]>) -> serde_json::Value {
    let mut v = json!({
        "requestMetadata": {"awsPrincipalArn": PRINCIPAL, "kmsKeyArn": KEY_ARN,
            "kmsOperation": "Decrypt", "kmsRequestId": "dec-req-1"},
        "encryptionAlgorithm": "AES_GCM",
        "ciphertext": encrypted["ciphertext"],
        "initializationVector": encrypted["initializationVector"],
        "authenticationTag": encrypted["authenticationTag"],
    });
    if !encrypted["ciphertextMetadata"].is_null() {
        v["ciphertextMetadata"] = encrypted["ciphertextMetadata"].clone();
    }
    if let Some(aad) = aad {
        v["additionalAuthenticatedData"] = B64.encode(aad).into();
    }
    v
}
