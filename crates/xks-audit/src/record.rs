//! The trail's records: what each line holds, how it is written, and the
//! two constructions that make the trail tamper-evident.
//!
//! Every record is one line of JSON (no line breaks inside: JSON escapes
//! them) with the same header:
//!
//! ```text
//! {"v":1,"seq":41,"type":"request","time":"2026-11-25T10:00:00.123456Z",
//!  "instance":"proxy-a-443", …the type's own fields…, "prev":"<64 hex>"}
//! ```
//!
//! - **The chain**: `prev` is the SHA-256 of the previous record's line
//!   (its exact bytes, without the line break), all zeros for the first
//!   record of an instance. `seq` counts records of the instance from 0.
//!   Changing, removing, inserting or moving a line breaks the link of the
//!   line after it, unless every later `prev` is recomputed — which anyone
//!   can do, SHA-256 being public. Hence:
//! - **The seal**: every N records or T seconds, a `seal` record carries an
//!   HMAC-SHA256 over [`seal_input`] — the instance, the seal's own `seq`,
//!   `time` and `count`, the seal key's label and the chain head (the
//!   `prev` it links to) — computed inside the HSM with a key that cannot
//!   leave it. Rewriting history means recomputing the next seal, which
//!   needs the HSM.
//!
//! Record types: `request` (one per XKS request), `seal`, `file` (first
//! record of every file: which file came before), `start` and `stop` (a
//! proxy run), `loss` (records that could not be queued), `lockdown`,
//! `unlock` and `lock-expired` (the kill switch as this instance saw it).
//!
//! Never in a record: plaintext, AAD, ciphertext, tags, IVs, secrets.
//! Every field a client controls was cut to a bounded length before it got
//! here (see the API's access log).

use std::net::SocketAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The record format version (`"v"`).
pub const FORMAT: u32 = 1;

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// The `prev` of an instance's first record.
pub const GENESIS: Hash = [0; 32];

/// The SHA-256 of one line (its bytes without the line break): what the
/// next record's `prev` carries.
pub fn hash_line(line: &[u8]) -> Hash {
    let d = ring::digest::digest(&ring::digest::SHA256, line);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Hex (either case) to bytes; `None` for anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// What a seal's HMAC is computed over. Binding the instance, position,
/// time and count as well as the chain head means a seal cannot be moved
/// to another chain or place, or re-dated, without the HSM.
pub fn seal_input(
    instance: &str,
    seq: u64,
    time: &str,
    count: u64,
    key: &str,
    head: &Hash,
) -> Vec<u8> {
    format!(
        "xks-proxy audit seal v1\ninstance={instance}\nseq={seq}\ntime={time}\ncount={count}\n\
         key={key}\nhead={}\n",
        hex(head)
    )
    .into_bytes()
}

/// What came of a request, as far as the proxy's own checks go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// It passed every check and was answered with success.
    Allowed,
    /// A check of the proxy refused it (`deniedBy` says which).
    #[default]
    Denied,
    /// It passed every check, but the key manager answered with an error
    /// (`errorName` says which: a bad ciphertext, a disabled key, a hung
    /// HSM…).
    Failed,
    /// The client went away before the answer; the key manager may have
    /// done the work.
    Abandoned,
}

/// One XKS request. Built by the API as the request goes through the
/// pipeline; the header (`seq`, `time`, `instance`, `prev`) is added by
/// the writer.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    /// When the request arrived (the record's `time`).
    #[serde(skip)]
    pub received: Option<SystemTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_operation: Option<String>,
    /// The XKS operation (`Encrypt`, `GetKeyMetadata`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_store: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The version of the key that did the work (see `keys rotate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws_principal_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_via_service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws_source_vpc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws_source_vpce: Option<String>,
    /// The TCP peer, or the client a PROXY protocol v2 header named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<SocketAddr>,
    /// The VPC endpoint id from the PROXY header's AWS TLV.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_vpce_id: Option<String>,
    /// Set once SigV4 passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    pub decision: Decision,
    /// The check that refused it: `routing`, `body`, `authentication`,
    /// `quota`, `key-store`, `validation`, `lockdown`, `authorization`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_by: Option<&'static str>,
    /// Cedar's decision (`allow`, `deny`, `would-deny`) and the policies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz_policies: Option<String>,
    /// The lockdown that refused it (or made GetKeyMetadata say DISABLED).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_id: Option<String>,
    /// The HTTP status (0: no answer was sent).
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_name: Option<&'static str>,
    pub latency_us: u64,
    /// Records of this source's unauthenticated requests left out before
    /// this one (they are rate-limited like the access log's lines).
    #[serde(skip_serializing_if = "is_zero")]
    pub suppressed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What happened to a lockdown, as this instance saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockEventKind {
    /// A lock took effect here.
    Locked,
    /// A lock was lifted (its marker removed).
    Unlocked,
    /// A lock with `--for` ran out and lifted itself.
    Expired,
}

impl LockEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LockEventKind::Locked => "lockdown",
            LockEventKind::Unlocked => "unlock",
            LockEventKind::Expired => "lock-expired",
        }
    }
}

