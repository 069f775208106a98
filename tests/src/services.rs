//! PostgreSQL, RabbitMQ and Redis instances a test starts on free ports of its own, so that
//! it can stop, kill and restart them without touching the machine's services.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub(crate) async fn wait_port(port: u16, within: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < within {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("nothing listens on port {port} after {within:?}")
}

pub(crate) fn scratch_dir(kind: &str) -> PathBuf {
    std::env::temp_dir().join(format!("bulkops-{kind}-{}", uuid::Uuid::new_v4().simple()))
}

pub(crate) fn chown(path: &std::path::Path, user: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("chown")
        .args(["-R", &format!("{user}:{user}"), &path.to_string_lossy()])
        .status()?;
    if !status.success() {
        bail!("chown {user} {} failed", path.display());
    }
    Ok(())
}

/// How to stop an instance.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// A clean shutdown (SIGTERM / PostgreSQL fast shutdown).
    Graceful,
    /// A crash (SIGKILL).
    Crash,
}

/// A Redis server of the test's own.
pub struct RedisInstance {
    /// Its port.
    pub port: u16,
    child: Option<Child>,
}

impl RedisInstance {
    /// Starts one on a free port (no persistence, like the machine's).
    pub async fn start() -> anyhow::Result<Self> {
        let mut r = Self {
            port: free_port()?,
            child: None,
        };
        r.up().await?;
        Ok(r)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn up(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("redis-server")?;
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(10)).await
    }

