//! The dispatcher: claims due notifications, delivers them, and writes the outcomes.
//!
//! Any number of dispatchers may run against one database: claims are leases (see
//! [`crate::store`]), so a crashed dispatcher costs at most one repeated POST per notification it
//! held, after its lease expires and the reaper returns the row. Outcomes are written by one
//! finisher task in batches, never inside the claim transaction and never across a POST.
//!
//! A claim can return more rows of a partner than it has room for (its in-flight cap, rate
//! limit or breaker probe). Those rows stay leased here, in claim order, and start as the
//! partner's slots free up; rows that waited longer than [`Dispatcher::max_wait_ms`] go back to
//! the database for any dispatcher. Giving every surplus row back at once cost two extra row
//! updates and a re-read of its body per notification for a partner at its cap.

pub mod backoff;
pub mod deliver;
pub mod partner;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

pub use deliver::{AttemptResult, Delivery, REQUEST_ID, Verdict, WEBHOOK_ID};
pub use partner::{BreakerState, Partners};

use crate::config::{DispatchConfig, RetentionConfig, RetryConfig};
use crate::metrics::Metrics;
use crate::model::now_ms;
use crate::store::{AttemptRecord, Claimed, Finish, Outcome, Store};

/// Most outcomes written in one transaction.
const FINISH_BATCH_MAX: usize = 500;

/// A dispatcher and its settings.
pub struct Dispatcher {
    pub store: Store,
    pub delivery: Delivery,
    pub config: DispatchConfig,
    pub retry: RetryConfig,
    pub retention: RetentionConfig,
    /// Per-partner caps, rate limits, FIFO and breakers.
    pub partners: Arc<Partners>,
    /// Nudged by an in-process intake when new rows arrive, to skip the idle poll.
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// Longest a claimed row may wait here for its partner's room before it is released; see
    /// [`crate::config::Config::claim_wait_limit_ms`].
    pub max_wait_ms: i64,
}

/// Backs off claims that leave partners out and find nothing. Such a claim still walks the
/// left-out partners' due rows in the index (a partner at its cap with a backlog of 100,000
/// rows), so repeating it after every written batch of outcomes kept the database busy for
/// nothing. After an empty one the next waits the poll interval, doubling up to one second;
/// new rows from the intake, or a claim that found rows, end the pause.
struct ExcludingClaims {
    poll_ms: i64,
    pause_ms: i64,
    until_ms: i64,
    /// The partners left out by the claim that found nothing (sorted).
    excluded: Vec<String>,
}

impl ExcludingClaims {
    const MAX_PAUSE_MS: i64 = 1_000;

    fn new(poll_interval_ms: u64) -> Self {
        Self {
            poll_ms: i64::try_from(poll_interval_ms).unwrap_or(Self::MAX_PAUSE_MS),
            pause_ms: 0,
            until_ms: 0,
            excluded: Vec::new(),
        }
    }

    /// Whether a claim leaving out `exclude` (sorted) should wait: only while paused and while
    /// every partner left out by the empty claim is still left out. A partner that got room
    /// back may have due rows, so its return ends the pause.
    fn skip(&self, now_ms: i64, exclude: &[String]) -> bool {
        now_ms < self.until_ms
            && self
                .excluded
                .iter()
                .all(|p| exclude.binary_search(p).is_ok())
    }

    fn record(&mut self, found_nothing: bool, now_ms: i64, exclude: &[String]) {
        if !found_nothing {
            self.reset();
            return;
        }
        self.pause_ms =
            (self.pause_ms * 2).clamp(self.poll_ms.min(Self::MAX_PAUSE_MS), Self::MAX_PAUSE_MS);
        self.until_ms = now_ms + self.pause_ms;
        self.excluded = exclude.to_vec();
    }

    fn reset(&mut self) {
        self.pause_ms = 0;
        self.until_ms = 0;
        self.excluded.clear();
    }
}

/// What the attempt tasks, the finisher and the reaper share about outcomes.
#[derive(Default)]
struct Outcomes {
    /// Nudged by the finisher after each written batch.
    written: Notify,
    /// Set while the finisher holds outcomes it could not write; the reaper waits meanwhile.
    unwritten: std::sync::atomic::AtomicBool,
    /// Outcomes handed to the finisher so far (counted before the send).
    sent: std::sync::atomic::AtomicU64,
}

/// A row claimed beyond its partner's room, leased to this process until a slot frees.
struct Waiting {
    claimed: Claimed,
    since_ms: i64,
}

/// Claims held by this process: released on shutdown if their attempt did not finish.
type Held = Arc<Mutex<HashMap<String, String>>>;

