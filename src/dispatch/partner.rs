//! Per-partner admission: in-flight caps, rate limits, FIFO and the circuit breaker.
//!
//! Each dispatcher process keeps this state in memory. Before claiming, the dispatcher asks which
//! partners must be left out (at their cap, rate-limited, breaker open); rows it claimed anyway
//! beyond a partner's room are released at once. This is what keeps a partner with a huge
//! backlog or a dead endpoint from starving the others: its rows stay `pending` in the database,
//! keeping their retry budget, while everyone else's flow.
//!
//! Breaker: `breaker_failure_threshold` consecutive failed attempts (transport error, timeout,
//! 5xx, 429, 408) open it; after `breaker_cooldown_ms` one probe attempt is let through; its
//! success closes the breaker, its failure opens it again. Times are passed in, so the logic is
//! tested without a clock.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::config::{Config, PartnerSettings};

/// Breaker state as reported to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// A circuit breaker over consecutive attempt failures.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: BreakerState,
    failures: u32,
    open_until_ms: i64,
    probe_in_flight: bool,
    threshold: u32,
    cooldown_ms: i64,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown_ms: u64) -> Self {
        Self {
            state: BreakerState::Closed,
            failures: 0,
            open_until_ms: 0,
            probe_in_flight: false,
            threshold: threshold.max(1),
            cooldown_ms: i64::try_from(cooldown_ms).unwrap_or(i64::MAX),
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// How many attempts may start now: unlimited when closed, one probe when half-open.
    pub fn room(&mut self, now_ms: i64) -> Option<usize> {
        if self.state == BreakerState::Open && now_ms >= self.open_until_ms {
            self.state = BreakerState::HalfOpen;
            self.probe_in_flight = false;
        }
        match self.state {
            BreakerState::Closed => None,
            BreakerState::Open => Some(0),
            BreakerState::HalfOpen => Some(usize::from(!self.probe_in_flight)),
        }
    }

    /// An attempt starts.
    pub fn on_start(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probe_in_flight = true;
        }
    }

    /// An attempt ended; `failed` says whether it counts as a partner failure.
    /// Returns true when the state changed.
    pub fn on_result(&mut self, failed: bool, now_ms: i64) -> bool {
        let before = self.state;
        if failed {
            self.failures = self.failures.saturating_add(1);
            if self.state == BreakerState::HalfOpen || self.failures >= self.threshold {
                self.state = BreakerState::Open;
                self.open_until_ms = now_ms.saturating_add(self.cooldown_ms);
            }
        } else {
            self.failures = 0;
            self.state = BreakerState::Closed;
        }
        self.probe_in_flight = false;
        before != self.state
    }
}

/// In-memory state of one partner in this process.
#[derive(Debug)]
struct PartnerState {
    settings: PartnerSettings,
    in_flight: usize,
    breaker: Breaker,
    tokens: f64,
    refilled_ms: i64,
}

impl PartnerState {
    fn new(settings: PartnerSettings, now_ms: i64) -> Self {
        let breaker = Breaker::new(
            settings.breaker_failure_threshold,
            settings.breaker_cooldown_ms,
        );
        let tokens = f64::from(settings.rate_limit_per_sec.max(1));
        Self {
            settings,
            in_flight: 0,
            breaker,
            tokens,
            refilled_ms: now_ms,
        }
    }

    /// How many more attempts may start now.
    fn room(&mut self, now_ms: i64) -> usize {
        let cap = if self.settings.fifo {
            1
        } else {
            self.settings.max_in_flight
        };
        let mut room = cap.saturating_sub(self.in_flight);
        if let Some(probe) = self.breaker.room(now_ms) {
            room = room.min(probe);
        }
        let rate = self.settings.rate_limit_per_sec;
        if rate > 0 {
            let elapsed_secs = (now_ms - self.refilled_ms).max(0) as f64 / 1000.0;
            self.tokens = (self.tokens + elapsed_secs * f64::from(rate)).min(f64::from(rate));
            self.refilled_ms = now_ms;
            room = room.min(self.tokens.floor() as usize);
        }
        room
    }

    fn start(&mut self) {
        self.in_flight += 1;
        self.breaker.on_start();
        if self.settings.rate_limit_per_sec > 0 {
            self.tokens -= 1.0;
        }
    }
}

/// What [`Partners::snapshot`] reports for one partner.
#[derive(Debug, Clone, Serialize)]
pub struct PartnerView {
    pub partner_id: String,
    pub in_flight: usize,
    pub breaker: BreakerState,
    pub settings: PartnerSettings,
}

/// All partners this process has seen.
pub struct Partners {
    config: Config,
    states: Mutex<HashMap<String, PartnerState>>,
}

