//! The XKS API's URIs: `<XksProxyUriPath>/health` and
//! `<XksProxyUriPath>/keys/<externalKeyId>/{metadata,encrypt,decrypt}`.
//! Key stores are found by their full `XksProxyUriPath`, so the path is split
//! here rather than matched against a static route table.

/// The four XKS operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    GetHealthStatus,
    GetKeyMetadata,
    Encrypt,
    Decrypt,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::GetHealthStatus => "GetHealthStatus",
            Operation::GetKeyMetadata => "GetKeyMetadata",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
        }
    }
}

/// Splits an XKS URI path into (key store path, operation, key id).
pub fn parse_path(path: &str) -> Option<(&str, Operation, Option<&str>)> {
    if let Some(base) = path.strip_suffix("/health") {
        return Some((base, Operation::GetHealthStatus, None));
    }
    let (rest, op) = path.rsplit_once('/')?;
    let op = match op {
        "metadata" => Operation::GetKeyMetadata,
        "encrypt" => Operation::Encrypt,
        "decrypt" => Operation::Decrypt,
        _ => return None,
    };
    let (rest, key_id) = rest.rsplit_once('/')?;
    let base = rest.strip_suffix("/keys")?;
    Some((base, op, Some(key_id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            parse_path("/kms/xks/v1/health"),
            Some(("/kms/xks/v1", Operation::GetHealthStatus, None))
        );
        assert_eq!(
            parse_path("/p/kms/xks/v1/keys/k-1/encrypt"),
            Some(("/p/kms/xks/v1", Operation::Encrypt, Some("k-1")))
        );
        assert_eq!(
            parse_path("/p/kms/xks/v1/keys/k/metadata"),
            Some(("/p/kms/xks/v1", Operation::GetKeyMetadata, Some("k")))
        );
        assert_eq!(parse_path("/p/kms/xks/v1/keys/k/sign"), None);
        assert_eq!(parse_path("/p/kms/xks/v1/key/k/encrypt"), None);
        assert_eq!(parse_path("/"), None);
    }
}
