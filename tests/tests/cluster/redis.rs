//! Redis Cluster and Sentinel: the lock client against real clustered Redis, then real
//! batches on healthy and failing ones.

use std::time::{Duration, Instant};

use crate::{record, runs};
use bulkops_shared::config::{RedisMode, Settings, Sources};
use bulkops_shared::lock::{LockTarget, Locks};
use bulkops_tests::TestEnv;
use bulkops_tests::redis_cluster::{RedisCluster, SENTINEL_MASTER, SentinelSet, cli};
use bulkops_tests::scenario::{
    assert_mid_batch, convert_world, finish_convert, finish_create, keep_splitting, mid_batch,
    start_create_ready, start_processes, wait_all_ready,
};

fn lock_settings(mode: RedisMode, nodes: &str) -> bulkops_shared::config::RedisSettings {
    let sources = Sources {
        env: [
            ("BULKOPS__REDIS__MODE".to_owned(), mode.as_str().to_owned()),
            ("BULKOPS__REDIS__NODES".to_owned(), nodes.to_owned()),
            (
                "BULKOPS__REDIS__SENTINEL_MASTER".to_owned(),
                SENTINEL_MASTER.to_owned(),
            ),
            (
                "BULKOPS__REDIS__PREFIX".to_owned(),
                format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            ),
        ]
        .into_iter()
        .collect(),
        ..Sources::default()
    };
    Settings::load_from(&sources).expect("settings").redis
}

