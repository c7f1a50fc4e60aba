//! The bandwidth limit (`--bwlimit`): a token bucket over the bytes of extent bodies.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Tokens are KiB, so that `u32` counts cover any realistic rate.
const UNIT: u64 = 1024;

/// Limits the average rate of sent bytes; bursts of up to one second's worth.
#[derive(Debug)]
pub struct Bandwidth {
    limiter: DefaultDirectRateLimiter,
    burst: u32,
}

impl Bandwidth {
    /// A limit of `bytes_per_sec` (at least 1 KiB/s).
    pub fn new(bytes_per_sec: u64) -> Self {
        let per_sec = u32::try_from((bytes_per_sec / UNIT).max(1)).unwrap_or(u32::MAX);
        let rate = NonZeroU32::new(per_sec).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(rate)),
            burst: rate.get(),
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn wait(&self, bytes: u64) {
        let mut units = bytes.div_ceil(UNIT);
        while units > 0 {
            let n = units.min(u64::from(self.burst)) as u32;
            if let Some(n) = NonZeroU32::new(n) {
                // `n` never exceeds the burst size, so the limiter can always grant it.
                let _ = self.limiter.until_n_ready(n).await;
            }
            units -= u64::from(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn limits_the_rate() {
        // 1 MiB/s: the first second's worth passes at once, the next 512 KiB take ~0.5 s.
        let b = Bandwidth::new(1 << 20);
        let t = Instant::now();
        b.wait(1 << 20).await;
        assert!(t.elapsed() < Duration::from_millis(200));
        b.wait(512 << 10).await;
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(400), "{e:?}");
        assert!(e < Duration::from_secs(2), "{e:?}");
    }

    #[tokio::test]
    async fn larger_than_a_burst_is_split() {
        let b = Bandwidth::new(64 << 10);
        let t = Instant::now();
        b.wait(96 << 10).await;
        assert!(t.elapsed() >= Duration::from_millis(400));
    }
}
