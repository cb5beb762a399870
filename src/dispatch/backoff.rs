//! When the next attempt happens.
//!
//! The schedule (`retry.schedule_secs`) gives the delay before attempt 2, 3, …; its length is the
//! number of retries, after which a notification is dead. Each delay is spread by
//! ±`jitter_percent` so that a partner coming back is not hit by every retry at once. A receiver's
//! `Retry-After` (seconds or an HTTP date) replaces the scheduled delay, capped by
//! `retry.max_retry_after_secs`.

use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::config::RetryConfig;

/// Delay before the attempt after `attempt` (1-based), or `None` when no attempt is left.
pub fn next_delay(
    config: &RetryConfig,
    attempt: i64,
    retry_after: Option<Duration>,
    rng: &mut impl Rng,
) -> Option<Duration> {
    let index = usize::try_from(attempt.checked_sub(1)?).ok()?;
    let base = Duration::from_secs(*config.schedule_secs.get(index)?);
    if let Some(asked) = retry_after {
        let cap = Duration::from_secs(config.max_retry_after_secs);
        return Some(asked.clamp(Duration::from_secs(1), cap.max(Duration::from_secs(1))));
    }
    let jitter = f64::from(config.jitter_percent.min(100)) / 100.0;
    let factor = if jitter > 0.0 {
        rng.random_range(1.0 - jitter..=1.0 + jitter)
    } else {
        1.0
    };
    Some(base.mul_f64(factor))
}

/// Parses `Retry-After`: delay-seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn config(schedule: &[u64], jitter: u8) -> RetryConfig {
        RetryConfig {
            schedule_secs: schedule.to_vec(),
            jitter_percent: jitter,
            ..Default::default()
        }
    }

    #[test]
    fn schedule_without_jitter_is_followed_then_ends() {
        let c = config(&[5, 30], 0);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            next_delay(&c, 1, None, &mut rng),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            next_delay(&c, 2, None, &mut rng),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            next_delay(&c, 3, None, &mut rng),
            None,
            "no attempt after the schedule ends"
        );
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let c = config(&[100], 20);
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            let d = next_delay(&c, 1, None, &mut rng).expect("one retry scheduled");
            assert!(
                d >= Duration::from_secs(80) && d <= Duration::from_secs(120),
                "delay {d:?} should be within ±20% of 100 s"
            );
        }
    }

    #[test]
    fn retry_after_replaces_the_schedule_within_the_cap() {
        let mut c = config(&[5], 20);
        c.max_retry_after_secs = 600;
        let mut rng = StdRng::seed_from_u64(3);
        let asked = Some(Duration::from_secs(120));
        assert_eq!(
            next_delay(&c, 1, asked, &mut rng),
            Some(Duration::from_secs(120))
        );
        let huge = Some(Duration::from_secs(86_400));
        assert_eq!(
            next_delay(&c, 1, huge, &mut rng),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            next_delay(&c, 2, asked, &mut rng),
            None,
            "Retry-After adds no attempts"
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
