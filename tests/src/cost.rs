//! What a benchmark run costs each process on the machine: CPU seconds and peak memory of
//! PostgreSQL (all its processes), RabbitMQ, Redis, the producer and the workers, read from
//! `/proc` while the run goes on.
//!
//! CPU is `utime + stime` (`/proc/PID/stat`). A process sampler runs every 200 ms and keeps
//! each process's last figure, so a PostgreSQL backend that exits during the run (a pool
//! closing a connection) still counts up to its last sample; a process born during the run
//! counts from zero. Memory is sampled once a second: PostgreSQL's is the sum of its
//! processes' proportional set sizes (`Pss` in `smaps_rollup`: shared buffers counted once),
//! every other process's its resident set (`VmRSS`). The brokers are the machine's own:
//! RabbitMQ is the oldest `beam.smp` (the system node, not a test cluster's), Redis the
//! `redis-server` on port 6379. On a machine shared with other work, PostgreSQL's and the
//! brokers' figures include that work too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The processes a figure is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    /// Every `postgres` process (postmaster, backends, WAL writer, checkpointer, …).
    Postgres,
    /// The machine's RabbitMQ node.
    RabbitMq,
    /// The machine's Redis.
    Redis,
    /// The bulkops producer(s) of the run.
    Producer,
    /// The bulkops workers of the run (summed).
    Workers,
}

impl Group {
    /// Every group, in table order.
    pub const ALL: [Group; 5] = [
        Group::Postgres,
        Group::RabbitMq,
        Group::Redis,
        Group::Producer,
        Group::Workers,
    ];

    /// Its name in tables.
    pub fn label(self) -> &'static str {
        match self {
            Group::Postgres => "PostgreSQL (all processes)",
            Group::RabbitMq => "RabbitMQ (beam.smp)",
            Group::Redis => "Redis",
            Group::Producer => "producer",
            Group::Workers => "workers (sum)",
        }
    }

    fn index(self) -> usize {
        match self {
            Group::Postgres => 0,
            Group::RabbitMq => 1,
            Group::Redis => 2,
            Group::Producer => 3,
            Group::Workers => 4,
        }
    }
}

/// What a run cost: CPU seconds and peak memory (MB) per group.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// CPU seconds per group ([`Group::ALL`] order).
    pub cpu: [f64; 5],
    /// Peak memory in MB per group (the producer's and workers' are per process, the
    /// largest of them).
    pub peak_mb: [f64; 5],
}

impl Usage {
    /// CPU seconds of one group.
    pub fn cpu_of(&self, g: Group) -> f64 {
        self.cpu[g.index()]
    }

    /// Peak MB of one group.
    pub fn peak_of(&self, g: Group) -> f64 {
        self.peak_mb[g.index()]
    }

    /// All CPU seconds.
    pub fn total_cpu(&self) -> f64 {
        self.cpu.iter().sum()
    }
}

#[derive(Default)]
struct State {
    /// pid → (group, ticks at the first sample).
    first: HashMap<u32, (Group, u64)>,
    /// pid → (group, ticks at the last sample).
    last: HashMap<u32, (Group, u64)>,
    peak_mb: [f64; 5],
}

/// Samples the processes until [`Meter::stop`].
pub struct Meter {
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    who: Arc<Who>,
}

struct Who {
    rabbit: Option<u32>,
    producers: Vec<u32>,
    workers: Vec<u32>,
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after) = stat.rsplit_once(')')?;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime in clock ticks.
fn ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The machine's RabbitMQ node: the oldest `beam.smp`.
fn system_rabbit() -> Option<u32> {
    pids()
        .into_iter()
        .filter(|p| comm(*p).as_deref() == Some("beam.smp"))
        .filter_map(|p| Some((stat_fields(p)?.get(19)?.parse::<u64>().ok()?, p)))
        .min()
        .map(|(_, p)| p)
}

fn kb_field(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

impl Who {
    fn classify(&self, pid: u32, comm: &str) -> Option<Group> {
        if self.workers.contains(&pid) {
            Some(Group::Workers)
        } else if self.producers.contains(&pid) {
            Some(Group::Producer)
        } else if comm == "postgres" {
            Some(Group::Postgres)
        } else if Some(pid) == self.rabbit {
            Some(Group::RabbitMq)
        } else if comm == "redis-server" {
            let cmdline =
                std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.contains(":6379").then_some(Group::Redis)
        } else {
            None
        }
    }

    fn sample_cpu(&self, state: &Mutex<State>) {
        let mut seen = Vec::new();
        for pid in pids() {
            let Some(c) = comm(pid) else { continue };
            let Some(g) = self.classify(pid, &c) else {
                continue;
            };
            if let Some(t) = ticks(pid) {
                seen.push((pid, g, t));
            }
        }
        let Ok(mut s) = state.lock() else { return };
        for (pid, g, t) in seen {
            s.last.insert(pid, (g, t));
        }
    }

    fn sample_memory(&self, state: &Mutex<State>) {
        let mut mb = [0.0_f64; 5];
        for pid in pids() {
            let Some(c) = comm(pid) else { continue };
            let Some(g) = self.classify(pid, &c) else {
                continue;
            };
            let i = g.index();
            if g == Group::Postgres {
                let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                    .unwrap_or_default();
                mb[i] += kb_field(&rollup, "Pss:") / 1024.0;
            } else {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                // Producers and workers: the largest process (their own peak, VmHWM).
                let own = if matches!(g, Group::Producer | Group::Workers) {
                    kb_field(&status, "VmHWM:")
                } else {
                    kb_field(&status, "VmRSS:")
                } / 1024.0;
                if matches!(g, Group::Producer | Group::Workers) {
                    mb[i] = mb[i].max(own);
                } else {
                    mb[i] += own;
                }
            }
        }
        let Ok(mut s) = state.lock() else { return };
        for (peak, now) in s.peak_mb.iter_mut().zip(mb) {
            *peak = peak.max(now);
        }
    }
}

impl Meter {
    /// Starts sampling. `producers` and `workers` are the pids of the run's bulkops
    /// processes (empty for the set-based limit).
    pub fn start(producers: Vec<u32>, workers: Vec<u32>) -> Meter {
        let who = Arc::new(Who {
            rabbit: system_rabbit(),
            producers,
            workers,
        });
        let state = Arc::new(Mutex::new(State::default()));
        who.sample_cpu(&state);
        if let Ok(mut s) = state.lock() {
            s.first = s.last.clone();
        }
        who.sample_memory(&state);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (who, state, stop) = (who.clone(), state.clone(), stop.clone());
            async move {
                let mut n = 0_u64;
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    who.sample_cpu(&state);
                    n += 1;
                    if n.is_multiple_of(5) {
                        who.sample_memory(&state);
                    }
                }
            }
        });
        Meter {
            state,
            stop,
            task,
            who,
        }
    }

    /// Takes a last sample and returns what the run cost since [`Meter::start`].
    pub async fn stop(self) -> Usage {
        self.stop.cancel();
        let _ = self.task.await;
        self.who.sample_cpu(&self.state);
        self.who.sample_memory(&self.state);
        let mut u = Usage::default();
        let Ok(s) = self.state.lock() else { return u };
        for (pid, (g, t)) in &s.last {
            let base = s.first.get(pid).map_or(0, |(_, b)| *b);
            u.cpu[g.index()] += t.saturating_sub(base) as f64 / 100.0;
        }
        u.peak_mb = s.peak_mb;
        u
    }
}
