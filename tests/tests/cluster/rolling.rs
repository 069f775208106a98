//! Rolling restarts of bulkops' own processes on the clustered engines: two producers and
//! three workers on a 3-node RabbitMQ cluster (3 bulk shards), each in turn stopped with
//! SIGTERM mid-batch (it must exit 0 within 30 s) and replaced, as a Kubernetes rollout
//! does. Stopped workers return what they had not started; a stopped producer hands its
//! split lease back and the other resumes the split.

use std::time::Duration;

use bulkops_tests::rabbit_cluster::RabbitCluster;
use bulkops_tests::scenario::{bulk_create_all, create_world, finish_create, mid_batch};

use crate::rabbit::{ROLLING_ITEMS, cluster_env, machine_redis, pace};
use crate::{record, runs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_every_process() {
    for _ in 0..runs() {
        let cluster = RabbitCluster::start(3).await.expect("cluster");
        let env = cluster_env("c_rolling_procs", &cluster, &machine_redis()).await;
        let items = ROLLING_ITEMS / 2;
        let w = create_world(&env, items).await;
        pace(&env).await;
        let (first, api) = env.start_producer().await.expect("producer");
        let (second, _) = env.start_producer().await.expect("producer");
        let mut procs = vec![first, second];
        for _ in 0..3 {
            procs.push(env.start_worker().await.expect("worker"));
        }
        let batch = bulk_create_all(&api, &w).await;
        // Workers first, then producers, as a rollout of both Deployments would.
        procs.rotate_left(2);
        let steps = i64::try_from(procs.len()).unwrap_or(5);
        for (k, proc) in procs.iter().enumerate() {
            mid_batch(&env, batch, items * (k as i64 + 1) / (steps + 2)).await;
            let (name, status) = {
                let mut p = proc.lock().await;
                let status = p.terminate(Duration::from_secs(30)).await;
                (p.name.clone(), status)
            };
            let status = status.expect("exits within 30 s of SIGTERM");
            assert!(status.success(), "{name} exits 0 on SIGTERM: {status:?}");
            if name.starts_with("producer") {
                env.start_producer().await.expect("producer");
            } else {
                env.start_worker().await.expect("worker");
            }
        }
        record(
            "rolling restart of 2 producers and 3 workers (SIGTERM) on the RabbitMQ cluster",
            finish_create(&env, batch).await,
        );
        env.finish().await;
    }
}
