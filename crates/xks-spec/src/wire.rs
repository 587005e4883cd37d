//! Request and response bodies of the four XKS operations, and their validation.
//!
//! Requests are deserialized with borrowed strings (no copy of the Base64 text)
//! and every field optional, so that a missing field is reported by our own
//! message naming it. Unknown fields, in the body or in `requestMetadata`, are
//! ignored: KMS may add fields at any time (spec Appendix B) and a proxy that
//! rejects them would break on the day it does.

use std::borrow::Cow;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::aead::{AadLayout, MAX_AAD_LEN, MAX_METADATA_LEN, TAG_LEN};
use super::error::XksError;

/// `requestMetadata`, common to all operations.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMetadata<'a> {
    #[serde(borrow)]
    pub aws_principal_arn: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub aws_source_vpc: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub aws_source_vpce: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub kms_key_arn: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub kms_operation: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub kms_request_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub kms_via_service: Option<Cow<'a, str>>,
}

/// The length of a Base64 field, for `Debug` output that must not show it.
fn len_of(v: &Option<Cow<'_, str>>) -> Option<usize> {
    v.as_deref().map(str::len)
}

impl std::fmt::Debug for EncryptRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptRequest")
            .field("request_metadata", &self.request_metadata)
            .field("plaintext_b64_len", &len_of(&self.plaintext))
            .field("encryption_algorithm", &self.encryption_algorithm)
            .field("aad_b64_len", &len_of(&self.additional_authenticated_data))
            .field(
                "cdiv_algorithm",
                &self.ciphertext_data_integrity_value_algorithm,
            )
            .finish()
    }
}

impl std::fmt::Debug for DecryptRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptRequest")
            .field("request_metadata", &self.request_metadata)
            .field("ciphertext_b64_len", &len_of(&self.ciphertext))
            .field("ciphertext_metadata", &self.ciphertext_metadata)
            .field("encryption_algorithm", &self.encryption_algorithm)
            .field("aad_b64_len", &len_of(&self.additional_authenticated_data))
            .field("authentication_tag", &self.authentication_tag)
            .field("initialization_vector", &self.initialization_vector)
            .finish()
    }
}

/// A request body that carries `requestMetadata` (every XKS request does).
pub trait WithMetadata<'a> {
    fn request_metadata(&self) -> Option<&RequestMetadata<'a>>;
}

/// Body of GetHealthStatus and GetKeyMetadata: only `requestMetadata`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataOnlyRequest<'a> {
    #[serde(borrow)]
    pub request_metadata: Option<RequestMetadata<'a>>,
}

/// Encrypt's body. Its `Debug` shows lengths, never the plaintext or AAD.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptRequest<'a> {
    #[serde(borrow)]
    pub request_metadata: Option<RequestMetadata<'a>>,
    #[serde(borrow)]
    pub plaintext: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub encryption_algorithm: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub additional_authenticated_data: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub ciphertext_data_integrity_value_algorithm: Option<Cow<'a, str>>,
}

/// Decrypt's body. Its `Debug` shows lengths, never the AAD.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptRequest<'a> {
    #[serde(borrow)]
    pub request_metadata: Option<RequestMetadata<'a>>,
    #[serde(borrow)]
    pub ciphertext: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub ciphertext_metadata: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub encryption_algorithm: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub additional_authenticated_data: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub authentication_tag: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub initialization_vector: Option<Cow<'a, str>>,
}

impl<'a> WithMetadata<'a> for MetadataOnlyRequest<'a> {
    fn request_metadata(&self) -> Option<&RequestMetadata<'a>> {
        self.request_metadata.as_ref()
    }
}

impl<'a> WithMetadata<'a> for EncryptRequest<'a> {
    fn request_metadata(&self) -> Option<&RequestMetadata<'a>> {
        self.request_metadata.as_ref()
    }
}

impl<'a> WithMetadata<'a> for DecryptRequest<'a> {
    fn request_metadata(&self) -> Option<&RequestMetadata<'a>> {
        self.request_metadata.as_ref()
    }
}

/// Parses a JSON body. The error message never quotes the body: a type error
/// on `plaintext` would otherwise echo key material into logs.
pub fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, XksError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = match e.classify() {
            serde_json::error::Category::Data => {
                let text = e.to_string();
                if text.starts_with("missing field") {
                    format!(
                        "request body: {}",
                        text.split(" at line").next().unwrap_or(&text)
                    )
                } else {
                    format!(
                        "request body: a field has the wrong JSON type (line {}, column {})",
                        e.line(),
                        e.column()
                    )
                }
            }
            _ => format!(
                "request body is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ),
        };
        XksError::Validation(msg)
    })
}