impl Partners {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            states: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self, partner_id: &str) -> PartnerSettings {
        self.config.partner(partner_id)
    }

    fn with<T>(&self, partner_id: &str, now_ms: i64, f: impl FnOnce(&mut PartnerState) -> T) -> T {
        let mut states = self.states.lock().expect("partner states lock");
        let state = states
            .entry(partner_id.to_string())
            .or_insert_with(|| PartnerState::new(self.config.partner(partner_id), now_ms));
        f(state)
    }

    /// Partners that may not start an attempt now (to leave out of the claim). FIFO partners
    /// are always listed: they are claimed one head at a time by [`Partners::fifo_ready`].
    pub fn excluded(&self, now_ms: i64) -> Vec<String> {
        let mut states = self.states.lock().expect("partner states lock");
        let mut out: Vec<String> = states
            .iter_mut()
            .filter_map(|(id, s)| (s.settings.fifo || s.room(now_ms) == 0).then(|| id.clone()))
            .collect();
        for (id, o) in &self.config.partners {
            if o.fifo == Some(true) && !states.contains_key(id) {
                out.push(id.clone());
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Configured FIFO partners that have room for their next head now.
    pub fn fifo_ready(&self, now_ms: i64) -> Vec<String> {
        let fifo: Vec<&String> = self
            .config
            .partners
            .keys()
            .filter(|id| self.config.partner(id).fifo)
            .collect();
        fifo.into_iter()
            .filter(|id| self.with(id, now_ms, |s| s.room(now_ms) > 0))
            .cloned()
            .collect()
    }

    /// Takes a slot for an attempt; false when the partner has no room (release the row).
    pub fn try_start(&self, partner_id: &str, now_ms: i64) -> bool {
        self.with(partner_id, now_ms, |s| {
            let ok = s.room(now_ms) > 0;
            if ok {
                s.start();
            }
            ok
        })
    }

    /// An attempt ended. Returns the new breaker state when it changed.
    pub fn finish(&self, partner_id: &str, failed: bool, now_ms: i64) -> Option<BreakerState> {
        self.with(partner_id, now_ms, |s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.breaker
                .on_result(failed, now_ms)
                .then(|| s.breaker.state())
        })
    }

    /// What this process knows about one partner.
    pub fn view(&self, partner_id: &str, now_ms: i64) -> PartnerView {
        self.with(partner_id, now_ms, |s| {
            s.breaker.room(now_ms);
            PartnerView {
                partner_id: partner_id.to_string(),
                in_flight: s.in_flight,
                breaker: s.breaker.state(),
                settings: s.settings.clone(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_at_the_threshold_probes_after_cooldown_and_closes_on_success() {
        let mut b = Breaker::new(3, 1_000);
        for _ in 0..2 {
            b.on_result(true, 0);
        }
        assert_eq!(
            b.room(0),
            None,
            "two failures under a threshold of three keep it closed"
        );
        assert!(
            b.on_result(true, 100),
            "the third failure changes the state"
        );
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.room(500), Some(0), "an open breaker lets nothing through");
        assert_eq!(
            b.room(1_100),
            Some(1),
            "after the cool-down one probe may go"
        );
        b.on_start();
        assert_eq!(b.room(1_100), Some(0), "only one probe at a time");
        b.on_result(false, 1_200);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a successful probe closes it"
        );
        assert_eq!(b.room(1_200), None);
    }

    #[test]
    fn failed_probe_opens_the_breaker_again() {
        let mut b = Breaker::new(1, 1_000);
        b.on_result(true, 0);
        assert_eq!(b.room(1_000), Some(1), "probe allowed after the cool-down");
        b.on_start();
        b.on_result(true, 1_050);
        assert_eq!(b.state(), BreakerState::Open, "a failed probe re-opens");
        assert_eq!(b.room(1_500), Some(0), "and a new cool-down starts");
        assert_eq!(b.room(2_050), Some(1));
    }

    #[test]
    fn success_resets_the_consecutive_count() {
        let mut b = Breaker::new(3, 1_000);
        for _ in 0..10 {
            b.on_result(true, 0);
            b.on_result(true, 0);
            b.on_result(false, 0);
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "never three failures in a row"
        );
    }

    fn partners(toml: &str) -> Partners {
        let config: Config = toml::from_str(toml).expect("test config");
        Partners::new(config)
    }

    #[test]
    fn partner_at_its_cap_is_excluded_and_others_are_not() {
        let p = partners("[partners.big]\nmax_in_flight = 2\n");
        assert!(
            p.try_start("big", 0) && p.try_start("big", 0),
            "two slots for big"
        );
        assert!(
            !p.try_start("big", 0),
            "the third start is refused at the cap"
        );
        assert!(p.try_start("small", 0), "another partner is not affected");
        assert_eq!(
            p.excluded(0),
            vec!["big".to_string()],
            "only the saturated partner is left out"
        );
        p.finish("big", false, 1);
        assert!(
            p.excluded(1).is_empty(),
            "a finished attempt frees the slot"
        );
    }

    #[test]
    fn rate_limit_spaces_attempts() {
        let p = partners("[partners.slow]\nrate_limit_per_sec = 2\n");
        assert!(
            p.try_start("slow", 0) && p.try_start("slow", 0),
            "a burst of the rate is allowed"
        );
        p.finish("slow", false, 0);
        p.finish("slow", false, 0);
        assert!(!p.try_start("slow", 100), "no token 100 ms later");
        assert!(
            p.try_start("slow", 600),
            "a token is back after half a second"
        );
    }

    #[test]
    fn fifo_partner_runs_one_at_a_time() {
        let p = partners("[partners.ordered]\nfifo = true\n");
        assert_eq!(p.fifo_ready(0), vec!["ordered".to_string()]);
        assert!(p.try_start("ordered", 0));
        assert!(
            p.fifo_ready(0).is_empty(),
            "no second head while one is in flight"
        );
        assert!(
            p.excluded(0).contains(&"ordered".to_string()),
            "FIFO partners skip the bulk claim"
        );
    }
}
