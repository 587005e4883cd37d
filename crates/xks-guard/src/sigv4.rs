//! SigV4 verification of XKS API requests (spec Appendix A).
//!
//! KMS signs every request with the key store's access key id and secret,
//! service `kms-xks-proxy`, and at least `host;x-amz-date` as signed headers.
//! We verify by *re-signing*: parse the `Authorization` header, look the secret up
//! by access key id, feed exactly the signed headers, the path as received and the
//! exact body bytes to the AWS SDK's own signer (`aws-sigv4`) at the request's own
//! timestamp, and compare the two signatures in constant time. Using the SDK's
//! canonicalization rather than our own means we cannot disagree with KMS about
//! how a request is canonicalized; the curl-signed integration test guards the
//! other direction (an independent signer).
//!
//! Every failure is a 401 `AuthenticationFailedException` whose message says
//! *which* check failed (so an operator can tell clock skew from a wrong secret)
//! but never the expected signature or anything derived from the secret.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4::SigningParams;
use aws_smithy_runtime_api::client::identity::Identity;
use http::HeaderMap;
use subtle::ConstantTimeEq;

use xks_spec::error::XksError;

/// The SigV4 service name of the XKS API.
pub const SERVICE: &str = "kms-xks-proxy";
/// How far a request's timestamp may be from our clock, either way.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// A SigV4 credential: access key id and secret.
#[derive(Clone)]
pub struct Credential {
    pub access_key_id: String,
    pub secret: Zeroizing<String>,
    /// Where the secret was read from, when it is a file.
    pub secret_file: Option<PathBuf>,
    /// When the credential was made, if the config says.
    pub created: Option<SystemTime>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("access_key_id", &self.access_key_id)
            .field("secret", &"<redacted>")
            .field("secret_file", &self.secret_file)
            .finish()
    }
}

/// The credentials of one key store, by access key id.
///
/// Several credentials can be active at once so that an operator can rotate:
/// add the new one, switch KMS over with UpdateCustomKeyStore, then remove the
/// old one. The SDK's [`Identity`] is built once here and shared, so verifying a
/// request does not copy the secret.
pub struct CredentialSet {
    by_id: HashMap<String, Identity>,
}

impl std::fmt::Debug for CredentialSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialSet")
            .field("access_key_ids", &self.by_id.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl CredentialSet {
    pub fn new(credentials: &[Credential]) -> Self {
        let by_id = credentials
            .iter()
            .map(|c| {
                let creds = Credentials::new(
                    c.access_key_id.clone(),
                    c.secret.as_str().to_owned(),
                    None,
                    None,
                    "xks-proxy-config",
                );
                (c.access_key_id.clone(), Identity::from(creds))
            })
            .collect();
        CredentialSet { by_id }
    }
}

/// The parts of an `Authorization: AWS4-HMAC-SHA256 ...` header.
#[derive(Debug, PartialEq, Eq)]
pub struct AuthorizationHeader<'a> {
    pub access_key_id: &'a str,
    pub date: &'a str,
    pub region: &'a str,
    pub service: &'a str,
    pub signed_headers: Vec<&'a str>,
    pub signature: &'a str,
}

fn fail(msg: impl Into<String>) -> XksError {
    XksError::AuthenticationFailed(msg.into())
}

