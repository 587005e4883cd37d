//! `[[key_stores]]`: each key store's URI path, credentials, keys, quota,
//! replay protection, policies and compatibility with the AWS sample's
//! ciphertexts, checked and turned into what `state` builds from.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::error::{invalid, ConfigError};
use super::paths::resolve;
use super::raw::*;
use super::secrets::read_secret;
use xks_guard::sigv4::Credential;
use xks_guard::throttle::RateLimit;
use xks_spec::names::{
    is_valid_access_key_id, is_valid_key_id, is_valid_region, is_valid_secret, is_valid_uri_path,
};
use xks_spec::time::parse_timestamp;
use xks_state::{AllowedKeys, KeyStoreConfig, PolicySource};

pub(super) fn validate_key_stores(
    raws: Vec<RawKeyStore>,
    base: &Path,
    health_key: &str,
) -> Result<Vec<KeyStoreConfig>, ConfigError> {
    if raws.is_empty() {
        return Err(invalid(
            "key_stores",
            "at least one [[key_stores]] entry is required",
        ));
    }
    let mut paths = HashSet::new();
    let mut key_ids: HashMap<String, String> = HashMap::new();
    let mut out = Vec::with_capacity(raws.len());
    for (i, raw) in raws.into_iter().enumerate() {
        let field = format!("key_stores[{i}] ({})", raw.name);
        if raw.name.trim().is_empty() {
            return Err(invalid(
                format!("key_stores[{i}].name"),
                "must not be empty",
            ));
        }
        if !is_valid_uri_path(&raw.uri_path) {
            return Err(invalid(
                format!("{field}.uri_path"),
                format!(
                    "'{}' is not a valid XksProxyUriPath: 10 to 128 characters matching \
                     ^(/[a-zA-Z0-9/_-]+/kms/xks/v1)$ or ^/kms/xks/v1$",
                    raw.uri_path
                ),
            ));
        }
        if !paths.insert(raw.uri_path.clone()) {
            return Err(invalid(
                format!("{field}.uri_path"),
                format!("'{}' is used by two key stores", raw.uri_path),
            ));
        }
        let keys = if raw.keys.len() == 1 && raw.keys[0] == "*" {
            AllowedKeys::All
        } else {
            if raw.keys.is_empty() {
                return Err(invalid(
                    format!("{field}.keys"),
                    "list the external key ids (PKCS#11 labels) or [\"*\"] for every AES-256 key",
                ));
            }
            let mut set = HashSet::new();
            for k in raw.keys {
                if !is_valid_key_id(&k) {
                    return Err(invalid(
                        format!("{field}.keys"),
                        format!(
                            "'{k}' is not a valid external key id (1-128 of A-Z a-z 0-9 . _ -)"
                        ),
                    ));
                }
                if k == health_key {
                    return Err(invalid(
                        format!("{field}.keys"),
                        format!("'{k}' is the health-check key; it must never serve KMS"),
                    ));
                }
                set.insert(k);
            }
            AllowedKeys::Only(set)
        };
        if raw.credentials.is_empty() {
            return Err(invalid(
                format!("{field}.credentials"),
                "at least one SigV4 credential is required",
            ));
        }
        let mut credentials = Vec::with_capacity(raw.credentials.len());
        for (j, c) in raw.credentials.into_iter().enumerate() {
            let cf = format!("{field}.credentials[{j}]");
            if !is_valid_access_key_id(&c.access_key_id) {
                return Err(invalid(
                    format!("{cf}.access_key_id"),
                    "must be 20 to 30 characters of A-Z and 2-7",
                ));
            }
            if let Some(other) = key_ids.insert(c.access_key_id.clone(), raw.name.clone()) {
                return Err(invalid(
                    format!("{cf}.access_key_id"),
                    format!("{} is already used by key store '{other}'; an access key id must identify one secret", c.access_key_id),
                ));
            }
            let secret_file = c.secret_file.as_ref().map(|p| resolve(base, p));
            let created = match &c.created {
                None => None,
                Some(s) => Some(parse_timestamp(s).ok_or_else(|| {
                    invalid(
                        format!("{cf}.created"),
                        format!("'{s}' is not a UTC timestamp like 2026-01-31T12:00:00Z"),
                    )
                })?),
            };
            let secret = read_secret(
                &format!("{cf}.secret_file"),
                &format!("{cf}.secret_env"),
                c.secret_file,
                c.secret_env,
                base,
            )?;
            if !is_valid_secret(&secret) {
                return Err(invalid(
                    format!("{cf}.secret"),
                    "the secret access key must be 43 to 64 characters of A-Z a-z 0-9 + / =",
                ));
            }
            credentials.push(Credential {
                access_key_id: c.access_key_id,
                secret,
                secret_file,
                created,
            });
        }
        // Read here; compiled (and so checked) when the state is built.
        let authorization = match raw.authorization {
            None => None,
            Some(a) => {
                let file = resolve(base, &a.policy_file);
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    invalid(
                        format!("{field}.authorization.policy_file"),
                        format!("cannot read {}: {e}", file.display()),
                    )
                })?;
                Some(PolicySource {
                    file,
                    text,
                    mode: a.mode,
                })
            }
        };
        let rate_limit = match raw.rate_limit {
            None => None,
            Some(r) => {
                let burst = r.burst.unwrap_or(r.requests_per_second);
                let valid = r.requests_per_second > 0.0
                    && r.requests_per_second.is_finite()
                    && burst >= 1.0
                    && burst.is_finite();
                if !valid {
                    return Err(invalid(
                        format!("{field}.rate_limit"),
                        "requests_per_second must be > 0 and burst >= 1",
                    ));
                }
                Some(RateLimit {
                    per_second: r.requests_per_second,
                    burst,
                })
            }
        };
        let compat = validate_compat(&field, raw.compat, raw.compat_metadata_b64)?;
        if let Some(r) = &raw.region {
            if !is_valid_region(r) {
                return Err(invalid(
                    format!("{field}.region"),
                    format!("'{r}' is not an AWS Region name like us-east-1"),
                ));
            }
        }
        out.push(KeyStoreConfig {
            name: raw.name,
            uri_path: raw.uri_path,
            keys,
            credentials,
            authorization,
            rate_limit,
            compat,
            region: raw.region,
            replay_protection: raw.replay_protection,
        });
    }
    Ok(out)
}

