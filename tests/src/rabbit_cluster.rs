//! A RabbitMQ cluster of the test's own: three nodes of the installed broker on this host,
//! each a [`RabbitInstance`] with its own node name, ports, data directory, config file and
//! plugins file, sharing one Erlang cookie of their own (in a scratch `HOME`), joined with
//! `join_cluster`. Tests kill and restart its nodes, ask which node leads a queue, and wait
//! for the cluster to be whole again.
//!
//! The cookie is the cluster's own, not the machine broker's, so nothing done here can
//! reach the machine's node `rabbit`. Dropping the cluster kills every node and removes
//! its directories, also when the test fails.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::services::{RabbitInstance, RabbitNode, Stop};

/// Longest wait for a node to boot, join or come back.
const NODE_WAIT: Duration = Duration::from_secs(120);
/// Longest wait for one `rabbitmqctl` call.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// A cluster of nodes on this host.
pub struct RabbitCluster {
    /// The nodes, in the order they were started (node 0 is the one the others joined).
    pub nodes: Vec<RabbitInstance>,
    cookie: String,
    home: PathBuf,
}

impl RabbitCluster {
    /// Starts `n` nodes in parallel and joins nodes 1.. to node 0 (about 30 s for 3).
    ///
    /// # Errors
    /// When a node does not boot or join.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let home = std::env::temp_dir().join(format!("bulkops-rabbit-cluster-{}", &id[..8]));
        std::fs::create_dir_all(&home)?;
        let cookie = format!("BULKOPSTEST{}", id.to_uppercase());
        let cookie_file = home.join(".erlang.cookie");
        std::fs::write(&cookie_file, &cookie)?;
        let status = std::process::Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq", &home.to_string_lossy()])
            .status()?;
        if !status.success() {
            bail!("chown rabbitmq {} failed", home.display());
        }
        // Erlang refuses a cookie file others can read.
        std::fs::set_permissions(
            &cookie_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o400),
        )?;
        let mut cluster = Self {
            nodes: Vec::with_capacity(n),
            cookie,
            home,
        };
        for i in 0..n {
            cluster.nodes.push(RabbitInstance::spawn(RabbitNode {
                node: format!("bulkopsc{}n{}@localhost", &id[..6], i + 1),
                home: cluster.home.clone(),
                // A minority that loses the majority stops serving instead of diverging,
                // as a 3-node production cluster is configured.
                config: "cluster_partition_handling = pause_minority\n".into(),
            })?);
        }
        for node in &cluster.nodes {
            node.wait_up().await?;
        }
        let first = cluster.nodes[0].node().to_owned();
        for i in 1..n {
            cluster.ctl(i, &["stop_app"]).await?;
            cluster.ctl(i, &["join_cluster", &first]).await?;
            cluster.ctl(i, &["start_app"]).await?;
            cluster.nodes[i].wait_up().await?;
        }
        cluster.wait_whole(&[]).await?;
        Ok(cluster)
    }

    /// The nodes' AMQP URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RabbitInstance::url).collect()
    }

    /// The URLs as `BULKOPS__AMQP__URLS` takes them (comma-separated).
    pub fn urls_csv(&self) -> String {
        self.urls().join(",")
    }

    /// The index of the node listening on `host:port` (as the programs log it).
    pub fn node_at(&self, addr: &str) -> Option<usize> {
        let port: u16 = addr.rsplit(':').next()?.parse().ok()?;
        self.nodes.iter().position(|n| n.port == port)
    }

    /// Runs `rabbitmqctl` against node `i` and returns its standard output.
    ///
    /// # Errors
    /// When it fails or takes longer than a minute.
    pub async fn ctl(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let node = self.nodes.get(i).context("no such node")?.node().to_owned();
        let out = tokio::time::timeout(
            CTL_TIMEOUT,
            tokio::process::Command::new("rabbitmqctl")
                .args(["--erlang-cookie", &self.cookie, "-n", &node, "-q"])
                .args(args)
                .output(),
        )
        .await
        .with_context(|| format!("rabbitmqctl {args:?} on {node} timed out"))??;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?} on {node}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `rabbitmqctl … --formatter json` on the first running node.
    async fn ctl_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut last = None;
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_running() {
                continue;
            }
            let mut full = args.to_vec();
            full.extend(["--formatter", "json"]);
            match self.ctl(i, &full).await {
                Ok(out) => return Ok(serde_json::from_str(out.trim())?),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no node runs")))
    }

    /// The quorum queues whose name starts with `prefix`: name, leader node index and the
    /// number of members online.
    ///
    /// # Errors
    /// When no node answers.
    pub async fn quorum_queues(&self, prefix: &str) -> anyhow::Result<Vec<QueueReplicas>> {
        let list = self
            .ctl_json(&["list_queues", "name", "type", "leader", "members", "online"])
            .await?;
        let mut out = Vec::new();
        for q in list.as_array().into_iter().flatten() {
            let name = q["name"].as_str().unwrap_or_default();
            if !name.starts_with(prefix) || q["type"].as_str() != Some("quorum") {
                continue;
            }
            let leader = q["leader"].as_str().unwrap_or_default();
            out.push(QueueReplicas {
                name: name.to_owned(),
                leader: self.nodes.iter().position(|n| n.node() == leader),
                members: q["members"].as_array().map_or(0, Vec::len),
                online: q["online"].as_array().map_or(0, Vec::len),
            });
        }
        Ok(out)
    }

    /// The queues whose name starts with `prefix`, with their messages (ready and
    /// unacknowledged).
    ///
    /// # Errors
    /// When no node answers.
    pub async fn queue_depths(&self, prefix: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let list = self.ctl_json(&["list_queues", "name", "messages"]).await?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|q| {
                let name = q["name"].as_str()?;
                name.starts_with(prefix)
                    .then(|| (name.to_owned(), q["messages"].as_u64().unwrap_or(0)))
            })
            .collect())
    }

    /// The index of the node that leads `queue`.
    ///
    /// # Errors
    /// When no node answers or the queue has no leader now.
    pub async fn leader_of(&self, queue: &str) -> anyhow::Result<usize> {
        self.quorum_queues(queue)
            .await?
            .into_iter()
            .find(|q| q.name == queue)
            .and_then(|q| q.leader)
            .with_context(|| format!("{queue} has no leader"))
    }

    /// Waits until every node runs in the cluster and every quorum queue whose name starts
    /// with one of `prefixes` has all its members online.
    ///
    /// # Errors
    /// When the cluster is not whole within two minutes.
    pub async fn wait_whole(&self, prefixes: &[&str]) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < NODE_WAIT {
            match self.whole(prefixes).await {
                Ok(None) => return Ok(()),
                Ok(Some(why)) => last = why,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!("the cluster is not whole after {NODE_WAIT:?}: {last}")
    }

    async fn whole(&self, prefixes: &[&str]) -> anyhow::Result<Option<String>> {
        let status = self.ctl_json(&["cluster_status"]).await?;
        let running = status["running_nodes"].as_array().map_or(0, Vec::len);
        if running < self.nodes.len() {
            return Ok(Some(format!(
                "{running} of {} nodes running",
                self.nodes.len()
            )));
        }
        for prefix in prefixes {
            for q in self.quorum_queues(prefix).await? {
                if q.online < q.members || q.leader.is_none() {
                    return Ok(Some(format!(
                        "{}: {} of {} members online",
                        q.name, q.online, q.members
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Spreads the leaders of the quorum queues matching `queue_pattern` (a regular
    /// expression) over the running nodes: `rabbitmq-queues rebalance quorum`, as the
    /// runbook does after a node came back.
    ///
    /// # Errors
    /// When the command fails.
    pub async fn rebalance(&self, queue_pattern: &str) -> anyhow::Result<()> {
        let node = self.nodes.first().context("no node")?.node().to_owned();
        let out = tokio::time::timeout(
            CTL_TIMEOUT,
            tokio::process::Command::new("rabbitmq-queues")
                .args(["--erlang-cookie", &self.cookie, "-n", &node, "-q"])
                .args(["rebalance", "quorum", "--queue-pattern", queue_pattern])
                .output(),
        )
        .await
        .context("rabbitmq-queues rebalance timed out")??;
        if !out.status.success() {
            bail!(
                "rabbitmq-queues rebalance: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// SIGKILLs node `i` (a crash: no goodbye to its peers or its clients).
    pub async fn kill(&mut self, i: usize) {
        if let Some(n) = self.nodes.get_mut(i) {
            n.stop(Stop::Crash).await;
        }
    }

    /// Stops node `i` cleanly.
    pub async fn stop(&mut self, i: usize) {
        if let Some(n) = self.nodes.get_mut(i) {
            n.stop(Stop::Graceful).await;
        }
    }

    /// Starts node `i` again after [`RabbitCluster::kill`] or [`RabbitCluster::stop`]; it
    /// rejoins the cluster by itself (membership is in its data directory).
    ///
    /// # Errors
    /// When it does not come back.
    pub async fn resume(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes
            .get_mut(i)
            .context("no such node")?
            .resume()
            .await
    }
}

/// A quorum queue's replicas as the cluster reports them.
#[derive(Debug, Clone)]
pub struct QueueReplicas {
    /// Queue name.
    pub name: String,
    /// Index of the leader's node, when it has one.
    pub leader: Option<usize>,
    /// Members (replicas).
    pub members: usize,
    /// Members online.
    pub online: usize,
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        // Each node's own Drop kills its VM and removes its data; then the shared home.
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}
