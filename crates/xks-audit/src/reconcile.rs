//! `xks-proxy audit reconcile --cloudtrail FILE…`: the proxy's trail
//! against KMS's own record.
//!
//! Every XKS request KMS makes carries `requestMetadata.kmsRequestId`, the
//! `requestID` of the KMS call that CloudTrail logs. So each key operation
//! the proxy served should have a CloudTrail event with that `requestID`,
//! and each KMS call on an external-key-store key should have reached the
//! proxy. Two one-sided sets come out:
//!
//! - **served, never made by KMS** — the alarm: a request signed with the
//!   key store's SigV4 credentials that did not come from KMS. Someone
//!   holds the credentials. Exit code 3.
//! - **made by KMS, never reached this proxy**: the call failed in KMS
//!   before it (an IAM denial: the event has an `errorCode`), went to
//!   another instance whose trail was not given, or was lost on the way.
//!
//! Inputs: CloudTrail log files (`{"Records":[…]}`, as delivered to S3,
//! decompressed: `zcat` them, or pass `-` for standard input), and the
//! output of `aws cloudtrail lookup-events` (`{"Events":[{"CloudTrailEvent":
//! "<the event as a JSON string>"}, …]}`); several JSON documents may follow
//! one another in one file.
//!
//! Which events concern an external key store: KMS events (`eventSource`
//! `kms.amazonaws.com`) of the operations that call the proxy, whose
//! `additionalEventData` names a `customKeyStoreId` or `xksKeyId`, whose
//! key (`resources[].ARN`, `requestParameters.keyId`) is one the trail saw
//! as `kmsKeyArn` or given with `--key-arn`, or whose `requestID` the trail
//! holds.
//!
//! Both sides cover a time span, and a call near the edge of one may be
//! outside the other (CloudTrail delivers minutes late). So each side is
//! only compared within the other's span, shrunk by a slack (5 minutes by
//! default), unless `--from`/`--to` set the span; what falls outside is
//! counted, not reported.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;

use super::report::RequestLine;
use xks_spec::time::parse_timestamp_any;

/// The KMS operations that call an external key store proxy.
const CALLS_PROXY: &[&str] = &[
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "CreateKey",
    "DescribeKey",
    "CreateCustomKeyStore",
    "UpdateCustomKeyStore",
    "ConnectCustomKeyStore",
];

/// The XKS operations whose requests must come from KMS calls that
/// CloudTrail logs. (GetHealthStatus is left out of the alarm: KMS's
/// periodic health checks are not API calls of the customer's.)
const KEY_OPERATIONS: &[&str] = &["GetKeyMetadata", "Encrypt", "Decrypt"];

/// A KMS event of CloudTrail, as far as reconciliation needs it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KmsEvent {
    pub request_id: String,
    pub event_name: String,
    pub event_time: String,
    /// The key's ARN (or the id the caller gave).
    pub key: Option<String>,
    pub custom_key_store_id: Option<String>,
    pub error_code: Option<String>,
    /// The file it came from.
    pub source: String,
}

/// How to reconcile.
#[derive(Debug, Clone)]
pub struct Options {
    /// The span to compare (both sides); default: each side within the
    /// other's span, shrunk by `slack`.
    pub from: Option<SystemTime>,
    pub to: Option<SystemTime>,
    pub slack: Duration,
    /// More external-key-store key ARNs (beyond those the trail saw).
    pub key_arns: Vec<String>,
    /// Only these custom key stores (`cks-…`), when given.
    pub key_store_ids: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            from: None,
            to: None,
            slack: Duration::from_secs(300),
            key_arns: Vec::new(),
            key_store_ids: Vec::new(),
        }
    }
}

/// The reconciliation.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// KMS events of external-key-store keys found, and compared.
    pub events: usize,
    pub events_compared: usize,
    /// Key-operation requests of the trail found, and compared.
    pub requests: usize,
    pub requests_compared: usize,
    /// Compared requests that have their KMS event.
    pub matched: usize,
    /// Made by KMS, never reached this proxy (within the span).
    pub never_reached: Vec<KmsEvent>,
    /// Served by the proxy, never made by KMS: the alarm (the first
    /// [`MAX_LISTED`]).
    pub never_made: Vec<Unmade>,
    /// How many requests the alarm concerns, listed or not.
    pub never_made_total: usize,
}