/// Checks that `requestMetadata` is there and has each named field.
fn metadata_with<'m, 'a>(
    md: Option<&'m RequestMetadata<'a>>,
    fields: impl Fn(&RequestMetadata<'a>) -> Vec<(&'static str, bool)>,
) -> Result<&'m RequestMetadata<'a>, XksError> {
    let md = md.ok_or_else(|| XksError::Validation("requestMetadata is required".into()))?;
    match fields(md).into_iter().find(|(_, present)| !present) {
        Some((name, _)) => Err(XksError::Validation(format!(
            "requestMetadata.{name} is required"
        ))),
        None => Ok(md),
    }
}

/// Which `requestMetadata` fields a key operation requires.
pub fn require_metadata<'m, 'a>(
    md: Option<&'m RequestMetadata<'a>>,
    need_key_arn: bool,
) -> Result<&'m RequestMetadata<'a>, XksError> {
    metadata_with(md, |md| {
        vec![
            ("awsPrincipalArn", md.aws_principal_arn.is_some()),
            ("kmsOperation", md.kms_operation.is_some()),
            ("kmsRequestId", md.kms_request_id.is_some()),
            ("kmsKeyArn", !need_key_arn || md.kms_key_arn.is_some()),
        ]
    })
}

/// The `requestMetadata` fields GetHealthStatus requires.
pub fn require_health_metadata(md: Option<&RequestMetadata<'_>>) -> Result<(), XksError> {
    metadata_with(md, |md| {
        vec![
            ("kmsRequestId", md.kms_request_id.is_some()),
            ("kmsOperation", md.kms_operation.is_some()),
        ]
    })
    .map(|_| ())
}

fn required<'s>(v: &'s Option<Cow<'_, str>>, name: &str) -> Result<&'s str, XksError> {
    v.as_deref()
        .ok_or_else(|| XksError::Validation(format!("{name} is required")))
}

fn decode(v: &str, name: &str) -> Result<Vec<u8>, XksError> {
    B64.decode(v)
        .map_err(|_| XksError::Validation(format!("{name} is not valid Base64")))
}

fn check_algorithm(v: &Option<Cow<'_, str>>) -> Result<(), XksError> {
    match required(v, "encryptionAlgorithm")? {
        "AES_GCM" => Ok(()),
        _ => Err(XksError::Validation(
            "encryptionAlgorithm must be AES_GCM".into(),
        )),
    }
}

fn decode_aad(v: &Option<Cow<'_, str>>) -> Result<Vec<u8>, XksError> {
    let aad = match v.as_deref() {
        Some(s) => decode(s, "additionalAuthenticatedData")?,
        None => Vec::new(),
    };
    if aad.len() > MAX_AAD_LEN {
        return Err(XksError::UnsupportedOperation(format!(
            "additionalAuthenticatedData of {} bytes exceeds this proxy's maximum of {MAX_AAD_LEN}",
            aad.len()
        )));
    }
    Ok(aad)
}

/// Input of one Encrypt, decoded and validated: what the key manager gets.
/// The ciphertext metadata is chosen by the key manager layer: it records
/// the key version used.
pub struct EncryptInput {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub aad: Vec<u8>,
    pub cdiv: bool,
}

/// Output of one Encrypt.
#[derive(Debug)]
pub struct EncryptOutput {
    pub ciphertext: Vec<u8>,
    pub iv: Vec<u8>,
    pub tag: Vec<u8>,
    pub metadata: Vec<u8>,
    pub cdiv: Option<[u8; 32]>,
}

impl<'a> EncryptRequest<'a> {
    /// Every check that needs no HSM, once: the metadata fields Encrypt
    /// requires, then the algorithm and the fields. Returns the checked
    /// metadata (for authorization and the log) and the key manager's input.
    pub fn validate(&self) -> Result<(&RequestMetadata<'a>, EncryptInput), XksError> {
        let md = require_metadata(self.request_metadata.as_ref(), true)?;
        check_algorithm(&self.encryption_algorithm)?;
        let plaintext = Zeroizing::new(decode(
            required(&self.plaintext, "plaintext")?,
            "plaintext",
        )?);
        let aad = decode_aad(&self.additional_authenticated_data)?;
        let cdiv = match self.ciphertext_data_integrity_value_algorithm.as_deref() {
            None => false,
            Some("SHA_256") => true,
            Some(_) => {
                return Err(XksError::Validation(
                    "ciphertextDataIntegrityValueAlgorithm must be SHA_256".into(),
                ))
            }
        };
        Ok((
            md,
            EncryptInput {
                plaintext,
                aad,
                cdiv,
            },
        ))
    }
}