impl Dispatcher {
    /// Runs until `shutdown`, then drains in-flight attempts for `drain_timeout_ms` and releases
    /// whatever is still held.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (finish_tx, finish_rx) = mpsc::channel::<Finish>(4 * FINISH_BATCH_MAX);
        let outcomes = Arc::new(Outcomes::default());
        let finisher = tokio::spawn(run_finisher(
            self.store.clone(),
            self.metrics.clone(),
            finish_rx,
            outcomes.clone(),
            shutdown.clone(),
        ));
        let reaper = tokio::spawn(run_reaper(
            self.store.clone(),
            self.metrics.clone(),
            self.config.clone(),
            self.retention.clone(),
            outcomes.clone(),
            shutdown.clone(),
        ));
        let held: Held = Arc::default();
        let mut tasks = JoinSet::new();
        let permits = Arc::new(Semaphore::new(self.config.max_in_flight));
        let this = Arc::new(self);
        info!(
            max_in_flight = this.config.max_in_flight,
            "dispatcher started"
        );

        let mut waiting: VecDeque<Waiting> = VecDeque::new();
        // While rows wait for a partner's slot, a finished attempt wakes the loop to start the
        // next one at once; a fresh claim then waits for new rows, a written batch of outcomes
        // or the poll interval, so freed slots do not turn into a stream of empty claims.
        let slot_freed = Arc::new(Notify::new());
        let mut claim_fresh = true;
        let mut skipping = ExcludingClaims::new(this.config.poll_interval_ms);
        while !shutdown.is_cancelled() {
            while tasks.try_join_next().is_some() {}
            let first = tokio::select! {
                permit = permits.clone().acquire_owned() => permit?,
                () = shutdown.cancelled() => break,
            };
            let want = (permits.available_permits() + 1).min(this.config.claim_batch);
            let ready = match this
                .next_batch(want, &mut waiting, claim_fresh, &mut skipping)
                .await
            {
                Ok(ready) => ready,
                Err(e) if crate::store::is_transient(&e) => {
                    debug!(error = %e, "claim lost a lock race; retrying");
                    drop(first);
                    sleep_or_cancel(Duration::from_millis(20), &shutdown).await;
                    continue;
                }
                Err(e) => {
                    this.metrics.database_error("claim");
                    error!(error = %e, "claiming due notifications failed; retrying in 1 s");
                    drop(first);
                    sleep_or_cancel(Duration::from_secs(1), &shutdown).await;
                    continue;
                }
            };
            let got = ready.len();
            let mut first = Some(first);
            for c in ready {
                let permit = match first.take() {
                    Some(p) => p,
                    None => permits.clone().acquire_owned().await?,
                };
                held.lock()
                    .expect("held claims lock")
                    .insert(c.id.clone(), c.claim_token.clone());
                let (this, tx, held) = (this.clone(), finish_tx.clone(), held.clone());
                let (slot_freed, outcomes) = (slot_freed.clone(), outcomes.clone());
                tasks.spawn(async move {
                    let id = c.id.clone();
                    let finish = this.attempt(c).await;
                    // Heeded only while rows wait (see the select below).
                    slot_freed.notify_one();
                    outcomes
                        .sent
                        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    if tx.send(finish).await.is_err() {
                        warn!(notification_id = %id, "finisher gone; the lease will be reaped");
                    }
                    held.lock().expect("held claims lock").remove(&id);
                    drop(permit);
                });
            }
            claim_fresh = true;
            if got < want {
                let idle = Duration::from_millis(this.config.poll_interval_ms);
                tokio::select! {
                    () = tokio::time::sleep(idle) => {}
                    () = this.wake.notified() => skipping.reset(),
                    () = outcomes.written.notified() => {}
                    () = slot_freed.notified(), if !waiting.is_empty() => claim_fresh = false,
                    () = shutdown.cancelled() => {}
                }
            }
        }
        // Rows that were waiting for a slot go back first, so other dispatchers can take them
        // while this one drains; if that fails they are released with what the drain leaves.
        let waited: Vec<(String, String)> = waiting
            .into_iter()
            .map(|w| (w.claimed.id, w.claimed.claim_token))
            .collect();
        if !waited.is_empty()
            && let Err(e) = this.store.release(&waited, now_ms()).await
        {
            debug!(error = %e, "could not release waiting rows yet; retrying after the drain");
            held.lock().expect("held claims lock").extend(waited);
        }
        this.drain(tasks, &held).await;
        drop(finish_tx);
        finisher.await?;
        reaper.await?;
        info!("dispatcher stopped");
        Ok(())
    }

    /// Up to `want` rows to attempt now, each holding a slot of its partner: first rows waiting
    /// here for their partner's room (oldest first), then, when `claim_fresh` or nothing waits,
    /// fresh claims. Fresh rows beyond their partner's room join `waiting`; rows that waited
    /// past the limit are released.
    async fn next_batch(
        &self,
        want: usize,
        waiting: &mut VecDeque<Waiting>,
        claim_fresh: bool,
        skipping: &mut ExcludingClaims,
    ) -> anyhow::Result<Vec<Claimed>> {
        let now = now_ms();
        let mut ready = Vec::new();
        let mut expired = Vec::new();
        for w in std::mem::take(waiting) {
            if now - w.since_ms > self.max_wait_ms {
                expired.push((w.claimed.id, w.claimed.claim_token));
            } else if ready.len() < want && self.partners.try_start(&w.claimed.partner_id, now) {
                ready.push(w.claimed);
            } else {
                waiting.push_back(w);
            }
        }
        if !expired.is_empty()
            && let Err(e) = self.store.release(&expired, now).await
        {
            self.metrics.database_error("release");
            warn!(error = %e, rows = expired.len(), "could not release rows that waited for \
                  their partner's room; their leases will expire");
        }
        if ready.len() >= want || !(claim_fresh || waiting.is_empty()) {
            return Ok(ready);
        }
        // Rows already holding partner slots must be attempted even if the claim fails.
        let fresh = match self.claim(want - ready.len(), now, skipping).await {
            Ok(fresh) => fresh,
            Err(e) if ready.is_empty() => return Err(e),
            Err(e) => {
                debug!(error = %e, "claim failed; attempting the rows already held");
                Vec::new()
            }
        };
        for c in fresh {
            if self.partners.try_start(&c.partner_id, now) {
                ready.push(c);
            } else {
                waiting.push_back(Waiting {
                    claimed: c,
                    since_ms: now,
                });
            }
        }
        Ok(ready)
    }

    /// Claims up to `want` due rows of partners with room now, plus due FIFO heads. A claim that
    /// leaves partners out and finds nothing is not repeated for a while (see
    /// [`ExcludingClaims`]).
    async fn claim(
        &self,
        want: usize,
        now: i64,
        skipping: &mut ExcludingClaims,
    ) -> anyhow::Result<Vec<Claimed>> {
        let lease_ms = i64::try_from(self.config.lease_secs * 1000)?;
        let exclude = self.partners.excluded(now);
        let mut claimed = Vec::new();
        if exclude.is_empty() || !skipping.skip(now, &exclude) {
            claimed = self.store.claim(now, want, lease_ms, &exclude).await?;
            if !exclude.is_empty() {
                skipping.record(claimed.is_empty(), now, &exclude);
            }
        }
        // A head that cannot be claimed now is tried on the next round; the rows claimed above
        // are leased already and must not be dropped with an error.
        for partner in self.partners.fifo_ready(now) {
            match self.store.claim_fifo_head(&partner, now, lease_ms).await {
                Ok(Some(head)) => claimed.push(head),
                Ok(None) => {}
                Err(e) => debug!(partner_id = %partner, error = %e, "FIFO head not claimed now"),
            }
        }
        Ok(claimed)
    }

    /// One attempt for a claimed notification, turned into the write that records it.
    async fn attempt(&self, claimed: Claimed) -> Finish {
        let number = claimed.attempts + 1;
        let settings = self.partners.settings(&claimed.partner_id);
        let timeout = (settings.request_timeout_ms > 0)
            .then(|| Duration::from_millis(settings.request_timeout_ms));
        let span = info_span!(
            "attempt",
            partner_id = %claimed.partner_id,
            request_id = %claimed.request_id,
            notification_id = %claimed.id,
            attempt = number,
        );
        let result = self
            .delivery
            .attempt(&claimed, timeout)
            .instrument(span.clone())
            .await;
        let now = now_ms();
        self.note_breaker(&claimed.partner_id, result.partner_unhealthy(), now)
            .await;
        let mut retry = self.retry.clone();
        if !settings.retry_schedule_secs.is_empty() {
            retry.schedule_secs = settings.retry_schedule_secs;
        }
        let outcome = outcome(&retry, &result.verdict, number - claimed.retry_base, now);
        span.in_scope(|| match &outcome {
            Outcome::Delivered => debug!(status = ?result.record.status_code, "delivered"),
            Outcome::Retry { next_attempt_at_ms } => debug!(
                error = ?result.record.error,
                retry_in_ms = next_attempt_at_ms - now,
                "attempt failed; retry scheduled"
            ),
            Outcome::Dead => warn!(error = ?result.record.error, "notification is dead"),
        });
        self.record(&claimed, &outcome, &result.record, now);
        Finish {
            id: claimed.id,
            claim_token: claimed.claim_token,
            number,
            outcome,
            attempt: result.record,
            finished_at_ms: now,
        }
    }

    /// Counts the attempt in the metrics.
    fn record(&self, claimed: &Claimed, outcome: &Outcome, attempt: &AttemptRecord, now: i64) {
        let label = match outcome {
            Outcome::Delivered => "delivered",
            Outcome::Retry { .. } => "retry",
            Outcome::Dead => "dead",
        };
        let metrics = &self.metrics;
        metrics.attempt_finished(label, millis_to_secs(attempt.duration_ms));
        match (outcome, attempt.error_class.as_deref()) {
            (Outcome::Delivered, _) => {
                metrics.delivered(millis_to_secs(now - claimed.created_at_ms))
            }
            (_, class) => metrics.partner_failure(&claimed.partner_id, class.unwrap_or("unknown")),
        }
    }

    /// Frees the partner's slot and records a breaker change.
    async fn note_breaker(&self, partner_id: &str, failed: bool, now: i64) {
        let Some(state) = self.partners.finish(partner_id, failed, now) else {
            return;
        };
        let name = match state {
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Closed => "closed",
        };
        match state {
            BreakerState::Open => warn!(partner_id, "circuit breaker opened; deliveries paused"),
            _ => info!(partner_id, breaker = name, "circuit breaker changed"),
        }
        self.metrics.breaker_changed(partner_id, name);
        if let Err(e) = self.store.record_breaker(partner_id, name, now).await {
            self.metrics.database_error("breaker");
            warn!(partner_id, error = %e, "could not record the breaker state");
        }
    }

    /// Waits for in-flight attempts up to the drain deadline, then releases what is left
    /// (including rows that were waiting for their partner's room).
    async fn drain(&self, mut tasks: JoinSet<()>, held: &Held) {
        let deadline = Duration::from_millis(self.config.drain_timeout_ms);
        info!(in_flight = tasks.len(), "dispatcher draining");
        let drained = tokio::time::timeout(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        // What is left: attempts cut off by the deadline and rows that waited for a slot.
        let claims: Vec<(String, String)> =
            held.lock().expect("held claims lock").drain().collect();
        if claims.is_empty() {
            return;
        }
        match self.store.release(&claims, now_ms()).await {
            Ok(n) => info!(released = n, "released unfinished claims"),
            Err(e) => {
                self.metrics.database_error("release");
                warn!(error = %e, "could not release claims; their leases will expire");
            }
        }
    }
}

