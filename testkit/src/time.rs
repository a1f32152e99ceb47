//! Times as the API carries them (`google.protobuf.Timestamp`) and as Quiver stores them
//! (microseconds since the Unix epoch, UTC).

use prost_types::Timestamp;

const MICROS_PER_SECOND: i64 = 1_000_000;

/// A timestamp from microseconds since the epoch (any `i64`, negative ones included; `nanos` is
/// always in `0..1_000_000_000`).
pub fn micros_to_timestamp(us: i64) -> Timestamp {
    Timestamp { seconds: us.div_euclid(MICROS_PER_SECOND), nanos: (us.rem_euclid(MICROS_PER_SECOND) * 1000) as i32 }
}

/// Microseconds since the epoch, exactly: `None` if the timestamp is out of `i64` microseconds
/// (computed wide, then converted checked: no overflow wraps), its `nanos` is outside
/// `0..1_000_000_000`, or it is not a whole microsecond.
pub fn timestamp_to_micros(t: &Timestamp) -> Option<i64> {
    if !(0..1_000_000_000).contains(&t.nanos) || t.nanos % 1000 != 0 {
        return None;
    }
    let us = i128::from(t.seconds) * i128::from(MICROS_PER_SECOND) + i128::from(t.nanos / 1000);
    i64::try_from(us).ok()
}

/// The wall clock in microseconds since the epoch.
pub fn now_us() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("the clock is before 1970");
    i64::try_from(d.as_micros()).expect("the clock is past the year 294,000")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for us in [0, 1, -1, 999_999, -1_000_000, 1_767_225_600_123_456, i64::MAX, i64::MIN] {
            let t = micros_to_timestamp(us);
            assert!((0..1_000_000_000).contains(&t.nanos), "{us}: {t:?}");
            assert_eq!(timestamp_to_micros(&t), Some(us), "{us}");
        }
        assert_eq!(micros_to_timestamp(-1), Timestamp { seconds: -1, nanos: 999_999_000 });
    }

    #[test]
    fn out_of_range_and_inexact_are_none() {
        assert_eq!(timestamp_to_micros(&Timestamp { seconds: i64::MAX, nanos: 0 }), None);
        assert_eq!(timestamp_to_micros(&Timestamp { seconds: i64::MIN, nanos: 0 }), None);
        assert_eq!(timestamp_to_micros(&Timestamp { seconds: i64::MAX / 1_000_000, nanos: 999_999_000 }), None);
        assert_eq!(timestamp_to_micros(&Timestamp { seconds: 1, nanos: 5 }), None);
        assert_eq!(timestamp_to_micros(&Timestamp { seconds: 1, nanos: -1000 }), None);
        assert_eq!(timestamp_to_micros(&Timestamp { seconds: 1, nanos: 1_000_000_000 }), None);
    }

    #[test]
    fn now_is_after_2025() {
        assert!(now_us() > 1_735_689_600_000_000);
    }
}
