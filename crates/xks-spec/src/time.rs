//! UTC calendar arithmetic for the two places the proxy meets dates: SigV4's
//! `X-Amz-Date` (`YYYYMMDD'T'HHMMSS'Z'`) and PKCS#11's `CK_DATE` (`YYYYMMDD`,
//! used for a key's start and end dates).
//!
//! Howard Hinnant's days-from-civil algorithms are exact for the proleptic
//! Gregorian calendar and avoid a date-time dependency for two conversions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Days since 1970-01-01 for a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date for days since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn digits(s: &[u8]) -> Option<u32> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u32, |acc, b| acc * 10 + (b - b'0') as u32))
}

/// Parses a SigV4 timestamp such as `20221011T063223Z`.
pub fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let (y, mo, d) = (digits(&b[0..4])?, digits(&b[4..6])?, digits(&b[6..8])?);
    let (h, mi, se) = (digits(&b[9..11])?, digits(&b[11..13])?, digits(&b[13..15])?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let days = days_from_civil(y as i64, mo, d);
    // Reject dates like Feb 31 that the arithmetic would silently roll over.
    if civil_from_days(days) != (y as i64, mo, d) || days < 0 {
        return None;
    }
    let secs = days as u64 * 86_400 + h as u64 * 3600 + mi as u64 * 60 + se as u64;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Formats a time as a SigV4 timestamp (`YYYYMMDD'T'HHMMSS'Z'`).
pub fn format_amz_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// The UTC date of `t` as `YYYYMMDD` ASCII digits (the layout of `CK_DATE`).
pub fn yyyymmdd(t: SystemTime) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&format_amz_date(t).as_bytes()[..8]);
    out
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (UTC, RFC 3339 without fractions).
pub fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let compact: String = s.chars().filter(|c| *c != '-' && *c != ':').collect();
    parse_amz_date(&compact)
}

/// Formats a time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_timestamp(t: SystemTime) -> String {
    let a = format_amz_date(t);
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        &a[0..4],
        &a[4..6],
        &a[6..8],
        &a[9..11],
        &a[11..13],
        &a[13..15]
    )
}

/// Formats a time as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC, microseconds).
/// Every such string has the same length, so they sort as the times do.
pub fn format_timestamp_micros(t: SystemTime) -> String {
    let micros = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_micros())
        .unwrap_or(0);
    let whole = format_timestamp(t);
    format!("{}.{micros:06}Z", &whole[..19])
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` or the same with a fraction of a second
/// (`…SS.ffffffZ`, any number of digits); the fraction is kept to the
/// microsecond.
pub fn parse_timestamp_any(s: &str) -> Option<SystemTime> {
    if s.len() == 20 {
        return parse_timestamp(s);
    }
    let (whole, rest) = (s.get(..19)?, s.get(19..)?);
    let fraction = rest.strip_prefix('.')?.strip_suffix('Z')?;
    if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let t = parse_timestamp(&format!("{whole}Z"))?;
    let micros: String = fraction
        .chars()
        .chain(std::iter::repeat('0'))
        .take(6)
        .collect();
    Some(t + Duration::from_micros(micros.parse().ok()?))
}

/// Parses a span such as `90s`, `15m`, `12h`, `30d` or `2w`.
pub fn parse_span(s: &str) -> Option<Duration> {
    let s = s.trim();
    let unit = s.chars().last()?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().ok()?;
    let secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        _ => return None,
    };
    n.checked_mul(secs).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in [
            "19700101T000000Z",
            "20221011T063223Z",
            "20000229T235959Z",
            "20991231T120000Z",
        ] {
            let t = parse_amz_date(s).unwrap();
            assert_eq!(format_amz_date(t), s);
        }
        let t = parse_amz_date("20221011T063223Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_665_469_943
        );
        assert_eq!(&yyyymmdd(t), b"20221011");
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            "20221011T063223",
            "2022-10-11T06:32:23Z",
            "20221311T063223Z",
            "20230229T000000Z",
            "20221011T243223Z",
            "2022101xT063223Z",
            "20221011 063223Z",
        ] {
            assert!(parse_amz_date(s).is_none(), "{s}");
        }
    }
    #[test]
    fn timestamps() {
        let t = parse_timestamp("2026-11-23T08:09:16Z").unwrap();
        assert_eq!(format_timestamp(t), "2026-11-23T08:09:16Z");
        assert!(parse_timestamp("2026-11-23 08:09:16Z").is_none());
        assert!(parse_timestamp("20261123T080916Z").is_none());
    }

    #[test]
    fn micro_timestamps_and_spans() {
        let t = parse_timestamp("2026-11-23T08:09:16Z").unwrap() + Duration::from_micros(42);
        let s = format_timestamp_micros(t);
        assert_eq!(s, "2026-11-23T08:09:16.000042Z");
        assert_eq!(parse_timestamp_any(&s), Some(t));
        assert_eq!(
            parse_timestamp_any("2026-11-23T08:09:16.5Z"),
            Some(t - Duration::from_micros(42) + Duration::from_millis(500))
        );
        assert_eq!(
            parse_timestamp_any("2026-11-23T08:09:16Z"),
            Some(t - Duration::from_micros(42))
        );
        assert!(parse_timestamp_any("2026-11-23T08:09:16.Z").is_none());
        assert_eq!(parse_span("30d"), Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_span("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_span("2w"), Some(Duration::from_secs(14 * 86_400)));
        for bad in ["", "d", "3x", "-1d", "1.5h"] {
            assert!(parse_span(bad).is_none(), "{bad}");
        }
    }
}