/// Input of one Decrypt, decoded and validated: what the key manager gets.
pub struct DecryptInput {
    pub ciphertext: Vec<u8>,
    pub iv: Vec<u8>,
    pub tag: Vec<u8>,
    /// The request's AAD; `None` when it had no AAD field (the AWS sample's
    /// construction tells an absent field from an empty one).
    pub aad: Option<Vec<u8>>,
    pub metadata: Vec<u8>,
    /// The AAD constructions to try, in order (see `aead::decrypt_layouts`;
    /// the spec's alone unless the key store takes the AWS sample's).
    pub layouts: &'static [AadLayout],
}

/// Output of one Decrypt: the plaintext, and the construction that
/// authenticated (the AWS sample's counts toward the compat metric).
pub struct DecryptOutput {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub layout: AadLayout,
}

impl<'a> DecryptRequest<'a> {
    /// All checks that need no HSM, once, so malformed input never costs a
    /// session. Returns the checked metadata and the key manager's input.
    pub fn validate(&self) -> Result<(&RequestMetadata<'a>, DecryptInput), XksError> {
        let md = require_metadata(self.request_metadata.as_ref(), true)?;
        check_algorithm(&self.encryption_algorithm)?;
        let ciphertext = decode(required(&self.ciphertext, "ciphertext")?, "ciphertext")?;
        let iv = decode(
            required(&self.initialization_vector, "initializationVector")?,
            "initializationVector",
        )?;
        if iv.len() != 12 && iv.len() != 16 {
            return Err(XksError::Validation(format!(
                "initializationVector must be 12 or 16 bytes, not {}",
                iv.len()
            )));
        }
        let tag = decode(
            required(&self.authentication_tag, "authenticationTag")?,
            "authenticationTag",
        )?;
        if tag.len() != TAG_LEN {
            return Err(XksError::Validation(format!(
                "authenticationTag must be 16 bytes, not {}",
                tag.len()
            )));
        }
        let metadata = match self.ciphertext_metadata.as_deref() {
            Some(s) => decode(s, "ciphertextMetadata")?,
            None => Vec::new(),
        };
        if metadata.len() > MAX_METADATA_LEN {
            return Err(XksError::Validation(format!(
                "ciphertextMetadata must be at most 20 bytes, not {}",
                metadata.len()
            )));
        }
        let aad = decode_aad(&self.additional_authenticated_data)?;
        Ok((
            md,
            DecryptInput {
                ciphertext,
                iv,
                tag,
                aad: self.additional_authenticated_data.is_some().then_some(aad),
                metadata,
                layouts: &[AadLayout::Spec],
            },
        ))
    }
}

/// GetKeyMetadata response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyMetadataResponse {
    /// `AES_256` for every key that can back a KMS key; any other spec makes
    /// KMS's CreateKey fail with a message that names the problem.
    pub key_spec: String,
    pub key_usage: Vec<&'static str>,
    pub key_status: &'static str,
}

/// Encrypt response; all binary fields Base64.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptResponse {
    pub ciphertext: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext_metadata: Option<String>,
    pub initialization_vector: String,
    pub authentication_tag: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext_data_integrity_value: Option<String>,
}

impl From<EncryptOutput> for EncryptResponse {
    fn from(o: EncryptOutput) -> Self {
        EncryptResponse {
            ciphertext: B64.encode(&o.ciphertext),
            ciphertext_metadata: (!o.metadata.is_empty()).then(|| B64.encode(&o.metadata)),
            initialization_vector: B64.encode(&o.iv),
            authentication_tag: B64.encode(&o.tag),
            ciphertext_data_integrity_value: o.cdiv.map(|c| B64.encode(c)),
        }
    }
}

/// Decrypt response `{"plaintext": "..."}`, built in a buffer that is wiped
/// when the response body is dropped.
pub fn decrypt_response(plaintext: &[u8]) -> Zeroizing<Vec<u8>> {
    let encoded = Zeroizing::new(B64.encode(plaintext));
    let mut out = Zeroizing::new(Vec::with_capacity(encoded.len() + 16));
    out.extend_from_slice(b"{\"plaintext\":\"");
    out.extend_from_slice(encoded.as_bytes());
    out.extend_from_slice(b"\"}");
    out
}

/// The spec's `healthStatus` of one key manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EkmStatus {
    Active,
    Degraded,
    Unavailable,
}

