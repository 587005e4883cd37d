//! The names the XKS API and KMS allow: external key ids, URI paths,
//! SigV4 credentials, AWS Regions. One place, used by the configuration (to
//! refuse what KMS would), the API (to refuse a key id before any lookup) and
//! the tools that generate credentials.

/// `externalKeyId`: at most 128 characters of `[A-Za-z0-9._-]`, and not
/// `.` or `..` (path segments that a proxy or client may rewrite).
pub fn is_valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `XksProxyUriPath` for API version 1, as KMS validates it.
pub fn is_valid_uri_path(p: &str) -> bool {
    const SUFFIX: &str = "/kms/xks/v1";
    if p.len() < 10 || p.len() > 128 || !p.ends_with(SUFFIX) {
        return false;
    }
    if p == SUFFIX {
        return true;
    }
    let prefix = &p[..p.len() - SUFFIX.len()];
    prefix.starts_with('/')
        && prefix.len() > 1
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
}

/// An AWS Region name: lowercase letters, digits and dashes, like `us-east-1`.
pub fn is_valid_region(r: &str) -> bool {
    (4..=32).contains(&r.len())
        && r.split('-').count() >= 3
        && r.split('-').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// Access key id: 20 to 30 characters of `A-Z` and `2-7` (base32 alphabet).
pub fn is_valid_access_key_id(id: &str) -> bool {
    (20..=30).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

/// Secret access key: 43 to 64 characters of `A-Za-z0-9+/=`.
pub fn is_valid_secret(s: &str) -> bool {
    (43..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_paths_follow_kms_rules() {
        assert!(is_valid_uri_path("/kms/xks/v1"));
        assert!(is_valid_uri_path("/example/kms/xks/v1"));
        assert!(is_valid_uri_path("/a/b-c_d/kms/xks/v1"));
        assert!(!is_valid_uri_path("/kms/xks/v2"));
        assert!(!is_valid_uri_path("example/kms/xks/v1"));
        assert!(!is_valid_uri_path("/ex.ample/kms/xks/v1"));
        assert!(!is_valid_uri_path(&format!(
            "/{}/kms/xks/v1",
            "a".repeat(120)
        )));
    }

    #[test]
    fn credential_formats() {
        assert!(is_valid_access_key_id("AKIAI2SFODNN7EXAMPLE"));
        assert!(!is_valid_access_key_id("AKIAI2SFODNN7EXAMPL1")); // '1' not in base32
        assert!(!is_valid_access_key_id("SHORT"));
        assert!(is_valid_secret(
            "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE"
        ));
        assert!(!is_valid_secret("too-short"));
        assert!(!is_valid_secret(&"a".repeat(65)));
    }

    #[test]
    fn regions() {
        for r in [
            "us-east-1",
            "eu-central-2",
            "us-gov-west-1",
            "ap-southeast-4",
        ] {
            assert!(is_valid_region(r), "{r}");
        }
        for r in ["", "us", "US-EAST-1", "us_east_1", "us-east-", "-us-east-1"] {
            assert!(!is_valid_region(r), "{r}");
        }
    }

    #[test]
    fn key_ids() {
        assert!(is_valid_key_id("b42c7fbf-de61-441c-ae24-123456789012"));
        assert!(is_valid_key_id("a.b_c-D"));
        assert!(!is_valid_key_id(""));
        assert!(!is_valid_key_id("."));
        assert!(!is_valid_key_id(".."));
        assert!(is_valid_key_id("..."));
        assert!(!is_valid_key_id("a/b"));
        assert!(!is_valid_key_id(&"a".repeat(129)));
    }
}