/// A request of the trail that KMS never made.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Unmade {
    pub time: String,
    pub instance: String,
    pub seq: u64,
    pub kms_request_id: Option<String>,
    pub operation: Option<String>,
    pub key_store: Option<String>,
    pub key_id: Option<String>,
    pub aws_principal_arn: Option<String>,
    pub access_key_id: Option<String>,
    pub client_addr: Option<String>,
    pub status: u16,
}

/// The events in one CloudTrail input (see the module docs for the
/// formats). `source` names it in the output.
pub fn parse_cloudtrail(text: &str, source: &str) -> Result<Vec<Value>, String> {
    let mut events = Vec::new();
    for doc in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
        let doc = doc.map_err(|e| format!("{source}: not JSON: {e}"))?;
        collect_events(doc, source, &mut events)?;
    }
    Ok(events)
}

fn collect_events(doc: Value, source: &str, out: &mut Vec<Value>) -> Result<(), String> {
    match doc {
        Value::Array(items) => {
            for item in items {
                collect_events(item, source, out)?;
            }
        }
        Value::Object(mut o) => {
            if let Some(Value::Array(records)) = o.remove("Records") {
                out.extend(records);
            } else if let Some(Value::Array(events)) = o.remove("Events") {
                for e in events {
                    match e.get("CloudTrailEvent") {
                        Some(Value::String(s)) => {
                            out.push(serde_json::from_str(s).map_err(|err| {
                                format!("{source}: a CloudTrailEvent is not JSON: {err}")
                            })?)
                        }
                        Some(v @ Value::Object(_)) => out.push(v.clone()),
                        _ => {
                            return Err(format!(
                                "{source}: an event of lookup-events output has no CloudTrailEvent"
                            ))
                        }
                    }
                }
            } else if o.contains_key("eventSource") {
                out.push(Value::Object(o));
            } else {
                return Err(format!(
                    "{source}: neither CloudTrail log records ({{\"Records\":[...]}}) nor \
                     lookup-events output ({{\"Events\":[...]}})"
                ));
            }
        }
        _ => return Err(format!("{source}: not a CloudTrail document")),
    }
    Ok(())
}

fn str_at<'v>(v: &'v Value, path: &[&str]) -> Option<&'v str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

/// The key id at the end of a key ARN (`…:key/<id>`), or the value itself.
fn key_id_of(arn_or_id: &str) -> &str {
    arn_or_id
        .rsplit_once("key/")
        .map_or(arn_or_id, |(_, id)| id)
}

fn in_span(t: &str, from: Option<SystemTime>, to: Option<SystemTime>) -> bool {
    match parse_timestamp_any(t) {
        Some(t) => from.is_none_or(|f| t >= f) && to.is_none_or(|e| t <= e),
        None => false,
    }
}

/// The earliest and latest of some timestamps.
fn span<'a>(times: impl Iterator<Item = &'a str>) -> Option<(SystemTime, SystemTime)> {
    let mut lo: Option<SystemTime> = None;
    let mut hi: Option<SystemTime> = None;
    for t in times.filter_map(parse_timestamp_any) {
        lo = Some(lo.map_or(t, |l| l.min(t)));
        hi = Some(hi.map_or(t, |h| h.max(t)));
    }
    Some((lo?, hi?))
}

/// The trail's request records, read from the start each time it is called
/// (reconcile reads the trail twice and never holds it).
pub type ReadTrail<'a> = dyn FnMut(&mut dyn FnMut(RequestLine)) -> std::io::Result<()> + 'a;

/// Requests of the alarm list kept whole: beyond it they are counted
/// (`never_made_total`), so a flood of forged requests cannot exhaust the
/// memory of the command that reports them.
pub const MAX_LISTED: usize = 10_000;

