//! Receiving request bodies so that every answer arrives.
//!
//! A server may answer before it has read the request body (RFC 9113 §8.1,
//! RFC 9112 §9.6), but real clients lose such answers: over HTTP/2 the
//! server's `RST_STREAM(NO_ERROR)` reaches curl while it is still uploading
//! and it drops the response; over HTTP/1.1 a client that writes the whole
//! body before reading (Python's `http.client`) gets a broken pipe when the
//! connection closes under it. KMS turns the 401 and 404 answers it never
//! receives into the wrong `ConnectionErrorCode`.
//!
//! So every request's body is read to its end before the answer is sent,
//! error answers included:
//!
//! - a body within `max` is read into a buffer that is wiped on drop (it may
//!   hold plaintext);
//! - a request answered without its body (unknown path, wrong method) has it
//!   [`discard`]ed: read and dropped, never buffered;
//! - a body over `max` is refused, and what follows is discarded up to
//!   `discard_max` bytes. Only a body beyond that (or one whose declared
//!   length already is) is answered at once, and the connection closed:
//!   nothing unauthenticated may cost more than a bounded amount.
//!
//! Both are bounded in time by `timeout`, which starts when the handler does.
//!
//! Bodies are read before their signature can be checked, so what they may
//! hold in memory is bounded twice: per request by `max`, and over all
//! requests by a byte budget (a semaphore) from which each body buffer takes
//! what it grows to, and gives it back when the request is done. When the
//! budget is spent, the request is answered `429 ThrottlingException` (its
//! body discarded, not kept) instead of waiting.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{header, HeaderMap};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroize::Zeroizing;

use xks_spec::error::XksError;

/// How much a request may send, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// The largest body that is read and processed.
    pub max: usize,
    /// The most a refused body may send before the proxy stops reading and
    /// closes: past this, losing the client's answer is the client's doing.
    pub discard_max: usize,
    /// The time the whole body may take.
    pub timeout: Duration,
}

/// How much of an over-limit body is still read, at most, before answering.
pub const DISCARD_MAX: usize = 1024 * 1024;

/// Why a body was not received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Over `max`. `drained` says whether the client sent it all (and can
    /// receive the answer on an open connection) or was cut off.
    TooLarge { limit: usize, drained: bool },
    /// `Content-Length` is not a number.
    BadLength,
    /// Not complete within the timeout.
    Timeout,
    /// The client reset the stream or the connection failed mid-body.
    Broken,
    /// The proxy holds as many body bytes as its budget allows right now.
    Busy { drained: bool },
}

impl BodyError {
    /// True when the connection must close after the answer: the client may
    /// still be sending, and the next request would start mid-body.
    pub fn must_close(&self) -> bool {
        !matches!(
            self,
            BodyError::TooLarge { drained: true, .. } | BodyError::Busy { drained: true }
        )
    }
}

impl From<BodyError> for XksError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::TooLarge { limit, .. } => XksError::UnsupportedOperation(format!(
                "request body exceeds this proxy's limit of {limit} bytes"
            )),
            BodyError::BadLength => XksError::Validation("Content-Length is not a number".into()),
            BodyError::Timeout => {
                XksError::Validation("request body was not received in time".into())
            }
            BodyError::Broken => XksError::Validation("request body could not be read".into()),
            BodyError::Busy { .. } => XksError::Throttling(
                "the proxy is receiving too many request bodies at once; retry".into(),
            ),
        }
    }
}

fn declared_length(headers: &HeaderMap) -> Result<Option<u64>, BodyError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or(BodyError::BadLength),
    }
}

/// Reads frames, handing each to `sink`, until the end of the body (true),
/// or until more than `cap` bytes came in all, counting the `seen` ones
/// already read (false), or an error. Never buffers.
async fn pump(
    body: &mut Body,
    seen: &mut usize,
    cap: usize,
    mut sink: impl FnMut(&[u8]),
) -> Result<bool, BodyError> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyError::Broken)?;
        if let Ok(data) = frame.into_data() {
            *seen = seen.saturating_add(data.len());
            if *seen > cap {
                return Ok(false);
            }
            sink(&data);
        }
    }
    Ok(true)
}

/// A received body: its bytes, wiped on drop (they may hold plaintext), and
/// its share of the body budget, given back on drop.
pub struct Received {
    pub bytes: Zeroizing<Vec<u8>>,
    _budget: Option<OwnedSemaphorePermit>,
}