/// A lockdown taking effect or ending on this instance.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LockEvent {
    #[serde(skip)]
    pub kind: LockEventKind,
    /// A key store's name, or `*` for all.
    pub scope: String,
    pub lock_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the operator set it (from the marker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Who set it (`user@host` of the `lockdown` command).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// A seal's own fields.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SealBody<'a> {
    /// Records since the previous seal (this one not included).
    pub count: u64,
    /// The seal key's label.
    pub key: &'a str,
    /// The key manager that computed it.
    pub ekm: &'a str,
    pub hmac: String,
}

/// The first record of every file.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FileBody<'a> {
    /// The file before this one in the chain, if any.
    pub previous_file: Option<&'a str>,
}

/// A proxy run starts.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StartBody<'a> {
    pub version: &'a str,
    pub pid: u32,
    pub on_failure: &'a str,
    /// Records of the previous run after its last seal: it ended without
    /// its final seal (a crash, a kill), so nothing proved them until this
    /// run's first seal.
    pub unsealed_before: u64,
    /// Set when the files ended before the seal the HSM witnessed (see
    /// `super::witness`): the newest seal's `seq`, whose successor this
    /// run continues from...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub witness_seq: Option<u64>,
    /// ...and the `seq` the files would have gone on with (0: no files),
    /// so the records from there to `witness_seq` are missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files_next_seq: Option<u64>,
    /// Set when the previous run left records after its last seal: this
    /// run goes on from that seal (its `file` record links to it), so those
    /// records (`tail_from` to `tail_to`) are never sealed as if proven;
    /// `verify` reports them as unproven, or, after a clean stop's final
    /// seal, as tampering.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tail_from: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tail_to: Option<u64>,
    /// Set when the witness could not be read at start (`on_failure =
    /// "continue"`): the files were not checked against it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub witness_unchecked: Option<bool>,
}

/// The chain is closed for good (`xks-proxy audit retire`): its witness is
/// removed from the HSM, and this record, sealed, is what says so.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RetireBody<'a> {
    pub by: &'a str,
}

/// A proxy run ends cleanly.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StopBody {
    pub reason: &'static str,
}

/// Records that could not be queued since the previous record.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LossBody {
    pub count: u64,
}

/// One line: the header around a type's own fields.
#[derive(Serialize)]
struct Line<'a, B: Serialize> {
    v: u32,
    seq: u64,
    #[serde(rename = "type")]
    kind: &'a str,
    time: &'a str,
    instance: &'a str,
    #[serde(flatten)]
    body: &'a B,
    prev: &'a str,
}

/// Renders one record (without the line break).
pub(crate) fn render<B: Serialize>(
    seq: u64,
    kind: &str,
    time: &str,
    instance: &str,
    body: &B,
    prev: &Hash,
) -> Vec<u8> {
    let prev = hex(prev);
    let line = Line {
        v: FORMAT,
        seq,
        kind,
        time,
        instance,
        body,
        prev: &prev,
    };
    // Serializing plain structs of strings and numbers into a vector
    // cannot fail; an empty line would be caught by `verify` regardless.
    serde_json::to_vec(&line).unwrap_or_default()
}

/// The header of any record, as `verify` reads it, with the fields of a
/// seal and a start (absent in other types).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Header {
    pub v: u32,
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub time: String,
    pub instance: String,
    pub prev: String,
    pub count: Option<u64>,
    pub key: Option<String>,
    pub hmac: Option<String>,
    pub unsealed_before: Option<u64>,
    pub witness_seq: Option<u64>,
    pub files_next_seq: Option<u64>,
    pub tail_from: Option<u64>,
    pub tail_to: Option<u64>,
    pub witness_unchecked: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00abFF"), Some(vec![0x00, 0xab, 0xff]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn a_line_has_the_header_first_and_prev_last() {
        let r = RequestRecord {
            kms_request_id: Some("r-1".into()),
            operation: Some("Encrypt"),
            status: 200,
            decision: Decision::Allowed,
            client_addr: Some("10.0.0.1:4000".parse().unwrap()),
            ..RequestRecord::default()
        };
        let line = render(
            7,
            "request",
            "2026-01-01T00:00:00.000000Z",
            "i-1",
            &r,
            &GENESIS,
        );
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(
            text.starts_with(
                r#"{"v":1,"seq":7,"type":"request","time":"2026-01-01T00:00:00.000000Z","instance":"i-1","kmsRequestId":"r-1","operation":"Encrypt","clientAddr":"10.0.0.1:4000","decision":"allowed","status":200,"latencyUs":0,"prev":"0000"#
            ),
            "{text}"
        );
        assert!(!text.contains('\n'));
        let h: Header = serde_json::from_slice(&line).unwrap();
        assert_eq!((h.seq, h.kind.as_str(), h.prev.len()), (7, "request", 64));
        assert_ne!(hash_line(&line), GENESIS);
    }

    #[test]
    fn the_seal_input_binds_every_field() {
        let base = seal_input("i", 5, "t", 4, "k", &GENESIS);
        for other in [
            seal_input("j", 5, "t", 4, "k", &GENESIS),
            seal_input("i", 6, "t", 4, "k", &GENESIS),
            seal_input("i", 5, "u", 4, "k", &GENESIS),
            seal_input("i", 5, "t", 3, "k", &GENESIS),
            seal_input("i", 5, "t", 4, "l", &GENESIS),
            seal_input("i", 5, "t", 4, "k", &[1; 32]),
        ] {
            assert_ne!(base, other);
        }
    }
}
