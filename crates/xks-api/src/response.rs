//! Turning answers into HTTP responses: what each key manager [`Fault`]
//! means in the spec's terms, the JSON body of every error with the spec's
//! status, and the JSON of successful answers.

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};

use xks_hsm::Fault;
use xks_spec::error::XksError;

/// The spec's answer for each fault of the key manager layer: the only
/// place where what went wrong there becomes an HTTP status. (A function,
/// not a `From`: neither type is this crate's.)
pub fn spec_error(f: Fault) -> XksError {
    let message = f.to_string();
    match f {
        Fault::KeyNotFound { .. } => XksError::KeyNotFound(message),
        Fault::KeyDisabled { .. } => XksError::InvalidState(message),
        Fault::WrongUsage(_) => XksError::InvalidKeyUsage(message),
        Fault::BadCiphertext | Fault::UnknownVersion { .. } => XksError::InvalidCiphertext(message),
        Fault::Busy { .. } => XksError::Throttling(message),
        Fault::NoSession { .. } | Fault::Timeout { .. } => XksError::DependencyTimeout(message),
        Fault::Unavailable { .. } | Fault::Failed { .. } => XksError::Internal(message),
    }
}

/// The HTTP response of an error: the spec's status, its JSON body, and
/// the error name in an extension, so the access log can report it without
/// parsing the body again.
pub fn error_response(e: XksError) -> Response {
    let mut response = Response::new(Body::from(Bytes::from(e.to_json())));
    *response.status_mut() = e.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if matches!(e, XksError::MethodNotAllowed(_)) {
        headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
    }
    response.extensions_mut().insert(ErrorName(e.error_name()));
    response
}

/// Response extension carrying the `errorName` of an error response.
#[derive(Debug, Clone, Copy)]
pub struct ErrorName(pub &'static str);

/// A JSON response with this status and body.
pub fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `v` as a 200 JSON response.
pub fn to_json<T: serde::Serialize>(v: &T) -> Result<Response, XksError> {
    let body = serde_json::to_vec(v)
        .map_err(|_| XksError::Internal("cannot serialize the response".into()))?;
    Ok(json_response(StatusCode::OK, Bytes::from(body)))
}

/// Asks hyper to close an HTTP/1 connection after this answer, because the
/// client may still be sending the body. HTTP/2 ends just the stream by
/// itself (and forbids the header).
pub fn close_after(response: &mut Response, version: http::Version) {
    if version < http::Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}