/// Matches KMS's events with the trail's requests; see the module docs.
/// Memory: the events, the key ids, and at most [`MAX_LISTED`] alarm
/// entries, whatever the trail's size.
pub fn reconcile(
    events: &[(Value, String)],
    trail: &mut ReadTrail<'_>,
    opts: &Options,
) -> std::io::Result<Outcome> {
    // KMS's calls that reach a proxy, by request id: whether the trail
    // holds that id is found while reading it.
    struct Candidate<'e> {
        event: &'e Value,
        source: &'e str,
        request_id: &'e str,
        in_trail: bool,
    }
    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    let mut by_id: HashMap<&str, Vec<usize>> = HashMap::new();
    for (e, source) in events {
        if str_at(e, &["eventSource"]) != Some("kms.amazonaws.com")
            || !CALLS_PROXY.contains(&str_at(e, &["eventName"]).unwrap_or(""))
        {
            continue;
        }
        let Some(request_id) = str_at(e, &["requestID"]) else {
            continue;
        };
        by_id.entry(request_id).or_default().push(candidates.len());
        candidates.push(Candidate {
            event: e,
            source,
            request_id,
            in_trail: false,
        });
    }

    // First read: the trail's keys and span, and which events it holds.
    // Only authenticated requests can be KMS's.
    let mut key_ids: HashSet<String> = opts
        .key_arns
        .iter()
        .map(|a| key_id_of(a).to_string())
        .collect();
    let mut trail_span: Option<(SystemTime, SystemTime)> = None;
    trail(&mut |r| {
        if r.access_key_id.is_none() {
            return;
        }
        if let Some(k) = r.kms_key_arn.as_deref().map(key_id_of) {
            if !key_ids.contains(k) {
                key_ids.insert(k.to_string());
            }
        }
        if let Some(t) = parse_timestamp_any(&r.time) {
            trail_span = Some(trail_span.map_or((t, t), |(lo, hi)| (lo.min(t), hi.max(t))));
        }
        if let Some(found) = r.kms_request_id.as_deref().and_then(|id| by_id.get(id)) {
            for &i in found {
                candidates[i].in_trail = true;
            }
        }
    })?;

    let mut kms = Vec::new();
    for c in &candidates {
        let e = c.event;
        let store = str_at(e, &["additionalEventData", "customKeyStoreId"])
            .or_else(|| str_at(e, &["requestParameters", "customKeyStoreId"]));
        if !opts.key_store_ids.is_empty()
            && store.is_some_and(|s| !opts.key_store_ids.iter().any(|k| k == s))
        {
            continue;
        }
        let key = e
            .get("resources")
            .and_then(Value::as_array)
            .and_then(|rs| rs.iter().find_map(|r| str_at(r, &["ARN"])))
            .or_else(|| str_at(e, &["requestParameters", "keyId"]));
        let xks = str_at(e, &["additionalEventData", "customKeyStoreId"]).is_some()
            || str_at(e, &["additionalEventData", "xksKeyId"]).is_some()
            || store.is_some_and(|s| opts.key_store_ids.iter().any(|k| k == s))
            || key.is_some_and(|k| key_ids.contains(key_id_of(k)))
            || c.in_trail;
        if !xks {
            continue;
        }
        kms.push((
            KmsEvent {
                request_id: c.request_id.to_string(),
                event_name: str_at(e, &["eventName"]).unwrap_or("").to_string(),
                event_time: str_at(e, &["eventTime"]).unwrap_or("").to_string(),
                key: key.map(str::to_string),
                custom_key_store_id: store.map(str::to_string),
                error_code: str_at(e, &["errorCode"]).map(str::to_string),
                source: c.source.to_string(),
            },
            c.in_trail,
        ));
    }

    let shrink = |s: Option<(SystemTime, SystemTime)>| match s {
        Some((lo, hi)) => (
            Some(lo + opts.slack),
            Some(hi.checked_sub(opts.slack).unwrap_or(hi)),
        ),
        // Nothing on the other side: compare everything (all one-sided).
        None => (None, None),
    };
    let (req_from, req_to) = match (opts.from, opts.to) {
        (None, None) => shrink(span(kms.iter().map(|(e, _)| e.event_time.as_str()))),
        given => given,
    };
    let (ev_from, ev_to) = match (opts.from, opts.to) {
        (None, None) => shrink(trail_span),
        given => given,
    };

    let event_ids: HashSet<&str> = kms.iter().map(|(e, _)| e.request_id.as_str()).collect();
    let mut out = Outcome {
        events: kms.len(),
        ..Outcome::default()
    };
    // Second read: each key operation against KMS's events.
    let mut listed = BTreeSet::new();
    trail(&mut |r| {
        let key_op = r
            .operation
            .as_deref()
            .is_some_and(|o| KEY_OPERATIONS.contains(&o));
        if r.access_key_id.is_none() || !key_op {
            return;
        }
        out.requests += 1;
        if !in_span(&r.time, req_from, req_to) {
            return;
        }
        out.requests_compared += 1;
        match r.kms_request_id.as_deref() {
            Some(id) if event_ids.contains(id) => out.matched += 1,
            _ => {
                // A record given twice (the same file twice) is one.
                if listed.contains(&(r.instance.clone(), r.seq)) {
                    return;
                }
                out.never_made_total += 1;
                if out.never_made.len() < MAX_LISTED {
                    listed.insert((r.instance.clone(), r.seq));
                    out.never_made.push(Unmade {
                        time: r.time,
                        instance: r.instance,
                        seq: r.seq,
                        kms_request_id: r.kms_request_id,
                        operation: r.operation,
                        key_store: r.key_store,
                        key_id: r.key_id,
                        aws_principal_arn: r.aws_principal_arn,
                        access_key_id: r.access_key_id,
                        client_addr: r.client_addr,
                        status: r.status,
                    });
                }
            }
        }
    })?;
    for (e, in_trail) in kms {
        if !in_span(&e.event_time, ev_from, ev_to) {
            continue;
        }
        out.events_compared += 1;
        if !in_trail {
            out.never_reached.push(e);
        }
    }
    Ok(out)
}