/// Waits (bounded) until the locks answer again after a failover.
async fn wait_ready(locks: &Locks) {
    let started = Instant::now();
    loop {
        match locks.ping().await {
            Ok(()) => return,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(60),
                "locks never came back: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Takes, contends for and releases a chunk's worth of locks spread over every slot.
async fn exercise(locks: &Locks) {
    let targets: Vec<LockTarget> = (1..=300)
        .map(LockTarget::Individual)
        .chain((1..=200).map(LockTarget::SalesRecord))
        .collect();
    let ttl = Duration::from_secs(30);
    let (a, b) = (Locks::new_token(), Locks::new_token());
    let held = locks.acquire(&a, &targets, ttl).await.expect("acquire");
    assert_eq!(held.len(), targets.len());
    assert!(held.iter().all(|h| *h), "a free lock is taken");
    // Re-entrant for its holder, refused to anyone else, key by key.
    let again = locks.acquire(&a, &targets, ttl).await.expect("re-acquire");
    assert!(again.iter().all(|h| *h));
    let mixed: Vec<LockTarget> = targets[..10]
        .iter()
        .copied()
        .chain((1001..=1010).map(LockTarget::Individual))
        .collect();
    let other = locks.acquire(&b, &mixed, ttl).await.expect("contend");
    assert_eq!(
        other,
        [vec![false; 10], vec![true; 10]].concat(),
        "answers come back in key order"
    );
    // Release deletes only the holder's own locks.
    assert_eq!(locks.release(&b, &targets).await.expect("release other"), 0);
    assert_eq!(
        locks.release(&a, &targets).await.expect("release"),
        targets.len()
    );
    assert_eq!(locks.release(&b, &mixed).await.expect("release b"), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_follow_a_redis_cluster_through_a_failover() {
    let mut cluster = RedisCluster::start().await.expect("redis cluster");
    let locks =
        Locks::connect(&lock_settings(RedisMode::Cluster, &cluster.seeds())).expect("locks");
    wait_ready(&locks).await;
    exercise(&locks).await;
    // Scripts flushed everywhere (as on a fresh or promoted node): NOSCRIPT is handled.
    for (port, _) in cluster.masters().await.expect("masters") {
        cli(port, &["script", "flush"]).await.expect("flush");
    }
    exercise(&locks).await;
    // Keep calls going through the failover: the client must not wedge mid-transition.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (locks, stop) = (locks.clone(), stop.clone());
        tokio::spawn(async move {
            let targets: Vec<LockTarget> = (5000..5200).map(LockTarget::Individual).collect();
            let (mut ok, mut failed) = (0_u32, 0_u32);
            while !stop.is_cancelled() {
                let t = Locks::new_token();
                match locks.acquire(&t, &targets, Duration::from_secs(5)).await {
                    Ok(_) => {
                        ok += 1;
                        let _ = locks.release(&t, &targets).await;
                    }
                    Err(_) => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dead = cluster.kill_a_master().await.expect("kill");
    cluster
        .wait_failover_from(dead, Duration::from_secs(60))
        .await
        .expect("failover");
    wait_ready(&locks).await;
    exercise(&locks).await;
    stop.cancel();
    let (ok, _) = load.await.expect("load");
    assert!(ok > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_follow_the_sentinels_through_failovers() {
    let mut set = SentinelSet::start().await.expect("sentinels");
    let locks = Locks::connect(&lock_settings(RedisMode::Sentinel, &set.nodes())).expect("locks");
    wait_ready(&locks).await;
    exercise(&locks).await;
    // A manual failover demotes the master under our connection…
    set.failover().await.expect("manual failover");
    wait_ready(&locks).await;
    exercise(&locks).await;
    // …a crash kills it.
    set.kill_master().await.expect("crash failover");
    wait_ready(&locks).await;
    exercise(&locks).await;
}

// ---- Real batches on clustered Redis --------------------------------------------------

const CREATE_ITEMS: i64 = 3000;
const CONVERT_ITEMS: i64 = 2000;

/// A lost node is waited out, never failed: no item of the batch ended `failed`.
pub(crate) async fn assert_none_failed(env: &TestEnv, batch: i64) {
    let failed = env
        .count(&format!(
            "SELECT n_failed::bigint FROM bulk_batches WHERE id = {batch}"
        ))
        .await;
    assert_eq!(failed, 0, "items of batch {batch} failed");
}

async fn on_redis_cluster(env: &TestEnv, cluster: &RedisCluster) {
    env.set("BULKOPS__REDIS__MODE", "cluster").await;
    env.set("BULKOPS__REDIS__NODES", cluster.seeds()).await;
    // Small chunks: many lock calls, and the fault lands mid-work.
    env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
}

async fn on_sentinels(env: &TestEnv, set: &SentinelSet) {
    env.set("BULKOPS__REDIS__MODE", "sentinel").await;
    env.set("BULKOPS__REDIS__NODES", set.nodes()).await;
    env.set("BULKOPS__REDIS__SENTINEL_MASTER", SENTINEL_MASTER)
        .await;
    env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
}

/// A bulk create with 3 workers on Redis as `env` is set up: nothing fails, nothing is
/// lost or duplicated; recorded as `what`.
async fn healthy_create(env: TestEnv, what: &str) {
    let (batch, _) = start_create_ready(&env, CREATE_ITEMS, 3).await;
    let tally = finish_create(&env, batch).await;
    assert_none_failed(&env, batch).await;
    record(what, tally);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_create_on_a_healthy_redis_cluster() {
    for _ in 0..runs() {
        let cluster = RedisCluster::start().await.expect("redis cluster");
        let env = TestEnv::new("c_rc_create").await.expect("env");
        on_redis_cluster(&env, &cluster).await;
        healthy_create(env, "Redis Cluster (3+3), healthy: bulk create").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_master_killed_mid_conversion() {
    for _ in 0..runs() {
        let mut cluster = RedisCluster::start().await.expect("redis cluster");
        let env = TestEnv::new("c_rc_kill").await.expect("env");
        on_redis_cluster(&env, &cluster).await;
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 25).await;
        keep_splitting(&env, 200).await;
        let world = convert_world(&env, CONVERT_ITEMS).await;
        let (api, probes) = start_processes(&env, 3).await;
        wait_all_ready(&probes).await;
        let batch = world.convert_all(&api).await;
        let total = world.total();
        mid_batch(&env, batch, total / 3).await;
        let dead = cluster.kill_a_master().await.expect("kill a master");
        cluster
            .wait_failover_from(dead, Duration::from_secs(60))
            .await
            .expect("a replica takes over");
        // Every process finds the new master by itself.
        wait_all_ready(&probes).await;
        let tally = finish_convert(&env, batch, &world.before).await;
        assert_none_failed(&env, batch).await;
        record(
            "Redis Cluster master SIGKILL mid-conversion (replica takes over)",
            tally,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_create_on_healthy_sentinels() {
    for _ in 0..runs() {
        let set = SentinelSet::start().await.expect("sentinels");
        let env = TestEnv::new("c_sn_create").await.expect("env");
        on_sentinels(&env, &set).await;
        healthy_create(
            env,
            "Redis Sentinel (1+1, 3 Sentinels), healthy: bulk create",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failovers_mid_batch() {
    for _ in 0..runs() {
        let mut set = SentinelSet::start().await.expect("sentinels");
        let env = TestEnv::new("c_sn_failover").await.expect("env");
        on_sentinels(&env, &set).await;
        // A conversion moves a lead's whole history per item: slow enough, with small
        // chunks, that the batch is still running after two failovers of a few seconds.
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 10).await;
        let world = convert_world(&env, CONVERT_ITEMS).await;
        let (api, probes) = start_processes(&env, 2).await;
        wait_all_ready(&probes).await;
        let batch = world.convert_all(&api).await;
        let total = world.total();
        // A manual failover (the master is demoted under the workers' connections)…
        mid_batch(&env, batch, total / 10).await;
        set.failover().await.expect("manual failover");
        wait_all_ready(&probes).await;
        // …then the new master crashes and the old one takes over again.
        assert_mid_batch(&env, batch).await;
        set.kill_master().await.expect("crash failover");
        wait_all_ready(&probes).await;
        let tally = finish_convert(&env, batch, &world.before).await;
        assert_none_failed(&env, batch).await;
        record(
            "Redis Sentinel failovers mid-conversion (manual, then master SIGKILL)",
            tally,
        );
        env.finish().await;
    }
}
