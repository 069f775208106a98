//! Clustered Redis a test starts from the installed `redis-server`, on free ports with a
//! scratch directory of its own, and removes on drop (also when the test fails):
//!
//! - [`RedisCluster`]: a Redis Cluster of 3 masters and 3 replicas (`--cluster-enabled yes`,
//!   `redis-cli --cluster create … --cluster-replicas 1`), whose masters a test SIGKILLs to
//!   watch a replica take over.
//! - [`SentinelSet`]: one master, one replica and three Sentinels watching them under the
//!   name `mymaster`, for manual (`SENTINEL FAILOVER`) and crash failovers.
//!
//! Timeouts are short (cluster node timeout 1 s, Sentinel down-after 1 s) so that a failover
//! takes seconds. Nothing here touches the machine's Redis.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::services::{free_port, scratch_dir, wait_port};

/// Runs `redis-cli -p port args…` and returns its output (bounded in time).
pub async fn cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .context("redis-cli timed out")??;
    if !out.status.success() {
        bail!(
            "redis-cli -p {port} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of `field:` in an INFO-style answer.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// One `redis-server` of ours.
struct Node {
    port: u16,
    child: Option<Child>,
}

impl Node {
    fn spawn(args: &[String], port: u16) -> anyhow::Result<Self> {
        let child = Command::new("redis-server")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("redis-server")?;
        Ok(Self {
            port,
            child: Some(child),
        })
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }

    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        }
    }
}