impl EkmStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EkmStatus::Active => "ACTIVE",
            EkmStatus::Degraded => "DEGRADED",
            EkmStatus::Unavailable => "UNAVAILABLE",
        }
    }

    /// Preference order for routing and for the proxy's overall status:
    /// ACTIVE, then DEGRADED, then UNAVAILABLE.
    pub fn rank(self) -> u8 {
        match self {
            EkmStatus::Active => 2,
            EkmStatus::Degraded => 1,
            EkmStatus::Unavailable => 0,
        }
    }

    /// What a proxy with key managers in these states can do: as well as its
    /// best one (UNAVAILABLE with none).
    pub fn best(statuses: impl IntoIterator<Item = EkmStatus>) -> EkmStatus {
        statuses
            .into_iter()
            .max_by_key(|s| s.rank())
            .unwrap_or(EkmStatus::Unavailable)
    }
}

/// One `ekmFleetDetails` entry.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EkmDetail {
    pub id: String,
    pub model: String,
    pub health_status: EkmStatus,
}

/// GetHealthStatus response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthResponse {
    pub xks_proxy_fleet_size: u32,
    pub xks_proxy_vendor: String,
    pub xks_proxy_model: String,
    pub ekm_vendor: String,
    pub ekm_fleet_details: Vec<EkmDetail>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decrypt_body(extra: &str) -> String {
        format!(
            r#"{{"requestMetadata":{{"awsPrincipalArn":"a","kmsKeyArn":"k","kmsOperation":"Decrypt","kmsRequestId":"r"}},
               "encryptionAlgorithm":"AES_GCM","ciphertext":"AAAA","initializationVector":"AAAAAAAAAAAAAAAA",
               "authenticationTag":"AAAAAAAAAAAAAAAAAAAAAA=="{extra}}}"#
        )
    }

    #[test]
    fn valid_decrypt_passes() {
        let body = decrypt_body("");
        let r: DecryptRequest = parse_json(body.as_bytes()).unwrap();
        let (_, v) = r.validate().unwrap();
        assert_eq!(v.iv.len(), 12);
        assert_eq!(v.tag.len(), 16);
        assert!(v.metadata.is_empty());
    }

    #[test]
    fn unknown_fields_and_operations_are_accepted() {
        let body = r#"{"requestMetadata":{"awsPrincipalArn":"a","kmsKeyArn":"k","kmsOperation":"BulkEncrypt",
            "kmsRequestId":"not-a-uuid","someFutureField":{"x":[1,2]}},"plaintext":"","encryptionAlgorithm":"AES_GCM","newTopLevel":true}"#;
        let r: EncryptRequest = parse_json(body.as_bytes()).unwrap();
        let (md, v) = r.validate().unwrap();
        assert!(v.plaintext.is_empty());
        assert_eq!(md.kms_operation.as_deref(), Some("BulkEncrypt"));
    }

    #[test]
    fn bad_inputs_are_validation_errors() {
        let cases = [
            decrypt_body(r#","ciphertextMetadata":"AAAAAAAAAAAAAAAAAAAAAAAAAAAA""#),
            decrypt_body("").replace("AES_GCM", "AES_CBC"),
            decrypt_body("").replace("\"AAAAAAAAAAAAAAAA\"", "\"AAAAAAAA\""),
            decrypt_body("").replace("AAAAAAAAAAAAAAAAAAAAAA==", "AAAAAAAAAAAAAAAAAAAA"),
            decrypt_body("").replace("\"AAAA\"", "\"!!!\""),
            decrypt_body("").replace("\"kmsKeyArn\":\"k\",", ""),
        ];
        for body in cases {
            let r: DecryptRequest = parse_json(body.as_bytes()).unwrap();
            let e = r
                .validate()
                .err()
                .unwrap_or_else(|| panic!("accepted {body}"));
            assert_eq!(e.error_name(), "ValidationException", "{body}");
        }
    }

    #[test]
    fn json_errors_never_quote_the_body() {
        let body = br#"{"requestMetadata":{"awsPrincipalArn":"a","kmsKeyArn":"k","kmsOperation":"E","kmsRequestId":"r"},
            "plaintext":12345678,"encryptionAlgorithm":"AES_GCM"}"#;
        let e = parse_json::<EncryptRequest>(body).err().unwrap();
        assert!(!e.message().contains("12345678"), "{}", e.message());
        let e = parse_json::<EncryptRequest>(b"{not json").err().unwrap();
        assert_eq!(e.error_name(), "ValidationException");
    }
}
