//! Deadlines that cannot overflow.
//!
//! `Instant + Duration` panics when the sum does not fit, and with `panic = "abort"` a panic in
//! the master is an outage: its workers die with it. Config values are bounded at validation,
//! but every deadline is computed here anyway, so that no value — from the config, the command
//! line, a hand-over state or a bug — can reach that panic: a sum that does not fit saturates
//! to a point so far ahead (about a century) that it never comes.

use std::time::{Duration, Instant, SystemTime};

/// The farthest deadline zdd sets: "never" for any practical purpose.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + d`, saturating at `now + FAR` (and at `now` itself in the impossible case that even
/// that does not fit).
pub fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(FAR))
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

/// A deadline `d` from now.
pub fn from_now(d: Duration) -> Instant {
    after(Instant::now(), d)
}

/// `UNIX_EPOCH + ms`, saturating at the epoch for a value that does not fit.
pub fn wall_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Milliseconds as a u64, saturating.
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_saturate_instead_of_panicking() {
        let now = Instant::now();
        let huge = Duration::from_secs(u64::MAX);
        let t = after(now, huge);
        assert!(t > now + Duration::from_secs(50 * 365 * 24 * 3600));
        assert_eq!(after(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        assert_eq!(after(now, Duration::ZERO), now);
        assert_eq!(ms(huge), u64::MAX);
        assert_eq!(
            wall_ms(u64::MAX),
            SystemTime::UNIX_EPOCH + Duration::from_millis(u64::MAX)
        );
    }
}
