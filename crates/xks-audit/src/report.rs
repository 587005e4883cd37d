//! `xks-proxy audit report`: who used which key, how and through what.
//!
//! Per key (key store and external key id): the principals
//! (`awsPrincipalArn`), the AWS services (`kmsViaService`), the VPC
//! endpoints (`awsSourceVpce`) and the operations (XKS operation / KMS
//! operation) of its successful uses, each with a count and its first and
//! last use; and the refused requests by reason. It is the blast radius of
//! disabling the key (`keys disable --dry-run`).
//!
//! The report reads the records as they are; run `audit verify` first to
//! know they are the ones the proxy wrote.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The fields of a request record the report and reconciliation read.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestLine {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub time: String,
    pub kms_request_id: Option<String>,
    pub kms_operation: Option<String>,
    pub operation: Option<String>,
    pub key_store: Option<String>,
    pub key_id: Option<String>,
    pub aws_principal_arn: Option<String>,
    pub kms_key_arn: Option<String>,
    pub kms_via_service: Option<String>,
    pub aws_source_vpce: Option<String>,
    pub client_addr: Option<String>,
    pub access_key_id: Option<String>,
    pub decision: Option<String>,
    pub denied_by: Option<String>,
    #[serde(default)]
    pub status: u16,
    pub error_name: Option<String>,
}

impl RequestLine {
    /// Answered with success.
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Reads the request records of trail files (plain or compressed), calling
/// `each` for every one (other record types and lines that are not records
/// are skipped). One line in memory at a time.
pub fn read_requests(
    files: &[impl AsRef<Path>],
    mut each: impl FnMut(RequestLine),
) -> std::io::Result<()> {
    for f in files {
        let file = super::files::TrailFile::at(f.as_ref());
        let mut lines = file.lines()?;
        while let Some(line) = lines.next()? {
            // A last piece without its line break is a cut-off write, which
            // `verify` does not vouch for: neither do report and reconcile.
            if !line.complete {
                break;
            }
            if let Ok(r) = serde_json::from_slice::<RequestLine>(line.bytes) {
                if r.kind == "request" {
                    each(r);
                }
            }
        }
    }
    Ok(())
}

/// A count with its first and last time.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Uses {
    pub count: u64,
    pub first: String,
    pub last: String,
}

impl Uses {
    fn add(&mut self, time: &str) {
        self.count += 1;
        if self.first.is_empty() || time < self.first.as_str() {
            self.first = time.to_string();
        }
        if time > self.last.as_str() {
            self.last = time.to_string();
        }
    }
}

/// One key's blast radius.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyUse {
    pub key_store: String,
    pub key_id: String,
    /// Successful uses.
    pub uses: Uses,
    pub principals: BTreeMap<String, Uses>,
    /// `(none)` for requests without `kmsViaService`.
    pub via_services: BTreeMap<String, Uses>,
    /// `(none)` for requests not made through a VPC endpoint.
    pub vpc_endpoints: BTreeMap<String, Uses>,
    /// `Encrypt/GenerateDataKey`, …
    pub operations: BTreeMap<String, Uses>,
    /// Refused or failed requests, by the check that refused them or the
    /// error name.
    pub refused: BTreeMap<String, Uses>,
}

/// What to include.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Records at or after this time (`YYYY-MM-DDTHH:MM:SS.ffffffZ`; the
    /// format sorts as the times do).
    pub since: Option<String>,
    pub key: Option<String>,
}

/// Adds records up per key.
#[derive(Debug, Default)]
pub struct Report {
    keys: BTreeMap<(String, String), KeyUse>,
    filter: Filter,
}

const NONE: &str = "(none)";

impl Report {
    pub fn new(filter: Filter) -> Report {
        Report {
            keys: BTreeMap::new(),
            filter,
        }
    }

