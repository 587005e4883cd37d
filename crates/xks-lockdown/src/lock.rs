//! One lock: what `xks-proxy lockdown` writes into the token, and how it
//! reads back.
//!
//! A lock is a marker object (see `hsm::markers`) of the kind
//! [`APPLICATION`], labelled `xks-proxy-lockdown:<key store>` or
//! `xks-proxy-lockdown:*` for every key store, whose value is the lock as
//! JSON: its id, reason, who set it and when, and when it ends (`--for`).
//! The label decides what is locked: a value that cannot be read still
//! locks its key store (refusing is the safe reading of a kill switch).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use xks_hsm::Marker;
use xks_spec::time::{format_timestamp, parse_timestamp_any};

/// The marker kind (`CKA_APPLICATION`) of locks.
pub const APPLICATION: &[u8] = b"xks-proxy-lockdown";
/// Their label prefix; the rest is the scope.
pub const LABEL_PREFIX: &str = "xks-proxy-lockdown:";
/// The scope of a lock on every key store.
pub const ALL: &str = "*";
/// The longest reason kept.
pub const REASON_MAX: usize = 256;

/// One lockdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lock {
    /// Random, to tell one lock from the next on the same scope.
    pub id: String,
    /// A key store's name, or [`ALL`].
    pub scope: String,
    pub reason: String,
    /// When it was set (`YYYY-MM-DDTHH:MM:SSZ`).
    pub created: String,
    /// When it lifts itself, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// `user@host` of whoever set it.
    pub by: String,
}

/// The marker label of a scope.
pub fn label_for(scope: &str) -> String {
    format!("{LABEL_PREFIX}{scope}")
}

/// A reason as it is kept: printable, one line, bounded.
pub fn clean_reason(reason: &str) -> String {
    let mut s: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > REASON_MAX {
        let mut end = REASON_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s.trim().to_string()
}

impl Lock {
    /// A new lock on `scope`, set now by `by`, lasting `lasting` (or until
    /// it is lifted).
    pub fn new(scope: &str, reason: &str, lasting: Option<Duration>, by: &str) -> Lock {
        let now = SystemTime::now();
        let mut id = [0u8; 6];
        // The system RNG does not fail on Linux; a zero id is still unique
        // enough to tell locks apart by their creation time.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        Lock {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            scope: scope.to_string(),
            reason: clean_reason(reason),
            created: format_timestamp(now),
            until: lasting.map(|d| format_timestamp(now + d)),
            by: by.to_string(),
        }
    }

    /// The marker value.
    pub fn to_value(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The lock a marker holds; `None` when the label is not a lock's. The
    /// label wins over the value's scope; an unreadable value is a lock
    /// without end (see the module docs).
    pub fn from_marker(m: &Marker) -> Option<Lock> {
        let scope = m.label.strip_prefix(LABEL_PREFIX)?;
        if scope.is_empty() {
            return None;
        }
        Some(match serde_json::from_slice::<Lock>(&m.value) {
            Ok(mut l) => {
                l.scope = scope.to_string();
                l
            }
            Err(_) => Lock {
                id: "unreadable".into(),
                scope: scope.to_string(),
                reason: "(the lock marker's value cannot be read; it locks regardless)".into(),
                created: String::new(),
                until: None,
                by: String::new(),
            },
        })
    }

    /// When it lifts itself. An end that cannot be read is no end.
    pub fn until_time(&self) -> Option<SystemTime> {
        self.until.as_deref().and_then(parse_timestamp_any)
    }

    /// In force at `now`.
    pub fn active_at(&self, now: SystemTime) -> bool {
        self.until_time().is_none_or(|u| now < u)
    }

    /// This lock with `newer` (a second `lockdown` on the same scope)
    /// folded in: locks only get stronger. It stays the same lock (its id:
    /// instances see no lift and relock), lasts as long as the longer of
    /// the two (without end if either is), and keeps both reasons.
    pub fn strengthened_by(&self, newer: &Lock) -> Lock {
        let until = match (self.until_time(), newer.until_time()) {
            (None, _) | (_, None) => None,
            (Some(a), Some(b)) if a >= b => self.until.clone(),
            _ => newer.until.clone(),
        };
        let reason = if newer.reason.is_empty() || newer.reason == self.reason {
            self.reason.clone()
        } else {
            clean_reason(&format!(
                "{}; then by {}: {}",
                self.reason, newer.by, newer.reason
            ))
        };
        Lock {
            until,
            reason,
            ..self.clone()
        }
    }

    /// What a refused request is told (and the operator's CloudWatch logs
    /// show, through KMS).
    pub fn message(&self, key_store: &str) -> String {
        let mut m = format!(
            "key store '{key_store}' is locked down (lock {}{}",
            self.id,
            if self.scope == ALL {
                ", all key stores"
            } else {
                ""
            }
        );
        if !self.created.is_empty() {
            m.push_str(&format!(", since {}", self.created));
        }
        if let Some(u) = &self.until {
            m.push_str(&format!(", until {u}"));
        }
        m.push_str(&format!("): {}", self.reason));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_round_trips_through_its_marker() {
        let l = Lock::new(
            "payments",
            "stolen\ncredentials",
            Some(Duration::from_secs(60)),
            "ops@host",
        );
        assert_eq!(l.id.len(), 12);
        assert_eq!(l.reason, "stolen credentials");
        let m = Marker {
            label: label_for("payments"),
            value: l.to_value(),
        };
        assert_eq!(Lock::from_marker(&m), Some(l.clone()));
        assert!(l.active_at(SystemTime::now()));
        assert!(!l.active_at(SystemTime::now() + Duration::from_secs(120)));
        assert!(l.message("payments").contains("locked down"));
        // The label decides the scope; a broken value still locks.
        let broken = Marker {
            label: label_for(ALL),
            value: b"garbage".to_vec(),
        };
        let b = Lock::from_marker(&broken).unwrap();
        assert_eq!(b.scope, ALL);
        assert!(b.active_at(SystemTime::now() + Duration::from_secs(1 << 30)));
        assert!(Lock::from_marker(&Marker {
            label: "xks-proxy-disabled:k".into(),
            value: vec![]
        })
        .is_none());
        assert_eq!(clean_reason(&"é".repeat(300)).len(), 256);
    }

    #[test]
    fn a_second_lock_never_weakens_the_first() {
        let day = Duration::from_secs(86_400);
        let forever = Lock::new("s", "stolen credentials", None, "a@h");
        let ten_minutes = Lock::new("s", "maintenance", Some(Duration::from_secs(600)), "b@h");
        // An indefinite lock stays indefinite, and the same lock.
        let m = forever.strengthened_by(&ten_minutes);
        assert_eq!(
            (m.id.as_str(), m.until.as_deref()),
            (forever.id.as_str(), None)
        );
        assert!(m.reason.contains("stolen credentials") && m.reason.contains("maintenance"));
        // A short lock is lengthened by a longer one, and made indefinite by one without end.
        let a_day = Lock::new("s", "x", Some(day), "c@h");
        assert_eq!(ten_minutes.strengthened_by(&a_day).until, a_day.until);
        assert_eq!(a_day.strengthened_by(&ten_minutes).until, a_day.until);
        assert_eq!(a_day.strengthened_by(&forever).until, None);
    }
}
