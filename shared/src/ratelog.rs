//! Log lines that stay few when the same failure repeats thousands of times a second.
//!
//! A failing dependency makes every chunk, round or probe fail the same way; logging each
//! one buries the cause and costs the disk. [`LogGate`] admits the first occurrence of each
//! key (an error class, a dependency) and then at most one per interval, telling how many
//! were held back meanwhile, so an operator sees the change of state at once and a
//! reminder while it lasts. Keys are bounded (classes, never record data).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a repeated failure is reminded of by default.
pub const REMINDER: Duration = Duration::from_secs(60);

/// Admits log lines per key: the first at once, then one per interval.
#[derive(Debug)]
pub struct LogGate {
    interval: Duration,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Default for LogGate {
    fn default() -> Self {
        Self::new(REMINDER)
    }
}

impl LogGate {
    /// A gate admitting one line per key per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether an occurrence of `key` is to be logged now. `Some(n)`: log it, and say that
    /// `n` occurrences since the last line were not logged; `None`: count it silently.
    pub fn admit(&self, key: &str) -> Option<u64> {
        let mut seen = match self.seen.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = Instant::now();
        match seen.get_mut(key) {
            Some((last, held)) if now.duration_since(*last) < self.interval => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                let n = *held;
                *last = now;
                *held = 0;
                Some(n)
            }
            None => {
                // Bounded keys, but keep the map small even if a caller errs.
                if seen.len() >= 256 {
                    seen.clear();
                }
                seen.insert(key.to_owned(), (now, 0));
                Some(0)
            }
        }
    }

    /// Forgets `key`: its next occurrence is logged at once (after the failure cleared).
    pub fn reset(&self, key: &str) {
        let mut seen = match self.seen.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        seen.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_the_first_then_one_per_interval_counting_the_rest() {
        let gate = LogGate::new(Duration::from_millis(50));
        assert_eq!(gate.admit("redis_oom"), Some(0));
        for _ in 0..1000 {
            assert_eq!(gate.admit("redis_oom"), None);
        }
        assert_eq!(gate.admit("db_57P01"), Some(0), "keys are independent");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(gate.admit("redis_oom"), Some(1000));
        assert_eq!(gate.admit("redis_oom"), None);
        gate.reset("redis_oom");
        assert_eq!(gate.admit("redis_oom"), Some(0));
    }
}