    pub fn add(&mut self, r: &RequestLine) {
        let Some(key_id) = r.key_id.as_deref() else {
            return;
        };
        if self.filter.key.as_deref().is_some_and(|k| k != key_id) {
            return;
        }
        if self
            .filter
            .since
            .as_deref()
            .is_some_and(|s| r.time.as_str() < s)
        {
            return;
        }
        let store = r.key_store.clone().unwrap_or_default();
        let k = self
            .keys
            .entry((store.clone(), key_id.to_string()))
            .or_insert_with(|| KeyUse {
                key_store: store,
                key_id: key_id.to_string(),
                ..KeyUse::default()
            });
        let t = r.time.as_str();
        if !r.succeeded() {
            let why = r
                .denied_by
                .clone()
                .or_else(|| r.error_name.clone())
                .unwrap_or_else(|| format!("status {}", r.status));
            k.refused.entry(why).or_default().add(t);
            return;
        }
        k.uses.add(t);
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| NONE.into());
        k.principals
            .entry(or_none(&r.aws_principal_arn))
            .or_default()
            .add(t);
        k.via_services
            .entry(or_none(&r.kms_via_service))
            .or_default()
            .add(t);
        k.vpc_endpoints
            .entry(or_none(&r.aws_source_vpce))
            .or_default()
            .add(t);
        let op = format!(
            "{}/{}",
            r.operation.as_deref().unwrap_or("?"),
            r.kms_operation.as_deref().unwrap_or("?")
        );
        k.operations.entry(op).or_default().add(t);
    }

    /// The keys, by key store and id.
    pub fn keys(&self) -> impl Iterator<Item = &KeyUse> {
        self.keys.values()
    }

    /// The report as text, one block per key.
    pub fn to_text(&self) -> String {
        let p = xks_spec::text::printable;
        let mut out = String::new();
        if self.keys.is_empty() {
            out.push_str("no request records for the selection\n");
        }
        for k in self.keys.values() {
            // Every name below came from a request (or a record on disk):
            // shown escaped, so that it cannot rewrite the report.
            out.push_str(&format!(
                "key {} (key store {}): {} use(s)",
                p(&k.key_id),
                p(&k.key_store),
                k.uses.count
            ));
            if k.uses.count > 0 {
                out.push_str(&format!(
                    ", first {}, last {}",
                    p(&k.uses.first),
                    p(&k.uses.last)
                ));
            }
            let refused: u64 = k.refused.values().map(|u| u.count).sum();
            if refused > 0 {
                out.push_str(&format!(", {refused} refused or failed"));
            }
            out.push('\n');
            for (title, map) in [
                ("principals", &k.principals),
                ("via services (kmsViaService)", &k.via_services),
                ("VPC endpoints (awsSourceVpce)", &k.vpc_endpoints),
                ("operations (XKS/KMS)", &k.operations),
                ("refused or failed, by reason", &k.refused),
            ] {
                if map.is_empty() {
                    continue;
                }
                out.push_str(&format!("  {title}:\n"));
                for (name, u) in map {
                    out.push_str(&format!(
                        "    {:<56} {:>8}  {}  {}\n",
                        p(name),
                        u.count,
                        p(&u.first),
                        p(&u.last)
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(json: &str) -> RequestLine {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_cut_off_last_line_is_not_counted() {
        // `verify` does not vouch for a piece after the last line break (a
        // cut-off write, or something appended without one): neither may
        // the report.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.jsonl");
        let rec = r#"{"type":"request","key_id":"k","status":200}"#;
        std::fs::write(&f, format!("{rec}\n{rec}")).unwrap();
        let mut n = 0;
        read_requests(&[&f], |_| n += 1).unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn compressed_files_are_read_as_written() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.jsonl.gz");
        let rec = r#"{"type":"request","key_id":"k","status":200}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        write!(gz, "{rec}\n{rec}\n").unwrap();
        let mut bytes = gz.finish().unwrap();
        // A second gzip member (what `audit retire` appends) is read on.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        writeln!(gz, "{rec}").unwrap();
        bytes.extend(gz.finish().unwrap());
        std::fs::write(&f, bytes).unwrap();
        let mut n = 0;
        read_requests(&[&f], |_| n += 1).unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn uses_are_counted_per_key_with_first_and_last() {
        let mut r = Report::new(Filter::default());
        for (time, principal, via, status) in [
            ("2026-01-02T00:00:00.000000Z", "arn:a", Some("ebs"), 200),
            ("2026-01-01T00:00:00.000000Z", "arn:a", None, 200),
            ("2026-01-03T00:00:00.000000Z", "arn:b", Some("ebs"), 200),
            ("2026-01-04T00:00:00.000000Z", "arn:c", None, 403),
        ] {
            let via = via.map_or("null".to_string(), |v| format!("\"{v}\""));
            r.add(&line(&format!(
                r#"{{"type":"request","time":"{time}","keyStore":"s","keyId":"k","awsPrincipalArn":"{principal}",
                "kmsViaService":{via},"operation":"Encrypt","kmsOperation":"GenerateDataKey","status":{status},
                "deniedBy":{}}}"#,
                if status == 200 { "null" } else { "\"authorization\"" }
            )));
        }
        let k = r.keys().next().unwrap();
        assert_eq!(k.uses.count, 3);
        assert_eq!(k.uses.first, "2026-01-01T00:00:00.000000Z");
        assert_eq!(k.uses.last, "2026-01-03T00:00:00.000000Z");
        assert_eq!(k.principals["arn:a"].count, 2);
        assert_eq!(k.via_services["ebs"].count, 2);
        assert_eq!(k.via_services[NONE].count, 1);
        assert_eq!(k.operations["Encrypt/GenerateDataKey"].count, 3);
        assert_eq!(k.refused["authorization"].count, 1);
        assert!(
            !k.principals.contains_key("arn:c"),
            "a refused request is not a use"
        );

        let mut since = Report::new(Filter {
            since: Some("2026-01-02T00:00:00.000000Z".into()),
            key: None,
        });
        since.add(&line(
            r#"{"type":"request","time":"2026-01-01T00:00:00.000000Z","keyId":"k","status":200}"#,
        ));
        assert_eq!(since.keys().count(), 0);
    }
}
