//! The RFC 3339 text of a UTC instant, exactly as chrono writes it for serde
//! (`SecondsFormat::AutoSi`, `Z`), without chrono's general formatting machinery. An event's
//! timestamps are written several times on the hot paths (the EVENTS payload, the STORED
//! message and its `ce-time`, each delivery), and chrono's `Display` path cost about 3 % of
//! the service's samples in a batch-ingest profile.
//!
//! Reads nothing, writes nothing. Guarantees: byte for byte chrono's output. Years 0 to 9999
//! are written here; any other instant, and a leap second, is handed to chrono.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::Serializer;

/// Longest text written here: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const MAX_LEN: usize = 30;

/// The text of `instant` in a buffer, with its length; `None` for what chrono must write.
fn format(instant: &DateTime<Utc>) -> Option<([u8; MAX_LEN], usize)> {
    let (year, nanos) = (instant.year(), instant.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return None;
    }
    let mut text = *b"0000-00-00T00:00:00.000000000Z";
    put(&mut text[0..4], year.unsigned_abs());
    put(&mut text[5..7], instant.month());
    put(&mut text[8..10], instant.day());
    put(&mut text[11..13], instant.hour());
    put(&mut text[14..16], instant.minute());
    put(&mut text[17..19], instant.second());
    // AutoSi: no fraction, or milli-, micro- or nanoseconds, whichever shows every digit.
    let digits = match nanos {
        0 => 0,
        _ if nanos % 1_000_000 == 0 => 3,
        _ if nanos % 1_000 == 0 => 6,
        _ => 9,
    };
    if digits == 0 {
        text[19] = b'Z';
        return Some((text, 20));
    }
    put(&mut text[20..20 + digits], nanos / 10u32.pow(9 - digits as u32));
    text[20 + digits] = b'Z';
    Some((text, 21 + digits))
}

/// Writes `value` as decimal digits filling `slot`, zero-padded on the left.
fn put(slot: &mut [u8], mut value: u32) {
    for digit in slot.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// The text, as `to_rfc3339_opts(SecondsFormat::AutoSi, true)` writes it.
pub fn to_string(instant: &DateTime<Utc>) -> String {
    match format(instant) {
        Some((text, len)) => text[..len].iter().map(|&byte| char::from(byte)).collect(),
        None => instant.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    }
}

/// For `#[serde(serialize_with = ...)]`: what chrono's `Serialize` writes, faster.
pub fn serialize<S: Serializer>(instant: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    match format(instant) {
        Some((text, len)) => match std::str::from_utf8(&text[..len]) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => serializer.collect_str(&instant.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        },
        None => serializer.collect_str(&instant.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, TimeZone};

    fn through_serde(instant: &DateTime<Utc>) -> String {
        let mut out = Vec::new();
        serialize(instant, &mut serde_json::Serializer::new(&mut out)).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn check(instant: DateTime<Utc>) {
        let chrono_serde = serde_json::to_string(&instant).unwrap();
        assert_eq!(through_serde(&instant), chrono_serde, "{instant:?}");
        assert_eq!(to_string(&instant), instant.to_rfc3339_opts(SecondsFormat::AutoSi, true), "{instant:?}");
        assert_eq!(format!("\"{}\"", to_string(&instant)), chrono_serde);
    }

    #[test]
    fn writes_what_chrono_writes_for_every_fraction() {
        let base = Utc.with_ymd_and_hms(2026, 12, 5, 7, 8, 9).unwrap();
        for nanos in [0, 1, 7, 999, 1_000, 120_000, 123_456_000, 5_000_000, 100_000_000, 999_999_999, 10, 10_500] {
            check(base + chrono::Duration::nanoseconds(nanos));
        }
    }

    #[test]
    fn writes_what_chrono_writes_across_the_calendar() {
        // A spread of instants: every field's width, padding and rollover.
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let seconds = (seed % 253_402_300_799) as i64; // 1970 .. 9999-12-31T23:59:59
            let nanos = match seed % 4 {
                0 => 0,
                1 => (seed >> 20) as u32 % 1_000 * 1_000_000,
                2 => (seed >> 20) as u32 % 1_000_000 * 1_000,
                _ => (seed >> 20) as u32 % 1_000_000_000,
            };
            check(Utc.timestamp_opt(seconds, nanos).unwrap());
        }
        check(Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap());
        check(Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap());
    }

    #[test]
    fn leaves_what_it_does_not_write_to_chrono() {
        check(Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap());
        check(Utc.with_ymd_and_hms(-1, 6, 1, 12, 0, 0).unwrap());
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31).unwrap().and_hms_nano_opt(23, 59, 59, 1_500_000_000).unwrap();
        check(Utc.from_utc_datetime(&leap));
    }
}
