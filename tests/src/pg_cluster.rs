//! PostgreSQL behind the things production puts in front of it, started by the test on free
//! ports with scratch directories, removed on drop (also when the test fails):
//!
//! - [`PgBouncer`]: the installed `pgbouncer` in front of a PostgreSQL (the machine's, or
//!   one of the test's), in the pool mode bulkops is documented to need (session), or
//!   another one to show what breaks.
//! - [`PgPair`]: a primary and a streaming standby of the test's own (`initdb`, then
//!   `pg_basebackup -R`), behind a [`FaultProxy`] that plays the VIP/HAProxy: a failover
//!   fences the primary, repoints the switch and promotes the standby (`pg_ctl promote`).
//!
//! Nothing here touches the machine's PostgreSQL configuration.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::proxy::FaultProxy;
use crate::services::{PgInstance, Stop, chown, free_port, pg_bin, scratch_dir, wait_port};

/// Runs one statement with `psql` against `port` (as the trusted `postgres` user) and
/// returns its unaligned output.
pub async fn psql(port: u16, sql: &str) -> anyhow::Result<String> {
    psql_many(port, &[sql]).await
}

/// Runs statements with `psql`, each in its own transaction (`ALTER SYSTEM` needs that).
pub async fn psql_many(port: u16, statements: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-Atq",
        "-v",
        "ON_ERROR_STOP=1",
    ]);
    for s in statements {
        cmd.args(["-c", s]);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.stdin(Stdio::null()).output())
        .await
        .context("psql timed out")??;
    if !out.status.success() {
        bail!(
            "psql -p {port}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// PgBouncer's pool modes.
#[derive(Debug, Clone, Copy)]
pub enum PoolMode {
    /// A server connection per client connection, for the client's whole session.
    Session,
    /// A server connection per transaction.
    Transaction,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

/// A PgBouncer of the test's own.
pub struct PgBouncer {
    /// Where clients connect.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PgBouncer {
    /// Starts PgBouncer on a free port in front of the PostgreSQL at `upstream_port` on
    /// 127.0.0.1, serving every database of it (`* =`), with trust authentication.
    pub async fn start(upstream_port: u16, mode: PoolMode) -> anyhow::Result<Self> {
        Self::start_with_pool(upstream_port, mode, 100).await
    }

    /// As [`PgBouncer::start`], with at most `pool_size` server connections per database
    /// and user (1 makes every client share one server connection).
    pub async fn start_with_pool(
        upstream_port: u16,
        mode: PoolMode,
        pool_size: u32,
    ) -> anyhow::Result<Self> {
        let dir = scratch_dir("pgbouncer");
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n")?;
        // What bulkops needs (docs/OPERATIONS.md): session pooling, and nothing else special;
        // bulkops sends no startup parameter PgBouncer refuses.
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host=127.0.0.1 port={upstream_port}\n\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = trust\nauth_file = {dir}/userlist.txt\n\
                 pool_mode = {mode}\nmax_client_conn = 1000\ndefault_pool_size = {pool_size}\n\
                 server_reset_query = DISCARD ALL\nserver_login_retry = 1\n\
                 logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n\
                 admin_users = postgres\n",
                dir = dir.display(),
                mode = mode.as_str(),
            ),
        )?;
        chown(&dir, "postgres")?;
        let mut b = Self {
            port,
            dir,
            child: None,
        };
        b.up().await?;
        Ok(b)
    }

    /// Base URL of the databases behind it (append `/<database>`).
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    async fn up(&mut self) -> anyhow::Result<()> {
        let child = Command::new("setpriv")
            .args([
                "--reuid",
                "postgres",
                "--regid",
                "postgres",
                "--init-groups",
                "pgbouncer",
            ])
            .arg(self.dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("pgbouncer")?;
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(10)).await
    }

    /// Stops it: SIGTERM (PgBouncer 1.18 closes every connection at once) or SIGKILL.
    pub async fn stop(&mut self, how: Stop) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let sig = match how {
                    Stop::Graceful => "-TERM",
                    Stop::Crash => "-KILL",
                };
                let _ = std::process::Command::new("kill")
                    .args([sig, &pid.to_string()])
                    .status();
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

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl PgInstance {
    /// A streaming standby of `primary`: `pg_basebackup -R` into a scratch directory, then
    /// started on a free port (hot standby: it answers reads and refuses writes).
    pub async fn standby_of(primary: &PgInstance) -> anyhow::Result<Self> {
        let dir = scratch_dir("pg-standby");
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
            .arg(pg_bin("pg_basebackup")?)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
                &dir.join("data").to_string_lossy(),
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            bail!("pg_basebackup failed");
        }
        let mut pg = Self {
            port: free_port()?,
            dir,
            child: None,
        };
        pg.up().await?;
        Ok(pg)
    }

    /// Whether it is in recovery (a standby).
    pub async fn in_recovery(&self) -> anyhow::Result<bool> {
        Ok(psql(self.port, "SELECT pg_is_in_recovery()").await? == "t")
    }

    /// `pg_ctl promote`, then waits until it takes writes.
    pub async fn promote(&self) -> anyhow::Result<()> {
        let status = Command::new("setpriv")
            .args([
                "--reuid",
                "postgres",
                "--regid",
                "postgres",
                "--init-groups",
            ])
            .arg(pg_bin("pg_ctl")?)
            .args([
                "promote",
                "-w",
                "-D",
                &self.dir.join("data").to_string_lossy(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("pg_ctl promote failed");
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if matches!(self.in_recovery().await, Ok(false)) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("standby on {} still in recovery after promote", self.port)
    }

    /// Fences it the way a failover manager demotes a primary it cannot stop: new
    /// transactions, in open sessions too, are read-only (`default_transaction_read_only`,
    /// reloaded), so writes fail with SQLSTATE 25006 while the server keeps answering.
    pub async fn fence_read_only(&self) -> anyhow::Result<()> {
        psql_many(
            self.port,
            &[
                "ALTER SYSTEM SET default_transaction_read_only = on",
                "SELECT pg_reload_conf()",
            ],
        )
        .await
        .map(|_| ())
    }
}

/// A primary and its streaming standby, behind a switch clients connect to.
pub struct PgPair {
    /// The primary at the start.
    pub primary: PgInstance,
    /// The standby at the start.
    pub standby: PgInstance,
    /// Where clients connect: the VIP/HAProxy, pointing at the primary.
    pub switch: FaultProxy,
}

impl PgPair {
    /// initdb a primary, clone a standby from it, wait until it streams, and put the switch
    /// in front of the primary.
    pub async fn start() -> anyhow::Result<Self> {
        let primary = PgInstance::start().await?;
        let standby = PgInstance::standby_of(&primary).await?;
        let switch = FaultProxy::start(&format!("127.0.0.1:{}", primary.port)).await?;
        let pair = Self {
            primary,
            standby,
            switch,
        };
        let started = Instant::now();
        loop {
            let streaming = psql(
                pair.primary.port,
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            )
            .await?;
            if streaming == "1" {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the standby does not stream");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(pair)
    }

    /// Base URL of the databases behind the switch (append `/<database>`).
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@{}", self.switch.addr)
    }

    /// Waits until the standby has replayed everything the primary wrote so far, so that a
    /// failover loses no committed transaction (a controlled switchover; with asynchronous
    /// replication a crash can lose the last commits, which is the database's business).
    pub async fn wait_standby_caught_up(&self) -> anyhow::Result<()> {
        let lsn = psql(self.primary.port, "SELECT pg_current_wal_lsn()").await?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            let done = psql(
                self.standby.port,
                &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
            )
            .await?;
            if done == "t" {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the standby did not replay up to {lsn}")
    }

    /// The switch's upstream for the standby.
    pub fn standby_addr(&self) -> String {
        format!("127.0.0.1:{}", self.standby.port)
    }
}
