//! Scheduling: syncs every `--every`, never overlapping; retries after transient failures with
//! exponential backoff and jitter, capped.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, info, warn};

/// Exponential backoff with "equal jitter": each delay is drawn from `[d/2, d]`, where `d`
/// doubles from `base` up to `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Back to `base` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The outcome of one scheduled run, as the loop needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Done; next run at the next tick.
    Ok,
    /// Failed in a way that may pass soon (network): retry with backoff.
    Transient,
    /// Failed otherwise: try again at the next tick.
    Failed,
}

/// Calls `run` every `every` (measured from the start of each run; a run that takes longer is
/// followed at once by the next, never overlapped), retrying transient failures with backoff
/// capped at `max_backoff`. Returns when `shutdown` completes (even in the middle of a run: a
/// sync is safe to interrupt and resumes next time).
pub async fn run_every<F, Fut>(
    every: Duration,
    max_backoff: Duration,
    mut run: F,
    shutdown: impl Future<Output = ()>,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = RunOutcome>,
{
    let mut backoff = Backoff::new(Duration::from_secs(5).min(max_backoff), max_backoff);
    tokio::pin!(shutdown);
    loop {
        let started = Instant::now();
        let outcome = tokio::select! {
            o = run() => o,
            () = &mut shutdown => {
                info!("stopping in the middle of a sync; it resumes at the next start");
                return;
            }
        };
        let next = match outcome {
            RunOutcome::Ok => {
                backoff.reset();
                started + every
            }
            RunOutcome::Transient => {
                let d = backoff.next_delay();
                warn!(retry_in_s = d.as_secs(), "sync failed; retrying");
                Instant::now() + d
            }
            RunOutcome::Failed => {
                backoff.reset();
                error!(
                    next_in_s = every.as_secs(),
                    "sync failed; trying again at the next scheduled time"
                );
                started + every
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = &mut shutdown => {
                info!("stopping");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let full = Duration::from_secs(1u64 << i.min(3));
            assert!(*d >= full / 2 && *d <= full, "{i}: {d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn runs_never_overlap_and_transient_failures_back_off() {
        let log: Arc<Mutex<Vec<(Duration, &str)>>> = Arc::default();
        let t0 = Instant::now();
        let outcomes = Arc::new(Mutex::new(vec![
            RunOutcome::Ok,
            RunOutcome::Ok,
            RunOutcome::Transient,
            RunOutcome::Ok,
        ]));
        let l = log.clone();
        let run = move || {
            let l = l.clone();
            let o = outcomes.clone();
            async move {
                l.lock().unwrap().push((t0.elapsed(), "start"));
                // Each run takes 90 s, longer than half the period.
                tokio::time::sleep(Duration::from_secs(90)).await;
                l.lock().unwrap().push((t0.elapsed(), "end"));
                o.lock().unwrap().pop().unwrap_or(RunOutcome::Ok)
            }
        };
        let shutdown = tokio::time::sleep(Duration::from_secs(1000));
        run_every(Duration::from_secs(120), Duration::from_secs(60), run, shutdown).await;
        let log = log.lock().unwrap();
        // Starts and ends alternate: never two runs at once.
        for pair in log.chunks(2) {
            assert_eq!(pair[0].1, "start");
            if pair.len() == 2 {
                assert_eq!(pair[1].1, "end");
            }
        }
        let starts: Vec<u64> = log
            .iter()
            .filter(|e| e.1 == "start")
            .map(|e| e.0.as_secs())
            .collect();
        assert_eq!(starts[0], 0);
        assert_eq!(starts[1], 120);
        // The second run failed transiently: the third starts 2.5 to 5 s after its end.
        assert!((212..=215).contains(&starts[2]), "{starts:?}");
    }
}