/// Parses the `Authorization` header value. Strict about structure, because a
/// lenient parser is where signature bypasses live.
pub fn parse_authorization(value: &str) -> Result<AuthorizationHeader<'_>, XksError> {
    let rest = value
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(|| fail("Authorization header must start with 'AWS4-HMAC-SHA256 '"))?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| fail("Authorization header has a component without '='"))?;
        let slot = match k {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => return Err(fail("Authorization header has an unknown component")),
        };
        if slot.replace(v).is_some() {
            return Err(fail("Authorization header repeats a component"));
        }
    }
    let credential = credential.ok_or_else(|| fail("Authorization header lacks Credential"))?;
    let signed = signed.ok_or_else(|| fail("Authorization header lacks SignedHeaders"))?;
    let signature = signature.ok_or_else(|| fail("Authorization header lacks Signature"))?;

    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = scope[..] else {
        return Err(fail(
            "Credential must be <access key id>/<yyyymmdd>/<region>/kms-xks-proxy/aws4_request",
        ));
    };
    if terminator != "aws4_request" {
        return Err(fail("Credential scope must end with aws4_request"));
    }
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(fail("Credential date must be yyyymmdd"));
    }
    if region.is_empty()
        || !region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(fail("Credential region is malformed"));
    }
    if signature.len() != 64
        || !signature
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(fail("Signature must be 64 lowercase hex digits"));
    }
    let signed_headers: Vec<&str> = signed.split(';').collect();
    if signed_headers.iter().any(|h| {
        h.is_empty()
            || !h
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    }) {
        return Err(fail(
            "SignedHeaders must be lowercase header names separated by ';'",
        ));
    }
    Ok(AuthorizationHeader {
        access_key_id,
        date,
        region,
        service,
        signed_headers,
        signature,
    })
}

/// What a successful verification tells the rest of the request.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub access_key_id: String,
    /// The request's signature and signing time (for the replay cache).
    pub signature: [u8; 32],
    pub request_time: SystemTime,
}

/// The 32 bytes of a signature already checked to be 64 lowercase hex digits.
fn signature_bytes(hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).take(32).enumerate() {
        let digit = |c: u8| match c {
            b'0'..=b'9' => c - b'0',
            _ => c.wrapping_sub(b'a') + 10,
        };
        out[i] = digit(pair[0]) << 4 | digit(pair[1]);
    }
    out
}

/// Verifies one request.
///
/// `region`, when the key store pins one, must be the credential scope's
/// region: KMS signs with the key store's own Region.
/// `authority` is the URI authority (HTTP/2's `:authority`); it stands in for the
/// `Host` header, which HTTP/2 requests usually lack.
#[allow(clippy::too_many_arguments)]
pub fn verify(
    credentials: &CredentialSet,
    region: Option<&str>,
    method: &str,
    path_and_query: &str,
    authority: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<Authenticated, XksError> {
    let mut auth_values = headers.get_all(http::header::AUTHORIZATION).iter();
    let auth_value = match (auth_values.next(), auth_values.next()) {
        (Some(v), None) => v
            .to_str()
            .map_err(|_| fail("Authorization header is not ASCII"))?,
        (None, _) => return Err(fail("missing Authorization header (SigV4 required)")),
        (Some(_), Some(_)) => return Err(fail("more than one Authorization header")),
    };
    let auth = parse_authorization(auth_value)?;
    if auth.service != SERVICE {
        return Err(fail(format!(
            "Credential service must be '{SERVICE}', not '{}'",
            xks_spec::error::sanitize_message(auth.service)
        )));
    }
    if let Some(expected) = region {
        if auth.region != expected {
            return Err(fail(format!(
                "request signed for region '{}', but this key store is in '{expected}' \
                 (the key store's region setting)",
                auth.region
            )));
        }
    }
    if !auth.signed_headers.contains(&"host") || !auth.signed_headers.contains(&"x-amz-date") {
        return Err(fail("SignedHeaders must include host and x-amz-date"));
    }

    let amz_date =
        single_header(headers, "x-amz-date")?.ok_or_else(|| fail("missing X-Amz-Date header"))?;
    let request_time = xks_spec::time::parse_amz_date(amz_date)
        .ok_or_else(|| fail("X-Amz-Date must be yyyymmddThhmmssZ"))?;
    if &amz_date[..8] != auth.date {
        return Err(fail("Credential date does not match X-Amz-Date"));
    }
    let skew = match now.duration_since(request_time) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    if skew > MAX_CLOCK_SKEW {
        return Err(fail(format!(
            "request time {amz_date} is {}s away from the proxy's clock; at most 300s is allowed \
             (check NTP on the proxy)",
            skew.as_secs()
        )));
    }

    let identity = credentials.by_id.get(auth.access_key_id).ok_or_else(|| {
        fail(format!(
            "unknown access key id {} for this key store",
            xks_spec::error::sanitize_message(auth.access_key_id)
        ))
    })?;

    // Exactly the headers the client signed, except x-amz-date, which the signer
    // adds itself from `request_time`.
    let mut signed: Vec<(&str, &str)> = Vec::with_capacity(auth.signed_headers.len());
    for name in auth.signed_headers.iter().copied() {
        if name == "x-amz-date" {
            continue;
        }
        let mut found = false;
        for value in headers.get_all(name) {
            let value = value
                .to_str()
                .map_err(|_| fail(format!("signed header {name} is not visible ASCII")))?;
            signed.push((name, value));
            found = true;
        }
        if !found {
            match (name, authority) {
                ("host", Some(a)) => signed.push(("host", a)),
                _ => return Err(fail(format!("signed header {name} is missing"))),
            }
        }
    }

    let mut settings = SigningSettings::default();
    // Sign exactly what the client listed; the default excludes a few headers
    // (user-agent, ...) that a client may legitimately have signed.
    settings.excluded_headers = Some(Vec::new());
    let params = SigningParams::builder()
        .identity(identity)
        .region(auth.region)
        .name(SERVICE)
        .time(request_time)
        .settings(settings)
        .build()
        .map_err(|_| fail("cannot build signing parameters"))?;
    let params = params.into();
    let expected = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let request = SignableRequest::new(
            method,
            path_and_query,
            signed.iter().copied(),
            SignableBody::Bytes(body),
        )
        .map_err(|_| fail("request cannot be canonicalized"))?;
        sign(request, &params)
            .map(|out| out.signature().to_string())
            .map_err(|_| fail("request cannot be canonicalized"))
    }))
    .map_err(|_| fail("request cannot be canonicalized"))??;

    // Constant time: the comparison must not reveal how many leading
    // characters of a forged signature were right.
    if !bool::from(expected.as_bytes().ct_eq(auth.signature.as_bytes())) {
        return Err(fail(
            "signature does not match (wrong secret for this access key id, or the request was \
             changed after signing)",
        ));
    }
    Ok(Authenticated {
        access_key_id: auth.access_key_id.to_string(),
        signature: signature_bytes(auth.signature),
        request_time,
    })
}

