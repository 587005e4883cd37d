//! The XKS API's error model.
//!
//! Every failure a client can see is one row of the spec's error table: an HTTP
//! status plus an `errorName`, with an optional `errorMessage`. Keeping them in one
//! enum means a handler cannot invent a status/name pair that KMS does not know,
//! and the JSON body is produced in exactly one place.
//!
//! KMS never shows `errorMessage` to its caller but writes it to the customer's
//! CloudWatch logs, so messages are written for the operator: what was wrong and,
//! where it helps, what to change. They never contain secrets, plaintext, AAD or
//! expected signatures; [`sanitize_message`] also enforces the spec's format rule
//! (fewer than 512 printable ASCII characters).

use http::StatusCode;

/// One failure, as the XKS API reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XksError {
    /// 400: an input parameter is invalid (never used for GetHealthStatus).
    #[error("{0}")]
    Validation(String),
    /// 400: the key (or key store) is disabled.
    #[error("{0}")]
    InvalidState(String),
    /// 400: ciphertext, IV, AAD, metadata or tag do not authenticate.
    #[error("{0}")]
    InvalidCiphertext(String),
    /// 400: the key does not allow the requested operation.
    #[error("{0}")]
    InvalidKeyUsage(String),
    /// 401: SigV4 verification failed.
    #[error("{0}")]
    AuthenticationFailed(String),
    /// 403: secondary authorization denied the request.
    #[error("{0}")]
    AccessDenied(String),
    /// 404: no usable key with this external key id.
    #[error("{0}")]
    KeyNotFound(String),
    /// 404: the URI is not an XKS API URI of a configured key store.
    #[error("{0}")]
    InvalidUriPath(String),
    /// 405: a method other than POST on an XKS API URI. The spec demands the
    /// status; it names no errorName, so we use ValidationException (the closest
    /// row) to keep the body in the spec's JSON shape.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 429: over quota or unable to keep up.
    #[error("{0}")]
    Throttling(String),
    /// 501: not implemented, or a value beyond what this proxy supports.
    #[error("{0}")]
    UnsupportedOperation(String),
    /// 503: a dependency (the HSM) did not answer in time.
    #[error("{0}")]
    DependencyTimeout(String),
    /// 500: anything else, typically a key manager failure.
    #[error("{0}")]
    Internal(String),
}

impl XksError {
    /// The HTTP status the spec assigns to this error.
    pub fn status(&self) -> StatusCode {
        use XksError::*;
        match self {
            Validation(_) | InvalidState(_) | InvalidCiphertext(_) | InvalidKeyUsage(_) => {
                StatusCode::BAD_REQUEST
            }
            AuthenticationFailed(_) => StatusCode::UNAUTHORIZED,
            AccessDenied(_) => StatusCode::FORBIDDEN,
            KeyNotFound(_) | InvalidUriPath(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Throttling(_) => StatusCode::TOO_MANY_REQUESTS,
            UnsupportedOperation(_) => StatusCode::NOT_IMPLEMENTED,
            DependencyTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The spec's `errorName`.
    pub fn error_name(&self) -> &'static str {
        use XksError::*;
        match self {
            Validation(_) | MethodNotAllowed(_) => "ValidationException",
            InvalidState(_) => "InvalidStateException",
            InvalidCiphertext(_) => "InvalidCiphertextException",
            InvalidKeyUsage(_) => "InvalidKeyUsageException",
            AuthenticationFailed(_) => "AuthenticationFailedException",
            AccessDenied(_) => "AccessDeniedException",
            KeyNotFound(_) => "KeyNotFoundException",
            InvalidUriPath(_) => "InvalidUriPathException",
            Throttling(_) => "ThrottlingException",
            UnsupportedOperation(_) => "UnsupportedOperationException",
            DependencyTimeout(_) => "DependencyTimeoutException",
            Internal(_) => "InternalException",
        }
    }

    /// The operator-facing message.
    pub fn message(&self) -> &str {
        use XksError::*;
        match self {
            Validation(m)
            | InvalidState(m)
            | InvalidCiphertext(m)
            | InvalidKeyUsage(m)
            | AuthenticationFailed(m)
            | AccessDenied(m)
            | KeyNotFound(m)
            | InvalidUriPath(m)
            | MethodNotAllowed(m)
            | Throttling(m)
            | UnsupportedOperation(m)
            | DependencyTimeout(m)
            | Internal(m) => m,
        }
    }

    /// The JSON body `{"errorName": ..., "errorMessage": ...}`.
    pub fn to_json(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "errorName": self.error_name(),
            "errorMessage": sanitize_message(self.message()),
        });
        body.to_string().into_bytes()
    }
}

/// Forces a message into the spec's format: printable ASCII (0x20..=0x7e) only,
/// fewer than 512 characters. Anything else becomes `?` or is cut off.
pub fn sanitize_message(message: &str) -> String {
    let mut out: String = message
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(511)
        .collect();
    if message.chars().count() > 511 {
        out.truncate(508);
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_the_spec_status_and_name() {
        let cases = [
            (
                XksError::Validation(String::new()),
                400,
                "ValidationException",
            ),
            (
                XksError::InvalidState(String::new()),
                400,
                "InvalidStateException",
            ),
            (
                XksError::InvalidCiphertext(String::new()),
                400,
                "InvalidCiphertextException",
            ),
            (
                XksError::InvalidKeyUsage(String::new()),
                400,
                "InvalidKeyUsageException",
            ),
            (
                XksError::AuthenticationFailed(String::new()),
                401,
                "AuthenticationFailedException",
            ),
            (
                XksError::AccessDenied(String::new()),
                403,
                "AccessDeniedException",
            ),
            (
                XksError::KeyNotFound(String::new()),
                404,
                "KeyNotFoundException",
            ),
            (
                XksError::InvalidUriPath(String::new()),
                404,
                "InvalidUriPathException",
            ),
            (
                XksError::MethodNotAllowed(String::new()),
                405,
                "ValidationException",
            ),
            (
                XksError::Throttling(String::new()),
                429,
                "ThrottlingException",
            ),
            (
                XksError::UnsupportedOperation(String::new()),
                501,
                "UnsupportedOperationException",
            ),
            (
                XksError::DependencyTimeout(String::new()),
                503,
                "DependencyTimeoutException",
            ),
            (XksError::Internal(String::new()), 500, "InternalException"),
        ];
        for (err, status, name) in cases {
            assert_eq!(err.status().as_u16(), status, "{name}");
            assert_eq!(err.error_name(), name);
        }
    }

    #[test]
    fn messages_are_printable_ascii_and_short() {
        let long = "é\n".repeat(600);
        let clean = sanitize_message(&long);
        assert!(clean.len() < 512);
        assert!(clean.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        assert!(clean.ends_with("..."));
        assert_eq!(sanitize_message("plain text"), "plain text");
    }

    #[test]
    fn json_body_has_both_fields() {
        let body = XksError::KeyNotFound("no key named x".into()).to_json();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errorName"], "KeyNotFoundException");
        assert_eq!(v["errorMessage"], "no key named x");
    }
}