/// What an attempt's verdict means for the notification; `counted` is the attempt's number
/// since the last replay.
fn outcome(retry: &RetryConfig, verdict: &Verdict, counted: i64, now: i64) -> Outcome {
    match verdict {
        Verdict::Delivered => Outcome::Delivered,
        Verdict::Final => Outcome::Dead,
        Verdict::Failed { retry_after } => {
            match backoff::next_delay(retry, counted, *retry_after, &mut rand::rng()) {
                Some(d) => Outcome::Retry {
                    next_attempt_at_ms: now + i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
                },
                None => Outcome::Dead,
            }
        }
    }
}

/// Writes outcomes in batches; retries while the database is away (the attempts are held in
/// memory meanwhile, and the dispatcher stops claiming when the channel fills). After each batch
/// it wakes the claim loop: partners that were at their in-flight cap have room again, and
/// waiting for the idle poll would leave that room unused.
///
/// While a batch cannot be written, `unwritten` is set so this process's reaper does not return
/// those rows' leases (which expire during a long database outage) before their outcomes land:
/// that would POST delivered notifications again once the database is back. It stays set
/// until every outcome sent before the database answered again is written (`sent` counts what
/// the attempt tasks handed over, including those still blocked on the full channel).
async fn run_finisher(
    store: Store,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Finish>,
    outcomes: Arc<Outcomes>,
    shutdown: CancellationToken,
) {
    let Outcomes {
        written,
        unwritten,
        sent,
    } = &*outcomes;
    use std::sync::atomic::Ordering;
    let mut written_total: u64 = 0;
    let mut catch_up_to: Option<u64> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < FINISH_BATCH_MAX {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let mut failures = 0u32;
        while let Err(e) = store.finish(&batch).await {
            failures += 1;
            if crate::store::is_transient(&e) && failures < 10 {
                debug!(error = %e, "writing outcomes lost a lock race; retrying");
                continue;
            }
            metrics.database_error("finish");
            unwritten.store(true, Ordering::Release);
            catch_up_to = None;
            if shutdown.is_cancelled() && failures >= 5 {
                error!(error = %e, lost = batch.len(), "giving up writing outcomes at shutdown; \
                       those notifications will be attempted again after their leases expire");
                break;
            }
            error!(error = %e, "writing attempt outcomes failed; retrying");
            tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(10)))).await;
        }
        written_total += batch.len() as u64;
        if unwritten.load(Ordering::Acquire) {
            let target = *catch_up_to.get_or_insert_with(|| sent.load(Ordering::Acquire));
            if written_total >= target {
                unwritten.store(false, Ordering::Release);
                catch_up_to = None;
            }
        }
        written.notify_one();
    }
}