/// A Redis Cluster of 3 masters with one replica each.
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts six nodes, joins them with `redis-cli --cluster create --cluster-replicas 1`
    /// and waits until every slot is served.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = scratch_dir("redis-cluster");
        std::fs::create_dir_all(&dir)?;
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..6 {
            let port = free_port()?;
            // The cluster bus gets a port of its own (the default, port + 10000, may be taken).
            let bus = free_port()?;
            let node_dir = cluster.dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir)?;
            let args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--cluster-port",
                &bus.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &node_dir.join("nodes.conf").to_string_lossy(),
                "--cluster-node-timeout",
                "1000",
                "--dir",
                &node_dir.to_string_lossy(),
                "--logfile",
                &node_dir.join("redis.log").to_string_lossy(),
                // Replicas sync at once (a replica that never synced cannot take over).
                "--repl-diskless-sync-delay",
                "0",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            cluster.nodes.push(Node::spawn(&args, port)?);
        }
        for n in &cluster.nodes {
            wait_port(n.port, Duration::from_secs(10)).await?;
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args: Vec<&str> = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        cli(cluster.nodes[0].port, &args)
            .await
            .context("redis-cli --cluster create")?;
        cluster.wait_healthy(Duration::from_secs(60)).await?;
        cluster
            .wait_replicas_synced(Duration::from_secs(60))
            .await?;
        Ok(cluster)
    }

    /// Waits until every live replica has its link to its master up (it has the data and
    /// may take over).
    pub async fn wait_replicas_synced(&self, within: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < within {
            let mut replicas = 0;
            let mut synced = 0;
            for n in self.nodes.iter().filter(|n| n.alive()) {
                let info = cli(n.port, &["info", "replication"])
                    .await
                    .unwrap_or_default();
                if info_field(&info, "role") == Some("slave") {
                    replicas += 1;
                    if info_field(&info, "master_link_status") == Some("up") {
                        synced += 1;
                    }
                }
            }
            if replicas > 0 && replicas == synced {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("Redis Cluster replicas not in sync after {within:?}")
    }

    /// The seed nodes, as `redis.nodes` wants them (comma-separated `redis://host:port`).
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn any_live_port(&self) -> anyhow::Result<u16> {
        self.nodes
            .iter()
            .find(|n| n.alive())
            .map(|n| n.port)
            .context("no live node")
    }

    /// Ports of the nodes that are masters now (seen from a live node), with the number of
    /// slots each serves.
    pub async fn masters(&self) -> anyhow::Result<Vec<(u16, usize)>> {
        let nodes = cli(self.any_live_port()?, &["cluster", "nodes"]).await?;
        let mut masters = Vec::new();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                continue;
            }
            let flags = fields[2];
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                continue;
            }
            let port = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
                .context("cluster nodes: no port")?;
            let slots: usize = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .map(|s| match s.split_once('-') {
                    Some((a, b)) => {
                        b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0)
                    }
                    None => 1,
                })
                .sum();
            masters.push((port, slots));
        }
        Ok(masters)
    }

    /// Waits until every live node says the cluster is ok with every slot served by a
    /// master that is not failing.
    pub async fn wait_healthy(&self, within: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < within {
            let mut ok = true;
            for n in self.nodes.iter().filter(|n| n.alive()) {
                match cli(n.port, &["cluster", "info"]).await {
                    Ok(info) => {
                        let good = info_field(&info, "cluster_state") == Some("ok")
                            && info_field(&info, "cluster_slots_ok") == Some("16384");
                        if !good {
                            last = format!("node {}: {}", n.port, info.replace("\r\n", " "));
                            ok = false;
                        }
                    }
                    Err(e) => {
                        last = e.to_string();
                        ok = false;
                    }
                }
            }
            if ok {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("the Redis Cluster is not healthy after {within:?}: {last}")
    }

    /// SIGKILLs a master that serves slots and returns its port.
    pub async fn kill_a_master(&mut self) -> anyhow::Result<u16> {
        let (port, _) = self
            .masters()
            .await?
            .into_iter()
            .find(|(_, slots)| *slots > 0)
            .context("no master serving slots")?;
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .context("master is not ours")?;
        node.kill().await;
        Ok(port)
    }

    /// Waits until the masters that serve slots no longer include `dead` and the cluster
    /// is healthy again: a replica took over.
    pub async fn wait_failover_from(&self, dead: u16, within: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = Vec::new();
        while started.elapsed() < within {
            let masters = self.masters().await.unwrap_or_default();
            last.clone_from(&masters);
            let serving: Vec<u16> = masters
                .iter()
                .filter(|(_, slots)| *slots > 0)
                .map(|(p, _)| *p)
                .collect();
            if serving.len() == 3 && !serving.contains(&dead) {
                return self
                    .wait_healthy(within.saturating_sub(started.elapsed()))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let nodes = cli(self.any_live_port()?, &["cluster", "nodes"])
            .await
            .unwrap_or_default();
        let mut logs = String::new();
        for n in &self.nodes {
            let log = std::fs::read_to_string(self.dir.join(n.port.to_string()).join("redis.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            logs.push_str(&format!(
                "\n--- {} ---\n{}",
                n.port,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        bail!(
            "no replica took over from {dead} within {within:?}; masters and their slots: {last:?}\n{nodes}{logs}"
        )
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = &mut n.child {
                let _ = c.start_kill();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The master name the Sentinels watch.
pub const SENTINEL_MASTER: &str = "mymaster";

/// One master, one replica and three Sentinels.
pub struct SentinelSet {
    data: Vec<Node>,
    sentinels: Vec<Node>,
    dir: PathBuf,
}

impl SentinelSet {
    /// Starts the master, its replica and three Sentinels, and waits until every Sentinel
    /// knows the replica and the other Sentinels.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = scratch_dir("redis-sentinel");
        std::fs::create_dir_all(&dir)?;
        let mut set = Self {
            data: Vec::new(),
            sentinels: Vec::new(),
            dir,
        };
        let master = free_port()?;
        let replica = free_port()?;
        for (port, replica_of) in [(master, None), (replica, Some(master))] {
            let node_dir = set.dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir)?;
            let mut args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &node_dir.to_string_lossy(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
                "--logfile",
                &node_dir.join("redis.log").to_string_lossy(),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            if let Some(m) = replica_of {
                args.extend(["--replicaof".into(), "127.0.0.1".into(), m.to_string()]);
            }
            set.data.push(Node::spawn(&args, port)?);
            wait_port(port, Duration::from_secs(10)).await?;
        }
        set.wait_replicas_in_sync(Duration::from_secs(30)).await?;
        for _ in 0..3 {
            let port = free_port()?;
            let conf = set.dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}/sentinel-{port}.log\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 2000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                    set.dir.display(),
                    set.dir.display()
                ),
            )?;
            let args = vec![conf.to_string_lossy().into_owned(), "--sentinel".into()];
            set.sentinels.push(Node::spawn(&args, port)?);
            wait_port(port, Duration::from_secs(10)).await?;
        }
        set.wait_sentinels_agree(master, true, Duration::from_secs(60))
            .await?;
        Ok(set)
    }

    /// The Sentinels, as `redis.nodes` wants them.
    pub fn nodes(&self) -> String {
        self.sentinels
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the master the first live Sentinel names.
    pub async fn current_master(&self) -> anyhow::Result<u16> {
        let s = self
            .sentinels
            .iter()
            .find(|n| n.alive())
            .context("no Sentinel")?;
        let out = cli(
            s.port,
            &["sentinel", "get-master-addr-by-name", SENTINEL_MASTER],
        )
        .await?;
        out.lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .context("sentinel names no master")
    }

    /// Waits until every live data node that is a replica has its link to the master up.
    async fn wait_replicas_in_sync(&self, within: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < within {
            let mut ok = true;
            for n in self.data.iter().filter(|n| n.alive()) {
                let info = cli(n.port, &["info", "replication"])
                    .await
                    .unwrap_or_default();
                if info_field(&info, "role") == Some("slave")
                    && info_field(&info, "master_link_status") != Some("up")
                {
                    ok = false;
                }
            }
            if ok {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("replicas not in sync after {within:?}")
    }

    /// Waits until every live Sentinel names `master`, which answers as master, and knows
    /// the other live Sentinels and (with `need_replica`, when both data nodes live) the
    /// replica, which it needs to fail over again.
    async fn wait_sentinels_agree(
        &self,
        master: u16,
        need_replica: bool,
        within: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let live_data = if need_replica {
            self.data.iter().filter(|n| n.alive()).count()
        } else {
            0
        };
        let live_sentinels = self.sentinels.iter().filter(|n| n.alive()).count();
        let mut last = String::new();
        while started.elapsed() < within {
            let mut ok = true;
            for s in self.sentinels.iter().filter(|n| n.alive()) {
                let named = cli(
                    s.port,
                    &["sentinel", "get-master-addr-by-name", SENTINEL_MASTER],
                )
                .await
                .unwrap_or_default();
                let state = cli(s.port, &["sentinel", "master", SENTINEL_MASTER])
                    .await
                    .unwrap_or_default();
                let fields: Vec<&str> = state.lines().map(str::trim).collect();
                let field = |name: &str| {
                    fields
                        .iter()
                        .position(|f| *f == name)
                        .and_then(|i| fields.get(i + 1))
                        .copied()
                };
                let replicas_ok = live_data < 2 || field("num-slaves") == Some("1");
                let others_ok = field("num-other-sentinels")
                    .and_then(|v| v.parse::<usize>().ok())
                    .is_some_and(|n| n + 1 >= live_sentinels);
                let flags_ok = field("flags") == Some("master");
                if named.lines().nth(1).map(str::trim) != Some(master.to_string().as_str())
                    || !replicas_ok
                    || !others_ok
                    || !flags_ok
                {
                    last = format!("sentinel {}: {}", s.port, fields.join(" "));
                    ok = false;
                }
            }
            let role = cli(master, &["role"]).await.unwrap_or_default();
            if ok && role.lines().next().map(str::trim) == Some("master") {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("the Sentinels do not agree on master {master} after {within:?}: {last}")
    }

    /// A manual failover (`SENTINEL FAILOVER`): the replica is promoted and the old master
    /// demoted to its replica. Returns the new master's port once every Sentinel names it
    /// and the demoted master replicates from it.
    pub async fn failover(&self) -> anyhow::Result<u16> {
        self.ready_to_fail_over().await?;
        let old = self.current_master().await?;
        let s = self
            .sentinels
            .iter()
            .find(|n| n.alive())
            .context("no Sentinel")?;
        cli(s.port, &["sentinel", "failover", SENTINEL_MASTER]).await?;
        let new = self.wait_master_other_than(old).await?;
        self.wait_replicas_in_sync(Duration::from_secs(30)).await?;
        self.wait_sentinels_agree(new, false, Duration::from_secs(60))
            .await?;
        Ok(new)
    }

    /// Waits until a failover can happen: the replica is in sync and every Sentinel knows
    /// it (Sentinels learn of a demoted master's new role from INFO, every few seconds).
    pub async fn ready_to_fail_over(&self) -> anyhow::Result<()> {
        self.wait_replicas_in_sync(Duration::from_secs(30)).await?;
        let master = self.current_master().await?;
        self.wait_sentinels_agree(master, true, Duration::from_secs(60))
            .await
    }

    /// SIGKILLs the current master once its replica is in sync; returns the port of the
    /// replica the Sentinels promote (a Sentinel that does not know the replica yet, e.g.
    /// right after a manual failover, learns of it within seconds and fails over then).
    pub async fn kill_master(&mut self) -> anyhow::Result<u16> {
        self.wait_replicas_in_sync(Duration::from_secs(30)).await?;
        let old = self.current_master().await?;
        let node = self
            .data
            .iter_mut()
            .find(|n| n.port == old)
            .context("master is not ours")?;
        node.kill().await;
        let new = self.wait_master_other_than(old).await?;
        self.wait_sentinels_agree(new, false, Duration::from_secs(60))
            .await?;
        Ok(new)
    }

    async fn wait_master_other_than(&self, old: u16) -> anyhow::Result<u16> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(port) = self.current_master().await
                && port != old
            {
                return Ok(port);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("the Sentinels did not replace master {old}")
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for n in self.data.iter_mut().chain(self.sentinels.iter_mut()) {
            if let Some(c) = &mut n.child {
                let _ = c.start_kill();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