    async fn admin(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?)
    }

    /// Fills it with junk, then sets `maxmemory` below what it uses, with `noeviction`:
    /// from then on every write (a `SET`, a script that may write) is refused with `-OOM`,
    /// while reads and `PING` still answer. Returns the refusal a `SET` gets.
    pub async fn refuse_writes(&self) -> anyhow::Result<String> {
        let mut c = self.admin().await?;
        let filler = "x".repeat(4096);
        for i in 0..1000 {
            let _: () = redis::cmd("SET")
                .arg(format!("filler:{i}"))
                .arg(&filler)
                .query_async(&mut c)
                .await?;
        }
        let info: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await?;
        let used: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .context("used_memory")?;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("noeviction")
            .query_async(&mut c)
            .await?;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg((used / 2).to_string())
            .query_async(&mut c)
            .await?;
        let refused: redis::RedisResult<()> = redis::cmd("SET")
            .arg("probe")
            .arg("1")
            .query_async(&mut c)
            .await;
        let pong: String = redis::cmd("PING").query_async(&mut c).await?;
        match refused {
            Err(e) if pong == "PONG" => Ok(e.to_string()),
            Err(e) => bail!("PING answered {pong} ({e})"),
            Ok(()) => bail!("writes are still accepted"),
        }
    }

    /// Lifts [`RedisInstance::refuse_writes`].
    pub async fn accept_writes(&self) -> anyhow::Result<()> {
        let mut c = self.admin().await?;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg("0")
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Zeroes the command statistics.
    pub async fn reset_stats(&self) -> anyhow::Result<()> {
        let mut c = self.admin().await?;
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Calls of the given commands since the last [`RedisInstance::reset_stats`], refused
    /// and failed ones included (`INFO commandstats`: calls + rejected_calls).
    pub async fn command_calls(&self, commands: &[&str]) -> anyhow::Result<u64> {
        let mut c = self.admin().await?;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await?;
        let mut n = 0;
        for line in info.lines() {
            let Some((name, stats)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            if !commands.contains(&name) {
                continue;
            }
            for kv in stats.split(',') {
                if let Some(("calls" | "rejected_calls", v)) = kv.split_once('=') {
                    n += v.parse::<u64>().unwrap_or(0);
                }
            }
        }
        Ok(n)
    }

    /// Stops it.
    pub async fn stop(&mut self, how: Stop) {
        if let Some(mut c) = self.child.take() {
            match how {
                Stop::Graceful => {
                    if let Some(pid) = c.id() {
                        let _ = std::process::Command::new("kill")
                            .args(["-TERM", &pid.to_string()])
                            .status();
                    }
                }
                Stop::Crash => {
                    let _ = c.start_kill();
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        }
    }

    /// Stops it, waits `down`, starts it again on the same port.
    pub async fn restart(&mut self, how: Stop, down: Duration) -> anyhow::Result<()> {
        self.stop(how).await;
        tokio::time::sleep(down).await;
        self.up().await
    }
}

/// A PostgreSQL server of the test's own (initdb'd into a scratch directory, run as the
/// postgres user).
pub struct PgInstance {
    /// Its port.
    pub port: u16,
    pub(crate) dir: PathBuf,
    pub(crate) child: Option<Child>,
}

const PG_BIN: &str = "/usr/lib/postgresql";

pub(crate) fn pg_bin(tool: &str) -> anyhow::Result<PathBuf> {
    let mut versions: Vec<_> = std::fs::read_dir(PG_BIN)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    versions.sort();
    let dir = versions
        .pop()
        .context("no PostgreSQL under /usr/lib/postgresql")?;
    Ok(dir.join("bin").join(tool))
}

impl PgInstance {
    /// initdb and start on a free port.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = scratch_dir("pg");
        std::fs::create_dir_all(&dir)?;
        chown(&dir, "postgres")?;
        let status = Command::new("setpriv")
            .args([
                "--reuid",
                "postgres",
                "--regid",
                "postgres",
                "--init-groups",
            ])
            .arg(pg_bin("initdb")?)
            .args([
                "-D",
                &dir.join("data").to_string_lossy(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("initdb failed");
        }
        let mut pg = Self {
            port: free_port()?,
            dir,
            child: None,
        };
        pg.up().await?;
        Ok(pg)
    }

    /// Base URL of the server (append `/<database>`).
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    pub(crate) async fn up(&mut self) -> anyhow::Result<()> {
        let child = Command::new("setpriv")
            .args([
                "--reuid",
                "postgres",
                "--regid",
                "postgres",
                "--init-groups",
            ])
            .arg(pg_bin("postgres")?)
            .args([
                "-D",
                &self.dir.join("data").to_string_lossy(),
                "-p",
                &self.port.to_string(),
                "-k",
                &self.dir.to_string_lossy(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("postgres")?;
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(30)).await?;
        // Accepting TCP is not yet accepting queries (recovery after a crash).
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            let ok = std::process::Command::new("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("postgres on {} not ready", self.port)
    }

    /// Stops it: a fast shutdown, or a crash (SIGKILL: recovery on restart).
    pub async fn stop(&mut self, how: Stop) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let sig = match how {
                    Stop::Graceful => "-INT",
                    Stop::Crash => "-KILL",
                };
                let _ = std::process::Command::new("kill")
                    .args([sig, &pid.to_string()])
                    .status();
                if matches!(how, Stop::Crash) {
                    // The postmaster's children would keep the shared memory busy.
                    let _ = std::process::Command::new("pkill")
                        .args(["-KILL", "-P", &pid.to_string()])
                        .status();
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(30), c.wait()).await;
        }
    }

    /// Stops it, waits `down`, starts it again on the same port and data.
    pub async fn restart(&mut self, how: Stop, down: Duration) -> anyhow::Result<()> {
        self.stop(how).await;
        tokio::time::sleep(down).await;
        self.up().await
    }

    /// Starts it again after [`PgInstance::stop`].
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        self.up().await
    }
}

impl Drop for PgInstance {
    fn drop(&mut self) {
        if let Some(c) = &self.child
            && let Some(pid) = c.id()
        {
            let _ = std::process::Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RabbitMQ node of the test's own (its own node name, ports, data directory, config
/// file and plugins file, run as the rabbitmq user with no plugins).
pub struct RabbitInstance {
    /// AMQP port.
    pub port: u16,
    dist_port: u16,
    node: String,
    dir: PathBuf,
    /// `HOME` of the node: where its Erlang cookie is.
    home: PathBuf,
    child: Option<Child>,
}

/// How to start one RabbitMQ node; [`RabbitNode::standalone`] for a lone node.
#[derive(Debug, Clone)]
pub struct RabbitNode {
    /// Erlang node name (`name@localhost`).
    pub node: String,
    /// `HOME` holding the `.erlang.cookie` every node of one cluster shares.
    pub home: PathBuf,
    /// Extra lines of the node's `rabbitmq.conf`.
    pub config: String,
}

impl RabbitNode {
    /// A lone node with a fresh name, using the broker package's home (its cookie).
    pub fn standalone() -> Self {
        Self {
            node: format!(
                "bulkops{}@localhost",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            home: PathBuf::from("/var/lib/rabbitmq"),
            config: String::new(),
        }
    }
}

impl RabbitInstance {
    /// Starts a node (about ten seconds).
    pub async fn start() -> anyhow::Result<Self> {
        let r = Self::spawn(RabbitNode::standalone())?;
        r.wait_up().await?;
        Ok(r)
    }

    /// Starts a node without waiting for it to listen (so that a cluster's nodes boot in
    /// parallel); [`RabbitInstance::wait_up`] waits.
    ///
    /// Every path and port is the node's own: `RABBITMQ_NODENAME`, `RABBITMQ_NODE_PORT`,
    /// `RABBITMQ_DIST_PORT`, `RABBITMQ_MNESIA_BASE`, `RABBITMQ_LOG_BASE`,
    /// `RABBITMQ_CONFIG_FILE` (its own file, so the machine's `/etc/rabbitmq/rabbitmq.conf`
    /// and its listener on 5672 are never read) and `RABBITMQ_ENABLED_PLUGINS_FILE`.
    pub fn spawn(spec: RabbitNode) -> anyhow::Result<Self> {
        let dir = scratch_dir("rabbit");
        std::fs::create_dir_all(dir.join("mnesia"))?;
        std::fs::create_dir_all(dir.join("log"))?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "log.console = false\nlog.file.level = info\n{}",
                spec.config
            ),
        )?;
        chown(&dir, "rabbitmq")?;
        let mut r = Self {
            port: free_port()?,
            dist_port: free_port()?,
            node: spec.node,
            dir,
            home: spec.home,
            child: None,
        };
        r.spawn_server()?;
        Ok(r)
    }

    /// Its AMQP URL.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Its Erlang node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether its server process runs (it may still be booting).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn_server(&mut self) -> anyhow::Result<()> {
        let d = |p: &str| self.dir.join(p).to_string_lossy().into_owned();
        let child = Command::new("setpriv")
            .args([
                "--reuid",
                "rabbitmq",
                "--regid",
                "rabbitmq",
                "--init-groups",
                "/usr/lib/rabbitmq/bin/rabbitmq-server",
            ])
            .current_dir(&self.home)
            .env("HOME", &self.home)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("rabbitmq-server")?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the node accepts AMQP connections.
    pub async fn wait_up(&self) -> anyhow::Result<()> {
        wait_port(self.port, Duration::from_secs(120)).await
    }

    async fn up(&mut self) -> anyhow::Result<()> {
        self.spawn_server()?;
        self.wait_up().await
    }

    fn beam_pid(&self) -> Option<String> {
        let script = self.child.as_ref()?.id()?;
        let out = std::process::Command::new("pgrep")
            .args(["-P", &script.to_string(), "beam.smp"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map(str::to_owned)
    }

    /// CPU seconds (user + system) the node's VM has used so far, from /proc.
    pub fn cpu_seconds(&self) -> f64 {
        let Some(pid) = self.beam_pid() else {
            return 0.0;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
            .sum();
        ticks / 100.0
    }

    /// Stops the node: a clean shutdown, or a crash (SIGKILL of the VM).
    pub async fn stop(&mut self, how: Stop) {
        let beam = self.beam_pid();
        if let Some(mut c) = self.child.take() {
            match (how, beam) {
                (Stop::Crash, Some(beam)) => {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &beam])
                        .status();
                }
                _ => {
                    if let Some(pid) = c.id() {
                        let _ = std::process::Command::new("kill")
                            .args(["-TERM", &pid.to_string()])
                            .status();
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(60), c.wait()).await;
            // The port must be free before the node starts again.
            let started = Instant::now();
            while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
                && started.elapsed() < Duration::from_secs(30)
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Starts the node again after [`RabbitInstance::stop`] (same name, ports and data:
    /// queues, messages and cluster membership survive).
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        self.up().await
    }

    /// Stops the node, waits `down`, starts it again (queues and messages survive).
    pub async fn restart(&mut self, how: Stop, down: Duration) -> anyhow::Result<()> {
        self.stop(how).await;
        tokio::time::sleep(down).await;
        self.up().await
    }
}

impl Drop for RabbitInstance {
    fn drop(&mut self) {
        if let Some(beam) = self.beam_pid() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &beam])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
