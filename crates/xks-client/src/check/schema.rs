//! The spec's schemas for the answers `check` reads.
//!
//! KMS validates every answer strictly and calls anything else
//! `XKS_PROXY_INVALID_RESPONSE`, so these checks are as strict as KMS, not as
//! lenient as a client that only needs to get by: a proxy that passes a lax
//! check could still fail in KMS.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;

/// How an answer breaks the spec's schema. The message names the field and
/// the rule, because that is what has to change in the proxy.
#[derive(Debug, thiserror::Error)]
pub(super) enum Violation {
    #[error("the body is not a JSON object")]
    NotAnObject,
    #[error("'xksProxyFleetSize' is missing or not a positive integer")]
    FleetSize,
    #[error("'{0}' is missing or not a string")]
    NotAString(&'static str),
    #[error("'{0}' is missing or not an array")]
    NotAnArray(&'static str),
    #[error("'{0}' is not valid base64")]
    NotBase64(&'static str),
    #[error("'ekmFleetDetails' has {0} entries; the spec allows 1 to 10")]
    FleetDetails(usize),
    #[error("healthStatus {0:?} is not ACTIVE, DEGRADED or UNAVAILABLE")]
    HealthStatus(Option<String>),
    #[error("'keyUsage' has more than 10 entries")]
    TooManyUsages,
    #[error("keyUsage entry {0:?} is not one the spec defines")]
    KeyUsage(Option<String>),
    #[error("keyStatus '{0}' is not ENABLED or DISABLED")]
    KeyStatus(String),
    #[error(
        "ciphertext is {ciphertext} bytes for {plaintext} bytes of plaintext (AES-GCM keeps the length)"
    )]
    CiphertextLength { ciphertext: usize, plaintext: usize },
    #[error("initializationVector is {0} bytes; 12 or 16 expected")]
    IvLength(usize),
    #[error("authenticationTag is {0} bytes; 16 expected")]
    TagLength(usize),
    #[error("ciphertextMetadata is {0} bytes; at most 20 allowed")]
    MetadataLength(usize),
    #[error("encryptionAlgorithm '{0}' is not AES_GCM")]
    Algorithm(String),
    #[error("ciphertextDataIntegrityValue does not match SHA-256(AAD || metadata || IV || ciphertext || tag)")]
    Cdiv,
}

/// What a valid GetHealthStatus answer says about the fleet.
pub(super) struct HealthSummary {
    /// `xksProxyFleetSize`.
    pub(super) fleet_size: u64,
    /// Key managers listed in `ekmFleetDetails`.
    pub(super) total: usize,
    /// Those `ACTIVE` or `DEGRADED`: KMS connects if there is at least one.
    pub(super) usable: usize,
}

fn req_str<'a>(v: &'a Value, field: &'static str) -> Result<&'a str, Violation> {
    v[field].as_str().ok_or(Violation::NotAString(field))
}

/// Checks a GetHealthStatus answer against the spec's schema.
pub(super) fn validate_health(v: &Value) -> Result<HealthSummary, Violation> {
    if !v.is_object() {
        return Err(Violation::NotAnObject);
    }
    let fleet_size = v["xksProxyFleetSize"]
        .as_u64()
        .filter(|n| *n >= 1)
        .ok_or(Violation::FleetSize)?;
    for f in ["xksProxyVendor", "xksProxyModel", "ekmVendor"] {
        req_str(v, f)?;
    }
    let details = v["ekmFleetDetails"]
        .as_array()
        .ok_or(Violation::NotAnArray("ekmFleetDetails"))?;
    if details.is_empty() || details.len() > 10 {
        return Err(Violation::FleetDetails(details.len()));
    }
    let mut usable = 0;
    for d in details {
        req_str(d, "id")?;
        req_str(d, "model")?;
        match d["healthStatus"].as_str() {
            Some("ACTIVE" | "DEGRADED") => usable += 1,
            Some("UNAVAILABLE") => {}
            other => return Err(Violation::HealthStatus(other.map(str::to_owned))),
        }
    }
    Ok(HealthSummary {
        fleet_size,
        total: details.len(),
        usable,
    })
}

const KEY_USAGES: &[&str] = &[
    "ENCRYPT", "DECRYPT", "SIGN", "VERIFY", "WRAP", "UNWRAP", "DERIVE",
];

/// Checks a GetKeyMetadata answer; returns (keySpec, keyUsage, keyStatus).
pub(super) fn validate_metadata(v: &Value) -> Result<(String, Vec<String>, String), Violation> {
    let spec = req_str(v, "keySpec")?.to_string();
    let usages = v["keyUsage"]
        .as_array()
        .ok_or(Violation::NotAnArray("keyUsage"))?;
    if usages.len() > 10 {
        return Err(Violation::TooManyUsages);
    }
    let usages: Vec<String> = usages
        .iter()
        .map(|u| match u.as_str() {
            Some(s) if KEY_USAGES.contains(&s) => Ok(s.to_string()),
            other => Err(Violation::KeyUsage(other.map(str::to_owned))),
        })
        .collect::<Result<_, _>>()?;
    let status = req_str(v, "keyStatus")?.to_string();
    if status != "ENABLED" && status != "DISABLED" {
        return Err(Violation::KeyStatus(status));
    }
    Ok((spec, usages, status))
}

/// A valid Encrypt answer, decoded: what the Decrypt step sends back.
pub(super) struct Encrypted {
    pub(super) ciphertext: Vec<u8>,
    pub(super) iv: Vec<u8>,
    pub(super) tag: Vec<u8>,
    /// `ciphertextMetadata`, if the proxy sent any.
    pub(super) metadata: Option<Vec<u8>>,
}

fn b64_field(v: &Value, field: &'static str) -> Result<Vec<u8>, Violation> {
    B64.decode(req_str(v, field)?)
        .map_err(|_| Violation::NotBase64(field))
}

/// Checks an Encrypt answer, including the CDIV, recomputed here.
pub(super) fn validate_encrypt(
    v: &Value,
    aad: &[u8],
    plaintext_len: usize,
) -> Result<Encrypted, Violation> {
    let ciphertext = b64_field(v, "ciphertext")?;
    if ciphertext.len() != plaintext_len {
        return Err(Violation::CiphertextLength {
            ciphertext: ciphertext.len(),
            plaintext: plaintext_len,
        });
    }
    let iv = b64_field(v, "initializationVector")?;
    if iv.len() != 12 && iv.len() != 16 {
        return Err(Violation::IvLength(iv.len()));
    }
    let tag = b64_field(v, "authenticationTag")?;
    if tag.len() != 16 {
        return Err(Violation::TagLength(tag.len()));
    }
    let metadata = match &v["ciphertextMetadata"] {
        Value::Null => None,
        _ => {
            let m = b64_field(v, "ciphertextMetadata")?;
            if m.len() > 20 {
                return Err(Violation::MetadataLength(m.len()));
            }
            Some(m)
        }
    };
    match v["encryptionAlgorithm"].as_str() {
        None | Some("AES_GCM") => {}
        Some(other) => return Err(Violation::Algorithm(other.to_owned())),
    }
    let expected = xks_spec::aead::cdiv_sha256(
        aad,
        metadata.as_deref().unwrap_or(&[]),
        &iv,
        &ciphertext,
        &tag,
    );
    let got = b64_field(v, "ciphertextDataIntegrityValue")?;
    if got.as_slice() != expected.as_slice() {
        return Err(Violation::Cdiv);
    }
    Ok(Encrypted {
        ciphertext,
        iv,
        tag,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn health_schema() {
        let good = json!({"xksProxyFleetSize": 2, "xksProxyVendor": "v", "xksProxyModel": "m",
            "ekmVendor": "e", "ekmFleetDetails": [{"id": "a", "model": "m", "healthStatus": "ACTIVE"},
            {"id": "b", "model": "m", "healthStatus": "UNAVAILABLE"}]});
        let s = validate_health(&good).unwrap();
        assert_eq!((s.fleet_size, s.total, s.usable), (2, 2, 1));
        let mut bad = good.clone();
        bad["xksProxyFleetSize"] = 0.into();
        assert!(validate_health(&bad).is_err());
        let mut bad = good.clone();
        bad["ekmFleetDetails"][0]["healthStatus"] = "OK".into();
        assert!(validate_health(&bad).is_err());
        let mut bad = good;
        bad["ekmFleetDetails"] = json!([]);
        assert!(validate_health(&bad).is_err());
    }

    #[test]
    fn encrypt_schema_and_cdiv() {
        let aad = b"aad";
        let (iv, ct, tag) = (vec![1u8; 12], vec![2u8; 32], vec![3u8; 16]);
        let cdiv = xks_spec::aead::cdiv_sha256(aad, &[1], &iv, &ct, &tag);
        let good = json!({"ciphertext": B64.encode(&ct), "initializationVector": B64.encode(&iv),
            "authenticationTag": B64.encode(&tag), "ciphertextMetadata": B64.encode([1u8]),
            "encryptionAlgorithm": "AES_GCM", "ciphertextDataIntegrityValue": B64.encode(cdiv)});
        assert!(validate_encrypt(&good, aad, 32).is_ok());
        assert!(validate_encrypt(&good, b"other", 32).is_err());
        assert!(validate_encrypt(&good, aad, 31).is_err());
        let mut bad = good.clone();
        bad["authenticationTag"] = B64.encode([0u8; 12]).into();
        assert!(validate_encrypt(&bad, aad, 32).is_err());
        let mut bad = good;
        bad["ciphertextMetadata"] = B64.encode([0u8; 21]).into();
        assert!(validate_encrypt(&bad, aad, 32).is_err());
    }

    /// The messages end up in the report's `detail` and `explanation`, which
    /// operators and scripts read: the typed errors must read as the old
    /// strings did.
    #[test]
    fn violations_name_the_field() {
        let v = json!({"ekmFleetDetails": [{"id": "a", "model": "m", "healthStatus": "OK"}],
            "xksProxyFleetSize": 1, "xksProxyVendor": "v", "xksProxyModel": "m", "ekmVendor": "e"});
        let e = validate_health(&v).err().unwrap();
        assert_eq!(
            e.to_string(),
            r#"healthStatus Some("OK") is not ACTIVE, DEGRADED or UNAVAILABLE"#
        );
        let v = json!({"keyUsage": [], "keyStatus": "ENABLED"});
        let e = validate_metadata(&v).err().unwrap();
        assert_eq!(e.to_string(), "'keySpec' is missing or not a string");
        let e = validate_encrypt(&json!({"ciphertext": "AAAA"}), b"", 4)
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "ciphertext is 3 bytes for 4 bytes of plaintext (AES-GCM keeps the length)"
        );
    }

    #[test]
    fn metadata_schema() {
        let v = json!({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"});
        assert!(validate_metadata(&v).is_ok());
        let v = json!({"keySpec": "AES_256", "keyUsage": ["FLY"], "keyStatus": "ENABLED"});
        assert!(validate_metadata(&v).is_err());
        let v = json!({"keySpec": "AES_256", "keyUsage": [], "keyStatus": "ON"});
        assert!(validate_metadata(&v).is_err());
    }
}
