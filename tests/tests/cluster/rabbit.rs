//! RabbitMQ cluster scenarios: a bulk create and a bulk conversion on a healthy 3-node
//! cluster, the node leading the busiest work queue SIGKILLed mid-batch, the node the
//! producer is connected to SIGKILLed while it splits, and a rolling restart of all three
//! nodes mid-batch. The bulk lane is sharded into 3 queues (`amqp.bulk_queues = 3`), so
//! each node leads one shard and every loss takes a leader with it.
//!
//! Scenarios that leave the cluster whole share it (each with its own database, AMQP
//! prefix and Redis prefix): the healthy pair, and the two node losses (the lost node is
//! started again and the cluster waited on until every queue has all its members online
//! before the next scenario).

use std::time::Duration;

use bulkops_tests::TestEnv;
use bulkops_tests::env::Endpoints;
use bulkops_tests::pg_cluster::{PgBouncer, PoolMode};
use bulkops_tests::rabbit_cluster::RabbitCluster;
use bulkops_tests::redis_cluster::RedisCluster;
use bulkops_tests::scenario::{
    WAIT, assert_mid_batch, bulk_create_all, convert_world, counts_one_within, create_world,
    finish_convert, finish_create, keep_splitting, mid_batch, wait_done,
};

use crate::pg::machine_pg_port;
use crate::{record, runs};

/// Items of a create scenario.
pub const CREATE_ITEMS: i64 = 3000;
/// Sales Records of a conversion scenario.
pub const CONVERT_ITEMS: i64 = 2000;
/// Items of a node-loss scenario: enough that the batch is still running when the node
/// goes.
pub const NODE_LOSS_ITEMS: i64 = 6000;
/// Shards of the bulk lane: one leader per node.
pub const SHARDS: u16 = 3;