impl std::ops::Deref for Received {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// A body buffer that takes its capacity from the budget as it grows.
struct Buffer {
    bytes: Zeroizing<Vec<u8>>,
    budget: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    max: usize,
}

impl Buffer {
    /// Appends `data`, growing (doubling, at most to `max`) with capacity
    /// taken from the budget first; false when the budget has none left.
    fn push(&mut self, data: &[u8]) -> bool {
        let need = self.bytes.len() + data.len();
        let cap = self.bytes.capacity();
        if need > cap {
            let new_cap = need.max(cap * 2).max(1024).min(self.max.max(need));
            let Ok(more) = self
                .budget
                .clone()
                .try_acquire_many_owned(u32::try_from(new_cap - cap).unwrap_or(u32::MAX))
            else {
                return false;
            };
            match &mut self.held {
                Some(p) => p.merge(more),
                None => self.held = Some(more),
            }
            // The old buffer, if any, is wiped when the vector moves.
            let mut grown = Zeroizing::new(Vec::with_capacity(new_cap));
            grown.extend_from_slice(&self.bytes);
            self.bytes = grown;
        }
        self.bytes.extend_from_slice(data);
        true
    }
}

/// Reads the whole body into a wiped-on-drop buffer, or refuses it (see the
/// module docs). The buffer grows with what arrives, paid for from `budget`;
/// nothing is reserved from a declared length.
pub async fn read(
    body: Body,
    headers: &HeaderMap,
    limits: BodyLimits,
    budget: &Arc<Semaphore>,
) -> Result<Received, BodyError> {
    let declared = declared_length(headers)?;
    let mut body = body;
    let mut seen = 0;
    if declared.is_some_and(|n| n > limits.max as u64) {
        let drained = declared.is_some_and(|n| n <= limits.discard_max as u64)
            && discard_within(&mut body, &mut seen, limits).await;
        return Err(BodyError::TooLarge {
            limit: limits.max,
            drained,
        });
    }
    let mut out = Buffer {
        bytes: Zeroizing::new(Vec::new()),
        budget: budget.clone(),
        held: None,
        max: limits.max,
    };
    let mut busy = false;
    let read = pump(&mut body, &mut seen, limits.max, |data| {
        // Once the budget is spent, the rest is only counted, not kept.
        busy = busy || !out.push(data);
    });
    let result = tokio::time::timeout(limits.timeout, read).await;
    let complete = match result {
        Ok(Ok(complete)) => complete,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(BodyError::Timeout),
    };
    if !complete {
        // Over the limit: drop what was kept, drain the rest (bounded).
        drop(out);
        let drained = discard_within(&mut body, &mut seen, limits).await;
        return Err(BodyError::TooLarge {
            limit: limits.max,
            drained,
        });
    }
    if busy {
        return Err(BodyError::Busy { drained: true });
    }
    Ok(Received {
        bytes: out.bytes,
        _budget: out.held,
    })
}

/// Reads the body to its end and drops it, within `discard_max` bytes and
/// the timeout. Returns true when the whole body was read (the connection
/// can carry the answer and the next request).
pub async fn discard(body: Body, limits: BodyLimits) -> bool {
    let mut body = body;
    discard_within(&mut body, &mut 0, limits).await
}

async fn discard_within(body: &mut Body, seen: &mut usize, limits: BodyLimits) -> bool {
    let drain = pump(body, seen, limits.discard_max, |_| {});
    matches!(
        tokio::time::timeout(limits.timeout, drain).await,
        Ok(Ok(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    fn limits() -> BodyLimits {
        BodyLimits {
            max: 10,
            discard_max: 100,
            timeout: Duration::from_secs(5),
        }
    }

    /// A body that arrives in the given chunks.
    struct Chunks(VecDeque<Bytes>);

    impl hyper::body::Body for Chunks {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
        }
    }

    fn chunks(sizes: &[usize]) -> Body {
        Body::new(Chunks(
            sizes.iter().map(|n| Bytes::from(vec![7u8; *n])).collect(),
        ))
    }

    fn len(n: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, n.to_string().parse().unwrap());
        h
    }

    fn budget() -> Arc<Semaphore> {
        Arc::new(Semaphore::new(1 << 20))
    }

    #[tokio::test]
    async fn within_the_limit_is_read_whole() {
        let budget = budget();
        let b = read(chunks(&[4, 6]), &HeaderMap::new(), limits(), &budget).await;
        let b = b.unwrap();
        assert_eq!(b.len(), 10);
        assert!(
            budget.available_permits() < 1 << 20,
            "the buffer holds budget"
        );
        drop(b);
        assert_eq!(budget.available_permits(), 1 << 20, "and gives it back");
    }

    #[tokio::test]
    async fn a_spent_budget_is_a_429_and_keeps_nothing() {
        let budget = Arc::new(Semaphore::new(4));
        let e = read(chunks(&[4, 6]), &HeaderMap::new(), limits(), &budget).await;
        let e = e.err().unwrap();
        assert_eq!(e, BodyError::Busy { drained: true });
        assert_eq!(XksError::from(e).error_name(), "ThrottlingException");
        assert_eq!(budget.available_permits(), 4);
    }

    #[tokio::test]
    async fn over_the_limit_is_drained_then_refused() {
        let e = read(chunks(&[8, 8, 8]), &HeaderMap::new(), limits(), &budget()).await;
        assert_eq!(
            e.err().unwrap(),
            BodyError::TooLarge {
                limit: 10,
                drained: true
            }
        );
        let e = read(chunks(&[50, 50]), &len(100), limits(), &budget()).await;
        assert_eq!(
            e.err().unwrap(),
            BodyError::TooLarge {
                limit: 10,
                drained: true
            }
        );
    }

    #[tokio::test]
    async fn far_over_the_limit_is_cut_off() {
        let e = read(chunks(&[60, 60]), &HeaderMap::new(), limits(), &budget()).await;
        let e = e.err().unwrap();
        assert!(e.must_close(), "{e:?}");
        // A declared length beyond the discard bound is not read at all.
        let e = read(chunks(&[500]), &len(500), limits(), &budget()).await;
        assert_eq!(
            e.err().unwrap(),
            BodyError::TooLarge {
                limit: 10,
                drained: false
            }
        );
    }

    #[tokio::test]
    async fn discard_reads_to_the_end_within_its_bound() {
        assert!(discard(chunks(&[40, 40]), limits()).await);
        assert!(!discard(chunks(&[80, 80]), limits()).await);
    }
}