fn single_header<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, XksError> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(v), None) => v
            .to_str()
            .map(Some)
            .map_err(|_| fail(format!("{name} header is not ASCII"))),
        _ => Err(fail(format!("more than one {name} header"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HDR: &str = "AWS4-HMAC-SHA256 Credential=MUBSXM6K3KMXHN6RRCXI7TWQH4NU76HYFKRSESPMTSTIBADXQQXQ/20211009/us-west-2/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature=1164eaa8e79eacaa9c0df54aa42f3b300380d14bedfc08e3b319648d4abfff66";

    #[test]
    fn signature_hex_to_bytes() {
        let b = signature_bytes(&"0f".repeat(32));
        assert_eq!(b, [0x0f; 32]);
        assert_eq!(signature_bytes(&"a9".repeat(32))[31], 0xa9);
    }

    #[test]
    fn parses_the_spec_example() {
        let a = parse_authorization(HDR).unwrap();
        assert_eq!(
            a.access_key_id,
            "MUBSXM6K3KMXHN6RRCXI7TWQH4NU76HYFKRSESPMTSTIBADXQQXQ"
        );
        assert_eq!(a.date, "20211009");
        assert_eq!(a.region, "us-west-2");
        assert_eq!(a.service, "kms-xks-proxy");
        assert_eq!(a.signed_headers, vec!["host", "x-amz-date"]);
    }

    #[test]
    fn rejects_malformed_headers() {
        let bad = [
            "",
            "Bearer x",
            "AWS4-HMAC-SHA256 Credential=a/b/c/d/aws4_request",
            &HDR.replace("aws4_request", "aws5_request"),
            &HDR.replace("Signature=1164", "Signature=X164"),
            &HDR.replace(", Signature", ", Foo=1, Signature"),
            &HDR.replace(
                "SignedHeaders=host;x-amz-date",
                "SignedHeaders=Host;x-amz-date",
            ),
            &format!("{HDR}, Signature=00"),
            &HDR.replace("/20211009/", "/2021109/"),
        ];
        for b in bad {
            assert!(parse_authorization(b).is_err(), "{b}");
        }
    }
}