/// Where the programs find Redis: extra `BULKOPS__REDIS__…` settings. Empty means the
/// machine's Redis (`redis.url`, standalone) with the test's own key prefix; a Redis
/// Cluster is `[("BULKOPS__REDIS__MODE", "cluster"), ("BULKOPS__REDIS__NODES", …)]`.
pub type RedisSettings = Vec<(&'static str, String)>;

/// The machine's Redis.
pub fn machine_redis() -> RedisSettings {
    Vec::new()
}

/// A test environment on the cluster, its processes tuned so every fault lands mid-work:
/// small chunks, 3 bulk shards, and `redis` for the lock store.
pub async fn cluster_env(name: &str, cluster: &RabbitCluster, redis: &RedisSettings) -> TestEnv {
    cluster_env_on(name, cluster, redis, None).await
}

/// [`cluster_env`], with the programs reaching PostgreSQL at `pg` (a server base URL, e.g.
/// a PgBouncer's) instead of the machine's server directly.
pub async fn cluster_env_on(
    name: &str,
    cluster: &RabbitCluster,
    redis: &RedisSettings,
    pg: Option<String>,
) -> TestEnv {
    let mut endpoints = Endpoints::cluster(cluster.urls());
    if let Some(pg) = pg {
        endpoints.pg = pg;
    }
    let env = TestEnv::with(name, endpoints).await.expect("env");
    env.set("BULKOPS__AMQP__BULK_QUEUES", SHARDS).await;
    env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
    // A lost node is noticed by its clients within seconds (heartbeats), and a reconnect
    // that meets the dead node first fails fast.
    env.set("BULKOPS__AMQP__TIMEOUT_MS", 5000).await;
    for (k, v) in redis {
        env.set(k, v).await;
    }
    env
}

/// Items of a scenario that spans several restarts (paced by [`pace`]).
pub const ROLLING_ITEMS: i64 = 20000;

/// Paces a batch with the splitter's window: at most 25 of its messages wait in the queues
/// at once, so the split, and the batch, last through restarts that take seconds each.
pub async fn pace(env: &TestEnv) {
    env.set("BULKOPS__SPLIT__MAX_IN_FLIGHT_PER_BATCH", 25).await;
    env.set("BULKOPS__SPLIT__CHUNK_SIZE", 25).await;
}

/// The node (index) the latest "connected to the broker" line of a process's log names.
pub async fn connected_node(cluster: &RabbitCluster, log: &std::path::Path) -> Option<usize> {
    let text = tokio::fs::read_to_string(log).await.ok()?;
    text.lines()
        .rev()
        .filter(|l| l.contains("connected to the broker"))
        .filter_map(|l| l.split("node=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .find_map(|addr| cluster.node_at(addr))
}

/// Every work queue of the test's bulk lane has a replica on every node, and their leaders
/// are on different nodes.
async fn assert_shards_spread(cluster: &RabbitCluster, env: &TestEnv) {
    let queues = cluster
        .quorum_queues(&format!("{}.work.bulk", env.amqp_prefix))
        .await
        .expect("queues");
    assert_eq!(queues.len(), usize::from(SHARDS), "{queues:?}");
    let mut leaders: Vec<usize> = queues.iter().filter_map(|q| q.leader).collect();
    for q in &queues {
        assert_eq!(
            q.members,
            cluster.nodes.len(),
            "a replica on every node: {q:?}"
        );
    }
    leaders.sort_unstable();
    leaders.dedup();
    assert_eq!(
        leaders.len(),
        usize::from(SHARDS),
        "one shard leader per node: {queues:?}"
    );
}

/// A bulk create and a bulk conversion on the healthy cluster, with Redis at `redis` and
/// the programs reaching PostgreSQL at `pg` (the machine's server when `None`); `what`
/// names the setup in the results.
pub async fn healthy_create_and_convert(
    cluster: &RabbitCluster,
    redis: &RedisSettings,
    pg: Option<String>,
    what: &str,
) {
    let env = cluster_env_on("c_rabbit_create", cluster, redis, pg.clone()).await;
    let w = create_world(&env, CREATE_ITEMS).await;
    let api = env.start(3).await.expect("start");
    let batch = bulk_create_all(&api, &w).await;
    wait_done(&env, batch, CREATE_ITEMS / 4).await;
    assert_shards_spread(cluster, &env).await;
    let tally = finish_create(&env, batch).await;
    // Logs name the nodes by address; no URL (with its password) is ever printed.
    let logs = env.logs().await;
    assert!(logs.contains("connected to the broker"), "{logs}");
    assert!(
        !logs.contains("amqp://") && !logs.contains("guest:guest"),
        "a URL in the logs"
    );
    record(&format!("{what}: bulk create"), tally);
    env.finish().await;

    let env = cluster_env_on("c_rabbit_convert", cluster, redis, pg).await;
    let world = convert_world(&env, CONVERT_ITEMS).await;
    env.set("BULKOPS__WORKER__CHUNK_SIZE", 25).await;
    let api = env.start(3).await.expect("start");
    let batch = world.convert_all(&api).await;
    record(
        &format!("{what}: bulk conversion"),
        finish_convert(&env, batch, &world.before).await,
    );
    env.finish().await;
}

/// Every engine clustered at once, as production runs them: the 3-node RabbitMQ cluster
/// with 3 bulk shards, a Redis Cluster (3 masters, 3 replicas) for the locks, and the
/// programs reaching PostgreSQL through PgBouncer in session mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_clusters() {
    for _ in 0..runs() {
        let cluster = RabbitCluster::start(3).await.expect("cluster");
        let redis = RedisCluster::start().await.expect("redis cluster");
        let bouncer = PgBouncer::start(machine_pg_port(), PoolMode::Session)
            .await
            .expect("pgbouncer");
        let redis_settings: RedisSettings = vec![
            ("BULKOPS__REDIS__MODE", "cluster".to_owned()),
            ("BULKOPS__REDIS__NODES", redis.seeds()),
        ];
        healthy_create_and_convert(
            &cluster,
            &redis_settings,
            Some(bouncer.server_url()),
            "3-node RabbitMQ (3 bulk shards), Redis Cluster, PgBouncer",
        )
        .await;
    }
}

/// SIGKILL of the node leading the work queue with the most messages, mid-batch; the
/// batch carries on on the two survivors before the node comes back.
async fn leader_of_busiest_queue_killed(cluster: &mut RabbitCluster) {
    let env = cluster_env("c_rabbit_leader", cluster, &machine_redis()).await;
    let w = create_world(&env, NODE_LOSS_ITEMS).await;
    let (_, api) = env.start_producer().await.expect("producer");
    let batch = bulk_create_all(&api, &w).await;
    // Every message is in the shards before a worker starts: the queue depths and their
    // leaders are known before the batch runs, so the kill follows the mid-batch mark at
    // once.
    wait_split(&env, batch).await;
    let published = env
        .count(&format!(
            "SELECT split_published FROM bulk_batches WHERE id = {batch}"
        ))
        .await;
    // The broker refreshes the counts it reports every few seconds.
    let started = std::time::Instant::now();
    let queues = loop {
        let queues = cluster
            .queue_depths(&format!("{}.work.bulk", env.amqp_prefix))
            .await
            .expect("queue depths");
        let queued: u64 = queues.iter().map(|(_, n)| n).sum();
        if i64::try_from(queued).unwrap_or(0) >= published
            || started.elapsed() > Duration::from_secs(60)
        {
            break queues;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (busiest, depth) = queues
        .iter()
        .max_by_key(|(_, depth)| *depth)
        .cloned()
        .expect("a work queue");
    assert!(depth > 0, "{queues:?}");
    let leader = cluster.leader_of(&busiest).await.expect("leader");
    for _ in 0..3 {
        env.start_worker().await.expect("worker");
    }
    mid_batch(&env, batch, NODE_LOSS_ITEMS / 4).await;
    cluster.kill(leader).await;
    // The survivors elect new leaders and the processes that were connected to the lost
    // node reconnect to another: the batch moves on with the node still down.
    wait_done(&env, batch, NODE_LOSS_ITEMS * 2 / 3).await;
    let done = env
        .count(&format!(
            "SELECT n_created + n_skipped + n_failed FROM bulk_batch_live_counts WHERE batch_id = {batch}"
        ))
        .await;
    assert!(
        done >= NODE_LOSS_ITEMS * 2 / 3,
        "the batch moves on without the node: {done}"
    );
    cluster.resume(leader).await.expect("node back");
    let tally = finish_create(&env, batch).await;
    cluster
        .wait_whole(&[&env.amqp_prefix])
        .await
        .expect("cluster whole");
    // The runbook's last step: the shard that lost its leader has it on a survivor, which
    // now leads two shards, until the leaders are rebalanced.
    cluster
        .rebalance(&format!("^{}\\.work\\.bulk", env.amqp_prefix))
        .await
        .expect("rebalance");
    assert_shards_spread(cluster, &env).await;
    record(
        "RabbitMQ node leading the busiest work queue SIGKILLed mid-batch",
        tally,
    );
    env.finish().await;
}

/// Waits until every item of the batch is published.
async fn wait_split(env: &TestEnv, batch: i64) {
    counts_one_within(
        env,
        &format!(
            "SELECT count(*) FROM bulk_batches WHERE id = {batch} AND split_done_at IS NOT NULL"
        ),
        WAIT,
        Duration::from_millis(50),
    )
    .await;
}

/// SIGKILL of the node the producer is connected to while it splits: its unconfirmed
/// publishes are published again through another node.
async fn producer_node_killed_while_splitting(cluster: &mut RabbitCluster) {
    let env = cluster_env("c_rabbit_split", cluster, &machine_redis()).await;
    let w = create_world(&env, NODE_LOSS_ITEMS).await;
    // A small queue window keeps the split going for most of the batch.
    keep_splitting(&env, 300).await;
    let (producer, api) = env.start_producer().await.expect("producer");
    for _ in 0..3 {
        env.start_worker().await.expect("worker");
    }
    let batch = bulk_create_all(&api, &w).await;
    wait_done(&env, batch, NODE_LOSS_ITEMS / 4).await;
    let log = producer.lock().await.log.clone();
    let node = connected_node(cluster, &log)
        .await
        .expect("the producer logged its node");
    let published = env
        .count(&format!(
            "SELECT split_published FROM bulk_batches WHERE id = {batch}"
        ))
        .await;
    assert!(
        published < NODE_LOSS_ITEMS,
        "the split is under way when its node dies"
    );
    assert_mid_batch(&env, batch).await;
    cluster.kill(node).await;
    wait_done(&env, batch, NODE_LOSS_ITEMS * 2 / 3).await;
    let now = connected_node(cluster, &log).await;
    assert!(
        now.is_some() && now != Some(node),
        "the producer went on through another node ({now:?}, lost {node})"
    );
    cluster.resume(node).await.expect("node back");
    let tally = finish_create(&env, batch).await;
    cluster
        .wait_whole(&[&env.amqp_prefix])
        .await
        .expect("cluster whole");
    record("RabbitMQ node the producer splits through SIGKILLed", tally);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_lost_mid_batch() {
    for _ in 0..runs() {
        let mut cluster = RabbitCluster::start(3).await.expect("cluster");
        leader_of_busiest_queue_killed(&mut cluster).await;
        producer_node_killed_while_splitting(&mut cluster).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_the_nodes() {
    for _ in 0..runs() {
        let mut cluster = RabbitCluster::start(3).await.expect("cluster");
        let env = cluster_env("c_rabbit_rolling", &cluster, &machine_redis()).await;
        // One agency, and one batch, per node restart. A single batch had to outlast all
        // three restarts, and on a fast run it finished during the second one (CI saw the
        // third restart land after completion): whether the last fault was mid-batch
        // depended on the machine's speed. A fresh batch per restart makes every restart
        // start while its batch has at least 90 % of its items to go.
        // The three batches together are the size one batch used to be. (The "lost"
        // items CI reported here twice were batches still running when the tally's wait
        // ran out: the split counted its window without the unfolded counter shards and
        // trickled the paced batches out at ~50 items/s. The wait now says so.)
        let per_batch = ROLLING_ITEMS / 3;
        let mut worlds = Vec::new();
        for _ in 0..cluster.nodes.len() {
            worlds.push(create_world(&env, per_batch).await);
        }
        pace(&env).await;
        let api = env.start(3).await.expect("start");
        let mut batches = Vec::new();
        for (i, w) in worlds.iter().enumerate() {
            let batch = bulk_create_all(&api, w).await;
            batches.push(batch);
            mid_batch(&env, batch, per_batch / 10).await;
            // A rolling restart: a clean stop, the node back, the cluster whole again
            // before the next node goes (the earlier batches keep running through it).
            cluster.stop(i).await;
            cluster.resume(i).await.expect("node back");
            cluster
                .wait_whole(&[&env.amqp_prefix])
                .await
                .expect("cluster whole");
        }
        let mut tally = bulkops_tests::check::Tally::default();
        for batch in batches {
            tally += finish_create(&env, batch).await;
        }
        record("rolling restart of all 3 RabbitMQ nodes mid-batch", tally);
        env.finish().await;
    }
}