/// `compat` and the sample's static ciphertext metadata.
fn validate_compat(
    field: &str,
    compat: Option<Compat>,
    metadata_b64: Option<String>,
) -> Result<Option<xks_spec::aead::SampleCompat>, ConfigError> {
    use base64::Engine;
    let Some(Compat::AwsSample) = compat else {
        return match metadata_b64 {
            Some(_) => Err(invalid(
                format!("{field}.compat_metadata_b64"),
                "only with compat = \"aws-sample\"",
            )),
            None => Ok(None),
        };
    };
    let metadata = match metadata_b64 {
        None => None,
        Some(b64) => {
            let md = base64::engine::general_purpose::STANDARD
                .decode(&b64)
                .ok()
                .filter(|m| !m.is_empty() && m.len() <= xks_spec::aead::MAX_METADATA_LEN)
                .ok_or_else(|| {
                    invalid(
                        format!("{field}.compat_metadata_b64"),
                        "must be the Base64 of 1 to 20 bytes (the sample's \
                         server.ciphertext_metadata_b64)",
                    )
                })?;
            if xks_spec::aead::is_own_metadata(&md) {
                return Err(invalid(
                    format!("{field}.compat_metadata_b64"),
                    "these bytes are also a metadata layout of this proxy, so the sample's \
                     ciphertexts could not be told from ours; see docs/migrate-from-aws-sample.md",
                ));
            }
            Some(md)
        }
    };
    Ok(Some(xks_spec::aead::SampleCompat { metadata }))
}