/// Returns expired leases to `pending` every `reap_interval_ms`, and purges finished rows past
/// the retention age every `purge_interval_secs`.
async fn run_reaper(
    store: Store,
    metrics: Arc<Metrics>,
    config: DispatchConfig,
    retention: RetentionConfig,
    outcomes: Arc<Outcomes>,
    shutdown: CancellationToken,
) {
    let period = Duration::from_millis(config.reap_interval_ms);
    let purge_every_ms = i64::try_from(retention.purge_interval_secs * 1000).unwrap_or(i64::MAX);
    let mut last_purge_ms = 0;
    while !shutdown.is_cancelled() {
        if outcomes
            .unwritten
            .load(std::sync::atomic::Ordering::Acquire)
        {
            debug!("outcomes not yet written; reaping waits");
            sleep_or_cancel(period, &shutdown).await;
            continue;
        }
        match store.reap(now_ms()).await {
            Ok(0) => {}
            Ok(n) => warn!(reaped = n, "returned expired leases to pending"),
            Err(e) => {
                metrics.database_error("reap");
                warn!(error = %e, "reaping expired leases failed");
            }
        }
        if retention.max_age_secs > 0 && now_ms() - last_purge_ms >= purge_every_ms {
            last_purge_ms = now_ms();
            purge(&store, &metrics, &retention, &shutdown).await;
        }
        sleep_or_cancel(period, &shutdown).await;
    }
}

