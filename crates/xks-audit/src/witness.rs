//! The HSM's witness of a chain's newest seal.
//!
//! Seals prove that the records up to them were not changed, but not that
//! the files still *reach* them: someone who deletes the newest files (or
//! cuts the trail back to an earlier seal) while the proxy is stopped
//! leaves a trail that ends sealed, and the restarted proxy would go on
//! from what is left. So after every seal the writer also stores, in the
//! token (a marker object next to the lock markers, see
//! [`xks_hsm::markers`]), which seal is the newest: its `seq`, the
//! SHA-256 of its line and its time. Only someone who can use the HSM can
//! change that, and whoever can already forges seals.
//!
//! Two readers compare the files with it:
//!
//! - the **writer at startup**: when the files end before the witnessed
//!   seal (or hold another record there), it does not build on what is
//!   left. It goes on from the witnessed seal instead (`seq` after it,
//!   `prev` its hash) and says so in its `start` record
//!   (`filesEndedAt`, `witnessSeq`), so the gap stays in the chain for
//!   `verify` to name, and the witness itself never moves backwards;
//! - **`audit verify`**, which reads the witness *before* the files (a
//!   running writer stores it only after the seal is on disk, so the files
//!   read after it hold that seal) and calls a trail that ends before the
//!   witnessed seal, or holds another record in its place, tampered.

use std::collections::BTreeMap;

use super::record::{hex, unhex, Hash};
use xks_hsm::markers::Marker;

/// `CKA_APPLICATION` of witness markers.
pub const APPLICATION: &[u8] = b"xks-proxy-audit-head";

/// The newest seal of one instance's chain, as the token holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    pub instance: String,
    /// The seal record's `seq`.
    pub seq: u64,
    /// SHA-256 of the seal record's line.
    pub hash: Hash,
    /// The seal record's `time`.
    pub time: String,
}

impl Witness {
    /// The marker's label: one per instance.
    pub fn label(instance: &str) -> String {
        format!("xks-proxy-audit-head:{instance}")
    }

    /// The marker's value.
    pub fn value(&self) -> Vec<u8> {
        format!(
            "v1 seq={} hash={} time={}",
            self.seq,
            hex(&self.hash),
            self.time
        )
        .into_bytes()
    }

    /// A witness from a marker's label and value; `None` for anything that
    /// is not one (a marker written by a later version, say).
    pub fn parse(label: &str, value: &[u8]) -> Option<Witness> {
        let instance = label.strip_prefix("xks-proxy-audit-head:")?;
        let text = std::str::from_utf8(value).ok()?;
        let mut parts = text.split(' ');
        if parts.next()? != "v1" {
            return None;
        }
        let seq = parts.next()?.strip_prefix("seq=")?.parse().ok()?;
        let hash = unhex(parts.next()?.strip_prefix("hash=")?)?
            .try_into()
            .ok()?;
        let time = parts.next()?.strip_prefix("time=")?.to_string();
        if parts.next().is_some() || instance.is_empty() {
            return None;
        }
        Some(Witness {
            instance: instance.to_string(),
            seq,
            hash,
            time,
        })
    }

    /// Of several copies per instance (one per key manager; one that was
    /// down for a while holds an older one), each instance's newest.
    pub fn newest_per_instance(
        copies: impl IntoIterator<Item = Witness>,
    ) -> BTreeMap<String, Witness> {
        let mut out: BTreeMap<String, Witness> = BTreeMap::new();
        for w in copies {
            if out.get(&w.instance).is_none_or(|o| o.seq < w.seq) {
                out.insert(w.instance.clone(), w);
            }
        }
        out
    }

    /// Each instance's newest witness among what the key managers answered
    /// (their markers, or why they could not be read); every error when
    /// none answered. The one reading of witnesses, for the writer at start
    /// and for `verify`.
    pub fn newest_among<E>(
        answers: impl IntoIterator<Item = Result<Vec<Marker>, E>>,
    ) -> Result<BTreeMap<String, Witness>, Vec<E>> {
        let mut copies = Vec::new();
        let mut errors = Vec::new();
        let mut answered = false;
        for a in answers {
            match a {
                Ok(markers) => {
                    answered = true;
                    copies.extend(
                        markers
                            .iter()
                            .filter_map(|m| Witness::parse(&m.label, &m.value)),
                    );
                }
                Err(e) => errors.push(e),
            }
        }
        if answered {
            Ok(Witness::newest_per_instance(copies))
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_witness_round_trips_through_its_marker() {
        let w = Witness {
            instance: "proxy-a-443".into(),
            seq: 4711,
            hash: [7; 32],
            time: "2026-12-04T01:02:03.000004Z".into(),
        };
        let label = Witness::label(&w.instance);
        assert_eq!(Witness::parse(&label, &w.value()), Some(w.clone()));
        assert_eq!(Witness::parse("xks-proxy-lockdown:*", &w.value()), None);
        assert_eq!(Witness::parse(&label, b"v2 seq=1"), None);
        assert_eq!(Witness::parse(&label, b"v1 seq=x hash=00 time=t"), None);
        let older = Witness {
            seq: 12,
            ..w.clone()
        };
        let other = Witness {
            instance: "proxy-b-443".into(),
            ..older.clone()
        };
        let newest = Witness::newest_per_instance([older, w.clone(), other.clone()]);
        assert_eq!(newest.get("proxy-a-443"), Some(&w));
        assert_eq!(newest.get("proxy-b-443"), Some(&other));
    }
}
