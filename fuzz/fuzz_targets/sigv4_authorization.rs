//! SigV4: the Authorization header parser alone, then full verification with
//! fuzzed Authorization, X-Amz-Date and Host values and body. Any input must
//! give Ok or AuthenticationFailed (401), never a panic; and nothing random
//! may ever authenticate.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use xks_proxy::guard::sigv4::{parse_authorization, verify, Credential, CredentialSet};
use xks_proxy::XksError;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_authorization(&text);

    // Split the input into header values and a body.
    let mut parts = data.splitn(4, |b| *b == b'\n');
    let auth = parts.next().unwrap_or_default();
    let date = parts.next().unwrap_or_default();
    let host = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let mut headers = http::HeaderMap::new();
    for (name, value) in [("authorization", auth), ("x-amz-date", date), ("host", host)] {
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            headers.insert(name, v);
        }
    }
    let creds = CredentialSet::new(&[Credential {
        access_key_id: "FUZZACCESSKEYAAAAAAAA".into(),
        secret: "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE".to_string().into(),
        secret_file: None,
        created: None,
    }]);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    match verify(&creds, None, "POST", "/kms/xks/v1/health", None, &headers, body, now) {
        Ok(_) => panic!("random input authenticated"),
        Err(XksError::AuthenticationFailed(_)) => {}
        Err(other) => panic!("unexpected error kind: {other:?}"),
    }
});
