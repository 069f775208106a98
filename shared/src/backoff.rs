//! Pauses between attempts, one way for every loop that reconnects or retries after a
//! failure (the consumers, the dead-letter watcher, the splitter, the outbox relay, a
//! broker link's upkeep, the lock gate, outage riding): exponential with jitter (up to the
//! pause again, through `backon`), for ever, and back to the shortest pause after a success.
//!
//! Jitter keeps the processes that lost the same dependency at the same moment from
//! coming back in step; never giving up is right for a service, whose alternative to
//! waiting is exiting and being restarted into the same outage.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Pauses growing from `min` to `max` while failures last; [`Backoff::reset`] after a
/// success starts them at `min` again.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    max: Duration,
    pauses: ExponentialBackoff,
}

impl Backoff {
    /// Pauses from `min` to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            max,
            pauses: builder.build(),
        }
    }

    /// The pauses of a reconnect, or of a round retried after an error: 100 ms to 5 s.
    pub fn reconnect() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The pause before the next attempt.
    pub fn next_pause(&mut self) -> Duration {
        // Without a limit on the number of attempts the iterator never ends.
        self.pauses.next().unwrap_or(self.max)
    }

    /// After a success: the next failure pauses the shortest time again.
    pub fn reset(&mut self) {
        self.pauses = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_stay_within_bounds_and_start_over_after_a_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(min, max);
        for _ in 0..50 {
            // Jitter adds up to the pause itself on top of it.
            assert!(b.next_pause() <= max * 2);
        }
        b.reset();
        assert!(b.next_pause() <= min * 2);
    }
}