impl Outcome {
    /// The outcome as text.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "KMS events of external-key-store keys: {} ({} compared)\n\
             key-operation requests of the trail: {} ({} compared), {} matched to their KMS event\n",
            self.events, self.events_compared, self.requests, self.requests_compared, self.matched
        );
        s.push_str(&format!(
            "made by KMS, never reached this proxy: {}\n",
            self.never_reached.len()
        ));
        // Every field below came from a file or a request someone else
        // wrote (the trail's request fields from whoever held the SigV4
        // credentials): shown escaped, so it cannot erase or forge lines of
        // this very list on the operator's terminal.
        let p = xks_spec::text::printable;
        let o = |v: &Option<String>, none: &str| p(v.as_deref().unwrap_or(none));
        for e in &self.never_reached {
            s.push_str(&format!(
                "  {}  {}  requestID {}  key {}{}\n",
                p(&e.event_time),
                p(&e.event_name),
                p(&e.request_id),
                o(&e.key, "-"),
                e.error_code
                    .as_deref()
                    .map(|c| format!("  errorCode {} (failed in KMS)", p(c)))
                    .unwrap_or_default()
            ));
        }
        if self.never_made.is_empty() {
            s.push_str("served by the proxy, never made by KMS: 0\n");
        } else {
            s.push_str(&format!(
                "ALARM: served by the proxy, never made by KMS: {} (someone else holds the \
                 key store's SigV4 credentials){}\n",
                self.never_made_total,
                if self.never_made_total > self.never_made.len() {
                    format!("; the first {} listed", self.never_made.len())
                } else {
                    String::new()
                }
            ));
            for r in &self.never_made {
                s.push_str(&format!(
                    "  {}  {} seq {}  {} {}/{}  kmsRequestId {}  principal {}  accessKeyId {}  client {}  status {}\n",
                    p(&r.time),
                    p(&r.instance),
                    r.seq,
                    o(&r.operation, "?"),
                    o(&r.key_store, "?"),
                    o(&r.key_id, "-"),
                    o(&r.kms_request_id, "(none)"),
                    o(&r.aws_principal_arn, "-"),
                    o(&r.access_key_id, "-"),
                    o(&r.client_addr, "-"),
                    r.status
                ));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(time: &str, id: &str, op: &str) -> RequestLine {
        RequestLine {
            kind: "request".into(),
            time: time.into(),
            instance: "i".into(),
            kms_request_id: Some(id.into()),
            operation: Some(op.into()),
            key_id: Some("k".into()),
            kms_key_arn: Some("arn:aws:kms:us-east-1:111122223333:key/abc".into()),
            access_key_id: Some("AKID".into()),
            status: 200,
            ..RequestLine::default()
        }
    }

    fn event(time: &str, id: &str, name: &str) -> Value {
        serde_json::json!({
            "eventSource": "kms.amazonaws.com", "eventName": name, "eventTime": time,
            "requestID": id,
            "resources": [{"ARN": "arn:aws:kms:us-east-1:111122223333:key/abc"}]
        })
    }

    fn from_memory(
        requests: &[RequestLine],
    ) -> impl FnMut(&mut dyn FnMut(RequestLine)) -> std::io::Result<()> + '_ {
        |each| {
            requests.iter().cloned().for_each(each);
            Ok(())
        }
    }

    #[test]
    fn the_alarm_list_is_bounded_and_the_count_is_not() {
        let requests: Vec<RequestLine> = (0..MAX_LISTED as u64 + 5)
            .map(|seq| RequestLine {
                seq,
                ..request("2026-01-01T00:10:00.000000Z", &format!("r{seq}"), "Decrypt")
            })
            .collect();
        let out = reconcile(&[], &mut from_memory(&requests), &Options::default()).unwrap();
        assert_eq!(out.never_made.len(), MAX_LISTED);
        assert_eq!(out.never_made_total, MAX_LISTED + 5);
        assert!(out.to_text().contains(&format!(
            "never made by KMS: {} (someone else holds the key store's SigV4 credentials); the \
             first {MAX_LISTED} listed",
            MAX_LISTED + 5
        )));
    }

    #[test]
    fn both_one_sided_sets_come_out() {
        let requests = vec![
            request("2026-01-01T00:10:00.000000Z", "a", "Encrypt"),
            request("2026-01-01T00:11:00.000000Z", "rogue", "Decrypt"),
            request("2026-01-01T00:12:00.000000Z", "h", "GetHealthStatus"),
        ];
        let events: Vec<(Value, String)> = [
            event("2026-01-01T00:10:00Z", "a", "GenerateDataKey"),
            event("2026-01-01T00:11:30Z", "lost", "Decrypt"),
            event("2026-01-01T00:11:40Z", "other", "ListKeys"),
            // After the trail's last record: not compared.
            event("2026-01-01T00:12:30Z", "late", "Encrypt"),
        ]
        .into_iter()
        .map(|e| (e, "f".to_string()))
        .collect();
        let opts = Options {
            slack: Duration::ZERO,
            ..Options::default()
        };
        let out = reconcile(&events, &mut from_memory(&requests), &opts).unwrap();
        assert_eq!(out.matched, 1);
        assert_eq!(out.never_made.len(), 1);
        assert_eq!(out.never_made[0].kms_request_id.as_deref(), Some("rogue"));
        assert_eq!(out.never_reached.len(), 1);
        assert_eq!(out.never_reached[0].request_id, "lost");
        assert_eq!((out.events, out.events_compared), (3, 2));
        assert!(out.to_text().contains("ALARM"));
    }

    #[test]
    fn lookup_events_output_is_read_too() {
        let text = r#"{"Events":[{"EventId":"x","CloudTrailEvent":"{\"eventSource\":\"kms.amazonaws.com\",\"requestID\":\"r\"}"}]}
{"Records":[{"eventSource":"kms.amazonaws.com","requestID":"s"}]}"#;
        let events = parse_cloudtrail(text, "t").unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["requestID"], "r");
        assert!(parse_cloudtrail("{\"foo\":1}", "t").is_err());
    }
}