fn millis_to_secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// Deletes finished rows older than the retention age, one small batch at a time.
async fn purge(
    store: &Store,
    metrics: &Metrics,
    retention: &RetentionConfig,
    shutdown: &CancellationToken,
) {
    let age_ms = i64::try_from(retention.max_age_secs * 1000).unwrap_or(i64::MAX);
    let cutoff = now_ms().saturating_sub(age_ms);
    let mut total = 0;
    while !shutdown.is_cancelled() {
        match store.purge(cutoff, retention.purge_batch).await {
            Ok(n) => {
                total += n;
                if n < retention.purge_batch as u64 {
                    break;
                }
            }
            Err(e) => {
                metrics.database_error("purge");
                warn!(error = %e, "retention purge failed");
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    if total > 0 {
        info!(
            purged = total,
            "retention purge removed finished notifications"
        );
    }
}

async fn sleep_or_cancel(period: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(period) => {}
        () = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::ExcludingClaims;

    #[test]
    fn empty_excluding_claims_back_off_up_to_a_second_and_new_rows_end_the_pause() {
        let capped = ["capped".to_string()];
        let more = ["capped".to_string(), "other".to_string()];
        let mut pause = ExcludingClaims::new(20);
        assert!(!pause.skip(0, &capped), "the first claim runs");
        pause.record(true, 0, &capped);
        assert!(
            pause.skip(19, &capped),
            "an empty one pauses the next for the poll interval"
        );
        assert!(
            pause.skip(19, &more),
            "leaving out more partners cannot find more rows"
        );
        assert!(
            !pause.skip(19, &[]),
            "a partner that got room back ends the pause"
        );
        assert!(!pause.skip(20, &capped));
        for _ in 0..10 {
            pause.record(true, 1_000, &capped);
        }
        assert!(
            pause.skip(1_999, &capped),
            "repeated empty claims pause up to a second"
        );
        assert!(!pause.skip(2_000, &capped), "but never longer");
        pause.reset();
        assert!(
            !pause.skip(1_000, &capped),
            "new rows from the intake end the pause"
        );
        pause.record(true, 1_000, &capped);
        pause.record(false, 1_001, &capped);
        assert!(
            !pause.skip(1_002, &capped),
            "a claim that found rows ends it too"
        );
    }
}
